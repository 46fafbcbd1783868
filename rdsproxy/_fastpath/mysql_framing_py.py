"""The MySQL relay's hot loop: where does a server's answer end, looking at as little as possible.

Pure-Python twin of `mysql_framing_c`, which setup.py compiles from this very file with
`mysql_framing_c.pxd` beside it. A server answer is mostly rows; to know when it ends the
relay only needs each row's 4-byte header and first payload byte. `ResponseScanner.scan`
walks the packet headers of a chunk in place (no payload copies), counts plain rows itself
and hands the packets that matter (column counts and definitions, EOF / OK / ERR, LOCAL
INFILE requests) to the command's `ResponseTracker`, which knows the protocol's states.

A packet cut by a chunk boundary is kept only when the tracker needs it whole; the body of a
row is skipped without being buffered. Payloads of 16 MiB and more continue in further
packets (headers of length 0xFFFFFF); those continuations are skipped, so a row that long
costs nothing either.
"""

try:
    import cython  # noqa: F401 - cython.compiled says which twin is running
except ImportError:
    globals()["cython"] = type("cython", (), {"compiled": False})

# Literals in the loop below (0xFFFFFF: a payload continues; 1 << 24: CLIENT_DEPRECATE_EOF)
# so that the compiled twin compares C integers.


class ResponseScanner:
    """Finds the end of one answer at a time in a server's byte stream (see module doc)."""

    def __init__(self):
        self.partial = b""       # the start of a packet the tracker must see whole
        self.skip = 0            # bytes of a row (or continuation) body still to come
        self.continued = False   # the packet being read continues a 16 MiB fragment

    def reset(self):
        self.partial = b""
        self.skip = 0
        self.continued = False

    def scan(self, data, tracker):
        """Feed a chunk of the answer to `tracker`. Returns the number of bytes of `data`
        that complete the answer (tracker.done is then True), or -1 when more is to come.
        Raises what tracker.feed raises for a packet the protocol does not allow."""
        n = len(data)
        pos = 0
        base = 0                 # bytes of `data` below that came in an earlier chunk
        if self.skip:
            if self.skip >= n:
                self.skip -= n
                return -1
            pos = self.skip
            self.skip = 0
        if self.partial:
            base = len(self.partial)
            data = self.partial + data[pos:]
            self.partial = b""
            n = len(data)
            pos = 0
        buf = data
        rows = 0
        in_rows = tracker.in_rows
        deprecate = tracker.capabilities & 0x1000000
        while True:
            if n - pos < 4:
                if pos < n:
                    self.partial = data[pos:]
                tracker.rows += rows
                return -1
            length = buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16)
            body = pos + 4
            end = body + length
            # Packets the tracker need not see (a fragment's continuation, a row) are
            # stepped over, their bodies skipped across chunks without being buffered.
            passed = self.continued
            if not passed and in_rows and length:
                if body >= n:
                    self.partial = data[pos:]
                    tracker.rows += rows
                    return -1
                first = buf[body]
                if first < 0xFE or (first == 0xFE and (length >= 0xFFFFFF if deprecate else length >= 9)):
                    rows += 1
                    passed = True
            if passed:
                self.continued = length == 0xFFFFFF
                if end > n:
                    self.skip = end - n
                    tracker.rows += rows
                    return -1
                pos = end
                continue
            if end > n:
                self.partial = data[pos:]
                tracker.rows += rows
                return -1
            self.continued = length == 0xFFFFFF
            tracker.rows += rows
            rows = 0
            if tracker.feed(data[body:end]):
                return end - base
            pos = end
            in_rows = tracker.in_rows
