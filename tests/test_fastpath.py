"""The hot-path twins: message framing and pool bookkeeping, pure Python and Cython.

Every behaviour test runs against both `*_py` (ids `py`) and the compiled `*_c` (ids `c`),
imported directly so both are covered whatever `rdsproxy._fastpath` selected. `c` is skipped
when the extension is not built, unless RDSPROXY_REQUIRE_CYTHON=1 (CI after a build), which
fails the module's collection instead (utils.twins). Property tests also compare the twins
against each other.
"""
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, initialize,
                                 invariant, rule)
from utils import REQUIRE_CYTHON, pick, twins

FRAMING = twins("pg_framing")
POOL = twins("pool")


# Module scope: hypothesis runs many examples per test call (the modules are stateless).
@pytest.fixture(scope="module", params=["py", "c"])
def framing(request):
    return pick(FRAMING, request.param)


@pytest.fixture(scope="module", params=["py", "c"])
def pool(request):
    return pick(POOL, request.param)


@pytest.fixture(scope="module")
def both_framing():
    return pick(FRAMING, "py"), pick(FRAMING, "c")


@pytest.fixture(scope="module")
def both_pool():
    return pick(POOL, "py"), pick(POOL, "c")


def msg(mtype, payload=b""):
    """One wire message: type byte, int32 length (counting itself), payload."""
    if isinstance(mtype, str):
        mtype = ord(mtype)
    return bytes([mtype]) + struct.pack("!I", len(payload) + 4) + payload


def raw_header(mtype, length):
    return bytes([ord(mtype)]) + struct.pack("!I", length)


# A pgbench -S answer (simple protocol): RowDescription, DataRow, CommandComplete, RFQ.
ROW_DESCRIPTION = msg("T", struct.pack("!H", 1) + b"abalance\x00"
                      + struct.pack("!IhIhih", 16390, 3, 23, 4, -1, 0))
DATA_ROW = msg("D", struct.pack("!HI", 1, 4) + b"1234")
COMMAND_COMPLETE = msg("C", b"SELECT 1\x00")
PGBENCH_S = ROW_DESCRIPTION + DATA_ROW + COMMAND_COMPLETE + msg("Z", b"I")

BUFFER_KINDS = [bytes, bytearray, memoryview]


# -- MessageScanner: basics ------------------------------------------------------------

@pytest.mark.parametrize("kind", BUFFER_KINDS, ids=lambda k: k.__name__)
def test_single_message(framing, kind):
    s = framing.MessageScanner(counted=b"C")
    assert s.feed(kind(COMMAND_COMPLETE)) == 1
    assert s.last_type == ord("C")
    assert s.at_boundary()
    assert s.captured == []


@pytest.mark.parametrize("kind", BUFFER_KINDS, ids=lambda k: k.__name__)
def test_many_messages_in_one_chunk(framing, kind):
    s = framing.MessageScanner(counted=b"DZ", captured=b"C")
    assert s.feed(kind(PGBENCH_S * 3)) == 6
    assert s.captured == [(ord("C"), b"SELECT 1\x00", 9)] * 3
    assert s.status == ord("I")
    assert s.last_type == ord("Z")
    assert s.at_boundary()


def test_defaults(framing):
    s = framing.MessageScanner()
    assert (s.status, s.last_type, s.captured) == (ord("I"), 0, [])
    assert s.at_boundary()
    assert s.feed(b"") == 0
    assert s.feed(PGBENCH_S) == 0  # nothing counted by default
    assert s.captured == []


@pytest.mark.parametrize("kind", BUFFER_KINDS, ids=lambda k: k.__name__)
def test_header_split_at_every_offset(framing, kind):
    stream = msg("D", b"abc") + msg("Z", b"T") + msg("C", b"x" * 7)
    for cut in range(len(stream) + 1):
        s = framing.MessageScanner(counted=b"DZC", captured=b"C")
        n = s.feed(kind(stream[:cut])) + s.feed(kind(stream[cut:]))
        assert n == 3, cut
        assert s.status == ord("T"), cut
        assert s.captured == [(ord("C"), b"x" * 7, 7)], cut
        assert s.at_boundary(), cut


