"""Named prepared statements shared across a pool without pinning.

Drivers with their defaults (psycopg 3 prepares after 5 executions, asyncpg prepares
everything, pgbench -M prepared) over a pool far smaller than the number of clients: no pin
for statements, every answer right. Then the protocol's corners, each compared with what a
direct connection answers: pipelines whose errors must land where the client expects them,
unknown and duplicate names, DEALLOCATE / DISCARD ALL affecting only the client that sent
them, a connection's statement cache smaller than a client's working set.
"""
from __future__ import annotations

import random
import threading
import re

import asyncpg
import psycopg
import pytest
from psycopg import pq

from harness import APP_DB, APP_PASSWORD, APP_USER
from differential import flush, next_result, proxied_differential
from utils import concurrently, md5_session, message_fields, recv_message, run, run_cmd

PGENV = {"PGPASSWORD": APP_PASSWORD, "PGCONNECT_TIMEOUT": "10"}
POOL_OF_TWO = {"max_connections_percent": 4}   # of the session cluster's 60


def backends(proxy) -> int:
    return proxy.stats()["pool"]["open"]


@pytest.mark.parametrize("script", ["tpcb", "select"])
def test_pgbench_prepared_many_clients_two_connections(proxy_factory, pgbench_db, script):
    proxy = proxy_factory(**POOL_OF_TWO)
    # A thread per client: pgbench prepares with a blocking PQprepare, which would stall
    # the other clients of its thread, one of them perhaps holding a connection mid-transaction.
    argv = ["pgbench", "-n", "-M", "prepared", "-c", "8", "-j", "8", "-T", "3",
            "-h", proxy.host, "-p", str(proxy.port), "-U", APP_USER, pgbench_db]
    if script == "select":
        argv.insert(2, "-S")
    out = run_cmd(argv, env=PGENV, timeout=90).stdout
    failed = re.search(r"number of failed transactions: (\d+)", out)
    processed = re.search(r"number of transactions actually processed: (\d+)", out)
    assert failed is not None and int(failed.group(1)) == 0, out
    assert processed is not None and int(processed.group(1)) > 100, out
    stats = proxy.stats()
    assert stats["pool"]["open"] <= 2
    assert stats["SessionPinReasons"] == {}, stats["SessionPinReasons"]
    assert stats["StatementClients"] == 8
    # Each connection prepared each statement once (and again only if it was closed).
    assert stats["StatementsPrepared"] <= 2 * 7 + 2, stats["StatementsPrepared"]


def test_psycopg_default_clients_share_a_pool(proxy_factory):
    proxy = proxy_factory(**POOL_OF_TWO)

    def client(n):
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:   # prepare_threshold=5
            seen = [conn.execute("select %s::int * 2, %s::text", (i, f"c{n}")).fetchone()
                    for i in range(12)]
            with conn.transaction():
                seen += [conn.execute("select %s::int * 2, %s::text", (i, f"c{n}")).fetchone()
                         for i in range(12, 16)]
            seen.append(conn.execute("select count(*) from pg_class where relname = %s",
                                     ("nothing",)).fetchone())
            return seen

    results = concurrently(client, range(12))
    for n in range(12):
        assert results[n] == [(i * 2, f"c{n}") for i in range(16)] + [(0,)]
    stats = proxy.stats()
    assert stats["SessionPinReasons"] == {}
    assert stats["StatementClients"] == 12
    assert stats["pool"]["open"] <= 2


def test_asyncpg_default_clients_share_a_pool(proxy_factory):
    proxy = proxy_factory(**POOL_OF_TWO)

    async def client(n):
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user=APP_USER,
                                     password=APP_PASSWORD, database=APP_DB, ssl=False)
        try:
            values = [await conn.fetchval("select $1::int + $2::int", i, n) for i in range(6)]
            async with conn.transaction():
                values.append(await conn.fetchval("select $1::int + $2::int", 100, n))
                values += [r[0] for r in await conn.fetch("select generate_series(1, $1::int)", 3)]
            return values
        finally:
            await conn.close()

    async def main():
        import asyncio
        return await asyncio.gather(*(client(n) for n in range(20)))

    for n, values in enumerate(run(main())):
        assert values == [i + n for i in range(6)] + [100 + n, 1, 2, 3]
    stats = proxy.stats()
    assert stats["SessionPinReasons"] == {}
    assert stats["StatementClients"] == 20


