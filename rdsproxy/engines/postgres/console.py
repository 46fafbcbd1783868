"""The admin console's PostgreSQL wire, sans-IO: simple queries in, the answers' messages out.

What `psql -c` needs: a Query message runs one console command (core/console.py), answered
with RowDescription, DataRows (text columns), CommandComplete and ReadyForQuery; errors are
ErrorResponse then ReadyForQuery. The extended protocol gets one error per Sync.
"""
from __future__ import annotations

import struct

from . import protocol as pg

TEXT_OID = 25
# The greeting's parameters when no server connection has reported its own yet.
FALLBACK_PARAMETERS = {"client_encoding": "UTF8", "server_encoding": "UTF8",
                       "DateStyle": "ISO, MDY", "integer_datetimes": "on",
                       "standard_conforming_strings": "on"}
_HEADER = struct.Struct("!cI")
_COLUMN_TAIL = struct.Struct("!IhIhih").pack(0, 0, TEXT_OID, -1, -1, 0)
_NULL = struct.pack("!i", -1)
_SIMPLE_ONLY = "the admin console answers simple queries only (no extended protocol)"


def greeting_parameters(known: dict) -> bytes:
    """The ParameterStatus messages a console session is greeted with: those of any
    database connection (`known`: its parameters), for a client that reads server_version."""
    params = known or FALLBACK_PARAMETERS
    return b"".join(pg.parameter_status(k, v) for k, v in params.items())


def row_description(columns) -> bytes:
    body = b"".join(pg.cstr(name) + _COLUMN_TAIL for name in columns)
    return pg.message(b"T", struct.pack("!h", len(columns)) + body)


def data_row(values) -> bytes:
    parts = [struct.pack("!h", len(values))]
    for value in values:
        if value is None:
            parts.append(_NULL)
        else:
            raw = value.encode()
            parts.append(struct.pack("!i", len(raw)) + raw)
    return pg.message(b"D", b"".join(parts))


class ConsoleWire:
    """One console connection's messages. receive_data(bytes), then next_request() until
    None: ("query", text) for the console to run, ("reply", bytes) to send as they are,
    or ("close", None) at Terminate."""

    def __init__(self):
        self._buf = bytearray()
        self._extended_failed = False   # an extended-protocol message since the last Sync

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def next_request(self):
        while len(self._buf) >= 5:
            mtype, length = _HEADER.unpack_from(self._buf)
            if len(self._buf) < 1 + length:
                return None
            payload = bytes(self._buf[5:1 + length])
            del self._buf[:1 + length]
            if mtype == b"Q":
                text = payload.rstrip(b"\x00").decode("utf-8", "replace")
                if not text.strip().strip(";").strip():
                    return "reply", pg.message(b"I") + pg.READY_FOR_QUERY_IDLE
                return "query", text
            if mtype == b"X":
                return "close", None
            if mtype == b"S":
                if self._extended_failed:
                    self._extended_failed = False
                    return "reply", self.error(_SIMPLE_ONLY)
                return "reply", pg.READY_FOR_QUERY_IDLE
            if mtype in b"PBDECH":
                self._extended_failed = True   # answered at its Sync
                continue
            return "reply", self.error(f"unexpected message type {mtype!r} on the admin console")
        return None

    @staticmethod
    def answer(answer) -> bytes:
        out = []
        if answer.notice:
            out.append(pg.notice_response("01000", answer.notice, severity="WARNING"))
        if answer.columns:
            out.append(row_description(answer.columns))
            out += [data_row(row) for row in answer.rows]
        out.append(pg.message(b"C", pg.cstr(answer.tag)))
        out.append(pg.READY_FOR_QUERY_IDLE)
        return b"".join(out)

    @staticmethod
    def error(text: str) -> bytes:
        return pg.error_response("42601", text) + pg.READY_FOR_QUERY_IDLE