def test_byte_at_a_time(framing):
    stream = PGBENCH_S + msg("Z", b"E") + msg("S", b"") + msg("D", b"q" * 300)
    s = framing.MessageScanner(counted=b"ZD", captured=b"TS")
    total = 0
    for i in range(len(stream)):
        total += s.feed(stream[i:i + 1])
        assert s.at_boundary() == (i + 1 in _boundaries(stream))
    assert total == 4
    assert s.status == ord("E")
    assert [c[0] for c in s.captured] == [ord("T"), ord("S")]
    assert s.captured[1] == (ord("S"), b"", 0)


def _boundaries(stream):
    ends, pos = set(), 0
    while pos < len(stream):
        pos += 1 + struct.unpack("!I", stream[pos + 1:pos + 5])[0]
        ends.add(pos)
    return ends


def test_payload_split(framing):
    payload = bytes(range(256)) * 4
    stream = msg("d", payload)
    s = framing.MessageScanner(counted=b"d", captured=b"d")
    assert s.feed(stream[:5 + 100]) == 0
    assert not s.at_boundary()
    assert s.last_type == ord("d")  # header already read
    assert s.feed(stream[105:600]) == 0
    assert s.feed(stream[600:]) == 1
    assert s.captured == [(ord("d"), payload, len(payload))]
    assert s.at_boundary()


def test_counted_and_captured_types(framing):
    s = framing.MessageScanner(counted=b"CZ", captured=b"CE")
    stream = (msg("C", b"INSERT 0 1\x00") + msg("E", b"SERROR\x00") + msg("N", b"notice")
              + msg("Z", b"E"))
    assert s.feed(stream) == 2
    assert s.captured == [(ord("C"), b"INSERT 0 1\x00", 11), (ord("E"), b"SERROR\x00", 7)]
    assert s.status == ord("E")


@pytest.mark.parametrize("step", [None, 1, 3, 9])
def test_tallied_types_count_over_the_stream(framing, step):
    """A client's Query and Execute messages, whole or split anywhere, counted across
    chunks and resets, whatever is counted or captured beside them."""
    s = framing.MessageScanner(counted=b"QS", captured=b"Q", tallied=b"QE")
    extended = (msg("P", b"\x00SELECT $1\x00\x00\x00") + msg("B", b"\x00\x00" + bytes(6))
                + msg("E", b"\x00" + bytes(4)) + msg("S"))
    stream = msg("Q", b"SELECT 1; SELECT 2\x00") + extended + msg("E", b"\x00" + bytes(4)) \
        + msg("S") + msg("X")
    for chunk in ([stream] if step is None
                  else [stream[i:i + step] for i in range(0, len(stream), step)]):
        s.feed(chunk)
        s.captured.clear()
    assert s.tally == 3
    s.reset()
    s.feed(msg("Q", b"SELECT 3\x00"))
    assert s.tally == 4
    assert s.fresh().tally == 0 and framing.MessageScanner().tally == 0


def test_owner_drains_captured(framing):
    s = framing.MessageScanner(captured=b"C")
    s.feed(COMMAND_COMPLETE)
    first = s.captured
    s.captured = []
    s.feed(COMMAND_COMPLETE)
    assert len(first) == 1 and len(s.captured) == 1
    s.captured.clear()
    s.feed(COMMAND_COMPLETE)
    assert len(s.captured) == 1


@pytest.mark.parametrize("split", [None, 3, 7, 12])
def test_capture_limit_truncates(framing, split):
    payload = b"SELECT * FROM accounts WHERE aid = 1"
    stream = msg("Q", payload)
    s = framing.MessageScanner(captured=b"Q", capture_limit=10)
    if split is None:
        s.feed(stream)
    else:
        s.feed(stream[:split])
        s.feed(stream[split:])
    assert s.captured == [(ord("Q"), payload[:10], len(payload))]


def test_capture_limit_zero_captures_nothing(framing):
    s = framing.MessageScanner(captured=b"Q", capture_limit=0)
    s.feed(msg("Q", b"abc"))
    assert s.captured == [(ord("Q"), b"", 3)]


