"""Connections from the proxy to MySQL / MariaDB: log in (login.ServerLogin), relay one
command at a time for the client that borrowed it, run the proxy's own commands.

A ServerConnection has at most one command in flight. `send(payload, tracker, sink)` writes
it; every server packet is fed to the command's ResponseTracker, and the sink decides what
happens to the bytes: RAW forwards each chunk unchanged to the attached client (the hot
path: no re-framing), a callable gets the parsed packets (prepare answers whose statement
id is rewritten, the proxy's own commands whose answers no client sees).
"""
from __future__ import annotations

import asyncio
import math
import logging

from ..._fastpath import MysqlServerRelay as ServerRelay, ResponseScanner, contract, reactor
from ..._fastpath.reactor_py import connect_socket
from ...core.sessions import ServerSide
from . import protocol as p
from .server_login import DEFAULT_CAPABILITIES, LoginError, ServerLogin
from .protocol import ProtocolViolation, ServerError

log = logging.getLogger("rdsproxy.mysql.backend")

STARTING, IDLE, BUSY, CLOSED = (contract.MYSQL_SERVER_STARTING, contract.MYSQL_SERVER_IDLE,
                                contract.MYSQL_SERVER_BUSY, contract.MYSQL_SERVER_CLOSED)
RAW = None   # sink: forward bytes to the client as they come

# Capabilities every proxy connection asks for; the session ones (protocol.SESSION_CAPABILITIES)
# come from the clients that share the connection's pool key.
BASE_CAPABILITIES = DEFAULT_CAPABILITIES & ~p.SESSION_CAPABILITIES

# Collation id -> SET NAMES arguments, to bring a connection back to the character set it
# logged in with after COM_RESET_CONNECTION (which applies the server's defaults).
COLLATIONS = {
    8: "latin1 COLLATE latin1_swedish_ci", 11: "ascii COLLATE ascii_general_ci",
    33: "utf8mb3 COLLATE utf8mb3_general_ci", 45: "utf8mb4 COLLATE utf8mb4_general_ci",
    46: "utf8mb4 COLLATE utf8mb4_bin", 47: "latin1 COLLATE latin1_bin",
    48: "latin1 COLLATE latin1_general_ci", 63: "binary", 83: "utf8mb3 COLLATE utf8mb3_bin",
    192: "utf8mb3 COLLATE utf8mb3_unicode_ci", 224: "utf8mb4 COLLATE utf8mb4_unicode_ci",
    255: "utf8mb4 COLLATE utf8mb4_0900_ai_ci",
}


