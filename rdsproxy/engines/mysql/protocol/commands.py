"""Client command packets: the com_* builders, COM_STMT_EXECUTE, statement-id helpers."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Sequence

from .codec import (
    ProtocolViolation, _F64, _I64, _U16, _U32, _U64, _enc, _truncated, lenenc_str, nul_str,
    read_lenenc_int,
)
from .constants import (
    COM_STMT_BULK_EXECUTE, COM_STMT_CLOSE, COM_STMT_EXECUTE, COM_STMT_FETCH, COM_STMT_RESET,
    COM_STMT_SEND_LONG_DATA, CURSOR_TYPE_MASK, CURSOR_TYPE_NO_CURSOR, MYSQL_TYPE_BLOB,
    MYSQL_TYPE_DOUBLE, MYSQL_TYPE_LONGLONG, MYSQL_TYPE_NULL, MYSQL_TYPE_TINY,
    MYSQL_TYPE_VAR_STRING, PARAMETER_COUNT_AVAILABLE,
)


# --- prepared statements ----------------------------------------------------------------------

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
