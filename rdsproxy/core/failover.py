"""Targets and their pools as they come, go and fail: registration, describe-targets, and
what the proxy does when a database connection dies (held requests, idle purges, promotion)."""
from __future__ import annotations

import asyncio
import logging
import os

from .. import tls as tlsmod
from .._fastpath import Phase
from .pool import Pool
from .targets import Role, Target, TargetState

log = logging.getLogger("rdsproxy.engine")


def held_by_pool(clients, pools) -> tuple[dict, dict]:
    """Per pool of `pools`, how many of `clients` hold one of its connections in an
    unpinned transaction (ACTIVE), and how many pinned."""
    in_transaction = dict.fromkeys(pools, 0)
    pinned = dict(in_transaction)
    for client in clients:
        server = client.server
        if server is None or server.pool not in pinned:
            continue
        if client.phase == Phase.ACTIVE:
            in_transaction[server.pool] += 1
        elif client.phase == Phase.PINNED:
            pinned[server.pool] += 1
    return in_transaction, pinned


class Failover:
    """The engine's targets and pools (through its router and target group) and the
    decisions taken when one of them fails."""

    def __init__(self, engine):
        self.engine = engine
        self.group = engine.group
        self.router = engine.router
        self.loop = engine.loop
        self.group.on_change = self._on_target_change
        self.group.on_probe = self._on_probe
        self._promoting = None
        # Clients whose connection died before answering, per target, until a health check
        # started after that tells whether the target is going away (see hold_for_health_check).
        self._held: dict[Target, list] = {}
        self._last_purge: dict[Target, float] = {}

    # -- targets -----------------------------------------------------------------------
    def add_target(self, tcfg) -> Target:
        engine = self.engine
        tg = engine.config.target_group
        target = Target(tcfg.name, tcfg.host, tcfg.port)
        engine.target_configs[target] = tcfg
        pool = self.router.pools[target] = Pool(
            tcfg.name, lambda key, discover: engine.open_connection(target, key, discover),
            max_connections_percent=tg.max_connections_percent,
            max_idle_connections_percent=tg.max_idle_connections_percent,
            borrow_timeout=tg.connection_borrow_timeout, idle_grace=tg.idle_connection_grace,
            lifetime=tg.max_connection_lifetime, metrics=engine.metrics, loop=self.loop,
            defaults=engine.defaults,
            on_open_failure=lambda key, waiter, exc: self._open_failed(target, key, waiter, exc))
        pool.target = target
        pool.tls = tcfg.tls != "disable"
        pool.on_connection_died = self.server_connection_died
        if target.name not in (t.name for t in self.group.targets):
            self.group.add_target(target)
        return target

    async def apply_targets(self, configs) -> None:
        """Config reload: register new targets, deregister removed ones (their pools close)."""
        engine = self.engine
        current = {t.name: t for t in engine.target_configs}
        wanted = {c.name: c for c in configs}
        for name, tcfg in wanted.items():
            if name not in current:
                target = self.add_target(tcfg)
                engine.target_ssl[target] = tlsmod.client_context(tcfg.tls, tcfg.tls_ca_file or None)
                log.info("target %s added", name)
        for name, target in current.items():
            if name not in wanted:
                log.info("target %s removed: deregistering", name)
                await self.group.remove_target(target)
                # Deregistering already closed its idle connections and re-routed its
                # waiters; connections still lent out are closed when they come back.
                pool = self.router.pools.pop(target)
                await pool.close()
                engine.target_configs.pop(target, None)
                engine.target_ssl.pop(target, None)

    def describe_targets(self) -> list[dict]:
        """describe-db-proxy-targets, plus each target's pool figures."""
        out = self.group.describe()
        by_name = {t.name: t for t in self.router.pools}
        _, pinned = held_by_pool(self.engine.clients, self.router.pools.values())
        for entry in out:
            target = by_name.get(entry["RdsResourceId"])
            pool = self.router.pools.get(target)
            if pool is not None:
                stats = pool.stats()
                entry["Pool"] = {"InUse": stats["borrowed"], "Idle": stats["idle"],
                                 "Open": stats["open"], "Max": stats["max"],
                                 "Waiting": stats["waiting"], "Pinned": pinned[pool]}
        return out

    # -- failures ----------------------------------------------------------------------
    def server_connection_died(self, pool) -> None:
        """A database connection ended unexpectedly. A crash or a failover ends all of a
        target's connections within moments, and lending a sibling that is about to die
        would cost a client its transaction: close the idle ones (new ones are cheap) and
        check the target now. Once per half second per target, for a burst of losses."""
        target = getattr(pool, "target", None)
        if target is None or target not in self.router.pools:
            return
        now = self.loop.time()
        if now - self._last_purge.get(target, -1.0) < 0.5:
            return
        self._last_purge[target] = now
        closed = pool.close_idle()
        if closed:
            log.info("a connection to %s died: closed its %d idle sibling(s); checking it now",
                     target.name, closed)
        self.group.probe_soon(target)

    def hold_for_health_check(self, client, server, resend: bool = False) -> None:
        """`client`'s request went to a connection that died without answering. Decide at
        the next health check of its target that starts from now: target down (or no longer
        in the role the client needs) -> send the request again; target fine -> report,
        or with `resend` (the engine knows that nothing of the request ran) send it again
        there."""
        target = getattr(server.pool, "target", None)
        if target is None or target not in self.router.pools:
            self.loop.call_soon(client.replay_request)   # the target was removed
            return
        self._held.setdefault(target, []).append((client, server, self.loop.time(), resend))
        self.group.probe_soon(target)

    def _on_probe(self, target: Target) -> None:
        self.router.on_probe(target)
        held = self._held.get(target)
        if not held:
            return
        keep = []
        for entry in held:
            client, server, since, resend = entry
            if client.state != self.engine.ready_state:
                continue
            if target.probe_started is None or target.probe_started < since:
                keep.append(entry)   # this check began before the loss
            elif (resend or target.consecutive_failures
                  or target.state is not TargetState.AVAILABLE
                  or self.router.target_for(client.route_role) is not target):
                client.replay_request()
            else:
                client.report_server_lost(server)
        if keep:
            self._held[target] = keep
        else:
            self._held.pop(target, None)

    def _on_target_change(self, target: Target, what: str) -> None:
        engine = self.engine
        engine.metrics.TargetStateChanges += 1
        self.router.on_change(target, what)
        if (target.state is not TargetState.AVAILABLE
                and engine.config.target_group.failover_promote_command):
            self._maybe_promote()

    def _maybe_promote(self) -> None:
        """failover_promote_command: once per failover, when there is no writer but a reader."""
        if self.group.writer() is not None or self._promoting is not None:
            return
        readers = self.group.readers()
        writers_down = [t for t in self.group.targets if t.role is Role.WRITER]
        if not readers or not writers_down:
            return
        reader = readers[0]
        self._promoting = self.loop.create_task(self._run_promote(reader))

    async def _run_promote(self, reader: Target) -> None:
        command = self.engine.config.target_group.failover_promote_command
        env = dict(os.environ, RDSPROXY_PROMOTE_HOST=reader.host,
                   RDSPROXY_PROMOTE_PORT=str(reader.port), RDSPROXY_PROMOTE_NAME=reader.name)
        log.warning("no writer: running failover_promote_command for %s", reader.name)
        try:
            proc = await asyncio.create_subprocess_shell(command, env=env,
                                                         stdout=asyncio.subprocess.PIPE,
                                                         stderr=asyncio.subprocess.STDOUT)
            out, _ = await asyncio.wait_for(proc.communicate(), 120)
            log.warning("failover_promote_command exited with %s: %s", proc.returncode,
                        out.decode(errors="replace").strip()[-500:])
        except Exception as exc:  # noqa: BLE001 - a failed hook must not stop the proxy
            log.error("failover_promote_command failed: %s", exc)
        finally:
            # Allow another run only after a writer has been seen again.
            await self.group.wait_for_writer(3600)
            self._promoting = None

    def _open_failed(self, target: Target, key, waiter, exc) -> bool:
        """A new connection to `target` failed. Unreachable (not refused by the server):
        hold the borrower until the health checks decide, rather than fail it."""
        if not self.engine.target_unreachable(exc):
            return False   # the server answered (bad password, no database, TLS refused...)
        if self.loop.time() >= (waiter.borrow_deadline or 0) and waiter.borrow_deadline is not None:
            return False
        self.router.requeue(waiter.route_role, key, waiter, target, exc)
        return True