class ServerConnection(ServerRelay, ServerSide, asyncio.Protocol):
    """One database connection; see the module docstring. The answers to the commands the
    relay's quick lane sends are followed there (_fastpath/mysql_relay_py.py)."""

    def __init__(self, loop, target_name: str, address: tuple[str, int], *, max_payload: int):
        ServerRelay.__init__(self)
        self.loop = loop
        self.target_name = target_name
        self.address = address
        self.transport = None
        self.mode = STARTING
        self.key = None
        self.pool = None
        self.pool_core = None
        self.client = None
        self.closed = False
        self.created_at = loop.time()
        self.idle_since = self.created_at
        self.retire_at = math.inf   # set by the pool that opens it (Pool.usable)
        self.reader = p.PacketReader(max_payload)     # answers the proxy reads whole
        self.scanner = ResponseScanner()              # answers relayed to a client
        self.capabilities = 0
        self.thread_id = 0            # the server's connection id (what KILL takes)
        self.server_version = ""
        self.charset = p.CHARSET_UTF8MB4
        self.status = p.SERVER_STATUS_AUTOCOMMIT
        # Session state the proxy put on it (compared with a client's before each use).
        self.schema = ""
        self.vars: dict[str, str] = {}
        self.prepared: dict = {}      # (schema, sql) -> PrepareOk (its server statement id)
        self.lid_owner = None         # (client id, version) whose LAST_INSERT_ID() this holds
        self.tracker = None
        self.sink = RAW
        self.forwarded = False        # bytes of the current answer reached the client
        self._login_data: asyncio.Future | None = None
        self._login_buf = bytearray()

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport

    def slow_data(self, data):
        """What the server sends outside the quick lane's answers."""
        if self.mode == STARTING:
            self._login_buf += data
            fut = self._login_data
            if fut is not None and not fut.done():
                fut.set_result(None)
            return
        tracker = self.tracker
        if tracker is None:
            try:
                packets = self.reader.feed(data)
            except ProtocolViolation as exc:
                self._broken(f"malformed stream from the server: {exc}")
                return
            self._unsolicited(packets)
            return
        sink = self.sink
        if sink is RAW:
            # The hot path: headers walked in place, bytes forwarded as they came.
            try:
                end = self.scanner.scan(data, tracker)
            except ProtocolViolation as exc:
                self._broken(f"unexpected answer from the server: {exc}")
                return
            client = self.client
            if client is not None and client.transport is not None:
                client.transport.write(data if end < 0 or end == len(data) else data[:end])
                self.forwarded = True
            if end < 0:
                return
            if end != len(data):
                self.excess(len(data) - end)
        else:
            try:
                packets = self.reader.feed(data)
                done = False
                for i, (_seq, payload) in enumerate(packets):
                    if tracker.feed(payload):
                        done = True
                        break
            except ProtocolViolation as exc:
                self._broken(f"unexpected answer from the server: {exc}")
                return
            sink(packets)
            if not done:
                return
        self.tracker = None
        self.sink = RAW
        self.mode = IDLE
        self.status = tracker.status_flags
        owner = self.client
        if sink is RAW and owner is not None:
            owner.response_done(self, tracker)
        elif self._on_done is not None:
            callback, self._on_done = self._on_done, None
            callback(tracker)

    _on_done = None

    def excess(self, count: int) -> None:
        """Bytes after a complete answer: dropped."""
        log.warning("server %s sent %d byte(s) after a complete answer", self.target_name, count)

    def lane_handoff(self, data) -> None:
        """The quick lane sent the client's command, but the answer's first packet is one
        it does not follow: the slow path takes the answer whole, as if send() had sent it."""
        self.tracker = p.ResponseTracker(self.client.cmd[:6], self.capabilities,
                                         status_flags=self.status)
        self.sink = RAW
        self.slow_data(data)

    def connection_lost(self, exc):
        was_closed = self.closed
        self.closed = True
        self.mode = CLOSED
        fut = self._login_data
        if fut is not None and not fut.done():
            fut.set_exception(ConnectionError(f"connection to {self.target_name} closed during login"))
        if self._on_done is not None:
            callback, self._on_done = self._on_done, None
            self.tracker = None
            callback(None)
            return
        client = self.client
        if client is not None:
            client.on_server_lost(self)
        elif self.pool is not None and not was_closed:
            self.pool.idle_connection_lost(self)

    def _unsolicited(self, packets):
        for _seq, payload in packets:
            if payload[:1] == b"\xff":
                err = p.ErrPacket.parse(payload, self.capabilities)
                log.info("server %s (thread %d) closing: %s (%d)", self.target_name,
                         self.thread_id, err.message, err.code)
            else:
                log.warning("server %s sent an unexpected packet outside a command",
                            self.target_name)
        self.close()

    def _broken(self, why: str) -> None:
        log.error("server %s (thread %d): %s", self.target_name, self.thread_id, why)
        if self.transport is not None:
            self.transport.abort()

    # -- commands ---------------------------------------------------------------------
    def send(self, payload: bytes, sink=RAW, on_done=None, raw: bytes | None = None):
        """Send one command (sequence id 0). Returns its ResponseTracker."""
        tracker = p.ResponseTracker(payload[:6], self.capabilities, status_flags=self.status)
        self.forwarded = False
        if tracker.expects_response:
            self.tracker = tracker
            self.sink = sink
            self._on_done = on_done
            self.mode = BUSY
        self.transport.write(raw if raw is not None else p.packet(0, payload))
        return tracker

    def forward_client_packet(self, seq: int, payload: bytes) -> None:
        """A client packet that belongs to the command in flight (LOCAL INFILE data,
        change-user auth)."""
        if self.tracker is not None and self.tracker.awaiting_client:
            self.tracker.feed_client(payload)
        self.transport.write(p.packet(seq, payload))

    def run(self, payload: bytes, done, collect: list | None = None) -> None:
        """The proxy's own command: `done(tracker_or_None)` when answered (None: the
        connection died); the packets go to `collect` if given, never to a client."""
        if self.closed:
            self.loop.call_soon(done, None)
            return
        sink = collect.extend if collect is not None else _drop
        tracker = self.send(payload, sink=sink, on_done=done)
        if not tracker.expects_response:
            self.loop.call_soon(done, tracker)

    def query(self, payload: bytes, collect: list | None = None) -> asyncio.Future:
        """run() as a future of the tracker; raises ServerError on an ERR answer."""
        fut = self.loop.create_future()

        def done(tracker):
            if fut.done():
                return
            if tracker is None:
                fut.set_exception(ConnectionError("database connection lost"))
            elif tracker.error is not None:
                fut.set_exception(ServerError(tracker.error))
            else:
                fut.set_result(tracker)
        self.run(payload, done, collect)
        return fut

    # -- login --------------------------------------------------------------------------
    async def login(self, login: ServerLogin, ssl_context, host: str) -> None:
        while not login.done:
            if not self._login_buf:
                self._login_data = self.loop.create_future()
                await self._login_data
            data, self._login_buf = bytes(self._login_buf), bytearray()
            out = login.receive_data(data)
            if out:
                self.transport.write(out)
            if login.need_tls:
                self.transport = await self.loop.start_tls(self.transport, self, ssl_context,
                                                           server_hostname=host)
                self.transport.write(login.tls_started())
        result = login.result
        self.capabilities = result.capabilities
        self.thread_id = result.connection_id
        self.server_version = result.server_version
        self.status = result.status_flags
        self.mode = IDLE

    # -- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.mode = CLOSED
        if self.transport is not None and not self.transport.is_closing():
            try:
                self.transport.write(p.packet(0, p.com_quit()))
            except Exception:  # noqa: BLE001 - closing anyway
                pass
            self.transport.close()

    def __repr__(self):
        return f"<mysql ServerConnection {self.target_name} thread={self.thread_id} key={self.key}>"


