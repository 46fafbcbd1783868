"""The MySQL / MariaDB engine: accounts, database connections, health checks, connection
ids and KILL.

Everything engine-agnostic (secrets, TLS contexts, targets, pools, routing, failover,
housekeeping) is rdsproxy.core.engine.BaseEngine's.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from ... import _fastpath
from ...auth import mysql as auth
from ...core.engine import BaseEngine
from ...core.sessions import CloseReason
from ...core.targets import AUTH_FAILURE, ProbeError, Target
from ...secrets import Credentials
from . import protocol as p
from .backend import first_row, open_server_connection
from .client import ClientConnection
from .client_login import PROXY_CAPABILITIES
from .clientstate import (CLOSED, ER_CON_COUNT, ER_CONNECTION_KILLED, ER_IDLE, ER_LOST, LOGIN,
                          ER_SERVER_SHUTDOWN, READY)
from .health import probe as health_probe
from .pinning import Rules
from .protocol import ServerError

log = logging.getLogger("rdsproxy.mysql")

DEFAULT_VERSION = "8.0.36-rdsproxy"
# Errors of a server that is going away or not up yet: treated like an unreachable target.
_GOING_AWAY = {1053, 1077, 1927, 1152}


@dataclass
class Account:
    credentials: Credentials
    client_auth: str              # MYSQL_NATIVE_PASSWORD or MYSQL_CACHING_SHA2_PASSWORD
    iam_auth: str = "DISABLED"
    reference: str = ""

    @property
    def plugin(self) -> str:
        return (auth.CACHING_SHA2_PASSWORD if self.client_auth == "MYSQL_CACHING_SHA2_PASSWORD"
                else auth.MYSQL_NATIVE_PASSWORD)


class MysqlEngine(BaseEngine):
    name = "mysql"
    client_class = ClientConnection
    # The C reactor where built (see reactor_c.pyx). MySQL's server speaks first, so the
    # listeners take no TCP_DEFER_ACCEPT (client_speaks_first stays False).
    client_reactor = _fastpath.reactor
    ready_state = READY
    closed_state = CLOSED
    authenticated_state = LOGIN
    close_codes = {CloseReason.IDLE_TIMEOUT: ER_IDLE, CloseReason.LOGIN_TIMEOUT: ER_LOST,
                   CloseReason.LOGINS_PER_ADDRESS: ER_CON_COUNT,
                   CloseReason.SHUTDOWN: ER_SERVER_SHUTDOWN,
                   CloseReason.ADMIN_KILL: ER_CONNECTION_KILLED}

    def __init__(self, config, metrics, loop):
        super().__init__(config, metrics, loop)
        self.rules = Rules(config.target_group.session_pinning_filters)
        self._rsa = None
        self.by_id: dict[int, ClientConnection] = {}
        self._next_id = 0
        self.server_version = DEFAULT_VERSION
        self.server_capabilities = PROXY_CAPABILITIES
        self.default_plugin = auth.MYSQL_NATIVE_PASSWORD
        if config.auth and config.auth[0].client_password_auth_type == "MYSQL_CACHING_SHA2_PASSWORD":
            self.default_plugin = auth.CACHING_SHA2_PASSWORD
        self.max_payload = min(config.max_message_size, 1 << 30)
        self.quick_commands_gone = 0   # commands the relay's quick lane took, clients gone

    @property
    def rsa(self):
        """The key pair for caching_sha2_password full authentication on plaintext, made
        when a client first needs it."""
        if self._rsa is None:
            self._rsa = auth.RsaKeyPair.generate()
        return self._rsa

    def make_account(self, creds, entry, previous) -> Account:
        return Account(creds, entry.client_password_auth_type, entry.iam_auth, entry.secret)

    async def start(self) -> None:
        await super().start()
        # The greeting clients get names the server's version: learn it now if we can.
        for target in list(self.target_configs):
            try:
                await asyncio.wait_for(self._read_greeting(target), 2.0)
                break
            except Exception as exc:  # noqa: BLE001 - the health checks will tell more
                log.info("could not read %s's greeting yet: %s", target.name, exc)

    async def _read_greeting(self, target: Target) -> None:
        reader, writer = await asyncio.open_connection(target.host, target.port)
        try:
            head = await reader.readexactly(4)
            body = await reader.readexactly(int.from_bytes(head[:3], "little"))
            self._learn(p.Handshake.parse(body))
        finally:
            writer.close()

    def _learn(self, hs) -> None:
        self.server_version = hs.server_version
        self.server_capabilities = hs.capabilities & 0xFFFFFFFF

    def target_unreachable(self, exc: Exception) -> bool:
        return super().target_unreachable(exc) or (
            isinstance(exc, ServerError) and exc.code in _GOING_AWAY)

    # -- connection ids and KILL -----------------------------------------------------
    def register(self, client) -> int:
        while True:
            self._next_id = (self._next_id % 0xFFFFFFFE) + 1
            if self._next_id not in self.by_id:
                break
        self.by_id[self._next_id] = client
        return self._next_id

    def client_gone(self, client) -> None:
        self.quick_commands_gone += client.quick_commands
        super().client_gone(client)

    def forget_client(self, client) -> None:
        if client.connection_id:
            self.by_id.pop(client.connection_id, None)

    def stats(self) -> dict:
        out = super().stats()
        # Read from the clients when asked, as QueryRequests is: the lane counts per client.
        out["QuickCommands"] = self.quick_commands_gone + sum(
            client.quick_commands for client in self.clients)
        return out

    def client_id(self, client) -> int:
        return client.connection_id

    def server_id(self, conn) -> int:
        return conn.thread_id

    async def kill_query(self, server) -> None:
        """KILL QUERY <thread> for `server` over a short connection of its own user."""
        target = getattr(server.pool, "target", None)
        user = server.key[0]
        account = self.accounts.get(user)
        if target is None or account is None:
            return
        conn = await open_server_connection(
            self.loop, target.name, target.host, target.port, user=user,
            password=account.credentials.password, database=None,
            capabilities=p.CLIENT_DEPRECATE_EOF, charset=p.CHARSET_UTF8MB4,
            timeout=self.config.target_group.connect_timeout, max_payload=1 << 20,
            ssl_context=self.target_ssl.get(target), program="rdsproxy-kill")
        try:
            await asyncio.wait_for(conn.query(p.com_query(f"KILL QUERY {server.thread_id}")),
                                   self.config.target_group.connect_timeout)
        finally:
            conn.close()

    # -- health --------------------------------------------------------------------------
    async def probe(self, target: Target):
        # A check refused for the password re-reads the secret first (a rotation).
        return await self.accounts.retry_with_fresh_secret(
            self.accounts.probe_account(), lambda acc: self._probe_as(target, acc),
            lambda exc: isinstance(exc, ProbeError) and exc.reason == AUTH_FAILURE)

    def _probe_as(self, target: Target, account):
        return health_probe(
            target, user=account.credentials.username, password=account.credentials.password,
            database=account.credentials.dbname or None,
            timeout=self.config.target_group.health_check_timeout, loop=self.loop,
            ssl_context=self.target_ssl.get(target),
            on_server=lambda conn: self._learn_conn(conn))

    def _learn_conn(self, conn) -> None:
        self.server_version = conn.server_version or self.server_version

    # -- database connections ------------------------------------------------------------
    async def open_connection(self, target: Target, key, discover: bool):
        user, database, caps, charset = key
        account = self.accounts.get(user)
        if account is None:
            raise ConnectionError(f"no secret configured for user {user!r}")
        conn = await self.accounts.retry_with_fresh_secret(
            account, lambda acc: self._open(target, acc, database, caps, charset),
            lambda exc: isinstance(exc, ServerError) and exc.code == 1045)
        try:
            if discover:
                packets: list = []
                await conn.query(p.com_query("SELECT @@max_connections"), packets)
                max_connections = int(first_row(packets, conn.capabilities)[0])
            if self.config.target_group.init_query:
                await conn.query(p.com_query(self.config.target_group.init_query))
        except BaseException:
            conn.close()
            raise
        self.defaults.setdefault(key, {"server_version": conn.server_version})
        if discover:
            self.router.pools[target].set_server_max_connections(max_connections)
        return conn

    def _open(self, target, account, database, caps, charset):
        return open_server_connection(
            self.loop, target.name, target.host, target.port,
            user=account.credentials.username, password=account.credentials.password,
            database=database, capabilities=caps, charset=charset,
            timeout=self.config.target_group.connect_timeout, max_payload=self.max_payload,
            ssl_context=self.target_ssl.get(target))