@pytest.mark.parametrize("split", [None, 1, 3, 5])
def test_ready_for_query_status(framing, split):
    s = framing.MessageScanner(counted=b"Z")
    for status in b"TEI":
        stream = msg("Z", bytes([status]))
        if split is None:
            assert s.feed(stream) == 1
        else:
            assert s.feed(stream[:split]) == 0
            assert s.status != status  # only a complete RFQ changes the status
            assert s.feed(stream[split:]) == 1
        assert s.status == status


def test_status_also_tracked_when_rfq_captured(framing):
    s = framing.MessageScanner(captured=b"Z")
    s.feed(msg("Z", b"T"))
    assert s.status == ord("T")
    assert s.captured == [(ord("Z"), b"T", 1)]


def test_zero_length_payloads(framing):
    s = framing.MessageScanner(counted=b"12nZ", captured=b"n")
    stream = msg("1") + msg("2") + msg("n") + msg("Z")
    assert s.feed(stream) == 4
    assert s.captured == [(ord("n"), b"", 0)]
    assert s.status == ord("I")  # an empty RFQ does not change it
    for cut in range(len(stream) + 1):
        s = framing.MessageScanner(counted=b"12nZ")
        assert s.feed(stream[:cut]) + s.feed(stream[cut:]) == 4


@pytest.mark.parametrize("length", [0, 1, 3])
def test_length_below_four_is_an_error(framing, length):
    s = framing.MessageScanner()
    with pytest.raises(framing.FramingError, match="invalid message length %d" % length):
        s.feed(raw_header("D", length) + b"xxxx")


def test_length_above_max_is_an_error(framing):
    s = framing.MessageScanner(max_message_size=100)
    assert s.feed(msg("D", b"x" * 100)) == 0  # exactly the limit is fine
    with pytest.raises(framing.FramingError):
        s.feed(msg("D", b"x" * 101))
    s = framing.MessageScanner()
    with pytest.raises(framing.FramingError, match="4294967295"):
        s.feed(raw_header("D", 0xFFFFFFFF))


def test_invalid_length_in_split_header(framing):
    s = framing.MessageScanner()
    s.feed(raw_header("D", 2)[:3])
    with pytest.raises(framing.FramingError):
        s.feed(raw_header("D", 2)[3:])


def test_framing_error_is_an_exception(framing):
    assert issubclass(framing.FramingError, Exception)


def test_last_type(framing):
    s = framing.MessageScanner()
    s.feed(msg("T", b"abc")[:5])  # header only
    assert s.last_type == ord("T")
    s.feed(msg("T", b"abc")[5:] + msg("D", b"")[:2])
    assert s.last_type == ord("T")  # "D" header not complete yet
    s.feed(msg("D", b"")[2:])
    assert s.last_type == ord("D")


def test_reset(framing):
    s = framing.MessageScanner(counted=b"D", captured=b"D")
    s.feed(msg("Z", b"E"))
    s.feed(msg("D", b"abc")[:6])
    assert not s.at_boundary()
    s.reset()
    assert s.at_boundary()
    assert s.captured == [] and s.last_type == 0
    assert s.status == ord("E")  # reset keeps the last known status
    assert s.feed(msg("D", b"xyz")) == 1
    assert s.captured == [(ord("D"), b"xyz", 3)]
    s.feed(msg("D", b"")[:3])  # partial header
    s.reset()
    assert s.at_boundary()
    assert s.feed(msg("D", b"")) == 1


def test_at_boundary(framing):
    s = framing.MessageScanner()
    assert s.at_boundary()
    s.feed(b"D")
    assert not s.at_boundary()
    s.feed(struct.pack("!I", 6))
    assert not s.at_boundary()
    s.feed(b"a")
    assert not s.at_boundary()
    s.feed(b"b")
    assert s.at_boundary()


def test_public_attributes_are_assignable(framing):
    s = framing.MessageScanner()
    s.status = ord("T")
    s.last_type = 0
    s.capture_limit = 2
    s.max_message_size = 10
    assert (s.status, s.capture_limit, s.max_message_size) == (ord("T"), 2, 10)


