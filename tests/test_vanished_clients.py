"""Clients that vanish at the worst moment, cancels that must land where they were aimed,
and startup parameters crafted to smuggle SQL: each compared with what PostgreSQL itself
does for the same client, and none may leave anything behind for the next client."""
from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from harness import APP_DB, APP_PASSWORD, APP_USER
from differential import Differential, admin_stats, flush, next_result
from psycopg import pq
from utils import free_port, run, wait_until


@pytest.fixture
def proxied(proxy_process_factory, pg):
    """make(**target_group) -> Differential over a proxy subprocess with an admin listener
    (libpq's blocking calls would hold the GIL against a proxy in this process)."""
    def make(**target_group):
        admin = f"127.0.0.1:{free_port()}"
        process = proxy_process_factory(top={"admin": {"listen": admin}}, **target_group)
        process.admin_address = admin
        return Differential(pg, process)

    return make


def pool_of(diff) -> dict:
    return admin_stats(diff.proxied.admin_address)["pool"]


def table_for(diff, side, name):
    """A fresh table per side (both sides share the cluster's database)."""
    table = f"{name}_{side.name}"
    with side.connect() as conn:
        conn.execute(f"drop table if exists {table}")
        conn.execute(f"create table {table} (x int)")
    return table


def rows_in(diff, table) -> int:
    with diff.direct.connect() as conn:
        return conn.execute(f"select count(*) from {table}").fetchone()[0]


def run_others(side, n=5):
    for _ in range(n):
        with side.connect() as conn:
            conn.execute("select 1")


def test_unsynced_pipeline_of_a_vanished_client_is_never_committed(proxied):
    """A pipelined INSERT, flushed but never synced, then the client is gone: PostgreSQL
    rolls it back; nobody else's statement may commit it."""
    diff = proxied(max_connections_percent=2)   # a budget of one: the next client gets it

    def scenario(side):
        table = table_for(diff, side, "vanished_insert")
        conn = pq.PGconn.connect(side.dsn().encode())
        conn.enter_pipeline_mode()
        conn.send_query_params(f"insert into {table} values (1)".encode(), None)
        conn.send_flush_request()
        flush(conn)
        result = next_result(conn)
        status = pq.ExecStatus(result.status).name
        conn.finish()
        run_others(side)
        return status, wait_until_rows_settle(diff, table)

    assert diff.assert_same(scenario) == ("COMMAND_OK", 0)
    wait_until(lambda: pool_of(diff)["borrowed"] == 0, timeout=10)


def wait_until_rows_settle(diff, table) -> int:
    # The server notices a vanished client on its own time; give it a moment either way.
    time.sleep(0.3)
    return rows_in(diff, table)


def test_failed_pipeline_in_a_transaction_gives_its_connection_back_once(proxied):
    """BEGIN, then a pipelined statement that fails, read, and the client is gone: the
    transaction is rolled back and the connection's budget slot comes back exactly once."""
    diff = proxied(max_connections_percent=2)
    for _ in range(3):
        conn = pq.PGconn.connect(diff.proxy.dsn().encode())
        assert conn.exec_(b"begin").status == pq.ExecStatus.COMMAND_OK
        conn.enter_pipeline_mode()
        conn.send_query_params(b"select 1/0", None)
        conn.send_flush_request()
        flush(conn)
        assert next_result(conn).status == pq.ExecStatus.FATAL_ERROR
        conn.finish()
        wait_until(lambda: pool_of(diff)["borrowed"] == 0, timeout=10)
        run_others(diff.proxy, 2)
    pool = pool_of(diff)
    assert pool["borrowed"] == 0 and pool["open"] <= 1, pool


