"""The PostgreSQL engine: login material, database connections, health checks and cancel keys.

Everything engine-agnostic (secrets, TLS contexts, targets, pools, routing, failover,
housekeeping) is rdsproxy.core.engine.BaseEngine's.
"""
from __future__ import annotations

import logging
import os

from ... import _fastpath
from ..._fastpath import LoginDesk, MessageScanner, SessionFactory, StartupPlan, type_mask
from ...auth.md5 import md5_inner_hash
from ...auth.scram import make_server_key_material
from ...core.engine import BaseEngine
from ...core.console import CONSOLE_DATABASE, ConsoleSession
from ...core.router import UNROUTED
from ...core.sessions import CloseReason
from ...core.targets import AUTH_FAILURE, ProbeError, Target
from . import protocol as pg
from .protocol import ServerError
from .accounts import MD5, SCRAM, Account, decoy_account, default_method, login_method
from .backend import open_server_connection, send_cancel
from .console import ConsoleWire, greeting_parameters
from .statements import ServerStatements
from .frontend import CLOSED, LOGIN, READY, ClientConnection
from .health import probe as health_probe
from .pinning import PREFILTER, PinningRules
from .sessionstate import SETTINGS_SQL

log = logging.getLogger("rdsproxy.postgres")

# Statements longer than this pin (RDS Proxy's rule), so capturing more is pointless.
RULES_CAPTURE_LIMIT = 16 * 1024 + 1



