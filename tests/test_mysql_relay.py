"""The MySQL engine relaying commands: transactions and autocommit holding a server
connection and giving it back, multi-statements, the utility commands (field list,
statistics, ping, init db), LOCAL INFILE, and binary prepared statements shared, moved
between connections and pipelined.

`budget=1` puts every client on the same server connection, which is what the tests of
prepared statements shared between clients need.
"""
from __future__ import annotations

import random
import re
import threading
import time

import pytest
from pymysql.constants import CLIENT

from harness import (APP_DB, APP_PASSWORD as APP_PW, APP_USER as APP, connect, engine,
                     proxy_connections, scalar)
from rdsproxy.engines.mysql import protocol as p
from utils import concurrently, log_in


# --- relaying -----------------------------------------------------------------------------

def test_transactions_hold_and_release(make_proxy, mariadb):
    px = make_proxy(budget=4)
    with connect(px) as a, connect(px) as b:
        a.begin()
        with a.cursor() as cur:
            cur.execute("INSERT INTO t (v) VALUES ('tx')")
        assert px.stats()["pool"]["borrowed"] == 1        # held by the open transaction
        assert scalar(b, "SELECT COUNT(*) FROM t WHERE v = 'tx'") == 0
        a.rollback()
        assert px.stats()["pool"]["borrowed"] == 0
        assert scalar(b, "SELECT COUNT(*) FROM t WHERE v = 'tx'") == 0
        a.begin()
        with a.cursor() as cur:
            cur.execute("INSERT INTO t (v) VALUES ('tx')")
        a.commit()
        assert scalar(b, "SELECT COUNT(*) FROM t WHERE v = 'tx'") == 1
        scalar(b, "DELETE FROM t WHERE v = 'tx'")


def test_autocommit_off_keeps_connection_until_commit(make_proxy):
    px = make_proxy(budget=4)
    with connect(px, autocommit=False) as a, connect(px) as b:
        with a.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM t")
            assert px.stats()["pool"]["borrowed"] == 1
            cur.execute("INSERT INTO t (v) VALUES ('ac0')")
        assert scalar(b, "SELECT COUNT(*) FROM t WHERE v = 'ac0'") == 0
        a.commit()
        assert px.stats()["pool"]["borrowed"] == 0
        assert scalar(b, "SELECT COUNT(*) FROM t WHERE v = 'ac0'") == 1
        scalar(b, "DELETE FROM t WHERE v = 'ac0'")


def test_multi_statements_and_results(make_proxy):
    px = make_proxy()
    with connect(px, client_flag=CLIENT.MULTI_STATEMENTS) as c, c.cursor() as cur:
        cur.execute("SELECT 1; SELECT 'x', 'y'; UPDATE t SET v = v WHERE id = 1; SELECT 3")
        results = [tuple(cur.fetchall())]
        while cur.nextset():
            results.append(tuple(cur.fetchall()))
        assert results == [((1,),), (("x", "y"),), (), ((3,),)]
        assert scalar(c, "SELECT 4") == 4


def test_field_list_statistics_ping_init_db(make_proxy):
    px = make_proxy()
    s = log_in(px.port, APP, APP_PW, APP_DB)
    try:
        tracker, packets = s.command(p.com_field_list("t"))
        assert tracker.error is None and len(packets) >= 2
        tracker, packets = s.command(p.com_statistics())
        assert b"Uptime" in packets[0]
        tracker, _ = s.command(p.com_ping())
        assert tracker.error is None
        tracker, _ = s.command(p.com_init_db("mysql"))
        assert tracker.error is None
        assert s.scalar("SELECT DATABASE()") == b"mysql"
    finally:
        s.close()


def test_local_infile(make_proxy, tmp_path):
    px = make_proxy()
    data = tmp_path / "rows.tsv"
    data.write_text("infile1\ninfile2\n")
    with connect(px, local_infile=True) as c, c.cursor() as cur:
        cur.execute(f"LOAD DATA LOCAL INFILE '{data}' INTO TABLE t (v)")
        assert cur.rowcount == 2
        assert scalar(c, "SELECT COUNT(*) FROM t WHERE v LIKE 'infile%'") == 2
        cur.execute("DELETE FROM t WHERE v LIKE 'infile%'")

