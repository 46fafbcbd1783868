"""The proxy's login to a MySQL / MariaDB server (the server leg), sans-IO.

`ServerLogin` is fed what the server sends and returns what to send back:

    login = ServerLogin("app", "secret", "appdb", tls="require")
    while not login.done:
        out = login.receive_data(sock.recv(65536))   # raises ServerError / LoginError
        if out:
            sock.sendall(out)
        if login.need_tls:                           # after the SSLRequest went out
            sock = ssl_context.wrap_socket(sock, server_hostname=host)
            sock.sendall(login.tls_started())
    login.result   # negotiated capabilities, server version and connection id, status flags

It handles HandshakeV10 (MySQL 8 and MariaDB), the SSLRequest step, mysql_native_password,
caching_sha2_password (fast auth; full auth in clear over TLS, or by RSA on a plaintext
connection with the server's key, asked for if not given), AuthSwitchRequest to any of
those, and mysql_clear_password (refused without TLS unless allowed). A server ERR raises
`ServerError` (its code, SQLSTATE and message, e.g. 1045 for a wrong password); anything
this side refuses raises `LoginError`; a malformed packet raises `ProtocolViolation`.

`ChangeUserLogin` runs the same auth exchange for COM_CHANGE_USER on an established
connection (re-authenticating and resetting the session).
"""
from __future__ import annotations

from dataclasses import dataclass

from ...auth import mysql as auth
from ...core.login import DONE, TLS, LoginMachine
from . import protocol as p
from .protocol import ProtocolViolation, ServerError

__all__ = ["ServerLogin", "ChangeUserLogin", "LoginResult", "LoginError",
           "DEFAULT_CAPABILITIES", "REQUIRED_CAPABILITIES", "SUPPORTED_PLUGINS"]

# What the proxy asks a server for by default. CLIENT_FOUND_ROWS, CLIENT_LOCAL_FILES,
# CLIENT_IGNORE_SPACE, CLIENT_INTERACTIVE and MariaDB's extended capabilities change what
# the server does for a session, so they are only sent when asked for.
DEFAULT_CAPABILITIES = (
    p.CLIENT_LONG_PASSWORD | p.CLIENT_LONG_FLAG | p.CLIENT_PROTOCOL_41 | p.CLIENT_TRANSACTIONS
    | p.CLIENT_SECURE_CONNECTION | p.CLIENT_MULTI_STATEMENTS | p.CLIENT_MULTI_RESULTS
    | p.CLIENT_PS_MULTI_RESULTS | p.CLIENT_PLUGIN_AUTH | p.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
    | p.CLIENT_CONNECT_ATTRS | p.CLIENT_SESSION_TRACK | p.CLIENT_DEPRECATE_EOF
)
# Sent whatever the caller asks for: this module only speaks the 4.1 protocol with plugins.
REQUIRED_CAPABILITIES = p.CLIENT_PROTOCOL_41 | p.CLIENT_SECURE_CONNECTION | p.CLIENT_PLUGIN_AUTH

SUPPORTED_PLUGINS = (auth.MYSQL_NATIVE_PASSWORD, auth.CACHING_SHA2_PASSWORD,
                     auth.MYSQL_CLEAR_PASSWORD)

_TLS_MODES = ("disable", "prefer", "require")

# Login states
_HANDSHAKE, _TLS, _AUTH, _DONE, _FAILED = "handshake", TLS, "auth", DONE, "failed"


class LoginError(Exception):
    """This side cannot or will not complete the login (no TLS when required, an auth
    plugin it does not support, cleartext without TLS, no public key, ...)."""


@dataclass(slots=True)
class LoginResult:
    """What a successful login established."""

    server_version: str           # as sent (MariaDB's starts with "5.5.5-")
    version: str                  # without MariaDB's "5.5.5-" prefix
    is_mariadb: bool
    connection_id: int            # the server's thread id (what KILL takes)
    capabilities: int             # negotiated: what we sent, within what the server offers
    server_capabilities: int
    status_flags: int             # from the final OK packet
    charset: int
    auth_plugin: str              # the plugin that finished the exchange
    tls: bool
    ok: p.OkPacket
    handshake: p.Handshake | None


