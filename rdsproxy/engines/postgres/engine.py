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
from ...secrets import Credentials, SecretCache, SecretError, read_principal_secret, read_secret
from . import protocol as pg
from .backend import ServerError, open_server_connection
from .frontend import CLOSED, READY, ClientConnection
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
        target = config.targets[0]
        self.target = target
        self.pool = Pool(f"{target.host}:{target.port}", self._connect,
                         max_connections_percent=tg.max_connections_percent,
                         max_idle_connections_percent=tg.max_idle_connections_percent,
                         borrow_timeout=tg.connection_borrow_timeout,
                         idle_grace=tg.idle_connection_grace, lifetime=tg.max_connection_lifetime,
                         metrics=metrics, loop=loop)
        self.clients: set[ClientConnection] = set()
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
        self.target_ssl = None           # database-leg TLS context
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
        self.target_ssl = tlsmod.client_context(self.target.tls, self.target.tls_ca_file or None)

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
            self.pool.reap()

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
        for client in list(self.clients):
            client.fatal("57P01", "terminating connection because the proxy is shutting down")
        await self.pool.close()

    # -- database connections ----------------------------------------------------------
    async def _connect(self, key, discover: bool):
        user, database, options = key
        account = self.accounts.get(user)
        if account is None:
            raise ConnectionError(f"no secret configured for user {user!r}")
        params = {"options": options} if options else {}
        tg = self.config.target_group
        try:
            conn = await self._open(account, database, params)
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
            conn = await self._open(fresh, database, params)
        try:
            if discover:
                rows = await conn.query_internal("SHOW max_connections", rows=[])
                max_connections = int(_first_column(rows[0]))
            if tg.init_query:
                await conn.query_internal(tg.init_query)
        except BaseException:
            conn.close()
            raise
        self.pool.defaults.setdefault(key, dict(conn.parameters))
        if discover:
            self.pool.set_server_max_connections(max_connections)
        return conn

    def _open(self, account, database, params):
        return open_server_connection(
            self.loop, self.pool.name, self.target.host, self.target.port,
            user=account.credentials.username, password=account.credentials.password,
            database=database, params=params, timeout=self.config.target_group.connect_timeout,
            max_message_size=self.config.max_message_size,
            ssl_context=self.target_ssl, tls_mode=self.target.tls)

    def parameter_statuses(self, key, desired: tuple) -> bytes:
        """The ParameterStatus messages a new client gets: the server's, then its own."""
        cache = self._greetings
        block = cache.get((key, desired))
        if block is None:
            params = dict(self.pool.defaults.get(key, {}))
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
        return {"pool": self.pool.stats(), "pinned_sessions": self.pinned_sessions,
                "QueryRequests": self.metrics.QueryRequests + live_queries,
                "ClientConnectionsTLS": self.metrics.ClientConnectionsTLS,
                "ClientConnectionsNoTLS": self.metrics.ClientConnectionsNoTLS}


def _first_column(datarow: bytes) -> str:
    (length,) = struct.unpack_from("!i", datarow, 2)
    return datarow[6:6 + length].decode()
