"""Bad input and broken peers: one client gets a clear error; the proxy, the pool and others carry on."""
from __future__ import annotations

import os
import random
import signal
import socket
import struct
import threading
import time

import psycopg
import pytest
from harness import APP_USER, Bystander, error_code, read_all, startup_packet
from rdsproxy.engines.postgres import protocol as pgproto
from rdsproxy.engines.postgres.held import request_did_not_run
from utils import wait_until


def connect_raw(proxy) -> socket.socket:
    return socket.create_connection((proxy.host, proxy.port), timeout=5)


def authenticated_raw(proxy) -> socket.socket:
    """A raw socket past authentication (md5 proxy, so it is one round trip)."""
    from rdsproxy.auth.md5 import md5_response
    sock = connect_raw(proxy)
    sock.sendall(startup_packet())
    reply = sock.recv(1024)
    assert reply[:1] == b"R" and struct.unpack("!i", reply[5:9])[0] == 5, reply
    salt = reply[9:13]
    password = md5_response("app-secret", APP_USER, salt) + b"\0"
    sock.sendall(b"p" + struct.pack("!i", len(password) + 4) + password)
    got = b""
    while not got.endswith(b"Z\0\0\0\x05I"):
        chunk = sock.recv(4096)
        assert chunk, got
        got += chunk
    return sock


@pytest.fixture
def md5_proxy(proxy_factory):
    return proxy_factory(client_auth="POSTGRES_MD5", max_connections_percent=5)


GARBAGE_STARTUPS = [
    ("absurd_length", b"\xff\xff\xff\xff" + b"x" * 100),
    ("length_too_small", struct.pack("!i", 3) + b"\0\0\0\0"),
    ("bad_version", struct.pack("!ii", 8, 0x00020000)),
    ("odd_strings", struct.pack("!i", 17) + struct.pack("!i", 196608) + b"user\0app\0x\0"),
    # Random bytes (the same in every run) after a length that matches them: a whole
    # startup packet whose version and contents are noise.
    ("random", struct.pack("!i", 64) + random.Random(2026).randbytes(60)),
    ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
]


@pytest.mark.parametrize("name,payload", GARBAGE_STARTUPS, ids=[g[0] for g in GARBAGE_STARTUPS])
def test_garbage_before_startup_gets_an_error(md5_proxy, name, payload):
    with Bystander(md5_proxy):
        sock = connect_raw(md5_proxy)
        sock.sendall(payload)
        reply = read_all(sock)
        sock.close()
        assert reply[:1] == b"E", reply
        assert error_code(reply) in ("08P01", "0A000", "28000")
    # (psycopg prepares repeated statements, so the bystander was pinned: its connection is
    # reset with DISCARD ALL after it leaves, which takes a moment.)
    wait_until(lambda: md5_proxy.stats()["pool"]["borrowed"] == 0, message="nothing leaked")


@pytest.mark.parametrize("name,payload", [
    ("length_3", b"Q\0\0\0\x03"),
    ("over_1GiB", b"Q\x7f\xff\xff\xff"),
    ("negative", b"Q\x80\0\0\0"),
], ids=["length_3", "over_1GiB", "negative"])
def test_bad_message_length_after_login(md5_proxy, name, payload):
    with Bystander(md5_proxy):
        sock = authenticated_raw(md5_proxy)
        sock.sendall(payload)
        reply = read_all(sock)
        sock.close()
        assert error_code(reply) == "08P01", reply
    assert md5_proxy.stats()["ProtocolErrors"] >= 1
    wait_until(lambda: md5_proxy.stats()["pool"]["borrowed"] == 0, message="nothing leaked")


def test_wrong_message_during_authentication(md5_proxy):
    sock = connect_raw(md5_proxy)
    sock.sendall(startup_packet())
    sock.recv(1024)
    sock.sendall(b"Q\0\0\0\x0dselect 1\0")  # a query instead of a password
    reply = read_all(sock)
    assert error_code(reply) == "08P01"


def test_truncated_message_then_disconnect_does_not_leak(md5_proxy):
    with Bystander(md5_proxy):
        for _ in range(5):
            sock = authenticated_raw(md5_proxy)
            sock.sendall(b"Q\0\0\0\x64select ")  # announces 100 bytes, sends 7, vanishes
            time.sleep(0.1)
            sock.close()
    wait_until(lambda: md5_proxy.stats()["pool"]["borrowed"] == 0, message="no leak")
    stats = md5_proxy.stats()
    assert stats["pool"]["open"] <= stats["pool"]["max"]


