"""MySQL / MariaDB client-server protocol, sans-IO: bytes in, objects or bytes out; no sockets.

What is here, in the order of the file:

- constants: capability flags (MariaDB's extended ones in bits 32..63 of one int, as
  MariaDB's connectors do), server status flags, command bytes, cursor flags, column
  types, session-tracking types, charsets and the error numbers the proxy itself answers with;
- `ProtocolViolation` (a peer broke the protocol; carries the MySQL error number and
  SQLSTATE to answer with) and `ServerError` (the server sent an ERR packet);
- primitives: little-endian fixed ints, length-encoded ints and strings, NUL-terminated strings;
- framing: `packet()` builds (splitting payloads of 16 MiB and more), `PacketReader` decodes
  a byte stream arriving in arbitrary chunks and joins split payloads;
- packets, each a dataclass with `parse(payload, ...)` and `build(...)`: `Handshake`
  (HandshakeV10), `HandshakeResponse` (HandshakeResponse41, and the short SSLRequest),
  `AuthSwitchRequest`, `AuthMoreData`, `OkPacket`, `ErrPacket`, `EofPacket`,
  `LocalInfileRequest`, `PrepareOk`, `ColumnDefinition`, `ChangeUser`, `StmtExecute`;
  plus command builders (`com_query`, `com_stmt_prepare`, ...) and `text_row`;
- `response_kind()`: tells OK / ERR / EOF / LOCAL INFILE / result-set header / row apart;
- statement-id helpers for the commands that name a prepared statement;
- `ResponseTracker`: fed the server's packets one by one after a command, it says when the
  whole response has arrived and what the final server status flags are.

Payloads are the packet bodies without the 4-byte header. Names (users, databases, plugin
names, messages) are `str` decoded as UTF-8 with surrogateescape, so any bytes a client
sends survive a parse/build round trip unchanged.

Not supported (a pooler should not offer these capabilities to clients or servers):
CLIENT_COMPRESS (the compressed framing), CLIENT_OPTIONAL_RESULTSET_METADATA (MySQL 8's
optional metadata; its byte layout could not be checked here against a MySQL 8 server),
CLIENT_QUERY_ATTRIBUTES (changes the COM_QUERY / COM_STMT_EXECUTE layouts), the pre-4.1
protocol. MariaDB's MARIADB_CLIENT_CACHE_METADATA is understood by the tracker.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterable, Sequence

# --- capability flags (HandshakeV10 / HandshakeResponse41) ----------------------------------

CLIENT_LONG_PASSWORD = 1 << 0        # MariaDB calls this bit CLIENT_MYSQL: see below
CLIENT_MYSQL = CLIENT_LONG_PASSWORD
CLIENT_FOUND_ROWS = 1 << 1
CLIENT_LONG_FLAG = 1 << 2
CLIENT_CONNECT_WITH_DB = 1 << 3
CLIENT_NO_SCHEMA = 1 << 4
CLIENT_COMPRESS = 1 << 5
CLIENT_ODBC = 1 << 6
CLIENT_LOCAL_FILES = 1 << 7
CLIENT_IGNORE_SPACE = 1 << 8
CLIENT_PROTOCOL_41 = 1 << 9
CLIENT_INTERACTIVE = 1 << 10
CLIENT_SSL = 1 << 11
CLIENT_IGNORE_SIGPIPE = 1 << 12
CLIENT_TRANSACTIONS = 1 << 13
CLIENT_RESERVED = 1 << 14            # old CLIENT_PROTOCOL_41; servers still set it
CLIENT_SECURE_CONNECTION = 1 << 15   # a.k.a. CLIENT_RESERVED2
CLIENT_MULTI_STATEMENTS = 1 << 16
CLIENT_MULTI_RESULTS = 1 << 17
CLIENT_PS_MULTI_RESULTS = 1 << 18
CLIENT_PLUGIN_AUTH = 1 << 19
CLIENT_CONNECT_ATTRS = 1 << 20
CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA = 1 << 21
CLIENT_CAN_HANDLE_EXPIRED_PASSWORDS = 1 << 22
CLIENT_SESSION_TRACK = 1 << 23
CLIENT_DEPRECATE_EOF = 1 << 24
CLIENT_OPTIONAL_RESULTSET_METADATA = 1 << 25    # MySQL 8
CLIENT_ZSTD_COMPRESSION_ALGORITHM = 1 << 26     # MySQL 8
CLIENT_QUERY_ATTRIBUTES = 1 << 27               # MySQL 8.0.23
CLIENT_MULTI_FACTOR_AUTHENTICATION = 1 << 28    # MySQL 8.0.27
CLIENT_CAPABILITY_EXTENSION = 1 << 29
CLIENT_SSL_VERIFY_SERVER_CERT = 1 << 30
CLIENT_REMEMBER_OPTIONS = 1 << 31

# MariaDB's extended capabilities. On the wire they are a separate 4-byte field (in bytes
# that MySQL leaves as filler), present only when the sender clears bit 0 (CLIENT_MYSQL):
# a MariaDB server clears it in its handshake, and a client that wants any of these clears
# it in its response. Here they are kept in bits 32..63 of the same int.
MARIADB_CLIENT_PROGRESS = 1 << 32               # progress reports as ERR 0xFFFF packets
MARIADB_CLIENT_COM_MULTI = 1 << 33              # obsolete
MARIADB_CLIENT_STMT_BULK_OPERATIONS = 1 << 34   # COM_STMT_BULK_EXECUTE
MARIADB_CLIENT_EXTENDED_METADATA = 1 << 35      # extra field in column definitions
MARIADB_CLIENT_CACHE_METADATA = 1 << 36         # "metadata follows" byte; executes may skip it
MARIADB_CLIENT_BULK_UNIT_RESULTS = 1 << 37      # MariaDB 11.5
MARIADB_CAPABILITIES_MASK = 0xFFFFFFFF << 32

# The client capabilities this module's packets and tracker fully understand.
SUPPORTED_CAPABILITIES = (
    CLIENT_LONG_PASSWORD | CLIENT_FOUND_ROWS | CLIENT_LONG_FLAG | CLIENT_CONNECT_WITH_DB
    | CLIENT_NO_SCHEMA | CLIENT_ODBC | CLIENT_LOCAL_FILES | CLIENT_IGNORE_SPACE
    | CLIENT_PROTOCOL_41 | CLIENT_INTERACTIVE | CLIENT_SSL | CLIENT_IGNORE_SIGPIPE
    | CLIENT_TRANSACTIONS | CLIENT_RESERVED | CLIENT_SECURE_CONNECTION
    | CLIENT_MULTI_STATEMENTS | CLIENT_MULTI_RESULTS | CLIENT_PS_MULTI_RESULTS
    | CLIENT_PLUGIN_AUTH | CLIENT_CONNECT_ATTRS | CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
    | CLIENT_CAN_HANDLE_EXPIRED_PASSWORDS | CLIENT_SESSION_TRACK | CLIENT_DEPRECATE_EOF
    | CLIENT_SSL_VERIFY_SERVER_CERT | CLIENT_REMEMBER_OPTIONS
    | MARIADB_CLIENT_PROGRESS | MARIADB_CLIENT_STMT_BULK_OPERATIONS
    | MARIADB_CLIENT_EXTENDED_METADATA | MARIADB_CLIENT_CACHE_METADATA
)

# Client capabilities that change how the server treats a session or formats its answers
# (affected-rows meaning, SQL parsing, timeouts, LOCAL INFILE permission, multi-statements,
# result and OK packet layouts). A pooled server connection serves a client unchanged only
# if these were negotiated alike on both legs (or the proxy translates between them).
SESSION_CAPABILITIES = (
    CLIENT_FOUND_ROWS | CLIENT_NO_SCHEMA | CLIENT_ODBC | CLIENT_LOCAL_FILES
    | CLIENT_IGNORE_SPACE | CLIENT_INTERACTIVE | CLIENT_MULTI_STATEMENTS | CLIENT_MULTI_RESULTS
    | CLIENT_PS_MULTI_RESULTS | CLIENT_SESSION_TRACK | CLIENT_DEPRECATE_EOF
    | CLIENT_CAN_HANDLE_EXPIRED_PASSWORDS | MARIADB_CLIENT_PROGRESS
    | MARIADB_CLIENT_STMT_BULK_OPERATIONS | MARIADB_CLIENT_EXTENDED_METADATA
    | MARIADB_CLIENT_CACHE_METADATA
)

# --- server status flags (OK and EOF packets, HandshakeV10) ----------------------------------

SERVER_STATUS_IN_TRANS = 0x0001
SERVER_STATUS_AUTOCOMMIT = 0x0002
SERVER_MORE_RESULTS_EXISTS = 0x0008
SERVER_QUERY_NO_GOOD_INDEX_USED = 0x0010
SERVER_QUERY_NO_INDEX_USED = 0x0020
SERVER_STATUS_CURSOR_EXISTS = 0x0040
SERVER_STATUS_LAST_ROW_SENT = 0x0080
SERVER_STATUS_DB_DROPPED = 0x0100
SERVER_STATUS_NO_BACKSLASH_ESCAPES = 0x0200
SERVER_STATUS_METADATA_CHANGED = 0x0400
SERVER_QUERY_WAS_SLOW = 0x0800
SERVER_PS_OUT_PARAMS = 0x1000
SERVER_STATUS_IN_TRANS_READONLY = 0x2000
SERVER_SESSION_STATE_CHANGED = 0x4000

# --- commands (first byte of a client's command packet) ---------------------------------------

COM_SLEEP = 0x00
COM_QUIT = 0x01
COM_INIT_DB = 0x02
COM_QUERY = 0x03
COM_FIELD_LIST = 0x04
COM_CREATE_DB = 0x05
COM_DROP_DB = 0x06
COM_REFRESH = 0x07
COM_SHUTDOWN = 0x08
COM_STATISTICS = 0x09
COM_PROCESS_INFO = 0x0A
COM_CONNECT = 0x0B
COM_PROCESS_KILL = 0x0C
COM_DEBUG = 0x0D
COM_PING = 0x0E
COM_TIME = 0x0F
COM_DELAYED_INSERT = 0x10
COM_CHANGE_USER = 0x11
COM_BINLOG_DUMP = 0x12
COM_TABLE_DUMP = 0x13
COM_CONNECT_OUT = 0x14
COM_REGISTER_SLAVE = 0x15
COM_STMT_PREPARE = 0x16
COM_STMT_EXECUTE = 0x17
COM_STMT_SEND_LONG_DATA = 0x18
COM_STMT_CLOSE = 0x19
COM_STMT_RESET = 0x1A
COM_SET_OPTION = 0x1B
COM_STMT_FETCH = 0x1C
COM_DAEMON = 0x1D
COM_BINLOG_DUMP_GTID = 0x1E
COM_RESET_CONNECTION = 0x1F
COM_STMT_BULK_EXECUTE = 0xFA     # MariaDB

COMMAND_NAMES = {value: name for name, value in globals().items()
                 if name.startswith("COM_") and isinstance(value, int)}

# COM_SET_OPTION values
MYSQL_OPTION_MULTI_STATEMENTS_ON = 0
MYSQL_OPTION_MULTI_STATEMENTS_OFF = 1

# COM_STMT_EXECUTE flags (the byte after the statement id)
CURSOR_TYPE_NO_CURSOR = 0x00
CURSOR_TYPE_READ_ONLY = 0x01
CURSOR_TYPE_FOR_UPDATE = 0x02
CURSOR_TYPE_SCROLLABLE = 0x04
CURSOR_TYPE_MASK = 0x07
PARAMETER_COUNT_AVAILABLE = 0x08     # MariaDB (and MySQL with query attributes)

# A COM_STMT_EXECUTE naming this id means "the statement prepared last on this connection"
# (MariaDB connectors use it to pipeline PREPARE + EXECUTE); a statement-id remapper must
# treat it specially.
MARIADB_LAST_STATEMENT_ID = 0xFFFFFFFF

# Column types (ColumnDefinition41.type, COM_STMT_EXECUTE parameter types)
MYSQL_TYPE_DECIMAL = 0
MYSQL_TYPE_TINY = 1
MYSQL_TYPE_SHORT = 2
MYSQL_TYPE_LONG = 3
MYSQL_TYPE_FLOAT = 4
MYSQL_TYPE_DOUBLE = 5
MYSQL_TYPE_NULL = 6
MYSQL_TYPE_TIMESTAMP = 7
MYSQL_TYPE_LONGLONG = 8
MYSQL_TYPE_INT24 = 9
MYSQL_TYPE_DATE = 10
MYSQL_TYPE_TIME = 11
MYSQL_TYPE_DATETIME = 12
MYSQL_TYPE_YEAR = 13
MYSQL_TYPE_VARCHAR = 15
MYSQL_TYPE_BIT = 16
MYSQL_TYPE_JSON = 245
MYSQL_TYPE_NEWDECIMAL = 246
MYSQL_TYPE_ENUM = 247
MYSQL_TYPE_SET = 248
MYSQL_TYPE_TINY_BLOB = 249
MYSQL_TYPE_MEDIUM_BLOB = 250
MYSQL_TYPE_LONG_BLOB = 251
MYSQL_TYPE_BLOB = 252
MYSQL_TYPE_VAR_STRING = 253
MYSQL_TYPE_STRING = 254
MYSQL_TYPE_GEOMETRY = 255

# Column definition flags (a few)
NOT_NULL_FLAG = 0x0001
PRI_KEY_FLAG = 0x0002
BINARY_FLAG = 0x0080
UNSIGNED_FLAG = 0x0020

# Session state change types (OK packets when CLIENT_SESSION_TRACK is on)
SESSION_TRACK_SYSTEM_VARIABLES = 0
SESSION_TRACK_SCHEMA = 1
SESSION_TRACK_STATE_CHANGE = 2
SESSION_TRACK_GTIDS = 3
SESSION_TRACK_TRANSACTION_CHARACTERISTICS = 4
SESSION_TRACK_TRANSACTION_STATE = 5      # MariaDB names it SESSION_TRACK_TRANSACTION_TYPE

# Character set / collation ids
CHARSET_LATIN1 = 8                   # latin1_swedish_ci
CHARSET_UTF8MB3 = 33                 # utf8_general_ci
CHARSET_UTF8MB4 = 45                 # utf8mb4_general_ci (MariaDB's default)
CHARSET_BINARY = 63
CHARSET_UTF8MB4_0900_AI_CI = 255     # MySQL 8's default

# Error numbers and SQLSTATEs the proxy answers with itself.
ER_CON_COUNT_ERROR = 1040            # 08004 Too many connections
ER_HANDSHAKE_ERROR = 1043            # 08S01 Bad handshake
ER_ACCESS_DENIED_ERROR = 1045        # 28000
ER_UNKNOWN_COM_ERROR = 1047          # 08S01 Unknown command
ER_NET_PACKET_TOO_LARGE = 1153       # 08S01 Got a packet bigger than 'max_allowed_packet' bytes
ER_NET_READ_ERROR = 1158             # 08S01
ER_NET_PACKETS_OUT_OF_ORDER = 1156   # 08S01
ER_UNKNOWN_STMT_HANDLER = 1243       # HY000 Unknown prepared statement handler
ER_NOT_SUPPORTED_AUTH_MODE = 1251    # 08004 Client does not support authentication protocol
ER_SECURE_TRANSPORT_REQUIRED = 3159  # HY000 (MySQL 8)
ER_MALFORMED_PACKET = 1835           # HY000 Malformed communication packet
ER_QUERY_INTERRUPTED = 1317          # 70100
# Codes 2000-2999 and 5000-5999 are the client libraries' own: clients treat an ERR packet
# carrying one as malformed, so a proxy must never send them.

# Packet header bytes
OK_HEADER = 0x00
AUTH_MORE_DATA_HEADER = 0x01
LOCAL_INFILE_HEADER = 0xFB
EOF_HEADER = 0xFE
AUTH_SWITCH_HEADER = 0xFE
ERR_HEADER = 0xFF
PROGRESS_REPORT_CODE = 0xFFFF        # an ERR packet with this code is a MariaDB progress report

MAX_PACKET_LENGTH = 0xFFFFFF         # payloads this long continue in the next packet
DEFAULT_MAX_PAYLOAD = 64 * 1024 * 1024    # MySQL 8's default max_allowed_packet

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_HH = struct.Struct("<HH")


# --- errors -----------------------------------------------------------------------------------

class ProtocolViolation(Exception):
    """A peer sent something the protocol does not allow (or a limit was exceeded).

    `code` and `sqlstate` are what to put in the ERR packet sent back to a client before
    closing its connection; both default to ER_MALFORMED_PACKET.
    """

    def __init__(self, message: str, code: int = ER_MALFORMED_PACKET, sqlstate: str = "HY000"):
        super().__init__(message)
        self.code = code
        self.sqlstate = sqlstate


class ServerError(Exception):
    """The server answered with an ERR packet; `err` is the parsed packet."""

    def __init__(self, err: "ErrPacket", context: str = ""):
        self.err = err
        prefix = f"{context}: " if context else ""
        super().__init__(f"{prefix}ERROR {err.code} ({err.sqlstate}): {err.message}")

    @property
    def code(self) -> int:
        return self.err.code

    @property
    def sqlstate(self) -> str:
        return self.err.sqlstate

    @property
    def message(self) -> str:
        return self.err.message


def _truncated(what: str) -> ProtocolViolation:
    return ProtocolViolation(f"malformed packet: {what} runs past the end of the payload")


# --- primitives -------------------------------------------------------------------------------

def _dec(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _enc(value: str | bytes) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    return bytes(value)


def lenenc_int(value: int) -> bytes:
    """A length-encoded integer (1, 3, 4 or 9 bytes)."""
    if value < 0:
        raise ValueError("length-encoded integers are unsigned")
    if value < 0xFB:
        return bytes((value,))
    if value < 0x10000:
        return b"\xfc" + _U16.pack(value)
    if value < 0x1000000:
        return b"\xfd" + value.to_bytes(3, "little")
    if value < 1 << 64:
        return b"\xfe" + _U64.pack(value)
    raise ValueError("length-encoded integers have at most 64 bits")


def read_lenenc_int(buf: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int | None, int]:
    """(value, position after it). 0xFB (NULL in a row) gives None; 0xFF is an error."""
    try:
        first = buf[pos]
    except IndexError:
        raise _truncated("a length-encoded integer") from None
    if first < 0xFB:
        return first, pos + 1
    if first == 0xFB:
        return None, pos + 1
    if first == 0xFC:
        end = pos + 3
    elif first == 0xFD:
        end = pos + 4
    elif first == 0xFE:
        end = pos + 9
    else:
        raise ProtocolViolation("malformed packet: 0xFF is not a length-encoded integer")
    if end > len(buf):
        raise _truncated("a length-encoded integer")
    return int.from_bytes(buf[pos + 1:end], "little"), end


def lenenc_str(value: str | bytes) -> bytes:
    """A length-encoded string."""
    raw = _enc(value)
    return lenenc_int(len(raw)) + raw


def read_lenenc_str(buf: bytes | bytearray | memoryview, pos: int = 0) -> tuple[bytes | None, int]:
    """(bytes, position after it); None for a NULL (0xFB) column value."""
    length, pos = read_lenenc_int(buf, pos)
    if length is None:
        return None, pos
    end = pos + length
    if end > len(buf):
        raise _truncated("a length-encoded string")
    return bytes(buf[pos:end]), end


def nul_str(value: str | bytes) -> bytes:
    """A NUL-terminated string."""
    raw = _enc(value)
    if b"\x00" in raw:
        raise ValueError("a NUL-terminated string cannot contain NUL")
    return raw + b"\x00"


def read_nul_str(buf: bytes | bytearray | memoryview, pos: int = 0) -> tuple[bytes, int]:
    """(bytes without the NUL, position after the NUL)."""
    if isinstance(buf, memoryview):
        buf = bytes(buf)
    end = buf.find(b"\x00", pos)
    if end < 0:
        raise _truncated("a NUL-terminated string")
    return bytes(buf[pos:end]), end + 1


def _u16(buf, pos: int, what: str) -> int:
    if pos + 2 > len(buf):
        raise _truncated(what)
    return _U16.unpack_from(buf, pos)[0]


def _u32(buf, pos: int, what: str) -> int:
    if pos + 4 > len(buf):
        raise _truncated(what)
    return _U32.unpack_from(buf, pos)[0]


# --- framing ----------------------------------------------------------------------------------

def packet(seq: int, payload: bytes | bytearray | memoryview) -> bytes:
    """The wire bytes of one logical packet: 3-byte length, sequence id, payload.

    Payloads of MAX_PACKET_LENGTH (16 MiB - 1) bytes or more go out as several packets with
    consecutive sequence ids; one whose length is a multiple of MAX_PACKET_LENGTH ends
    with an empty packet, so the receiver knows it is complete.
    """
    n = len(payload)
    seq &= 0xFF
    if n < MAX_PACKET_LENGTH:
        return n.to_bytes(3, "little") + bytes((seq,)) + bytes(payload)
    parts = []
    view = memoryview(payload)
    pos = 0
    while True:
        chunk = view[pos:pos + MAX_PACKET_LENGTH]
        parts.append(len(chunk).to_bytes(3, "little") + bytes((seq,)))
        parts.append(chunk)
        seq = (seq + 1) & 0xFF
        pos += len(chunk)
        if len(chunk) < MAX_PACKET_LENGTH:
            break
    return b"".join(parts)


def fragment_count(payload_length: int) -> int:
    """How many wire packets a payload of this length takes."""
    return payload_length // MAX_PACKET_LENGTH + 1


def seq_after(seq: int, payload_length: int) -> int:
    """The sequence id that follows a logical packet starting at `seq` (its last fragment + 1)."""
    return (seq + fragment_count(payload_length)) & 0xFF


class PacketReader:
    """Decodes a byte stream into (sequence_id, payload) pairs.

    feed() takes chunks split anywhere and returns the logical packets completed so far;
    payloads split over several MAX_PACKET_LENGTH packets are joined, and their sequence id
    is the first fragment's. `next_seq` is the id that follows the last completed packet
    (the one a reply must carry). A payload over `max_payload` raises ProtocolViolation
    (ER_NET_PACKET_TOO_LARGE) as soon as its header shows it, before buffering it; so do
    fragments whose sequence ids are not consecutive. After an exception the stream is
    out of sync: close the connection.
    """

    __slots__ = ("max_payload", "next_seq", "_buf", "_parts", "_part_len", "_part_seq",
                 "_last_frag_seq")

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD):
        self.max_payload = int(max_payload)
        self.next_seq = 0
        self._buf = bytearray()
        self._parts: list[bytes] = []      # fragments of a payload still being joined
        self._part_len = 0
        self._part_seq = 0
        self._last_frag_seq = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a returned packet."""
        return len(self._buf) + self._part_len

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        out: list[tuple[int, bytes]] = []
        pos = 0
        end = len(buf)
        max_payload = self.max_payload
        while end - pos >= 4:
            length = buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16)
            seq = buf[pos + 3]
            total = self._part_len + length
            if total > max_payload:
                raise ProtocolViolation(
                    f"packet of at least {total} bytes exceeds the limit of {max_payload} bytes",
                    ER_NET_PACKET_TOO_LARGE, "08S01")
            if self._parts and seq != (self._last_frag_seq + 1) & 0xFF:
                raise ProtocolViolation(
                    f"packets out of order: fragment with sequence id {seq} after "
                    f"{self._last_frag_seq}", ER_NET_PACKETS_OUT_OF_ORDER, "08S01")
            if end - pos - 4 < length:
                break
            body = bytes(buf[pos + 4:pos + 4 + length])
            pos += 4 + length
            if length == MAX_PACKET_LENGTH:
                if not self._parts:
                    self._part_seq = seq
                self._parts.append(body)
                self._part_len += length
                self._last_frag_seq = seq
                continue
            if self._parts:
                self._parts.append(body)
                body = b"".join(self._parts)
                first = self._part_seq
                self._parts = []
                self._part_len = 0
            else:
                first = seq
            self.next_seq = (seq + 1) & 0xFF
            out.append((first, body))
        if pos:
            del buf[:pos]
        return out