def test_statements_survive_a_small_cache(proxy_factory):
    """A client's working set larger than what a connection keeps: the least recently used
    are closed and prepared again when needed; the server never holds more than the cap."""
    proxy = proxy_factory(max_prepared_statements=3, **POOL_OF_TWO)
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
        for round_ in range(3):
            for k in range(8):
                assert conn.execute(f"select %s::int + {k}", (round_,)).fetchone() == (round_ + k,)
        held = conn.execute("select count(*) from pg_prepared_statements").fetchone()[0]
        assert 1 <= held <= 3
    assert proxy.stats()["SessionPinReasons"] == {}


# --- the protocol's corners, directly and through the proxy ------------------------------

def pgconn(side) -> pq.PGconn:
    conn = pq.PGconn.connect(side.dsn().encode())
    assert conn.status == pq.ConnStatus.OK, conn.error_message
    conn.nonblocking = 1
    return conn


def results_of(conn: pq.PGconn, count: int) -> list:
    """What `count` pipeline results look like to the client: status, SQLSTATE, message, rows."""
    seen = []
    while len(seen) < count:
        res = next_result(conn)
        if res is None:
            continue
        status = pq.ExecStatus(res.status).name
        if status == "PIPELINE_SYNC":
            seen.append(("sync", pq.TransactionStatus(conn.transaction_status).name))
            continue
        error = res.error_field(pq.DiagnosticField.SQLSTATE)
        message = res.error_field(pq.DiagnosticField.MESSAGE_PRIMARY)
        rows = [tuple(res.get_value(r, c) for c in range(res.nfields)) for r in range(res.ntuples)]
        seen.append((status, error, message, rows))
    return seen


def prepared_in_pipeline(side, name, sql) -> pq.PGconn:
    """A connection in pipeline mode that has prepared `name` (and read the answers)."""
    conn = pgconn(side)
    conn.enter_pipeline_mode()
    conn.send_prepare(name, sql)
    conn.pipeline_sync()
    flush(conn)
    results_of(conn, 2)
    return conn


def pipeline(side, steps) -> list:
    """Run `steps` (functions of a PGconn that send, each returning how many results it
    adds) in one pipeline on a fresh connection, and the results as the client saw them."""
    conn = pgconn(side)
    try:
        conn.enter_pipeline_mode()
        expected = sum(step(conn) for step in steps)
        flush(conn)
        return results_of(conn, expected)
    finally:
        conn.finish()


def prepare(name, sql, types=()):
    def step(conn):
        conn.send_prepare(name, sql, list(types) or None)
        return 1
    return step


def execute(name, *params):
    def step(conn):
        conn.send_query_prepared(name, list(params) or None)
        return 1
    return step


def describe(name):
    def step(conn):
        conn.send_describe_prepared(name)
        return 1
    return step


def close(name):
    def step(conn):
        conn.send_close_prepared(name)
        return 1
    return step


def query(sql):
    def step(conn):
        conn.send_query_params(sql, None)
        return 1
    return step


def sync(conn):
    conn.pipeline_sync()
    return 1


