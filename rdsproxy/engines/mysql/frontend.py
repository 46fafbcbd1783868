"""MySQL client sessions: handshake, TLS, authentication, then commands relayed over
borrowed server connections.

A session runs one command at a time (pipelined commands wait in `queue`). For each it
borrows a connection if it holds none, brings that connection's session state to its own
(default database, tracked variables, LAST_INSERT_ID, its prepared statements), sends the
command and forwards the answer. When the answer's final status shows no transaction and
no open cursor, and the session is not pinned, the connection goes back to the pool.

Prepared statements do not pin: the client sees ids issued here, each server connection
keeps its own (`ServerConnection.prepared`, keyed by schema and SQL text), and a statement
is prepared again, unseen, on a connection that lacks it. Executes always bind their
parameter types, because a server statement is shared by every client that prepared the
same text on that connection.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
from collections import deque
from dataclasses import dataclass

from ..._fastpath import Phase
from ...auth import mysql as auth
from ...auth.iam import TokenError, verify_token
from ...core.pool import BorrowTimeout
from ...core.router import UNROUTED
from ...core.sessions import ClientSide
from . import pinning
from . import protocol as p
from .backend import BUSY, COLLATIONS
from .protocol import ProtocolViolation, ServerError

log = logging.getLogger("rdsproxy.mysql.client")

STARTUP, AUTH, LOGIN, READY, CLOSED = range(5)
MAX_AUTH_PACKET = 64 * 1024
MAX_QUEUED = 256
MAX_PREPARED_PER_CONNECTION = 512

# What the proxy offers clients (within what the server offers): no compression, no
# MySQL 8 optional metadata or query attributes, no MariaDB extensions.
PROXY_CAPABILITIES = (
    p.CLIENT_LONG_PASSWORD | p.CLIENT_FOUND_ROWS | p.CLIENT_LONG_FLAG | p.CLIENT_CONNECT_WITH_DB
    | p.CLIENT_NO_SCHEMA | p.CLIENT_ODBC | p.CLIENT_LOCAL_FILES | p.CLIENT_IGNORE_SPACE
    | p.CLIENT_PROTOCOL_41 | p.CLIENT_INTERACTIVE | p.CLIENT_IGNORE_SIGPIPE
    | p.CLIENT_TRANSACTIONS | p.CLIENT_RESERVED | p.CLIENT_SECURE_CONNECTION
    | p.CLIENT_MULTI_STATEMENTS | p.CLIENT_MULTI_RESULTS | p.CLIENT_PS_MULTI_RESULTS
    | p.CLIENT_PLUGIN_AUTH | p.CLIENT_CONNECT_ATTRS | p.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
    | p.CLIENT_CAN_HANDLE_EXPIRED_PASSWORDS | p.CLIENT_SESSION_TRACK | p.CLIENT_DEPRECATE_EOF
)
_ALWAYS = p.CLIENT_PROTOCOL_41 | p.CLIENT_SECURE_CONNECTION | p.CLIENT_PLUGIN_AUTH | p.CLIENT_LONG_PASSWORD

# Errors the proxy sends itself: (code, sqlstate).
ER_ACCESS_DENIED = (1045, "28000")
ER_UNKNOWN_COM = (1047, "08S01")
ER_UNKNOWN_THREAD = (1094, "HY000")
ER_NOT_OWNER = (1095, "HY000")
ER_CONNECTION_KILLED = (1927, "70100")
ER_MALFORMED = (1835, "HY000")
ER_UNKNOWN_STMT = (1243, "HY000")
ER_NO_CURSOR = (1421, "HY000")
ER_CON_COUNT = (1040, "08004")
ER_SERVER_SHUTDOWN = (1053, "08S01")
ER_IDLE = (4031, "HY000")
ER_SECURE_TRANSPORT = (3159, "HY000")
ER_LOST = (1158, "08S01")                 # ER_NET_READ_ERROR: never a client-library code
# fatal() takes the core's PostgreSQL-style SQLSTATEs too (housekeeping, shutdown).
_FROM_SQLSTATE = {"57P05": ER_IDLE, "57P01": ER_SERVER_SHUTDOWN, "53300": ER_CON_COUNT,
                  "28000": ER_ACCESS_DENIED, "08006": (1158, "08S01"), "08P01": ER_MALFORMED}

_OK_STATUS = p.SERVER_STATUS_AUTOCOMMIT
_HOLD = p.SERVER_STATUS_IN_TRANS | p.SERVER_STATUS_CURSOR_EXISTS
_FORWARDED = {p.COM_QUERY, p.COM_INIT_DB, p.COM_FIELD_LIST, p.COM_STATISTICS, p.COM_PING,
              p.COM_PROCESS_INFO, p.COM_REFRESH, p.COM_SET_OPTION}


@dataclass
class ClientStatement:
    sql: bytes
    num_params: int
    num_columns: int
    verdict: object
    param_types: bytes = b""


def err(code_state, message: str, capabilities: int = p.CLIENT_PROTOCOL_41) -> bytes:
    code, state = code_state
    return p.ErrPacket(code, message, state).build(capabilities)


class ClientSession(ClientSide, asyncio.Protocol):
    """One MySQL client of the proxy, from its greeting to its last byte."""

    borrow_entry = None
    transport = None
    _awaiting_client = False   # the login waits for a packet from the client

    def __init__(self, engine, endpoint):
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
        self.ledger = engine.ledger
        self.phase = Phase.FREE   # moved by enter() only
        self.server = None
        self.pin_reason = None
        self.reader = p.PacketReader(MAX_AUTH_PACKET)
        self.queue: deque = deque()
        self.busy = False
        self.reading_paused = False
        # auth
        self._seq = 0
        self._nonce = auth.generate_nonce()
        self._plugin = ""
        self._account = None
        self._sha2_step = None
        self._tls_pending = False
        self._change_user = None
        self._reset_state()

    def _reset_state(self) -> None:
        """The proxy-side session state (login, COM_RESET_CONNECTION, COM_CHANGE_USER)."""
        self.schema = self.database
        self.vars: dict[str, str] = {}
        self.autocommit = True
        self.stmts: dict[int, ClientStatement] = {}
        self.next_stmt_id = 1
        self.last_stmt_id = 0
        self.long_data = False
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
        caps = (PROXY_CAPABILITIES & engine.server_capabilities) | _ALWAYS
        if engine.server_ssl is not None:
            caps |= p.CLIENT_SSL
        self.offered = caps
        greeting = p.Handshake(server_version=engine.server_version,
                               connection_id=self.connection_id, auth_plugin_data=self._nonce,
                               capabilities=caps, charset=p.CHARSET_UTF8MB4,
                               status_flags=_OK_STATUS, auth_plugin_name=engine.default_plugin)
        transport.write(p.packet(0, greeting.build()))
        self._seq = 1
        # The login waits for the client: an error now answers the packet it sends next.
        self._awaiting_client = True

    def data_received(self, data):
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
            self._seq = 2
            self._awaiting_client = True
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

    def _login_error_seq(self) -> int:
        """The sequence number of an ERR during the login: while the proxy waits for the
        client (the greeting or a method switch sent), the client reads it only after
        sending its packet, so it answers that packet (a client checks: PyMySQL raises
        "Packet sequence number wrong" otherwise)."""
        return (self._seq + 1) & 0xFF if self._awaiting_client else self._seq

    def fatal(self, code, text: str) -> None:
        """Tell the client why (an ERR packet), then close its connection."""
        if isinstance(code, str):
            code = _FROM_SQLSTATE.get(code, (1158, "08S01"))
        if self.transport is not None and not self.transport.is_closing():
            seq = self._login_error_seq() if self.state in (STARTUP, AUTH) else (
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
            self.reader.next_seq if self.state == READY else self._login_error_seq())
        transport.write(p.packet(seq, err(code, text)))
        self.state = CLOSED
        transport.write_eof()
        self.engine.loop.call_later(2.0, self.close)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        elif self.transport is None:
            self.state = CLOSED

    # -- login -------------------------------------------------------------------------
    def _on_login_packet(self, seq: int, payload: bytes) -> None:
        self._seq = (seq + 1) & 0xFF
        self._awaiting_client = False
        if self.state == STARTUP:
            if p.HandshakeResponse.is_ssl_request(payload):
                self._awaiting_client = True   # its handshake response comes over TLS
                self._start_tls()
                return
            self._on_handshake_response(p.HandshakeResponse.parse(payload))
        elif self._sha2_step is not None:
            self._on_sha2_packet(payload)
        else:
            self._verify(payload)

    def _start_tls(self, early: bytes = b""):
        engine = self.engine
        if engine.server_ssl is None or self.tls:
            self.fatal(ER_MALFORMED, "SSL is not offered")
            return
        if self.reader.buffered and not early:
            # The ClientHello was read with the SSLRequest (split differently): the TLS
            # layer takes it.
            early = self.reader._buf[:]
            self.reader._buf.clear()
        raw = self.transport
        raw.pause_reading()
        self._tls_pending = True
        engine.loop.create_task(self._handshake(raw, engine.server_ssl, bytes(early)))

    async def _handshake(self, raw, context, early=b""):
        if not await self.engine.upgrade_client_tls(self, raw, early):
            return
        early = getattr(self, "_early", b"")
        if early and self.state != CLOSED:
            self._early = b""
            self.data_received(early)

    def _on_handshake_response(self, resp: p.HandshakeResponse) -> None:
        engine = self.engine
        if not engine.admit_transport(self):
            self.fatal(ER_SECURE_TRANSPORT, "Connections using insecure transport are "
                                            "prohibited: this proxy requires TLS")
            return
        self.capabilities = resp.capabilities & self.offered & ~p.CLIENT_SSL
        if not resp.capabilities & p.CLIENT_PLUGIN_AUTH:
            self.capabilities &= ~p.CLIENT_PLUGIN_AUTH
        self.user = resp.username
        self.database = resp.database or "" if resp.capabilities & p.CLIENT_CONNECT_WITH_DB else ""
        self.charset = resp.charset or p.CHARSET_UTF8MB4
        self.connected_at = engine.clock
        self._begin_auth(resp.auth_plugin_name, resp.auth_response)

    def _begin_auth(self, client_plugin: str, response: bytes) -> None:
        account = self._account = self.engine.accounts.get(self.user)
        iam = account.iam_auth if account is not None else "DISABLED"
        if iam == "REQUIRED" and not self.tls:
            log.info("client %s (user %s): refused, IAM authentication needs TLS", self.peer, self.user)
            self._send_login(err(ER_ACCESS_DENIED, f"IAM authentication for user '{self.user}' "
                                                   "requires TLS"))
            self.close()
            return
        if iam != "DISABLED" and self.tls:
            plugin = auth.MYSQL_CLEAR_PASSWORD
        else:
            plugin = account.plugin if account is not None else self.engine.default_plugin
        self._plugin = plugin
        self.state = AUTH
        if client_plugin == plugin and plugin != auth.MYSQL_CLEAR_PASSWORD and self._change_user is None:
            self._verify(response)
            return
        # Ask for the method this account uses, with a fresh nonce.
        self._nonce = auth.generate_nonce()
        data = b"" if plugin == auth.MYSQL_CLEAR_PASSWORD else self._nonce + b"\x00"
        self._send_login(p.AuthSwitchRequest(plugin, data).build())

    def _send_login(self, payload: bytes) -> None:
        self.transport.write(p.packet(self._seq, payload))
        self._seq = (self._seq + 1) & 0xFF
        self._awaiting_client = True

    def _verify(self, response: bytes) -> None:
        if not self.engine.throttle.may_check(self.peer_host, self.engine.loop.time()):
            self._auth_failed("too many failed logins from this address: not checked", bool(response))
            return
        account = self._account
        password = account.credentials.password if account is not None else None
        plugin = self._plugin
        if plugin == auth.MYSQL_NATIVE_PASSWORD:
            ok = password is not None and auth.native_password_verify(password, self._nonce, response)
        elif plugin == auth.CACHING_SHA2_PASSWORD:
            if password and not response:
                # No scramble to check: ask for the password itself (over TLS in clear,
                # otherwise RSA-encrypted with the proxy's key). A scramble the proxy can
                # verify is enough, from the first login on: it knows the password.
                self._sha2_step = "full"
                self._send_login(p.AuthMoreData(bytes((auth.CACHING_SHA2_PERFORM_FULL_AUTH,))).build())
                return
            ok = password is not None and auth.caching_sha2_verify(password, self._nonce, response)
            if ok and password:
                self._send_login(p.AuthMoreData(bytes((auth.CACHING_SHA2_FAST_AUTH_SUCCESS,))).build())
        else:
            try:
                ok = account is not None and self._check_cleartext(account, auth.parse_clear_password(response))
            except TokenError as exc:
                self._auth_failed(str(exc), bool(response))
                return
        if not ok:
            self._auth_failed("no such user" if account is None else "wrong password", bool(response))
            return
        self._auth_succeeded()

    def _on_sha2_packet(self, payload: bytes) -> None:
        if not self.engine.throttle.may_check(self.peer_host, self.engine.loop.time()):
            self._auth_failed("too many failed logins from this address: not checked", True)
            return
        account = self._account
        if self._sha2_step == "full" and payload == bytes((auth.CACHING_SHA2_REQUEST_PUBLIC_KEY,)):
            self._sha2_step = "rsa"
            self._send_login(p.AuthMoreData(self.engine.rsa.public_key_pem).build())
            return
        if self.tls and self._sha2_step == "full":
            password = auth.parse_clear_password(payload)
        elif not self.tls:
            try:
                password = self.engine.rsa.decrypt_password(payload, self._nonce)
            except Exception:  # noqa: BLE001 - garbage is a failed login
                password = None
        else:
            password = None
        self._sha2_step = None
        expected = account.credentials.password.encode("utf-8")
        if password is None or not hmac.compare_digest(password, expected):
            self._auth_failed("wrong password (caching_sha2_password full authentication)", True)
            return
        self._auth_succeeded()

    def _check_cleartext(self, account, response: bytes) -> bool:
        text = response.decode("utf-8", "replace")
        if account.iam_auth == "REQUIRED" or ("/?" in text and "X-Amz-" in text):
            names = self.engine.config.iam_host_names(self.endpoint)
            local_host, local_port = self.local_address()
            if local_host:
                names.append(local_host)
            try:
                principal = verify_token(text, host=names, port=local_port, user=self.user,
                                         principals=self.engine.accounts.principals,
                                         region=self.engine.accounts.iam_region)
            except TokenError as exc:
                raise TokenError(f"IAM token rejected: {exc}") from None
            log.info("client %s (user %s): IAM token of %s accepted", self.peer, self.user,
                     principal.access_key_id)
            return True
        return hmac.compare_digest(response, account.credentials.password.encode("utf-8"))

    def _auth_failed(self, reason: str, with_password: bool) -> None:
        engine = self.engine
        engine.metrics.ClientConnectionsSetupFailedAuth += 1
        log.warning("authentication failed for user %r from %s: %s", self.user, self.peer, reason)
        now = engine.loop.time()
        engine.throttle.record_failure(self.peer_host, now)
        delay = engine.throttle.delay_for(self.peer_host, now)
        text = (f"Access denied for user '{self.user}'@'{self.peer_host}' (using password: "
                f"{'YES' if with_password else 'NO'})")
        packet = p.packet(self._seq, err(ER_ACCESS_DENIED, text))
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
        if self._change_user is not None:
            self._finish_change_user()
            return
        self._reset_state()
        self.key = (self.user, self.database, self.capabilities & p.SESSION_CAPABILITIES, self.charset)
        self.state = LOGIN
        if self.key in engine.defaults:
            self._finish_login()
        else:
            self.borrow()     # the first login with this key checks the database exists

    def _finish_login(self) -> None:
        self.state = READY
        self.engine.metrics.ClientConnectionsSetupSucceeded += 1
        self._send_login(p.OkPacket(status_flags=_OK_STATUS).build(self.capabilities))
        self._next()

    # -- COM_CHANGE_USER ---------------------------------------------------------------
    def _change_user_start(self, payload: bytes) -> None:
        change = p.ChangeUser.parse(payload, self.capabilities)
        self._change_user = change
        self._seq = self._reply_seq()
        self.connected_at = self.engine.clock   # the login timeout counts from now
        self.user = change.username
        self.database = change.database
        if change.charset:
            self.charset = change.charset & 0xFF
        # Always switch: fresh nonce, the account's method (as MariaDB does).
        self._begin_auth("", b"")

    def _finish_change_user(self) -> None:
        self._change_user = None
        self._unpin()
        server = self.server
        if server is not None:
            self.detach(server)
            self._reset_and_release(server)
        self._reset_state()
        self.key = (self.user, self.database, self.capabilities & p.SESSION_CAPABILITIES, self.charset)
        self.state = READY
        self._send_login(p.OkPacket(status_flags=_OK_STATUS).build(self.capabilities))
        self._command_done()

    # -- commands ----------------------------------------------------------------------
    def _on_packet(self, seq: int, payload: bytes, raw: bytes | None = None) -> None:
        if self.busy:
            server = self.server
            if server is not None and server.tracker is not None and server.tracker.awaiting_client:
                server.forward_client_packet(seq, payload)   # LOCAL INFILE data
                return
            self.queue.append((seq, payload))
            if len(self.queue) > MAX_QUEUED and not self.reading_paused:
                self.reading_paused = True
                self.transport.pause_reading()
            return
        self._dispatch(seq, payload, raw)

    def _next(self) -> None:
        while self.queue and not self.busy and self.state == READY:
            seq, payload = self.queue.popleft()
            self._dispatch(seq, payload)
        if self.reading_paused and len(self.queue) < MAX_QUEUED // 2 and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()

    def _dispatch(self, seq: int, payload: bytes, raw: bytes | None = None) -> None:
        self.cmd_raw = raw
        self.busy = True
        self.outstanding = 1
        self.queries += 1
        self.cmd = payload
        self.cmd_seq = seq
        self.verdict = None
        self.stmt = None
        if seq != 0:
            self.fatal((1156, "08S01"), "Got packets out of order")
            return
        if not payload:
            self._refuse(ER_MALFORMED, "Malformed communication packet (empty command)")
            return
        cmd = payload[0]
        try:
            handler = _HANDLERS.get(cmd)
            if handler is None:
                if cmd in _FORWARDED:
                    self._send_to_server()
                else:
                    self._refuse(ER_UNKNOWN_COM, "Unknown command")
                return
            handler(self, payload)
        except ProtocolViolation as exc:
            self._refuse((exc.code, exc.sqlstate), str(exc))

    def _refuse(self, code_state, message: str) -> None:
        """Answer the current command with an error; the session goes on."""
        self.engine.metrics.ProtocolErrors += code_state in (ER_MALFORMED, ER_UNKNOWN_COM)
        log.info("client %s (user %s): %s", self.peer, self.user, message)
        self._reply_err(code_state, message)
        self._command_done()

    def _command_done(self) -> None:
        self.busy = False
        self.outstanding = 0
        self.cmd = None
        server = self.server
        if server is not None and not self._must_keep(server):
            self.detach(server)
            server.pool.release(server)
        self._next()

    def _must_keep(self, server) -> bool:
        return bool(self.pin_reason is not None or server.status & _HOLD or self.long_data
                    or self.queue)

    def _com_quit(self, payload):
        self.busy = False
        self.close()

    def _com_ping(self, payload):
        if self.server is not None:
            self._send_to_server()
        else:
            self._reply_ok()
            self._command_done()

    def _com_query(self, payload):
        verdict = self.engine.rules.classify(payload[1:])
        self.verdict = verdict
        if verdict.kill is not None:
            if verdict.kill[1] is None or verdict.statements > 1:
                self._refuse((1064, "42000"), "KILL through the proxy takes one connection id, "
                                              "as a number, in a statement of its own")
                return
            self._kill(*verdict.kill)
            return
        if verdict.simple_row_count and (self.server is None or self.server is not self.last_server):
            self._answer_value("ROW_COUNT()", self.row_count)
            self.row_count = -1
            return
        if verdict.simple_connection_id:
            # The client's id is the proxy's, never the id of the server connection it borrows.
            self._answer_value("CONNECTION_ID()", self.connection_id)
            return
        if verdict.connection_id and verdict.pin != pinning.UNKNOWN_STATE:
            # One id wherever the client sees it: the proxy's, in any statement.
            self.cmd_payload_override = p.com_query(
                pinning.with_connection_id(payload[1:], self.connection_id))
        if verdict.pin is not None:
            self.pin(verdict.pin)
        self._send_to_server()

    def _com_process_kill(self, payload):
        if len(payload) < 5:
            raise ProtocolViolation("COM_PROCESS_KILL too short")
        self._kill(False, int.from_bytes(payload[1:5], "little"))

    def _com_set_option(self, payload):
        self.pin(pinning.SET_OPTION)
        self._send_to_server()

    def _com_reset_connection(self, payload):
        self._unpin()
        self._reset_state()
        self.cmd, self.cmd_seq = payload, 0
        server = self.server
        if server is None:
            self._reply_ok()
            self._command_done()
            return
        self.detach(server)

        def reset_done(ok):
            if self.state == READY:
                self._reply_ok()
                self._command_done()
        self._reset_and_release(server, reset_done)

    def _com_change_user(self, payload):
        self._change_user_start(payload)

    def _com_stmt_prepare(self, payload):
        # Preparing creates no session state; what the text does is judged at execute.
        self.verdict = self.engine.rules.classify(payload[1:])
        self._send_to_server()

    def _statement(self, payload) -> ClientStatement:
        if len(payload) < 5:
            raise ProtocolViolation("statement command too short")
        stmt_id = int.from_bytes(payload[1:5], "little")
        if stmt_id == p.MARIADB_LAST_STATEMENT_ID:
            stmt_id = self.last_stmt_id
        stmt = self.stmts.get(stmt_id)
        if stmt is None:
            raise ProtocolViolation(f"Unknown prepared statement handler ({stmt_id}) given to "
                                    f"{p.COMMAND_NAMES.get(payload[0], 'command')}", *ER_UNKNOWN_STMT)
        self.stmt = stmt
        return stmt

    def _com_stmt_execute(self, payload):
        stmt = self._statement(payload)
        if stmt.verdict.pin is not None:
            self.pin(stmt.verdict.pin)
        self.verdict = stmt.verdict
        n = stmt.num_params
        if n:
            if payload[5:6] and payload[5] & p.PARAMETER_COUNT_AVAILABLE:
                raise ProtocolViolation("COM_STMT_EXECUTE with a parameter count is not supported")
            pos = 10 + (n + 7) // 8           # command, id, flags, iterations, null bitmap
            if len(payload) <= pos:
                raise ProtocolViolation("COM_STMT_EXECUTE too short for its parameters")
            if payload[pos] == 1:
                stmt.param_types = payload[pos + 1:pos + 1 + 2 * n]
            elif stmt.param_types:
                # The server statement may be shared (or new): always bind the types.
                self.cmd_payload_override = (payload[:pos] + b"\x01" + stmt.param_types
                                             + payload[pos + 1:])
        self._send_to_server()

    def _com_stmt_long_data(self, payload):
        self._statement(payload)
        self.long_data = True
        self._send_to_server()

    def _com_stmt_reset(self, payload):
        self._statement(payload)
        self.long_data = False
        if self.server is None:
            self._reply_ok()
            self._command_done()
            return
        self._send_to_server()

    def _com_stmt_fetch(self, payload):
        stmt = self._statement(payload)
        if self.server is None or self.cursor_stmt is not stmt:
            self._refuse(ER_NO_CURSOR, f"The statement ({int.from_bytes(payload[1:5], 'little')}) "
                                       "has no open cursor")
            return
        self._send_to_server()

    def _com_stmt_close(self, payload):
        if len(payload) < 5:
            raise ProtocolViolation("COM_STMT_CLOSE too short")
        stmt_id = int.from_bytes(payload[1:5], "little")
        if stmt_id == p.MARIADB_LAST_STATEMENT_ID:
            stmt_id = self.last_stmt_id
        stmt = self.stmts.pop(stmt_id, None)
        # No answer. The server statement stays prepared for whoever prepares it next; an
        # open cursor of it is closed so the connection can be returned.
        server = self.server
        if stmt is not None and stmt is self.cursor_stmt and server is not None:
            self.cursor_stmt = None
            sid = server.prepared.get((server.schema, stmt.sql))
            if sid is not None:
                self.busy = True
                server.run(p.com_stmt_reset(sid[0].statement_id), lambda t: self._closed_cursor(server, t))
                return
        self.busy = False
        self.outstanding = 0
        self._command_done()

    def _closed_cursor(self, server, tracker):
        if tracker is None:
            self.on_server_lost(server)
            return
        server.status &= ~p.SERVER_STATUS_CURSOR_EXISTS
        self._command_done()

    # -- KILL ------------------------------------------------------------------------
    def _kill(self, query_only: bool, connection_id: int) -> None:
        victim = self.engine.by_id.get(connection_id)
        if victim is None:
            self._refuse(ER_UNKNOWN_THREAD, f"Unknown thread id: {connection_id}")
            return
        if victim.user != self.user:
            self._refuse(ER_NOT_OWNER, f"You are not owner of thread {connection_id}")
            return
        if victim is self and not query_only:
            self.fatal(ER_CONNECTION_KILLED, "Connection was killed")
            return
        server = victim.server
        running = server is not None and victim.busy and server.mode == BUSY and victim is not self
        if not query_only:
            victim.fatal(ER_CONNECTION_KILLED, "Connection was killed")
        if not running:
            self._reply_ok()
            self._command_done()
            return
        self.engine.loop.create_task(self._kill_query(server))

    async def _kill_query(self, server) -> None:
        try:
            await self.engine.kill_query(server)
        except Exception as exc:  # noqa: BLE001 - tell the client
            if self.state == READY:
                self._reply_err((1158, "08S01"), f"KILL could not reach the database: {exc}")
                self._command_done()
            return
        if self.state == READY:
            self._reply_ok()
            self._command_done()

    def _answer_value(self, name: str, value: int) -> None:
        """A one-row, one-column result the proxy knows better than the server."""
        column = p.ColumnDefinition(name, type=p.MYSQL_TYPE_LONGLONG,
                                    charset=p.CHARSET_BINARY, length=21,
                                    flags=p.BINARY_FLAG | p.NOT_NULL_FLAG)
        status = self._status() | (self.server.status & p.SERVER_STATUS_IN_TRANS
                                   if self.server is not None else 0)
        self.transport.write(p.result_set([column], [[value]], self.capabilities,
                                          status_flags=status, seq=1))
        self._command_done()

    # -- pinning ---------------------------------------------------------------------
    def pin(self, reason: str) -> None:
        if self.pin_reason is None:
            self.pin_reason = reason
            self.engine.metrics.pinned(reason)
            log.debug("client %s (user %s) pinned: %s", self.peer, self.user, reason)
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

    # -- state sync before a command ---------------------------------------------------
    def _sync_steps(self, conn) -> list:
        steps = []
        want, have = self.vars, conn.vars
        reset = any(k not in want and k in pinning.RESET_ONLY_KEYS for k in have)
        if conn.schema and not self.schema:
            raise _Unresettable()   # a database cannot be deselected: use a fresh connection
        if reset:
            steps += self._reset_steps(conn)
            have = {}
        if self.schema and self.schema != conn.schema:
            schema = self.schema
            steps.append((p.com_init_db(schema), lambda t, c: setattr(conn, "schema", schema)))
        if want != have:
            assignments = [f"@@SESSION.{k} = DEFAULT" for k in have if k not in want]
            statements = []
            for k, v in want.items():
                if have.get(k) != v:
                    (statements if k == "transaction" else assignments).append(v)
            if assignments:
                statements.insert(0, "SET " + ", ".join(assignments))
            for sql in statements:
                steps.append((p.com_query(sql), None))
            wanted = dict(want)
            steps.append((None, lambda t, c: setattr(conn, "vars", wanted)))
        return steps

    def _reset_steps(self, conn) -> list:
        # MariaDB's reset keeps the current role (SET ROLE): drop it too, or the next
        # client would hold privileges that only this one asked for.
        steps = [(p.com_reset_connection(), None), (p.com_query("SET ROLE NONE"), None)]
        names = COLLATIONS.get(conn.charset)
        if names is None:
            raise _Unresettable()
        steps.append((p.com_query(f"SET NAMES {names}"), None))
        if self.engine.config.target_group.init_query:
            steps.append((p.com_query(self.engine.config.target_group.init_query), None))

        def after(t, c):
            conn.vars = {}
            conn.prepared = {}
            conn.lid_owner = None
            conn.status = _OK_STATUS
        steps.append((None, after))
        return steps

    def _sync_and_send(self, conn) -> None:
        try:
            if conn.vars == self.vars and conn.schema == self.schema:
                steps = []                      # the common case: nothing to bring over
            else:
                steps = self._sync_steps(conn)
        except _Unresettable:
            self.detach(conn)
            conn.pool.discard(conn)
            self.borrow()
            return
        cmd = self.cmd[0]
        if cmd in (p.COM_QUERY, p.COM_STMT_EXECUTE) and self.verdict is not None \
                and self.verdict.last_insert_id \
                and conn.lid_owner != (self.connection_id, self.lid_version):
            # LAST_INSERT_ID() must answer for this client's own last insert.
            steps.append((p.com_query(f"SELECT LAST_INSERT_ID({self.last_insert_id})"),
                          lambda t, c: setattr(conn, "lid_owner", (self.connection_id, self.lid_version))))
        if self.stmt is not None and (conn.schema, self.stmt.sql) not in conn.prepared:
            stmt = self.stmt
            collect = []
            steps.append((p.com_stmt_prepare(stmt.sql), self._reprepared(conn, stmt), collect))
        self._run_steps(conn, steps)

    def _reprepared(self, conn, stmt):
        def record(tracker, collect):
            self._remember_prepared(conn, stmt.sql, tracker.prepare_ok, collect)
        return record

    def _remember_prepared(self, conn, sql, ok, packets) -> None:
        prepared = conn.prepared
        if len(prepared) >= MAX_PREPARED_PER_CONNECTION:
            old_key = next(iter(prepared))
            old = prepared.pop(old_key)
            conn.transport.write(p.packet(0, p.com_stmt_close(old[0].statement_id)))
        prepared[(conn.schema, sql)] = (ok, [payload for _seq, payload in packets])

    def _run_steps(self, conn, steps) -> None:
        while steps and steps[0][0] is None:
            steps.pop(0)[1](None, None)
        if not steps:
            self._send_command(conn)
            return
        step = steps.pop(0)
        payload, check = step[0], step[1]
        collect = step[2] if len(step) > 2 else []

        def done(tracker):
            if self.server is not conn:     # the client left meanwhile
                if tracker is None or conn.closed:
                    conn.pool.discard(conn)
                return
            if tracker is None:
                self.on_server_lost(conn)
                return
            if tracker.error is not None:
                self._step_failed(conn, payload, tracker.error)
                return
            if check is not None:
                check(tracker, collect)
            self._run_steps(conn, steps)
        conn.run(payload, done, collect)

    def _step_failed(self, conn, payload, error) -> None:
        if payload[0] == p.COM_STMT_PREPARE:
            # The statement cannot be prepared here any more (a table was dropped...):
            # that is the answer to the client's command.
            self._reply_err((error.code, error.sqlstate), error.message)
            self._command_done()
            return
        log.warning("client %s (user %s): restoring session state on %r failed: %s",
                    self.peer, self.user, conn, error.message)
        self.detach(conn)
        conn.pool.discard(conn)
        self._reply_err((error.code, error.sqlstate),
                        f"cannot restore the session state: {error.message}")
        self._command_done()

    def _send_command(self, conn) -> None:
        payload = self.cmd
        cmd = payload[0]
        override = self.cmd_payload_override
        if override is not None:
            self.cmd_payload_override = None
            payload = override
        if cmd == p.COM_STMT_PREPARE:
            cached = conn.prepared.get((conn.schema, payload[1:]))
            if cached is not None:
                self._answer_prepare(conn, cached[0], cached[1])
                return
            packets = []
            conn.send(payload, sink=packets.extend, on_done=lambda t: self._prepared(conn, t, packets))
            return
        if self.stmt is not None:
            ok = conn.prepared[(conn.schema, self.stmt.sql)][0]
            payload = p.with_statement_id(payload, ok.statement_id)
            if cmd == p.COM_STMT_EXECUTE and payload[5] & p.CURSOR_TYPE_MASK:
                self.cursor_stmt = self.stmt
            if cmd == p.COM_STMT_EXECUTE:
                self.long_data = False
        raw = None
        if payload is self.cmd:
            raw = self.cmd_raw if self.cmd_raw is not None else p.packet(self.cmd_seq, payload)
        tracker = conn.send(payload, raw=raw)
        if not tracker.expects_response:   # SEND_LONG_DATA
            self._command_done()

    def _prepared(self, conn, tracker, packets) -> None:
        if tracker is None:
            self.on_server_lost(conn)
            return
        if tracker.error is not None:
            self.last_stmt_id = 0      # a pipelined execute of "the last statement" fails too
            for seq, payload in packets:
                self.transport.write(p.packet(seq, payload))
            self._command_done()
            return
        self._remember_prepared(conn, self.cmd[1:], tracker.prepare_ok, packets)
        self._answer_prepare(conn, tracker.prepare_ok, [pl for _s, pl in packets])

    def _answer_prepare(self, conn, ok, payloads) -> None:
        stmt_id = self.next_stmt_id
        self.next_stmt_id += 1
        self.last_stmt_id = stmt_id
        self.stmts[stmt_id] = ClientStatement(self.cmd[1:], ok.num_params, ok.num_columns,
                                              self.verdict or pinning.PLAIN)
        out = []
        seq = 1
        for i, payload in enumerate(payloads):
            if i == 0:
                payload = b"\x00" + stmt_id.to_bytes(4, "little") + payload[5:]
            out.append(p.packet(seq, payload))
            seq = p.seq_after(seq, len(payload))
        self.transport.write(b"".join(out))
        self._command_done()

    # -- after the answer --------------------------------------------------------------
    def response_done(self, conn, tracker) -> None:
        """The server finished answering the command the client sent (relayed raw)."""
        if self.state != READY:
            return
        cmd = self.cmd[0] if self.cmd else None
        ok = tracker.last_ok
        if cmd in (p.COM_QUERY, p.COM_STMT_EXECUTE):
            verdict = self.verdict
            if tracker.error is None:
                if verdict is not None:
                    self._apply(verdict, conn)
            elif verdict is not None and (verdict.sets or verdict.use_db) and verdict.statements > 1:
                self.pin(pinning.UNKNOWN_STATE)
            if ok is not None and ok.last_insert_id:
                self.last_insert_id = ok.last_insert_id
                self.lid_version += 1
                conn.lid_owner = (self.connection_id, self.lid_version)
            self.row_count = ok.affected_rows if ok is not None and ok.header == p.OK_HEADER else -1
            self.last_server = conn
            # autocommit=0: the transaction the server opens implicitly shows in the status
            # flags (SERVER_STATUS_IN_TRANS) like an explicit one, and keeps the connection
            # until COMMIT / ROLLBACK; a statement that opened none (SELECT 1) does not.
            if cmd == p.COM_STMT_EXECUTE and not tracker.status_flags & p.SERVER_STATUS_CURSOR_EXISTS:
                self.cursor_stmt = None
        elif cmd == p.COM_INIT_DB and tracker.error is None:
            self.schema = conn.schema = self.cmd[1:].decode("utf-8", "surrogateescape")
        elif cmd == p.COM_STMT_FETCH and not tracker.status_flags & p.SERVER_STATUS_CURSOR_EXISTS:
            self.cursor_stmt = None
        self._command_done()

    def _apply(self, verdict, conn) -> None:
        if verdict.use_db is not None:
            self.schema = conn.schema = verdict.use_db
        for key, replay in verdict.sets:
            if key == "names":
                for k in pinning.CHARSET_KEYS:
                    self.vars.pop(k, None)
                    conn.vars.pop(k, None)
            if replay is None:
                self.vars.pop(key, None)
                conn.vars.pop(key, None)
            else:
                self.vars[key] = replay
                conn.vars[key] = replay
            if key == "autocommit":
                self.autocommit = pinning.autocommit_value(replay)
        if verdict.sets and self.vars != conn.vars:
            conn.vars = dict(self.vars)

    # -- losing the server -------------------------------------------------------------
    def on_server_lost(self, server) -> None:
        """The database connection serving this client died."""
        if self.server is server:
            self.detach(server)
        server.client = None
        server.pool.discard(server)
        if self.state != READY:
            return
        stateful = (self.pin_reason is not None or server.status & _HOLD
                    or self.long_data)
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
        stateful = (self.pin_reason is not None or server.status & _HOLD
                    or self.long_data)
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
        dirty = (self.pin_reason is not None or server.status & _HOLD
                 or self.long_data)
        if not dirty:
            server.pool.release(server)
            return
        self._reset_and_release(server)

    def _reset_and_release(self, server, then=None) -> None:
        """COM_RESET_CONNECTION (and the character set again) before anyone else uses it."""
        try:
            steps = self._reset_steps(server)
        except _Unresettable:
            server.pool.discard(server)
            if then:
                then(False)
            return

        def step(tracker=True):
            if tracker is None or (tracker is not True and tracker.error is not None):
                log.info("reset of %r failed; closing it", server)
                server.pool.discard(server)
                if then:
                    then(False)
                return
            while steps and steps[0][0] is None:
                steps.pop(0)[1](None, None)
            if not steps:
                server.pool.release(server)
                if then:
                    then(True)
                return
            server.run(steps.pop(0)[0], step)
        step()


_SSL_HEAD = b"\x20\x00\x00\x01"   # a 32-byte packet with sequence id 1: an SSLRequest


class _Unresettable(Exception):
    """The connection's character set cannot be restored after a reset."""


_HANDLERS = {
    p.COM_QUIT: ClientSession._com_quit,
    p.COM_PING: ClientSession._com_ping,
    p.COM_QUERY: ClientSession._com_query,
    p.COM_PROCESS_KILL: ClientSession._com_process_kill,
    p.COM_SET_OPTION: ClientSession._com_set_option,
    p.COM_RESET_CONNECTION: ClientSession._com_reset_connection,
    p.COM_CHANGE_USER: ClientSession._com_change_user,
    p.COM_STMT_PREPARE: ClientSession._com_stmt_prepare,
    p.COM_STMT_EXECUTE: ClientSession._com_stmt_execute,
    p.COM_STMT_SEND_LONG_DATA: ClientSession._com_stmt_long_data,
    p.COM_STMT_RESET: ClientSession._com_stmt_reset,
    p.COM_STMT_FETCH: ClientSession._com_stmt_fetch,
    p.COM_STMT_CLOSE: ClientSession._com_stmt_close,
}