# --- handshake --------------------------------------------------------------------------------

def _split_version(version: str) -> str:
    # MariaDB prefixes its version with "5.5.5-" so that old replication clients that
    # compare versions do not take 10.x for 1.0.
    if version.startswith("5.5.5-") and "MariaDB" in version:
        return version[6:]
    return version


@dataclass(slots=True)
class Handshake:
    """HandshakeV10, the server's first packet. `capabilities` includes MariaDB's extended
    capabilities in bits 32..63 (read only when the server cleared CLIENT_MYSQL, as MariaDB
    does). `auth_plugin_data` is the nonce (20 bytes from MySQL and MariaDB)."""

    server_version: str
    connection_id: int
    auth_plugin_data: bytes
    capabilities: int
    charset: int = CHARSET_UTF8MB4
    status_flags: int = SERVER_STATUS_AUTOCOMMIT
    auth_plugin_name: str = "mysql_native_password"
    protocol_version: int = 10

    @property
    def version(self) -> str:
        """The server version without MariaDB's "5.5.5-" compatibility prefix."""
        return _split_version(self.server_version)

    @property
    def is_mariadb(self) -> bool:
        return "mariadb" in self.server_version.lower()

    @classmethod
    def parse(cls, payload: bytes) -> "Handshake":
        if not payload:
            raise ProtocolViolation("empty handshake packet", ER_HANDSHAKE_ERROR, "08S01")
        if payload[0] == ERR_HEADER:
            # Servers refuse early (too many connections, host blocked) with an ERR packet.
            raise ServerError(ErrPacket.parse(payload, CLIENT_PROTOCOL_41), "server refused the connection")
        if payload[0] != 10:
            raise ProtocolViolation(f"unsupported handshake protocol version {payload[0]} "
                                    "(only HandshakeV10 is supported)", ER_HANDSHAKE_ERROR, "08S01")
        version, pos = read_nul_str(payload, 1)
        connection_id = _u32(payload, pos, "the connection id")
        pos += 4
        if pos + 9 > len(payload):
            raise _truncated("the handshake's first nonce part")
        nonce = bytes(payload[pos:pos + 8])
        pos += 9                                  # 8 bytes + a filler NUL
        caps = _u16(payload, pos, "the capability flags")
        pos += 2
        charset, status, data_len = CHARSET_UTF8MB4, 0, 0
        if pos < len(payload):
            if pos + 16 > len(payload):
                raise _truncated("the handshake's extended fields")
            charset = payload[pos]
            status = _U16.unpack_from(payload, pos + 1)[0]
            caps |= _U16.unpack_from(payload, pos + 3)[0] << 16
            data_len = payload[pos + 5]
            if not caps & CLIENT_MYSQL:
                caps |= _U32.unpack_from(payload, pos + 12)[0] << 32
            pos += 16                             # 1 + 2 + 2 + 1 + 10 reserved
            if caps & CLIENT_SECURE_CONNECTION:
                n = max(13, data_len - 8)
                part2 = bytes(payload[pos:pos + n])
                if len(part2) < n:
                    raise _truncated("the handshake's second nonce part")
                pos += n
                # The second part ends with a NUL that is not part of the nonce.
                nonce += part2[:-1] if part2.endswith(b"\x00") else part2
        plugin = ""
        if caps & CLIENT_PLUGIN_AUTH and pos < len(payload):
            # Some old servers omit the final NUL.
            end = payload.find(b"\x00", pos)
            plugin = _dec(bytes(payload[pos:end if end >= 0 else len(payload)]))
        return cls(server_version=_dec(version), connection_id=connection_id,
                   auth_plugin_data=nonce, capabilities=caps, charset=charset,
                   status_flags=status, auth_plugin_name=plugin or "mysql_native_password",
                   protocol_version=10)

    def build(self) -> bytes:
        caps = self.capabilities
        nonce = bytes(self.auth_plugin_data)
        if len(nonce) < 8:
            raise ValueError("auth_plugin_data needs at least 8 bytes")
        ext = (caps >> 32) & 0xFFFFFFFF
        if ext:
            caps &= ~CLIENT_MYSQL                # announces the extended field (MariaDB)
        part2 = nonce[8:] + b"\x00"
        out = [
            b"\x0a", nul_str(self.server_version), _U32.pack(self.connection_id & 0xFFFFFFFF),
            nonce[:8], b"\x00", _U16.pack(caps & 0xFFFF), bytes((self.charset & 0xFF,)),
            _U16.pack(self.status_flags & 0xFFFF), _U16.pack((caps >> 16) & 0xFFFF),
            bytes((len(nonce) + 1 if caps & CLIENT_PLUGIN_AUTH else 0,)),
            b"\x00" * 6, _U32.pack(ext),
        ]
        if caps & CLIENT_SECURE_CONNECTION:
            out.append(part2.ljust(13, b"\x00"))
        if caps & CLIENT_PLUGIN_AUTH:
            out.append(nul_str(self.auth_plugin_name))
        return b"".join(out)


