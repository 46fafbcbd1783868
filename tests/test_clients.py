"""Real clients through the proxy: psql scripts, psycopg, asyncpg, pgbench.

Every test talks to a real PostgreSQL (the session cluster `pg`) through a real proxy
running in a background thread; nothing is mocked.
"""
from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid

import asyncpg
import psycopg
import pytest

from harness import APP_DB, APP_PASSWORD, APP_USER
from utils import run, run_cmd, wait_until

PGENV = {"PGPASSWORD": APP_PASSWORD, "PGCONNECT_TIMEOUT": "10"}


def table_name() -> str:
    return "t_" + uuid.uuid4().hex[:12]


def psql_dsn(proxy) -> str:
    """A keyword connection string for psql, password from PGPASSWORD."""
    return proxy.dsn(password=None)


def psql(proxy, *args, stop_on_error=True, check=True, input=None):
    argv = ["psql", psql_dsn(proxy), "-X", "-A", "-t", "-q",
            "-v", f"ON_ERROR_STOP={1 if stop_on_error else 0}", *args]
    return run_cmd(argv, env=PGENV, check=check, input=input, timeout=60)


def direct(pg, **kw):
    """A direct (not proxied) psycopg connection to appdb as app."""
    return psycopg.connect(pg.dsn(user=APP_USER, password=APP_PASSWORD, dbname=APP_DB),
                           connect_timeout=10, autocommit=True, **kw)


def direct_rows(pg, sql, params=None):
    with direct(pg) as conn:
        return conn.execute(sql, params).fetchall()


def asyncpg_kwargs(proxy, **extra):
    kw = dict(host=proxy.host, port=proxy.port, user=APP_USER, password=APP_PASSWORD,
              database=APP_DB, ssl=False, timeout=10, command_timeout=30)
    kw.update(extra)
    return kw


# --- psql -------------------------------------------------------------------------------

def test_psql_commit_and_rollback_visibility(proxy, pg, tmp_path):
    t = table_name()
    script = tmp_path / "tx.sql"
    script.write_text(f"""
CREATE TABLE {t} (id int PRIMARY KEY, v text);
BEGIN;
INSERT INTO {t} VALUES (1, 'committed');
INSERT INTO {t} VALUES (2, 'committed too');
COMMIT;
BEGIN;
INSERT INTO {t} VALUES (3, 'rolled back');
SELECT count(*) FROM {t};
ROLLBACK;
SELECT 'after:' || count(*) FROM {t};
""")
    out = psql(proxy, "-f", str(script)).stdout.split()
    assert out == ["3", "after:2"]
    # Visible from an unrelated, direct connection: committed rows only.
    assert direct_rows(pg, f"SELECT id, v FROM {t} ORDER BY id") == [
        (1, "committed"), (2, "committed too")]
    # ... and from another proxied session.
    assert psql(proxy, "-c", f"SELECT string_agg(id::text, ',' ORDER BY id) FROM {t}").stdout.strip() == "1,2"


def test_psql_error_inside_transaction(proxy_factory, pg, tmp_path):
    # A budget of one server connection: every client below shares the same one, so a
    # connection left in an aborted transaction would break the next client.
    proxy = proxy_factory(max_connections_percent=2)
    t = table_name()
    psql(proxy, "-c", f"CREATE TABLE {t} (id int)")
    script = tmp_path / "err.sql"
    script.write_text(f"""
BEGIN;
INSERT INTO {t} VALUES (1);
SELECT 1/0;
INSERT INTO {t} VALUES (2);
ROLLBACK;
SELECT 'alive';
INSERT INTO {t} VALUES (3);
SELECT 'count:' || count(*) FROM {t};
""")
    res = psql(proxy, "-f", str(script), stop_on_error=False)
    assert "division by zero" in res.stderr
    assert "current transaction is aborted" in res.stderr
    assert res.stdout.split() == ["alive", "count:1"]
    assert proxy.stats()["pool"]["max"] == 1

    # A client that leaves in the middle of an aborted transaction (no ROLLBACK).
    script2 = tmp_path / "err2.sql"
    script2.write_text(f"BEGIN;\nINSERT INTO {t} VALUES (4);\nSELECT 1/0;\n")
    res = psql(proxy, "-f", str(script2), stop_on_error=False)
    assert "division by zero" in res.stderr

    # The next client gets a clean connection (not in an aborted transaction).
    res = psql(proxy, "-c", f"SELECT 'next:' || count(*) FROM {t}")
    assert res.stdout.strip() == "next:1"
    res = psql(proxy, "-c", "SELECT current_setting('transaction_isolation'), pg_current_xact_id_if_assigned() IS NULL")
    assert res.stdout.strip() == "read committed|t"
    assert direct_rows(pg, f"SELECT id FROM {t} ORDER BY id") == [(3,)]


