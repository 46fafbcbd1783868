"""The admin console (virtual database `rdsproxy`): the real psql runs each command against
a live proxy in front of the session PostgreSQL, with psycopg clients as the pooled traffic;
PyMySQL does the same through a MySQL endpoint in front of the session MariaDB."""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import threading

import psycopg
import pymysql
import pytest

from harness import APP_DB, APP_PASSWORD, APP_USER, connect, scalar, write_secret
from utils import run_cmd, wait_until

# The admin has a secret but no role on the server: the console never needs one.
ADMIN, ADMIN_PASSWORD = "boss", "boss-secret"
PSQL = shutil.which("psql") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/psql"))), None)

needs_psql = pytest.mark.skipif(PSQL is None, reason="psql not installed")


@pytest.fixture
def proxy(proxy_factory):
    return proxy_factory(top={"admin_users": [ADMIN]},
                         users=[(APP_USER, APP_PASSWORD), (ADMIN, ADMIN_PASSWORD)])


def psql_argv(proxy, command, user=ADMIN, dbname="rdsproxy"):
    dsn = f"host={proxy.host} port={proxy.port} user={user} dbname={dbname} sslmode=disable"
    return [PSQL, dsn, "-X", "-A", "-F", "|", "-P", "footer=off", "-c", command]