class _AuthExchange(LoginMachine):
    """The auth phase shared by the first login and COM_CHANGE_USER: OK, ERR,
    AuthSwitchRequest and AuthMoreData until the server says OK."""

    def __init__(self, user: str, password: str | bytes, *, tls_active: bool,
                 server_public_key: bytes | str | None, allow_public_key_retrieval: bool,
                 allow_cleartext: bool, max_payload: int):
        self.user = user
        self._password = password
        self.tls_active = tls_active
        self.server_public_key = server_public_key
        self.allow_public_key_retrieval = allow_public_key_retrieval
        self.allow_cleartext = allow_cleartext
        self.capabilities = 0
        self.plugin = auth.MYSQL_NATIVE_PASSWORD
        self.nonce = b""
        self.state = _AUTH
        self.ok: p.OkPacket | None = None
        self.error: Exception | None = None
        self.reader = p.PacketReader(max_payload)
        # Packets that arrived in the same read after the login finished (or before TLS
        # started); a server sends none unasked, but nothing is dropped silently.
        self.leftover: list[tuple[int, bytes]] = []
        self._seq = 0                      # next sequence id to send
        self._awaiting_key = False

    @property
    def failed(self) -> bool:
        return self.state == _FAILED

    def _send(self, payload: bytes) -> bytes:
        data = p.packet(self._seq, payload)
        self._seq = p.seq_after(self._seq, len(payload))
        return data

    def receive_data(self, data: bytes) -> bytes:
        """Bytes from the server; returns the bytes to send (possibly empty)."""
        out = []
        packets = self.reader.feed(data)
        for i, (seq, payload) in enumerate(packets):
            out.append(self.receive_packet(seq, payload))
            if self.state in (_DONE, _TLS):
                self.leftover.extend(packets[i + 1:])
                break
        return b"".join(out)

    def receive_packet(self, seq: int, payload: bytes) -> bytes:
        """One server packet; returns the bytes to send (possibly empty)."""
        if self.state in (_DONE, _FAILED):
            raise LoginError(f"login already {self.state}")
        if self.state == _TLS:
            raise LoginError("a packet arrived before TLS was started (call tls_started())")
        self._seq = p.seq_after(seq, len(payload))
        try:
            return self._packet(payload)
        except BaseException as exc:
            self.state = _FAILED
            self.error = exc
            raise

    def _packet(self, payload: bytes) -> bytes:
        return self._auth_packet(payload)

    # -- the auth phase -------------------------------------------------------------------

    def _auth_packet(self, payload: bytes) -> bytes:
        if not payload:
            raise ProtocolViolation("empty packet from the server during authentication")
        head = payload[0]
        if head == p.OK_HEADER:
            self.ok = p.OkPacket.parse(payload, self.capabilities)
            self.state = _DONE
            self._finished()
            return b""
        if head == p.ERR_HEADER:
            raise ServerError(p.ErrPacket.parse(payload, self.capabilities),
                              f"login as {self.user!r} failed")
        if head == p.AUTH_SWITCH_HEADER:
            switch = p.AuthSwitchRequest.parse(payload)
            self.plugin = switch.plugin_name
            self.nonce = switch.nonce
            self._awaiting_key = False
            return self._send(self._response(self.plugin, self.nonce))
        if head == p.AUTH_MORE_DATA_HEADER:
            return self._more_data(p.AuthMoreData.parse(payload).data)
        raise ProtocolViolation(f"unexpected packet 0x{head:02x} during authentication")

    def _finished(self) -> None:
        pass

    def _response(self, plugin: str, nonce: bytes) -> bytes:
        """The auth response `plugin` sends first."""
        if plugin == auth.MYSQL_NATIVE_PASSWORD:
            return auth.native_password_response(self._password, nonce)
        if plugin == auth.CACHING_SHA2_PASSWORD:
            return auth.caching_sha2_response(self._password, nonce)
        if plugin == auth.MYSQL_CLEAR_PASSWORD:
            if not (self.tls_active or self.allow_cleartext):
                raise LoginError("the server asked for mysql_clear_password on a connection "
                                 "without TLS; refusing to send the password in clear")
            return auth.clear_password_response(self._password)
        raise LoginError(f"the server asked for the auth plugin {plugin!r}; supported: "
                         f"{', '.join(SUPPORTED_PLUGINS)}")

    def _more_data(self, data: bytes) -> bytes:
        if self.plugin != auth.CACHING_SHA2_PASSWORD:
            raise ProtocolViolation(f"unexpected AuthMoreData for the {self.plugin} plugin")
        if self._awaiting_key:
            self._awaiting_key = False
            return self._send(self._encrypted(data))
        if data == bytes((auth.CACHING_SHA2_FAST_AUTH_SUCCESS,)):
            return b""                      # the OK follows
        if data != bytes((auth.CACHING_SHA2_PERFORM_FULL_AUTH,)):
            raise ProtocolViolation(f"unexpected caching_sha2_password data {data[:16]!r}")
        # Full authentication: the server needs the password itself.
        if self.tls_active:
            return self._send(auth.clear_password_response(self._password))
        if self.server_public_key:
            return self._send(self._encrypted(self.server_public_key))
        if not self.allow_public_key_retrieval:
            raise LoginError("caching_sha2_password full authentication on a connection "
                             "without TLS needs the server's RSA public key; none was given "
                             "and public key retrieval is disabled")
        self._awaiting_key = True
        return self._send(bytes((auth.CACHING_SHA2_REQUEST_PUBLIC_KEY,)))

    def _encrypted(self, public_key_pem: bytes | str) -> bytes:
        try:
            return auth.rsa_encrypt_password(self._password, self.nonce, public_key_pem)
        except ValueError as exc:
            raise LoginError(f"caching_sha2_password RSA exchange failed: {exc}") from None