SSL_REQUEST_LENGTH = 32


@dataclass(slots=True)
class HandshakeResponse:
    """HandshakeResponse41 (the client's login packet) or, when `ssl_request` is set, the
    32-byte SSLRequest a client sends before starting TLS (same first fields, nothing else).

    `capabilities` includes MariaDB's extended capabilities in bits 32..63 (sent only when
    the client clears CLIENT_MYSQL). `auth_response` is the raw scramble; `auth_plugin_name`
    is "" when the client sent none.
    """

    capabilities: int
    username: str = ""
    auth_response: bytes = b""
    database: str | None = None
    auth_plugin_name: str = ""
    charset: int = CHARSET_UTF8MB4
    max_packet_size: int = 1 << 24
    connect_attrs: dict[str, str] = field(default_factory=dict)
    ssl_request: bool = False
    zstd_level: int | None = None

    @staticmethod
    def is_ssl_request(payload: bytes) -> bool:
        """True for the short SSLRequest packet (CLIENT_SSL set, nothing after the filler)."""
        return (len(payload) == SSL_REQUEST_LENGTH
                and bool(_U32.unpack_from(payload, 0)[0] & CLIENT_SSL))

    @classmethod
    def parse(cls, payload: bytes) -> "HandshakeResponse":
        if len(payload) < 4:
            raise ProtocolViolation("handshake response too short", ER_HANDSHAKE_ERROR, "08S01")
        caps = _U32.unpack_from(payload, 0)[0]
        if not caps & CLIENT_PROTOCOL_41:
            raise ProtocolViolation("pre-4.1 clients (HandshakeResponse320) are not supported",
                                    ER_NOT_SUPPORTED_AUTH_MODE, "08004")
        if len(payload) < SSL_REQUEST_LENGTH:
            raise ProtocolViolation("handshake response too short", ER_HANDSHAKE_ERROR, "08S01")
        max_packet = _U32.unpack_from(payload, 4)[0]
        charset = payload[8]
        if not caps & CLIENT_MYSQL:
            caps |= _U32.unpack_from(payload, 28)[0] << 32
        if len(payload) == SSL_REQUEST_LENGTH and caps & CLIENT_SSL:
            return cls(capabilities=caps, charset=charset, max_packet_size=max_packet,
                       ssl_request=True)
        pos = SSL_REQUEST_LENGTH
        user, pos = read_nul_str(payload, pos)
        if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
            auth, pos = read_lenenc_str(payload, pos)
            auth = auth or b""
        elif caps & CLIENT_SECURE_CONNECTION:
            if pos >= len(payload):
                raise _truncated("the auth response length")
            n = payload[pos]
            auth = bytes(payload[pos + 1:pos + 1 + n])
            if len(auth) < n:
                raise _truncated("the auth response")
            pos += 1 + n
        else:
            auth, pos = read_nul_str(payload, pos)
        database = None
        if caps & CLIENT_CONNECT_WITH_DB and pos < len(payload):
            raw, pos = read_nul_str(payload, pos)
            database = _dec(raw)
        plugin = ""
        if caps & CLIENT_PLUGIN_AUTH and pos < len(payload):
            raw, pos = read_nul_str(payload, pos)
            plugin = _dec(raw)
        attrs: dict[str, str] = {}
        if caps & CLIENT_CONNECT_ATTRS and pos < len(payload):
            total, pos = read_lenenc_int(payload, pos)
            end = pos + (total or 0)
            if end > len(payload):
                raise _truncated("the connection attributes")
            while pos < end:
                key, pos = read_lenenc_str(payload, pos)
                value, pos = read_lenenc_str(payload, pos)
                if pos > end:
                    raise _truncated("a connection attribute")
                attrs[_dec(key or b"")] = _dec(value or b"")
        zstd = None
        if caps & CLIENT_ZSTD_COMPRESSION_ALGORITHM and pos < len(payload):
            zstd = payload[pos]
        return cls(capabilities=caps, username=_dec(user), auth_response=auth,
                   database=database, auth_plugin_name=plugin, charset=charset,
                   max_packet_size=max_packet, connect_attrs=attrs, zstd_level=zstd)

    def build(self) -> bytes:
        caps = self.capabilities
        ext = (caps >> 32) & 0xFFFFFFFF
        if ext:
            caps &= ~CLIENT_MYSQL
        head = (_U32.pack(caps & 0xFFFFFFFF) + _U32.pack(self.max_packet_size & 0xFFFFFFFF)
                + bytes((self.charset & 0xFF,)) + b"\x00" * 19 + _U32.pack(ext))
        if self.ssl_request:
            return head
        out = [head, nul_str(self.username)]
        auth = bytes(self.auth_response)
        if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
            out.append(lenenc_str(auth))
        elif caps & CLIENT_SECURE_CONNECTION:
            if len(auth) > 255:
                raise ValueError("auth response over 255 bytes needs "
                                 "CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA")
            out.append(bytes((len(auth),)) + auth)
        else:
            out.append(nul_str(auth))
        if caps & CLIENT_CONNECT_WITH_DB:
            out.append(nul_str(self.database or ""))
        if caps & CLIENT_PLUGIN_AUTH:
            out.append(nul_str(self.auth_plugin_name))
        if caps & CLIENT_CONNECT_ATTRS:
            body = b"".join(lenenc_str(k) + lenenc_str(v) for k, v in self.connect_attrs.items())
            out.append(lenenc_int(len(body)) + body)
        if caps & CLIENT_ZSTD_COMPRESSION_ALGORITHM:
            out.append(bytes(((self.zstd_level or 3) & 0xFF,)))
        return b"".join(out)


