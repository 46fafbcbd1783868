"""What ordinary client code sees, directly and through the proxy, with each driver the
proxy's users run: rows, errors (SQLSTATE and text), notices, transaction status, COPY,
pipelines. Any difference is a bug or belongs in the README's list of differences."""
from __future__ import annotations

import os
import subprocess
import threading

import asyncpg
import psycopg
import psycopg2
import psycopg2.extensions
import pytest
from differential import error_of, flush, next_result, outcome, proxied_differential
from psycopg import pq
from utils import run


@pytest.fixture(scope="module")
def diff(tmp_path_factory, pg):
    """One proxy subprocess for the module, a pool of 3 (clients share connections)."""
    with proxied_differential(tmp_path_factory.mktemp("proxy"), pg, max_connections_percent=5) as differential:
        yield differential


def steps(conn, statements):
    """Each statement's outcome and the transaction status after it (psycopg, autocommit
    off: the driver opens transactions itself)."""
    seen = []
    for sql in statements:
        def fetch(sql=sql):
            cur = conn.execute(sql)
            return cur.fetchall() if cur.description else cur.statusmessage
        seen.append((outcome(fetch), pq.TransactionStatus(conn.info.transaction_status).name))
    return seen


def test_transaction_status_through_errors_and_savepoints(diff):
    def scenario(side):
        with side.connect(autocommit=False) as conn:
            return steps(conn, [
                "select 1", "savepoint a", "select 1/0", "select 2", "rollback to savepoint a",
                "select 3", "commit", "select 4", "rollback",
            ])
    diff.assert_same(scenario)


def test_errors_keep_their_fields(diff):
    def scenario(side):
        with side.connect() as conn:
            seen = []
            for sql in ["select * from no_such_table", "select 'abc'::int", "selec 1",
                        ("do $$ begin raise exception using errcode = 'P0042', message = 'mine', "
                         "detail = 'the detail', hint = 'the hint'; end $$")]:
                try:
                    conn.execute(sql)
                    seen.append("ok")
                except psycopg.Error as exc:
                    d = exc.diag
                    seen.append((d.sqlstate, d.severity, d.message_primary, d.message_detail,
                                 d.message_hint, d.statement_position))
            return seen
    diff.assert_same(scenario)


def test_notices_reach_the_client_in_order(diff):
    def scenario(side):
        with side.connect() as conn:
            notices = []
            conn.add_notice_handler(lambda d: notices.append((d.severity, d.message_primary)))
            conn.execute("do $$ begin raise notice 'one'; raise warning 'two'; end $$")
            conn.execute("rollback")   # WARNING: there is no transaction in progress
            return notices
    diff.assert_same(scenario)


def test_multi_statement_query_stops_at_its_error(diff):
    def scenario(side):
        with side.connect() as conn:
            conn.execute("drop table if exists multi_" + side.name)
            conn.execute(f"create table multi_{side.name} (x int)")
            seen = [outcome(conn.execute, f"insert into multi_{side.name} values (1); "
                                          f"select 1/0; insert into multi_{side.name} values (2)")]
            seen.append(conn.execute(f"select count(*) from multi_{side.name}").fetchone())
            return seen
    diff.assert_same(scenario)


def test_copy_both_ways(diff):
    def scenario(side):
        with side.connect() as conn:
            table = f"copy_{side.name}"
            conn.execute(f"drop table if exists {table}")
            conn.execute(f"create table {table} (x int, y text)")
            with conn.cursor().copy(f"copy {table} from stdin") as copy:
                for i in range(2000):
                    copy.write_row((i, f"row {i}"))
            out = bytearray()
            with conn.cursor().copy(f"copy (select * from {table} order by x) to stdout") as copy:
                for chunk in copy:
                    out += chunk
            bad = outcome(lambda: conn.cursor().copy(f"copy {table} from stdin").__enter__()
                          .write(b"not a number\tx\n") or conn.execute("select 1"))
            return len(out), bytes(out[-20:]), bad[0], conn.execute("select 1").fetchone()
    diff.assert_same(scenario)


def test_large_result_and_wide_rows(diff):
    def scenario(side):
        with side.connect() as conn:
            rows = conn.execute("select g, repeat('x', 3000) from generate_series(1, 3000) g").fetchall()
            return len(rows), rows[-1][0], len(rows[-1][1])
    diff.assert_same(scenario)


def test_psycopg2_session(diff):
    def scenario(side):
        conn = psycopg2.connect(side.dsn())
        try:
            cur = conn.cursor()
            cur.execute("select %s::text, %s::int", ("a'b", 7))
            seen = [cur.fetchall(), conn.get_transaction_status()]
            try:
                cur.execute("select 1/0")
            except psycopg2.Error as exc:
                seen.append(error_of(exc))
            seen.append(conn.get_transaction_status())
            conn.rollback()
            cur.execute("select current_setting('DateStyle'), current_setting('client_encoding')")
            seen.append(cur.fetchall())
            seen.append(conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INTRANS)
            conn.commit()
            return seen
        finally:
            conn.close()
    diff.assert_same(scenario)