def test_psql_copy_both_ways(proxy, pg, tmp_path):
    t = table_name()
    src = tmp_path / "in.tsv"
    lines = [f"{i}\trow number {i}\t{i}.5" for i in range(10_000)]
    src.write_text("\n".join(lines) + "\n")
    psql(proxy, "-c", f"CREATE TABLE {t} (id int, label text, x float8)")
    res = psql(proxy, "-c", f"\\copy {t} FROM '{src}'")
    assert res.returncode == 0
    assert direct_rows(pg, f"SELECT count(*), sum(id) FROM {t}") == [(10_000, sum(range(10_000)))]
    dst = tmp_path / "out.tsv"
    psql(proxy, "-c", f"\\copy (SELECT * FROM {t} ORDER BY id) TO '{dst}'")
    assert dst.read_text() == src.read_text()
    # The session that did the COPY is usable and the pool is not stuck.
    assert psql(proxy, "-c", "SELECT 42").stdout.strip() == "42"
    wait_until(lambda: proxy.stats()["pool"]["borrowed"] == 0, timeout=5, message="nothing borrowed")


# --- psycopg ----------------------------------------------------------------------------

def test_psycopg_simple_and_extended(proxy, pg):
    t = table_name()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        # Literal SQL without parameters: simple query protocol.
        conn.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v text, ts timestamptz DEFAULT now())")
        conn.execute(f"INSERT INTO {t} (id, v) VALUES (1, 'one'), (2, 'two')")
        assert conn.execute(f"SELECT count(*) FROM {t}").fetchone() == (2,)
        # Parameters: extended protocol.
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO {t} (id, v) VALUES (%s, %s)", (3, "three"))
            cur.execute(f"SELECT v FROM {t} WHERE id = %s", (3,))
            assert cur.fetchone() == ("three",)
            cur.execute("SELECT %s::int + %s::int, %s::text, %s::bytea", (40, 2, "é ü", b"\x00\xff"))
            assert cur.fetchone() == (42, "é ü", b"\x00\xff")
            # executemany
            cur.executemany(f"INSERT INTO {t} (id, v) VALUES (%s, %s)",
                            [(i, f"v{i}") for i in range(10, 110)])
            cur.execute(f"SELECT count(*) FROM {t}")
            assert cur.fetchone() == (103,)
        # An error, then the session keeps working.
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(f"INSERT INTO {t} (id, v) VALUES (%s, %s)", (1, "dup"))
        assert conn.execute("SELECT %s::int", (7,)).fetchone() == (7,)
    # Transaction rolled back by psycopg's context manager on exception.
    with psycopg.connect(proxy.dsn()) as conn:
        with pytest.raises(ZeroDivisionError):
            with conn.transaction():
                conn.execute(f"INSERT INTO {t} (id, v) VALUES (%s, %s)", (500, "gone"))
                1 / 0
        with conn.transaction():
            conn.execute(f"INSERT INTO {t} (id, v) VALUES (%s, %s)", (501, "kept"))
    assert direct_rows(pg, f"SELECT id FROM {t} WHERE id >= 500") == [(501,)]


