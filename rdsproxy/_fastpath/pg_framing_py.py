"""PostgreSQL v3 message framing over a byte stream that arrives in arbitrary chunks.

Pure-Python twin of `pg_framing_c`, which setup.py compiles from this very file; the C types
live in `pg_framing_c.pxd` beside it (Cython matches a module's .pxd by the *module* name, and
the compiled module is `pg_framing_c`). Keep this file valid, plain Python: it is what runs
when the extension is not built or RDSPROXY_PURE_PYTHON=1 is set.

The scanner walks message headers only: payloads are skipped, never copied, so the relay
can forward each received chunk unchanged. It copies just the payloads of the few message
types its owner asked for (ReadyForQuery's status, a Query's text, ...), up to a limit.
In the compiled twin `feed` reads the chunk in place through a raw pointer and creates no
Python object per message unless a payload is captured.
"""

try:
    import cython
except ImportError:
    # Uncompiled and Cython not installed: a stand-in for the one attribute used. Bound
    # through globals() because Cython reserves the name `cython` (no rebinding allowed).
    globals()["cython"] = type("cython", (), {"compiled": False})

from . import pgwire  # noqa: E402
from .errors import FramingError  # noqa: E402  (one class for both twins)

# The wire's values, C ints once compiled (pg_framing_c.pxd).
MSG_READY_FOR_QUERY = pgwire.MSG_READY_FOR_QUERY
STATUS_IDLE = pgwire.STATUS_IDLE


_MASKS = {}


def type_mask(types):
    """A 256-byte table, 1 at each message type in `types`. Scanners only read their masks,
    so one table per set of types is shared (a new session builds none)."""
    key = bytes(types)
    mask = _MASKS.get(key)
    if mask is None:
        mask = bytearray(256)
        for t in key:
            mask[t] = 1
        _MASKS[key] = mask
    return mask