def test_unanswered_simple_query_of_a_vanished_client_is_rolled_back(proxied):
    """The client sends `insert; select pg_sleep` inside BEGIN and vanishes while it runs:
    nothing of it may be committed by the next client."""
    diff = proxied(max_connections_percent=2)

    def scenario(side):
        table = table_for(diff, side, "vanished_block")
        conn = pq.PGconn.connect(side.dsn().encode())
        assert conn.exec_(b"begin").status == pq.ExecStatus.COMMAND_OK
        conn.send_query(f"insert into {table} values (1); select pg_sleep(0.5)".encode())
        flush(conn)
        time.sleep(0.1)
        conn.finish()
        run_others(side)
        return wait_until_rows_settle(diff, table)

    assert diff.assert_same(scenario) == 0


def active_sleeps(diff) -> int:
    with diff.direct.connect(user="postgres", password=diff.cluster.superuser_password,
                             dbname="postgres") as conn:
        return conn.execute("select count(*) from pg_stat_activity where usename = %s "
                            "and query like 'select pg_sleep(120)%%' and state = 'active'",
                            (APP_USER,)).fetchone()[0]


def test_abandoned_queries_are_cancelled_and_keep_their_budget(proxied):
    """Clients that send a long query and hang up: the proxy cancels what they left
    running, and the database never sees more of the proxy's connections than its budget."""
    diff = proxied(max_connections_percent=4, connection_borrow_timeout=30)  # budget 2
    budget = 2
    for _ in range(8):
        conn = pq.PGconn.connect(diff.proxy.dsn().encode())
        conn.send_query(b"select pg_sleep(120)")
        flush(conn)
        time.sleep(0.05)
        conn.finish()
    # Never more of the proxy's sleeps running than its budget, and soon none at all.
    assert active_sleeps(diff) <= budget
    wait_until(lambda: active_sleeps(diff) == 0, timeout=20)
    with diff.proxy.connect() as conn:
        assert conn.execute("select 42").fetchone()[0] == 42
    wait_until(lambda: pool_of(diff)["borrowed"] == 0, timeout=10)
    assert pool_of(diff)["open"] <= pool_of(diff)["max"]


def test_cancel_lands_before_the_client_sends_its_next_statement(proxied):
    """asyncpg cancels a timed-out query and, once the cancel connection closes, sends its
    next statement: that one must never be cancelled by the late cancel."""
    diff = proxied()

    async def tries(side, n):
        con = await side.asyncpg()
        cancelled_next = 0
        try:
            for _ in range(n):
                try:
                    await con.fetchval("SELECT pg_sleep(0.002)", timeout=0.002)
                except asyncio.TimeoutError:
                    pass
                try:
                    await con.fetchval("SELECT pg_sleep(0.02)")
                except asyncpg.QueryCanceledError:
                    cancelled_next += 1
        finally:
            await con.close()
        return cancelled_next

    assert diff.assert_same(lambda side: run(tries(side, 60), timeout=120)) == 0


def startup_outcome(side, settings):
    """What a client sending these startup parameters sees: the login's error, or the
    role and search_path it ends up with and whether it has temp tables."""
    async def who(con):
        return ("ok", await con.fetchval("select current_user"),
                await con.fetchval("select count(*) from pg_class where relpersistence = 't'"))
    return side.asyncpg_session(who, **settings)


CRAFTED_NAMES = [
    "application_name = 'x'; set role postgres; create temp table smuggled(); set x.y",
    "x.y = '1'; set session authorization postgres; --",
    'x."y" = 1; reset all; select 1; set x.y',
    "search_path",  # a real one, to show ordinary names still work
]


@pytest.mark.parametrize("name", CRAFTED_NAMES)
def test_startup_parameter_names_are_never_pasted_into_sql(proxied, name):
    diff = proxied(max_connections_percent=2)
    seen = diff.assert_same(lambda side: startup_outcome(side, {name: "public"}))
    if name == "search_path":
        assert seen == ("ok", APP_USER, 0)
    else:
        assert seen[0] == "error"
    # Whatever the first client sent, the next one on the same connection is itself.
    assert startup_outcome(diff.proxy, {}) == ("ok", APP_USER, 0)