def test_non_contiguous_memoryview(framing):
    stream = PGBENCH_S
    doubled = bytes(b for b in stream for _ in (0, 1))
    view = memoryview(doubled)[::2]
    s = framing.MessageScanner(counted=b"DZ")
    assert s.feed(view) == 2
    assert s.status == ord("I") and s.last_type == ord("Z")


def test_split_messages(framing):
    stream = msg("R", struct.pack("!I", 0)) + msg("S", b"a\x00b\x00") + msg("Z", b"I")
    assert framing.split_messages(stream) == (
        [(ord("R"), b"\x00" * 4), (ord("S"), b"a\x00b\x00"), (ord("Z"), b"I")], len(stream))
    # A trailing partial message stays for the caller; `start` skips a prefix.
    for cut in range(len(stream)):
        messages, consumed = framing.split_messages(bytearray(stream[:cut]))
        assert consumed == sum(len(msg(t, p)) for t, p in messages)
        assert consumed <= cut
    first = len(msg("R", struct.pack("!I", 0)))
    assert framing.split_messages(memoryview(stream), first) == (
        [(ord("S"), b"a\x00b\x00"), (ord("Z"), b"I")], len(stream))
    assert framing.split_messages(b"") == ([], 0)
    with pytest.raises(framing.FramingError):
        framing.split_messages(raw_header("X", 3))


# -- MessageScanner: properties --------------------------------------------------------

TYPES = st.sampled_from(b"ZDCTEINSdQ\x00\xff")
MESSAGES = st.lists(
    st.tuples(TYPES, st.one_of(st.sampled_from([b"", b"I", b"T", b"E"]),
                               st.binary(max_size=300))),
    max_size=25)
SCANNER_ARGS = st.fixed_dictionaries({
    "counted": st.sets(TYPES).map(bytes),
    "captured": st.sets(TYPES).map(bytes),
    "capture_limit": st.sampled_from([0, 1, 2, 16, 65536]),
})


def _chunks(stream, cuts):
    points = sorted({c % (len(stream) + 1) for c in cuts})
    bounds = [0] + points + [len(stream)]
    return [stream[a:b] for a, b in zip(bounds, bounds[1:])]


def _observe(module, args, chunks, kind=bytes):
    s = module.MessageScanner(**args)
    counts = 0
    for chunk in chunks:
        counts += s.feed(kind(chunk))
    return counts, s.captured, s.status, s.last_type, s.at_boundary()


@settings(max_examples=300, deadline=None)
@given(messages=MESSAGES, args=SCANNER_ARGS,
       cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
       kind=st.sampled_from(BUFFER_KINDS))
def test_chunking_does_not_matter(framing, messages, args, cuts, kind):
    stream = b"".join(msg(t, p) for t, p in messages)
    whole = _observe(framing, args, [stream])
    assert _observe(framing, args, _chunks(stream, cuts), kind) == whole
    counts, captured, status, _, at_boundary = whole
    assert at_boundary
    assert counts == sum(1 for t, _ in messages if t in args["counted"])
    limit = args["capture_limit"]
    assert captured == [(t, p[:limit], len(p)) for t, p in messages if t in args["captured"]]
    rfq = [p for t, p in messages if t == ord("Z") and p]
    assert status == (rfq[-1][0] if rfq and limit > 0 else ord("I"))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), args=SCANNER_ARGS,
       max_size=st.sampled_from([0, 10, 1 << 30]),
       cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=6),
       kind=st.sampled_from(BUFFER_KINDS))
def test_twins_agree_on_any_bytes(both_framing, data, args, max_size, cuts, kind):
    """Arbitrary input, garbage included: same results, or the same error at the same point."""
    results = []
    for module in both_framing:
        s = module.MessageScanner(max_message_size=max_size, **args)
        trace = []
        for chunk in _chunks(data, cuts):
            try:
                trace.append(s.feed(kind(chunk)))
            except module.FramingError as exc:
                trace.append(("FramingError", str(exc)))
                break
            trace.append((list(s.captured), s.status, s.last_type, s.at_boundary()))
        results.append(trace)
    assert results[0] == results[1]