class MessageScanner:
    """Finds message boundaries in a stream of typed PostgreSQL messages.

    `feed(chunk)` returns how many messages of a *counted* type completed in the chunk.
    Messages of a *captured* type are collected in `captured` as
    (type, payload_prefix, payload_length) tuples; the owner drains that list.
    `status` holds the status byte of the last complete ReadyForQuery ('I', 'T', 'E').
    `last_type` is the type of the last message whose header was read. `tally` counts the
    completed messages of a *tallied* type over the whole stream (a client's Query and
    Execute messages: the QueryRequests metric), without the owner's looking at them.
    """

    def __init__(self, counted=b"", captured=b"", capture_limit=65536,
                 max_message_size=1 << 30, tallied=b""):
        self.counted_mask = type_mask(counted)
        self.captured_mask = type_mask(captured)
        self.tallied_mask = type_mask(tallied)
        self.capture_limit = capture_limit
        self.max_message_size = max_message_size
        self._start()

    def fresh(self):
        """A new scanner with this one's settings, at the start of a stream (an engine keeps
        one as the template of its sessions' scanners)."""
        twin = MessageScanner.__new__(MessageScanner)
        twin.counted_mask = self.counted_mask
        twin.captured_mask = self.captured_mask
        twin.tallied_mask = self.tallied_mask
        twin.capture_limit = self.capture_limit
        twin.max_message_size = self.max_message_size
        twin._start()
        return twin

    def _start(self):
        self.captured = []
        self.status = STATUS_IDLE
        self.last_type = 0
        self.tally = 0
        # A header split across chunks is gathered as ints, not in a buffer:
        # how many of its 5 bytes arrived, its type byte, its length bytes so far.
        self._hdr_len = 0
        self._hdr_type = 0
        self._hdr_length = 0
        # The message being passed: payload bytes still to come, payload length, type.
        self._remaining = 0
        self._length = 0
        self._current_type = 0
        self._capturing = False
        self._capture_buf = bytearray()
        # ReadyForQuery split across chunks: its status byte is kept until it completes.
        self._status_next = False
        self._status_byte = -1

    def reset(self):
        """Forget any partial message (the owner starts a fresh stream)."""
        self._hdr_len = 0
        self._hdr_length = 0
        self._remaining = 0
        self._capturing = False
        del self._capture_buf[:]
        self._status_next = False
        self._status_byte = -1
        self.captured = []
        self.last_type = 0

    def at_boundary(self):
        """True when no message is partially received."""
        return self._remaining == 0 and self._hdr_len == 0

    def feed(self, data):
        """Scan one chunk (bytes, bytearray or memoryview); return the counted completions."""
        if cython.compiled:
            # Compiled twin: take a pointer to the chunk once (pg_framing_c.pxd).
            return _feed_buffer(self, data)  # noqa: F821 (defined in pg_framing_c.pxd)
        return self._scan(data, len(data))

    def _scan(self, buf, end):
        # `buf` is the chunk itself here and a `const unsigned char *` in the compiled twin;
        # only buf[i] (an int in both) and buf[i:j] (bytes-like in both) are used.
        count = 0
        pos = 0
        while pos < end:
            if self._remaining == 0:
                # A header: type byte + int32 length that counts itself.
                if self._hdr_len == 0 and end - pos >= 5:
                    mtype = buf[pos]
                    # Widen byte by byte: a C `byte << 24` would overflow an int.
                    length = buf[pos + 1]
                    length = (length << 8) | buf[pos + 2]
                    length = (length << 8) | buf[pos + 3]
                    length = (length << 8) | buf[pos + 4]
                    pos += 5
                else:
                    # Split header: gather what this chunk has of it.
                    while self._hdr_len < 5 and pos < end:
                        if self._hdr_len == 0:
                            self._hdr_type = buf[pos]
                        else:
                            self._hdr_length = (self._hdr_length << 8) | buf[pos]
                        self._hdr_len += 1
                        pos += 1
                    if self._hdr_len < 5:
                        break
                    mtype = self._hdr_type
                    length = self._hdr_length
                    self._hdr_len = 0
                    self._hdr_length = 0
                if length < 4 or length - 4 > self.max_message_size:
                    raise FramingError(
                        "invalid message length %d for message type %r" % (length, chr(mtype)))
                length -= 4
                self._current_type = mtype
                self.last_type = mtype
                self._length = length
                if end - pos >= length:
                    # Common case: the whole payload is here. A kept one (a Query's text)
                    # is sliced straight out of the chunk, up to the capture limit.
                    if self.captured_mask[mtype]:
                        keep = length if length < self.capture_limit else self.capture_limit
                        if cython.compiled:
                            payload = buf[pos:pos + keep]   # bytes from the raw pointer
                        else:
                            payload = bytes(buf[pos:pos + keep])
                        self.captured.append((mtype, payload, length))
                    if mtype == MSG_READY_FOR_QUERY and length >= 1 and self.capture_limit > 0:
                        self.status = buf[pos]
                    pos += length
                    count += self.counted_mask[mtype]
                    self.tally += self.tallied_mask[mtype]
                    continue
                self._remaining = length
                self._capturing = self.captured_mask[mtype] != 0
                # (Status comes from the captured prefix, hence the capture_limit test.)
                self._status_next = mtype == MSG_READY_FOR_QUERY and self.capture_limit > 0
                if length == 0:
                    count += self._complete()
                continue
            # Inside a payload that did not fit in one chunk.
            take = end - pos
            if take > self._remaining:
                take = self._remaining
            if self._status_next:
                self._status_byte = buf[pos]
                self._status_next = False
            if self._capturing:
                room = self.capture_limit - len(self._capture_buf)
                if room > 0:
                    self._capture_buf += buf[pos:pos + (take if take < room else room)]
            pos += take
            self._remaining -= take
            if self._remaining == 0:
                count += self._complete()
        return count

    def _complete(self):
        # The message whose payload was not skipped in one step has ended.
        mtype = self._current_type
        if self._status_byte >= 0:
            self.status = self._status_byte
            self._status_byte = -1
        self._status_next = False
        if self._capturing:
            self._capturing = False
            payload = bytes(self._capture_buf)
            del self._capture_buf[:]
            self.captured.append((mtype, payload, self._length))
        self.tally += self.tallied_mask[mtype]
        return self.counted_mask[mtype]


def split_messages(data, start=0):
    """Split whole typed messages out of `data` from `start`.

    Returns (messages, consumed_up_to) where messages is a list of (type, payload) with
    payloads as bytes; a trailing partial message is left for the caller to keep.
    Used on slow paths (startup, internal queries), never on the relay.
    """
    messages = []
    pos = start
    end = len(data)
    while end - pos >= 5:
        mtype = data[pos]
        length = int.from_bytes(data[pos + 1:pos + 5], "big")
        if length < 4:
            raise FramingError("invalid message length %d for message type %r" % (length, chr(mtype)))
        if end - pos < 1 + length:
            break
        messages.append((mtype, bytes(data[pos + 5:pos + 1 + length])))
        pos += 1 + length
    return messages, pos