def test_client_vanishing_mid_transaction_is_rolled_back(proxy_factory, pg):
    proxy = proxy_factory(max_connections_percent=2)
    pg.psql("create table if not exists vanish(a int); grant all on vanish to app", dbname="appdb")
    conn = psycopg.connect(proxy.dsn())
    conn.execute("insert into vanish values (1)")  # open transaction, not committed
    pid = conn.execute("select pg_backend_pid()").fetchone()[0]
    os.close(conn.fileno())  # abrupt: no Terminate message
    wait_until(lambda: proxy.stats()["pool"]["borrowed"] == 0, message="connection returned")
    state = pg.psql(f"select state from pg_stat_activity where pid = {pid}")
    assert state == "idle", f"returned connection is {state!r}"
    with psycopg.connect(proxy.dsn(), autocommit=True) as other:
        assert other.execute("select pg_backend_pid()").fetchone()[0] == pid  # reused, clean
        assert other.execute("select count(*) from vanish").fetchone()[0] == 0


def test_client_vanishing_mid_query_frees_the_budget(proxy_factory):
    proxy = proxy_factory(client_auth="POSTGRES_MD5", max_connections_percent=2,
                          connection_borrow_timeout=10)  # budget 1
    sock = authenticated_raw(proxy)
    sql = b"select pg_sleep(1)\0"
    sock.sendall(b"Q" + struct.pack("!i", len(sql) + 4) + sql)
    wait_until(lambda: proxy.stats()["pool"]["borrowed"] == 1, message="query running")
    sock.close()  # gone while its results are still to come: that connection cannot be reused
    with psycopg.connect(proxy.dsn(), autocommit=True) as other:
        assert other.execute("select 1").fetchone() == (1,)
    wait_until(lambda: proxy.stats()["pool"]["borrowed"] == 0, message="budget freed")


def test_backend_killed_mid_query(proxy, pg):
    with Bystander(proxy):
        conn = psycopg.connect(proxy.dsn(), autocommit=True)

        def kill_the_sleeper():
            # Multiplexed: only the backend running the sleep is this client's right now.
            sql = ("select pg_terminate_backend(pid) from pg_stat_activity "
                   "where query = 'select pg_sleep(10)' and state = 'active'")
            wait_until(lambda: pg.psql(sql) == "t", message="sleeping backend killed")
        killer = threading.Thread(target=kill_the_sleeper)
        killer.start()
        with pytest.raises(psycopg.OperationalError, match="administrator command"):
            conn.execute("select pg_sleep(10)")
        killer.join()
        # The target stayed healthy, so the killed statement is reported, not run again.
        assert proxy.stats()["RequestsReplayed"] == 0
        # Outside a transaction the client keeps its proxy connection and carries on.
        assert conn.execute("select 1").fetchone() == (1,)
        conn.close()
        with psycopg.connect(proxy.dsn(), autocommit=True) as fresh:
            assert fresh.execute("select 1").fetchone() == (1,)
    wait_until(lambda: proxy.stats()["pool"]["borrowed"] == 0, message="pool recovered")


def test_backend_killed_inside_transaction_closes_that_client(proxy, pg):
    conn = psycopg.connect(proxy.dsn())
    pid = conn.execute("select pg_backend_pid()").fetchone()[0]
    pg.psql(f"select pg_terminate_backend({pid})")
    with pytest.raises(psycopg.OperationalError):
        conn.execute("select 1")
    conn.close()
    wait_until(lambda: proxy.stats()["pool"]["borrowed"] == 0, message="pool recovered")
    with psycopg.connect(proxy.dsn(), autocommit=True) as fresh:
        assert fresh.execute("select 1").fetchone() == (1,)


def test_idle_pooled_connection_killed_is_replaced(proxy, pg):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        pid = conn.execute("select pg_backend_pid()").fetchone()[0]
        pg.psql(f"select pg_terminate_backend({pid})")  # idle in the pool now
        wait_until(lambda: proxy.stats()["pool"]["idle"] == 0, message="dead idle connection dropped")
        assert conn.execute("select pg_backend_pid()").fetchone()[0] != pid


_BIND_EXECUTE_SYNC = [pgproto.message(b"B", b"\x00s1\x00" + bytes(6)),
                      pgproto.message(b"E", bytes(5)) + pgproto.message(b"S")]
_TERMINATED = pgproto.error_response("57P01", "terminating connection due to administrator "
                                     "command", severity="FATAL")