PIPELINES = {
    "prepare_execute": [prepare(b"s1", b"select $1::int * 7"), execute(b"s1", b"6"), sync],
    "error_skips_to_sync": [
        prepare(b"s1", b"select $1::int"), execute(b"s1", b"1"),
        prepare(b"bad", b"selec oops"), execute(b"bad"), prepare(b"s2", b"select 2"),
        execute(b"s1", b"3"), sync,
        execute(b"s1", b"4"), execute(b"s2"), sync],
    "unknown_name": [execute(b"nope"), execute(b"nope2"), sync, query(b"select 5"), sync],
    "duplicate_name": [prepare(b"d", b"select 1"), sync, prepare(b"d", b"select 2"), sync,
                       execute(b"d"), sync],
    "duplicate_in_transaction": [
        query(b"begin"), prepare(b"d", b"select 1"), prepare(b"d", b"select 1"), sync,
        query(b"select 1"), sync, query(b"rollback"), sync],
    "close_then_use": [prepare(b"c", b"select 3"), execute(b"c"), close(b"c"), close(b"never"),
                       sync, execute(b"c"), sync, prepare(b"c", b"select 4"), execute(b"c"), sync],
    "describe": [prepare(b"x", b"select $1::int as a, 'b'::text as b"), describe(b"x"),
                 describe(b"missing"), sync, describe(b"x"), sync],
    "parse_fails_later_bind": [prepare(b"t", b"select * from no_such_table"), sync,
                               execute(b"t"), sync],
    "deallocate_sql": [prepare(b"dq", b"select 9"), sync, query(b"deallocate dq"), sync,
                       execute(b"dq"), sync, query(b"deallocate dq"), sync],
    "deallocate_all_and_discard": [
        prepare(b"a1", b"select 1"), prepare(b"a2", b"select 2"), sync,
        query(b"DEALLOCATE ALL"), sync, execute(b"a1"), sync,
        prepare(b"a1", b"select 11"), execute(b"a1"), sync,
        query(b"discard all"), sync, execute(b"a1"), sync],
    # DISCARD ALL refused where it runs (in a pipeline, in a transaction block): nothing
    # of the client's goes.
    "discard_all_refused": [
        prepare(b"k1", b"select $1::int * 2"), execute(b"k1", b"1"),
        prepare(b"k2", b"select 'x' || $1::text"), query(b"discard all"), sync,
        query(b"deallocate k2"), sync, execute(b"k1", b"2"), sync,
        query(b"begin"), sync, query(b"discard all"), sync, query(b"rollback"), sync,
        query(b"deallocate all"), execute(b"k1", b"3"), sync, execute(b"k1", b"4"), sync],
    # Two names, one text (one statement on the connection): deallocating both by SQL
    # leaves the session's SQL PREPAREd statements alone, in and out of a transaction.
    "deallocate_names_of_one_text": [
        prepare(b"n1", b"select 1"), prepare(b"n2", b"select 1"), query(b"deallocate n1"),
        query(b"prepare q0 as select 2"), query(b"deallocate n2"),
        query(b"prepare q0 as select 3"), sync, query(b"execute q0"), sync,
        prepare(b"n3", b"select 1"), prepare(b"n4", b"select 1"), query(b"begin"),
        query(b"deallocate n3"), query(b"deallocate n4"), query(b"execute q0"), sync,
        query(b"select 1/0"), sync, query(b"deallocate n3"), sync, query(b"rollback"), sync,
        query(b"deallocate n3"), sync, execute(b"n3"), query(b"execute q0"), sync],
}


@pytest.fixture(scope="module")
def differential(tmp_path_factory, pg):
    with proxied_differential(tmp_path_factory.mktemp("prepared"), pg, max_connections_percent=4,
                              max_prepared_statements=4) as diff:
        yield diff


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_pipeline_matches_a_direct_connection(differential, name):
    differential.assert_same(lambda side: pipeline(side, PIPELINES[name]))


def test_warm_connection_matches_a_direct_connection(differential):
    """The same pipelines again while another client keeps the pool's connections full of
    statements: what one client prepared is not another's."""
    for k, sql in enumerate([b"select 1", b"select 9", b"select 3", b"select $1::int * 7"]):
        prepared_in_pipeline(differential.proxy, b"w%d" % k, sql).finish()
    for name in sorted(PIPELINES):
        differential.assert_same(lambda side: pipeline(side, PIPELINES[name]))


def test_randomized_statement_traffic_matches_direct(differential):
    """Random interleavings of prepare / execute / close / deallocate (ALL too) / DISCARD
    ALL / transactions, SQL PREPARE / EXECUTE / DEALLOCATE and SET by several clients at
    once over the pool of two, each compared with the same sequence on a direct
    connection of its own."""
    names = [b"r0", b"r1", b"r2", b"r3", b"r4"]
    texts = [b"select $1::int + 1", b"select $1::int * 2", b"select 'x' || $1::text",
             b"select $1::int / 0", b"select length($1::text)"]
    # SQL's statements share one namespace with the protocol's: kept apart, as the
    # README says they must be through the proxy.
    sql_names = [b"q0", b"q1", b"q2"]
    sql_texts = [b"(int) as select $1 + 100", b" as select current_setting('work_mem')",
                 b"(text) as select upper($1)"]

    def random_steps(seed):
        rnd = random.Random(seed)
        steps = []
        for _ in range(40):
            pick = rnd.random()
            name = rnd.choice(names)
            if pick < 0.3:
                steps.append(prepare(name, rnd.choice(texts)))
            elif pick < 0.7:
                steps.append(execute(name, str(rnd.randint(0, 9)).encode()))
            elif pick < 0.78:
                steps.append(close(name))
            elif pick < 0.82:
                steps.append(query(b"deallocate " + name))
            elif pick < 0.86:
                steps.append(query(b"begin"))
            elif pick < 0.9:
                steps.append(query(rnd.choice([b"commit", b"rollback"])))
            elif pick < 0.92:
                steps.append(describe(name))
            elif pick < 0.94:
                steps.append(query(b"prepare " + rnd.choice(sql_names) + rnd.choice(sql_texts)))
            elif pick < 0.96:
                steps.append(query(b"execute " + rnd.choice(sql_names)
                                   + rnd.choice([b"", b"(7)", b"('abc')"])))
            elif pick < 0.97:
                steps.append(query(b"deallocate " + rnd.choice(sql_names)))
            elif pick < 0.98:
                steps.append(query(b"set work_mem = '%dMB'" % rnd.randint(1, 9)))
            elif pick < 0.985:
                steps.append(query(rnd.choice([b"deallocate all", b"discard all"])))
            elif pick < 0.99:
                steps.append(query(b'deallocate "' + name + b'"'))
            else:
                steps.append(query(b"show work_mem"))
            if rnd.random() < 0.4:
                steps.append(sync)
        steps.append(sync)
        return steps

    for round_ in range(6):   # eight clients at a time over the two connections
        seeds = list(range(round_ * 8, round_ * 8 + 8))
        direct = {seed: pipeline(differential.direct, random_steps(seed)) for seed in seeds}
        proxied = concurrently(lambda seed: pipeline(differential.proxy, random_steps(seed)), seeds)
        for seed in seeds:
            assert proxied[seed] == direct[seed], f"seed {seed}: {random_steps(seed)}"