@settings(max_examples=200, deadline=None)
@given(messages=MESSAGES, args=SCANNER_ARGS,
       cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_twins_agree_on_streams(both_framing, messages, args, cuts):
    stream = b"".join(msg(t, p) for t, p in messages)
    py, c = both_framing
    chunks = _chunks(stream, cuts)
    assert _observe(py, args, chunks) == _observe(c, args, chunks)
    assert py.split_messages(stream) == c.split_messages(stream)


# -- LatencyHistogram --------------------------------------------------------------------

def test_latency_histogram_buckets(pool):
    from rdsproxy._fastpath.contract import LATENCY_BOUNDS
    h = pool.LatencyHistogram()
    assert h.buckets() == [0] * (len(LATENCY_BOUNDS) + 1) and h.sum == 0.0
    # A bound belongs to its own bucket (Prometheus's `le`); past the last, +Inf's.
    for seconds in (0.0, LATENCY_BOUNDS[0], 0.0003, 1.0, 1.0001, 10.0, 11.0, 1e9):
        h.observe(seconds)
    counts = h.buckets()
    assert counts[0] == 2 and counts[2] == 1
    assert counts[LATENCY_BOUNDS.index(1.0)] == 1 and counts[LATENCY_BOUNDS.index(2.5)] == 1
    assert counts[-2] == 1 and counts[-1] == 2 and sum(counts) == 8
    assert h.sum == pytest.approx(0.0 + 0.0001 + 0.0003 + 1.0 + 1.0001 + 10.0 + 11.0 + 1e9)


def test_pool_core_has_its_latency_histograms(pool):
    p = pool.PoolCore(1)
    p.borrow_latency.observe(0.002)
    assert sum(p.borrow_latency.buckets()) == 1 and sum(p.database_latency.buckets()) == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False)))
def test_latency_histogram_twins_agree(both_pool, samples):
    histograms = [twin.LatencyHistogram() for twin in both_pool]
    for h in histograms:
        for seconds in samples:
            h.observe(seconds)
    assert histograms[0].buckets() == histograms[1].buckets()
    assert histograms[0].sum == histograms[1].sum


# -- PoolCore ----------------------------------------------------------------------------

def test_pool_borrow_and_return(pool):
    p = pool.PoolCore(2)
    assert (p.total, p.borrowed, p.idle_count, p.max_size, p.waiting) == (0, 0, 0, 2, 0)
    assert p.try_borrow("k") is None
    assert p.reserve_new() is True
    assert p.reserve_new() is True
    assert p.reserve_new() is False  # budget spent
    assert (p.total, p.borrowed) == (2, 2)
    assert p.give_back("k", "c1") is None
    assert p.give_back("k", "c2") is None
    assert (p.total, p.borrowed, p.idle_count) == (2, 0, 2)
    assert p.try_borrow("other") is None
    assert p.try_borrow("k") == "c2"  # last in, first out
    assert (p.borrowed, p.idle_count) == (1, 1)
    assert p.try_borrow("k") == "c1"
    assert p.try_borrow("k") is None


def test_pool_max_size_assignable(pool):
    p = pool.PoolCore(1)
    assert p.reserve_new()
    assert not p.reserve_new()
    p.max_size = 3
    assert p.max_size == 3
    assert p.reserve_new()
    p.max_size = 0
    assert not p.reserve_new()


def test_pool_forget(pool):
    p = pool.PoolCore(2)
    p.reserve_new()
    p.reserve_new()
    p.forget(True)  # a borrowed connection died
    assert (p.total, p.borrowed) == (1, 1)
    p.give_back("k", "c")
    assert p.take_idle("c", "k") is True
    p.forget(False)  # the idle one we took got closed
    assert (p.total, p.borrowed, p.idle_count) == (0, 0, 0)


def test_pool_waiters_fifo(pool):
    p = pool.PoolCore(1)
    assert p.reserve_new()
    w1 = p.add_waiter("a", "w1")
    w2 = p.add_waiter("b", "w2")
    w3 = p.add_waiter("a", "w3")
    assert (w1, w2) == (("a", "w1"), ("b", "w2"))
    assert p.waiting == 3
    assert p.remove_waiter(w2) is True
    assert p.remove_waiter(w2) is False
    # A returned connection goes to the first waiter, whatever its key; still borrowed.
    assert p.give_back("b", "conn") == w1
    assert (p.borrowed, p.idle_count, p.waiting) == (1, 0, 1)
    assert p.pop_waiter() == w3
    assert p.pop_waiter() is None
    assert p.waiting == 0
    assert p.give_back("b", "conn") is None
    assert p.idle_count == 1


