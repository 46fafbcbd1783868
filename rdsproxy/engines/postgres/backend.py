"""Connections from the proxy to PostgreSQL: open and authenticate, relay, run the proxy's own queries."""
from __future__ import annotations

import asyncio
import logging

from ..._fastpath import (
    FramingError,
    MessageScanner,
    ServerRelay,
    reactor,
    split_messages,
)
from ..._fastpath.pgwire import MSG_NOTIFICATION, MSG_PARAMETER_STATUS
from ..._fastpath.reactor_py import connect_socket
from ..._fastpath.contract import (   # the connection's modes
    PG_SERVER_CLOSED as CLOSED,
    PG_SERVER_INTERNAL as INTERNAL,
    PG_SERVER_RELAY as RELAY,
    PG_SERVER_RETIRING as RETIRING,
    PG_SERVER_STARTING as STARTING,
)
from ...core.sessions import ServerSide
from .login import ServerLogin, malformed_stream
from .protocol import ServerError
from .sessionstate import read_settings
from . import protocol as pg

log = logging.getLogger("rdsproxy.backend")


class ServerConnection(ServerRelay, ServerSide, asyncio.Protocol):
    """One PostgreSQL connection. In RELAY mode its bytes go straight to the attached client."""

    def __init__(self, loop, target_name: str, address: tuple[str, int], *,
                 user: str, max_message_size: int):
        ServerRelay.__init__(self)   # the relay's fields: mode, client, scanner, transport
        self.loop = loop
        self.target_name = target_name
        self.address = address
        self.user = user
        self.mode = STARTING
        self.key = None
        self.pool = None
        self.connect_timeout = 10.0   # also bounds a cancel request's round trip
        self.created_at = loop.time()
        self.idle_since = self.created_at
        self.backend_pid = 0
        self.backend_secret = 0
        self.parameters: dict[str, str] = {}
        self.applied: tuple = ()      # session parameters the proxy SET on it (sorted pairs)
        # The values the proxy set (its parameter sync, init_query) as the server spells
        # them, by lower-cased name: what a session state check is compared with.
        self.known_settings: dict[str, str] = {}
        # What init_query set (a subset of known_settings): the proxy's, for every client.
        self.init_settings: dict[str, str] = {}
        self.closed = False
        self.scanner = MessageScanner(counted=b"Z", captured=b"SA", max_message_size=max_message_size)
        self.backends: dict = {}   # (target, backend pid) -> connection, the engine's
        self._buf = bytearray()
        self._ready: asyncio.Future = loop.create_future()
        self._internal_done = None
        self._internal_error = None
        self._login: ServerLogin | None = None   # while STARTING

    # -- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport

    # data_received is the relay's (ServerRelay); outside RELAY it calls slow_data.
    def framing_error(self, exc):
        log.error("server %s sent a malformed stream: %s", self.target_name, exc)
        self.close()

    def server_messages(self, data):
        """The relay's captured messages, before `data` goes to the client: remember
        ParameterStatus; give a NotificationResponse the pid its client knows."""
        captured = self.scanner.captured
        for mtype, payload, length in captured:
            if mtype == MSG_PARAMETER_STATUS:
                name, value = pg.parse_parameter_status(payload)
                self.parameters[name] = value
            elif mtype == MSG_NOTIFICATION and len(payload) == length >= 4:
                data = self._client_pid_in_notification(data, payload)
        captured.clear()
        return data

    def _client_pid_in_notification(self, data, payload):
        """A notification names the notifying backend: clients know their own pid from the
        proxy's BackendKeyData, so name the client that backend served last (unchanged
        for a backend the proxy does not hold)."""
        backend = self.backends.get((self.target_name, int.from_bytes(payload[:4], "big")))
        if backend is None or not backend.last_client_pid:
            return data
        message = b"A" + (len(payload) + 4).to_bytes(4, "big") + payload
        at = data.find(message)
        if at < 0:
            return data   # split across chunks: sent as the server wrote it
        pid = backend.last_client_pid.to_bytes(4, "big")
        return b"".join((data[:at + 5], pid, data[at + 9:]))

    def slow_data(self, data):
        if self.mode == RETIRING:
            return   # what a vanished client's requests still produce: nobody reads it
        if self.mode == STARTING:
            messages = self._login_data(data)
        else:
            self._buf += data
            try:
                messages, used = split_messages(self._buf)
            except FramingError as exc:
                self._fail(malformed_stream(exc))
                return
            del self._buf[:used]
        for mtype, payload in messages:
            self._slow_message(mtype, payload)
            if self.closed:
                return

    def connection_lost(self, exc):
        self.backends.pop((self.target_name, self.backend_pid), None)
        was_closed = self.closed
        retiring = self.mode == RETIRING
        self.closed = True
        self.mode = CLOSED
        if retiring:
            # The backend has ended: only now is its place in the budget free.
            self.pool.discard(self)
            return
        if not self._ready.done():
            self._ready.set_exception(ConnectionError(
                f"connection to {self.target_name} closed during login"))
        if self._internal_done is not None:
            done, self._internal_done = self._internal_done, None
            done(ConnectionError("database connection lost"))
        client = self.client
        if client is not None:
            client.on_server_lost(self)
        elif self.pool is not None and not was_closed:
            self.pool.idle_connection_lost(self)

    # -- login -------------------------------------------------------------------------
    async def login(self, login: ServerLogin) -> None:
        """Run `login` (its TLS step already done) on this connection."""
        self._login = login
        self.transport.write(login.tls_started() if login.need_tls else login.start())
        await self._ready
        self._buf = bytearray()

    def _login_data(self, data) -> list:
        """The login's share of `data`; returns the messages that followed its end."""
        login = self._login
        try:
            out = login.receive_data(data)
        except ServerError as exc:
            self._fail(exc)
            return []
        if out:
            self.transport.write(out)
        if not login.done:
            return []
        self._login = None
        self.parameters = login.parameters
        self.backend_pid, self.backend_secret = login.backend_pid, login.backend_secret
        self.mode = RELAY
        self._ready.set_result(None)
        return login.leftover

    def _slow_message(self, mtype: int, payload: bytes) -> None:
        if mtype == 83:    # 'S'
            name, value = pg.parse_parameter_status(payload)
            self.parameters[name] = value
        elif mtype == 90:  # 'Z'
            if self.mode == INTERNAL:
                errors = self._internal_errors
                errors.append(self._internal_error)
                self._internal_error = None
                if len(errors) < self._internal_requests:
                    return
                self.mode = RELAY
                done, self._internal_done = self._internal_done, None
                if done is not None:
                    done(next((err for err in errors if err is not None), None))
        elif mtype == 69:  # 'E'
            fields = pg.parse_error_fields(payload)
            if self.mode == INTERNAL and fields.get("S") != "FATAL":
                self._internal_error = ServerError(fields)
            else:
                self._fail(ServerError(fields))
        elif mtype == 78:  # 'N' notice: log, nobody to show it to
            fields = pg.parse_error_fields(payload)
            log.debug("server %s notice: %s", self.target_name, fields.get("M"))
        # Anything else outside RELAY (RowDescription, CommandComplete ...) belongs to an
        # internal query whose rows we do not need.
        elif mtype == 68 and self.mode == INTERNAL and self._internal_rows is not None:  # 'D'
            self._internal_rows.append(payload)

    _internal_rows = None
    _internal_errors = None       # one entry per request of run_internal answered so far
    _internal_requests = 0

    def _fail(self, exc: Exception) -> None:
        if not self._ready.done():
            self._ready.set_exception(exc)
        elif self._internal_done is not None:
            done, self._internal_done = self._internal_done, None
            done(exc)
        elif self.client is None:
            log.info("server %s (pid %d) closed: %s", self.target_name, self.backend_pid, exc)
        self.close()

    # -- internal queries --------------------------------------------------------------
    def run_internal(self, sql, done, rows: list | None = None, errors: list | None = None) -> None:
        """Send one simple Query of the proxy's own, or a list of requests pipelined (wire
        bytes, each answered by one ReadyForQuery: a Query, or messages up to a Sync);
        `done(first_error_or_None)` at the last ReadyForQuery. Each request of a list
        fails on its own: `errors` receives one entry (None or the ServerError) per request.

        Nothing from it reaches a client: the client's bytes wait until `done` runs.
        """
        self.mode = INTERNAL
        self._internal_done = done
        self._internal_error = None
        self._internal_rows = rows
        self._internal_errors = [] if errors is None else errors
        self._buf = bytearray()
        if isinstance(sql, list):
            self._internal_requests = len(sql)
            self.transport.write(b"".join(sql))
        else:
            self._internal_requests = 1
            self.transport.write(pg.query(sql))

    def query_internal(self, sql: str, rows: list | None = None) -> asyncio.Future:
        fut = self.loop.create_future()

        def done(err):
            if not fut.done():
                if err is None:
                    fut.set_result(rows)
                else:
                    fut.set_exception(err)
        self.run_internal(sql, done, rows)
        return fut

    def retire(self, cancel: bool) -> None:
        """End this connection without trusting its state (its client vanished mid-request
        or mid-pipeline): cancel what may be running, then Terminate, which PostgreSQL
        reads after everything the client sent and answers by rolling back and exiting.
        The pool learns of it when the server has closed the connection, not before."""
        self.client = None
        self.mode = RETIRING
        self._buf = bytearray()
        self.transport.write(pg.TERMINATE)
        if cancel and self.backend_pid:
            self.loop.create_task(self._cancel_until_gone())

    def learn_proxy_settings(self, rows: list) -> None:
        """SETTINGS_SQL's answer just after init_query (or a reset): every setting the
        session holds is the proxy's."""
        self.known_settings = read_settings(rows)
        self.init_settings = dict(self.known_settings)

    async def _cancel_until_gone(self) -> None:
        """Cancel until the backend has read the Terminate and gone: PostgreSQL drops a
        cancel that reaches it before the statement has started, and the statement then
        runs to its end (a vanished client's pg_sleep(120) held a connection for that)."""
        delay = 0.25
        while not self.closed:
            await send_cancel(self)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    # -- lifecycle ---------------------------------------------------------------------
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.mode = CLOSED
        if self.transport is not None:
            if not self.transport.is_closing():
                try:
                    self.transport.write(pg.TERMINATE)
                except Exception:
                    pass
            self.transport.close()

    def __repr__(self):
        return f"<ServerConnection {self.target_name} pid={self.backend_pid} key={self.key}>"


