"""A tiny raw PostgreSQL v3 client: startup, md5/cleartext auth, simple query, terminate.

Charter: the memory probe needs ~10,000 fully authenticated idle connections from one
process, and readiness checks need a dependency-free "can I log in and run SELECT 1".
psycopg would cost far more per connection, so this speaks just enough of the protocol
over asyncio streams. SCRAM is deliberately not implemented: the benchmark configures md5
on the client side of every proxy so both pay the same auth cost.
"""
from __future__ import annotations

import asyncio
import hashlib
import struct

PROTOCOL_V3 = 196608


class PgError(Exception):
    """Server-sent ErrorResponse or a protocol surprise."""


def _error_text(body: bytes) -> str:
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode(errors="replace")
    return f"{fields.get('S', 'ERROR')} {fields.get('C', '')}: {fields.get('M', body[:80])}"


def md5_response(user: str, password: str, salt: bytes) -> bytes:
    inner = hashlib.md5(password.encode() + user.encode()).hexdigest()
    return b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode()


async def read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    header = await reader.readexactly(5)
    length = struct.unpack("!I", header[1:])[0]
    return header[:1], await reader.readexactly(length - 4)


def _message(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("!I", len(payload) + 4) + payload


async def connect(host: str, port: int, user: str, password: str, database: str,
                  application_name: str = "rdsproxy-bench"):
    """Open a connection and authenticate; returns (reader, writer) at ReadyForQuery."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        params = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in
                          (("user", user), ("database", database),
                           ("application_name", application_name)))
        body = struct.pack("!I", PROTOCOL_V3) + params + b"\0"
        writer.write(struct.pack("!I", len(body) + 4) + body)
        while True:
            kind, payload = await read_message(reader)
            if kind == b"R":
                code = struct.unpack("!I", payload[:4])[0]
                if code == 0:
                    continue
                if code == 5:
                    writer.write(_message(b"p", md5_response(user, password, payload[4:8]) + b"\0"))
                elif code == 3:
                    writer.write(_message(b"p", password.encode() + b"\0"))
                else:
                    raise PgError(f"unsupported auth request {code} (bench client speaks md5 only)")
            elif kind == b"E":
                raise PgError(_error_text(payload))
            elif kind == b"Z":
                return reader, writer
            # S (ParameterStatus), K (BackendKeyData), N (Notice): nothing to do
    except BaseException:
        writer.close()
        raise


async def simple_query(reader, writer, sql: str) -> list[list[str | None]]:
    """Run one simple-protocol query; returns the data rows as text."""
    writer.write(_message(b"Q", sql.encode() + b"\0"))
    rows, error = [], None
    while True:
        kind, payload = await read_message(reader)
        if kind == b"D":
            n = struct.unpack("!H", payload[:2])[0]
            pos, row = 2, []
            for _ in range(n):
                size = struct.unpack("!i", payload[pos:pos + 4])[0]
                pos += 4
                if size < 0:
                    row.append(None)
                else:
                    row.append(payload[pos:pos + size].decode())
                    pos += size
            rows.append(row)
        elif kind == b"E":
            error = PgError(_error_text(payload))
        elif kind == b"Z":
            if error:
                raise error
            return rows


async def close(writer) -> None:
    try:
        writer.write(_message(b"X", b""))
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 2)
    except Exception:
        pass


async def check_login(host, port, user, password, database, timeout=5.0) -> str:
    """Log in and run SELECT 1; returns '' on success, else the error text."""
    try:
        async def go():
            r, w = await connect(host, port, user, password, database)
            rows = await simple_query(r, w, "SELECT 1")
            await close(w)
            if rows != [["1"]]:
                raise PgError(f"SELECT 1 returned {rows!r}")
        await asyncio.wait_for(go(), timeout)
        return ""
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