# --- authentication exchange ------------------------------------------------------------------

@dataclass(slots=True)
class AuthSwitchRequest:
    """0xFE + plugin name + plugin data: the server asks for another auth method (and gives
    a new nonce). `plugin_data` is raw (usually the nonce plus a NUL); `nonce` strips the NUL."""

    plugin_name: str
    plugin_data: bytes = b""

    @property
    def nonce(self) -> bytes:
        data = self.plugin_data
        return data[:-1] if data.endswith(b"\x00") else data

    @classmethod
    def parse(cls, payload: bytes) -> "AuthSwitchRequest":
        if not payload or payload[0] != AUTH_SWITCH_HEADER:
            raise ProtocolViolation("not an AuthSwitchRequest packet")
        if len(payload) == 1:
            # The pre-4.1 "old password" switch request.
            raise ProtocolViolation("the server asked for the pre-4.1 mysql_old_password method",
                                    ER_NOT_SUPPORTED_AUTH_MODE, "08004")
        name, pos = read_nul_str(payload, 1)
        return cls(_dec(name), bytes(payload[pos:]))

    def build(self) -> bytes:
        return b"\xfe" + nul_str(self.plugin_name) + bytes(self.plugin_data)


@dataclass(slots=True)
class AuthMoreData:
    """0x01 + data: plugin-specific data from the server during authentication
    (caching_sha2_password's fast-auth result byte, or a PEM public key)."""

    data: bytes

    @classmethod
    def parse(cls, payload: bytes) -> "AuthMoreData":
        if not payload or payload[0] != AUTH_MORE_DATA_HEADER:
            raise ProtocolViolation("not an AuthMoreData packet")
        return cls(bytes(payload[1:]))

    def build(self) -> bytes:
        return b"\x01" + bytes(self.data)


# --- generic responses ------------------------------------------------------------------------

def _parse_session_changes(raw: bytes) -> list[tuple[int, bytes]]:
    changes = []
    pos = 0
    while pos < len(raw):
        kind = raw[pos]
        data, pos = read_lenenc_str(raw, pos + 1)
        changes.append((kind, data or b""))
    return changes


@dataclass(slots=True)
class OkPacket:
    """OK packet (header 0x00, or 0xFE when it ends a result set under CLIENT_DEPRECATE_EOF).

    `session_state_changes` is a list of (type, data) with SESSION_TRACK_* types and the
    raw lenenc-decoded data of each entry; `system_variables()` and `schema()` decode the
    common ones.
    """

    affected_rows: int = 0
    last_insert_id: int = 0
    status_flags: int = SERVER_STATUS_AUTOCOMMIT
    warnings: int = 0
    info: str = ""
    session_state_changes: list[tuple[int, bytes]] = field(default_factory=list)
    header: int = OK_HEADER

    @classmethod
    def parse(cls, payload: bytes, capabilities: int) -> "OkPacket":
        if not payload or payload[0] not in (OK_HEADER, EOF_HEADER):
            raise ProtocolViolation("not an OK packet")
        affected, pos = read_lenenc_int(payload, 1)
        insert_id, pos = read_lenenc_int(payload, pos)
        status = warnings = 0
        if capabilities & CLIENT_PROTOCOL_41:
            if pos + 4 > len(payload):
                raise _truncated("the OK packet's status")
            status, warnings = _HH.unpack_from(payload, pos)
            pos += 4
        elif capabilities & CLIENT_TRANSACTIONS:
            status = _u16(payload, pos, "the OK packet's status")
            pos += 2
        info = b""
        changes: list[tuple[int, bytes]] = []
        if pos < len(payload):
            if capabilities & CLIENT_SESSION_TRACK:
                info, pos = read_lenenc_str(payload, pos)
                if status & SERVER_SESSION_STATE_CHANGED and pos < len(payload):
                    raw, pos = read_lenenc_str(payload, pos)
                    changes = _parse_session_changes(raw or b"")
            else:
                # Documented as string<EOF>, but servers write it length-encoded.
                rest = bytes(payload[pos:])
                try:
                    text, end = read_lenenc_str(rest, 0)
                except ProtocolViolation:
                    text, end = None, -1
                info = text if end == len(rest) and text is not None else rest
        return cls(affected or 0, insert_id or 0, status, warnings, _dec(info or b""), changes,
                   payload[0])

    def build(self, capabilities: int) -> bytes:
        status = self.status_flags
        if self.session_state_changes:
            status |= SERVER_SESSION_STATE_CHANGED
        out = [bytes((self.header,)), lenenc_int(self.affected_rows),
               lenenc_int(self.last_insert_id)]
        if capabilities & CLIENT_PROTOCOL_41:
            out.append(_HH.pack(status & 0xFFFF, self.warnings & 0xFFFF))
        elif capabilities & CLIENT_TRANSACTIONS:
            out.append(_U16.pack(status & 0xFFFF))
        if capabilities & CLIENT_SESSION_TRACK:
            if self.info or self.session_state_changes:
                out.append(lenenc_str(self.info))
            if self.session_state_changes:
                body = b"".join(bytes((kind,)) + lenenc_str(data)
                                for kind, data in self.session_state_changes)
                out.append(lenenc_str(body))
        elif self.info:
            out.append(lenenc_str(self.info))
        return b"".join(out)

    def system_variables(self) -> dict[str, str]:
        """SESSION_TRACK_SYSTEM_VARIABLES entries as {name: value} (last one wins)."""
        result = {}
        for kind, data in self.session_state_changes:
            if kind == SESSION_TRACK_SYSTEM_VARIABLES:
                name, pos = read_lenenc_str(data, 0)
                value, _ = read_lenenc_str(data, pos)
                result[_dec(name or b"")] = _dec(value or b"")
        return result

    def schema(self) -> str | None:
        """The new default database from a SESSION_TRACK_SCHEMA entry, if any."""
        found = None
        for kind, data in self.session_state_changes:
            if kind == SESSION_TRACK_SCHEMA:
                name, _ = read_lenenc_str(data, 0)
                found = _dec(name or b"")
        return found