@pytest.mark.parametrize("request_chunks,answer,did_not_run", [
    (_BIND_EXECUTE_SYNC, [_TERMINATED], True),
    ([_BIND_EXECUTE_SYNC[0][:9]], [_TERMINATED], True),   # the rest still to come
    (_BIND_EXECUTE_SYNC, [pgproto.message(b"2"), _TERMINATED], False),   # bound: it ran
    (_BIND_EXECUTE_SYNC, [], False),                      # gone without a word: a crash
    (_BIND_EXECUTE_SYNC, [pgproto.error_response("08P01", "invalid message", severity="FATAL")],
     False),                                              # what it read was refused
    ([pgproto.query("insert into t values (1)")], [_TERMINATED], False),
], ids=["fatal_only", "partial_request", "answer_began", "no_fatal", "refused", "simple_query"])
def test_what_proves_a_request_did_not_run(request_chunks, answer, did_not_run):
    assert request_did_not_run(request_chunks, answer or None) is did_not_run


def send_to_a_backend_dying_unread(proxy, pg, conn, request):
    """`request(conn)`'s outcome (its result, or the error it raised) when the idle pooled
    connection it is sent on belongs to a backend already told to terminate: the backend is
    stopped while pg_terminate_backend signals it and continued once the proxy has written
    the request, so it ends with its FATAL before reading a byte of it, and the proxy learns
    of the death only from that answer. Returns (outcome, the terminated backend's pid)."""
    pid = conn.execute("select pg_backend_pid()").fetchone()[0]
    wait_until(lambda: proxy.stats()["pool"]["borrowed"] == 0, message="connection idle")
    outcome = []

    def send():
        try:
            outcome.append(request(conn))
        except psycopg.Error as exc:
            outcome.append(exc)
    os.kill(pid, signal.SIGSTOP)
    try:
        pg.psql(f"select pg_terminate_backend({pid})")
        sender = threading.Thread(target=send)
        sender.start()
        wait_until(lambda: proxy.stats()["pool"]["borrowed"] == 1, message="request written")
    finally:
        os.kill(pid, signal.SIGCONT)
    sender.join(30)
    assert outcome, "no answer"
    return outcome[0], pid


@pytest.mark.parametrize("prepare", [True, False], ids=["named", "unnamed"])
def test_extended_request_on_a_connection_found_dead_is_sent_again(proxy_factory, pg, prepare):
    """The only answer to the request is the FATAL of a backend that had not read it (an
    extended-protocol request is answered message by message, and what is answered comes
    before a FATAL): nothing of it ran, so it goes to a fresh connection, unnoticed."""
    proxy = proxy_factory(max_connections_percent=2)   # budget 1
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("select %s::int + 1", (1,), prepare=prepare).fetchone() == (2,)
        outcome, pid = send_to_a_backend_dying_unread(
            proxy, pg, conn,
            lambda c: c.execute("select %s::int + 1", (2,), prepare=prepare).fetchone())
        assert outcome == (3,)
        assert proxy.stats()["RequestsReplayed"] == 1
        assert conn.execute("select pg_backend_pid()").fetchone()[0] != pid
        assert conn.execute("select %s::int + 1", (3,), prepare=prepare).fetchone() == (4,)
    assert proxy.stats()["SessionPinReasons"] == {}


def test_simple_query_on_a_connection_found_dead_is_not_sent_again(proxy_factory, pg):
    """A simple Query gets no answer before it runs, so a FATAL alone does not prove that it
    did not: the client hears the server's error, as it would directly, and carries on."""
    proxy = proxy_factory(max_connections_percent=2)   # budget 1
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        outcome, _ = send_to_a_backend_dying_unread(
            proxy, pg, conn, lambda c: c.execute("select 2 + 1").fetchone())
        assert isinstance(outcome, psycopg.errors.AdminShutdown), outcome
        assert proxy.stats()["RequestsReplayed"] == 0
        assert conn.execute("select 1").fetchone() == (1,)


def test_pinned_client_whose_backend_dies_leaves_no_pinned_count(proxy, pg):
    conn = psycopg.connect(proxy.dsn(), autocommit=True)
    conn.execute("CREATE TEMP TABLE pinned_here (a int)")  # pins
    assert proxy.stats()["pinned_sessions"] == 1
    pid = conn.execute("select pg_backend_pid()").fetchone()[0]
    pg.psql(f"select pg_terminate_backend({pid})")
    with pytest.raises(psycopg.OperationalError):  # its session state is gone: told and closed
        conn.execute("select * from pinned_here")
    conn.close()
    wait_until(lambda: proxy.stats()["pinned_sessions"] == 0, message="pinned gauge back to 0")
    wait_until(lambda: proxy.stats()["pool"]["borrowed"] == 0, message="pool recovered")
