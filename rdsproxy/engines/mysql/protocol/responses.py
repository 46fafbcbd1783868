"""Server answers to commands: OK / ERR / EOF, LOCAL INFILE, result sets, COM_STMT_PREPARE_OK."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from .codec import (
    ProtocolViolation, _HH, _U16, _dec, _enc, _truncated, _u16, lenenc_int, lenenc_str, packet,
    read_lenenc_int, read_lenenc_str, seq_after,
)
from .constants import (
    CHARSET_UTF8MB4, CLIENT_DEPRECATE_EOF, CLIENT_PROTOCOL_41, CLIENT_SESSION_TRACK,
    CLIENT_TRANSACTIONS, EOF_HEADER, ERR_HEADER, LOCAL_INFILE_HEADER,
    MARIADB_CLIENT_CACHE_METADATA, MARIADB_CLIENT_EXTENDED_METADATA, MAX_PACKET_LENGTH,
    MYSQL_TYPE_VAR_STRING, OK_HEADER, PROGRESS_REPORT_CODE, SERVER_SESSION_STATE_CHANGED,
    SERVER_STATUS_AUTOCOMMIT, SESSION_TRACK_SCHEMA, SESSION_TRACK_SYSTEM_VARIABLES,
)


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


class ServerError(Exception):
    """The server answered with an ERR packet; `err` is the parsed packet."""

    def __init__(self, err: ErrPacket, context: str = ""):
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