@dataclass(slots=True)
class ErrPacket:
    """ERR packet: error number, SQLSTATE and message. A MariaDB progress report is also
    an ERR packet (code PROGRESS_REPORT_CODE); it is not an error (see `is_progress`)."""

    code: int
    message: str
    sqlstate: str = "HY000"

    @property
    def is_progress(self) -> bool:
        return self.code == PROGRESS_REPORT_CODE

    @classmethod
    def parse(cls, payload: bytes, capabilities: int = CLIENT_PROTOCOL_41) -> "ErrPacket":
        if not payload or payload[0] != ERR_HEADER:
            raise ProtocolViolation("not an ERR packet")
        code = _u16(payload, 1, "the error code")
        pos = 3
        if code == PROGRESS_REPORT_CODE:
            return cls(code, _dec(bytes(payload[pos:])), "")
        sqlstate = "HY000"
        # The '#' marker is checked rather than the capability: servers refusing a
        # connection before the handshake send ERR packets without it.
        if len(payload) >= pos + 6 and payload[pos] == 0x23:
            sqlstate = payload[pos + 1:pos + 6].decode("ascii", "replace")
            pos += 6
        return cls(code, bytes(payload[pos:]).decode("utf-8", "replace"), sqlstate)

    def build(self, capabilities: int = CLIENT_PROTOCOL_41) -> bytes:
        out = b"\xff" + _U16.pack(self.code & 0xFFFF)
        if capabilities & CLIENT_PROTOCOL_41:
            state = self.sqlstate.encode("ascii")
            if len(state) != 5:
                raise ValueError(f"SQLSTATE must have 5 characters, not {self.sqlstate!r}")
            out += b"#" + state
        return out + self.message.encode("utf-8")


@dataclass(slots=True)
class EofPacket:
    """EOF packet (0xFE, fewer than 9 bytes): warnings and status flags."""

    warnings: int = 0
    status_flags: int = SERVER_STATUS_AUTOCOMMIT

    @classmethod
    def parse(cls, payload: bytes, capabilities: int = CLIENT_PROTOCOL_41) -> "EofPacket":
        if not payload or payload[0] != EOF_HEADER or len(payload) >= 9:
            raise ProtocolViolation("not an EOF packet")
        if capabilities & CLIENT_PROTOCOL_41 and len(payload) >= 5:
            warnings, status = _HH.unpack_from(payload, 1)
            return cls(warnings, status)
        return cls(0, 0)

    def build(self, capabilities: int = CLIENT_PROTOCOL_41) -> bytes:
        if capabilities & CLIENT_PROTOCOL_41:
            return b"\xfe" + _HH.pack(self.warnings & 0xFFFF, self.status_flags & 0xFFFF)
        return b"\xfe"


def eof_or_ok(status_flags: int, capabilities: int, warnings: int = 0) -> bytes:
    """The packet that ends a result set (or its metadata): an OK packet with a 0xFE header
    under CLIENT_DEPRECATE_EOF, an EOF packet otherwise."""
    if capabilities & CLIENT_DEPRECATE_EOF:
        return OkPacket(status_flags=status_flags, warnings=warnings,
                        header=EOF_HEADER).build(capabilities)
    return EofPacket(warnings, status_flags).build(capabilities)


@dataclass(slots=True)
class LocalInfileRequest:
    """0xFB + file name: the server asks the client to send a file (LOAD DATA LOCAL INFILE).
    The client answers with the file's contents in packets and an empty packet."""

    filename: str

    @classmethod
    def parse(cls, payload: bytes) -> "LocalInfileRequest":
        if not payload or payload[0] != LOCAL_INFILE_HEADER:
            raise ProtocolViolation("not a LOCAL INFILE request")
        return cls(_dec(bytes(payload[1:])))

    def build(self) -> bytes:
        return b"\xfb" + _enc(self.filename)


# Kinds of server packets, as told apart by response_kind().
RESPONSE_OK = "ok"
RESPONSE_ERR = "err"
RESPONSE_EOF = "eof"
RESPONSE_LOCAL_INFILE = "local_infile"
RESPONSE_RESULT_SET = "result_set"
RESPONSE_ROW = "row"


def response_kind(payload: bytes, capabilities: int, *, in_rows: bool = False) -> str:
    """What a server packet is, given the negotiated capabilities and where it comes.

    `in_rows=False`: the first packet of a response (or of the next result after
    SERVER_MORE_RESULTS_EXISTS): OK, ERR, LOCAL INFILE request, or a result-set header
    (column count). `in_rows=True`: a packet where rows may come: a row, ERR, or the end
    of the result set, which is an OK packet with a 0xFE header (shorter than 16 MiB)
    under CLIENT_DEPRECATE_EOF and an EOF packet (0xFE, fewer than 9 bytes) otherwise;
    longer 0xFE packets are text rows whose first value is 16 MiB or more.
    """
    if not payload:
        raise ProtocolViolation("empty packet from the server")
    first = payload[0]
    if in_rows:
        if first == EOF_HEADER:
            if capabilities & CLIENT_DEPRECATE_EOF:
                if len(payload) < MAX_PACKET_LENGTH:
                    return RESPONSE_OK
            elif len(payload) < 9:
                return RESPONSE_EOF
        elif first == ERR_HEADER:
            return RESPONSE_ERR
        return RESPONSE_ROW
    if first == OK_HEADER:
        return RESPONSE_OK
    if first == ERR_HEADER:
        return RESPONSE_ERR
    if first == LOCAL_INFILE_HEADER:
        return RESPONSE_LOCAL_INFILE
    if first == EOF_HEADER and len(payload) < 9:
        return RESPONSE_OK if capabilities & CLIENT_DEPRECATE_EOF else RESPONSE_EOF
    return RESPONSE_RESULT_SET


# --- result sets ------------------------------------------------------------------------------

@dataclass(slots=True)
class ColumnDefinition:
    """ColumnDefinition41. `extended_info` is MariaDB's extra field (only on the wire when
    MARIADB_CLIENT_EXTENDED_METADATA is negotiated); `default` only appears in
    COM_FIELD_LIST responses."""

    name: str
    type: int = MYSQL_TYPE_VAR_STRING
    charset: int = CHARSET_UTF8MB4
    length: int = 0
    flags: int = 0
    decimals: int = 0
    schema: str = ""
    table: str = ""
    org_table: str = ""
    org_name: str = ""
    catalog: str = "def"
    extended_info: bytes = b""
    default: bytes | None = None

    @classmethod
    def parse(cls, payload: bytes, capabilities: int = 0) -> "ColumnDefinition":
        pos = 0
        strings = []
        for _ in range(6):
            value, pos = read_lenenc_str(payload, pos)
            strings.append(_dec(value or b""))
        extended = b""
        if capabilities & MARIADB_CLIENT_EXTENDED_METADATA:
            extended, pos = read_lenenc_str(payload, pos)
        fixed, pos = read_lenenc_int(payload, pos)
        if fixed is None or pos + 12 > len(payload):
            raise _truncated("a column definition")
        charset, length = struct.unpack_from("<HI", payload, pos)
        ctype = payload[pos + 6]
        flags = _U16.unpack_from(payload, pos + 7)[0]
        decimals = payload[pos + 9]
        pos += fixed
        default = None
        if pos < len(payload):
            default, pos = read_lenenc_str(payload, pos)
        catalog, schema, table, org_table, name, org_name = strings
        return cls(name=name, type=ctype, charset=charset, length=length, flags=flags,
                   decimals=decimals, schema=schema, table=table, org_table=org_table,
                   org_name=org_name, catalog=catalog, extended_info=extended or b"",
                   default=default)

    def build(self, capabilities: int = 0) -> bytes:
        out = [lenenc_str(self.catalog), lenenc_str(self.schema), lenenc_str(self.table),
               lenenc_str(self.org_table), lenenc_str(self.name),
               lenenc_str(self.org_name)]
        if capabilities & MARIADB_CLIENT_EXTENDED_METADATA:
            out.append(lenenc_str(self.extended_info))
        out.append(b"\x0c" + struct.pack("<HIBHB", self.charset, self.length, self.type,
                                         self.flags, self.decimals) + b"\x00\x00")
        if self.default is not None:
            out.append(lenenc_str(self.default))
        return b"".join(out)


def column_count(n: int, capabilities: int = 0, *, metadata_follows: bool = True) -> bytes:
    """The result-set header packet: the column count (and MariaDB's metadata-follows byte
    when MARIADB_CLIENT_CACHE_METADATA is negotiated)."""
    out = lenenc_int(n)
    if capabilities & MARIADB_CLIENT_CACHE_METADATA:
        out += b"\x01" if metadata_follows else b"\x00"
    return out


def text_row(values: Iterable[str | bytes | int | float | None]) -> bytes:
    """A text-protocol row: each value a length-encoded string, NULL as 0xFB."""
    out = []
    for value in values:
        if value is None:
            out.append(b"\xfb")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(lenenc_str(str(value)))
        else:
            out.append(lenenc_str(value))
    return b"".join(out)


