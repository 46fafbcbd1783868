"""PostgreSQL logins, sans-IO: the proxy facing a client (ClientLogin) and facing a server (ServerLogin).

`ClientLogin` takes a client's bytes and returns events, one at a time:

    login = ClientLogin(engine.login_account, engine.random_bytes, tls_offered=True)
    login.receive_data(data)
    while (event := login.next_event()) is not None:   # None: it needs more bytes
        Reply           -> send event.data
        TlsRequested    -> send TLS_ACCEPTED, do the handshake, then login.tls_started()
        CancelRequested -> forward the cancel (event.pid, event.secret); the login ends
        StartupReceived -> admit the session or refuse it; send login.begin(user)
        PasswordReceived-> unless throttled (event.checked: a password is checked now),
                           send login.check(event.payload), which raises AuthFailed; once
                           login.state is LOGIN the client is authenticated: send
                           login.finish(...) with the greeting, then relay
                           login.trailing_data()

A malformed packet raises protocol.ProtocolViolation (its SQLSTATE is the client's answer).
Users who cannot log in get a decoy account from `account_for` and go through the same
exchange to the same failure. `state` follows contract's PG_CLIENT_* values, which the
session mirrors for the relay.

`ServerLogin` is the proxy logging in to PostgreSQL: start() gives the first bytes (an
SSLRequest when TLS is wanted: pass the one-byte answer to tls_answer(), do the handshake,
send tls_started()); receive_data() returns what to send back until `done`. A refusal or a
failed exchange raises protocol.ServerError.
"""
from __future__ import annotations

import hmac
import re
import struct

from ..._fastpath import FramingError, split_messages
from ..._fastpath.contract import (
    PG_CLIENT_AUTH_CLEARTEXT as AUTH_CLEARTEXT,
    PG_CLIENT_AUTH_MD5 as AUTH_MD5,
    PG_CLIENT_AUTH_SASL_FINAL as AUTH_SASL_FINAL,
    PG_CLIENT_AUTH_SASL_FIRST as AUTH_SASL_FIRST,
    PG_CLIENT_CLOSED as CLOSED,
    PG_CLIENT_LOGIN as LOGIN,
    PG_CLIENT_READY as READY,
    PG_CLIENT_STARTUP as STARTUP,
)
from ..._fastpath.pgwire import MSG_PASSWORD
from ...auth.iam import TokenError
from ...auth.md5 import md5_response, md5_verify
from ...auth.scram import ScramClient, ScramError, ScramServer
from ...core.login import DONE, TLS, LoginMachine
from . import protocol as pg
from .accounts import CLEARTEXT, SCRAM, login_method
from .protocol import ProtocolViolation, ServerError

TLS_ACCEPTED = b"S"    # the answer to an SSLRequest when TLS follows
TLS_DECLINED = b"N"    # ... and when the startup packet follows in the clear

# Startup parameters the proxy carries from client to whichever connection it borrows.
TRACKED_PARAMETERS = {
    "application_name": "application_name", "client_encoding": "client_encoding",
    "datestyle": "DateStyle", "timezone": "TimeZone", "intervalstyle": "IntervalStyle",
    "extra_float_digits": "extra_float_digits", "search_path": "search_path",
    "standard_conforming_strings": "standard_conforming_strings",
}
# Startup keys that are not server settings.
STARTUP_KEYWORDS = {"user", "database", "options", "replication"}

# What PostgreSQL accepts as a setting name in a startup packet: a simple identifier for
# its own settings, two or more of them joined by dots for a custom one.
_SETTING_NAME_PART = re.compile(r"[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_$\x80-\U0010ffff]*")

MAX_AUTH_MESSAGE = 65536


def check_setting_name(name: str) -> None:
    """Refuse a startup parameter name as PostgreSQL would: it only ever reaches the server
    quoted, but a name PostgreSQL refuses must not start a session here either."""
    parts = name.split(".")
    if len(parts) == 1:
        if not _SETTING_NAME_PART.fullmatch(name):
            raise ProtocolViolation(f'unrecognized configuration parameter "{name}"', "42704")
    elif not all(_SETTING_NAME_PART.fullmatch(part) for part in parts):
        raise ProtocolViolation(
            f'invalid configuration parameter name "{name}"', "42602",
            detail="Custom parameter names must be two or more simple identifiers separated by dots.")