class ServerLogin(_AuthExchange):
    """Logs in to a server as `user`; see the module docstring for the loop.

    `capabilities`: what to ask for (DEFAULT_CAPABILITIES by default); the negotiated set
    is this within what the server offers, plus REQUIRED_CAPABILITIES, CLIENT_CONNECT_WITH_DB
    when a database is given and CLIENT_SSL with TLS. MariaDB extended capabilities (bits
    32..63) are only negotiated with a MariaDB server.
    `tls`: "disable", "prefer" (TLS when the server offers it) or "require" (LoginError when
    it does not); True means "require". The caller does the TLS handshake when `need_tls`.
    `server_public_key`: the server's RSA public key (PEM), for caching_sha2_password full
    authentication without TLS; without it the key is asked from the server when
    `allow_public_key_retrieval` (as PyMySQL does; a man in the middle could substitute its
    own key, so use TLS or pin the key where that matters).
    `allow_cleartext`: allow mysql_clear_password without TLS.
    """

    def __init__(self, user: str, password: str | bytes = "", database: str | None = None, *,
                 capabilities: int = DEFAULT_CAPABILITIES, tls: str | bool = "disable",
                 charset: int = p.CHARSET_UTF8MB4, connect_attrs: dict[str, str] | None = None,
                 max_packet_size: int = 1 << 24, server_public_key: bytes | str | None = None,
                 allow_public_key_retrieval: bool = True, allow_cleartext: bool = False,
                 max_payload: int = p.DEFAULT_MAX_PAYLOAD):
        super().__init__(user, password, tls_active=False, server_public_key=server_public_key,
                         allow_public_key_retrieval=allow_public_key_retrieval,
                         allow_cleartext=allow_cleartext, max_payload=max_payload)
        if tls is True:
            tls = "require"
        elif tls is False or tls is None:
            tls = "disable"
        if tls not in _TLS_MODES:
            raise ValueError(f"tls must be one of {_TLS_MODES}, not {tls!r}")
        self.tls_mode = tls
        self.database = database
        self.requested_capabilities = capabilities
        self.charset = charset
        self.connect_attrs = dict(connect_attrs if connect_attrs is not None
                                  else {"_client_name": "rdsproxy"})
        self.max_packet_size = max_packet_size
        self.handshake: p.Handshake | None = None
        self.result: LoginResult | None = None
        self.state = _HANDSHAKE

    def _packet(self, payload: bytes) -> bytes:
        if self.state == _HANDSHAKE:
            return self._on_handshake(payload)
        return self._auth_packet(payload)

    def _on_handshake(self, payload: bytes) -> bytes:
        hs = self.handshake = p.Handshake.parse(payload)
        server = hs.capabilities
        if not server & p.CLIENT_PROTOCOL_41 or not server & p.CLIENT_SECURE_CONNECTION:
            raise LoginError(f"server {hs.server_version!r} does not speak the 4.1 protocol "
                             "with secure authentication")
        want = self.requested_capabilities | REQUIRED_CAPABILITIES
        if self.database:
            want |= p.CLIENT_CONNECT_WITH_DB
        else:
            want &= ~p.CLIENT_CONNECT_WITH_DB
        if not self.connect_attrs:
            want &= ~p.CLIENT_CONNECT_ATTRS
        # Compression, optional metadata and query attributes are not spoken here.
        want &= p.SUPPORTED_CAPABILITIES & ~p.CLIENT_SSL
        # Bit 0 is CLIENT_LONG_PASSWORD to MySQL and CLIENT_MYSQL to MariaDB, whose server
        # clears it; keep it as asked for rather than masking it with the server's.
        caps = want & 0xFFFFFFFF & (server | p.CLIENT_LONG_PASSWORD)
        if not server & p.CLIENT_PLUGIN_AUTH:
            caps &= ~(p.CLIENT_PLUGIN_AUTH | p.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA)
        ext = (want & server) >> 32 if not server & p.CLIENT_MYSQL else 0
        if ext:
            caps = (caps & ~p.CLIENT_MYSQL) | (ext << 32)
        use_tls = False
        if self.tls_mode != "disable":
            if server & p.CLIENT_SSL:
                use_tls = True
                caps |= p.CLIENT_SSL
            elif self.tls_mode == "require":
                raise LoginError(f"TLS is required but the server {hs.server_version!r} does "
                                 "not offer it (have_ssl is off?)")
        self.capabilities = caps
        self.nonce = hs.auth_plugin_data
        plugin = hs.auth_plugin_name
        # An unknown default plugin: answer with mysql_native_password and let the server
        # switch to the user's own plugin (as libmysqlclient does).
        self.plugin = plugin if plugin in (auth.MYSQL_NATIVE_PASSWORD,
                                           auth.CACHING_SHA2_PASSWORD) else auth.MYSQL_NATIVE_PASSWORD
        if use_tls:
            self.state = _TLS
            return self._send(p.HandshakeResponse(
                capabilities=caps, charset=self.charset, max_packet_size=self.max_packet_size,
                ssl_request=True).build())
        self.state = _AUTH
        return self._send(self._handshake_response())

    def tls_started(self) -> bytes:
        """Call once TLS is up after `need_tls`; returns the HandshakeResponse to send."""
        if self.state != _TLS:
            raise LoginError("tls_started() called when no TLS upgrade was pending")
        self.tls_active = True
        self.state = _AUTH
        return self._send(self._handshake_response())

    def _handshake_response(self) -> bytes:
        caps = self.capabilities
        response = self._response(self.plugin, self.nonce)
        if len(response) > 250 and not caps & p.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
            raise LoginError("auth response too long for a server without "
                             "CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA")
        return p.HandshakeResponse(
            capabilities=caps, username=self.user, auth_response=response,
            database=self.database, auth_plugin_name=self.plugin, charset=self.charset,
            max_packet_size=self.max_packet_size, connect_attrs=self.connect_attrs).build()

    def _finished(self) -> None:
        hs = self.handshake
        self.result = LoginResult(
            server_version=hs.server_version, version=hs.version, is_mariadb=hs.is_mariadb,
            connection_id=hs.connection_id, capabilities=self.capabilities,
            server_capabilities=hs.capabilities, status_flags=self.ok.status_flags,
            charset=self.charset, auth_plugin=self.plugin, tls=self.tls_active, ok=self.ok,
            handshake=hs)