def parse_text_row(payload: bytes, columns: int) -> list[bytes | None]:
    """The values of a text-protocol row (bytes, or None for NULL)."""
    values = []
    pos = 0
    for _ in range(columns):
        value, pos = read_lenenc_str(payload, pos)
        values.append(value)
    return values


def result_set(columns: Sequence[ColumnDefinition], rows: Iterable[Sequence], capabilities: int,
               *, status_flags: int = SERVER_STATUS_AUTOCOMMIT, seq: int = 1) -> bytes:
    """A whole text-protocol result set as wire bytes, starting at sequence id `seq`
    (1 after a command). For servers written with this module (tests, the proxy's own
    answers)."""
    payloads = [column_count(len(columns), capabilities)]
    payloads += [c.build(capabilities) for c in columns]
    if not capabilities & CLIENT_DEPRECATE_EOF:
        payloads.append(EofPacket(0, status_flags).build(capabilities))
    payloads += [text_row(r) for r in rows]
    payloads.append(eof_or_ok(status_flags, capabilities))
    out = []
    for payload in payloads:
        out.append(packet(seq, payload))
        seq = seq_after(seq, len(payload))
    return b"".join(out)


# --- prepared statements ----------------------------------------------------------------------

@dataclass(slots=True)
class PrepareOk:
    """COM_STMT_PREPARE_OK: the first packet of a successful prepare. Then come
    `num_params` parameter definitions and `num_columns` column definitions, each group
    followed by an EOF packet unless CLIENT_DEPRECATE_EOF."""

    statement_id: int
    num_columns: int
    num_params: int
    warnings: int = 0

    @classmethod
    def parse(cls, payload: bytes) -> "PrepareOk":
        if len(payload) < 12 or payload[0] != OK_HEADER:
            raise ProtocolViolation("not a COM_STMT_PREPARE_OK packet")
        stmt_id, ncols, nparams = struct.unpack_from("<IHH", payload, 1)
        warnings = _U16.unpack_from(payload, 10)[0]
        return cls(stmt_id, ncols, nparams, warnings)

    def build(self) -> bytes:
        return b"\x00" + struct.pack("<IHHBH", self.statement_id, self.num_columns,
                                     self.num_params, 0, self.warnings)


STATEMENT_ID_COMMANDS = frozenset((COM_STMT_EXECUTE, COM_STMT_SEND_LONG_DATA, COM_STMT_CLOSE,
                                   COM_STMT_RESET, COM_STMT_FETCH, COM_STMT_BULK_EXECUTE))


def statement_id(payload: bytes) -> int:
    """The statement id of a COM_STMT_EXECUTE / SEND_LONG_DATA / CLOSE / RESET / FETCH /
    BULK_EXECUTE payload (the 4 bytes after the command byte)."""
    if len(payload) < 5 or payload[0] not in STATEMENT_ID_COMMANDS:
        raise ProtocolViolation("not a statement command, or too short for a statement id")
    return _U32.unpack_from(payload, 1)[0]


def with_statement_id(payload: bytes, new_id: int) -> bytes:
    """The same command payload naming statement `new_id` instead (for remapping a client's
    statement ids to a server connection's own)."""
    if len(payload) < 5 or payload[0] not in STATEMENT_ID_COMMANDS:
        raise ProtocolViolation("not a statement command, or too short for a statement id")
    return payload[:1] + _U32.pack(new_id & 0xFFFFFFFF) + payload[5:]


def rewrite_statement_id(buf: bytearray, new_id: int, offset: int = 0) -> None:
    """In place: set the statement id of the command payload starting at buf[offset]."""
    _U32.pack_into(buf, offset + 1, new_id & 0xFFFFFFFF)


@dataclass(slots=True)
class StmtExecute:
    """COM_STMT_EXECUTE, split into its parts (without MySQL 8 query attributes).

    Parsing needs the statement's parameter count (from its PrepareOk). When
    `new_params_bound` is false the client relies on the types it bound in an earlier
    execute of the same statement on the same server connection: a proxy that runs the
    statement on another connection (or re-prepares it) must send the remembered
    `param_types` instead (see `with_types`).
    """

    statement_id: int
    flags: int = CURSOR_TYPE_NO_CURSOR
    iteration_count: int = 1
    null_bitmap: bytes = b""
    new_params_bound: bool = False
    param_types: bytes = b""       # 2 bytes per parameter: type, then 0x80 if unsigned
    values: bytes = b""            # the binary parameter values, as sent

    @property
    def cursor_type(self) -> int:
        return self.flags & CURSOR_TYPE_MASK

    @classmethod
    def parse(cls, payload: bytes, num_params: int) -> "StmtExecute":
        if len(payload) < 10 or payload[0] != COM_STMT_EXECUTE:
            raise ProtocolViolation("COM_STMT_EXECUTE too short")
        stmt_id, flags, iterations = struct.unpack_from("<IBI", payload, 1)
        pos = 10
        if flags & PARAMETER_COUNT_AVAILABLE:
            count, pos = read_lenenc_int(payload, pos)
            num_params = count or 0
        if num_params <= 0:
            return cls(stmt_id, flags, iterations)
        nb = (num_params + 7) // 8
        if pos + nb + 1 > len(payload):
            raise _truncated("the parameter null bitmap")
        bitmap = bytes(payload[pos:pos + nb])
        bound = payload[pos + nb] == 1
        pos += nb + 1
        types = b""
        if bound:
            types = bytes(payload[pos:pos + 2 * num_params])
            if len(types) < 2 * num_params:
                raise _truncated("the parameter types")
            pos += 2 * num_params
        return cls(stmt_id, flags, iterations, bitmap, bound, types, bytes(payload[pos:]))

    def with_types(self, param_types: bytes) -> "StmtExecute":
        """A copy that binds `param_types` explicitly (new_params_bound set)."""
        return StmtExecute(self.statement_id, self.flags, self.iteration_count,
                           self.null_bitmap, True, bytes(param_types), self.values)

    def build(self) -> bytes:
        out = [struct.pack("<BIBI", COM_STMT_EXECUTE, self.statement_id & 0xFFFFFFFF,
                           self.flags & ~PARAMETER_COUNT_AVAILABLE, self.iteration_count)]
        if self.null_bitmap:
            out.append(self.null_bitmap)
            out.append(b"\x01" + self.param_types if self.new_params_bound else b"\x00")
            out.append(self.values)
        return b"".join(out)


def _binary_param(value) -> tuple[int, bytes]:
    """(2-byte type code, encoded value) of a Python value as a COM_STMT_EXECUTE parameter."""
    if isinstance(value, bool):
        return MYSQL_TYPE_TINY, bytes((int(value),))
    if isinstance(value, int):
        if value >= 1 << 63:
            return MYSQL_TYPE_LONGLONG | 0x8000, _U64.pack(value)
        return MYSQL_TYPE_LONGLONG, _I64.pack(value)
    if isinstance(value, float):
        return MYSQL_TYPE_DOUBLE, _F64.pack(value)
    if isinstance(value, str):
        return MYSQL_TYPE_VAR_STRING, lenenc_str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return MYSQL_TYPE_BLOB, lenenc_str(bytes(value))
    raise TypeError(f"cannot send a {type(value).__name__} as a statement parameter")


