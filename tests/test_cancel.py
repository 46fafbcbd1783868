"""Cancel requests through the proxy: real ones, forged ones, and ones aimed at idle clients."""
from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import struct
import threading
import time

import asyncpg
import psycopg
import pytest

from harness import APP_DB, APP_PASSWORD, APP_USER
from utils import md5_session, run, wait_until

CANCEL_REQUEST_CODE = 80877102


def connect(proxy, **kw):
    return psycopg.connect(proxy.dsn(user=APP_USER, password=APP_PASSWORD, dbname=APP_DB),
                           connect_timeout=10, autocommit=True, **kw)


def send_cancel(proxy, pid, secret):
    """A raw 16-byte CancelRequest; the proxy answers by closing the socket."""
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        sock.sendall(struct.pack("!IIiI", 16, CANCEL_REQUEST_CODE, pid, secret))
        assert sock.recv(1) == b""


def run_in_thread(fn):
    """Run fn() in a thread; returns a dict that gets 'result' or 'error', and the thread."""
    out = {}

    def target():
        start = time.monotonic()
        try:
            out["result"] = fn()
        except BaseException as exc:
            out["error"] = exc
        out["elapsed"] = time.monotonic() - start
    th = threading.Thread(target=target, daemon=True)
    th.start()
    return out, th


def cancel_a_long_query(conn, cancel, **kwargs):
    """cancel(**kwargs) half a second into a 30 s query: it ends with QueryCanceled within
    5 s."""
    timer = threading.Timer(0.5, cancel, kwargs=kwargs)
    timer.start()
    start = time.monotonic()
    try:
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
    finally:
        timer.cancel()
    assert time.monotonic() - start < 5


def test_cancel_long_query(proxy_process_factory):
    proxy = proxy_process_factory()
    with connect(proxy) as conn:
        cancel_a_long_query(conn, conn.cancel)
        # The session keeps working, also inside a transaction.
        assert conn.execute("SELECT 'still here'").fetchone() == ("still here",)
        with conn.transaction():
            assert conn.execute("SELECT 2").fetchone() == (2,)


def test_cancel_safe_in_process(proxy):
    # psycopg's non-blocking cancel works against the in-process proxy, whose stats we see.
    with connect(proxy) as conn:
        cancel_a_long_query(conn, conn.cancel_safe, timeout=5)
        assert conn.execute("SELECT 'still here'").fetchone() == ("still here",)
    assert proxy.stats()["CancelRequests"] == 1


def test_cancel_inside_transaction(proxy_process_factory):
    proxy = proxy_process_factory()
    with psycopg.connect(proxy.dsn(APP_USER, APP_PASSWORD, APP_DB), connect_timeout=10) as conn:
        conn.execute("SELECT 1")
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
        conn.rollback()
        assert conn.execute("SELECT 3").fetchone() == (3,)
        conn.commit()


def test_cancel_with_wrong_key_does_nothing(proxy):
    with connect(proxy) as victim:
        pid = victim.info.backend_pid        # the proxy's per-client key, not a server pid
        out, th = run_in_thread(lambda: victim.execute("SELECT pg_sleep(1.5), 'done'").fetchone())
        time.sleep(0.4)
        before = proxy.stats()["CancelRequests"]
        # Right pid, wrong secrets; and an unknown pid.
        for _ in range(3):
            send_cancel(proxy, pid, random.getrandbits(32))
        send_cancel(proxy, (pid % 0x7FFFFFFE) + 1, random.getrandbits(32))
        send_cancel(proxy, 0, 0)
        th.join(10)
        assert "error" not in out, out.get("error")
        assert out["result"] == ("", "done")
        assert out["elapsed"] >= 1.4
        assert proxy.stats()["CancelRequests"] == before + 5
        assert victim.execute("SELECT 1").fetchone() == (1,)


def test_cancel_idle_client_does_not_hit_others(proxy_process_factory):
    # One server connection for everybody: the idle client's last connection is the one
    # the sleeper is using now, so a proxy that remembered it would cancel the wrong query.
    proxy = proxy_process_factory(max_connections_percent=2)
    with connect(proxy) as idle, connect(proxy) as sleeper:
        assert idle.execute("SELECT 1").fetchone() == (1,)
        out, th = run_in_thread(lambda: sleeper.execute("SELECT pg_sleep(2), 'slept'").fetchone())
        time.sleep(0.5)
        idle.cancel()
        time.sleep(0.2)
        idle.cancel()
        th.join(10)
        assert "error" not in out, out.get("error")
        assert out["result"] == ("", "slept")
        assert idle.execute("SELECT 'idle ok'").fetchone() == ("idle ok",)
        assert sleeper.execute("SELECT 'sleeper ok'").fetchone() == ("sleeper ok",)


def test_asyncpg_cancellation(proxy):
    async def main():
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user=APP_USER,
                                     password=APP_PASSWORD, database=APP_DB, ssl=False, timeout=10)
        try:
            start = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(conn.fetch("select pg_sleep(10)"), 0.5)
            # The cancel reached the server: the connection is usable quickly.
            value = await asyncio.wait_for(conn.fetchval("select 'usable'"), 5)
            elapsed = time.monotonic() - start
            async with conn.transaction():
                await conn.execute("select 1")
            return value, elapsed
        finally:
            await conn.close()

    value, elapsed = run(main(), timeout=30)
    assert value == "usable"
    assert elapsed < 5
    wait_until(lambda: proxy.stats()["pool"]["borrowed"] == 0, timeout=5, message="nothing borrowed")


def test_a_cancel_in_flight_gets_no_message_when_the_proxy_stops(proxy_factory, pg_factory):
    """A CancelRequest's connection carries no protocol message back, only its close
    (libpq 17+'s non-blocking cancel reports any byte as a failure), also when the proxy
    shuts down before PostgreSQL has taken the cancel: its postmaster is stopped here, so
    the cancel stays in flight."""
    cluster = pg_factory(max_connections=20)
    cluster.create_user(APP_USER, APP_PASSWORD)
    cluster.create_database(APP_DB, owner=APP_USER)
    proxy = proxy_factory(cluster, client_auth="POSTGRES_MD5")
    key = []
    session = md5_session(proxy.host, proxy.port, APP_USER, APP_PASSWORD, APP_DB,
                          backend_key=key)
    (pid, secret), = key
    query = b"SELECT pg_sleep(30)\0"
    session.sendall(b"Q" + struct.pack("!i", len(query) + 4) + query)
    wait_until(lambda: proxy.stats()["pool"]["borrowed"] == 1)
    with open(os.path.join(cluster.data_dir, "postmaster.pid")) as f:
        postmaster = int(f.readline())
    os.kill(postmaster, signal.SIGSTOP)
    try:
        with socket.create_connection((proxy.host, proxy.port), timeout=10) as cancel:
            cancel.sendall(struct.pack("!IIiI", 16, CANCEL_REQUEST_CODE, pid, secret))
            wait_until(lambda: proxy.stats()["CancelRequests"] == 1)
            proxy.stop()
            received = b""
            while chunk := cancel.recv(4096):
                received += chunk
        assert received == b""
    finally:
        os.kill(postmaster, signal.SIGCONT)
        session.close()