@pytest.mark.parametrize("value", [
    "x\\'; set role postgres; select '",
    "\\",
    "'; set role postgres; --",
])
def test_startup_parameter_values_are_quoted_whatever_the_string_syntax(proxied, value):
    """A value with backslashes, sent with standard_conforming_strings off, must arrive
    as the value and nothing else."""
    diff = proxied(max_connections_percent=2)

    def scenario(side):
        async def go():
            con = await asyncpg.connect(
                host=side.host, port=side.port, user=APP_USER, password=APP_PASSWORD,
                database=APP_DB, ssl=False,
                server_settings={"standard_conforming_strings": "off", "application_name": value})
            try:
                return (await con.fetchval("select current_user"),
                        await con.fetchval("select current_setting('application_name')"))
            finally:
                await con.close()
        return run(go())

    diff.assert_same(scenario)
    assert startup_outcome(diff.proxy, {}) == ("ok", APP_USER, 0)


def test_client_vanishing_in_copy_from_stdin_commits_nothing(proxied):
    diff = proxied(max_connections_percent=2)

    def scenario(side):
        table = table_for(diff, side, "vanished_copy")
        conn = pq.PGconn.connect(side.dsn().encode())
        assert conn.exec_(f"copy {table} from stdin".encode()).status == pq.ExecStatus.COPY_IN
        conn.put_copy_data(b"".join(b"%d\n" % i for i in range(1000)))
        flush(conn)
        conn.finish()
        run_others(side)
        return wait_until_rows_settle(diff, table)

    assert diff.assert_same(scenario) == 0
    wait_until(lambda: pool_of(diff)["borrowed"] == 0, timeout=10)


def test_client_vanishing_mid_message_or_mid_result_leaves_nothing(proxied):
    """Half a message sent, or a large result half read: the pool is whole afterwards and
    the database holds none of the proxy's work."""
    import socket
    diff = proxied(max_connections_percent=2)
    # Half a Query message, on a session that has a connection (BEGIN borrowed it).
    conn = pq.PGconn.connect(diff.proxy.dsn().encode())
    assert conn.exec_(b"begin").status == pq.ExecStatus.COMMAND_OK
    sock = socket.socket(fileno=conn.socket)
    sock.sendall(b"Q\x00\x00\x01\x00select")
    sock.detach()
    conn.finish()
    # A large result, the client gone after its first bytes (in a transaction or not).
    for opening in (None, b"begin"):
        conn = pq.PGconn.connect(diff.proxy.dsn().encode())
        if opening:
            assert conn.exec_(opening).status == pq.ExecStatus.COMMAND_OK
        conn.send_query(b"select repeat('x', 1000) from generate_series(1, 200000)")
        flush(conn)
        time.sleep(0.2)
        conn.finish()
    wait_until(lambda: pool_of(diff)["borrowed"] == 0, timeout=20)
    with diff.proxy.connect() as client:
        assert client.execute("select 1").fetchone() == (1,)
    with diff.direct.connect(user="postgres", password=diff.cluster.superuser_password,
                             dbname="postgres") as admin:
        wait_until(lambda: admin.execute(
            "select count(*) from pg_stat_activity where usename = %s and state <> 'idle'",
            (APP_USER,)).fetchone()[0] == 0, timeout=20)


def test_pinned_session_vanishing_mid_query_is_cancelled(proxied):
    diff = proxied(max_connections_percent=4)
    conn = pq.PGconn.connect(diff.proxy.dsn().encode())
    assert conn.exec_(b"create temp table pin_me (x int)").status == pq.ExecStatus.COMMAND_OK
    conn.send_query(b"select pg_sleep(120)")
    flush(conn)
    time.sleep(0.2)
    assert active_sleeps(diff) == 1
    conn.finish()
    wait_until(lambda: active_sleeps(diff) == 0, timeout=20)
    wait_until(lambda: pool_of(diff)["borrowed"] == 0, timeout=10)
    assert admin_stats(diff.proxied.admin_address)["pinned_sessions"] == 0