async def send_cancel(server: ServerConnection, still_wanted=None) -> bool:
    """Send a CancelRequest for what `server` is running, and wait until PostgreSQL has
    acted on it (it closes the cancel connection then): a client told "cancelled" any
    earlier could see its next statement cancelled instead. `still_wanted()` is asked
    once the cancel connection is up, just before the request goes out."""
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*server.address),
                                                server.connect_timeout)
        if still_wanted is not None and not still_wanted():
            return False
        writer.write(pg.cancel_request(server.backend_pid, server.backend_secret))
        await asyncio.wait_for(reader.read(), server.connect_timeout)
        return True
    except (OSError, asyncio.TimeoutError) as exc:
        log.warning("cannot send a cancel request to %s: %s", server.target_name, exc)
        return False
    finally:
        if writer is not None:
            writer.close()


async def _negotiate_tls(loop, host: str, port: int, login: ServerLogin):
    """Connect a plain socket and ask for TLS; return it once the server said 'S'."""
    async def ask(sock):
        await loop.sock_sendall(sock, login.start())
        return await loop.sock_recv(sock, 1)   # only the answer: nothing may follow an 'S'
    sock, answer = await connect_socket(loop, host, port, ask)
    try:
        login.tls_answer(answer)
    except ServerError:
        sock.close()
        raise
    return sock