def startup_session(params: dict) -> tuple:
    """What a startup packet's parameters mean for the session:
    (user, database, options, pool key, tracked parameters as sorted (name, value) pairs)."""
    user = params.get("user", "")
    if not user:
        raise ProtocolViolation("no PostgreSQL user name specified in startup packet", "28000")
    if params.get("replication", "false").lower() not in ("false", "off", "no", "0"):
        raise ProtocolViolation("replication connections are not supported by the proxy", "0A000")
    database = params.get("database") or user
    options = params.get("options", "").strip()
    desired = {}
    for name, value in params.items():
        canonical = TRACKED_PARAMETERS.get(name.lower())
        if canonical is not None:
            desired[canonical] = value
        elif name not in STARTUP_KEYWORDS and not name.startswith("_pq_."):
            # Any other setting is a session parameter the server would apply: carry it too.
            check_setting_name(name)
            desired[name] = value
    return user, database, options, (user, database, options), tuple(sorted(desired.items()))


# -- the client's login -------------------------------------------------------------------

class Reply:
    """Bytes for the client; the login goes on."""
    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data


class TlsRequested:
    """The client asks for TLS, which is offered: answer TLS_ACCEPTED, upgrade, tls_started()."""
    __slots__ = ()


class CancelRequested:
    """A CancelRequest instead of a login."""
    __slots__ = ("pid", "secret")

    def __init__(self, pid: int, secret: int):
        self.pid = pid
        self.secret = secret


class StartupReceived:
    """A startup packet: `raw` as sent, `session` as startup_session() reads it, and `known`,
    what `known_packets` held for exactly these bytes (then `session` is None: not parsed)."""
    __slots__ = ("raw", "session", "known")

    def __init__(self, raw: bytes, session, known):
        self.raw = raw
        self.session = session
        self.known = known


class PasswordReceived:
    """A password message; `checked`: check() would test it against the account's secret
    (every one but a SASL initial response), so the caller may refuse to let it."""
    __slots__ = ("payload", "checked")

    def __init__(self, payload: bytes, checked: bool):
        self.payload = payload
        self.checked = checked


class AuthFailed(Exception):
    """The client did not prove who it is; `reason` is for the log only (the client hears
    28P01), and `decoy` says the account was a stand-in for a user who cannot log in."""

    def __init__(self, reason: str, decoy: bool):
        super().__init__(reason)
        self.reason = reason
        self.decoy = decoy