def test_simple_query_deallocate_keeps_sql_statements(differential):
    """The same over the simple query protocol."""
    def scenario(side):
        conn = pgconn(side)
        conn.nonblocking = 0
        try:
            seen = []

            def run(sql):
                res = conn.exec_(sql)
                seen.append((pq.ExecStatus(res.status).name,
                             res.error_field(pq.DiagnosticField.SQLSTATE),
                             res.error_field(pq.DiagnosticField.MESSAGE_PRIMARY),
                             pq.TransactionStatus(conn.transaction_status).name))

            for name in (b"n1", b"n2", b"n3"):
                assert conn.prepare(name, b"select 1").status == pq.ExecStatus.COMMAND_OK
            for sql in (b"deallocate n1", b"prepare q0 as select 2", b"deallocate n2",
                        b"execute q0", b"begin", b"select 1/0", b"deallocate n3",
                        b"rollback", b"deallocate n3", b"deallocate n3", b"execute q0"):
                run(sql)
            held = conn.exec_(b"select count(*) from pg_prepared_statements where from_sql")
            return seen, held.get_value(0, 0)
        finally:
            conn.finish()
    differential.assert_same(scenario)


def test_another_clients_statement_is_unknown_by_its_name(differential):
    """A name another client prepared is unknown to this one, whatever its connection holds."""
    def scenario(side):
        first = prepared_in_pipeline(side, b"mine", b"select 'secret'::text")
        try:
            return pipeline(side, [execute(b"mine"), sync, describe(b"mine"), sync])
        finally:
            first.finish()
    differential.assert_same(scenario)


@pytest.mark.parametrize("step", ["bind", "describe", "close", "parse"])
def test_the_proxys_statement_names_are_out_of_reach(differential, step):
    """A client that sends names as they are (pinned before it named any) cannot reach the
    statements the proxy prepared for others on its connection: such names are refused."""
    proxy = differential.proxy
    warm = prepared_in_pipeline(proxy, b"w", b"select 'secret'::text")
    victim = pgconn(proxy)
    try:
        victim.enter_pipeline_mode()
        victim.send_query_params(b"select pg_advisory_lock(1)", None)   # pinned first
        victim.pipeline_sync()
        flush(victim)
        results_of(victim, 2)
        send = {"bind": lambda: victim.send_query_prepared(b"rdsproxy_1", None),
                "describe": lambda: victim.send_describe_prepared(b"rdsproxy_1"),
                "close": lambda: victim.send_close_prepared(b"rdsproxy_1"),
                "parse": lambda: victim.send_prepare(b"rdsproxy_1", b"select 1")}[step]
        send()
        victim.pipeline_sync()
        flush(victim)
        with pytest.raises(Exception):
            seen = results_of(victim, 2)
            assert all(result[:2] != ("TUPLES_OK", None) for result in seen), seen
            raise AssertionError(f"not refused: {seen}")
        assert victim.status == pq.ConnStatus.BAD or "reserved" in victim.error_message.decode()
    finally:
        warm.finish()
        victim.finish()


def _replace_all(part, olds, new):
    if isinstance(part, bytes):
        for old in olds:
            part = part.replace(old, new)
    return part