def test_psycopg_copy(proxy, pg):
    t = table_name()
    rows = [(i, f"name {i}", i % 7 == 0) for i in range(5000)]
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {t} (id int, name text, flag bool)")
        with conn.cursor() as cur:
            with cur.copy(f"COPY {t} (id, name, flag) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            assert direct_rows(pg, f"SELECT count(*) FROM {t}") == [(5000,)]
            got = []
            with cur.copy(f"COPY (SELECT id, name, flag FROM {t} ORDER BY id) TO STDOUT") as copy:
                copy.set_types(["int4", "text", "bool"])
                for row in copy.rows():
                    got.append(row)
            assert got == rows
            # Raw block copy out, too.
            data = bytearray()
            with cur.copy(f"COPY (SELECT id FROM {t} WHERE id < 3 ORDER BY id) TO STDOUT") as copy:
                for block in copy:
                    data += block
            assert bytes(data) == b"0\n1\n2\n"
        # A COPY that fails on the server in the middle: error, session usable.
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            with conn.cursor() as cur:
                with cur.copy(f"COPY {t} (id, name, flag) FROM STDIN") as copy:
                    copy.write(b"1\tok\tt\nnot-a-number\tbad\tf\n")
        assert conn.execute(f"SELECT count(*) FROM {t}").fetchone() == (5000,)


def test_psycopg_pipeline_with_errors(proxy, pg):
    t = table_name()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {t} (id int PRIMARY KEY)")
        # One implicit transaction up to the Sync: the error aborts all of it.
        with pytest.raises(psycopg.errors.DivisionByZero):
            with conn.pipeline():
                conn.execute(f"INSERT INTO {t} VALUES (%s)", (1,))
                conn.execute("SELECT 1/%s::int", (0,))
                conn.execute(f"INSERT INTO {t} VALUES (%s)", (2,))
        assert conn.execute(f"SELECT count(*) FROM {t}").fetchone() == (0,)
        # With a sync point in between, what came before it is committed.
        with pytest.raises(psycopg.errors.UniqueViolation):
            with conn.pipeline() as p:
                conn.execute(f"INSERT INTO {t} VALUES (%s)", (10,))
                p.sync()
                conn.execute(f"INSERT INTO {t} VALUES (%s)", (10,))
                conn.execute(f"INSERT INTO {t} VALUES (%s)", (11,))
        assert direct_rows(pg, f"SELECT id FROM {t} ORDER BY id") == [(10,)]
        # Many statements in one pipeline, all fine.
        with conn.pipeline():
            curs = [conn.execute("SELECT %s::int * 2", (i,)) for i in range(50)]
        assert [c.fetchone()[0] for c in curs] == [i * 2 for i in range(50)]
        assert conn.execute("SELECT 'ok'").fetchone() == ("ok",)
    wait_until(lambda: proxy.stats()["pool"]["borrowed"] == 0, timeout=5,
               message="the pipeline client's connection returned to the pool")


# --- asyncpg ----------------------------------------------------------------------------

def test_asyncpg_unnamed_statements(proxy, pg):
    t = table_name()

    async def main():
        conn = await asyncpg.connect(**asyncpg_kwargs(proxy, statement_cache_size=0))
        try:
            await conn.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v text)")
            assert await conn.fetchval("SELECT $1::int + 1", 41) == 42
            await conn.execute(f"INSERT INTO {t} VALUES ($1, $2)", 1, "one")
            await conn.executemany(f"INSERT INTO {t} VALUES ($1, $2)",
                                   [(i, f"v{i}") for i in range(2, 52)])
            rows = await conn.fetch(f"SELECT id, v FROM {t} WHERE id <= $1 ORDER BY id", 3)
            assert [tuple(r) for r in rows] == [(1, "one"), (2, "v2"), (3, "v3")]
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {t} VALUES ($1, $2)", 100, "tx")
            with pytest.raises(RuntimeError):
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {t} VALUES ($1, $2)", 101, "rolled back")
                    raise RuntimeError("boom")
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.execute(f"INSERT INTO {t} VALUES ($1, $2)", 1, "dup")
            result = await conn.copy_records_to_table(
                t, records=[(1000 + i, f"c{i}") for i in range(1000)], columns=["id", "v"])
            assert result == "COPY 1000"
            return await conn.fetchval(f"SELECT count(*) FROM {t}")
        finally:
            await conn.close()

    assert run(main()) == 1 + 50 + 1 + 1000
    assert direct_rows(pg, f"SELECT v FROM {t} WHERE id IN (100, 101)") == [("tx",)]
    stats = proxy.stats()
    assert "prepared_statement" not in stats["SessionPinReasons"]
    assert stats["pinned_sessions"] == 0


