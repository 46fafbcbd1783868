"""What every engine shares: the clients and their admission, TLS contexts, the parts
that own accounts (core/accounts.py), housekeeping (core/housekeeping.py) and targets and
failover (core/failover.py), the lifecycle and statistics.

An engine (PostgreSQL, MySQL) subclasses BaseEngine and supplies the protocol-specific
parts:

  client_class            its client session class, called as client_class(engine, endpoint);
                          `ready_state` / `closed_state` name the session states the
                          housekeeper compares against
  close_codes             {CloseReason: error code}: the code, in the engine's protocol, of
                          each reason the core has to close a client (the client's fatal())
  make_account(creds, auth_entry, previous) -> account
                          the per-user login material (SCRAM keys, password hashes...)
  open_connection(target, key, discover) -> server connection   (coroutine)
                          a logged-in database connection for `key`; with `discover`, also
                          learn the server's max_connections and set the pool's budget
  probe(target) -> ProbeResult                                  (coroutine)
                          the health check: is the target up, and what is its role
  forget_client(client)   drop per-client indexes (cancel keys, connection ids)
  client_id(client), server_id(conn)
                          the numbers the admin console (core/console.py) shows and KILL takes
  client_reactor          the module that accepts and serves its client sockets
                          (rdsproxy._fastpath.reactor_py or the C reactor); the default is
                          the event loop's own transports
  client_speaks_first     the client sends the first bytes (then a connection is accepted
                          only once they have arrived: TCP_DEFER_ACCEPT)

Clients offer fatal(code, text), replay_request(), report_server_lost(server) and the
relay attributes read here (state, activity, outstanding, phase, server, route_role, peer,
user, connected_at, last_active, seen_activity).
"""
from __future__ import annotations

import asyncio
import logging
import os

from .. import tls as tlsmod
from ..logs import session_log
from .._fastpath import ClientLedger, Entropy, Phase, reactor_py
from ..auth.throttle import LoginThrottle
from .accounts import AccountRegistry
from .failover import Failover
from .housekeeping import Housekeeper
from .router import Router
from .sessions import CloseReason
from .targets import Target, TargetGroup

log = logging.getLogger("rdsproxy.engine")

# Settings a reload applies to the running proxy; the pools' share of the target group's.
LIVE_SETTINGS = ("idle_client_timeout", "login_timeout", "max_logins_per_address",
                 "shutdown_timeout", "stats_log_interval", "availability_window")
LIVE_POOL_SETTINGS = ("max_connections_percent", "max_idle_connections_percent",
                      "connection_borrow_timeout", "idle_connection_grace",
                      "max_connection_lifetime", "init_query")
