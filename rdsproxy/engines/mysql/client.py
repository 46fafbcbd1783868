"""MySQL client connections: the asyncio side of a client's login (driving ClientLogin),
then commands relayed over borrowed server connections.

A client runs one command at a time (pipelined commands wait in `queue`). For each it
borrows a connection if it holds none, brings that connection's session state to its own
(default database, tracked variables, LAST_INSERT_ID, its prepared statements), sends the
command and forwards the answer. When the answer's final status shows no transaction and
no open cursor, and the client is not pinned, the connection goes back to the pool.

Prepared statements do not pin: the client sees ids issued here, each server connection
keeps its own (`ServerConnection.prepared`, keyed by schema and SQL text), and a statement
is prepared again, unseen, on a connection that lacks it. Executes always bind their
parameter types, because a server statement is shared by every client that prepared the
same text on that connection.

The class is composed of mixins, one per concern: CommandDispatch (commands.py),
StatementMapping (statements.py) and StateSync (sync.py).
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from time import monotonic

from ..._fastpath import MysqlClientRelay as ClientRelay, Phase
from ...core.console import CONSOLE_DATABASE, ConsoleSession
from ...core.pool import BorrowTimeout
from ...core.router import UNROUTED
from ...core.sessions import ClientSide
from ...logs import redact_statement
from . import protocol as p
from .backend import BUSY
from .client_login import MAX_AUTH_PACKET, ClientLogin
from .clientstate import (AUTH, CLOSED, ER_CON_COUNT, ER_LOST, ER_MALFORMED, LOGIN,
                          OK_STATUS, READY, STARTUP, err)
from .commands import CommandDispatch
from .console import ConsoleWire, unknown_database
from .protocol import ProtocolViolation, ServerError
from .statements import ClientStatement, StatementMapping
from .sync import StateSync

log = logging.getLogger("rdsproxy.mysql.client")

_SSL_HEAD = b"\x20\x00\x00\x01"   # a 32-byte packet with sequence id 1: an SSLRequest


class ClientConnection(CommandDispatch, StatementMapping, StateSync, ClientRelay, ClientSide,
                       asyncio.Protocol):
    """One MySQL client of the proxy, from its greeting to its last byte. Its chunks reach
    the relay's quick lane first (_fastpath/mysql_relay_py.py); slow_data has the rest."""

    borrow_entry = None

    def __init__(self, engine, endpoint):
        ClientRelay.__init__(self)
        self.transport = None
        self.engine = engine
        self.endpoint = endpoint
        self.pool = None
        self.pool_core = UNROUTED
        self.route_role = endpoint.target_role
        self.waiting_for_route = False
        self.borrow_deadline = None
        self.state = STARTUP
        self.peer = self.peer_host = "?"
        self.user = ""
        self.database = ""
        self.key = None
        self.tls = False
        self.connection_id = 0
        self.capabilities = 0
        self.charset = p.CHARSET_UTF8MB4
        self.connected_at = engine.clock
        self.last_active = engine.clock
        self.seen_activity = 0
        self.activity = 0
        self.queries = 0
        self.outstanding = 0
        # When the command being answered came in and went to the database (monotonic()),
        # and the endpoint's histogram of the whole round trip as the client sees it.
        self.request_at = 0.0
        self.forwarded_at = 0.0
        self.response_latency = engine.metrics.response_latency(endpoint.name)
        self.ledger = engine.ledger
        self.phase = Phase.FREE   # moved by enter() only
        self.server = None
        self.pin_reason = None
        self.reader = p.PacketReader(MAX_AUTH_PACKET)
        self.queue: deque = deque()
        self.busy = False
        self.reading_paused = False
        self.login = None       # a ClientLogin until the session is READY
        self.verdicts = engine.rules.plain_packets   # the quick lane's COM_QUERY verdicts
        self._tls_pending = False
        self._reset_state()

    def _reset_state(self) -> None:
        """The proxy-side session state (login, COM_RESET_CONNECTION, COM_CHANGE_USER)."""
        self.schema = self.database
        self.vars: dict[str, str] = {}
        self.autocommit = True
        self.stmts: dict[int, ClientStatement] = {}
        self.next_stmt_id = 1
        self.last_stmt_id = 0
        self.long_data = False      # some statement has data sent ahead (long_data_stmts)
        self.long_data_stmts: list = []   # by identity: statements compare by value
        self.cursor_stmt = None
        self.last_insert_id = 0
        self.lid_version = 0
        self.row_count = -1
        self.last_server = None
        self.cmd = None
        self.cmd_seq = 0
        self.verdict = None
        self.stmt = None
        self.cmd_payload_override = None
        self.cmd_raw = None

    # -- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport):
        if self.transport is not None:
            # The C reactor handed the socket to the loop for TLS: the same connection, now
            # on the TLS transport (the engine's upgrade_client_tls takes it from here).
            return
        self.transport = transport
        self.note_addresses(transport, unknown_host="localhost")
        engine = self.engine
        if not engine.client_connected(self):
            log.warning("client %s refused: max_client_connections (%d) reached", self.peer,
                        engine.config.max_client_connections)
            transport.write(p.packet(0, err(ER_CON_COUNT, "Too many connections")))
            self.state = CLOSED
            transport.close()
            return
        self.connection_id = engine.register(self)
        self.login = self._new_login()
        transport.write(self.login.greeting(self.connection_id))

    def slow_data(self, data):
        """What a client sends that the relay's quick lane does not take."""
        if self.state == CLOSED:
            return
        self.activity += 1
        if self._tls_pending:
            self._early = getattr(self, "_early", b"") + data
            return
        if (self.state == STARTUP and not self.tls and len(data) > 36 and data[:4] == _SSL_HEAD
                and not self.reader.buffered and p.HandshakeResponse.is_ssl_request(data[4:36])):
            # A MySQL client starts TLS right after its SSLRequest, without waiting for an
            # answer: its ClientHello can come in the same read. It goes to the TLS layer.
            self.reader.next_seq = 2
            self.login.receive_packet(1, data[4:36])
            self._start_tls(early=data[36:])
            return
        if self.state == READY and not self.reader.buffered and len(data) > 4:
            # The common case: one whole command in one read (no list, no copy of it).
            length = data[0] | (data[1] << 8) | (data[2] << 16)
            if length + 4 == len(data) and length < 0xFFFFFF and length <= self.reader.max_payload:
                self.reader.next_seq = (data[3] + 1) & 0xFF
                self._on_packet(data[3], data[4:], data)
                return
        try:
            packets = self.reader.feed(data)
        except ProtocolViolation as exc:
            # Framing is lost (oversized or out-of-order packet): answer, then close.
            self.engine.metrics.ProtocolErrors += 1
            log.warning("client %s (user %s): %s", self.peer, self.user or "?", exc)
            self._fatal_draining((exc.code, exc.sqlstate), str(exc))
            return
        for seq, payload in packets:
            if self.state == READY:
                self._on_packet(seq, payload)
            elif self.state in (STARTUP, AUTH):
                if self._tls_pending:
                    # Bytes sent after the SSLRequest but before TLS could be injected.
                    self.fatal(ER_MALFORMED, "unencrypted data after the SSL request")
                    return
                if self.login.failure is not None or self.login.need_tls:
                    return      # refused: the connection is closing
                try:
                    self._on_login_packet(seq, payload)
                except ProtocolViolation as exc:
                    self.engine.metrics.ProtocolErrors += 1
                    log.warning("client %s: bad login packet: %s", self.peer, exc)
                    self.fatal((exc.code, exc.sqlstate), str(exc))
                    return
            elif self.state == LOGIN:
                self.queue.append((seq, payload))
            else:
                return

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        if self.state == CLOSED and self.transport is None:
            return
        self.state = CLOSED
        self.transport = None
        self.release_on_exit()
        self.queue.clear()
        if self in self.engine.clients:
            self.engine.client_gone(self)
        if self.engine.log_sessions:
            self.session_closed(exc)

    # -- replies -------------------------------------------------------------------------
    def _reply_seq(self) -> int:
        return p.seq_after(self.cmd_seq, len(self.cmd)) if self.cmd is not None else 1

    def _status(self) -> int:
        return p.SERVER_STATUS_AUTOCOMMIT if self.autocommit else 0

    def _reply_ok(self, **fields) -> None:
        ok = p.OkPacket(status_flags=self._status(), **fields).build(self.capabilities)
        self.transport.write(p.packet(self._reply_seq(), ok))

    def _reply_err(self, code_state, message: str) -> None:
        self.transport.write(p.packet(self._reply_seq(), err(code_state, message, self.capabilities
                                                              or p.CLIENT_PROTOCOL_41)))

    def fatal(self, code, text: str) -> None:
        """Tell the client why (an ERR packet: `code` is (errno, sqlstate)), then close its
        connection."""
        if self.close_reason is None:
            self.close_reason = text
        if self.transport is not None and not self.transport.is_closing():
            seq = self.login.error_seq if self.state in (STARTUP, AUTH) else (
                self._reply_seq() if self.busy else 0)
            try:
                self.transport.write(p.packet(seq, err(code, text)))
            except Exception:  # noqa: BLE001 - closing anyway
                pass
        self.close()

    def _fatal_draining(self, code, text: str) -> None:
        """fatal(), but the rest of what the client is sending is read and dropped for a
        moment first: closing with unread data would reset the connection, and the reset
        can destroy the error before the client reads it."""
        transport = self.transport
        if transport is None or transport.is_closing() or not transport.can_write_eof():
            self.fatal(code, text)
            return
        seq = self._reply_seq() if self.busy else (
            self.reader.next_seq if self.state == READY else self.login.error_seq)
        transport.write(p.packet(seq, err(code, text)))
        self.state = CLOSED
        transport.write_eof()
        self.engine.loop.call_later(2.0, self.close)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        elif self.transport is None:
            self.state = CLOSED

    # -- login (ClientLogin does the protocol; this side does the I/O) ------------------
    def _new_login(self) -> ClientLogin:
        engine = self.engine
        return ClientLogin(
            account=engine.accounts.get, server_version=engine.server_version,
            server_capabilities=engine.server_capabilities,
            tls_available=engine.server_ssl is not None, default_plugin=engine.default_plugin,
            client_host=self.peer_host, admit=lambda: engine.admit_transport(self),
            may_check=lambda: engine.throttle.may_check(self.peer_host, engine.loop.time()),
            check_token=self.check_iam_token, rsa=lambda: engine.rsa, tls=self.tls)

    def _on_login_packet(self, seq: int, payload: bytes) -> None:
        login = self.login
        out = login.receive_packet(seq, payload)
        if login.need_tls:
            self._start_tls()
            return
        if self.state == STARTUP and login.user is not None:
            # The HandshakeResponse is in: the login timeout counts from now.
            self.capabilities = login.capabilities
            self.user = login.user
            self.database = login.database
            self.charset = login.charset
            self.connected_at = self.engine.clock
            self.state = AUTH
        self._login_progress(out)

    def _login_progress(self, out: bytes) -> None:
        """Send what the login produced, then act on where it stands."""
        login = self.login
        if out:
            self.transport.write(out)
        failure = login.failure
        if failure is not None:
            if failure.denied:
                self._auth_failed(failure)
                return
            if failure.reason:
                log.info("client %s (user %s): refused, %s", self.peer, self.user, failure.reason)
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(failure.packet)
            self.close()
        elif login.done:
            self._auth_succeeded()

    def _start_tls(self, early: bytes = b""):
        engine = self.engine
        if engine.server_ssl is None or self.tls:
            self.fatal(ER_MALFORMED, "SSL is not offered")
            return
        if self.reader.buffered and not early:
            # The ClientHello was read with the SSLRequest (split differently): the TLS
            # layer takes it.
            early = self.reader.take_buffered()
        raw = self.transport
        raw.pause_reading()
        self._tls_pending = True
        engine.loop.create_task(self._handshake(raw, engine.server_ssl, bytes(early)))

    async def _handshake(self, raw, context, early=b""):
        if not await self.engine.upgrade_client_tls(self, raw, early):
            return
        self.login.tls_started()
        early = getattr(self, "_early", b"")
        if early and self.state != CLOSED:
            self._early = b""
            self.data_received(early)

    def _auth_failed(self, failure) -> None:
        engine = self.engine
        engine.metrics.ClientConnectionsSetupFailedAuth += 1
        log.warning("authentication failed for user %r from %s: %s", self.user, self.peer,
                    failure.reason)
        now = engine.loop.time()
        engine.throttle.record_failure(self.peer_host, now)
        delay = engine.throttle.delay_for(self.peer_host, now)
        packet = failure.packet
        self.state = CLOSED
        if delay <= 0:
            self.transport.write(packet)
            self.close()
            return
        self.transport.pause_reading()

        def answer():
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(packet)
                self.transport.close()
        engine.loop.call_later(delay, answer)

    def _auth_succeeded(self) -> None:
        engine = self.engine
        self.reader.max_payload = engine.max_payload
        if self.login.changing_user:
            self._finish_change_user()
            return
        self._reset_state()
        self.key = (self.user, self.database, self.capabilities & p.SESSION_CAPABILITIES, self.charset)
        if self.database == CONSOLE_DATABASE and engine.console is not None:
            self._open_console()
            return
        self.state = LOGIN
        if self.key in engine.defaults:
            self._finish_login()
        else:
            self.borrow()     # the first login with this key checks the database exists

    def _open_console(self) -> None:
        """The virtual database `rdsproxy`: an admin user gets the console, which never
        borrows a database connection; anyone else MySQL's answer for an unknown database."""
        engine = self.engine
        if not engine.console.is_admin(self.user):
            log.warning("client %s (user %s): refused the admin console (not in admin_users)",
                        self.peer, self.user)
            self.fatal(*unknown_database(CONSOLE_DATABASE))
            return
        engine.metrics.ClientConnectionsSetupSucceeded += 1
        log.info("client %s (user %s): admin console session", self.peer, self.user)
        self._send_login_ok()
        self.transport.set_protocol(ConsoleSession(engine.console, self,
                                                   ConsoleWire(self.capabilities)))

    def _send_login_ok(self) -> None:
        """The OK that ends a login or COM_CHANGE_USER; the session is READY from here."""
        self.state = READY
        ok = p.OkPacket(status_flags=OK_STATUS).build(self.capabilities)
        self.transport.write(self.login.send(ok))
        self.login = None

    def _finish_login(self) -> None:
        engine = self.engine
        engine.metrics.ClientConnectionsSetupSucceeded += 1
        if engine.log_sessions:
            self.session_opened(self.login.auth_method)
        self._send_login_ok()
        self._next()

    # -- COM_CHANGE_USER ---------------------------------------------------------------
    def _start_change_user(self, payload: bytes) -> None:
        login = self._new_login()
        out = login.change_user(payload, self.capabilities, self._reply_seq(), self.charset)
        self.login = login
        self.connected_at = self.engine.clock   # the login timeout counts from now
        self.user = login.user
        self.database = login.database
        self.charset = login.charset
        self.state = AUTH
        self._login_progress(out)

    def _finish_change_user(self) -> None:
        self._unpin()
        server = self.server
        if server is not None:
            self.detach(server)
            self._reset_and_release(server)
        self._reset_state()
        self.key = (self.user, self.database, self.capabilities & p.SESSION_CAPABILITIES, self.charset)
        self._send_login_ok()
        self._command_done()

    # -- pinning ---------------------------------------------------------------------
    def pin(self, reason: str, statement=None) -> None:
        if self.pin_reason is None:
            self.pin_reason = reason
            self.engine.metrics.pinned(reason)
            if self.engine.log_debug:
                text = redact_statement(statement) if statement is not None else "-"
                log.debug("client %s (user %s) pinned: %s by %s", self.peer, self.user, reason,
                          text, extra={"client": self.peer, "user": self.user,
                                       "pin_reason": reason, "statement": text})
        if self.phase == Phase.ACTIVE:
            self.enter(Phase.PINNED)

    def _unpin(self) -> None:
        self.pin_reason = None
        if self.phase == Phase.PINNED:
            self.enter(Phase.ACTIVE)

    # -- borrowing ---------------------------------------------------------------------
    def _send_to_server(self) -> None:
        if self.server is not None:
            self._sync_and_send(self.server)
            return
        # The common case: an idle connection in the pool this client was routed to last
        # (the router cuts this shortcut on any topology change).
        conn = self.pool_core.try_borrow(self.key)
        if conn is not None:
            pool = conn.pool
            if pool.usable(conn, self.engine.loop.time()):
                self.on_connection(conn)
                return
            pool.core.forget(True)
            conn.close()
        self.borrow()

    def on_connection(self, conn) -> None:
        if self.state == LOGIN:
            self.enter(Phase.FREE)
            conn.pool.release(conn)
            self._finish_login()
            return
        if self.state != READY or not self.busy:
            self.enter(Phase.FREE)
            conn.pool.release(conn)
            return
        if conn.closed:
            conn.pool.discard(conn)
            self.borrow()
            return
        if self.engine.log_debug:
            log.debug("client %s (user %s): borrowed %r", self.peer, self.user, conn)
        self.forwarded_at = monotonic()
        conn.pool_core.borrow_latency.observe(self.forwarded_at - self.request_at)
        self.enter(Phase.ACTIVE if self.pin_reason is None else Phase.PINNED)
        self.server = conn
        conn.client = self
        self._sync_and_send(conn)

    def on_borrow_error(self, exc) -> None:
        self.enter(Phase.FREE)
        if isinstance(exc, BorrowTimeout):
            code, text = (1040, "08004"), str(exc)
        elif isinstance(exc, ServerError):
            code, text = (exc.code, exc.sqlstate), exc.message
        else:
            code, text = (1158, "08S01"), f"cannot connect to the database: {exc}"
        if self.state == LOGIN:
            self.state = AUTH
            self.fatal(code, text)
            return
        if self.state != READY:
            return
        log.warning("client %s (user %s): %s", self.peer, self.user, text)
        if self.busy:
            self._reply_err(code, text)
            self._command_done()


    # -- losing the server -------------------------------------------------------------
    def on_server_lost(self, server) -> None:
        """The database connection serving this client died."""
        if self.server is server:
            self.detach(server)
        server.client = None
        server.pool.discard(server)
        if self.state != READY:
            return
        stateful = self.holds_state(server)
        if (self.busy and not server.forwarded and not stateful and self.verdict is not None
                and self.verdict.read_only and self.cmd is not None):
            # Nothing reached the client and the statement only reads: if the target is going
            # away (failover) it is sent again once a target is routable; if the target is
            # fine (this one connection was killed) the client gets the error.
            self.enter(Phase.WAITING)
            self.engine.failover.hold_for_health_check(self, server)
            return
        self.report_server_lost(server)

    def replay_request(self) -> None:
        if self.state == READY and self.busy:
            log.info("client %s (user %s): database connection lost before answering; "
                     "sending the request again", self.peer, self.user)
            self.borrow()
        else:
            self.enter(Phase.FREE)

    def report_server_lost(self, server) -> None:
        if self.state != READY:
            return
        self.enter(Phase.FREE)
        text = "the database connection serving this session was lost"
        stateful = self.holds_state(server)
        log.warning("client %s (user %s): %s (thread %d)", self.peer, self.user, text,
                    server.thread_id)
        if stateful or server.forwarded:
            self.fatal(ER_LOST, text + "; the open transaction or session state is gone")
            return
        if self.busy:
            self._reply_err(ER_LOST, text + "; the statement may or may not have completed")
            self._command_done()

    def _return_after_exit(self, server) -> None:
        """The client left while holding `server`: return it clean or close it."""
        if server.closed or server.mode == BUSY:
            server.pool.discard(server)
            return
        if not self.holds_state(server):
            server.pool.release(server)
            return
        self._reset_and_release(server)

