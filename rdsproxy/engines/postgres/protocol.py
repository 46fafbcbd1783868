"""PostgreSQL v3 wire messages, sans-IO: builders return bytes, parsers take bytes; no sockets here."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

# The wire's constants live in one module; these names are part of this one's vocabulary.
from ..._fastpath.pgwire import (  # noqa: F401
    AUTH_CLEARTEXT,
    AUTH_MD5,
    AUTH_OK,
    AUTH_OK_MESSAGE,
    AUTH_SASL,
    AUTH_SASL_CONTINUE,
    AUTH_SASL_FINAL,
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    PROTOCOL_V3,
    READY_FOR_QUERY_IDLE,
    SSL_REQUEST_CODE,
    SYNC,
    TERMINATE,
)

MAX_STARTUP_PACKET = 10000       # PostgreSQL's own MAX_STARTUP_PACKET_LENGTH

_I32 = struct.Struct("!i")
_HDR = struct.Struct("!ci")
_SHORT_MSGS = {}


class ProtocolViolation(Exception):
    """The peer sent something the protocol does not allow; `sqlstate` says which class."""

    def __init__(self, message: str, sqlstate: str = "08P01", detail: str = ""):
        super().__init__(message)
        self.sqlstate = sqlstate
        self.detail = detail


class ServerError(Exception):
    """PostgreSQL refused a login or an internal query; carries its ErrorResponse fields."""

    def __init__(self, fields: dict[str, str]):
        self.fields = fields
        super().__init__(f"{fields.get('S', 'ERROR')}: {fields.get('M', 'unknown error')} "
                         f"(SQLSTATE {fields.get('C', '?????')})")

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", "08000")


# --- builders ---------------------------------------------------------------------------

def message(mtype: bytes, payload: bytes = b"") -> bytes:
    return _HDR.pack(mtype, len(payload) + 4) + payload


def cstr(value: str) -> bytes:
    return value.encode("utf-8") + b"\x00"


def ready_for_query(status: bytes = b"I") -> bytes:
    return b"Z\x00\x00\x00\x05" + status


def authentication(code: int, data: bytes = b"") -> bytes:
    return message(b"R", _I32.pack(code) + data)


def auth_sasl(mechanisms=("SCRAM-SHA-256",)) -> bytes:
    return authentication(AUTH_SASL, b"".join(cstr(m) for m in mechanisms) + b"\x00")


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstr(name) + cstr(value))


def backend_key_data(pid: int, secret: int) -> bytes:
    return message(b"K", struct.pack("!iI", pid, secret))


def error_fields(severity: str, code: str, text: str, detail: str = "", hint: str = "") -> bytes:
    parts = [b"S", cstr(severity), b"V", cstr(severity), b"C", cstr(code), b"M", cstr(text)]
    if detail:
        parts += [b"D", cstr(detail)]
    if hint:
        parts += [b"H", cstr(hint)]
    return b"".join(parts) + b"\x00"


def error_response(code: str, text: str, *, severity: str = "ERROR", detail: str = "", hint: str = "") -> bytes:
    return message(b"E", error_fields(severity, code, text, detail, hint))


def notice_response(code: str, text: str, *, severity: str = "NOTICE") -> bytes:
    return message(b"N", error_fields(severity, code, text))


def startup_message(params: dict[str, str]) -> bytes:
    body = _I32.pack(PROTOCOL_V3) + b"".join(cstr(k) + cstr(v) for k, v in params.items() if v is not None) + b"\x00"
    return _I32.pack(len(body) + 4) + body


def cancel_request(pid: int, secret: int) -> bytes:
    return struct.pack("!iiiI", 16, CANCEL_REQUEST_CODE, pid, secret)


def password_message(data: bytes) -> bytes:
    return message(b"p", data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", cstr(mechanism) + _I32.pack(len(data)) + data)


def query(sql: str) -> bytes:
    return message(b"Q", cstr(sql))


# Bind of the unnamed statement to the unnamed portal (no parameters, text results),
# Execute of all its rows.
_BIND_UNNAMED = message(b"B", b"\x00\x00" + b"\x00\x00" * 3)
_EXECUTE_UNNAMED = message(b"E", b"\x00" + b"\x00\x00\x00\x00")


def single_statement(sql: bytes) -> bytes:
    """`sql` run over the extended protocol, which refuses a text of more than one
    statement, then Sync: one ReadyForQuery."""
    return (message(b"P", b"\x00" + sql + b"\x00\x00\x00") + _BIND_UNNAMED + _EXECUTE_UNNAMED
            + message(b"S"))


# --- parsers ----------------------------------------------------------------------------

@dataclass
class StartupPacket:
    """What a client sent before authentication: one of four kinds."""
    kind: str                                   # "startup" | "ssl" | "gssenc" | "cancel"
    params: dict[str, str] = field(default_factory=dict)
    cancel_pid: int = 0
    cancel_secret: int = 0


def read_startup_packet(buf: bytearray) -> tuple[StartupPacket | None, int]:
    """Parse one untyped startup-phase packet from `buf`; (None, 0) until it is complete."""
    if len(buf) < 8:
        if len(buf) >= 4:
            _check_startup_length(_I32.unpack_from(buf, 0)[0])
        return None, 0
    length = _I32.unpack_from(buf, 0)[0]
    _check_startup_length(length)
    if len(buf) < length:
        return None, 0
    code = _I32.unpack_from(buf, 4)[0]
    body = bytes(buf[8:length])
    if code == SSL_REQUEST_CODE and length == 8:
        return StartupPacket("ssl"), length
    if code == GSSENC_REQUEST_CODE and length == 8:
        return StartupPacket("gssenc"), length
    if code == CANCEL_REQUEST_CODE and length == 16:
        pid, secret = struct.unpack("!iI", body)
        return StartupPacket("cancel", cancel_pid=pid, cancel_secret=secret), length
    if code >> 16 != 3:
        raise ProtocolViolation(f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
                                "server supports 3.0", "0A000")
    if not body.endswith(b"\x00"):
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    # Each name and value ends with a NUL; one more NUL ends the list.
    fields = body[:-1].split(b"\x00")[:-1] if len(body) > 1 else []
    if len(body) > 1 and not body[:-1].endswith(b"\x00"):
        raise ProtocolViolation("invalid startup packet layout: unterminated parameter")
    if len(fields) % 2:
        raise ProtocolViolation("invalid startup packet layout: odd number of strings")
    params = {}
    try:
        for i in range(0, len(fields), 2):
            params[fields[i].decode("utf-8")] = fields[i + 1].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation("invalid startup packet: parameters are not valid UTF-8") from None
    return StartupPacket("startup", params=params), length


def _check_startup_length(length: int) -> None:
    if length < 8 or length > MAX_STARTUP_PACKET:
        raise ProtocolViolation(f"invalid length of startup packet ({length})")


def parse_error_fields(payload: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse fields by their one-letter codes."""
    fields = {}
    for part in payload.split(b"\x00"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


def parse_parameter_status(payload: bytes) -> tuple[str, str]:
    name, value, _ = payload.split(b"\x00", 2)
    return name.decode("utf-8", "replace"), value.decode("utf-8", "replace")


def split_cstrings(payload: bytes) -> list[bytes]:
    return payload.rstrip(b"\x00").split(b"\x00") if payload.strip(b"\x00") else []


def parse_password_message(payload: bytes) -> bytes:
    """A PasswordMessage's password (cleartext or md5 hash), without the terminator."""
    if not payload.endswith(b"\x00"):
        raise ProtocolViolation("malformed password message")
    return payload[:-1]


def parse_sasl_initial_response(payload: bytes) -> tuple[str, bytes]:
    nul = payload.find(b"\x00")
    if nul < 0 or len(payload) < nul + 5:
        raise ProtocolViolation("malformed SASLInitialResponse")
    mechanism = payload[:nul].decode("ascii", "replace")
    (length,) = _I32.unpack_from(payload, nul + 1)
    data = payload[nul + 5:]
    if length != len(data) and not (length == -1 and not data):
        raise ProtocolViolation("malformed SASLInitialResponse: length mismatch")
    return mechanism, data


def parse_datarow(payload: bytes) -> list[bytes | None]:
    """A DataRow body: int16 column count, then per column int32 length (-1 = NULL) + bytes."""
    (count,) = struct.unpack_from("!h", payload, 0)
    pos = 2
    columns: list[bytes | None] = []
    for _ in range(count):
        (length,) = struct.unpack_from("!i", payload, pos)
        pos += 4
        if length < 0:
            columns.append(None)
            continue
        if pos + length > len(payload):
            raise ValueError("truncated DataRow")
        columns.append(bytes(payload[pos:pos + length]))
        pos += length
    return columns