@pytest.mark.parametrize("protocol", ["simple", "extended", "pipeline"])
def test_sql_cannot_drop_the_proxys_statements(one_connection, protocol):
    """DEALLOCATE of a name the proxy gave a statement on the connection (every client can
    read them in pg_prepared_statements) is answered as a direct session answers it (no
    such statement in the client's session), and the client that prepared it goes on.
    Over the extended protocol the error's text names rdsproxy_missing (README)."""
    def scenario(side):
        owner = prepared_in_pipeline(side, b"mine", b"select 'kept'::text")
        other = pgconn(side)
        other.nonblocking = 0
        try:
            found = other.exec_(b"select name from pg_prepared_statements"
                                b" where statement = 'select ''kept''::text'")
            # Directly the other session holds none: the name is the proxy's first.
            name = found.get_value(0, 0) if found.ntuples else b"rdsproxy_1"
            seen = []
            for text in (b"deallocate " + name, b'DEALLOCATE PREPARE "' + name + b'"',
                         b"deallocate rdsproxy_missing"):
                if protocol == "simple":
                    res = other.exec_(text)
                    seen.append((pq.ExecStatus(res.status).name,
                                 res.error_field(pq.DiagnosticField.SQLSTATE),
                                 res.error_field(pq.DiagnosticField.MESSAGE_PRIMARY)))
                elif protocol == "extended":
                    res = other.exec_params(text, None)
                    seen.append((pq.ExecStatus(res.status).name,
                                 res.error_field(pq.DiagnosticField.SQLSTATE),
                                 res.error_field(pq.DiagnosticField.MESSAGE_PRIMARY)))
                else:
                    other.nonblocking = 1
                    other.enter_pipeline_mode()
                    other.send_query_params(text, None)
                    other.pipeline_sync()
                    flush(other)
                    seen += results_of(other, 2)
                    other.exit_pipeline_mode()
                    other.nonblocking = 0
            owner.send_query_prepared(b"mine", None)
            owner.pipeline_sync()
            flush(owner)
            seen += results_of(owner, 2)
            # The proxy's name is its own choice; what is said of it must be the same.
            names = (name, b"rdsproxy_missing") if protocol != "simple" else (name,)
            return [tuple(_replace_all(part, names, b"NAME") for part in result)
                    for result in seen]
        finally:
            owner.finish()
            other.finish()
    one_connection.assert_same(scenario)


def test_big_messages_stream_through_the_statement_path(proxy_factory):
    """Bind parameters and rows of megabytes, COPY in and out, while the proxy tracks the
    answers (a statement prepared in the same request) and after."""
    proxy = proxy_factory(**POOL_OF_TWO)
    big = "y" * 3_000_000
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for _ in range(3):   # prepared by name on the first run, then from the book
            length, rows = conn.execute("select length(%s::text), repeat('x', 2500000)", (big,),
                                        prepare=True).fetchone()
            assert (length, len(rows)) == (3_000_000, 2_500_000)
        conn.execute("create temp table if not exists t_copy (v text)")   # pins: own connection
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("select %s::int", (1,), prepare=True)
        with conn.transaction():
            conn.execute("create table if not exists copy_target (v text)")
            with conn.cursor().copy("copy copy_target (v) from stdin") as copy:
                for i in range(2000):
                    copy.write_row((big[:1000] + str(i),))
            out = bytearray()
            with conn.cursor().copy("copy copy_target (v) to stdout") as copy:
                for chunk in copy:
                    out += chunk
            assert out.count(b"\n") == 2000
            conn.execute("drop table copy_target")
        assert conn.execute("select %s::int", (2,), prepare=True).fetchone() == (2,)
    assert proxy.stats()["StatementClients"] == 2


def test_statements_outlive_the_connections_they_were_prepared_on(proxy_factory, pg):
    """Backends killed, idle and mid-statement: the client's statements are prepared again on
    whichever connection serves it next, and only the statement that was running fails."""
    proxy = proxy_factory(**POOL_OF_TWO)
    kill_all = ("select count(pg_terminate_backend(pid)) from pg_stat_activity "
                f"where usename = '{APP_USER}' and pid <> pg_backend_pid()")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for i in range(3):
            assert conn.execute("select %s::int + 1", (i,), prepare=True).fetchone() == (i + 1,)
        pg.psql(kill_all)   # idle in the pool now
        for i in range(3):
            assert conn.execute("select %s::int + 1", (i,), prepare=True).fetchone() == (i + 1,)
        with psycopg.connect(pg.dsn(dbname=APP_DB), autocommit=True) as admin:
            timer = threading.Timer(0.5, lambda: admin.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity "
                "where query like 'select pg_sleep%' and state = 'active'"))
            timer.start()
            try:
                with pytest.raises(psycopg.OperationalError):
                    conn.execute("select pg_sleep(%s::int)", (10,), prepare=True)
            finally:
                timer.join()
        assert conn.execute("select %s::int + 1", (5,), prepare=True).fetchone() == (6,)
        assert conn.execute("select pg_sleep(%s::int)", (0,), prepare=True).fetchone() == ("",)
    assert proxy.stats()["SessionPinReasons"] == {}


