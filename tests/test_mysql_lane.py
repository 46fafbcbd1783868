"""The MySQL relay's quick lane (rdsproxy._fastpath.mysql_relay): its answer scan against
ResponseTracker over real MariaDB answers cut at every byte, in both twins; and, through
the proxy, that plain commands take it while everything that changes or reads session
state behaves as the slow path makes it behave.
"""
from __future__ import annotations

import pytest
from pymysql.constants import CLIENT

from harness import APP_DB, APP_PASSWORD as APP_PW, APP_USER as APP, connect, scalar
from rdsproxy.engines.mysql import protocol as p
from utils import built, log_in, twins

TWINS = built(twins("mysql_relay"))
PY = TWINS["py"]   # its constants (the compiled twin's are C values of the same source)


def test_the_wire_values_are_mysqls():
    # The compiled twin has them as C constants, from the same source.
    for relay in [PY]:
        assert (relay.COM_QUERY, relay.COM_STMT_EXECUTE) == (p.COM_QUERY, p.COM_STMT_EXECUTE)
        assert (relay.OK_HEADER, relay.EOF_HEADER, relay.ERR_HEADER, relay.LOCAL_INFILE_HEADER) \
            == (p.OK_HEADER, p.EOF_HEADER, p.ERR_HEADER, p.LOCAL_INFILE_HEADER)
        assert relay.CURSOR_TYPE_MASK == p.CURSOR_TYPE_MASK
        assert relay.PARAMETER_COUNT_AVAILABLE == p.PARAMETER_COUNT_AVAILABLE
        assert relay.LAST_STATEMENT_ID == p.MARIADB_LAST_STATEMENT_ID
        assert relay.CLIENT_PROTOCOL_41 == p.CLIENT_PROTOCOL_41
        assert relay.CLIENT_DEPRECATE_EOF == p.CLIENT_DEPRECATE_EOF
        assert relay.UNFOLLOWED_CAPABILITIES == (p.MARIADB_CLIENT_PROGRESS
                                                 | p.MARIADB_CLIENT_CACHE_METADATA)
        assert relay.SERVER_MORE_RESULTS_EXISTS == p.SERVER_MORE_RESULTS_EXISTS
        assert relay.SERVER_STATUS_CURSOR_EXISTS == p.SERVER_STATUS_CURSOR_EXISTS
        assert relay.HOLD_STATUS == p.SERVER_STATUS_IN_TRANS | p.SERVER_STATUS_CURSOR_EXISTS


# --- the answer scan, against ResponseTracker ------------------------------------------------

QUERIES = [
    "SELECT 1",
    "SELECT * FROM t",
    "SELECT * FROM t WHERE id < 0",
    "UPDATE t SET v = v WHERE id < 3",
    "UPDATE t SET v = 'a' WHERE id = 1",
    "INSERT INTO lane_t (v) VALUES ('z')",
    "SELECT no_such_column FROM t",
    "SELECT REPEAT('x', 70000), 2 UNION ALL SELECT 'y', 3",
    "SELECT 1; SELECT 2, 'two'; UPDATE t SET v = v WHERE id = 1",
    "SELECT 1; SELECT no_such_column FROM t",
    "BEGIN",
    "COMMIT",
    "SELECT " + ", ".join(str(i) for i in range(300)),   # a column count past 250
]


def captured_answers(mariadb, deprecate_eof: bool):
    """(raw answer bytes, ResponseTracker fed its packets) for each of QUERIES, captured
    from MariaDB through a socket."""
    caps = p.CLIENT_MULTI_STATEMENTS | (p.CLIENT_DEPRECATE_EOF if deprecate_eof else 0)
    s = log_in(mariadb.port, APP, APP_PW, APP_DB, capabilities=caps)
    try:
        assert bool(s.caps & p.CLIENT_DEPRECATE_EOF) == deprecate_eof
        s.query("CREATE TABLE IF NOT EXISTS lane_t (id INT AUTO_INCREMENT PRIMARY KEY, "
                "v VARCHAR(8))")
        out = []
        for sql in QUERIES:
            status = s.status
            tracker, packets = s.query(sql)
            raw, seq = [], 1
            for payload in packets:
                raw.append(p.packet(seq, payload))
                seq = p.seq_after(seq, len(payload))
            out.append((sql, b"".join(raw), tracker, packets[0], status, s.caps))
        s.query("DROP TABLE lane_t")
        return out
    finally:
        s.close()


@pytest.mark.parametrize("deprecate_eof", [True, False], ids=["deprecate_eof", "eof"])
@pytest.mark.parametrize("twin", list(TWINS), ids=[f"{k}-twin" for k in TWINS])
def test_the_scan_ends_answers_where_the_tracker_does(mariadb, twin, deprecate_eof):
    relay_module = TWINS[twin]
    for sql, raw, tracker, first, status, caps in captured_answers(mariadb, deprecate_eof):
        first_end = 4 + len(first)
        cuts = range(len(raw) + 1) if len(raw) < 4000 else \
            list(range(0, 200)) + list(range(len(raw) - 200, len(raw) + 1))
        for cut in cuts:
            relay = relay_module.ServerRelay()
            relay.capabilities = caps
            relay.status = status
            relay_module.begin_answer(relay)
            chunks = [c for c in (raw[:cut], raw[cut:]) if c]
            results = [relay_module.scan_chunk(relay, chunk) for chunk in chunks]
            if cut and cut < first_end:
                # Its first packet cut short: the slow path takes the answer, untouched.
                assert results[0] == PY.SCAN_HANDOFF, (sql, cut)
                continue
            assert results[:-1] == [PY.SCAN_MORE] * (len(chunks) - 1), (sql, cut)
            assert results[-1] == len(chunks[-1]), (sql, cut)
            assert relay.lane_status == tracker.status_flags, (sql, cut)
            ok = tracker.last_ok
            assert relay.lane_ok == (ok.header if ok is not None else -1), (sql, cut)
            if ok is not None:
                assert (relay.lane_affected, relay.lane_insert_id) == (
                    ok.affected_rows, ok.last_insert_id), (sql, cut)
        # Fed a byte at a time (the first packet whole), it ends at the last byte.
        relay = relay_module.ServerRelay()
        relay.capabilities = caps
        relay.status = status
        relay_module.begin_answer(relay)
        results = [relay_module.scan_chunk(relay, raw[:first_end])]
        results += [relay_module.scan_chunk(relay, raw[i:i + 1])
                    for i in range(first_end, len(raw))]
        assert results[-1] >= 0 and all(r == PY.SCAN_MORE for r in results[:-1]), sql