def test_asyncpg_prepared_and_types(diff):
    """asyncpg's own cache prepares by name: the session pins, and must still behave."""
    def scenario(side):
        async def go():
            con = await side.asyncpg()
            try:
                seen = [await con.fetchval("select $1::int + 1", 41)]
                seen.append(await con.fetch("select g, g::text from generate_series(1, 3) g"))
                try:
                    await con.fetchval("select $1::int / 0", 1)
                except asyncpg.PostgresError as exc:
                    seen.append(error_of(exc))
                async with con.transaction():
                    seen.append(await con.fetchval("select 'in tx'"))
                seen.append(await con.fetchval("select 'after'"))
                return [list(map(tuple, s)) if isinstance(s, list) else s for s in seen]
            finally:
                await con.close()
        return run(go())
    diff.assert_same(scenario)


def test_pipeline_with_an_error_in_the_middle(diff):
    """libpq pipeline mode: the statements after an error are skipped up to the Sync, then
    the pipeline goes on."""
    def scenario(side):
        conn = pq.PGconn.connect(side.dsn().encode())
        try:
            conn.enter_pipeline_mode()
            for sql in (b"select 1", b"select 1/0", b"select 3"):
                conn.send_query_params(sql, None)
            conn.pipeline_sync()
            conn.send_query_params(b"select 4", None)
            conn.pipeline_sync()
            flush(conn)
            seen = []
            while [s[0] for s in seen].count("PIPELINE_SYNC") < 2:
                result = next_result(conn)
                if result is None:
                    continue
                status = pq.ExecStatus(result.status).name
                value = result.get_value(0, 0) if status == "TUPLES_OK" else None
                sqlstate = result.error_field(pq.DiagnosticField.SQLSTATE)
                seen.append((status, value, sqlstate))
            return seen
        finally:
            conn.finish()
    diff.assert_same(scenario)


def login_error(side, **dsn):
    try:
        psycopg.connect(side.dsn(**dsn)).close()
        return "ok"
    except psycopg.OperationalError as exc:
        # libpq folds the server's FATAL into its own text: keep the server's line.
        lines = [line for line in str(exc).splitlines() if "FATAL" in line]
        return (exc.sqlstate, lines[-1].split("FATAL:", 1)[1].strip() if lines else str(exc))


@pytest.mark.parametrize("dsn", [
    {"password": "wrong"},
    {"dbname": "no_such_database"},
    {"user": "no_such_user", "password": "x"},
], ids=["password", "database", "user"])
def test_login_errors(diff, dsn):
    diff.assert_same(lambda side: login_error(side, **dsn))


def test_cancel_of_a_running_query(diff):
    def scenario(side):
        with side.connect() as conn:
            timer = threading.Timer(0.5, conn.cancel_safe)
            timer.start()
            try:
                seen = [outcome(conn.execute, "select pg_sleep(10)")]
            finally:
                timer.join()
            seen.append(conn.execute("select 'still usable'").fetchone())
            return seen
    diff.assert_same(scenario)


def test_session_settings_hold_for_the_session(diff):
    """SET, temp tables and server-side cursors last for the whole session."""
    def scenario(side):
        with side.connect() as conn:
            conn.execute("set statement_timeout = '200ms'")
            seen = [outcome(conn.execute, "select pg_sleep(2)")]
            conn.execute("reset statement_timeout")
            conn.execute("create temp table scratch (x int)")
            conn.execute("insert into scratch select generate_series(1, 5)")
            conn.execute("begin")
            conn.execute("declare c cursor with hold for select x from scratch order by x")
            conn.execute("commit")
            seen.append(conn.execute("fetch 2 from c").fetchall())
            seen.append(conn.execute("select count(*) from scratch").fetchone())
            seen.append(conn.execute("show statement_timeout").fetchone())
            return seen
    diff.assert_same(scenario)


def test_psql_script_output(diff):
    """psql, as a person runs it: output, errors and exit status."""
    script = ("select 1 as one;\n"
              "begin;\nselect 1/0;\nselect 2;\nrollback;\n"
              "\\echo after\n"
              "select string_agg(g::text, ',') from generate_series(1, 5) g;\n")

    def scenario(side):
        proc = subprocess.run(["psql", "-X", "-A", "-t", "-d", side.dsn(), "-f", "-"], check=False,
                              input=script,
                              capture_output=True, text=True, timeout=30,
                              env={**os.environ, "PGCONNECT_TIMEOUT": "10"})
        return proc.returncode, proc.stdout, proc.stderr
    diff.assert_same(scenario)
