"""rdsproxy.devservers: throwaway PostgreSQL clusters and MariaDB servers start, stop,
survive a crash, clean up after a dead process, authenticate and obey settings."""
from __future__ import annotations

import os
import subprocess
import sys

import psycopg
import pytest

from rdsproxy.devservers.base import DevServerError, free_port
from rdsproxy.devservers.mariadb import MariaDBServer
from rdsproxy.devservers.postgres import ClusterError, PostgresCluster, PsqlError, find_pg_bin
from utils import port_is_open, run_cmd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVERS = {"postgres": PostgresCluster, "mariadb": MariaDBServer}


def admin_sql(server, sql: str) -> str:
    """SQL over the server's unix socket as its superuser."""
    return server.psql(sql) if isinstance(server, PostgresCluster) else server.sql(sql)


def databases(server) -> list[str]:
    if isinstance(server, PostgresCluster):
        return server.psql("SELECT datname FROM pg_database").split()
    return server.sql("SHOW DATABASES").split()


def unix_socket(server) -> str:
    if isinstance(server, PostgresCluster):
        return os.path.join(server.socket_dir, f".s.PGSQL.{server.port}")
    return server.socket_path


# --- what both kinds share ----------------------------------------------------------------

@pytest.mark.parametrize("kind", SERVERS)
def test_start_twice_stop_twice_removes_the_directory(kind):
    server = SERVERS[kind](max_connections=20)
    server.start()
    base = server.base_dir
    try:
        assert server.running and port_is_open(server.port)
        assert os.path.isdir(server.data_dir)
        assert os.path.exists(unix_socket(server))
        assert admin_sql(server, "SELECT 40 + 2") == "42"
        assert server.start() is server  # a second start leaves a running server alone
        assert server.running and port_is_open(server.port)
    finally:
        server.stop()
    assert not server.running and not port_is_open(server.port)
    assert not os.path.exists(base)
    server.stop()  # stopping twice is harmless


@pytest.mark.parametrize("kind", SERVERS)
def test_kill_keeps_the_data_for_the_next_start(kind):
    with SERVERS[kind]() as server:
        server.create_database("keep")
        server.kill()                                   # a crash: data kept
        assert not server.running and not port_is_open(server.port)
        assert os.path.isdir(server.base_dir)
        server.start()
        assert "keep" in databases(server)
        base = server.base_dir
    assert not os.path.exists(base)


@pytest.mark.parametrize("kind", SERVERS)
def test_orphan_of_a_dead_process_is_reaped(kind, monkeypatch):
    # A process that dies without cleanup (SIGKILL, runner timeout) leaves a server behind;
    # the next process to create a temp server of that kind stops and removes it.
    cls = SERVERS[kind]
    code = (f"import os; from {cls.__module__} import {cls.__name__} as S; "
            "s = S().start(); print(s.base_dir, s.port, flush=True); os._exit(0)")
    base, port = run_cmd([sys.executable, "-c", code], cwd=REPO).stdout.split()
    assert port_is_open(int(port)) and os.path.isdir(base)
    # The sweep runs once per process and kind; force it again.
    monkeypatch.setattr(cls, "_orphans_reaped", False)
    cls().start().stop()
    assert not os.path.exists(base)
    assert not port_is_open(int(port))


@pytest.mark.parametrize("kind, match", [("postgres", "already in use"),
                                         ("mariadb", "failed to start")])
def test_fixed_port_in_use_is_a_clear_error(kind, match, pg):
    server = SERVERS[kind](port=pg.port)
    with pytest.raises(DevServerError, match=match):
        server.start()
    assert not server.running
    assert not os.path.exists(server.base_dir or "/nonexistent")


# --- PostgreSQL ----------------------------------------------------------------------------

def _connect(cluster: PostgresCluster, **kw) -> psycopg.Connection:
    return psycopg.connect(cluster.dsn(**kw), connect_timeout=10)


def test_find_pg_bin_and_free_port():
    bindir = find_pg_bin()
    assert os.path.isfile(os.path.join(bindir, "initdb"))
    port = free_port()
    assert 0 < port < 65536 and not port_is_open(port)


@pytest.mark.parametrize("auth, prefix", [("scram-sha-256", "SCRAM-SHA-256$"), ("md5", "md5")])
def test_password_auth(pg_factory, auth, prefix):
    cluster = pg_factory(auth=auth, superuser_password="root-pw")
    cluster.create_user("alice", "s3cret 'quoted'")
    cluster.create_database("alicedb", owner="alice")

    stored = cluster.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'alice'")
    assert stored.startswith(prefix)

    with _connect(cluster, user="alice", password="s3cret 'quoted'", dbname="alicedb") as conn:
        row = conn.execute("SELECT current_user, current_database()").fetchone()
        assert row == ("alice", "alicedb")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _connect(cluster, user="alice", password="wrong", dbname="alicedb")

    # The superuser password is set too, and dsn() defaults to it.
    with _connect(cluster) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _connect(cluster, user="postgres", password="not-it")


def test_trust_needs_no_password(pg_factory):
    cluster = pg_factory(auth="trust")
    with psycopg.connect(f"host=127.0.0.1 port={cluster.port} user=postgres dbname=postgres",
                         connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_max_connections_and_settings(pg_factory):
    cluster = pg_factory(max_connections=7, settings={"application_name": "devservers test",
                                                      "work_mem": "8MB"})
    with _connect(cluster) as conn:
        assert conn.execute("SHOW max_connections").fetchone() == ("7",)
        assert conn.execute("SHOW work_mem").fetchone() == ("8MB",)
        assert conn.execute("SHOW fsync").fetchone() == ("off",)
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)


def test_session_cluster(pg):
    assert pg.psql("SHOW max_connections") == "60"
    assert pg.psql("SHOW password_encryption") == "scram-sha-256"
    with _connect(pg, user="app", password="app-secret", dbname="appdb") as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == \
            ("app", "appdb")
        owner = conn.execute(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'appdb'"
        ).fetchone()
        assert owner == ("app",)
        assert conn.execute(
            "SELECT rolcreatedb FROM pg_roles WHERE rolname = 'app'").fetchone() == (True,)


def test_psql_error_carries_stderr(pg):
    with pytest.raises(PsqlError) as info:
        pg.psql("SELECT * FROM no_such_table")
    assert isinstance(info.value, subprocess.CalledProcessError)
    assert "no_such_table" in info.value.stderr
    assert "no_such_table" in str(info.value)


def test_bad_setting_reports_log_tail():
    cluster = PostgresCluster(settings={"shared_buffers": "bogus"})
    with pytest.raises(ClusterError, match="shared_buffers"):
        cluster.start()


# --- MariaDB -------------------------------------------------------------------------------

def test_mariadb_settings_pid_and_crash_restart():
    server = MariaDBServer(max_connections=12)
    with server:
        base, pid = server.base_dir, server.pid
        assert os.path.isdir(base) and pid and server.running
        assert server.variable("max_connections") == "12"
        assert server.variable("port") == str(server.port)
        server.kill()
        server.start()
        assert server.pid != pid
        pid = server.pid
    assert not os.path.exists(base) and not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