def psql_env(password=ADMIN_PASSWORD):
    return {**os.environ, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10"}


def console(proxy, command, check=True, **kw):
    """psql -c `command` on the console: its result (stdout, stderr, returncode)."""
    return run_cmd(psql_argv(proxy, command, **kw), env=psql_env(), check=check, timeout=60)


def table(out: str) -> list[dict]:
    """psql's unaligned output as rows by column name."""
    lines = out.strip().splitlines()
    header = lines[0].split("|")
    return [dict(zip(header, line.split("|"))) for line in lines[1:]]


def app_connection(proxy):
    return psycopg.connect(proxy.dsn(), connect_timeout=10, autocommit=True)


@contextlib.contextmanager
def two_app_connections(proxy):
    with app_connection(proxy) as first, app_connection(proxy) as second:
        yield first, second


@needs_psql
def test_show_commands_describe_the_pool(proxy):
    with app_connection(proxy) as conn:
        conn.execute("SELECT 1")
        pools = table(console(proxy, "SHOW POOLS").stdout)
        mine = [row for row in pools if row["database"] == APP_DB and row["user"] == APP_USER]
        assert len(mine) == 1, pools
        assert mine[0]["cl_active"] == "1" and mine[0]["cl_waiting"] == "0"
        assert mine[0]["sv_idle"] == "1" and mine[0]["sv_active"] == "0"
        assert mine[0]["pool_mode"] == "transaction" and mine[0]["paused"] == "0"
        assert {"sv_used", "maxwait"} <= set(mine[0])

        clients = table(console(proxy, "show clients;").stdout)
        app = [row for row in clients if row["user"] == APP_USER]
        assert [row["id"] for row in app] == [str(conn.info.backend_pid)]
        assert app[0]["database"] == APP_DB and app[0]["state"] == "active"
        assert app[0]["phase"] == "free"

        conn.execute("BEGIN")
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        servers = table(console(proxy, "SHOW SERVERS").stdout)
        active = [row for row in servers if row["state"] == "active"]
        assert [(row["pid"], row["link"], row["database"]) for row in active] == [
            (str(backend), str(conn.info.backend_pid), APP_DB)]
        target = proxy.config.targets[0]
        assert (active[0]["addr"], active[0]["port"]) == (target.host, str(target.port))
        pools = table(console(proxy, "SHOW POOLS").stdout)
        assert [row["sv_active"] for row in pools if row["database"] == APP_DB] == ["1"]
        conn.execute("COMMIT")

    stats = {row["name"]: row["value"] for row in table(console(proxy, "SHOW STATS").stdout)}
    assert int(stats["QueryRequests"]) >= 3
    targets = table(console(proxy, "SHOW TARGETS").stdout)
    assert [(row["role"], row["state"]) for row in targets] == [("READ_WRITE", "AVAILABLE")]


@needs_psql
def test_pause_waits_for_running_transactions_and_holds_new_ones(proxy):
    with two_app_connections(proxy) as (inside, later):
        inside.execute("BEGIN")
        inside.execute("SELECT 1")
        pause = subprocess.Popen(psql_argv(proxy, "PAUSE"), env=psql_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # PAUSE returns only once the open transaction has ended, which it still may.
        wait_until(lambda: table(console(proxy, "SHOW POOLS").stdout)[0]["paused"] == "1")
        assert pause.poll() is None
        assert inside.execute("SELECT 2").fetchone() == (2,)
        inside.execute("COMMIT")
        out, err = pause.communicate(timeout=30)
        assert pause.returncode == 0, err
        assert out.strip() == "PAUSE"

        results = []
        worker = threading.Thread(target=lambda: results.append(
            later.execute("SELECT 42").fetchone()))
        worker.start()
        wait_until(lambda: any(row["cl_waiting"] == "1"
                               for row in table(console(proxy, "SHOW POOLS").stdout)))
        assert worker.is_alive() and not results
        clients = table(console(proxy, "SHOW CLIENTS").stdout)
        assert sorted(row["state"] for row in clients if row["user"] == APP_USER) == [
            "active", "waiting"]

        refused = console(proxy, f"RESUME {APP_DB}", check=False)
        assert "RESUME without a name" in refused.stderr and worker.is_alive()
        assert console(proxy, "RESUME").stdout.strip() == "RESUME"
        worker.join(15)
        assert results == [(42,)]
        assert inside.execute("SELECT 3").fetchone() == (3,)


@needs_psql
def test_pause_gives_up_waiting_after_shutdown_timeout(proxy_factory):
    proxy = proxy_factory(top={"admin_users": [ADMIN], "shutdown_timeout": 1},
                          users=[(APP_USER, APP_PASSWORD), (ADMIN, ADMIN_PASSWORD)])
    with app_connection(proxy) as conn:
        conn.execute("BEGIN")
        conn.execute("SELECT 1")
        result = console(proxy, "PAUSE")
        assert result.stdout.strip() == "PAUSE"
        assert ("WARNING:  every database is paused, but 1 client(s) still hold a connection "
                "after 1 s") in result.stderr
        assert conn.execute("SELECT 2").fetchone() == (2,)
        conn.execute("COMMIT")
        console(proxy, "RESUME")
        assert conn.execute("SELECT 3").fetchone() == (3,)


@needs_psql
def test_pause_of_one_database_leaves_the_others(proxy):
    with app_connection(proxy) as conn:
        assert console(proxy, "PAUSE otherdb").stdout.strip() == "PAUSE"
        assert conn.execute("SELECT 1").fetchone() == (1,)
        result = console(proxy, "RESUME appdb", check=False)
        assert "database 'appdb' is not paused" in result.stderr
        assert console(proxy, "RESUME otherdb").stdout.strip() == "RESUME"


@needs_psql
def test_kill_closes_a_client(proxy):
    with two_app_connections(proxy) as (victim, bystander):
        victim.execute("SELECT 1")
        assert console(proxy, f"KILL {victim.info.backend_pid}").stdout.strip() == "KILL"
        with pytest.raises(psycopg.OperationalError, match="administrator command"):
            victim.execute("SELECT 1")
        assert bystander.execute("SELECT 1").fetchone() == (1,)
        assert "no client with id 1" in console(proxy, "KILL 1", check=False).stderr
        console(proxy, f"KILL {APP_DB}")
        with pytest.raises(psycopg.OperationalError, match="administrator command"):
            bystander.execute("SELECT 1")


@needs_psql
def test_console_is_only_for_admin_users(proxy, pg):
    result = run_cmd(psql_argv(proxy, "SHOW POOLS", user=APP_USER), env=psql_env(APP_PASSWORD),
                     check=False, timeout=60)
    assert result.returncode != 0
    # What the server itself answers for a database it does not have.
    with pytest.raises(psycopg.OperationalError) as direct:
        psycopg.connect(pg.dsn(user=APP_USER, password=APP_PASSWORD, dbname="rdsproxy"),
                        connect_timeout=10)
    server_says = str(direct.value).split("FATAL:", 1)[1].strip()
    assert server_says == 'database "rdsproxy" does not exist'
    assert f"FATAL:  {server_says}" in result.stderr
    # The admin logs in as anyone does: a wrong password fails the same way.
    result = run_cmd(psql_argv(proxy, "SHOW POOLS"), env=psql_env("wrong"), check=False,
                     timeout=60)
    assert result.returncode != 0
    assert f'password authentication failed for user "{ADMIN}"' in result.stderr


@needs_psql
def test_unknown_commands_are_errors(proxy):
    for command, words in (("SHOW NONSENSE", "unknown 'SHOW NONSENSE'"),
                           ("FLY AWAY", "unknown command 'FLY'"),
                           ("SHOW POOLS; SHOW CLIENTS", "one command at a time"),
                           ("KILL", "KILL needs a client id")):
        result = console(proxy, command, check=False)
        assert result.returncode != 0 and words in result.stderr, (command, result.stderr)
    # The session goes on after an error.
    result = run_cmd([*psql_argv(proxy, "FLY"), "-c", "SHOW TARGETS"], env=psql_env(),
                     check=False, timeout=60)
    assert "AVAILABLE" in result.stdout


@needs_psql
def test_reload_rereads_the_secrets(proxy, tmp_path):
    write_secret(tmp_path, ADMIN, "new-boss-secret")
    assert console(proxy, "RELOAD").stdout.strip() == "RELOAD"
    result = run_cmd(psql_argv(proxy, "SHOW TARGETS"), env=psql_env("new-boss-secret"),
                     check=False, timeout=60)
    assert result.returncode == 0, result.stderr


# --- MySQL --------------------------------------------------------------------------------

@pytest.fixture
def mysql_proxy(proxy_factory):
    return proxy_factory(engine="mysql", top={"admin_users": [ADMIN]},
                         users=[(APP_USER, APP_PASSWORD), (ADMIN, ADMIN_PASSWORD)])


def mysql_console(proxy):
    return connect(proxy, user=ADMIN, password=ADMIN_PASSWORD, database="rdsproxy")


def mysql_table(conn, command) -> list[dict]:
    with conn.cursor() as cur:
        cur.execute(command)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def test_mysql_console_shows_pauses_and_kills(mysql_proxy):
    app = connect(mysql_proxy)
    later = connect(mysql_proxy)
    admin = mysql_console(mysql_proxy)
    try:
        assert scalar(app, "SELECT 1") == 1
        pools = mysql_table(admin, "SHOW POOLS")
        assert [(r["database"], r["user"], r["cl_active"], r["sv_idle"]) for r in pools] == [
            (APP_DB, APP_USER, "2", "1")]
        clients = mysql_table(admin, "SHOW CLIENTS")
        assert {r["user"] for r in clients} == {APP_USER, ADMIN}
        servers = mysql_table(admin, "SHOW SERVERS")
        assert [r["state"] for r in servers] == ["idle"]
        assert [r["state"] for r in mysql_table(admin, "SHOW TARGETS")] == ["AVAILABLE"]
        assert mysql_table(admin, "SHOW STATS")

        with admin.cursor() as cur:
            cur.execute(f"PAUSE {APP_DB}")
        results = []
        worker = threading.Thread(target=lambda: results.append(scalar(later, "SELECT 42")))
        worker.start()
        wait_until(lambda: mysql_table(admin, "SHOW POOLS")[0]["cl_waiting"] == "1")
        assert worker.is_alive() and not results
        with admin.cursor() as cur:
            cur.execute("RESUME")
        worker.join(15)
        assert results == [42]

        victim = next(r["id"] for r in mysql_table(admin, "SHOW CLIENTS")
                      if r["user"] == APP_USER)
        with admin.cursor() as cur:
            cur.execute(f"KILL {victim}")
        killed = app if app.thread_id() == int(victim) else later
        with pytest.raises(pymysql.err.OperationalError):
            scalar(killed, "SELECT 1")
        with pytest.raises(pymysql.err.ProgrammingError, match="unknown command 'FLY'"):
            mysql_table(admin, "FLY")
    finally:
        for conn in (app, later, admin):
            try:
                conn.close()
            except pymysql.err.Error:
                pass


def test_mysql_console_is_only_for_admin_users(mysql_proxy):
    with pytest.raises(pymysql.err.OperationalError) as info:
        connect(mysql_proxy, database="rdsproxy")
    assert info.value.args == (1049, "Unknown database 'rdsproxy'")
