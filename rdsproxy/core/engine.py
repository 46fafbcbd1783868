"""What every engine shares: accounts and secrets, TLS contexts, targets, pools and routing,
client housekeeping, failover decisions, reloads and statistics.

An engine (PostgreSQL, MySQL) subclasses BaseEngine and supplies the protocol-specific
parts:

  client_class            its client session class, called as client_class(engine, endpoint);
                          `ready_state` / `closed_state` name the session states the
                          housekeeper compares against
  make_account(creds, auth_entry, previous) -> account
                          the per-user login material (SCRAM keys, password hashes...)
  open_connection(target, key, discover) -> server connection   (coroutine)
                          a logged-in database connection for `key`; with `discover`, also
                          learn the server's max_connections and set the pool's budget
  probe(target) -> ProbeResult                                  (coroutine)
                          the health check: is the target up, and what is its role
  forget_client(client)   drop per-client indexes (cancel keys, connection ids)
  client_reactor          the module that accepts and serves its client sockets
                          (rdsproxy._fastpath.reactor_py or the C reactor); the default is
                          the event loop's own transports
  client_speaks_first     the client sends the first bytes (then a connection is accepted
                          only once they have arrived: TCP_DEFER_ACCEPT)

Clients offer fatal(sqlstate, text), replay_request(), report_server_lost(server) and the
relay attributes read here (state, activity, outstanding, phase, server, route_role, peer,
user, connected_at, last_active, seen_activity).
"""
from __future__ import annotations

import asyncio
import logging
import os

from .. import tls as tlsmod
from .._fastpath import ClientLedger, Entropy, Phase, reactor_py
from ..auth.iam import Principal
from ..auth.throttle import LoginThrottle
from ..secrets import SecretCache, SecretError, read_principal_secret, read_secret
from .pool import Pool
from .router import Router
from .targets import Role, Target, TargetGroup, TargetState

log = logging.getLogger("rdsproxy.engine")
# Phases in which a client is busy though it may have nothing outstanding.
_BUSY_PHASES = (Phase.WAITING, Phase.SYNCING)

# Below the default login timeout, so the handshake's own error wins.
TLS_HANDSHAKE_TIMEOUT = 30.0


def _feed_protocol(transport, data: bytes) -> None:
    """Hand bytes already read from `transport` to its (new) protocol."""
    proto = transport.get_protocol()
    if hasattr(proto, "get_buffer"):
        view = memoryview(data)
        while view:
            buf = proto.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            proto.buffer_updated(n)
            view = view[n:]
    else:
        proto.data_received(data)