async def open_server_connection(loop, target_name: str, host: str, port: int, *, user: str,
                                 password: str, database: str, params: dict[str, str],
                                 timeout: float, max_message_size: int,
                                 ssl_context=None, tls_mode: str = "disable") -> ServerConnection:
    """Connect (over TLS when `ssl_context` is given) and log in; raise ServerError (refused)
    or OSError/TimeoutError/ssl.SSLError (unreachable, or the TLS handshake failed)."""
    def factory():
        conn = ServerConnection(loop, target_name, (host, port), user=user,
                                max_message_size=max_message_size)
        conn.connect_timeout = timeout
        return conn

    # Without a context (tls "disable") the login asks for no TLS.
    login = ServerLogin(user, password, database, params, target_name=target_name,
                        tls_mode=tls_mode if ssl_context is not None else "disable")

    async def connect():
        if ssl_context is None:
            # Plain connections join the relay's reactor, beside the clients (the C one
            # serves both halves of a session from one epoll set).
            sock, _ = await connect_socket(loop, host, port)
            try:
                _, conn = await reactor.adopt(loop, factory, sock)
            except BaseException:
                sock.close()
                raise
        else:
            sock = await _negotiate_tls(loop, host, port, login)
            try:
                _, conn = await loop.create_connection(factory, sock=sock, ssl=ssl_context,
                                                       server_hostname=host)
            except BaseException:
                sock.close()
                raise
        try:
            await conn.login(login)
        except BaseException:
            conn.close()
            raise
        return conn
    return await asyncio.wait_for(connect(), timeout)
