"""Client and process life cycle: idle client timeout, graceful SIGTERM, SIGHUP secret reload."""
from __future__ import annotations

import asyncio
import json
import select
import signal
import threading
import time
import uuid

import asyncpg
import psycopg
import pytest

from harness import APP_DB, APP_PASSWORD, APP_USER
from proxyproc import ProxyProcess
from utils import port_is_open, run, wait_until


def connect(dsn, **kw):
    return psycopg.connect(dsn, connect_timeout=10, autocommit=True, **kw)


def wait_readable(conn, timeout) -> bool:
    r, _, _ = select.select([conn.fileno()], [], [], timeout)
    return bool(r)


# --- idle_client_timeout ----------------------------------------------------------------

def test_idle_client_timeout(proxy_factory):
    proxy = proxy_factory(top={"idle_client_timeout": 1})
    idle = connect(proxy.dsn())
    busy = connect(proxy.dsn())
    sleeper = connect(proxy.dsn())
    try:
        assert idle.execute("SELECT 1").fetchone() == (1,)
        start = time.monotonic()
        busy_errors = []

        def keep_busy():
            try:
                while time.monotonic() - start < 3.5:
                    busy.execute("SELECT 1")
                    time.sleep(0.3)
            except Exception as exc:
                busy_errors.append(exc)
        th = threading.Thread(target=keep_busy, daemon=True)
        th.start()
        # A query running longer than the timeout is not idleness.
        assert sleeper.execute("SELECT pg_sleep(2.5), 'woke'").fetchone() == ("", "woke")
        # The idle one was told why and disconnected within ~3 s.
        assert wait_readable(idle, max(0.1, 3.5 - (time.monotonic() - start)))
        with pytest.raises(psycopg.OperationalError) as info:
            idle.execute("SELECT 1")
        assert "idle_client_timeout" in str(info.value)
        assert info.value.sqlstate == "57P05"
        assert isinstance(info.value, psycopg.errors.IdleSessionTimeout)
        th.join(10)
        assert busy_errors == []
        assert busy.execute("SELECT 'busy ok'").fetchone() == ("busy ok",)
    finally:
        for c in (idle, busy, sleeper):
            c.close()


def test_idle_timeout_counts_from_last_activity(proxy_factory):
    # A client whose long query just finished has been idle for a moment only.
    proxy = proxy_factory(top={"idle_client_timeout": 1})
    with connect(proxy.dsn()) as conn:
        assert conn.execute("SELECT pg_sleep(2.2), 'a'").fetchone() == ("", "a")
        time.sleep(0.4)
        assert conn.execute("SELECT 'still connected'").fetchone() == ("still connected",)


def test_idle_timeout_asyncpg(proxy_factory):
    """An asyncpg client idle for 3.2 s finds its connection gone."""
    proxy = proxy_factory(top={"idle_client_timeout": 1})

    async def main():
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user=APP_USER,
                                     password=APP_PASSWORD, database=APP_DB, ssl=False, timeout=10,
                                     statement_cache_size=0)   # named statements would pin
        try:
            assert await conn.fetchval("SELECT 1") == 1
            await asyncio.sleep(3.2)
            with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError,
                                ConnectionError)) as info:
                await conn.fetchval("SELECT 1")
            return info.value
        finally:
            conn.terminate()

    exc = run(main(), timeout=20)
    # asyncpg drops the proxy's FATAL 57P05 and reports the closed connection.
    assert "idle_client_timeout" in str(exc) or "connection is closed" in str(exc), exc


# --- graceful shutdown ------------------------------------------------------------------

def test_sigterm_lets_open_transaction_commit(pg, tmp_path):
    table = "t_" + uuid.uuid4().hex[:12]
    pg.psql(f"CREATE TABLE {table} (id int); GRANT ALL ON {table} TO {APP_USER}", dbname=APP_DB)
    proxy = ProxyProcess(tmp_path, pg, [(APP_USER, APP_PASSWORD)], top={"shutdown_timeout": 10})
    try:
        dsn = proxy.dsn(APP_USER, APP_PASSWORD, APP_DB)
        conn = psycopg.connect(dsn, connect_timeout=10)          # not autocommit: BEGIN implicit
        conn.execute("SELECT 1")
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        proxy.signal(signal.SIGTERM)
        wait_until(lambda: not port_is_open(proxy.port), timeout=3, message="listener closed")
        with pytest.raises(psycopg.OperationalError):
            connect(proxy.dsn(APP_USER, APP_PASSWORD, APP_DB, connect_timeout=2))
        time.sleep(1)
        assert proxy.proc.poll() is None, "the proxy exited with a transaction open"
        conn.execute(f"INSERT INTO {table} VALUES (2)")
        conn.commit()
        committed_at = time.monotonic()
        rc = proxy.proc.wait(15)
        assert rc == 0, proxy.log_text()
        assert time.monotonic() - committed_at < 10
        conn.close()
        assert pg.psql(f"SELECT string_agg(id::text, ',' ORDER BY id) FROM {table}", dbname=APP_DB) == "1,2"
        assert "shutting down" in proxy.log_text()
    finally:
        proxy.stop()