CHAOS_ACTIONS = ["plain", "sync_then_vanish", "unsynced", "mid_message", "in_transaction",
                 "running", "pinned_running", "copy_in", "cancel_then_vanish"]


def chaos_client(side, action: str, table: str) -> None:
    """One client doing `action` and then vanishing (no clean goodbye where it matters)."""
    import socket
    conn = pq.PGconn.connect(side.dsn(application_name=f"chaos_{action}").encode())
    if conn.status != pq.ConnStatus.OK:
        raise AssertionError(conn.error_message)
    if action == "plain":
        conn.exec_(f"insert into {table} values (1)".encode())
    elif action == "sync_then_vanish":
        conn.send_query(f"insert into {table} values (2)".encode())
        flush(conn)
    elif action == "unsynced":
        conn.enter_pipeline_mode()
        conn.send_query_params(f"insert into {table} values (3)".encode(), None)
        conn.send_flush_request()
        flush(conn)
    elif action == "mid_message":
        conn.exec_(b"begin")
        sock = socket.socket(fileno=conn.socket)
        sock.sendall(b"Q\x00\x00\x00\x40insert")
        sock.detach()
    elif action == "in_transaction":
        conn.exec_(b"begin")
        conn.exec_(f"insert into {table} values (5)".encode())
    elif action == "running":
        conn.send_query(b"select pg_sleep(120)")
        flush(conn)
    elif action == "pinned_running":
        conn.exec_(b"create temp table chaos_pin (x int)")
        conn.send_query(b"select pg_sleep(120)")
        flush(conn)
    elif action == "copy_in":
        conn.exec_(f"copy {table} from stdin".encode())
        conn.put_copy_data(b"8\n")
        flush(conn)
    elif action == "cancel_then_vanish":
        conn.send_query(b"select pg_sleep(120)")
        flush(conn)
        conn.get_cancel().cancel()
    conn.finish()


def test_chaos_of_vanishing_clients_leaves_the_pool_whole(proxied):
    """Many clients, each vanishing at a bad moment: afterwards nothing runs on the
    database, no unsynced or uncommitted work was committed, and the pool is whole."""
    import random
    import threading
    diff = proxied(max_connections_percent=5, connection_borrow_timeout=30)  # budget 3
    table = table_for(diff, diff.proxy, "chaos")
    rng = random.Random(20261206)
    actions = [rng.choice(CHAOS_ACTIONS) for _ in range(60)]
    errors = []

    def worker(batch):
        for action in batch:
            try:
                chaos_client(diff.proxy, action, table)
            except Exception as exc:  # noqa: BLE001 - gathered and reported below
                errors.append((action, repr(exc)))

    threads = [threading.Thread(target=worker, args=(actions[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    wait_until(lambda: pool_of(diff)["borrowed"] == 0, timeout=30)
    with diff.direct.connect(user="postgres", password=diff.cluster.superuser_password,
                             dbname="postgres") as admin:
        wait_until(lambda: admin.execute(
            "select count(*) from pg_stat_activity where usename = %s and state <> 'idle'",
            (APP_USER,)).fetchone()[0] == 0, timeout=30)
    # Only what was committed by its own client is there: plain inserts (1) and the
    # ones whose Query reached the server before the client left (2), never 3, 5 or 8.
    with diff.direct.connect() as conn:
        kept = {row[0] for row in conn.execute(f"select distinct x from {table}")}
    assert kept <= {1, 2}, kept
    with diff.proxy.connect() as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    stats = admin_stats(diff.proxied.admin_address)
    assert stats["pinned_sessions"] == 0 and stats["pool"]["open"] <= stats["pool"]["max"]