@pytest.mark.parametrize("twin", list(TWINS), ids=[f"{k}-twin" for k in TWINS])
def test_local_infile_and_a_framing_problem_leave_the_lane(twin):
    relay_module = TWINS[twin]
    caps = p.CLIENT_PROTOCOL_41 | p.CLIENT_DEPRECATE_EOF
    relay = relay_module.ServerRelay()
    relay.capabilities = caps
    relay.status = p.SERVER_STATUS_AUTOCOMMIT
    relay_module.begin_answer(relay)
    request = p.packet(1, b"\xfbdata.csv")
    assert relay_module.scan_chunk(relay, request) == PY.SCAN_HANDOFF
    relay_module.begin_answer(relay)
    # A result set whose rows are followed by a packet of length 0 is no answer at all.
    body = (p.packet(1, p.column_count(1, caps)) + p.packet(2, p.ColumnDefinition("a").build(caps))
            + p.packet(3, p.text_row(["1"])) + b"\x00\x00\x00\x04")
    assert relay_module.scan_chunk(relay, body + b"\x00") == PY.SCAN_BROKEN


# --- through the proxy ------------------------------------------------------------------------

def lane_count(px) -> int:
    return px.stats()["QuickCommands"]


def types_unbound(execute: bytes, nparams: int) -> bytes:
    """A COM_STMT_EXECUTE payload with new_params_bound=0 and no types."""
    at = 10 + (nparams + 7) // 8
    assert execute[at] == 1
    return execute[:at] + b"\x00" + execute[at + 1 + 2 * nparams:]


def test_plain_queries_and_executes_take_the_lane(make_proxy):
    px = make_proxy(budget=2)
    with connect(px) as c:
        for _ in range(3):
            assert scalar(c, "SELECT COUNT(*) FROM t") >= 3
        taken = lane_count(px)
        assert taken >= 2          # the first one was the slow path's, which remembered it
        s = log_in(px.port, APP, APP_PW, APP_DB)
        try:
            tracker, packets = s.command(p.com_stmt_prepare("SELECT v FROM t WHERE id = ?"))
            stmt_id = tracker.prepare_ok.statement_id
            for n, i in enumerate((1, 2, 1)):
                execute = p.com_stmt_execute(stmt_id, [i])
                if n:
                    execute = types_unbound(execute, 1)   # as a client sends it again
                tracker, packets = s.command(execute)
                assert tracker.error is None and tracker.rows == 1
            assert lane_count(px) >= taken + 2
        finally:
            s.close()
    assert px.stats()["pool"]["borrowed"] == 0
    # The clients gone still count: the figure only grows.
    assert lane_count(px) >= taken + 2


def test_state_changes_stay_with_the_slow_path(make_proxy):
    px = make_proxy(budget=2)
    with connect(px) as a, connect(px) as b:
        assert scalar(a, "SELECT @@session.sql_select_limit") != 7
        scalar(a, "SET SESSION sql_select_limit = 7")
        for _ in range(3):
            assert scalar(a, "SELECT @@session.sql_select_limit") == 7
            assert scalar(b, "SELECT @@session.sql_select_limit") != 7
        with a.cursor() as cur:
            cur.execute("INSERT INTO t (v) VALUES ('lane')")
            inserted = cur.lastrowid
        for _ in range(2):
            scalar(b, "SELECT 1")   # b's connection may be a's last one
            assert scalar(a, "SELECT LAST_INSERT_ID()") == inserted
        a.begin()
        scalar(a, "UPDATE t SET v = 'lane2' WHERE id = %s", (inserted,))
        scalar(a, "SELECT 1")
        assert px.stats()["pool"]["borrowed"] == 1   # the transaction holds it
        assert scalar(b, "SELECT v FROM t WHERE id = %s", (inserted,)) == "lane"
        a.rollback()
        assert px.stats()["pool"]["borrowed"] == 0
        scalar(a, "DELETE FROM t WHERE id = %s", (inserted,))


def test_row_count_is_the_clients_own_across_connections(make_proxy):
    px = make_proxy(budget=2)
    with connect(px, client_flag=CLIENT.MULTI_STATEMENTS) as a, connect(px) as b:
        for _ in range(2):
            scalar(a, "UPDATE t SET v = v WHERE id < 3")
            scalar(b, "SELECT 1")
            assert scalar(a, "SELECT ROW_COUNT()") in (0, 2)
            assert scalar(a, "SELECT ROW_COUNT()") == -1
