"""A MySQL client's login to the proxy (the proxy acting as the server), sans-IO.

`ClientLogin` returns what to send the client and is fed what the client sends:

    login = ClientLogin(account=accounts.get, server_version="8.0.36", ...)
    send(login.greeting(connection_id))
    while not (login.done or login.failure):
        out = login.receive_data(recv())      # raises ProtocolViolation on a malformed packet
        send(out)
        if login.need_tls:                    # after the client's SSLRequest
            start_tls(); login.tls_started()
    login.failure   # the ERR to send (now, or after a delay when `denied`), and why
    send(login.send(p.OkPacket(...).build(login.capabilities)))   # once the caller agrees

It sends HandshakeV10, reads the SSLRequest and the HandshakeResponse, switches the client
to the account's method (mysql_native_password, caching_sha2_password, or
mysql_clear_password for IAM tokens over TLS) with an AuthSwitchRequest, runs
caching_sha2_password's fast auth and full auth (the password in clear over TLS, else
RSA-encrypted with the proxy's key), and checks the answer against the account.
`change_user()` runs the same exchange for COM_CHANGE_USER (always switching, with a
fresh nonce). An unknown user goes through the default method and the same answers as a
wrong password. What it needs from outside comes as callables: the account lookup, the
transport policy, the throttle, the IAM token check and the RSA key pair.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Callable

from ...auth import mysql as auth
from ...auth.iam import TokenError
from ...core.login import DONE, TLS, LoginMachine
from . import protocol as p
from .clientstate import ER_ACCESS_DENIED, ER_SECURE_TRANSPORT, OK_STATUS, err

__all__ = ["ClientLogin", "LoginFailure", "MAX_AUTH_PACKET", "PROXY_CAPABILITIES"]

MAX_AUTH_PACKET = 64 * 1024

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

_FAST_AUTH_SUCCESS = bytes((auth.CACHING_SHA2_FAST_AUTH_SUCCESS,))
_PERFORM_FULL_AUTH = bytes((auth.CACHING_SHA2_PERFORM_FULL_AUTH,))
_REQUEST_PUBLIC_KEY = bytes((auth.CACHING_SHA2_REQUEST_PUBLIC_KEY,))
_NOT_CHECKED = "too many failed logins from this address: not checked"

# Login states
_GREETING, _HANDSHAKE, _TLS, _AUTH, _DONE, _FAILED = (
    "greeting", "handshake", TLS, "auth", DONE, "failed")


@dataclass(slots=True)
class LoginFailure:
    """How a login ends without success: `packet` is the framed ERR to send, then close.
    `denied`: the credentials were checked and refused (or not checked, throttled); the
    caller counts it, throttles the address and may hold the answer back. Otherwise the
    login was refused outright (no TLS where it is required)."""

    packet: bytes
    reason: str
    denied: bool
    with_password: bool = False


def _allow_all() -> bool:
    return True


class ClientLogin(LoginMachine):
    """One client's login (or COM_CHANGE_USER); see the module docstring for the loop.

    `account(user)` returns the account (its `plugin`, `iam_auth` and
    `credentials.password`) or None. `admit()` says whether this transport may log in
    (False: refused with ER_SECURE_TRANSPORT); `may_check()` whether the throttle lets a
    password be checked now. `check_token(token, user)` verifies an IAM token, raising
    TokenError. `rsa()` returns the proxy's RsaKeyPair (made when first needed).
    `client_host` goes into "Access denied for user 'u'@'host'".
    """

    def __init__(self, *, account: Callable, server_version: str = "",
                 server_capabilities: int = PROXY_CAPABILITIES, tls_available: bool = False,
                 default_plugin: str = auth.MYSQL_NATIVE_PASSWORD, client_host: str = "",
                 admit: Callable[[], bool] = _allow_all,
                 may_check: Callable[[], bool] = _allow_all,
                 check_token: Callable[[str, str], object] | None = None,
                 rsa: Callable[[], auth.RsaKeyPair] | None = None,
                 nonce: Callable[[], bytes] = auth.generate_nonce, tls: bool = False,
                 max_payload: int = MAX_AUTH_PACKET):
        self._account_of = account
        self.server_version = server_version
        caps = (PROXY_CAPABILITIES & server_capabilities) | _ALWAYS
        if tls_available:
            caps |= p.CLIENT_SSL
        self.offered = caps
        self.default_plugin = default_plugin
        self.client_host = client_host
        self._admit = admit
        self._may_check = may_check
        self._check_token = check_token
        self._rsa = rsa
        self._new_nonce = nonce
        self.tls = tls
        self.max_payload = max_payload
        self._reader: p.PacketReader | None = None
        self.state = _GREETING
        self.nonce = b""
        self.plugin = ""
        self.used_token = False   # the cleartext password was an IAM token
        self.account = None
        self.changing_user = False
        # What the client asked for; `user` is None until a HandshakeResponse is accepted.
        self.user: str | None = None
        self.database = ""
        self.charset = p.CHARSET_UTF8MB4
        self.capabilities = 0          # negotiated (what the client asked for, within offered)
        self.failure: LoginFailure | None = None
        self._sha2_step = None         # "full" or "rsa" during caching_sha2 full auth
        self._seq = 0                  # next sequence id to send
        # Waiting for a packet from the client: an ERR sent now answers that packet.
        self._awaiting_client = False

    @property
    def error_seq(self) -> int:
        """The sequence id of an ERR sent now: while the proxy waits for the client (the
        greeting or a method switch sent), the client reads it only after sending its
        packet, so it answers that packet (a client checks: PyMySQL raises "Packet
        sequence number wrong" otherwise)."""
        return (self._seq + 1) & 0xFF if self._awaiting_client else self._seq

    def send(self, payload: bytes) -> bytes:
        """`payload` framed with the next sequence id (the final OK goes out this way)."""
        data = p.packet(self._seq, payload)
        self._seq = (self._seq + 1) & 0xFF
        self._awaiting_client = True
        return data

    # -- the start ------------------------------------------------------------------------
    def greeting(self, connection_id: int) -> bytes:
        """The HandshakeV10 that opens the connection (sequence id 0)."""
        self.nonce = self._new_nonce()
        hs = p.Handshake(server_version=self.server_version, connection_id=connection_id,
                         auth_plugin_data=self.nonce, capabilities=self.offered,
                         charset=p.CHARSET_UTF8MB4, status_flags=OK_STATUS,
                         auth_plugin_name=self.default_plugin)
        self.state = _HANDSHAKE
        return self.send(hs.build())

    def change_user(self, payload: bytes, capabilities: int, seq: int, charset: int) -> bytes:
        """COM_CHANGE_USER (`payload`, answered from sequence id `seq`) on a session with the
        negotiated `capabilities` and `charset`; returns the AuthSwitchRequest to send.
        Raises ProtocolViolation on a malformed packet."""
        change = p.ChangeUser.parse(payload, capabilities)
        self.changing_user = True
        self.capabilities = capabilities
        self._seq = seq
        self.user = change.username
        self.database = change.database
        self.charset = change.charset & 0xFF if change.charset else charset
        # Always switch: fresh nonce, the account's method (as MariaDB does).
        return self._begin_auth("", b"")

    def tls_started(self) -> None:
        """Call once TLS is up after `need_tls`: the HandshakeResponse comes over it."""
        if self.state != _TLS:
            raise RuntimeError("tls_started() called when no TLS upgrade was pending")
        self.tls = True
        self.state = _HANDSHAKE

    # -- packets from the client ----------------------------------------------------------
    def receive_data(self, data: bytes) -> bytes:
        """Bytes from the client; returns the bytes to send (possibly empty). Packets after
        a TLS request or the end of the login are left unread."""
        if self._reader is None:
            self._reader = p.PacketReader(self.max_payload)
        out = []
        for seq, payload in self._reader.feed(data):
            out.append(self.receive_packet(seq, payload))
            if self.state in (_TLS, _DONE, _FAILED):
                break
        return b"".join(out)

    def receive_packet(self, seq: int, payload: bytes) -> bytes:
        """One packet from the client; returns the bytes to send (possibly empty)."""
        self._seq = (seq + 1) & 0xFF
        self._awaiting_client = False
        state = self.state
        if state == _HANDSHAKE:
            if p.HandshakeResponse.is_ssl_request(payload):
                self._awaiting_client = True   # its handshake response comes over TLS
                self.state = _TLS
                return b""
            return self._on_handshake_response(p.HandshakeResponse.parse(payload))
        if state != _AUTH:
            raise RuntimeError(f"a client packet arrived in the login state {state!r}")
        if self._sha2_step is not None:
            return self._on_sha2_packet(payload)
        return self._verify(payload)

    def _on_handshake_response(self, resp: p.HandshakeResponse) -> bytes:
        if not self._admit():
            return self._refuse(ER_SECURE_TRANSPORT, "Connections using insecure transport "
                                                     "are prohibited: this proxy requires TLS", "")
        self.capabilities = resp.capabilities & self.offered & ~p.CLIENT_SSL
        if not resp.capabilities & p.CLIENT_PLUGIN_AUTH:
            self.capabilities &= ~p.CLIENT_PLUGIN_AUTH
        self.user = resp.username
        self.database = resp.database or "" if resp.capabilities & p.CLIENT_CONNECT_WITH_DB else ""
        self.charset = resp.charset or p.CHARSET_UTF8MB4
        return self._begin_auth(resp.auth_plugin_name, resp.auth_response)

    def _begin_auth(self, client_plugin: str, response: bytes) -> bytes:
        account = self.account = self._account_of(self.user)
        iam = account.iam_auth if account is not None else "DISABLED"
        if iam == "REQUIRED" and not self.tls:
            return self._refuse(ER_ACCESS_DENIED, f"IAM authentication for user '{self.user}' "
                                                  "requires TLS", "IAM authentication needs TLS")
        if iam != "DISABLED" and self.tls:
            plugin = auth.MYSQL_CLEAR_PASSWORD
        else:
            plugin = account.plugin if account is not None else self.default_plugin
        self.plugin = plugin
        self.state = _AUTH
        if client_plugin == plugin and plugin != auth.MYSQL_CLEAR_PASSWORD and not self.changing_user:
            return self._verify(response)
        # Ask for the method this account uses, with a fresh nonce.
        self.nonce = self._new_nonce()
        data = b"" if plugin == auth.MYSQL_CLEAR_PASSWORD else self.nonce + b"\x00"
        return self.send(p.AuthSwitchRequest(plugin, data).build())

    # -- checking ---------------------------------------------------------------------------
    def _verify(self, response: bytes) -> bytes:
        if not self._may_check():
            return self._deny(_NOT_CHECKED, bool(response))
        account = self.account
        password = account.credentials.password if account is not None else None
        plugin = self.plugin
        out = b""
        if plugin == auth.MYSQL_NATIVE_PASSWORD:
            ok = password is not None and auth.native_password_verify(password, self.nonce, response)
        elif plugin == auth.CACHING_SHA2_PASSWORD:
            if password and not response:
                # No scramble to check: ask for the password itself (over TLS in clear,
                # otherwise RSA-encrypted with the proxy's key). A scramble the proxy can
                # verify is enough, from the first login on: it knows the password.
                self._sha2_step = "full"
                return self.send(p.AuthMoreData(_PERFORM_FULL_AUTH).build())
            ok = password is not None and auth.caching_sha2_verify(password, self.nonce, response)
            if ok and password:
                out = self.send(p.AuthMoreData(_FAST_AUTH_SUCCESS).build())
        else:
            try:
                ok = account is not None and self._check_cleartext(account, auth.parse_clear_password(response))
            except TokenError as exc:
                return self._deny(str(exc), bool(response))
        if not ok:
            return self._deny("no such user" if account is None else "wrong password", bool(response))
        self.state = _DONE
        return out

    def _on_sha2_packet(self, payload: bytes) -> bytes:
        if not self._may_check():
            return self._deny(_NOT_CHECKED, True)
        if self._sha2_step == "full" and payload == _REQUEST_PUBLIC_KEY:
            self._sha2_step = "rsa"
            return self.send(p.AuthMoreData(self._rsa().public_key_pem).build())
        if self.tls and self._sha2_step == "full":
            password = auth.parse_clear_password(payload)
        elif not self.tls:
            try:
                password = self._rsa().decrypt_password(payload, self.nonce)
            except Exception:  # noqa: BLE001 - garbage is a failed login
                password = None
        else:
            password = None
        self._sha2_step = None
        expected = self.account.credentials.password.encode("utf-8")
        if password is None or not hmac.compare_digest(password, expected):
            return self._deny("wrong password (caching_sha2_password full authentication)", True)
        self.state = _DONE
        return b""

    def _check_cleartext(self, account, response: bytes) -> bool:
        text = response.decode("utf-8", "replace")
        if account.iam_auth == "REQUIRED" or ("/?" in text and "X-Amz-" in text):
            if self._check_token is None:
                raise TokenError("IAM token rejected: IAM authentication is not set up")
            try:
                self._check_token(text, self.user)
            except TokenError as exc:
                raise TokenError(f"IAM token rejected: {exc}") from None
            self.used_token = True
            return True
        return hmac.compare_digest(response, account.credentials.password.encode("utf-8"))

    @property
    def auth_method(self) -> str:
        """How the client proved itself, for the login line: its plugin, or "iam"."""
        return "iam" if self.used_token else self.plugin

    # -- endings ------------------------------------------------------------------------------
    def _deny(self, reason: str, with_password: bool) -> bytes:
        text = (f"Access denied for user '{self.user}'@'{self.client_host}' (using password: "
                f"{'YES' if with_password else 'NO'})")
        return self._fail(LoginFailure(p.packet(self._seq, err(ER_ACCESS_DENIED, text)), reason,
                                       True, with_password))

    def _refuse(self, code_state, text: str, reason: str) -> bytes:
        return self._fail(LoginFailure(p.packet(self._seq, err(code_state, text)), reason, False))

    def _fail(self, failure: LoginFailure) -> bytes:
        self.state = _FAILED
        self.failure = failure
        return b""
