"""MySQL / MariaDB wire encoding: fixed and length-encoded fields, packet framing, PacketReader."""
from __future__ import annotations

import struct

from .constants import (
    DEFAULT_MAX_PAYLOAD, ER_MALFORMED_PACKET, ER_NET_PACKETS_OUT_OF_ORDER,
    ER_NET_PACKET_TOO_LARGE, MAX_PACKET_LENGTH,
)


# Little-endian fixed-size fields.
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
    out of sync: close the connection. `buffered` counts the bytes received but not yet
    part of a returned packet (a plain attribute: the relay's quick lane reads it per
    command).
    """

    __slots__ = ("max_payload", "next_seq", "buffered", "_buf", "_parts", "_part_len",
                 "_part_seq", "_last_frag_seq")

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD):
        self.max_payload = int(max_payload)
        self.next_seq = 0
        self.buffered = 0
        self._buf = bytearray()
        self._parts: list[bytes] = []      # fragments of a payload still being joined
        self._part_len = 0
        self._part_seq = 0
        self._last_frag_seq = 0

    def take_buffered(self) -> bytes:
        """The bytes received but not yet part of a packet, which leave the reader (what
        came after a client's SSLRequest belongs to the TLS layer)."""
        data = bytes(self._buf)
        self._buf.clear()
        self.buffered = self._part_len
        return data

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
        self.buffered = len(buf) + self._part_len
        return out