class _Waiter:
    borrow_entry = None
    borrow_deadline = None


def test_pool_queue_waiter_only_behind_others(pool):
    """The relay's shortcut queues a borrower only where the pool would do nothing else."""
    p = pool.PoolCore(1)
    p.clock = lambda: 100.0
    p.borrow_timeout = 5.0
    assert p.reserve_new()
    first, second, third = _Waiter(), _Waiter(), _Waiter()
    # Nobody waits yet: the pool must decide (it may open a connection or evict an idle one).
    assert p.queue_waiter("k", first) is False
    assert p.waiting == 0 and first.borrow_entry is None
    p.add_waiter("k", first)
    # Someone waits but no deadline timer runs: the pool must arm it.
    assert p.queue_waiter("k", second) is False
    p.deadline_armed = True
    assert p.queue_waiter("k", second) is True
    assert second.borrow_entry == ("k", second) and second.borrow_deadline == 105.0
    assert p.waiting == 2
    # No timeout configured: queued without a deadline, armed timer or not.
    p.borrow_timeout = 0.0
    p.deadline_armed = False
    assert p.queue_waiter("j", third) is True and third.borrow_deadline is None
    # Served first come, first served, and removable like any other entry.
    assert p.give_back("k", "conn") == ("k", first)
    assert p.remove_waiter(third.borrow_entry) is True
    assert p.pop_waiter() == ("k", second)


def test_pool_take_idle_and_idle_items(pool):
    p = pool.PoolCore(5)
    for _ in range(4):
        p.reserve_new()
    for key, conn in [("a", 1), ("b", 2), ("a", 3), ("b", 4)]:
        p.give_back(key, conn)
    assert p.idle_items() == [("a", 1), ("a", 3), ("b", 2), ("b", 4)]
    assert p.take_idle(1, "b") is False  # wrong key
    assert p.take_idle(99, "a") is False
    assert p.take_idle(1, "zz") is False
    assert p.take_idle(1, "a") is True
    assert p.take_idle(1, "a") is False
    assert p.idle_count == 3
    assert p.try_borrow("a") == 3
    assert p.take_idle(3, "a") is False  # borrowed, not idle
    assert p.idle_items() == [("b", 2), ("b", 4)]


class PoolTwins(RuleBasedStateMachine):
    """Random operation sequences on both twins must give the same answers and counters."""

    def __init__(self):
        super().__init__()
        py, c = pick(POOL, "py"), pick(POOL, "c")
        self.twins = None
        self._modules = (py, c)
        self.next_conn = 0

    entries = Bundle("entries")
    keys = st.sampled_from(["a", "b", "c"])

    @initialize(size=st.integers(min_value=0, max_value=4))
    def start(self, size):
        self.twins = [m.PoolCore(size) for m in self._modules]
        self.borrowed_conns = []  # (key, conn) we hold

    def both(self, method, *args):
        results = [getattr(p, method)(*args) for p in self.twins]
        assert results[0] == results[1], (method, args, results)
        return results[0]

    @rule(key=keys)
    def borrow(self, key):
        conn = self.both("try_borrow", key)
        if conn is None and self.both("reserve_new"):
            self.next_conn += 1
            conn = self.next_conn
        if conn is not None:
            self.borrowed_conns.append((key, conn))

    @rule(data=st.data())
    def give_back(self, data):
        if self.borrowed_conns:
            key, conn = self.borrowed_conns.pop(
                data.draw(st.integers(0, len(self.borrowed_conns) - 1)))
            if self.both("give_back", key, conn) is not None:
                self.borrowed_conns.append((key, conn))  # handed to a waiter

    @rule(data=st.data())
    def close_borrowed(self, data):
        if self.borrowed_conns:
            self.borrowed_conns.pop(data.draw(st.integers(0, len(self.borrowed_conns) - 1)))
            self.both("forget", True)

    @rule(data=st.data())
    def reap_idle(self, data):
        items = self.both("idle_items")
        if items:
            key, conn = data.draw(st.sampled_from(items))
            assert self.both("take_idle", conn, key) is True
            self.both("forget", False)

    @rule(target=entries, key=keys, who=st.integers(0, 1000))
    def wait(self, key, who):
        return self.both("add_waiter", key, who)

    @rule(entry=consumes(entries))
    def give_up(self, entry):
        self.both("remove_waiter", entry)

    @rule()
    def pop(self):
        self.both("pop_waiter")

    @rule(size=st.integers(min_value=0, max_value=5))
    def resize(self, size):
        for p in self.twins:
            p.max_size = size

    @invariant()
    def same_counters(self):
        if self.twins:
            a, b = ([p.total, p.borrowed, p.idle_count, p.max_size, p.waiting,
                     p.idle_items()] for p in self.twins)
            assert a == b
            assert a[1] == len(self.borrowed_conns)
            assert a[2] == len(a[5])