# Reloaded by their own steps (targets, secrets and certificates), or no setting at all.
_RELOADED_ELSEWHERE = ("targets", "target_group", "source", "base_dir")

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
    name = ""                 # the engine in log lines: "postgres" or "mysql"
    client_class = None
    ready_state = None
    closed_state = None
    # Authenticated, the login finishing on the proxy's side (a first login of its kind
    # borrows a connection): the client is waiting on the proxy, not the other way round.
    authenticated_state = None
    close_codes: dict = {}
    client_reactor = reactor_py
    client_speaks_first = False
    console = None   # the admin console (core.console.Console) when admin_users is set

    def __init__(self, config, metrics, loop):
        self.config = config
        self.metrics = metrics
        self.loop = loop
        self.clock = loop.time()
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
        self.clients: set = set()
        self.router.borrowers = self.clients
        self.ledger = ClientLedger(self.clients, metrics, config.max_client_connections)
        self.failover = Failover(self)
        for tcfg in config.targets:
            self.failover.add_target(tcfg)
        self.housekeeper = Housekeeper(self)
        self.accounts = AccountRegistry(config, loop, self.make_account, self.accounts_changed)
        # The OS CSPRNG, 4 KiB at a time: md5 salts, cancel secrets, connection ids.
        self.entropy = Entropy(os.urandom)
        self.throttle = LoginThrottle()
        self.server_ssl = None           # client-leg TLS context (None: refuse TLS)
        self._tasks: list = []
        # Login and close lines: with log_connections, written at INFO.
        self.log_sessions = config.log_connections and session_log.isEnabledFor(logging.INFO)
        # debug_logging's statement-level lines, checked without a call on the paths that
        # run per transaction.
        self.log_debug = log.isEnabledFor(logging.DEBUG)

    # -- what an engine supplies ---------------------------------------------------------
    def make_account(self, creds, entry, previous):
        raise NotImplementedError

    async def open_connection(self, target: Target, key, discover: bool):
        raise NotImplementedError

    async def probe(self, target: Target):
        raise NotImplementedError

    def forget_client(self, client) -> None:
        pass

    def client_id(self, client) -> int:
        """The number that names `client` to an admin (the console's SHOW CLIENTS and KILL)."""
        raise NotImplementedError

    def server_id(self, conn) -> int:
        """The database's own number for connection `conn` (its process or thread id)."""
        raise NotImplementedError

    def accounts_changed(self) -> None:
        """Hook: the accounts were rebuilt (a start, a secret refresh or rotation)."""

    def target_unreachable(self, exc: Exception) -> bool:
        """Whether a failed connection attempt looks like the target being down (network
        errors, timeouts); engines add their servers' own "shutting down" answers."""
        return isinstance(exc, (OSError, TimeoutError, asyncio.TimeoutError, ConnectionError))

    # -- clients -------------------------------------------------------------------------
    def client_factory(self, endpoint):
        return lambda: self.client_class(self, endpoint)

    def client_connected(self, client) -> bool:
        """Register a new client; False when max_client_connections is reached (the client
        is then refused with the engine's "too many connections" error, and not counted).
        The PostgreSQL relay asks the ledger itself."""
        if self.ledger.admit(client):
            return True
        self.housekeeper.limit_logins_per_address()
        return False

    def client_gone(self, client) -> None:
        self.ledger.release(client, client.queries)
        self.forget_client(client)

    def close_client(self, client, reason: CloseReason) -> None:
        """End a client's connection for one of the core's reasons, in the engine's words."""
        client.close_reason = reason.name.lower()
        client.fatal(self.close_codes[reason], reason.value)

    def admit_transport(self, client) -> bool:
        """False when the client is plaintext and require_tls is on (the frontend then
        refuses it in its protocol's words)."""
        if client.tls:
            return True
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
            # The reactor feeds the early bytes to the TLS layer (through _feed_protocol) on
            # whichever loop transport the handshake runs on.
            transport = await self.client_reactor.start_tls(
                loop, raw, client, self.server_ssl, TLS_HANDSHAKE_TIMEOUT, early=early,
                feed=_feed_protocol)
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

    def random_bytes(self, n: int) -> bytes:
        """Unpredictable bytes (md5 salts, cancel secrets) from the engine's Entropy."""
        return self.entropy.take(n)

    # -- lifecycle -----------------------------------------------------------------------
    def load_tls(self) -> None:
        """(Re)build the TLS contexts from the files; new handshakes use the new ones."""
        cfg = self.config
        if cfg.tls is not None:
            self.server_ssl = tlsmod.server_context(cfg.tls.cert_file, cfg.tls.key_file,
                                                    cfg.tls.ca_file or None,
                                                    require_client_cert=cfg.tls.require_client_cert)
        for target, tcfg in self.target_configs.items():
            self.target_ssl[target] = tlsmod.client_context(tcfg.tls, tcfg.tls_ca_file or None)

    async def start(self) -> None:
        self.load_tls()
        await self.accounts.load()
        await self.group.start()
        self._tasks.append(self.loop.create_task(self.housekeeper.run()))
        if self.config.secrets_refresh_interval > 0:
            self._tasks.append(self.loop.create_task(self.accounts.refresh_loop()))

    async def reload(self) -> None:
        """SIGHUP: secrets and certificates again; a failure keeps what is in use."""
        await self.accounts.reload()
        try:
            self.load_tls()
            if self.server_ssl is not None:
                log.info("TLS certificate reloaded from %s", self.config.tls.cert_file)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.error("TLS certificate not reloaded (keeping the current one): %s", exc)

    def apply_settings(self, fresh) -> None:
        """SIGHUP with an edited file: take the settings that can change while running
        (timeouts, the pools' percentages, init_query) and say in the log which changed
        and which need a restart. [[targets]] are the failover part's (apply_targets)."""
        config, tg, new_tg = self.config, self.config.target_group, fresh.target_group
        changed, restart = [], []
        for name in LIVE_SETTINGS:
            if getattr(fresh, name) != getattr(config, name):
                changed.append(f"{name} {getattr(config, name)!r} -> {getattr(fresh, name)!r}")
                setattr(config, name, getattr(fresh, name))
        for name in LIVE_POOL_SETTINGS:
            if getattr(new_tg, name) != getattr(tg, name):
                changed.append(f"target_group.{name} {getattr(tg, name)!r} -> "
                               f"{getattr(new_tg, name)!r}")
        for name, value in vars(new_tg).items():
            if name not in LIVE_POOL_SETTINGS and getattr(tg, name) != value:
                restart.append(f"target_group.{name}")
        for name, value in vars(fresh).items():
            if (name not in LIVE_SETTINGS and name not in _RELOADED_ELSEWHERE
                    and getattr(config, name) != value):
                restart.append(name)
        new_init_query = new_tg.init_query != tg.init_query
        for name in LIVE_POOL_SETTINGS:
            setattr(tg, name, getattr(new_tg, name))
        for pool in self.router.pools.values():
            pool.reconfigure(max_connections_percent=tg.max_connections_percent,
                             max_idle_connections_percent=tg.max_idle_connections_percent,
                             borrow_timeout=tg.connection_borrow_timeout,
                             idle_grace=tg.idle_connection_grace,
                             lifetime=tg.max_connection_lifetime)
            if new_init_query:
                # Every connection lent from now on must have run the new init_query.
                pool.retire_all([c.server for c in self.clients
                                 if c.server is not None and c.server.pool is pool])
        self.router.borrow_timeout = tg.connection_borrow_timeout
        if changed:
            log.info("reload applied: %s", "; ".join(changed))
        if restart:
            log.warning("reload: %s changed in the file but take effect only after a restart",
                        ", ".join(restart))

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) until no client holds a database connection."""
        deadline = self.loop.time() + timeout
        while self.loop.time() < deadline:
            if not any(c.phase != Phase.FREE for c in self.clients):
                return
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.group.stop()
        for client in list(self.clients):
            self.close_client(client, CloseReason.SHUTDOWN)
        for pool in self.router.pools.values():
            await pool.close()

    def query_requests(self) -> int:
        """QueryRequests: those of the clients gone and of those connected."""
        return self.metrics.QueryRequests + sum(client.queries for client in self.clients)

    def tls_figures(self) -> tuple[int, int, int]:
        """(ClientConnectionsTLS, QueryRequests, QueryRequestsTLS) now: the clients connected
        over TLS, and the queries of all clients and of those over TLS, gone or connected.
        Read from the clients when asked, so that the hot path counts nothing for them."""
        metrics = self.metrics
        clients = queries = 0
        tls_queries = metrics.QueryRequestsTLS
        for client in self.clients:
            queries += client.queries
            if client.tls:
                clients += 1
                tls_queries += client.queries
        return clients, metrics.QueryRequests + queries, tls_queries

    def stats(self) -> dict:
        pools = [pool.stats() for pool in self.router.pools.values()]
        total = {name: sum(p[name] for p in pools) for name in ("max", "open", "borrowed", "idle",
                                                                 "waiting", "max_idle")}
        total["waiting"] += self.router.waiting
        return {"pool": total, "targets": self.failover.describe_targets(),
                "pinned_sessions": self.ledger.pinned,
                "sessions": self.ledger.phases(),
                "StrayPhaseMoves": self.ledger.stray_moves,
                "QueryRequests": self.query_requests()}