# --- prepared statements -------------------------------------------------------------------

def prepare(s, sql):
    tracker, packets = s.command(p.com_stmt_prepare(sql))
    assert tracker.error is None, tracker.error
    return tracker.prepare_ok


def execute(s, stmt_id, params=(), *, types=True, ncols=1):
    payload = p.com_stmt_execute(stmt_id, params)
    if not types and params:
        ex = p.StmtExecute.parse(payload, len(params))
        payload = p.StmtExecute(ex.statement_id, ex.flags, 1, ex.null_bitmap, False, b"",
                                ex.values).build()
    tracker, packets = s.command(payload)
    assert tracker.error is None, tracker.error
    return packets


def binary_string(packets):
    """The first column of the single binary row, as a length-encoded string."""
    row = packets[-2]
    value, _ = p.read_lenenc_str(row, 2)
    return value


def binary_longlong(packets):
    return int.from_bytes(packets[-2][2:10], "little", signed=True)


def test_prepared_statements_two_clients_one_connection(make_proxy, mariadb):
    px = make_proxy(budget=1)
    a = log_in(px.port, APP, APP_PW, APP_DB)
    b = log_in(px.port, APP, APP_PW, APP_DB)
    try:
        sa = prepare(a, "SELECT CONCAT('a:', ?)")
        sb = prepare(b, "SELECT ? * 2")
        assert sa.statement_id == sb.statement_id == 1     # each client's own ids
        sb2 = prepare(b, "SELECT CONCAT('a:', ?)")          # the same text as a's
        assert sb2.statement_id == 2
        for i in range(3):
            assert binary_string(execute(a, 1, [f"x{i}"])) == f"a:x{i}".encode()
            assert binary_longlong(execute(b, 1, [i + 10])) == 2 * (i + 10)
            # new_params_bound=0: the types a bound earlier, even though b's execute of the
            # shared server statement bound other types in between.
            assert binary_string(execute(b, 2, [7])) == b"a:7"
            assert binary_string(execute(a, 1, ["y"], types=False)) == b"a:y"
        assert proxy_connections(mariadb) == 1
        assert px.stats()["pinned_sessions"] == 0
        # Close on one client does not close the other's statement.
        a.sock.sendall(p.packet(0, p.com_stmt_close(1)))
        assert binary_string(execute(b, 2, ["z"])) == b"a:z"
        tracker, packets = a.command(p.com_stmt_execute(1, ["q"]))
        assert tracker.error is not None and tracker.error.code == 1243
        assert a.scalar("SELECT 1") == b"1"
    finally:
        a.close()
        b.close()


def test_prepared_statement_reprepared_on_another_connection(make_proxy):
    px = make_proxy(budget=3)
    a = log_in(px.port, APP, APP_PW, APP_DB)
    try:
        stmt = prepare(a, "SELECT v FROM t WHERE id = ?")
        pool = next(iter(engine(px).router.pools.values()))
        # Close every idle connection: the next execute borrows a fresh one.
        px.call(pool.close_idle)
        assert binary_string(execute(a, stmt.statement_id, [2])) == b"b"
        # A cursor keeps the connection until it is exhausted.
        tracker, _ = a.command(p.com_stmt_execute(stmt.statement_id, [3],
                                                  flags=p.CURSOR_TYPE_READ_ONLY))
        assert tracker.error is None and tracker.cursor_open
        assert px.stats()["pool"]["borrowed"] == 1
        tracker, packets = a.command(p.com_stmt_fetch(stmt.statement_id, 10))
        assert tracker.error is None and len(packets) == 2
        assert px.stats()["pool"]["borrowed"] == 0
        # Long data: sent without an answer, used by the execute that follows.
        long_stmt = prepare(a, "SELECT CONCAT(?, '!')")
        a.sock.sendall(p.packet(0, p.com_stmt_send_long_data(long_stmt.statement_id, 0, b"abc" * 1000)))
        assert px.stats()["pool"]["borrowed"] == 1
        payload = p.com_stmt_execute(long_stmt.statement_id, [b""])
        assert binary_string(execute(a, long_stmt.statement_id, [b""]))[:6] == b"abcabc"
        del payload
    finally:
        a.close()