class PostgresEngine(BaseEngine):
    """Everything PostgreSQL-specific the proxy core needs, for one target group."""

    name = "postgres"
    client_class = ClientConnection
    client_reactor = _fastpath.reactor   # the C reactor where built (see reactor_c.pyx)
    client_speaks_first = True
    ready_state = READY
    closed_state = CLOSED
    authenticated_state = LOGIN
    # PostgreSQL's own codes for the same events (authentication_timeout is 57014).
    close_codes = {CloseReason.IDLE_TIMEOUT: "57P05", CloseReason.LOGIN_TIMEOUT: "57014",
                   CloseReason.LOGINS_PER_ADDRESS: "53300", CloseReason.SHUTDOWN: "57P01", CloseReason.ADMIN_KILL: "57P01"}
    rules_capture_limit = RULES_CAPTURE_LIMIT

    def __init__(self, config, metrics, loop):
        super().__init__(config, metrics, loop)
        self.rules = PinningRules(config.target_group.session_pinning_filters)
        # Users who cannot log in get the exchange of the accounts' most common method,
        # with stand-in credentials made from this key (see decoy()).
        self._decoy_key = os.urandom(32)
        self._default_methods = {False: SCRAM, True: SCRAM}
        self._greetings: dict = {}
        self.backends: dict = {}   # (target name, backend pid) -> ServerConnection
        # (setting, value a client sent) -> the value the server reports for it.
        self._spellings: dict = {}
        # One object per distinct pool key and parameter set: the relay compares them on
        # every borrow and return, and `is` settles that before any tuple is compared.
        self._session_parts: dict = {}
        # The template of every client's scanner (ClientConnection: .fresh() of it).
        # Bind, Describe and Close are copied only to see that a client which sends them
        # as they are names none of the proxy's statements (statements.reserved_statement_name).
        # Query and Execute messages are tallied: each is one of QueryRequests.
        self.client_scanner = MessageScanner(counted=b"QSF", captured=b"QPXFBDC",
                                             capture_limit=self.rules_capture_limit,
                                             max_message_size=config.max_message_size,
                                             tallied=b"QE")
        self.statement_client_mask = type_mask(b"QPXF")
        # What the relay's login lane shares: StartupPlans by raw startup packet (clients
        # that connect again and again send the same one), cancel keys (pid -> client).
        self.logins = LoginDesk(self.entropy, metrics, self.router, UNROUTED,
                                self.throttle.entries)
        self.logins.log_sessions = self.log_sessions
        self.startup_plans: dict[bytes, StartupPlan] = self.logins.plans
        self.by_pid: dict[int, ClientConnection] = self.logins.by_pid

    def load_tls(self) -> None:
        super().load_tls()
        # Without a TLS context the relay's login lane answers SSLRequest itself ('N').
        self.logins.tls_offered = self.server_ssl is not None

    def client_factory(self, endpoint):
        # Made in C, without a Python __init__ (see pg_relay_py.SessionFactory).
        return SessionFactory(self.client_class, self, endpoint, UNROUTED, PREFILTER,
                              self.logins, self.client_scanner,
                              self.metrics.response_latency(endpoint.name))

    def make_account(self, creds, entry, previous) -> Account:
        if previous is not None and previous.credentials.password == creds.password:
            secret = previous.scram_secret   # PBKDF2 is slow: reuse while the password stands
        else:
            secret = make_server_key_material(creds.password)
        return Account(creds, entry.client_password_auth_type, secret, entry.iam_auth, entry.secret)

    def target_unreachable(self, exc: Exception) -> bool:
        # 57P01-57P03: shutting down, crashed, not accepting connections yet.
        return super().target_unreachable(exc) or (
            isinstance(exc, ServerError) and exc.sqlstate.startswith("57P"))

    def forget_client(self, client) -> None:
        self.logins.forget(client)   # the relay's connection_lost does it for its sessions

    def client_id(self, client) -> int:
        return client.pid   # the process id its BackendKeyData named

    def server_id(self, conn) -> int:
        return conn.backend_pid

    async def probe(self, target: Target):
        # A check refused for the password re-reads the secret before calling the target
        # unavailable for everyone (a rotation).
        return await self.accounts.retry_with_fresh_secret(
            self.accounts.probe_account(), lambda acc: self._probe_as(target, acc),
            lambda exc: isinstance(exc, ProbeError) and exc.reason == AUTH_FAILURE)

    def _probe_as(self, target: Target, account):
        tcfg = self.target_configs.get(target)
        return health_probe(
            target, user=account.credentials.username, password=account.credentials.password,
            database=account.credentials.dbname or "postgres",
            timeout=self.config.target_group.health_check_timeout, loop=self.loop,
            ssl_context=self.target_ssl.get(target), tls_mode=tcfg.tls if tcfg else "disable")

    # -- database connections ----------------------------------------------------------
    async def open_connection(self, target: Target, key, discover: bool):
        user, database, options = key
        account = self.accounts.get(user)
        if account is None:
            raise ConnectionError(f"no secret configured for user {user!r}")
        params = {"options": options} if options else {}
        conn = await self.accounts.retry_with_fresh_secret(
            account, lambda acc: self._open(target, acc, database, params),
            lambda exc: isinstance(exc, ServerError) and exc.sqlstate == "28P01")
        try:
            if discover:
                rows = await conn.query_internal("SHOW max_connections", rows=[])
                max_connections = int(_first_column(rows[0]))
            init_query = self.config.target_group.init_query
            if init_query:
                await conn.query_internal(init_query)
                # What it set is the proxy's, not a client's (see sessionstate.verdict).
                conn.learn_proxy_settings(await conn.query_internal(SETTINGS_SQL, rows=[]))
        except BaseException:
            conn.close()
            raise
        conn.answers = ServerStatements(conn, self.config.target_group.max_prepared_statements,
                                        self.metrics)
        self.defaults.setdefault(key, dict(conn.parameters))
        # Notifications name backends by pid: which connection (and so client) that is.
        conn.backends = self.backends
        self.backends[(target.name, conn.backend_pid)] = conn
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

    def greeting_known(self, key, desired: tuple) -> bool:
        """Whether the server's ParameterStatus for these startup parameters is known: its
        settings for the key, and its spelling of every reported value the client sent
        ("UTF8" for utf8, "German, DMY" for german). Only a value never seen before needs a
        server connection at login; plain application names never do."""
        defaults = self.defaults.get(key)
        if defaults is None:
            return False
        reported = _reported_names(defaults)
        for name, value in desired:
            canonical = reported.get(name.lower())
            if (canonical is not None and (canonical, value) not in self._spellings
                    and not (canonical == "application_name" and _plain_name(value))):
                return False
        return True

    def learn_greeting(self, key, desired: tuple, parameters: dict) -> None:
        """What a server connection reports once these startup parameters are applied."""
        reported = _reported_names(self.defaults.get(key, parameters))
        for name, value in desired:
            canonical = reported.get(name.lower())
            if canonical is not None and canonical in parameters:
                _keep(self._spellings, (canonical, value), parameters[canonical])

    def parameter_statuses(self, key, desired: tuple) -> bytes:
        """The ParameterStatus messages a new client gets, as the server would send them:
        the settings it reports, with the client's values in the server's spelling."""
        cache = self._greetings
        block = cache.get((key, desired))
        if block is None:
            defaults = self.defaults.get(key, {})
            params = dict(defaults)
            reported = _reported_names(defaults)
            for name, value in desired:
                canonical = reported.get(name.lower())
                if canonical is not None:
                    params[canonical] = self._spellings.get((canonical, value), value)
            block = b"".join(pg.parameter_status(k, v) for k, v in params.items())
            _keep(cache, (key, desired), block)
        return block

    def remember_startup(self, raw: bytes, session: tuple) -> StartupPlan:
        """The plan for a parsed startup packet, kept for the next client that sends it.
        The relay may log such clients in itself when the account is a plain md5 one."""
        user, database, options, key, desired = session
        parts = self._session_parts
        session = (user, database, options, _canonical(parts, key), _canonical(parts, desired))
        # The lane only serves plaintext. Decoys take it too, so that a known md5 user's
        # packet and an unknown user's are answered by the same code.
        account = self.login_account(user, tls=False)
        quick = (login_method(account, False) == MD5 and not options
                 and not self.config.require_tls)
        plan = StartupPlan(session, account, md5_inner_hash(account.credentials.password, user)
                           if quick else None)
        # Packets arrive before authentication: bound what anyone can make us keep
        # (1024 packets of at most 1 KiB; real ones are about 100 bytes).
        if len(raw) <= 1024:
            _keep(self.startup_plans, raw, plan)
        return plan

    def release_database(self, database: str) -> None:
        """A client is about to drop, rename or copy `database`: the proxy's own idle
        connections to it must not be what makes PostgreSQL refuse (55006). Busy ones
        serve real clients and stay, as they would directly."""
        closed = sum(pool.close_idle(lambda key: key[1] == database)
                     for pool in self.router.pools.values())
        if closed:
            log.info("closed %d idle connection(s) to database %r for a client's DDL on it",
                     closed, database)

    def stats(self) -> dict:
        out = super().stats()
        out["QuickLogins"] = self.logins.quick_logins   # logins the relay's C lane completed
        return out

    def accounts_changed(self) -> None:
        # Plans hold their account (and its md5 hash): a rotation must not leave old ones.
        self.startup_plans.clear()
        for tls in (False, True):
            self._default_methods[tls] = default_method(self.accounts.values(), tls)

    def default_login_method(self, tls: bool) -> str:
        """The exchange an unknown user gets over TLS or plaintext (accounts.default_method)."""
        return self._default_methods[tls]

    def login_account(self, user: str, tls: bool) -> Account:
        """The account `user` logs in with over TLS or plaintext, or, when there is none
        (an unknown user, an IAM-only one over plaintext), a decoy that takes the client
        through the same exchange and the same checks to the same failure."""
        account = self.accounts.get(user)
        if account is not None and login_method(account, tls) is not None:
            return account
        return decoy_account(self._decoy_key, user, self._default_methods[tls])

    # -- the admin console -------------------------------------------------------------
    def open_console(self, client, login) -> None:
        """`client` logged in to the virtual database `rdsproxy` (`login`: its finished
        ClientLogin). An admin user gets the console, which never borrows a database
        connection; anyone else is refused as PostgreSQL refuses an unknown database."""
        if not self.console.is_admin(client.user):
            log.warning("client %s (user %s): refused the admin console (not in admin_users)",
                        client.peer, client.user)
            client.fatal("3D000", f'database "{CONSOLE_DATABASE}" does not exist')
            return
        client.pid, client.secret = self.register_cancel_key(client)
        client.state = READY
        self.metrics.ClientConnectionsSetupSucceeded += 1
        log.info("client %s (user %s): admin console session", client.peer, client.user)
        known = next(iter(self.defaults.values()), {})
        client.transport.write(login.finish(greeting_parameters(known), client.pid,
                                            client.secret, pg.AUTH_OK_MESSAGE))
        session = ConsoleSession(self.console, client, ConsoleWire())
        client.transport.set_protocol(session)
        trailing = login.trailing_data()
        if trailing:
            session.data_received(trailing)

    # -- cancel requests ---------------------------------------------------------------
    def register_cancel_key(self, client) -> tuple[int, int]:
        return self.logins.register_cancel_key(client)

    def cancel(self, pid: int, secret: int, peer: str, done) -> None:
        """Forward a client's CancelRequest to the connection serving that client now;
        `done()` once PostgreSQL has acted on it (or there was nothing to cancel)."""
        self.metrics.CancelRequests += 1
        client = self.by_pid.get(pid)
        if client is None or not client.check_secret(secret):
            log.info("cancel request from %s with an unknown key: ignored", peer)
            done()
            return
        server = client.server
        if server is None or not server.backend_pid:
            log.debug("cancel request for client %s: nothing is running", client.peer)
            done()
            return
        # Asked again once the cancel connection is up: if the client's request ended and
        # the connection went back to the pool meanwhile, another client may be using it.
        task = self.loop.create_task(send_cancel(server, lambda: client.server is server))
        task.add_done_callback(lambda _: done())


def _keep(cache: dict, key, value, limit: int = 1024) -> None:
    """Cache `value`; start afresh when full (clients with ever-new application_names
    must not make these caches grow without bound)."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value


def _reported_names(defaults: dict) -> dict:
    """Lower-cased name -> the server's name, for the settings it reports (GUC_REPORT:
    those it sent at connect)."""
    return {name.lower(): name for name in defaults}


def _plain_name(value: str) -> bool:
    """An application_name the server reports as sent: printable ASCII, short enough."""
    return len(value) < 64 and all(" " <= ch <= "~" for ch in value)


def _canonical(cache: dict, value):
    """The copy of `value` kept in `cache`; `value` itself becomes it the first time."""
    kept = cache.get(value)
    if kept is None:
        _keep(cache, value, value)
        kept = value
    return kept


def _first_column(datarow: bytes) -> str:
    return pg.parse_datarow(datarow)[0].decode()