def com_stmt_execute(statement: int, params: Sequence = (), *,
                     flags: int = CURSOR_TYPE_NO_CURSOR) -> bytes:
    """A COM_STMT_EXECUTE payload binding `params` (None, bool, int, float, str, bytes)."""
    if not params:
        return StmtExecute(statement, flags).build()
    bitmap = bytearray((len(params) + 7) // 8)
    types = []
    values = []
    for i, value in enumerate(params):
        if value is None:
            bitmap[i // 8] |= 1 << (i % 8)
            types.append(_U16.pack(MYSQL_TYPE_NULL))
            continue
        code, raw = _binary_param(value)
        types.append(_U16.pack(code))
        values.append(raw)
    return StmtExecute(statement, flags, 1, bytes(bitmap), True, b"".join(types),
                       b"".join(values)).build()


# --- command builders -------------------------------------------------------------------------

def com_query(sql: str | bytes) -> bytes:
    return b"\x03" + _enc(sql)


def com_init_db(database: str) -> bytes:
    return b"\x02" + _enc(database)


def com_ping() -> bytes:
    return b"\x0e"


def com_quit() -> bytes:
    return b"\x01"


def com_statistics() -> bytes:
    return b"\x09"


def com_reset_connection() -> bytes:
    return b"\x1f"


def com_field_list(table: str, wildcard: str = "") -> bytes:
    return b"\x04" + nul_str(table) + _enc(wildcard)


def com_set_option(option: int) -> bytes:
    return b"\x1b" + _U16.pack(option)


def com_process_kill(connection_id: int) -> bytes:
    return b"\x0c" + _U32.pack(connection_id & 0xFFFFFFFF)


def com_stmt_prepare(sql: str | bytes) -> bytes:
    return b"\x16" + _enc(sql)


def com_stmt_close(statement: int) -> bytes:
    return b"\x19" + _U32.pack(statement)


def com_stmt_reset(statement: int) -> bytes:
    return b"\x1a" + _U32.pack(statement)


def com_stmt_fetch(statement: int, rows: int) -> bytes:
    return b"\x1c" + _U32.pack(statement) + _U32.pack(rows)


def com_stmt_send_long_data(statement: int, param: int, data: bytes) -> bytes:
    return b"\x18" + _U32.pack(statement) + _U16.pack(param) + bytes(data)


@dataclass(slots=True)
class ChangeUser:
    """COM_CHANGE_USER: log in again as another user on the same connection. The auth
    response is computed with the nonce of the connection's handshake; the server may
    answer with an AuthSwitchRequest carrying a new one."""

    username: str
    auth_response: bytes = b""
    database: str = ""
    charset: int = CHARSET_UTF8MB4
    auth_plugin_name: str = "mysql_native_password"
    connect_attrs: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, payload: bytes, capabilities: int) -> "ChangeUser":
        if not payload or payload[0] != COM_CHANGE_USER:
            raise ProtocolViolation("not a COM_CHANGE_USER packet")
        user, pos = read_nul_str(payload, 1)
        if capabilities & CLIENT_SECURE_CONNECTION:
            if pos >= len(payload):
                raise _truncated("the auth response length")
            n = payload[pos]
            auth = bytes(payload[pos + 1:pos + 1 + n])
            if len(auth) < n:
                raise _truncated("the auth response")
            pos += 1 + n
        else:
            auth, pos = read_nul_str(payload, pos)
        database, pos = read_nul_str(payload, pos)
        charset, plugin, attrs = CHARSET_UTF8MB4, "", {}
        if pos + 2 <= len(payload):
            charset = _U16.unpack_from(payload, pos)[0]
            pos += 2
            if capabilities & CLIENT_PLUGIN_AUTH and pos < len(payload):
                raw, pos = read_nul_str(payload, pos)
                plugin = _dec(raw)
            if capabilities & CLIENT_CONNECT_ATTRS and pos < len(payload):
                total, pos = read_lenenc_int(payload, pos)
                end = pos + (total or 0)
                while pos < end:
                    key, pos = read_lenenc_str(payload, pos)
                    value, pos = read_lenenc_str(payload, pos)
                    attrs[_dec(key or b"")] = _dec(value or b"")
        return cls(_dec(user), auth, _dec(database), charset, plugin, attrs)

    def build(self, capabilities: int) -> bytes:
        auth = bytes(self.auth_response)
        out = [b"\x11", nul_str(self.username)]
        if capabilities & CLIENT_SECURE_CONNECTION:
            out.append(bytes((len(auth),)) + auth)
        else:
            out.append(nul_str(auth))
        out.append(nul_str(self.database))
        out.append(_U16.pack(self.charset))
        if capabilities & CLIENT_PLUGIN_AUTH:
            out.append(nul_str(self.auth_plugin_name))
        if capabilities & CLIENT_CONNECT_ATTRS:
            body = b"".join(lenenc_str(k) + lenenc_str(v) for k, v in self.connect_attrs.items())
            out.append(lenenc_int(len(body)) + body)
        return b"".join(out)


# --- response tracking ------------------------------------------------------------------------

# Tracker states
_DONE = 0
_FIRST = 1            # first packet of a (next) result: OK / ERR / INFILE / column count
_COLUMNS = 2          # column definitions
_COLUMNS_EOF = 3      # the EOF after column definitions (no CLIENT_DEPRECATE_EOF)
_ROWS = 4             # rows until EOF / OK(0xFE) / ERR
_INFILE_CLIENT = 5    # LOCAL INFILE: waiting for the client's file packets
_INFILE_RESULT = 6    # LOCAL INFILE: waiting for the server's OK / ERR
_SINGLE = 7           # exactly one packet: OK / EOF / ERR (or anything, for COM_STATISTICS)
_PREPARE_FIRST = 8    # COM_STMT_PREPARE_OK or ERR
_PREP_PARAMS = 9
_PREP_PARAMS_EOF = 10
_PREP_COLUMNS = 11
_PREP_COLUMNS_EOF = 12
_FIELD_LIST = 13      # column definitions until EOF / ERR
_AUTH = 14            # COM_CHANGE_USER: OK / ERR / auth switch / more data
_AUTH_CLIENT = 15     # COM_CHANGE_USER: waiting for the client's auth data

_STATE_NAMES = {
    _DONE: "done", _FIRST: "first", _COLUMNS: "columns", _COLUMNS_EOF: "columns_eof",
    _ROWS: "rows", _INFILE_CLIENT: "infile_client", _INFILE_RESULT: "infile_result",
    _SINGLE: "single", _PREPARE_FIRST: "prepare", _PREP_PARAMS: "prepare_params",
    _PREP_PARAMS_EOF: "prepare_params_eof", _PREP_COLUMNS: "prepare_columns",
    _PREP_COLUMNS_EOF: "prepare_columns_eof", _FIELD_LIST: "field_list", _AUTH: "auth",
    _AUTH_CLIENT: "auth_client",
}

# Commands answered by exactly one OK / EOF / ERR packet.
_SINGLE_PACKET_COMMANDS = frozenset((
    COM_INIT_DB, COM_PING, COM_RESET_CONNECTION, COM_SET_OPTION, COM_STMT_RESET,
    COM_PROCESS_KILL, COM_REFRESH, COM_SHUTDOWN, COM_DEBUG, COM_CREATE_DB, COM_DROP_DB,
    COM_SLEEP, COM_TIME, COM_CONNECT, COM_DELAYED_INSERT, COM_STATISTICS,
))
# Commands the server never answers.
_NO_RESPONSE_COMMANDS = frozenset((COM_QUIT, COM_STMT_CLOSE, COM_STMT_SEND_LONG_DATA))
# Commands whose answer is a replication stream or otherwise not a request/response.
_UNTRACKABLE_COMMANDS = frozenset((COM_BINLOG_DUMP, COM_BINLOG_DUMP_GTID, COM_TABLE_DUMP,
                                   COM_REGISTER_SLAVE, COM_CONNECT_OUT, COM_DAEMON))
UNTRACKED_CAPABILITIES = CLIENT_OPTIONAL_RESULTSET_METADATA | CLIENT_COMPRESS


class ResponseTracker:
    """Follows the server's answer to one command and says when it is complete.

    Create one per command sent, with the command's payload (only its first bytes are
    read: the command byte, and the cursor flags of a COM_STMT_EXECUTE) and the negotiated
    capabilities; then feed() it each server packet payload in order. feed() returns True
    once the response is complete (after that, `done` is True and feed() raises).

    Handled: OK / ERR for the simple commands; result sets with and without
    CLIENT_DEPRECATE_EOF; multi-statements and multi-results (SERVER_MORE_RESULTS_EXISTS
    in an OK or in the packet ending a result set); LOCAL INFILE (after the 0xFB request
    `awaiting_client` is True: pass the client's packets to feed_client() until its empty
    packet, then the server's OK/ERR follows); COM_STMT_PREPARE (parameter and column
    definitions); COM_STMT_EXECUTE with a cursor (when the server opens one the response
    is the metadata and its end: an EOF, or an OK with a 0xFE header under
    CLIENT_DEPRECATE_EOF, carrying SERVER_STATUS_CURSOR_EXISTS) and COM_STMT_FETCH (rows,
    then an EOF/OK whose status has SERVER_STATUS_LAST_ROW_SENT and no CURSOR_EXISTS once
    the cursor is exhausted and closed);
    COM_FIELD_LIST; COM_STATISTICS (one plain-text packet); MariaDB's cached metadata
    and progress reports; COM_CHANGE_USER's auth exchange (`awaiting_client` while the
    server waits for the client's auth data). COM_QUIT, COM_STMT_CLOSE and
    COM_STMT_SEND_LONG_DATA have no response: `expects_response` is False and the tracker
    is done from the start.

    Results: `status_flags` is the last server status seen (the initial value passed in
    until one arrives). An ERR packet carries no status: after an error `status_flags`
    still holds the last known value and `error` holds the ERR; the server's transaction
    state may have changed (a deadlock, 1213, rolls the transaction back), so a pooler
    should keep such a connection until a later OK says SERVER_STATUS_IN_TRANS is off.
    `last_ok` is the last OK packet parsed (it carries affected rows, insert id and
    session state changes), `session_state_changes` collects those of every OK,
    `prepare_ok` is the COM_STMT_PREPARE_OK (a prepare response has no status flags),
    `results` counts the results (OKs and result sets), `rows` the rows, `packets` the
    server packets fed, `warnings` the last warning count.
    """

    __slots__ = ("command", "capabilities", "status_flags", "error", "last_ok", "prepare_ok",
                 "results", "rows", "warnings", "infile_filename", "session_state_changes",
                 "_state", "_remaining", "_cursor", "_deprecate_eof", "_cache_meta",
                 "_progress", "packets")

    def __init__(self, command: bytes | int, capabilities: int, *,
                 status_flags: int = 0):
        if isinstance(command, int):
            payload = bytes((command,))
        else:
            payload = bytes(command[:6])
        if not payload:
            raise ValueError("empty command payload")
        if capabilities & UNTRACKED_CAPABILITIES:
            raise ValueError("the response tracker does not support CLIENT_COMPRESS or "
                             "CLIENT_OPTIONAL_RESULTSET_METADATA; do not negotiate them")
        cmd = payload[0]
        if cmd in _UNTRACKABLE_COMMANDS:
            raise ValueError(f"{COMMAND_NAMES.get(cmd, hex(cmd))} does not have a "
                             "request/response answer")
        self.command = cmd
        self.capabilities = capabilities
        self.status_flags = status_flags
        self.error: ErrPacket | None = None
        self.last_ok: OkPacket | None = None
        self.prepare_ok: PrepareOk | None = None
        self.results = 0
        self.rows = 0
        self.packets = 0
        self.warnings = 0
        self.infile_filename: str | None = None
        self.session_state_changes: list[tuple[int, bytes]] = []
        self._remaining = 0
        self._deprecate_eof = bool(capabilities & CLIENT_DEPRECATE_EOF)
        self._cache_meta = bool(capabilities & MARIADB_CLIENT_CACHE_METADATA)
        self._progress = bool(capabilities & MARIADB_CLIENT_PROGRESS)
        self._cursor = (cmd == COM_STMT_EXECUTE and len(payload) >= 6
                        and bool(payload[5] & CURSOR_TYPE_MASK))
        if cmd in _NO_RESPONSE_COMMANDS:
            self._state = _DONE
        elif cmd in (COM_QUERY, COM_STMT_EXECUTE, COM_PROCESS_INFO, COM_STMT_BULK_EXECUTE):
            self._state = _FIRST
        elif cmd == COM_STMT_FETCH:
            self._state = _ROWS
        elif cmd == COM_STMT_PREPARE:
            self._state = _PREPARE_FIRST
        elif cmd == COM_FIELD_LIST:
            self._state = _FIELD_LIST
        elif cmd == COM_CHANGE_USER:
            self._state = _AUTH
        elif cmd in _SINGLE_PACKET_COMMANDS:
            self._state = _SINGLE
        else:
            raise ValueError(f"unknown command byte 0x{cmd:02x}")

    # -- state --------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._state == _DONE

    @property
    def expects_response(self) -> bool:
        """False for commands the server never answers (COM_QUIT, COM_STMT_CLOSE,
        COM_STMT_SEND_LONG_DATA)."""
        return self.command not in _NO_RESPONSE_COMMANDS

    @property
    def awaiting_client(self) -> bool:
        """True while the server waits for the client (LOCAL INFILE data, change-user auth)."""
        return self._state in (_INFILE_CLIENT, _AUTH_CLIENT)

    @property
    def state(self) -> str:
        return _STATE_NAMES[self._state]

    @property
    def in_transaction(self) -> bool:
        return bool(self.status_flags & SERVER_STATUS_IN_TRANS)

    @property
    def in_rows(self) -> bool:
        """True while rows are expected (a relay may count plain rows itself)."""
        return self._state == _ROWS

    @property
    def cursor_open(self) -> bool:
        return bool(self.status_flags & SERVER_STATUS_CURSOR_EXISTS)

    # -- feeding ------------------------------------------------------------------------

    def feed(self, payload: bytes) -> bool:
        """One server packet payload; True when the response is complete."""
        state = self._state
        self.packets += 1
        if state == _ROWS:
            # The hot path: most packets of a big response are rows.
            first = payload[0] if payload else -1
            if first == EOF_HEADER:
                if self._deprecate_eof:
                    if len(payload) < MAX_PACKET_LENGTH:
                        self._end_of_result(self._ok(payload).status_flags)
                        return self._state == _DONE
                elif len(payload) < 9:
                    eof = EofPacket.parse(payload, self.capabilities)
                    self.warnings = eof.warnings
                    self._end_of_result(eof.status_flags)
                    return self._state == _DONE
            elif first == ERR_HEADER:
                return self._err(payload)
            elif first < 0:
                raise ProtocolViolation("empty packet in a result set")
            self.rows += 1
            return False
        if state == _COLUMNS or state == _PREP_PARAMS or state == _PREP_COLUMNS \
                or state == _FIELD_LIST:
            return self._column_packet(payload)
        if not payload:
            raise ProtocolViolation("empty packet from the server")
        if state == _FIRST or state == _INFILE_RESULT:
            return self._first(payload)
        if state == _COLUMNS_EOF or state == _PREP_PARAMS_EOF or state == _PREP_COLUMNS_EOF:
            return self._metadata_eof(payload)
        if state == _SINGLE:
            return self._single(payload)
        if state == _PREPARE_FIRST:
            return self._prepare_first(payload)
        if state == _AUTH:
            return self._auth(payload)
        if state == _DONE:
            raise ProtocolViolation(
                f"server sent a packet after the complete response to "
                f"{COMMAND_NAMES.get(self.command, hex(self.command))}")
        raise ProtocolViolation(f"server sent a packet while waiting for the client "
                                f"(state {_STATE_NAMES[state]})")

    def feed_client(self, payload: bytes) -> None:
        """A client packet sent while `awaiting_client` (LOCAL INFILE data; the empty
        packet ends the file. Or change-user auth data)."""
        if self._state == _INFILE_CLIENT:
            if not payload:
                self._state = _INFILE_RESULT
        elif self._state == _AUTH_CLIENT:
            self._state = _AUTH
        else:
            raise ProtocolViolation("client sent a packet while the server was answering")

    # -- helpers ------------------------------------------------------------------------

    def _ok(self, payload: bytes) -> OkPacket:
        ok = OkPacket.parse(payload, self.capabilities)
        self.last_ok = ok
        self.status_flags = ok.status_flags
        self.warnings = ok.warnings
        if ok.session_state_changes:
            self.session_state_changes.extend(ok.session_state_changes)
        return ok

    def _err(self, payload: bytes) -> bool:
        err = ErrPacket.parse(payload, self.capabilities)
        if err.is_progress and self._progress:
            return False              # a progress report, not the end
        self.error = err
        self._state = _DONE
        return True

    def _end_of_result(self, status: int) -> None:
        self.status_flags = status
        self.results += 1
        self._state = _FIRST if status & SERVER_MORE_RESULTS_EXISTS else _DONE

    def _first(self, payload: bytes) -> bool:
        first = payload[0]
        if first == OK_HEADER or (first == EOF_HEADER and len(payload) < 9):
            if first == EOF_HEADER and not self._deprecate_eof:
                eof = EofPacket.parse(payload, self.capabilities)
                self._end_of_result(eof.status_flags)
            else:
                self._end_of_result(self._ok(payload).status_flags)
            return self._state == _DONE
        if first == ERR_HEADER:
            return self._err(payload)
        if self._state == _INFILE_RESULT:
            raise ProtocolViolation("expected OK or ERR after the LOCAL INFILE data")
        if first == LOCAL_INFILE_HEADER:
            self.infile_filename = LocalInfileRequest.parse(payload).filename
            self._state = _INFILE_CLIENT
            return False
        count, pos = read_lenenc_int(payload, 0)
        if not count:
            raise ProtocolViolation("result set with no columns")
        follows = True
        if self._cache_meta:
            if pos >= len(payload):
                raise _truncated("the metadata-follows byte")
            follows = payload[pos] != 0
        if follows:
            self._remaining = count
            self._state = _COLUMNS
        else:
            self._after_columns()
        return False

    def _after_columns(self) -> None:
        if self._state in (_COLUMNS, _FIRST):
            # With CLIENT_DEPRECATE_EOF no EOF follows the metadata: rows (or, when a
            # cursor was opened, nothing) come, then an OK with a 0xFE header.
            self._state = _ROWS if self._deprecate_eof else _COLUMNS_EOF
        elif self._state == _PREP_PARAMS:
            if not self._deprecate_eof:
                self._state = _PREP_PARAMS_EOF
            else:
                self._prepare_columns()
        elif self._state == _PREP_COLUMNS:
            if not self._deprecate_eof:
                self._state = _PREP_COLUMNS_EOF
            else:
                self._state = _DONE

    def _column_packet(self, payload: bytes) -> bool:
        if not payload:
            raise ProtocolViolation("empty column definition")
        if self._state == _FIELD_LIST:
            first = payload[0]
            if first == ERR_HEADER:
                return self._err(payload)
            if first == EOF_HEADER and len(payload) < (
                    MAX_PACKET_LENGTH if self._deprecate_eof else 9):
                if self._deprecate_eof:
                    self.status_flags = self._ok(payload).status_flags
                else:
                    self.status_flags = EofPacket.parse(payload, self.capabilities).status_flags
                self.results += 1
                self._state = _DONE
                return True
            return False
        if payload[0] == ERR_HEADER:
            return self._err(payload)
        self._remaining -= 1
        if self._remaining <= 0:
            self._after_columns()
            return self._state == _DONE
        return False

    def _metadata_eof(self, payload: bytes) -> bool:
        if payload[0] == ERR_HEADER:
            return self._err(payload)
        if payload[0] != EOF_HEADER or len(payload) >= 9:
            raise ProtocolViolation("expected the EOF packet after column definitions")
        eof = EofPacket.parse(payload, self.capabilities)
        self.status_flags = eof.status_flags
        state = self._state
        if state == _COLUMNS_EOF:
            if self._cursor and eof.status_flags & SERVER_STATUS_CURSOR_EXISTS:
                # A cursor was opened: rows come later, through COM_STMT_FETCH.
                self.results += 1
                self._state = _DONE
                return True
            self._state = _ROWS
            return False
        if state == _PREP_PARAMS_EOF:
            self._prepare_columns()
            return self._state == _DONE
        self._state = _DONE
        return True

    def _single(self, payload: bytes) -> bool:
        first = payload[0]
        if first == ERR_HEADER:
            return self._err(payload)
        if self.command == COM_STATISTICS:
            pass                          # a plain string, no status
        elif first == OK_HEADER or (first == EOF_HEADER and self._deprecate_eof):
            self._ok(payload)
        elif first == EOF_HEADER and len(payload) < 9:
            eof = EofPacket.parse(payload, self.capabilities)
            self.status_flags = eof.status_flags
            self.warnings = eof.warnings
        else:
            raise ProtocolViolation(
                f"unexpected packet 0x{first:02x} in answer to "
                f"{COMMAND_NAMES.get(self.command, hex(self.command))}")
        self.results += 1
        self._state = _DONE
        return True

    def _prepare_first(self, payload: bytes) -> bool:
        if payload[0] == ERR_HEADER:
            return self._err(payload)
        self.prepare_ok = ok = PrepareOk.parse(payload)
        self.warnings = ok.warnings
        self.results += 1
        if ok.num_params:
            self._remaining = ok.num_params
            self._state = _PREP_PARAMS
        else:
            self._prepare_columns()
        return self._state == _DONE

    def _prepare_columns(self) -> None:
        n = self.prepare_ok.num_columns if self.prepare_ok else 0
        if n:
            self._remaining = n
            self._state = _PREP_COLUMNS
        else:
            self._state = _DONE

    def _auth(self, payload: bytes) -> bool:
        first = payload[0]
        if first == OK_HEADER:
            self._ok(payload)
            self.results += 1
            self._state = _DONE
            return True
        if first == ERR_HEADER:
            return self._err(payload)
        if first == AUTH_SWITCH_HEADER:
            self._state = _AUTH_CLIENT
            return False
        if first == AUTH_MORE_DATA_HEADER:
            # caching_sha2_password's "fast auth succeeded" (0x03) is followed by the OK
            # without a client reply; anything else wants one.
            if payload[1:] != b"\x03":
                self._state = _AUTH_CLIENT
            return False
        raise ProtocolViolation(f"unexpected packet 0x{first:02x} during COM_CHANGE_USER")