def test_pool_twins_agree(both_pool):
    PoolTwins.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                           deadline=None)
    PoolTwins.TestCase().runTest()


def test_fastpath_selection():
    import rdsproxy._fastpath as fastpath
    expected = "python" if (fastpath.PURE_PYTHON_FORCED or FRAMING["c"] is None
                            or POOL["c"] is None) else "cython"
    assert fastpath.IMPLEMENTATION == expected
    if REQUIRE_CYTHON and not fastpath.PURE_PYTHON_FORCED:
        assert fastpath.IMPLEMENTATION == "cython"



# -- the statement renaming quick lane (pg_statements_py / pg_statements_c) ------------

STATEMENTS = twins("pg_statements")


def _bind(portal, statement, params=b"\x00\x00\x00\x00\x00\x00"):
    return msg(ord("B"), portal + b"\x00" + statement + b"\x00" + params)


def _quick_lane(module, names, cache, watched=()):
    """A client's book and a connection's answer queue of `module`'s twin."""
    book = module.BookCore()
    book.names = dict(names)
    book.watched = set(watched)
    queue = module.AnswerQueue(None, 10)
    queue.cache = cache
    return book, queue


def test_rename_binds_renames_named_binds_only():
    py = pick(STATEMENTS, "py")
    from collections import OrderedDict
    for module in (py, pick(STATEMENTS, "c")):
        cache = OrderedDict([(b"k1", b"rdsproxy_1"), (b"k2", b"rdsproxy_2")])
        book, queue = _quick_lane(module, {b"s1": b"k1"}, cache)
        chunk = (_bind(b"", b"s1") + msg(ord("D"), b"P\x00") + msg(ord("E"), b"\x00" + bytes(4))
                 + msg(ord("S")) + _bind(b"p", b"") + msg(ord("E"), b"p\x00" + bytes(4)))
        sent, ready, unsynced = book.rename_binds(chunk, queue)
        assert sent == (_bind(b"", b"rdsproxy_1") + chunk[len(_bind(b"", b"s1")):])
        assert (ready, unsynced) == (1, [ord("B"), ord("E")])
        assert list(cache) == [b"k2", b"k1"] and queue.recent == b"k1"   # used last
        # Another key made last (as the engine's path does) is noticed by the next Bind.
        cache.move_to_end(b"k2")
        queue.recent = b"k2"
        assert book.rename_binds(chunk, queue)[0] == sent
        assert list(cache) == [b"k2", b"k1"]
        for long_way in (_bind(b"", b"unknown"), msg(ord("P"), b"s\x00select 1\x00\x00\x00"),
                         msg(ord("D"), b"Ss1\x00"), msg(ord("C"), b"Ss1\x00"),
                         msg(ord("Q"), b" DEALLOCATE ALL\x00"),
                         msg(ord("P"), b"\x00discard all\x00\x00\x00"), chunk[:-3]):
            assert book.rename_binds(long_way, queue) is None, long_way
        # A Bind of a statement whose run must be checked takes the long way too.
        book.watched = {b"k1"}
        assert book.rename_binds(chunk, queue) is None
        book.watched = {b"k2"}
        assert book.rename_binds(chunk, queue) is not None


