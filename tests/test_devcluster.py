"""rdsproxy.devcluster: throwaway clusters start, stop, authenticate and obey settings."""
from __future__ import annotations

import os
import subprocess
import sys

import psycopg
import pytest

from rdsproxy.devcluster import (ClusterError, PostgresCluster, PsqlError, find_pg_bin,
                                 free_port)
from rdsproxy import devcluster
from utils import port_is_open, run_cmd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _connect(cluster: PostgresCluster, **kw) -> psycopg.Connection:
    return psycopg.connect(cluster.dsn(**kw), connect_timeout=10)


def test_find_pg_bin_and_free_port():
    bindir = find_pg_bin()
    assert os.path.isfile(os.path.join(bindir, "initdb"))
    port = free_port()
    assert 0 < port < 65536 and not port_is_open(port)


def test_start_stop_removes_temp_dir():
    cluster = PostgresCluster(max_connections=20)
    cluster.start()
    base = cluster.base_dir
    try:
        assert port_is_open(cluster.port)
        assert os.path.isdir(cluster.data_dir)
        assert os.path.exists(os.path.join(cluster.socket_dir, f".s.PGSQL.{cluster.port}"))
        assert cluster.start() is cluster  # idempotent
        assert cluster.psql("SELECT 40 + 2") == "42"
    finally:
        cluster.stop()
    assert not port_is_open(cluster.port)
    assert not os.path.exists(base)
    cluster.stop()  # stopping twice is harmless


def test_context_manager_and_kill_restart():
    with PostgresCluster(auth="trust") as cluster:
        cluster.create_user("keep", "pw")
        cluster.kill()
        assert not port_is_open(cluster.port)
        # kill keeps the data: start() recovers the same cluster.
        cluster.start()
        assert cluster.psql("SELECT count(*) FROM pg_roles WHERE rolname = 'keep'") == "1"
        base = cluster.base_dir
    assert not os.path.exists(base)


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
    cluster = pg_factory(max_connections=7, settings={"application_name": "devcluster test",
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


def test_fixed_port_in_use_is_a_clear_error(pg):
    cluster = PostgresCluster(port=pg.port)
    with pytest.raises(ClusterError, match="already in use"):
        cluster.start()
    assert not os.path.exists(cluster.base_dir or "/nonexistent")


def test_bad_setting_reports_log_tail():
    cluster = PostgresCluster(settings={"shared_buffers": "bogus"})
    with pytest.raises(ClusterError, match="shared_buffers"):
        cluster.start()


def test_orphaned_cluster_of_a_dead_process_is_reaped():
    # A process that dies without cleanup (SIGKILL, runner timeout) leaves a postmaster;
    # the next process to create a temp cluster stops and removes it.
    code = ("import os; from rdsproxy.devcluster import PostgresCluster; "
            "c = PostgresCluster().start(); print(c.base_dir, c.port, flush=True); os._exit(0)")
    base, port = run_cmd([sys.executable, "-c", code], cwd=REPO).stdout.split()
    assert port_is_open(int(port)) and os.path.isdir(base)
    devcluster._reaped = False  # the sweep runs once per process; force it again
    PostgresCluster().start().stop()
    assert not os.path.exists(base)
    assert not port_is_open(int(port))
