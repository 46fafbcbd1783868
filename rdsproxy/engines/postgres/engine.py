"""The PostgreSQL engine: accounts, the pool's connector, cancel keys and client housekeeping."""
from __future__ import annotations

import asyncio
import logging
import os
import random
import struct
from dataclasses import dataclass

from ... import tls as tlsmod
from ...auth.iam import Principal
from ...auth.scram import ScramSecret, make_server_key_material
from ...auth.throttle import LoginThrottle
from ...core.pool import Pool
from ...core.router import Router
from ...core.targets import Target, TargetGroup
from ...secrets import Credentials, SecretCache, SecretError, read_principal_secret, read_secret
from . import protocol as pg
from .backend import ServerError, open_server_connection
from .frontend import CLOSED, READY, ClientConnection
from .health import probe as health_probe
from .pinning import PinningRules

log = logging.getLogger("rdsproxy.postgres")

# Statements longer than this pin (RDS Proxy's rule), so capturing more is pointless.
RULES_CAPTURE_LIMIT = 16 * 1024 + 1


@dataclass
class Account:
    credentials: Credentials
    client_auth: str
    scram_secret: ScramSecret
    iam_auth: str = "DISABLED"
    reference: str = ""


class PostgresEngine:
    """Everything PostgreSQL-specific the proxy core needs, for one target group."""

    rules_capture_limit = RULES_CAPTURE_LIMIT

    def __init__(self, config, metrics, loop):
        self.config = config
        self.metrics = metrics
        self.loop = loop
        self.clock = loop.time()
        self.rules = PinningRules(config.target_group.session_pinning_filters)
        self.accounts: dict[str, Account] = {}
        self.dummy_scram_secret = make_server_key_material(os.urandom(16).hex())
        tg = config.target_group
        self.defaults: dict = {}   # per (user, database, options): the server's parameters
        self.target_configs: dict[Target, object] = {}
        self.target_ssl: dict[Target, object] = {}   # database-leg TLS context per target
        self.group = TargetGroup([], self._probe, interval=tg.health_check_interval,
                                 timeout=tg.health_check_timeout, failures=tg.health_check_failures,
                                 loop=loop)
        self.router = Router(self.group, {}, borrow_timeout=tg.connection_borrow_timeout,
                             read_only_fallback_to_writer=tg.read_only_fallback_to_writer,
                             metrics=metrics, loop=loop)
        self.group.on_change = self._on_target_change
        self.group.on_probe = self._on_probe
        self._promoting = None
        # Clients whose connection died before answering, per target, until a health check
        # started after that tells whether the target is going away (see hold_for_health_check).
        self._held: dict[Target, list] = {}
        for tcfg in config.targets:
            self._add_target(tcfg)
        self.clients: set[ClientConnection] = set()
        self.router.borrowers = self.clients
        self.by_pid: dict[int, ClientConnection] = {}
        self.pinned_sessions = 0
        self._greetings: dict = {}
        self._entropy = bytearray()
        self._housekeeper = None
        self._refresher = None
        self._refreshing = None
        # Secrets are read through caches so that AWS reads happen off the loop and a
        # failed re-read keeps the last good value.
        self._secret_errors: list[Exception] = []   # from the latest refresh
        self.secrets = SecretCache(config.base_dir, config.secrets_refresh_interval,
                                   reader=self._recording(read_secret))
        self.principal_secrets = SecretCache(config.base_dir, config.secrets_refresh_interval,
                                             reader=self._recording(read_principal_secret))
        self.principals: dict[str, Principal] = {}
        self.iam_region = (config.iam.region or None) if config.iam is not None else None
        self.throttle = LoginThrottle()
        self.server_ssl = None           # client-leg TLS context (None: answer 'N')
        metrics.ClientConnectionsTLS = 0
        metrics.ClientConnectionsNoTLS = 0

    def _recording(self, reader):
        # The cache keeps the old value on a failed re-read; remember why, so SIGHUP can say so.
        def read(reference, base_dir):
            try:
                return reader(reference, base_dir)
            except Exception as exc:
                self._secret_errors.append(exc)
                raise
        return read

    def _build_accounts(self) -> None:
        """Accounts from the cached secrets (every reference must be in the cache)."""
        accounts = {}
        for entry in self.config.auth:
            creds = self.secrets.get(entry.secret)
            previous = self.accounts.get(creds.username)
            if previous is not None and previous.credentials.password == creds.password:
                secret = previous.scram_secret
            else:
                secret = make_server_key_material(creds.password)
            accounts[creds.username] = Account(creds, entry.client_password_auth_type, secret,
                                               entry.iam_auth, entry.secret)
        principals = {}
        if self.config.iam is not None:
            for i, entry in enumerate(self.config.iam.principals):
                akid, secret_key = self.principal_secrets.get(entry.secret_access_key)
                if entry.access_key_id and entry.access_key_id != akid:
                    raise SecretError(f"{self.config.source}: iam.principals[{i}]: secret "
                                      f"{entry.secret_access_key!r} holds another AccessKeyId than "
                                      f"access_key_id {entry.access_key_id!r}")
                principals[akid] = Principal(akid, secret_key, tuple(entry.resources))
        self.accounts = accounts
        self.principals = principals

    async def aload_accounts(self) -> None:
        """First read of every secret, in worker threads (AWS calls must not block the loop)."""
        for entry in self.config.auth:
            await self.secrets.aget(entry.secret)
        if self.config.iam is not None:
            for entry in self.config.iam.principals:
                await asyncio.to_thread(self.principal_secrets.get, entry.secret_access_key)
        self._build_accounts()

    async def refresh_secrets(self) -> list[str]:
        """Re-read every secret (off the loop); rebuild the accounts if any changed.

        Concurrent callers (many logins failing at once after a rotation) share one refresh.
        """
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = self.loop.create_task(self._refresh_secrets())
        return await asyncio.shield(self._refreshing)

    async def _refresh_secrets(self) -> list[str]:
        self._secret_errors = []
        changed = await self.secrets.arefresh_all()
        changed += await self.principal_secrets.arefresh_all()
        if changed:
            self._build_accounts()
            log.info("credentials updated from %d changed secret(s); new logins and new database "
                     "connections use them, open sessions continue", len(changed))
        return changed

    def load_tls(self) -> None:
        """(Re)build the TLS contexts from the files; new handshakes use the new ones."""
        cfg = self.config
        if cfg.tls is not None:
            self.server_ssl = tlsmod.server_context(cfg.tls.cert_file, cfg.tls.key_file,
                                                    cfg.tls.ca_file or None,
                                                    require_client_cert=cfg.tls.require_client_cert)
        for target, tcfg in self.target_configs.items():
            self.target_ssl[target] = tlsmod.client_context(tcfg.tls, tcfg.tls_ca_file or None)

    async def reload(self) -> None:
        """SIGHUP: secrets and certificates again; a failure keeps what is in use."""
        try:
            await self.refresh_secrets()
            if self._secret_errors:
                raise self._secret_errors[0]
            log.info("secrets reloaded")
        except SecretError as exc:
            log.error("secrets not reloaded: %s (keeping the previous value)", exc)
        except Exception as exc:  # noqa: BLE001 - a reload must never stop the proxy
            log.error("secrets not reloaded: %s (keeping the previous value)", type(exc).__name__)
        try:
            self.load_tls()
            if self.server_ssl is not None:
                log.info("TLS certificate reloaded from %s", self.config.tls.cert_file)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.error("TLS certificate not reloaded (keeping the current one): %s", exc)

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        self.load_tls()
        await self.aload_accounts()
        await self.group.start()
        self._housekeeper = self.loop.create_task(self._housekeeping())
        if self.config.secrets_refresh_interval > 0:
            self._refresher = self.loop.create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.secrets_refresh_interval)
            try:
                await self.refresh_secrets()
            except Exception:  # noqa: BLE001 - keep refreshing
                log.exception("secret refresh failed")

    def client_factory(self, endpoint):
        return lambda: ClientConnection(self, endpoint)

    def client_connected(self, client) -> None:
        self.clients.add(client)
        self.metrics.ClientConnectionsReceived += 1
        self.metrics.ClientConnections = len(self.clients)

    def client_gone(self, client) -> None:
        self.clients.discard(client)
        if client.pid:
            self.by_pid.pop(client.pid, None)
        self.metrics.ClientConnectionsClosed += 1
        self.metrics.QueryRequests += client.queries
        self.metrics.ClientConnections = len(self.clients)

    async def _housekeeping(self) -> None:
        """Once a second: the coarse clock, idle client timeouts, login timeouts, pool reaping."""
        idle_timeout = self.config.idle_client_timeout
        while True:
            await asyncio.sleep(1.0)
            now = self.clock = self.loop.time()
            for client in list(self.clients):
                if client.state == READY:
                    if client.activity != client.seen_activity:  # it sent something
                        client.seen_activity = client.activity
                        client.last_active = now
                    if client.outstanding or client.waiting:
                        # Busy now (a request in flight): idleness starts after this tick.
                        # Holding a connection is not busy: a pinned session or an open
                        # transaction left idle is closed too (and its connection reset).
                        client.last_active = now
                    # last_active is stamped with this coarse clock, up to one tick
                    # early: allow that tick so an active client is never cut off.
                    elif idle_timeout and now - client.last_active >= idle_timeout + 1.0:
                        log.info("client %s (user %s) idle for %gs: closing (idle_client_timeout)",
                                 client.peer, client.user, idle_timeout)
                        client.fatal("57P05", "terminating connection due to idle_client_timeout")
                elif now - client.connected_at >= 60 and client.state not in (READY, CLOSED):
                    client.fatal("08006", "authentication timed out")
            for pool in self.router.pools.values():
                pool.reap()

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) until no client holds a database connection."""
        deadline = self.loop.time() + timeout
        while self.loop.time() < deadline:
            if not any(c.server is not None or c.waiting for c in self.clients):
                return
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self._housekeeper is not None:
            self._housekeeper.cancel()
        if self._refresher is not None:
            self._refresher.cancel()
        await self.group.stop()
        for client in list(self.clients):
            client.fatal("57P01", "terminating connection because the proxy is shutting down")
        for pool in self.router.pools.values():
            await pool.close()

    # -- database connections ----------------------------------------------------------
    # -- targets -----------------------------------------------------------------------
    def _add_target(self, tcfg) -> Target:
        tg = self.config.target_group
        target = Target(tcfg.name, tcfg.host, tcfg.port)
        self.target_configs[target] = tcfg
        self.router.pools[target] = Pool(
            tcfg.name, lambda key, discover: self._connect(target, key, discover),
            max_connections_percent=tg.max_connections_percent,
            max_idle_connections_percent=tg.max_idle_connections_percent,
            borrow_timeout=tg.connection_borrow_timeout, idle_grace=tg.idle_connection_grace,
            lifetime=tg.max_connection_lifetime, metrics=self.metrics, loop=self.loop,
            defaults=self.defaults,
            on_open_failure=lambda key, waiter, exc: self._open_failed(target, key, waiter, exc))
        self.router.pools[target].target = target
        if target.name not in (t.name for t in self.group.targets):
            self.group.add_target(target)
        return target

    async def apply_targets(self, configs) -> None:
        """Config reload: register new targets, deregister removed ones (their pools close)."""
        current = {t.name: t for t in self.target_configs}
        wanted = {c.name: c for c in configs}
        for name, tcfg in wanted.items():
            if name not in current:
                target = self._add_target(tcfg)
                self.target_ssl[target] = tlsmod.client_context(tcfg.tls, tcfg.tls_ca_file or None)
                log.info("target %s added", name)
        for name, target in current.items():
            if name not in wanted:
                log.info("target %s removed: deregistering", name)
                await self.group.remove_target(target)
                # Deregistering already closed its idle connections and re-routed its
                # waiters; connections still lent out are closed when they come back.
                pool = self.router.pools.pop(target)
                await pool.close()
                self.target_configs.pop(target, None)
                self.target_ssl.pop(target, None)

    def hold_for_health_check(self, client, server) -> None:
        """`client`'s request went to a connection that died without answering. Decide at
        the next health check of its target that starts from now: target down (or no longer
        in the role the client needs) -> send the request again; target fine -> report."""
        target = getattr(server.pool, "target", None)
        if target is None or target not in self.router.pools:
            self.loop.call_soon(client.replay_request)   # the target was removed
            return
        self._held.setdefault(target, []).append((client, server, self.loop.time()))
        self.group.probe_soon(target)

    def _on_probe(self, target: Target) -> None:
        self.router.on_probe(target)
        held = self._held.get(target)
        if not held:
            return
        keep = []
        for client, server, since in held:
            if client.state != READY:
                continue
            if target.probe_started is None or target.probe_started < since:
                keep.append((client, server, since))   # this check began before the loss
            elif (target.consecutive_failures or target.state.value != "AVAILABLE"
                  or self.router.target_for(client.route_role) is not target):
                client.replay_request()
            else:
                client.report_server_lost(server)
        if keep:
            self._held[target] = keep
        else:
            self._held.pop(target, None)

    def _on_target_change(self, target: Target, what: str) -> None:
        self.router.on_change(target, what)
        if target.state.value != "AVAILABLE" and self.config.target_group.failover_promote_command:
            self._maybe_promote()

    def _maybe_promote(self) -> None:
        """failover_promote_command: once per failover, when there is no writer but a reader."""
        if self.group.writer() is not None or self._promoting is not None:
            return
        readers = self.group.readers()
        writers_down = [t for t in self.group.targets if t.role.value == "READ_WRITE"]
        if not readers or not writers_down:
            return
        reader = readers[0]
        self._promoting = self.loop.create_task(self._run_promote(reader))

    async def _run_promote(self, reader: Target) -> None:
        command = self.config.target_group.failover_promote_command
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
        if isinstance(exc, ServerError) and not exc.sqlstate.startswith("57P"):
            return False   # the server answered (bad password, no database, TLS refused...)
        if self.loop.time() >= (waiter.borrow_deadline or 0) and waiter.borrow_deadline is not None:
            return False
        self.router.requeue(waiter.route_role, key, waiter, target, exc)
        return True

    async def _probe(self, target: Target):
        account = self._probe_account()
        tcfg = self.target_configs.get(target)
        return await health_probe(
            target, user=account.credentials.username, password=account.credentials.password,
            database=account.credentials.dbname or "postgres",
            timeout=self.config.target_group.health_check_timeout, loop=self.loop,
            ssl_context=self.target_ssl.get(target), tls_mode=tcfg.tls if tcfg else "disable")

    def _probe_account(self) -> Account:
        """Health checks log in as the first configured account."""
        first = self.config.auth[0]
        creds = self.secrets.get(first.secret)
        return self.accounts.get(creds.username)

    def describe_targets(self) -> list[dict]:
        """describe-db-proxy-targets, plus each target's pool figures."""
        out = self.group.describe()
        by_name = {t.name: t for t in self.router.pools}
        for entry in out:
            target = by_name.get(entry["RdsResourceId"])
            pool = self.router.pools.get(target)
            if pool is not None:
                stats = pool.stats()
                pinned = sum(1 for c in self.clients if c.pinned_server and c.server is not None
                             and c.server.pool is pool)
                entry["Pool"] = {"InUse": stats["borrowed"], "Idle": stats["idle"],
                                 "Open": stats["open"], "Max": stats["max"],
                                 "Waiting": stats["waiting"], "Pinned": pinned}
        return out

    # -- database connections ----------------------------------------------------------
    async def _connect(self, target: Target, key, discover: bool):
        user, database, options = key
        account = self.accounts.get(user)
        if account is None:
            raise ConnectionError(f"no secret configured for user {user!r}")
        params = {"options": options} if options else {}
        tg = self.config.target_group
        try:
            conn = await self._open(target, account, database, params)
        except ServerError as exc:
            if exc.sqlstate != "28P01":
                raise
            # The password may have been rotated since we last read the secret: read it
            # again now and retry once if it changed (rather than wait for the refresh).
            try:
                await self.refresh_secrets()
            except SecretError as err:
                log.warning("secret refresh after a failed database login: %s", err)
            fresh = self.accounts.get(user)
            if fresh is None or fresh.credentials.password == account.credentials.password:
                raise
            log.info("database login for %r failed with the cached password; retrying with the "
                     "refreshed secret", user)
            conn = await self._open(target, fresh, database, params)
        try:
            if discover:
                rows = await conn.query_internal("SHOW max_connections", rows=[])
                max_connections = int(_first_column(rows[0]))
            if tg.init_query:
                await conn.query_internal(tg.init_query)
        except BaseException:
            conn.close()
            raise
        self.defaults.setdefault(key, dict(conn.parameters))
        if discover:
            self.router.pools[target].set_server_max_connections(max_connections)
        return conn

    def _open(self, target, account, database, params):
        tcfg = self.target_configs[target]
        return open_server_connection(
            self.loop, target.name, target.host, target.port,
            user=account.credentials.username, password=account.credentials.password,
            database=database, params=params, timeout=self.config.target_group.connect_timeout,
            max_message_size=self.config.max_message_size,
            ssl_context=self.target_ssl.get(target), tls_mode=tcfg.tls)

    def parameter_statuses(self, key, desired: tuple) -> bytes:
        """The ParameterStatus messages a new client gets: the server's, then its own."""
        cache = self._greetings
        block = cache.get((key, desired))
        if block is None:
            params = dict(self.defaults.get(key, {}))
            params.update(desired)
            block = b"".join(pg.parameter_status(k, v) for k, v in params.items())
            if len(cache) >= 1024:  # clients with ever-new application_names: stay bounded
                cache.clear()
            cache[(key, desired)] = block
        return block

    # -- unpredictable bytes -------------------------------------------------------------
    def random_bytes(self, n: int) -> bytes:
        """Bytes from the OS CSPRNG (md5 salts, cancel secrets), drawn 4 KiB at a time so a
        login costs no getrandom() call of its own."""
        pool = self._entropy
        if len(pool) < n:
            pool = self._entropy = bytearray(os.urandom(4096))
        out = bytes(pool[-n:])
        del pool[-n:]
        return out

    # -- cancel requests ---------------------------------------------------------------
    def register_cancel_key(self, client) -> tuple[int, int]:
        while True:
            pid = random.randint(1, 0x7FFFFFFF)  # not secret: it only names the session
            if pid not in self.by_pid:
                break
        self.by_pid[pid] = client
        # The secret must not be guessable (it is what authorises a cancel): CSPRNG bytes.
        return pid, int.from_bytes(self.random_bytes(4), "big")

    def cancel(self, pid: int, secret: int, peer: str) -> None:
        self.metrics.CancelRequests += 1
        client = self.by_pid.get(pid)
        if client is None or not client.check_secret(secret):
            log.info("cancel request from %s with an unknown key: ignored", peer)
            return
        server = client.server
        if server is None or not server.backend_pid:
            log.debug("cancel request for client %s: nothing is running", client.peer)
            return
        self.loop.create_task(self._send_cancel(client, server))

    async def _send_cancel(self, client, server) -> None:
        if client.server is not server:  # it finished and moved on meanwhile
            return
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(*server.address), self.config.target_group.connect_timeout)
            writer.write(pg.cancel_request(server.backend_pid, server.backend_secret))
            await writer.drain()
            await reader.read()
            writer.close()
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("cannot forward cancel request to %s: %s", server.target_name, exc)

    def stats(self) -> dict:
        live_queries = sum(client.queries for client in self.clients)
        pools = [pool.stats() for pool in self.router.pools.values()]
        total = {name: sum(p[name] for p in pools) for name in ("max", "open", "borrowed", "idle",
                                                                 "waiting", "max_idle")}
        total["waiting"] += self.router.waiting
        return {"pool": total, "targets": self.describe_targets(),
                "pinned_sessions": self.pinned_sessions,
                "QueryRequests": self.metrics.QueryRequests + live_queries,
                "ClientConnectionsTLS": self.metrics.ClientConnectionsTLS,
                "ClientConnectionsNoTLS": self.metrics.ClientConnectionsNoTLS}


def _first_column(datarow: bytes) -> str:
    (length,) = struct.unpack_from("!i", datarow, 2)
    return datarow[6:6 + length].decode()