class ClientLogin:
    """One client's login, from its first byte to AuthenticationOk; see the module docstring.

    `account_for(user, tls)`: the Account to log `user` in with (a decoy when there is
    none); `random_bytes(n)`: md5 salts; `tls_offered`: whether an SSLRequest gets TLS;
    `known_packets`: startup packets seen before (raw bytes -> anything), looked up before
    parsing; `check_token(text, user)`: the IAM principal of a token, or TokenError.
    """

    def __init__(self, account_for, random_bytes, *, tls_offered: bool, tls: bool = False,
                 known_packets=None, check_token=None):
        self.account_for = account_for
        self.random_bytes = random_bytes
        self.tls_offered = tls_offered
        self.tls = tls
        self.known_packets = known_packets
        self.check_token = check_token
        self.state = STARTUP
        self.user = ""
        self.account = None
        self.method = ""          # how the client proved itself, for the login line
        self._salt = b""
        self._scram: ScramServer | None = None
        self._buf = bytearray()

    def receive_data(self, data) -> None:
        self._buf += data

    def trailing_data(self) -> bytes:
        """What the client sent after its login (a query right after the password)."""
        data, self._buf = bytes(self._buf), bytearray()
        return data

    def tls_started(self) -> None:
        self.tls = True

    def next_event(self):
        """The next event from the bytes received, or None until more arrive."""
        buf = self._buf
        if not buf or self.state in (CLOSED, LOGIN, READY):
            return None
        if self.state == STARTUP:
            return self._startup_event(buf)
        # One message at a time: once the login is done, what follows it stays buffered.
        if len(buf) < 5:
            return None
        length = int.from_bytes(buf[1:5], "big")
        if length > MAX_AUTH_MESSAGE:
            raise ProtocolViolation("authentication message too long")
        if length < 4:
            raise ProtocolViolation(f"invalid message length {length}")
        if len(buf) <= length:
            return None
        if buf[0] != MSG_PASSWORD:
            raise ProtocolViolation(f"expected password response, got message type {chr(buf[0])!r}")
        payload = bytes(buf[5:length + 1])
        del buf[:length + 1]
        return PasswordReceived(payload, self.state != AUTH_SASL_FIRST)

    def _startup_event(self, buf: bytearray):
        # Short-lived clients send the same startup packet again and again: what the last
        # identical one meant is the caller's to reuse.
        if self.known_packets is not None:
            known = self.known_packets.get(bytes(buf))
            if known is not None:
                raw = bytes(buf)
                buf.clear()
                return StartupReceived(raw, None, known)
        packet, used = pg.read_startup_packet(buf)
        if packet is None:
            return None
        raw = bytes(buf[:used])
        del buf[:used]
        kind = packet.kind
        if kind == "ssl" and self.tls_offered and not self.tls:
            if buf:
                # As PostgreSQL: bytes sent before our 'S' were not protected by TLS and
                # could have been injected by a man in the middle (CVE-2021-23214).
                raise ProtocolViolation("received unencrypted data after SSL request")
            return TlsRequested()
        if kind in ("ssl", "gssenc"):
            return Reply(TLS_DECLINED)
        if kind == "cancel":
            self.state = CLOSED
            return CancelRequested(packet.cancel_pid, packet.cancel_secret)
        return StartupReceived(raw, startup_session(packet.params), None)

    def begin(self, user: str) -> bytes:
        """The startup packet was accepted: the authentication request for `user`."""
        self.user = user
        # Whether the user exists or not, the client goes through the same exchange (a
        # decoy account's, for users who cannot log in) and fails the same way.
        account = self.account = self.account_for(user, self.tls)
        method = login_method(account, self.tls)
        if method == CLEARTEXT:
            # The token (or, with OPTIONAL, the password) arrives as a cleartext password,
            # protected by TLS.
            self.state = AUTH_CLEARTEXT
            return pg.authentication(pg.AUTH_CLEARTEXT)
        if method == SCRAM:
            self.method = "scram-sha-256"
            self._scram = ScramServer(account.scram_secret)
            self.state = AUTH_SASL_FIRST
            return pg.auth_sasl()
        return self.expect_md5(user, account, self.random_bytes(4))

    def expect_md5(self, user: str, account, salt: bytes) -> bytes:
        """Wait for `user`'s md5 password salted with `salt` (also where a login the
        relay's quick lane began, salt sent, continues); returns the request to send."""
        self.user = user
        self.account = account
        self._salt = salt
        self.method = "md5"
        self.state = AUTH_MD5
        return pg.authentication(pg.AUTH_MD5, salt)

    def check(self, payload: bytes) -> bytes:
        """A password message's payload; returns what to send. `state` is LOGIN once the
        client is authenticated; AuthFailed when it is not."""
        account = self.account
        try:
            if self.state == AUTH_SASL_FIRST:
                mechanism, data = pg.parse_sasl_initial_response(payload)
                if mechanism != "SCRAM-SHA-256":
                    raise ProtocolViolation(f"unsupported SASL mechanism {mechanism!r}", "28000")
                out = pg.authentication(pg.AUTH_SASL_CONTINUE, self._scram.handle_client_first(data))
                self.state = AUTH_SASL_FINAL
                return out
            if self.state == AUTH_SASL_FINAL:
                final = self._scram.handle_client_final(payload)
            elif self.state == AUTH_MD5:
                response = pg.parse_password_message(payload)
                if not md5_verify(account.credentials.password, self.user, self._salt, response):
                    raise ScramError("wrong password")
            elif self.state == AUTH_CLEARTEXT:
                self._check_cleartext(account, pg.parse_password_message(payload))
            else:
                raise ProtocolViolation("no password was asked for")
            if account.decoy:   # nothing passes one; never let anything through it either
                raise ScramError("no such user")
        except (ScramError, ProtocolViolation, TokenError) as exc:
            self.state = CLOSED
            raise AuthFailed(str(exc), account.decoy) from None
        out = pg.authentication(pg.AUTH_SASL_FINAL, final) if self.state == AUTH_SASL_FINAL else b""
        self._scram = None
        self.state = LOGIN
        return out

    def _check_cleartext(self, account, response: bytes) -> None:
        """An IAM token (or, with OPTIONAL, the password) sent in the clear over TLS."""
        text = response.decode("utf-8", "replace")
        looks_like_token = "/?" in text and "X-Amz-" in text
        if account.iam_auth == "REQUIRED" or looks_like_token:
            try:
                self.check_token(text, self.user)
            except TokenError as exc:
                raise TokenError(f"IAM token rejected: {exc}") from None
            self.method = "iam"
        elif not hmac.compare_digest(response, account.credentials.password.encode("utf-8")):
            raise ScramError("wrong password")
        else:
            self.method = "password"

    def finish(self, statuses: bytes, pid: int, secret: int, prefix: bytes = b"") -> bytes:
        """The rest of the greeting: `prefix` (AuthenticationOk when not sent yet), the
        ParameterStatus messages, BackendKeyData and ReadyForQuery."""
        self.state = READY
        return b"".join((prefix, statuses, pg.backend_key_data(pid, secret), pg.READY_FOR_QUERY_IDLE))


# -- the server's login -------------------------------------------------------------------

_TLS_ANSWER, _TLS, _AUTH, _DONE = "tls answer", TLS, "auth", DONE


def malformed_stream(exc: Exception) -> ServerError:
    """A server stream that cannot be framed, as the error that ends its connection."""
    return ServerError({"S": "FATAL", "C": "08P01", "M": f"malformed server message: {exc}"})


