"""The PostgreSQL engine: accounts, the pool's connector, cancel keys and client housekeeping."""
from __future__ import annotations

import asyncio
import logging
import os
import random
import struct
from dataclasses import dataclass

from ...auth.scram import ScramSecret, make_server_key_material
from ...core.pool import Pool
from ...secrets import Credentials, read_secret
from . import protocol as pg
from .backend import open_server_connection
from .frontend import READY, ClientConnection
from .pinning import PinningRules

log = logging.getLogger("rdsproxy.postgres")

# Statements longer than this pin (RDS Proxy's rule), so capturing more is pointless.
RULES_CAPTURE_LIMIT = 16 * 1024 + 1


@dataclass
class Account:
    credentials: Credentials
    client_auth: str
    scram_secret: ScramSecret


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
        self._housekeeper = None

    def load_accounts(self) -> None:
        accounts = {}
        for entry in self.config.auth:
            creds = read_secret(entry.secret, self.config.base_dir)
            previous = self.accounts.get(creds.username)
            if previous is not None and previous.credentials.password == creds.password:
                secret = previous.scram_secret
            else:
                secret = make_server_key_material(creds.password)
            accounts[creds.username] = Account(creds, entry.client_password_auth_type, secret)
        self.accounts = accounts

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self.load_accounts()
        self._housekeeper = self.loop.create_task(self._housekeeping())

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
                elif now - client.connected_at >= 60 and client.state < READY:
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
        conn = await open_server_connection(
            self.loop, self.pool.name, self.target.host, self.target.port,
            user=account.credentials.username, password=account.credentials.password,
            database=database, params=params, timeout=tg.connect_timeout,
            max_message_size=self.config.max_message_size)
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

    # -- cancel requests ---------------------------------------------------------------
    def register_cancel_key(self, client) -> tuple[int, int]:
        while True:
            pid = random.randint(1, 0x7FFFFFFF)
            if pid not in self.by_pid:
                break
        self.by_pid[pid] = client
        return pid, random.getrandbits(32)

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
                "QueryRequests": self.metrics.QueryRequests + live_queries}


def _first_column(datarow: bytes) -> str:
    (length,) = struct.unpack_from("!i", datarow, 2)
    return datarow[6:6 + length].decode()