_MESSAGES = st.sampled_from([
    ("B", b"", b"s1"), ("B", b"p", b"s2"), ("B", b"", b""), ("B", b"", b"nope"), ("E",), ("S",),
    ("H",), ("Q", b"select 1"), ("D", b"P"), ("C", b"P"), ("P", b""), ("P", b"s1"), ("F",)])


def _chunk(messages, cut):
    chunk = b""
    for m in messages:
        if m[0] == "B":
            chunk += _bind(m[1], m[2])
        elif m[0] in "DC":
            chunk += msg(ord(m[0]), m[1] + b"\x00")
        elif m[0] == "P":
            chunk += msg(ord("P"), m[1] + b"\x00select 1\x00\x00\x00")
        elif m[0] == "Q":
            chunk += msg(ord("Q"), m[1] + b"\x00")
        else:
            chunk += msg(ord(m[0]), bytes(4) if m[0] in "EF" else b"")
    return chunk[:len(chunk) - cut] if cut < len(chunk) else chunk


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.lists(_MESSAGES, max_size=12), st.integers(0, 40),
                          st.sampled_from([None, b"k1", b"k2"])), min_size=1, max_size=4))
def test_rename_binds_twins_agree(chunks):
    """Chunks one after another on one book and queue (the memos carry over); between
    them the engine may make a key the most recently used."""
    from collections import OrderedDict
    lanes = []
    for module in (pick(STATEMENTS, "py"), pick(STATEMENTS, "c")):
        cache = OrderedDict([(b"k1", b"rdsproxy_1"), (b"k2", b"rdsproxy_22")])
        lanes.append((cache,) + _quick_lane(module, {b"s1": b"k1", b"s2": b"k2"}, cache))
    for messages, cut, touched in chunks:
        results = []
        for cache, book, queue in lanes:
            if touched is not None:
                cache.move_to_end(touched)
                queue.recent = touched
            results.append((book.rename_binds(_chunk(messages, cut), queue), list(cache)))
            # Skipping the move of `recent` is right only while it is the last key.
            assert queue.recent is None or list(cache)[-1] == queue.recent
        assert results[0] == results[1]


# -- the ledger's phase gauges (ledger_py / ledger_c) ----------------------------------------

LEDGER = twins("ledger")
PHASE_NAMES = ("free", "waiting", "syncing", "active", "pinned")
# Written out here, not read from the module: a client prepared a connection it never asked
# for, or a pinned session checked or sent back to wait, is a bug the ledger must count.
STRAY = {("free", "syncing"), ("pinned", "syncing"), ("pinned", "waiting")}


def test_phase_names_match_the_constants():
    from rdsproxy._fastpath.contract import Phase as phase
    assert [getattr(phase, name.upper()) for name in PHASE_NAMES] == list(range(5))
    assert phase.NAMES == PHASE_NAMES


class LedgerTwins(RuleBasedStateMachine):
    """Clients move between phases through both twins' ClientLedger.move; each twin's
    gauges always equal a recount of the clients' phases, and strays are counted."""

    @initialize()
    def make(self):
        self.ledgers = [module.ClientLedger(set(), None, 10)
                        for module in (pick(LEDGER, "py"), pick(LEDGER, "c"))]
        self.phases = [0] * 6     # six clients, all free
        self.strays = 0

    @rule(who=st.integers(0, 5), new=st.integers(0, 4))
    def move(self, who, new):
        old = self.phases[who]
        results = {ledger.move(old, new) for ledger in self.ledgers}
        assert results == {new}
        self.strays += (PHASE_NAMES[old], PHASE_NAMES[new]) in STRAY
        self.phases[who] = new

    @invariant()
    def gauges_add_up(self):
        expected = {name: self.phases.count(i) for i, name in enumerate(PHASE_NAMES) if i}
        for ledger in self.ledgers:
            assert ledger.phases() == expected
            assert ledger.stray_moves == self.strays


def test_ledger_phase_gauges_twins():
    LedgerTwins.TestCase.settings = settings(max_examples=100, stateful_step_count=40,
                                             deadline=None)
    LedgerTwins.TestCase().runTest()