class ChangeUserLogin(_AuthExchange):
    """COM_CHANGE_USER on an established connection: start() returns the command packet,
    then feed the server's answer to receive_data() / receive_packet() until `done`.

    `nonce` is the connection's handshake nonce (LoginResult.handshake.auth_plugin_data),
    which the first response is computed with; `capabilities` the negotiated ones;
    `tls_active` whether the connection runs over TLS; `plugin` the method of that first
    response (the server switches if the user has another; MariaDB always answers with an
    AuthSwitchRequest and a new nonce). On success `ok` is the server's OK packet (its
    status flags describe the fresh session). On failure the server sends ERR 1045
    (raised as ServerError); MariaDB 10.11 then keeps the connection open as the previous
    user, after a one-second delay.
    """

    def __init__(self, user: str, password: str | bytes = "", database: str | None = None, *,
                 nonce: bytes, capabilities: int, tls_active: bool = False,
                 plugin: str = auth.MYSQL_NATIVE_PASSWORD, charset: int = p.CHARSET_UTF8MB4,
                 connect_attrs: dict[str, str] | None = None,
                 server_public_key: bytes | str | None = None,
                 allow_public_key_retrieval: bool = True, allow_cleartext: bool = False,
                 max_payload: int = p.DEFAULT_MAX_PAYLOAD):
        super().__init__(user, password, tls_active=tls_active,
                         server_public_key=server_public_key,
                         allow_public_key_retrieval=allow_public_key_retrieval,
                         allow_cleartext=allow_cleartext, max_payload=max_payload)
        self.capabilities = capabilities
        self.nonce = bytes(nonce)
        self.plugin = plugin
        self.database = database or ""
        self.charset = charset
        self.connect_attrs = dict(connect_attrs if connect_attrs is not None
                                  else {"_client_name": "rdsproxy"})
        self._started = False

    def _packet(self, payload: bytes) -> bytes:
        if not self._started:
            raise LoginError("a packet arrived before start()")
        return self._auth_packet(payload)

    def start(self) -> bytes:
        """The COM_CHANGE_USER packet (sequence id 0)."""
        if self._started:
            raise LoginError("start() called twice")
        self._started = True
        self._seq = 0
        return self._send(p.ChangeUser(
            username=self.user, auth_response=self._response(self.plugin, self.nonce),
            database=self.database, charset=self.charset, auth_plugin_name=self.plugin,
            connect_attrs=self.connect_attrs).build(self.capabilities))