class BaseEngine:
    client_class = None
    ready_state = None
    closed_state = None
    client_reactor = reactor_py
    client_speaks_first = False

    def __init__(self, config, metrics, loop):
        self.config = config
        self.metrics = metrics
        self.loop = loop
        self.clock = loop.time()
        self.accounts: dict = {}
        tg = config.target_group
        self.defaults: dict = {}   # per key: what the engine learnt at the first connect
        self.target_configs: dict[Target, object] = {}
        self.target_ssl: dict[Target, object] = {}   # database-leg TLS context per target
        self.group = TargetGroup([], self.probe, interval=tg.health_check_interval,
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
        self._last_purge: dict[Target, float] = {}
        self.clients: set = set()
        self.router.borrowers = self.clients
        self.ledger = ClientLedger(self.clients, metrics, config.max_client_connections)
        for tcfg in config.targets:
            self._add_target(tcfg)
        # The OS CSPRNG, 4 KiB at a time: md5 salts, cancel secrets, connection ids.
        self.entropy = Entropy(os.urandom)
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
        self.server_ssl = None           # client-leg TLS context (None: refuse TLS)
        metrics.ClientConnectionsTLS = 0
        metrics.ClientConnectionsNoTLS = 0

    # -- what an engine supplies ---------------------------------------------------------
    def make_account(self, creds, entry, previous):
        raise NotImplementedError

    async def open_connection(self, target: Target, key, discover: bool):
        raise NotImplementedError

    async def probe(self, target: Target):
        raise NotImplementedError

    def forget_client(self, client) -> None:
        pass

    def target_unreachable(self, exc: Exception) -> bool:
        """Whether a failed connection attempt looks like the target being down (network
        errors, timeouts); engines add their servers' own "shutting down" answers."""
        return isinstance(exc, (OSError, TimeoutError, asyncio.TimeoutError, ConnectionError))

    async def retry_with_fresh_secret(self, account, attempt, refused):
        """`await attempt(account)`; if the database refuses the password (`refused(exc)`),
        the secret may have been rotated since we read it: read it again and, if the
        password changed, try once more with it (rather than wait for the next refresh)."""
        try:
            return await attempt(account)
        except Exception as exc:
            if not refused(exc):
                raise
            user = account.credentials.username
            try:
                await self.refresh_secrets()
            except SecretError as err:
                log.warning("secret refresh after a refused database login: %s", err)
            fresh = self.accounts.get(user)
            if fresh is None or fresh.credentials.password == account.credentials.password:
                raise
            log.info("database login for %r failed with the cached password; retrying with the "
                     "refreshed secret", user)
            return await attempt(fresh)

    # -- client sessions: what both engines' frontends share -------------------------------
    def admit_transport(self, client) -> bool:
        """Count the client as TLS or not; False when it is plaintext and require_tls is on
        (the frontend then refuses it in its protocol's words)."""
        if client.tls:
            self.metrics.ClientConnectionsTLS += 1
            return True
        self.metrics.ClientConnectionsNoTLS += 1
        if self.config.require_tls:
            log.info("client %s: plaintext connection refused (require_tls)", client.peer)
            return False
        return True

    async def upgrade_client_tls(self, client, raw, early: bytes = b"") -> bool:
        """Server-side TLS on a client's connection, `client` staying its protocol. `early`:
        bytes of the ClientHello already read with the TLS request. True when done (the
        client's transport is then the TLS one); on failure the connection is closed, the
        reason logged and the session told it is lost."""
        loop = self.loop
        try:
            handshake = loop.create_task(self.client_reactor.start_tls(
                loop, raw, client, self.server_ssl, TLS_HANDSHAKE_TIMEOUT))
            if early:
                # start_tls installs its protocol in its first step and schedules that
                # protocol's connection_made: feed it the early bytes right after.
                loop.call_soon(loop.call_soon, _feed_protocol, raw, early)
            transport = await handshake
        except Exception as exc:  # noqa: BLE001 - SSLError, reset, timeout: all end the client
            log.info("client %s: TLS handshake failed: %s", client.peer, exc or type(exc).__name__)
            client._tls_pending = False
            if not raw.is_closing():
                raw.close()
            # The TLS layer reports no loss of a connection it never handed us.
            if client in self.clients:
                client.connection_lost(exc)
            return False
        # From here on every read and write (the relay's too) goes through the TLS transport.
        client.transport = transport
        client.tls = True
        client._tls_pending = False
        return True

    def probe_account(self):
        """Health checks log in as the first configured account."""
        creds = self.secrets.get(self.config.auth[0].secret)
        return self.accounts.get(creds.username)

    # -- accounts and secrets ------------------------------------------------------------
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
            accounts[creds.username] = self.make_account(creds, entry,
                                                         self.accounts.get(creds.username))
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
        self.accounts_changed()

    def accounts_changed(self) -> None:
        """Hook: the accounts were rebuilt (a start, a secret refresh or rotation)."""

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
        return lambda: self.client_class(self, endpoint)

    def client_connected(self, client) -> bool:
        """Register a new client; False when max_client_connections is reached (the client
        is then refused with the engine's "too many connections" error, and not counted).
        The PostgreSQL relay asks the ledger itself."""
        if self.ledger.admit(client):
            return True
        self.limit_logins_per_address()
        return False

    def limit_logins_per_address(self) -> int:
        """Close the newest of the clients still logging in from any one address beyond
        max_logins_per_address; how many were closed. Run each second and whenever a
        client is refused for max_client_connections, so that half-open logins from one
        address never keep others out for long (the hot path counts nothing per address)."""
        cap = self.config.max_logins_per_address
        if not cap:
            return 0
        by_address: dict[str, list] = {}
        for client in self.clients:
            if client.state not in (self.ready_state, self.closed_state):
                by_address.setdefault(client.peer_host, []).append(client)
        closed = 0
        for address, clients in by_address.items():
            if len(clients) <= cap:
                continue
            clients.sort(key=lambda c: c.connected_at)
            log.warning("address %s has %d clients logging in (max_logins_per_address %d): "
                        "closing the newest %d", address, len(clients), cap, len(clients) - cap)
            for client in clients[cap:]:
                client.fatal("53300", "too many connections logging in from this address "
                                      "(max_logins_per_address)")
                closed += 1
        return closed

    def client_gone(self, client) -> None:
        self.ledger.release(client, client.queries)
        self.forget_client(client)

    async def _housekeeping(self) -> None:
        """Once a second: the coarse clock, idle client timeouts, login timeouts, pool reaping."""
        idle_timeout = self.config.idle_client_timeout
        login_timeout = self.config.login_timeout
        while True:
            await asyncio.sleep(1.0)
            now = self.clock = self.loop.time()
            for client in list(self.clients):
                if client.state == self.ready_state:
                    if client.activity != client.seen_activity:  # it sent something
                        client.seen_activity = client.activity
                        client.last_active = now
                    if client.outstanding or client.phase in _BUSY_PHASES:
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
                elif (now - client.connected_at >= login_timeout
                      and client.state not in (self.ready_state, self.closed_state)):
                    log.info("client %s: not logged in after %gs: closing (login_timeout)",
                             client.peer, login_timeout)
                    # PostgreSQL's words for its authentication_timeout.
                    client.fatal("57014", "canceling authentication due to timeout")
            self.limit_logins_per_address()
            for pool in self.router.pools.values():
                pool.reap()

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) until no client holds a database connection."""
        deadline = self.loop.time() + timeout
        while self.loop.time() < deadline:
            if not any(c.phase != Phase.FREE for c in self.clients):
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

    # -- targets -----------------------------------------------------------------------
    def _add_target(self, tcfg) -> Target:
        tg = self.config.target_group
        target = Target(tcfg.name, tcfg.host, tcfg.port)
        self.target_configs[target] = tcfg
        self.router.pools[target] = Pool(
            tcfg.name, lambda key, discover: self.open_connection(target, key, discover),
            max_connections_percent=tg.max_connections_percent,
            max_idle_connections_percent=tg.max_idle_connections_percent,
            borrow_timeout=tg.connection_borrow_timeout, idle_grace=tg.idle_connection_grace,
            lifetime=tg.max_connection_lifetime, metrics=self.metrics, loop=self.loop,
            defaults=self.defaults,
            on_open_failure=lambda key, waiter, exc: self._open_failed(target, key, waiter, exc))
        self.router.pools[target].target = target
        self.router.pools[target].on_connection_died = self.server_connection_died
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
            if client.state != self.ready_state:
                continue
            if target.probe_started is None or target.probe_started < since:
                keep.append((client, server, since))   # this check began before the loss
            elif (target.consecutive_failures or target.state is not TargetState.AVAILABLE
                  or self.router.target_for(client.route_role) is not target):
                client.replay_request()
            else:
                client.report_server_lost(server)
        if keep:
            self._held[target] = keep
        else:
            self._held.pop(target, None)

    def _on_target_change(self, target: Target, what: str) -> None:
        self.metrics.TargetStateChanges += 1
        self.router.on_change(target, what)
        if target.state is not TargetState.AVAILABLE and self.config.target_group.failover_promote_command:
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
        if not self.target_unreachable(exc):
            return False   # the server answered (bad password, no database, TLS refused...)
        if self.loop.time() >= (waiter.borrow_deadline or 0) and waiter.borrow_deadline is not None:
            return False
        self.router.requeue(waiter.route_role, key, waiter, target, exc)
        return True

    def describe_targets(self) -> list[dict]:
        """describe-db-proxy-targets, plus each target's pool figures."""
        out = self.group.describe()
        by_name = {t.name: t for t in self.router.pools}
        for entry in out:
            target = by_name.get(entry["RdsResourceId"])
            pool = self.router.pools.get(target)
            if pool is not None:
                stats = pool.stats()
                pinned = sum(1 for c in self.clients if c.phase == Phase.PINNED
                             and c.server.pool is pool)
                entry["Pool"] = {"InUse": stats["borrowed"], "Idle": stats["idle"],
                                 "Open": stats["open"], "Max": stats["max"],
                                 "Waiting": stats["waiting"], "Pinned": pinned}
        return out

    # -- unpredictable bytes -------------------------------------------------------------
    def random_bytes(self, n: int) -> bytes:
        """Unpredictable bytes (md5 salts, cancel secrets) from the engine's Entropy."""
        return self.entropy.take(n)

    def stats(self) -> dict:
        live_queries = sum(client.queries for client in self.clients)
        pools = [pool.stats() for pool in self.router.pools.values()]
        total = {name: sum(p[name] for p in pools) for name in ("max", "open", "borrowed", "idle",
                                                                 "waiting", "max_idle")}
        total["waiting"] += self.router.waiting
        return {"pool": total, "targets": self.describe_targets(),
                "pinned_sessions": self.ledger.pinned,
                "sessions": self.ledger.phases(),
                "StrayPhaseMoves": self.ledger.stray_moves,
                "QueryRequests": self.metrics.QueryRequests + live_queries,
                "ClientConnectionsTLS": self.metrics.ClientConnectionsTLS,
                "ClientConnectionsNoTLS": self.metrics.ClientConnectionsNoTLS}