def test_asyncpg_named_statements_do_not_pin(proxy):
    async def main():
        conn = await asyncpg.connect(**asyncpg_kwargs(proxy))  # default statement cache
        try:
            values = [await conn.fetchval("SELECT $1::int * 3", i) for i in range(5)]
            async with conn.transaction():
                values.append(await conn.fetchval("SELECT $1::int * 3", 10))
            assert proxy.stats()["pinned_sessions"] == 0
            return values
        finally:
            await conn.close()

    assert run(main()) == [0, 3, 6, 9, 12, 30]
    stats = proxy.stats()
    assert stats["SessionPinReasons"] == {}
    assert stats["StatementClients"] == 1
    wait_until(lambda: proxy.stats()["pool"]["borrowed"] == 0, timeout=5, message="connection returned")


def test_asyncpg_many_clients_small_budget(proxy, pg):
    budget = 12
    clients, transactions = 200, 20
    t = table_name()
    pg.psql(f"CREATE TABLE {t} (client int, n int)", dbname=APP_DB)
    pg.psql(f"GRANT ALL ON {t} TO {APP_USER}", dbname=APP_DB)

    peaks = {"open": 0, "backends": 0}
    stop = threading.Event()
    poll_errors = []

    def poller():
        while not stop.is_set():
            try:
                peaks["open"] = max(peaks["open"], proxy.stats()["pool"]["open"])
                n = int(pg.psql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' "
                                     "AND application_name <> 'rdsproxy-health'"))
                peaks["backends"] = max(peaks["backends"], n)
            except Exception as exc:  # pragma: no cover - reported below
                poll_errors.append(exc)
            time.sleep(0.05)

    async def one_client(i):
        conn = await asyncpg.connect(**asyncpg_kwargs(proxy, statement_cache_size=0, timeout=30))
        try:
            for n in range(transactions):
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {t} VALUES ($1, $2)", i, n)
                    assert await conn.fetchval("SELECT $1::int", n) == n
        finally:
            await conn.close()

    async def main():
        results = await asyncio.gather(*(one_client(i) for i in range(clients)),
                                       return_exceptions=True)
        return [r for r in results if isinstance(r, BaseException)]

    # No app connections yet (the proxy is fresh and nothing else holds any).
    th = threading.Thread(target=poller, daemon=True)
    th.start()
    try:
        errors = run(main(), timeout=90)
    finally:
        stop.set()
        th.join(10)
    assert errors == []
    assert poll_errors == []
    assert proxy.stats()["pool"]["max"] == budget
    assert 0 < peaks["open"] <= budget
    assert 0 < peaks["backends"] <= budget
    assert direct_rows(pg, f"SELECT count(*), count(DISTINCT client) FROM {t}") == [
        (clients * transactions, clients)]
    wait_until(lambda: proxy.stats()["pool"]["borrowed"] == 0, timeout=5, message="nothing borrowed")
    stats = proxy.stats()
    assert stats["pool"]["open"] <= budget
    assert stats["ClientConnectionsSetupSucceeded"] >= clients


# --- pgbench ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode,clients", [("simple", 8), ("extended", 8), ("prepared", 4)])
def test_pgbench(proxy_factory, pgbench_db, mode, clients):
    proxy = proxy_factory(max_connections_percent=20)   # budget 12 >= clients
    res = run_cmd(["pgbench", "-n", "-M", mode, "-c", str(clients), "-j", "2", "-T", "2",
                   "-h", proxy.host, "-p", str(proxy.port), "-U", APP_USER, pgbench_db],
                  env=PGENV, timeout=60)
    out = res.stdout
    failed = re.search(r"number of failed transactions: (\d+)", out)
    assert failed is not None, out
    assert int(failed.group(1)) == 0, out
    processed = re.search(r"number of transactions actually processed: (\d+)", out)
    assert processed is not None and int(processed.group(1)) > 0, out
    tps = re.search(r"tps = ([0-9.]+)", out)
    assert tps is not None and float(tps.group(1)) > 0, out
    stats = proxy.stats()
    assert stats["pool"]["open"] <= 12
    assert stats["SessionPinReasons"] == {}
    assert stats["StatementClients"] == (clients if mode == "prepared" else 0)