def _drop(packets):
    pass


async def open_server_connection(loop, target_name: str, host: str, port: int, *, user: str,
                                 password: str, database: str | None, capabilities: int,
                                 charset: int, timeout: float, max_payload: int,
                                 ssl_context=None, program: str = "rdsproxy") -> ServerConnection:
    """Connect and log in; raises ServerError (refused), LoginError, OSError/TimeoutError."""
    conn = ServerConnection(loop, target_name, (host, port), max_payload=max_payload)

    async def connect():
        if ssl_context is None:
            # Plain connections join the relay's reactor, beside the clients (the C one
            # serves both halves of a session from one epoll set).
            sock, _ = await connect_socket(loop, host, port)
            try:
                await reactor.adopt(loop, lambda: conn, sock)
            except BaseException:
                sock.close()
                raise
        else:
            # The login asks for TLS in the clear, then the loop's start_tls takes over.
            await loop.create_connection(lambda: conn, host, port)
        login = ServerLogin(user, password, database or None,
                            capabilities=capabilities | BASE_CAPABILITIES,
                            tls="require" if ssl_context is not None else "disable",
                            charset=charset, max_payload=max_payload,
                            connect_attrs={"_client_name": "rdsproxy", "program_name": program})
        try:
            await conn.login(login, ssl_context, host)
        except BaseException:
            conn.close()
            raise
        conn.schema = database or ""
        conn.charset = charset
        return conn
    try:
        return await asyncio.wait_for(connect(), timeout)
    except BaseException:
        conn.close()
        raise


def first_row(packets: list, capabilities: int) -> list:
    """The first text row of a result set collected by ServerConnection.run()."""
    payloads = [payload for _seq, payload in packets]
    if not payloads:
        raise ProtocolViolation("empty answer")
    ncols, _ = p.read_lenenc_int(payloads[0], 0)
    pos = 1 + ncols
    if not capabilities & p.CLIENT_DEPRECATE_EOF:
        pos += 1
    if pos >= len(payloads):
        raise ProtocolViolation("no row in the answer")
    return p.parse_text_row(payloads[pos], ncols)


__all__ = ["ServerConnection", "open_server_connection", "ServerError", "LoginError", "RAW",
           "first_row", "COLLATIONS", "BASE_CAPABILITIES"]