class ServerLogin(LoginMachine):
    """Logs in to PostgreSQL as `user` with `password` on `database`, with the startup
    parameters `params`; see the module docstring for the loop.

    `tls_mode`: the target's tls setting; anything but "disable" asks for TLS first.
    `target_name`: names the database in errors.
    """

    def __init__(self, user: str, password: str, database: str, params: dict[str, str], *,
                 tls_mode: str = "disable", target_name: str = ""):
        self.user = user
        self._password = password
        self.startup = {"user": user, "database": database, **params}
        self.tls_mode = tls_mode
        self.target_name = target_name
        self.state = _TLS_ANSWER if tls_mode != "disable" else _AUTH
        self.parameters: dict[str, str] = {}
        self.backend_pid = 0
        self.backend_secret = 0
        # Messages that arrived in the same read after ReadyForQuery: the caller's.
        self.leftover: list[tuple[int, bytes]] = []
        self._scram: ScramClient | None = None
        self._buf = bytearray()

    def start(self) -> bytes:
        """The first bytes to send: an SSLRequest, or the StartupMessage."""
        if self.state == _TLS_ANSWER:
            return struct.pack("!ii", 8, pg.SSL_REQUEST_CODE)
        return pg.startup_message(self.startup)

    def tls_answer(self, answer: bytes) -> None:
        """The server's one-byte answer to the SSLRequest; nothing may follow an 'S' before
        the handshake (a man in the middle could inject plaintext), so read only one."""
        if answer == TLS_ACCEPTED:
            self.state = _TLS
            return
        if answer == TLS_DECLINED:
            raise ServerError({"S": "FATAL", "C": "08P01",
                               "M": f"database {self.target_name} does not accept TLS (it answered 'N' to "
                                    f"SSLRequest) but the target's tls is {self.tls_mode!r}"})
        raise ServerError({"S": "FATAL", "C": "08P01",
                           "M": f"database {self.target_name} gave an unexpected answer {answer!r} to SSLRequest"})

    def tls_started(self) -> bytes:
        """TLS is up: the StartupMessage to send over it."""
        self.state = _AUTH
        return pg.startup_message(self.startup)

    def receive_data(self, data) -> bytes:
        """Bytes from the server; returns the bytes to send (possibly empty)."""
        self._buf += data
        try:
            messages, used = split_messages(self._buf)
        except FramingError as exc:
            raise malformed_stream(exc) from None
        del self._buf[:used]
        out = []
        for i, (mtype, payload) in enumerate(messages):
            out.append(self.receive_message(mtype, payload))
            if self.state == _DONE:
                self.leftover.extend(messages[i + 1:])
                break
        return b"".join(out)

    def receive_message(self, mtype: int, payload: bytes) -> bytes:
        """One server message; returns the bytes to send (possibly empty)."""
        if mtype == 82:    # 'R'
            return self._on_auth(payload)
        if mtype == 83:    # 'S'
            name, value = pg.parse_parameter_status(payload)
            self.parameters[name] = value
        elif mtype == 75:  # 'K'
            self.backend_pid, self.backend_secret = struct.unpack("!iI", payload[:8])
        elif mtype == 90:  # 'Z'
            self.state = _DONE
        elif mtype == 69:  # 'E'
            raise ServerError(pg.parse_error_fields(payload))
        return b""

    def _on_auth(self, payload: bytes) -> bytes:
        (code,) = struct.unpack_from("!i", payload)
        data = payload[4:]
        try:
            if code == pg.AUTH_OK:
                self._scram = None
                return b""
            if code == pg.AUTH_CLEARTEXT:
                return pg.password_message(self._password.encode() + b"\x00")
            if code == pg.AUTH_MD5:
                return pg.password_message(md5_response(self._password, self.user, data[:4]) + b"\x00")
            if code == pg.AUTH_SASL:
                mechanisms = pg.split_cstrings(data)
                if b"SCRAM-SHA-256" not in mechanisms:
                    raise ScramError(f"server offers no supported SASL mechanism ({mechanisms!r})")
                self._scram = ScramClient(self._password)
                return pg.sasl_initial_response("SCRAM-SHA-256", self._scram.client_first())
            if code == pg.AUTH_SASL_CONTINUE:
                if self._scram is None:
                    raise ScramError("unexpected SASL continue")
                return pg.password_message(self._scram.handle_server_first(data))
            if code == pg.AUTH_SASL_FINAL:
                if self._scram is None:
                    raise ScramError("unexpected SASL final")
                self._scram.verify_server_final(data)
                return b""
            raise ScramError(f"server asks for unsupported authentication method {code}")
        except ScramError as exc:
            raise ServerError({"S": "FATAL", "C": "28000", "M": f"database login failed: {exc}"}) from None
