"""The MySQL answer scanner (rdsproxy._fastpath.mysql_framing): its pure-Python and Cython
twins must find the same answer ends, row counts and final status as a ResponseTracker fed
whole packets, however the bytes are cut into chunks."""
from __future__ import annotations

import random

import pytest

from rdsproxy.engines.mysql import protocol as p
from utils import built, twins

TWINS = list(built(twins("mysql_framing")).values())
EOF_MODES = [p.DEFAULT_MAX_PAYLOAD and (p.CLIENT_PROTOCOL_41 | p.CLIENT_DEPRECATE_EOF),
             p.CLIENT_PROTOCOL_41]


def answer(caps: int, results: int, rows: int, *, big_row: bool = False) -> bytes:
    """A multi-result COM_QUERY answer as the server sends it."""
    out = []
    seq = 1
    cols = [p.ColumnDefinition("a"), p.ColumnDefinition("b", type=p.MYSQL_TYPE_LONG)]
    for r in range(results):
        more = p.SERVER_MORE_RESULTS_EXISTS if r < results - 1 else 0
        status = p.SERVER_STATUS_AUTOCOMMIT | more
        if r % 3 == 2:   # an OK result (an UPDATE among SELECTs)
            payloads = [p.OkPacket(affected_rows=r, status_flags=status).build(caps)]
        else:
            payloads = [p.column_count(2, caps)] + [c.build(caps) for c in cols]
            if not caps & p.CLIENT_DEPRECATE_EOF:
                payloads.append(p.EofPacket(0, status).build(caps))
            payloads += [p.text_row([f"row{i}" * (i % 7), i]) for i in range(rows)]
            if big_row and r == 0:
                payloads.append(p.text_row(["x" * (p.MAX_PACKET_LENGTH + 10), 1]))
            payloads.append(p.eof_or_ok(status, caps))
        for payload in payloads:
            out.append(p.packet(seq, payload))
            seq = p.seq_after(seq, len(payload))
    return b"".join(out)


def reference(caps: int, data: bytes):
    tracker = p.ResponseTracker(p.COM_QUERY, caps)
    reader = p.PacketReader(max_payload=1 << 30)
    for _seq, payload in reader.feed(data):
        if tracker.feed(payload):
            break
    return tracker


def chunks(data: bytes, rng: random.Random):
    pos = 0
    while pos < len(data):
        size = rng.choice((1, 2, 3, 4, 5, 7, 64, 1000, 65536, 1 << 20))
        yield data[pos:pos + size]
        pos += size


@pytest.mark.parametrize("twin", TWINS, ids=lambda m: m.__name__.rsplit(".", 1)[1])
@pytest.mark.parametrize("caps", EOF_MODES, ids=["deprecate_eof", "eof_packets"])
def test_scanner_matches_the_tracker(twin, caps):
    rng = random.Random(6)
    for results, rows in ((1, 0), (1, 1), (1, 50), (3, 20), (5, 3)):
        data = answer(caps, results, rows)
        want = reference(caps, data)
        for _ in range(20):
            scanner = twin.ResponseScanner()
            tracker = p.ResponseTracker(p.COM_QUERY, caps)
            seen = 0
            end = -1
            for chunk in chunks(data, rng):
                end = scanner.scan(chunk, tracker)
                if end >= 0:
                    seen += end
                    assert end == len(chunk)
                    break
                seen += len(chunk)
            assert tracker.done and seen == len(data)
            assert (tracker.rows, tracker.results, tracker.status_flags) == \
                (want.rows, want.results, want.status_flags)


@pytest.mark.parametrize("twin", TWINS, ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_scanner_skips_16mib_rows_and_stops_at_the_end(twin):
    caps = p.CLIENT_PROTOCOL_41 | p.CLIENT_DEPRECATE_EOF
    data = answer(caps, 1, 2, big_row=True)
    trailing = b"\x05\x00\x00\x09extra"
    scanner = twin.ResponseScanner()
    tracker = p.ResponseTracker(p.COM_QUERY, caps)
    pos = 0
    for size in (100, 1 << 22, 1 << 23, 1 << 24):
        chunk = (data + trailing)[pos:pos + size]
        end = scanner.scan(chunk, tracker)
        if end >= 0:
            assert pos + end == len(data)
            break
        pos += len(chunk)
    assert tracker.done and tracker.rows == 3


@pytest.mark.parametrize("twin", TWINS, ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_scanner_reports_errors_and_bad_packets(twin):
    caps = p.CLIENT_PROTOCOL_41 | p.CLIENT_DEPRECATE_EOF
    err = p.packet(1, p.ErrPacket(1146, "no such table", "42S02").build())
    tracker = p.ResponseTracker(p.COM_QUERY, caps)
    assert twin.ResponseScanner().scan(err, tracker) == len(err)
    assert tracker.error.code == 1146
    tracker = p.ResponseTracker(p.COM_STMT_PREPARE, caps)
    with pytest.raises(p.ProtocolViolation):
        twin.ResponseScanner().scan(p.packet(1, b"\x07junk"), tracker)