@pytest.mark.parametrize("then", ["reset_another", "close_it"])
def test_long_data_never_reaches_another_client(make_proxy, then):
    """Data a client sent ahead for a statement it then abandons (it resets another
    statement, or closes this one) is not there for the next client of that text on the
    shared server statement."""
    px = make_proxy(budget=1)
    a = log_in(px.port, APP, APP_PW, APP_DB)
    b = log_in(px.port, APP, APP_PW, APP_DB)
    try:
        secret = prepare(a, "SELECT CONCAT('x', ?)")
        other = prepare(a, "SELECT ? + 1")
        a.sock.sendall(p.packet(0, p.com_stmt_send_long_data(secret.statement_id, 0,
                                                             b"SECRET")))
        if then == "reset_another":
            tracker, _ = a.command(p.com_stmt_reset(other.statement_id))
            assert tracker.error is None
        else:
            a.sock.sendall(p.packet(0, p.com_stmt_close(secret.statement_id)))
        assert a.scalar("SELECT 1") == b"1"

        def b_runs_the_same_text():
            mine = prepare(b, "SELECT CONCAT('x', ?)")
            return binary_string(execute(b, mine.statement_id, ["mine"]))
        b_sees: dict = {}
        b_thread = threading.Thread(target=lambda: b_sees.update({0: b_runs_the_same_text()}))
        b_thread.start()
        if then == "reset_another":
            # a keeps the connection, and its data, until its execute; b waits for it.
            time.sleep(0.5)
            assert binary_string(execute(a, secret.statement_id, [b""])) == b"xSECRET"
        b_thread.join(30)
        assert b_sees == {0: b"xmine"}
    finally:
        a.close()
        b.close()


def test_pipelined_prepare_execute_of_the_last_statement(make_proxy):
    """MariaDB Connector/C's execute_direct: PREPARE, EXECUTE(-1) and CLOSE(-1) in one
    write; the proxy answers both in order and -1 names the statement just prepared."""
    px = make_proxy(budget=2)
    s = log_in(px.port, APP, APP_PW, APP_DB)
    try:
        last = p.MARIADB_LAST_STATEMENT_ID
        for sql, ok in (("SELECT CONCAT(?, '-piped')", True), ("SELECT nope FROM nowhere WHERE ?", False)):
            execute_payload = p.com_stmt_execute(last, ["v"])
            s.sock.sendall(p.packet(0, p.com_stmt_prepare(sql)) + p.packet(0, execute_payload)
                           + p.packet(0, p.com_stmt_close(last)))
            answers = []
            for payload in (p.com_stmt_prepare(sql), execute_payload):
                tracker = p.ResponseTracker(payload, s.caps)
                packets = []
                while not tracker.done:
                    _seq, pl = s.recv_packet()
                    packets.append(pl)
                    tracker.feed(pl)
                answers.append((tracker, packets))
            (prep, _), (ex, rows) = answers
            if ok:
                assert prep.error is None and ex.error is None
                assert binary_string(rows) == b"v-piped"
            else:
                assert prep.error is not None and ex.error is not None
                assert ex.error.code == 1243
        assert s.scalar("SELECT 1") == b"1"
    finally:
        s.close()


# --- random traffic, compared with direct sessions ---------------------------------------

TEXTS = ["SELECT CONCAT('x', ?)", "SELECT ? + 1", "SELECT ? * 2", "SELECT @v",
         "SELECT COUNT(*) FROM t WHERE id > ?", "SELEC ?"]