def test_driver_pipelines_with_named_statements(proxy_factory):
    """psycopg's pipeline mode and asyncpg's executemany send many statements before
    reading an answer; named statements among them."""
    proxy = proxy_factory(**POOL_OF_TWO)
    table = "t_pipe_" + str(random.randrange(10**9))
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(f"create table {table} (id int, v text)")
        with conn.pipeline():
            cursors = [conn.execute("select %s::int * 3", (i,), prepare=True) for i in range(20)]
        assert [c.fetchone()[0] for c in cursors] == [i * 3 for i in range(20)]

    async def with_asyncpg():
        con = await asyncpg.connect(host=proxy.host, port=proxy.port, user=APP_USER,
                                    password=APP_PASSWORD, database=APP_DB, ssl=False)
        try:
            await con.executemany(f"insert into {table} values ($1, $2)",
                                  [(i, f"v{i}") for i in range(500)])
            return await con.fetchval(f"select count(*) from {table}")
        finally:
            await con.close()
    assert run(with_asyncpg()) == 500
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(f"drop table {table}")
    assert proxy.stats()["SessionPinReasons"] == {}


@pytest.mark.parametrize("malformed", [b"B\x00\x00\x00\x07\x00s1", b"P\x00\x00\x00\x06s2",
                                       b"B\x00\x00\x00\x05\x00"])
def test_malformed_named_message_ends_only_its_session(proxy_factory, malformed):
    """A statement client's Bind or Parse without its NULs: that client hears the server's
    protocol error (the server ends its backend; the proxy reports it as for any backend
    the server ended); the proxy and another client carry on."""
    proxy = proxy_factory(client_auth="POSTGRES_MD5", **POOL_OF_TWO)
    sock = md5_session(proxy.host, proxy.port, APP_USER, APP_PASSWORD, APP_DB)
    try:
        parse = b"s1\x00select 1\x00\x00\x00"
        sock.sendall(b"P" + (len(parse) + 4).to_bytes(4, "big") + parse + b"S\x00\x00\x00\x04")
        assert [recv_message(sock)[0] for _ in range(2)] == [b"1", b"Z"]
        sock.sendall(malformed + b"S\x00\x00\x00\x04")
        seen = []
        try:
            while not seen or seen[-1][0] != b"Z":
                seen.append(recv_message(sock))
        except (ConnectionError, OSError):
            pass   # closed instead of answered: what was said before counts
        errors = [message_fields(payload) for mtype, payload in seen if mtype == b"E"]
        assert [e["C"] for e in errors] == ["08P01"], seen
    finally:
        sock.close()
    with psycopg.connect(proxy.dsn(), autocommit=True) as other:
        assert other.execute("select %s::int", (7,), prepare=True).fetchone() == (7,)
    assert proxy.stats()["StatementClients"] == 2


@pytest.mark.parametrize("statement,params,check", [
    ("select set_config('work_mem', %s, false)", ["5MB"], "show work_mem"),
    ("select set_config('search_path', %s, false)", ["pg_catalog"], "show search_path"),
    ("set lock_timeout = '2s'", None, "show lock_timeout"),
])
def test_state_set_by_a_named_statement_never_crosses(proxy_factory, statement, params, check):
    """A named statement is prepared in one transaction and run in later ones, where only
    its Bind is sent: each run that may change the session is checked like the first. The
    other client takes turns on the same connection."""
    proxy = proxy_factory(max_connections_percent=2)   # one connection
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as named, \
            psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None) as other:
        clean = other.execute(check).fetchone()[0]
        for _ in range(3):
            named.execute(statement, params, prepare=True)
            assert other.execute(check).fetchone()[0] == clean
        changed = named.execute(check).fetchone()[0]
        assert changed != clean
        other.execute("select 1")
        assert named.execute(check).fetchone()[0] == changed
    assert proxy.stats()["SessionPinReasons"] == {}