def test_sigterm_idle_proxy_exits_promptly(pg, tmp_path):
    proxy = ProxyProcess(tmp_path, pg, [(APP_USER, APP_PASSWORD)], top={"shutdown_timeout": 10})
    try:
        with connect(proxy.dsn(APP_USER, APP_PASSWORD, APP_DB)) as conn:
            conn.execute("SELECT 1")
            start = time.monotonic()
            proxy.signal(signal.SIGTERM)
            assert proxy.proc.wait(10) == 0
            assert time.monotonic() - start < 5
    finally:
        proxy.stop()


# --- SIGHUP reloads secrets -------------------------------------------------------------

def test_sighup_reloads_secrets(pg, tmp_path):
    user = "rot_" + uuid.uuid4().hex[:8]
    old, new = "old-pw-" + uuid.uuid4().hex[:6], "new-pw-" + uuid.uuid4().hex[:6]
    pg.create_user(user, old)
    proxy = ProxyProcess(tmp_path, pg, [(user, old)])
    try:
        dsn_old = proxy.dsn(user, old, APP_DB)
        dsn_new = proxy.dsn(user, new, APP_DB)
        kept = connect(dsn_old)
        assert kept.execute("SELECT current_user").fetchone() == (user,)
        # Rotate: database first, then the secret, then tell the proxy.
        pg.psql(f"SET synchronous_commit = on; ALTER ROLE {user} PASSWORD '{new}'")
        with open(proxy.secret_path(user), "w") as fh:
            json.dump({"username": user, "password": new, "engine": "postgres"}, fh)
        mark = len(proxy.log_text())
        proxy.signal(signal.SIGHUP)
        proxy.wait_for_log("secrets reloaded", start=mark)
        assert proxy.proc.poll() is None
        # New clients use the new password; the old one is refused.
        with connect(dsn_new) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (user,)
        with pytest.raises(psycopg.OperationalError) as info:
            connect(dsn_old)
        assert "password authentication failed" in str(info.value)
        # The client connected before the rotation keeps working, in and out of transactions.
        assert kept.execute("SELECT 'kept'").fetchone() == ("kept",)
        with kept.transaction():
            assert kept.execute("SELECT 2").fetchone() == (2,)
        # Several new clients at once need new server connections: they log in with the new password.
        conns = [connect(dsn_new) for _ in range(4)]
        try:
            for c in conns:
                c.execute("BEGIN")
            for c in conns:
                assert c.execute("SELECT 1").fetchone() == (1,)
                c.execute("COMMIT")
        finally:
            for c in conns:
                c.close()
        kept.close()
        # A broken secret on reload is reported and the old accounts stay in force.
        with open(proxy.secret_path(user), "w") as fh:
            fh.write("{broken")
        mark = len(proxy.log_text())
        proxy.signal(signal.SIGHUP)
        proxy.wait_for_log("secrets not reloaded", start=mark)
        with connect(dsn_new) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert new not in proxy.log_text() and old not in proxy.log_text()
    finally:
        proxy.stop()


def test_idle_pinned_client_times_out(proxy_factory):
    proxy = proxy_factory(top={"idle_client_timeout": 1})
    with connect(proxy.dsn()) as conn:
        conn.execute("CREATE TEMP TABLE idle_pinned (a int)")   # pins: temporary_object
        wait_until(lambda: proxy.stats()["pinned_sessions"] == 1, timeout=5, message="pinned")
        assert wait_readable(conn, 4.0), "the idle pinned client was not disconnected"
        with pytest.raises(psycopg.OperationalError, match="idle_client_timeout"):
            conn.execute("SELECT 1")