def random_steps(seed: int) -> list:
    """A client's commands: binary statements under names of its own, long data and its
    execute, resets and closes, transactions and a user variable."""
    rnd = random.Random(seed)
    steps = []
    for _ in range(30):
        pick = rnd.random()
        name = rnd.choice("abcd")
        if pick < 0.25:
            steps.append(("prepare", name, rnd.choice(TEXTS)))
        elif pick < 0.55:
            steps.append(("execute", name, rnd.randint(0, 9)))
        elif pick < 0.62:
            steps.append(("close", name))
        elif pick < 0.67:
            steps.append(("reset", name))
        elif pick < 0.70:
            # A name and text of their own: long data for a statement whose text the client
            # also prepared under another name, with other parameter types bound, is read
            # by the shared server statement differently (README).
            steps.append(("long_data", "z", "L%d" % rnd.randint(0, 9)))
        elif pick < 0.72:
            steps.append(("prepare", "z", "SELECT CONCAT('long ', ?)"))
        else:
            steps.append(("query", rnd.choice(["BEGIN", "COMMIT", "ROLLBACK", "SELECT @v",
                                               "SET @v = %d" % rnd.randint(0, 9),
                                               "SELECT COUNT(*) FROM t"])))
    return steps


def run_steps(port: int, steps: list) -> list:
    """What a client sees of `steps` on a session through `port`: for each command with
    an answer, its error (code, message), a prepare's counts, or the packets of the answer."""
    session = log_in(port, APP, APP_PW, APP_DB)
    ids: dict[str, int] = {}
    seen = []
    try:
        for step in steps:
            kind, name = step[0], step[1] if len(step) > 1 else None
            stmt_id = ids.get(name, 999)   # never prepared: an id the session never gave
            if kind == "close":
                session.sock.sendall(p.packet(0, p.com_stmt_close(stmt_id)))
                continue
            if kind == "long_data":   # then the execute it is for, as drivers send them
                session.sock.sendall(p.packet(0, p.com_stmt_send_long_data(stmt_id, 0,
                                                                           step[2].encode())))
            payload = {"prepare": lambda: p.com_stmt_prepare(step[2]),
                       "execute": lambda: p.com_stmt_execute(stmt_id, [step[2]]),
                       "long_data": lambda: p.com_stmt_execute(stmt_id, [b""]),
                       "reset": lambda: p.com_stmt_reset(stmt_id),
                       "query": lambda: p.com_query(step[1])}[kind]()
            tracker, packets = session.command(payload)
            if tracker.error is not None:
                # Statement ids are the proxy's own (README): the error names one.
                message = re.sub(r"handler \(\d+\)", "handler (id)", tracker.error.message)
                seen.append((step, "error", tracker.error.code, message))
                continue
            if kind == "prepare":
                ok = tracker.prepare_ok
                ids[name] = ok.statement_id
                seen.append((step, ok.num_params, ok.num_columns))
                continue
            seen.append((step, [bytes(packet) for packet in packets]))
    finally:
        session.close()
    return seen


def test_commands_without_an_answer_get_none_even_malformed(make_proxy, mariadb):
    """COM_STMT_CLOSE too short to name a statement, and SEND_LONG_DATA for a statement
    the session never prepared, get no answer, as from the server: the next command reads
    its own answer (directly and through the proxy alike)."""
    px = make_proxy(budget=1)

    def session_after(port):
        s = log_in(port, APP, APP_PW, APP_DB)
        try:
            s.sock.sendall(p.packet(0, bytes([p.COM_STMT_CLOSE, 1, 0])))
            s.sock.sendall(p.packet(0, p.com_stmt_send_long_data(999, 0, b"x")))
            return s.scalar("SELECT 41 + 1")
        finally:
            s.close()
    assert session_after(px.port) == session_after(mariadb.port) == b"42"


@pytest.mark.parametrize("budget", [1, 2])
def test_randomized_prepared_traffic_matches_direct(make_proxy, mariadb, budget):
    """Several clients at once over one or two server connections, binary statements of
    shared texts among them, each compared with the same commands on a direct session."""
    px = make_proxy(budget=budget)
    for round_ in range(4):
        seeds = list(range(round_ * 6, round_ * 6 + 6))
        direct = {seed: run_steps(mariadb.port, random_steps(seed)) for seed in seeds}
        proxied = concurrently(lambda seed: run_steps(px.port, random_steps(seed)), seeds)
        for seed in seeds:
            assert proxied[seed] == direct[seed], f"seed {seed}"
    assert px.stats()["pinned_sessions"] == 0
