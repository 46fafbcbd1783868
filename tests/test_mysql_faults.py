"""The MySQL engine when things go wrong: malformed and oversized packets, clients that
break off mid-session in every way, a server connection killed from outside, and a server
restart under an idle pool; the pool's counts stay exact and bystanders carry on.
"""
from __future__ import annotations

import socket
import threading
import time

import pymysql
import pytest

from harness import (APP_DB, APP_PASSWORD as APP_PW, APP_USER as APP,
                     MARIADB_MAX_CONNECTIONS as MAX_CONNECTIONS, connect, scalar)
from rdsproxy.devservers.mariadb import MariaDBServer
from rdsproxy.engines.mysql import protocol as p
from utils import log_in, wait_until


# --- robustness ---------------------------------------------------------------------------

def raw_login(px, **kw):
    return log_in(px.port, APP, APP_PW, APP_DB, **kw)


def test_malformed_and_oversized_packets(make_proxy):
    px = make_proxy(top={"max_message_size": 1 << 20})
    bystander = connect(px)
    try:
        s = raw_login(px)
        # Malformed commands get an error; the session goes on.
        for payload, code in ((b"\x17\x01", 1835), (b"\x08", 1047), (b"\x17" + b"\x09" * 12, 1243)):
            tracker, _ = s.command(payload)
            assert tracker.error is not None and tracker.error.code == code, payload
        assert s.scalar("SELECT 1") == b"1"
        # An oversized packet: error 1153, then the connection is closed.
        s.sock.sendall(p.packet(0, b"\x03SELECT '" + b"x" * (2 << 20) + b"'"))
        seq, payload = s.recv_packet()
        assert p.ErrPacket.parse(payload).code == 1153
        try:
            assert s.sock.recv(10) == b""
        except ConnectionResetError:
            pass                 # closed with the rest of the packet unread: a reset
        s.sock.close()
        # Garbage instead of a handshake response.
        with socket.create_connection((px.host, px.port), timeout=5) as raw:
            raw.recv(1024)
            raw.sendall(p.packet(1, b"\x00\x00"))
            data = raw.recv(1024)
            assert data[4:5] == b"\xff"
        assert scalar(bystander, "SELECT 11") == 11
        assert px.stats()["ProtocolErrors"] >= 4
        deadline = time.monotonic() + 5
        while px.stats()["pool"]["borrowed"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert px.stats()["pool"]["borrowed"] == 0          # nothing leaked
    finally:
        bystander.close()


def malformed_session(px, kind: str) -> None:
    """One client that goes wrong in the way `kind` says, holding a server connection
    (a transaction) where it can."""
    s = raw_login(px)
    try:
        if kind != "garbage_idle":
            s.command(p.com_query("BEGIN"))
            s.command(p.com_query("INSERT INTO t (v) VALUES ('malformed')"))
        if kind == "oversized":
            s.sock.sendall(p.packet(0, b"\x03SELECT '" + b"x" * (2 << 20) + b"'"))
        elif kind == "out_of_order":
            s.sock.sendall(p.packet(5, p.com_query("SELECT 1")))
        elif kind == "half_packet":
            s.sock.sendall(p.packet(0, p.com_query("SELECT 1"))[:6])
        elif kind == "bad_execute":
            s.command(b"\x17" + b"\x09" * 12)
        elif kind == "running":
            s.sock.sendall(p.packet(0, p.com_query("SELECT SLEEP(5)")))
            time.sleep(0.1)
        elif kind == "quit":
            s.sock.sendall(p.packet(0, p.com_quit()))
        elif kind == "change_user":
            s.sock.sendall(p.packet(0, b"\x11" + b"\x00" * 3))
            time.sleep(0.05)
        elif kind == "local_infile_abort":
            s.sock.sendall(p.packet(0, p.com_query("LOAD DATA LOCAL INFILE 'x' INTO TABLE t (v)")))
            time.sleep(0.1)
        elif kind == "prepare_then_vanish":
            s.sock.sendall(p.packet(0, p.com_stmt_prepare("SELECT ?")))
        elif kind == "garbage_idle":
            s.sock.sendall(p.packet(0, b"\xfe\xfe\xfe"))
            s.sock.sendall(b"\xff" * 7)
    except OSError:
        pass
    finally:
        s.sock.close()


MALFORMED_KINDS = ["oversized", "out_of_order", "half_packet", "bad_execute", "running",
                   "quit", "garbage_idle", "change_user", "local_infile_abort",
                   "prepare_then_vanish"]


def test_malformed_sessions_give_back_exactly_what_they_borrowed(make_proxy, mariadb):
    """After any mix of broken sessions the pool's counts are exact: nothing borrowed,
    nothing counted twice, and no row of theirs committed."""
    px = make_proxy(budget=3, top={"max_message_size": 1 << 20}, connection_borrow_timeout=2)
    seen = []
    for round_ in range(2):
        for kind in MALFORMED_KINDS:
            malformed_session(px, kind)
            seen.append((kind, px.stats()["pool"]["borrowed"]))
    # The same while every connection is busy: the broken clients wait, then vanish.
    holders = [connect(px) for _ in range(3)]
    for holder in holders:
        holder.begin()
        scalar(holder, "SELECT 1")
    threads = [threading.Thread(target=malformed_session, args=(px, kind))
               for kind in MALFORMED_KINDS]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    for holder in holders:
        holder.rollback()
        holder.close()
    for thread in threads:
        thread.join(30)
        seen.append(("waiting", px.stats()["pool"]["borrowed"]))
    assert min(borrowed for _, borrowed in seen) >= 0, " ".join(f"{k}:{b}" for k, b in seen)
    deadline = time.monotonic() + 15
    while px.stats()["pool"]["borrowed"] and time.monotonic() < deadline:
        time.sleep(0.05)
    pool = px.stats()["pool"]
    assert pool["borrowed"] == 0 and 0 <= pool["open"] <= pool["max"], pool
    with connect(px) as c:
        assert scalar(c, "SELECT COUNT(*) FROM t WHERE v = 'malformed'") == 0


def kill_server_connection_of(mariadb, client) -> int:
    """KILL the server connection that answers `client`'s next statement; its thread id
    (@@pseudo_thread_id is the server's; CONNECTION_ID() answers the proxy's id for the
    client). Only that one: the process list also shows the proxy's health checks, which
    come and go (a KILL of one just gone fails)."""
    victim = scalar(client, "SELECT @@pseudo_thread_id")
    mariadb.sql(f"KILL {victim}")
    return victim


def test_server_connection_killed_from_outside(make_proxy, mariadb):
    px = make_proxy(budget=2)
    with connect(px) as a:
        victim = kill_server_connection_of(mariadb, a)   # idle in the pool
        # Sent once the proxy has dropped it: a statement that reached the dead connection
        # first could not be told from one killed while running (MariaDB closes without a
        # word either way), and its client would rightly get the error.
        wait_until(lambda: px.stats()["pool"]["open"] == 0, message="dead connection dropped")
        assert scalar(a, "SELECT 2") == 2                # a fresh connection
        assert scalar(a, "SELECT @@pseudo_thread_id") != victim
        a.begin()
        with a.cursor() as cur:
            cur.execute("INSERT INTO t (v) VALUES ('lost')")
        kill_server_connection_of(mariadb, a)            # the transaction's
        with pytest.raises(pymysql.MySQLError):
            scalar(a, "SELECT 3")                        # the transaction is gone: said so
    with connect(px) as b:
        assert scalar(b, "SELECT COUNT(*) FROM t WHERE v = 'lost'") == 0
    assert px.stats()["pool"]["borrowed"] == 0

# --- a server restart ---------------------------------------------------------------------

def test_read_only_statement_replayed_across_a_server_restart(make_proxy):
    """The server dies under an idle pool; a SELECT sent meanwhile waits for the health
    checks and runs once the server is back, instead of failing."""
    server = MariaDBServer(max_connections=MAX_CONNECTIONS).start()
    try:
        server.create_user(APP, APP_PW)
        server.create_database(APP_DB, owner=APP)
        px = make_proxy(server=server, health_check_interval=0.2, health_check_timeout=1,
                        connection_borrow_timeout=30)
        with connect(px) as c:
            assert scalar(c, "SELECT 1") == 1            # leaves an idle pooled connection
            server.kill()
            result = {}

            def query():
                try:
                    result["value"] = scalar(c, "SELECT 42")
                except pymysql.MySQLError as exc:
                    result["error"] = exc
            th = threading.Thread(target=query)
            th.start()
            time.sleep(1.5)
            assert "value" not in result and "error" not in result     # held, not failed
            server.start()
            th.join(30)
            assert result.get("value") == 42, result
            assert scalar(c, "SELECT 43") == 43
            # Now the connection dies while the statement runs, before any answer: the
            # statement only reads, so it is sent again once the server is back.
            result.clear()
            th = threading.Thread(target=lambda: result.update(
                value=scalar(c, "SELECT SLEEP(1) + 44")))
            th.start()
            time.sleep(0.4)
            server.kill()
            time.sleep(1.0)
            assert "value" not in result
            server.start()
            th.join(30)
            assert result.get("value") == 44, result
    finally:
        server.stop()
