"""The MySQL engine end to end: a throwaway MariaDB 10.11, the proxy in a thread, real clients
(PyMySQL, the `mariadb` command-line client, and the sans-IO test client in utils.py for
the binary protocol and raw packets).

The session MariaDB serves the module; proxies are made per test (they are cheap) so that each
test chooses its pool budget: `budget=1` puts every client on the same server connection,
which is what the state-leak and prepared-statement tests need.
"""
from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time

import pymysql
import pytest
from pymysql.constants import CLIENT

from harness import (APP_DB, APP_PASSWORD as APP_PW, APP_USER as APP,
                     MARIADB_MAX_CONNECTIONS as MAX_CONNECTIONS, OTHER_PASSWORD as OTHER_PW,
                     OTHER_USER as OTHER)
from rdsproxy.engines.mysql import protocol as p
from rdsproxy.devservers.mariadb import MariaDBServer
from rdsproxy.engines.mysql.server_login import ChangeUserLogin
from utils import log_in


@pytest.fixture
def make_proxy(proxy_factory, mariadb):
    """make(budget=N or max_connections_percent=..., client_auth=..., top={...}, tls=...,
    iam_auth=... (for APP only), server=..., ...): a MySQL proxy, once its first health
    check has told it the budget."""
    def make(budget=None, iam_auth=None, server=None, **options):
        server = server or mariadb
        if budget is not None:
            options["max_connections_percent"] = budget * 100 // server.max_connections
        running = proxy_factory(server, engine="mysql",
                                iam_auth={APP: iam_auth} if iam_auth else None, **options)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if running.stats()["pool"]["max"] > 1 or budget == 1:
                break
            time.sleep(0.02)
        return running

    return make


def connect(px, user=APP, password=APP_PW, database=APP_DB, **kw):
    kw.setdefault("autocommit", True)
    return pymysql.connect(host=px.host, port=px.port, user=user, password=password,
                           database=database, connect_timeout=10, read_timeout=30, **kw)


def scalar(conn, sql, args=None):
    with conn.cursor() as cur:
        cur.execute(sql, args)
        row = cur.fetchone()
        return row[0] if row is not None else None


def proxy_connections(mariadb, user=APP) -> int:
    """Server connections from the proxy (the health check's are not pool connections)."""
    return sum(1 for row in mariadb.processlist()
               if row["user"] == user and "rdsproxy-health" not in row["info"])


def engine(px):
    return px.proxy.engine


# --- authentication -----------------------------------------------------------------------

def test_native_password_login_and_proxy_ids(make_proxy, mariadb):
    px = make_proxy()
    with connect(px) as c:
        assert scalar(c, "SELECT 1") == 1
        assert "MariaDB" in c.get_server_info()
        # The id the client sees is the proxy's, also through CONNECTION_ID().
        assert scalar(c, "SELECT CONNECTION_ID()") == c.thread_id()
        assert engine(px).by_id[c.thread_id()].user == APP
        assert scalar(c, "SELECT DATABASE()") == APP_DB


def test_wrong_password_and_unknown_user_get_1045(make_proxy):
    px = make_proxy()
    for user, password in ((APP, "wrong"), ("nobody", "x")):
        with pytest.raises(pymysql.err.OperationalError) as info:
            connect(px, user=user, password=password)
        code, text = info.value.args
        assert code == 1045
        assert text == f"Access denied for user '{user}'@'127.0.0.1' (using password: YES)"
    assert px.stats()["ClientConnectionsSetupFailedAuth"] == 2


def test_unknown_database_refused_at_login(make_proxy):
    px = make_proxy()
    with pytest.raises(pymysql.err.OperationalError) as info:
        connect(px, database="nosuchdb")
    assert info.value.args[0] in (1044, 1049)


def test_caching_sha2_fast_auth_from_the_first_login(make_proxy):
    """The proxy knows the password: a scramble it verifies is a success, so no login asks
    for the password itself (not even the first one after a start)."""
    px = make_proxy(client_auth="MYSQL_CACHING_SHA2_PASSWORD")
    for n in (2, 3):
        with connect(px) as c:
            assert scalar(c, f"SELECT {n}") == n
    with pytest.raises(pymysql.err.OperationalError) as info:
        connect(px, password="wrong")
    assert info.value.args[0] == 1045


def raw_sha2_login(px, password: str) -> int:
    """Log in with an empty scramble, as a client with nothing to scramble does: the proxy
    asks for full authentication, the client asks for its RSA key and sends the password
    encrypted with it. The first byte of the final answer (0 OK, 0xFF ERR)."""
    from rdsproxy.auth import mysql as auth
    reader = p.PacketReader()

    def read(sock):
        while True:
            packets = reader.feed(sock.recv(65536))
            if packets:
                return packets[0]

    with socket.create_connection((px.host, px.port), timeout=10) as sock:
        seq, payload = read(sock)
        hello = p.Handshake.parse(payload)
        login = p.HandshakeResponse(capabilities=p.SUPPORTED_CAPABILITIES & ~p.CLIENT_SSL & 0xFFFFFFFF,
                                    username=APP,
                                    auth_response=b"", database=APP_DB,
                                    auth_plugin_name=auth.CACHING_SHA2_PASSWORD)
        sock.sendall(p.packet(seq + 1, login.build()))
        seq, payload = read(sock)
        assert payload == bytes((1, auth.CACHING_SHA2_PERFORM_FULL_AUTH))
        sock.sendall(p.packet(seq + 1, bytes((auth.CACHING_SHA2_REQUEST_PUBLIC_KEY,))))
        seq, payload = read(sock)
        encrypted = auth.rsa_encrypt_password(password, hello.auth_plugin_data, payload[1:])
        sock.sendall(p.packet(seq + 1, encrypted))
        return read(sock)[1][0]


def test_caching_sha2_full_authentication_with_rsa(make_proxy):
    px = make_proxy(client_auth="MYSQL_CACHING_SHA2_PASSWORD")
    assert raw_sha2_login(px, APP_PW) == 0
    assert raw_sha2_login(px, "wrong") == 0xFF


def test_tls_require_tls_and_caching_sha2_over_tls(make_proxy, test_ca):
    px = make_proxy(client_auth="MYSQL_CACHING_SHA2_PASSWORD", top={"require_tls": True},
                    tls={"cert_file": test_ca.server_cert, "key_file": test_ca.server_key})
    with pytest.raises(pymysql.err.OperationalError) as info:
        connect(px, ssl_disabled=True)
    assert info.value.args[0] == 3159
    # Full authentication over TLS sends the password in clear inside TLS.
    with connect(px, ssl={"ca": test_ca.ca_cert}) as c:
        assert scalar(c, "SELECT 5") == 5
        assert scalar(c, "SELECT 6") == 6
    assert px.stats()["ClientConnectionsTLS"] == 1


@pytest.mark.parametrize("client_auth", ["MYSQL_NATIVE_PASSWORD", "MYSQL_CACHING_SHA2_PASSWORD"])
def test_mariadb_command_line_client(make_proxy, client_auth):
    """Debian's client on a fresh proxy, as the README's quick start runs it: the very first
    login must work (libmariadb would send the password in clear if asked for it)."""
    px = make_proxy(client_auth=client_auth)
    out = subprocess.run(
        ["mariadb", "--no-defaults", "-h", "127.0.0.1", "-P", str(px.port), "-u", APP,
         f"-p{APP_PW}", APP_DB, "--batch", "--skip-column-names", "-e",
         "SELECT 40 + 2; SELECT v FROM t ORDER BY id LIMIT 1; SELECT DATABASE()"],
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["42", "a", APP_DB]


# --- relaying -----------------------------------------------------------------------------

def test_transactions_hold_and_release(make_proxy, mariadb):
    px = make_proxy(budget=4)
    with connect(px) as a, connect(px) as b:
        a.begin()
        with a.cursor() as cur:
            cur.execute("INSERT INTO t (v) VALUES ('tx')")
        assert px.stats()["pool"]["borrowed"] == 1        # held by the open transaction
        assert scalar(b, "SELECT COUNT(*) FROM t WHERE v = 'tx'") == 0
        a.rollback()
        assert px.stats()["pool"]["borrowed"] == 0
        assert scalar(b, "SELECT COUNT(*) FROM t WHERE v = 'tx'") == 0
        a.begin()
        with a.cursor() as cur:
            cur.execute("INSERT INTO t (v) VALUES ('tx')")
        a.commit()
        assert scalar(b, "SELECT COUNT(*) FROM t WHERE v = 'tx'") == 1
        scalar(b, "DELETE FROM t WHERE v = 'tx'")


def test_autocommit_off_keeps_connection_until_commit(make_proxy):
    px = make_proxy(budget=4)
    with connect(px, autocommit=False) as a, connect(px) as b:
        with a.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM t")
            assert px.stats()["pool"]["borrowed"] == 1
            cur.execute("INSERT INTO t (v) VALUES ('ac0')")
        assert scalar(b, "SELECT COUNT(*) FROM t WHERE v = 'ac0'") == 0
        a.commit()
        assert px.stats()["pool"]["borrowed"] == 0
        assert scalar(b, "SELECT COUNT(*) FROM t WHERE v = 'ac0'") == 1
        scalar(b, "DELETE FROM t WHERE v = 'ac0'")


def test_multi_statements_and_results(make_proxy):
    px = make_proxy()
    with connect(px, client_flag=CLIENT.MULTI_STATEMENTS) as c, c.cursor() as cur:
        cur.execute("SELECT 1; SELECT 'x', 'y'; UPDATE t SET v = v WHERE id = 1; SELECT 3")
        results = [tuple(cur.fetchall())]
        while cur.nextset():
            results.append(tuple(cur.fetchall()))
        assert results == [((1,),), (("x", "y"),), (), ((3,),)]
        assert scalar(c, "SELECT 4") == 4


def test_field_list_statistics_ping_init_db(make_proxy):
    px = make_proxy()
    s = log_in(px.port, APP, APP_PW, APP_DB)
    try:
        tracker, packets = s.command(p.com_field_list("t"))
        assert tracker.error is None and len(packets) >= 2
        tracker, packets = s.command(p.com_statistics())
        assert b"Uptime" in packets[0]
        tracker, _ = s.command(p.com_ping())
        assert tracker.error is None
        tracker, _ = s.command(p.com_init_db("mysql"))
        assert tracker.error is None
        assert s.scalar("SELECT DATABASE()") == b"mysql"
    finally:
        s.close()


def test_local_infile(make_proxy, tmp_path):
    px = make_proxy()
    data = tmp_path / "rows.tsv"
    data.write_text("infile1\ninfile2\n")
    with connect(px, local_infile=True) as c, c.cursor() as cur:
        cur.execute(f"LOAD DATA LOCAL INFILE '{data}' INTO TABLE t (v)")
        assert cur.rowcount == 2
        assert scalar(c, "SELECT COUNT(*) FROM t WHERE v LIKE 'infile%'") == 2
        cur.execute("DELETE FROM t WHERE v LIKE 'infile%'")


# --- prepared statements -------------------------------------------------------------------

def prepare(s, sql):
    tracker, packets = s.command(p.com_stmt_prepare(sql))
    assert tracker.error is None, tracker.error
    return tracker.prepare_ok


def execute(s, stmt_id, params=(), *, types=True, ncols=1):
    payload = p.com_stmt_execute(stmt_id, params)
    if not types and params:
        ex = p.StmtExecute.parse(payload, len(params))
        payload = p.StmtExecute(ex.statement_id, ex.flags, 1, ex.null_bitmap, False, b"",
                                ex.values).build()
    tracker, packets = s.command(payload)
    assert tracker.error is None, tracker.error
    return packets


def binary_string(packets):
    """The first column of the single binary row, as a length-encoded string."""
    row = packets[-2]
    value, _ = p.read_lenenc_str(row, 2)
    return value


def binary_longlong(packets):
    return int.from_bytes(packets[-2][2:10], "little", signed=True)


def test_prepared_statements_two_clients_one_connection(make_proxy, mariadb):
    px = make_proxy(budget=1)
    a = log_in(px.port, APP, APP_PW, APP_DB)
    b = log_in(px.port, APP, APP_PW, APP_DB)
    try:
        sa = prepare(a, "SELECT CONCAT('a:', ?)")
        sb = prepare(b, "SELECT ? * 2")
        assert sa.statement_id == sb.statement_id == 1     # each client's own ids
        sb2 = prepare(b, "SELECT CONCAT('a:', ?)")          # the same text as a's
        assert sb2.statement_id == 2
        for i in range(3):
            assert binary_string(execute(a, 1, [f"x{i}"])) == f"a:x{i}".encode()
            assert binary_longlong(execute(b, 1, [i + 10])) == 2 * (i + 10)
            # new_params_bound=0: the types a bound earlier, even though b's execute of the
            # shared server statement bound other types in between.
            assert binary_string(execute(b, 2, [7])) == b"a:7"
            assert binary_string(execute(a, 1, ["y"], types=False)) == b"a:y"
        assert proxy_connections(mariadb) == 1
        assert px.stats()["pinned_sessions"] == 0
        # Close on one client does not close the other's statement.
        a.sock.sendall(p.packet(0, p.com_stmt_close(1)))
        assert binary_string(execute(b, 2, ["z"])) == b"a:z"
        tracker, packets = a.command(p.com_stmt_execute(1, ["q"]))
        assert tracker.error is not None and tracker.error.code == 1243
        assert a.scalar("SELECT 1") == b"1"
    finally:
        a.close()
        b.close()


def test_prepared_statement_reprepared_on_another_connection(make_proxy):
    px = make_proxy(budget=3)
    a = log_in(px.port, APP, APP_PW, APP_DB)
    try:
        stmt = prepare(a, "SELECT v FROM t WHERE id = ?")
        pool = next(iter(engine(px).router.pools.values()))
        # Close every idle connection: the next execute borrows a fresh one.
        px.call(pool.close_idle)
        assert binary_string(execute(a, stmt.statement_id, [2])) == b"b"
        # A cursor keeps the connection until it is exhausted.
        tracker, _ = a.command(p.com_stmt_execute(stmt.statement_id, [3],
                                                  flags=p.CURSOR_TYPE_READ_ONLY))
        assert tracker.error is None and tracker.cursor_open
        assert px.stats()["pool"]["borrowed"] == 1
        tracker, packets = a.command(p.com_stmt_fetch(stmt.statement_id, 10))
        assert tracker.error is None and len(packets) == 2
        assert px.stats()["pool"]["borrowed"] == 0
        # Long data: sent without an answer, used by the execute that follows.
        long_stmt = prepare(a, "SELECT CONCAT(?, '!')")
        a.sock.sendall(p.packet(0, p.com_stmt_send_long_data(long_stmt.statement_id, 0, b"abc" * 1000)))
        assert px.stats()["pool"]["borrowed"] == 1
        payload = p.com_stmt_execute(long_stmt.statement_id, [b""])
        assert binary_string(execute(a, long_stmt.statement_id, [b""]))[:6] == b"abcabc"
        del payload
    finally:
        a.close()


# --- session state ------------------------------------------------------------------------

def test_tracked_settings_never_leak(make_proxy, mariadb):
    px = make_proxy(budget=1)
    with connect(px) as a, connect(px) as b:
        default_tz = scalar(b, "SELECT @@time_zone")
        default_mode = scalar(b, "SELECT @@sql_mode")
        scalar(a, "SET time_zone = '+05:00', sql_mode = 'ANSI_QUOTES'")
        scalar(a, "SET NAMES latin1")
        scalar(a, "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        for _ in range(2):
            assert scalar(b, "SELECT @@time_zone") == default_tz
            assert scalar(b, "SELECT @@sql_mode") == default_mode
            assert scalar(b, "SELECT @@character_set_client") == "utf8mb4"
            assert scalar(b, "SELECT @@tx_isolation") == "REPEATABLE-READ"
            assert scalar(a, "SELECT @@time_zone") == "+05:00"
            assert scalar(a, "SELECT @@sql_mode") == "ANSI_QUOTES"
            assert scalar(a, "SELECT @@character_set_client") == "latin1"
            assert scalar(a, "SELECT @@tx_isolation") == "READ-COMMITTED"
        scalar(a, "SET time_zone = DEFAULT")
        assert scalar(a, "SELECT @@time_zone") == default_tz
        scalar(a, "USE mysql")
        assert scalar(a, "SELECT DATABASE()") == "mysql"
        assert scalar(b, "SELECT DATABASE()") == APP_DB
        assert proxy_connections(mariadb) == 1
    stats = px.stats()
    assert stats["SessionPinReasons"] == {} and stats["pinned_sessions"] == 0


def test_last_insert_id_and_row_count_are_the_clients_own(make_proxy):
    px = make_proxy(budget=1)
    with connect(px) as a, connect(px) as b:
        with a.cursor() as cur:
            cur.execute("INSERT INTO t (v) VALUES ('lid-a')")
            a_id = cur.lastrowid
        with b.cursor() as cur:
            cur.execute("INSERT INTO t (v) VALUES ('lid-b')")
            b_id = cur.lastrowid
        assert a_id != b_id
        assert scalar(a, "SELECT LAST_INSERT_ID()") == a_id
        assert scalar(b, "SELECT LAST_INSERT_ID()") == b_id
        assert scalar(a, "SELECT v FROM t WHERE id = LAST_INSERT_ID()") == "lid-a"
        scalar(a, "UPDATE t SET v = v WHERE v LIKE 'lid-%' OR id = 1")   # matched, unchanged
        scalar(b, "UPDATE t SET v = CONCAT(v, '') WHERE id > 0 AND v LIKE 'lid-%'")
        scalar(b, "DELETE FROM t WHERE v LIKE 'lid-%'")
        assert scalar(b, "SELECT ROW_COUNT()") == 2
        assert scalar(a, "SELECT ROW_COUNT()") == 0
    assert px.stats()["SessionPinReasons"] == {}


PIN_CASES = [
    ("SET @x = 1", "user_variable"),
    ("SELECT GET_LOCK('pin-test', 1)", "get_lock"),
    ("LOCK TABLES t READ", "lock_tables"),
    ("CREATE TEMPORARY TABLE tmp1 (a INT)", "temporary_table"),
    ("PREPARE s1 FROM 'SELECT 1'", "text_prepared_statement"),
    ("SELECT SQL_CALC_FOUND_ROWS * FROM t LIMIT 1", "found_rows"),
    ("/*!40101 SELECT 1 */", "executable_comment"),
    ("SET SESSION max_sp_recursion_depth = 3", "set_variable"),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "next_transaction_characteristics"),
    ("SELECT 'x'" + " " * 16400, "statement_over_16kb"),
    ("HANDLER t OPEN", "handler_statement"),
]


@pytest.mark.parametrize("sql,reason", PIN_CASES, ids=[r for _, r in PIN_CASES])
def test_pinning_rules_and_reset(make_proxy, mariadb, sql, reason):
    px = make_proxy(budget=1)
    with connect(px) as a:
        scalar(a, sql)
        stats = px.stats()
        assert stats["SessionPinReasons"] == {reason: 1}
        assert stats["pinned_sessions"] == 1 and stats["pool"]["borrowed"] == 1
        thread = int(scalar(a, "SELECT 1") and mariadb.processlist()[0]["id"])
        del thread
        if reason == "lock_tables":
            scalar(a, "UNLOCK TABLES")
    # The next client gets the same connection, reset: no variable, lock or table left.
    deadline = time.monotonic() + 5
    while px.stats()["pinned_sessions"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert px.stats()["pinned_sessions"] == 0
    with connect(px) as b:
        assert scalar(b, "SELECT 1") == 1
        assert px.stats()["SessionPinReasons"] == {reason: 1}
        assert scalar(b, "SELECT @x") is None
        assert scalar(b, "SELECT IS_USED_LOCK('pin-test')") is None
        with pytest.raises(pymysql.err.ProgrammingError):
            scalar(b, "SELECT * FROM tmp1")         # the temporary table is gone
        assert scalar(b, "SELECT @@max_sp_recursion_depth") == 0
    assert proxy_connections(mariadb) == 1


def test_exclude_variable_sets_filter(make_proxy):
    px = make_proxy(budget=1, session_pinning_filters=["EXCLUDE_VARIABLE_SETS"])
    with connect(px) as a:
        scalar(a, "SET SESSION max_sp_recursion_depth = 3")
        assert px.stats()["SessionPinReasons"] == {}


def test_reset_connection_and_change_user(make_proxy):
    px = make_proxy(budget=2)
    s = log_in(px.port, APP, APP_PW, APP_DB)
    try:
        s.query("SET @v = 5")
        assert s.scalar("SELECT @v") == b"5" and px.stats()["pinned_sessions"] == 1
        tracker, _ = s.command(p.com_reset_connection())
        assert tracker.error is None
        assert px.stats()["pinned_sessions"] == 0
        assert s.scalar("SELECT @v") is None
        change = ChangeUserLogin(OTHER, OTHER_PW, APP_DB, nonce=s.result.handshake.auth_plugin_data,
                                 capabilities=s.caps)
        s.sock.sendall(change.start())
        while not change.done:
            out = change.receive_data(s.sock.recv(65536))
            if out:
                s.sock.sendall(out)
        assert s.scalar("SELECT CURRENT_USER()") == b"other@%"
        bad = ChangeUserLogin(APP, "wrong", APP_DB, nonce=s.result.handshake.auth_plugin_data,
                              capabilities=s.caps)
        s.sock.sendall(bad.start())
        with pytest.raises(p.ServerError) as info:
            while not bad.done:
                out = bad.receive_data(s.sock.recv(65536))
                if out:
                    s.sock.sendall(out)
        assert info.value.code == 1045
    finally:
        s.close()


# --- KILL ---------------------------------------------------------------------------------

def test_kill_query_and_connection(make_proxy):
    px = make_proxy(budget=4)
    with connect(px) as a, connect(px) as b, connect(px) as c:
        result = {}
        other = {}
        bystander = threading.Thread(target=lambda: other.update(v=scalar(c, "SELECT SLEEP(1.5)")))
        bystander.start()

        def sleeper():
            try:
                result["value"] = scalar(a, "SELECT SLEEP(20)")
            except pymysql.MySQLError as exc:
                result["error"] = exc.args[0]
        started = time.monotonic()
        th = threading.Thread(target=sleeper)
        th.start()
        time.sleep(0.5)
        scalar(b, f"KILL QUERY {a.thread_id()}")
        th.join(10)
        assert time.monotonic() - started < 8
        # MariaDB's SLEEP returns 1 when interrupted (or an error 1317, depending on timing).
        assert result.get("value") == 1 or result.get("error") == 1317
        assert scalar(a, "SELECT 7") == 7          # the session goes on
        bystander.join(10)
        assert other == {"v": 0}                   # another client's statement ran on
        with pytest.raises(pymysql.MySQLError) as info:
            scalar(b, "KILL 999999")
        assert info.value.args[0] == 1094
        scalar(b, f"KILL {a.thread_id()}")
        with pytest.raises(pymysql.MySQLError):
            scalar(a, "SELECT 8")
        assert scalar(b, "SELECT 9") == 9


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


def test_server_connection_killed_from_outside(make_proxy, mariadb):
    px = make_proxy(budget=2)
    with connect(px) as a:
        assert scalar(a, "SELECT 1") == 1
        for row in mariadb.processlist():
            if row["user"] == APP:
                mariadb.sql(f"KILL {row['id']}")
        time.sleep(0.2)
        assert scalar(a, "SELECT 2") == 2            # an idle victim: a fresh connection
        a.begin()
        with a.cursor() as cur:
            cur.execute("INSERT INTO t (v) VALUES ('lost')")
        for row in mariadb.processlist():
            if row["user"] == APP:
                mariadb.sql(f"KILL {row['id']}")
        time.sleep(0.2)
        with pytest.raises(pymysql.MySQLError):
            scalar(a, "SELECT 3")                    # the transaction is gone: said so
    with connect(px) as b:
        assert scalar(b, "SELECT COUNT(*) FROM t WHERE v = 'lost'") == 0
    assert px.stats()["pool"]["borrowed"] == 0


# --- IAM tokens, health checks ----------------------------------------------------------------

AKID = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
REGION = "us-east-1"


def test_iam_token_as_cleartext_password_over_tls(make_proxy, test_ca, tmp_path):
    from rdsproxy.auth.iam import generate_token

    principal = tmp_path / "principal.json"
    principal.write_text(json.dumps({"AccessKeyId": AKID, "SecretAccessKey": SECRET}))
    px = make_proxy(tls={"cert_file": test_ca.server_cert, "key_file": test_ca.server_key},
                    iam={"region": REGION, "principals": [{
                        "access_key_id": AKID, "secret_access_key": f"file:{principal}",
                        "resources": [f"arn:aws:rds-db:{REGION}:123456789012:dbuser:*/{APP}"]}]},
                    iam_auth="REQUIRED")
    token = generate_token(host="127.0.0.1", port=px.port, user=APP, region=REGION,
                           access_key_id=AKID, secret_access_key=SECRET)
    with connect(px, password=token, ssl={"ca": test_ca.ca_cert}) as c:
        assert scalar(c, "SELECT CURRENT_USER()") == "app@%"
    # The password is not accepted instead of a token, and without TLS nothing is.
    with pytest.raises(pymysql.err.OperationalError) as info:
        connect(px, ssl={"ca": test_ca.ca_cert})
    assert info.value.args[0] == 1045
    with pytest.raises(pymysql.err.OperationalError) as info:
        connect(px, password=token, ssl_disabled=True)
    assert info.value.args[0] == 1045


def test_health_check_role_follows_read_only(make_proxy, mariadb):
    px = make_proxy()
    eng = engine(px)
    target = next(iter(eng.target_configs))
    assert px.call(eng.probe, target).role.value == "READ_WRITE"
    mariadb.sql("SET GLOBAL read_only = 1")
    try:
        result = px.call(eng.probe, target)
        assert result.role.value == "READ_ONLY" and result.max_connections == MAX_CONNECTIONS
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            described = px.call(px.proxy.describe_targets)["Targets"][0]
            if described["Role"] == "READ_ONLY":
                break
            time.sleep(0.1)
        assert described["Role"] == "READ_ONLY"
    finally:
        mariadb.sql("SET GLOBAL read_only = 0")


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


def test_sysbench_read_only_through_the_proxy(make_proxy, mariadb):
    """sysbench (libmariadb, binary prepared statements, BEGIN/COMMIT) sees no error."""
    px = make_proxy(budget=4)
    common = ["--db-driver=mysql", "--mysql-host=127.0.0.1", f"--mysql-user={APP}",
              f"--mysql-password={APP_PW}", f"--mysql-db={APP_DB}", "--tables=1",
              "--table-size=1000", "--mysql-ssl=off"]
    prep = subprocess.run(["sysbench", "oltp_read_only", *common, f"--mysql-port={mariadb.port}",
                           "prepare"], capture_output=True, text=True, timeout=120)
    assert prep.returncode == 0, prep.stderr
    try:
        run = subprocess.run(["sysbench", "oltp_read_only", *common, f"--mysql-port={px.port}",
                              "--threads=8", "--time=3", "run"],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert re.search(r"ignored errors:\s+0\s", run.stdout), run.stdout
        assert int(re.search(r"transactions:\s+(\d+)", run.stdout).group(1)) > 50
        stats = px.stats()
        assert stats["SessionPinReasons"] == {} and stats["pool"]["open"] <= 4
    finally:
        subprocess.run(["sysbench", "oltp_read_only", *common, f"--mysql-port={mariadb.port}",
                        "cleanup"], capture_output=True, timeout=120)


def test_client_limit_and_borrow_timeout(make_proxy):
    px = make_proxy(budget=1, connection_borrow_timeout=1, top={"max_client_connections": 2})
    with connect(px) as a, connect(px) as b:
        with pytest.raises(pymysql.err.OperationalError) as info:
            connect(px)
        assert info.value.args[0] == 1040
        a.begin()
        scalar(a, "SELECT COUNT(*) FROM t")        # a holds the only server connection
        started = time.monotonic()
        with pytest.raises(pymysql.err.OperationalError) as info:
            scalar(b, "SELECT 1")
        assert info.value.args[0] == 1040 and "connection_borrow_timeout" in info.value.args[1]
        assert 0.9 < time.monotonic() - started < 5
        a.commit()
        assert scalar(b, "SELECT 2") == 2          # b's session survived the timeout


def test_client_hello_in_the_same_read_as_the_ssl_request(make_proxy, test_ca, monkeypatch):
    """MySQL clients start TLS without waiting after their SSLRequest; when both arrive in
    one read, the ClientHello must still reach the TLS layer."""
    import ssl

    from rdsproxy.core import engine as core_engine
    fed = []
    original = core_engine._feed_protocol
    monkeypatch.setattr(core_engine, "_feed_protocol",
                        lambda transport, data: (fed.append(len(data)), original(transport, data)))

    px = make_proxy(tls={"cert_file": test_ca.server_cert, "key_file": test_ca.server_key})
    sock = socket.create_connection((px.host, px.port), timeout=10)
    try:
        seq, greeting = p.PacketReader().feed(sock.recv(65536))[0]
        hs = p.Handshake.parse(greeting)
        assert hs.capabilities & p.CLIENT_SSL
        caps = (p.CLIENT_PROTOCOL_41 | p.CLIENT_SECURE_CONNECTION | p.CLIENT_PLUGIN_AUTH
                | p.CLIENT_SSL | p.CLIENT_CONNECT_WITH_DB | p.CLIENT_TRANSACTIONS)
        ctx = ssl.create_default_context(cafile=test_ca.ca_cert)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        request = p.HandshakeResponse(capabilities=caps, ssl_request=True).build()
        sock.sendall(p.packet(1, request) + outgoing.read())     # one write
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        if outgoing.pending:
            sock.sendall(outgoing.read())
        from rdsproxy.auth import mysql as auth
        login = p.HandshakeResponse(
            capabilities=caps, username=APP, database=APP_DB,
            auth_response=auth.native_password_response(APP_PW, hs.auth_plugin_data),
            auth_plugin_name="mysql_native_password").build()
        tls.write(p.packet(2, login))
        sock.sendall(outgoing.read())
        reader = p.PacketReader()
        packets = []
        while not packets:
            try:
                packets = reader.feed(tls.read(65536))
            except ssl.SSLWantReadError:
                incoming.write(sock.recv(65536))
        assert packets[0][1][:1] == b"\x00", packets          # OK: logged in over TLS
        assert fed and fed[0] > 100                            # the ClientHello came early
    finally:
        sock.close()
    assert px.stats()["ClientConnectionsTLS"] == 1


def test_mariadb_client_script_on_stdin(make_proxy):
    """An interactive-style session of the mariadb client: settings, USE, an insert and
    LAST_INSERT_ID(), all through one proxy session that never holds a connection."""
    px = make_proxy(budget=2)
    script = """
SET time_zone = '+02:00';
SELECT @@time_zone;
USE appdb;
INSERT INTO t (v) VALUES ('cli');
SELECT v FROM t WHERE id = LAST_INSERT_ID();
DELETE FROM t WHERE v = 'cli';
SELECT ROW_COUNT();
"""
    out = subprocess.run(["mariadb", "--no-defaults", "-h", "127.0.0.1", "-P", str(px.port),
                          "-u", APP, f"-p{APP_PW}", "--batch", "--skip-column-names"],
                         input=script, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["+02:00", "cli", "1"]
    assert px.stats()["SessionPinReasons"] == {}


def test_com_set_option_pins_and_idle_clients_are_closed(make_proxy):
    px = make_proxy(top={"idle_client_timeout": 1})
    s = log_in(px.port, APP, APP_PW, APP_DB)
    try:
        tracker, _ = s.command(p.com_set_option(p.MYSQL_OPTION_MULTI_STATEMENTS_OFF))
        assert tracker.error is None
        assert px.stats()["SessionPinReasons"] == {"com_set_option": 1}
        tracker, _ = s.query("SELECT 1; SELECT 2")
        assert tracker.error is not None          # multi-statements are off for this session
        time.sleep(2.5)
        seq, payload = s.recv_packet()            # idle_client_timeout: told, then closed
        assert p.ErrPacket.parse(payload).code == 4031
    finally:
        s.close()
    # The pinned count drops as the client leaves; its connection is back once the reset
    # (COM_RESET_CONNECTION, a round trip) is answered.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        stats = px.stats()
        if stats["pinned_sessions"] == 0 and stats["pool"]["borrowed"] == 0:
            break
        time.sleep(0.05)
    assert stats["pinned_sessions"] == 0 and stats["pool"]["borrowed"] == 0, stats


def test_many_clients_share_few_connections_without_crosstalk(make_proxy, mariadb):
    """20 clients on 3 server connections, each with its own settings, inserts and
    transactions, checking on every round that what it reads is its own."""
    px = make_proxy(budget=3)
    errors = []

    def client(i):
        try:
            tz = f"+0{i % 10}:{10 + i:02d}"
            with connect(px, autocommit=True) as c:
                me = c.thread_id()
                scalar(c, f"SET time_zone = '{tz}', sql_mode = '{'ANSI_QUOTES' if i % 2 else ''}'")
                for round_ in range(15):
                    assert scalar(c, "SELECT @@time_zone") == tz
                    assert (scalar(c, "SELECT @@sql_mode") == "ANSI_QUOTES") == bool(i % 2)
                    assert scalar(c, "SELECT CONNECTION_ID()") == me
                    with c.cursor() as cur:
                        cur.execute("INSERT INTO t (v) VALUES (%s)", (f"x{i}-{round_}",))
                        mine = cur.lastrowid
                    assert scalar(c, "SELECT LAST_INSERT_ID()") == mine
                    if round_ % 5 == 0:
                        c.begin()
                        scalar(c, "UPDATE t SET v = v WHERE id = %s", (mine,))
                        assert scalar(c, "SELECT v FROM t WHERE id = LAST_INSERT_ID()") == f"x{i}-{round_}"
                        c.commit()
                scalar(c, "DELETE FROM t WHERE v LIKE %s", (f"x{i}-%",))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append((i, repr(exc)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert errors == []
    assert proxy_connections(mariadb) <= 3
    assert px.stats()["SessionPinReasons"] == {}


def test_pipelined_prepare_execute_of_the_last_statement(make_proxy):
    """MariaDB Connector/C's execute_direct: PREPARE, EXECUTE(-1) and CLOSE(-1) in one
    write; the proxy answers both in order and -1 names the statement just prepared."""
    px = make_proxy(budget=2)
    s = log_in(px.port, APP, APP_PW, APP_DB)
    try:
        last = p.MARIADB_LAST_STATEMENT_ID
        for sql, ok in (("SELECT CONCAT(?, '-piped')", True), ("SELECT nope FROM nowhere WHERE ?", False)):
            execute_payload = p.com_stmt_execute(last, ["v"])
            s.sock.sendall(p.packet(0, p.com_stmt_prepare(sql)) + p.packet(0, execute_payload)
                           + p.packet(0, p.com_stmt_close(last)))
            answers = []
            for payload in (p.com_stmt_prepare(sql), execute_payload):
                tracker = p.ResponseTracker(payload, s.caps)
                packets = []
                while not tracker.done:
                    _seq, pl = s.recv_packet()
                    packets.append(pl)
                    tracker.feed(pl)
                answers.append((tracker, packets))
            (prep, _), (ex, rows) = answers
            if ok:
                assert prep.error is None and ex.error is None
                assert binary_string(rows) == b"v-piped"
            else:
                assert prep.error is not None and ex.error is not None
                assert ex.error.code == 1243
        assert s.scalar("SELECT 1") == b"1"
    finally:
        s.close()


def test_tls_to_the_database(make_proxy, test_ca):
    """tls = "verify-full" on the target: the server leg runs over TLS, checked against the CA."""
    server = MariaDBServer(max_connections=MAX_CONNECTIONS,
                           tls=(test_ca.server_cert, test_ca.server_key, test_ca.ca_cert)).start()
    try:
        server.create_user(APP, APP_PW)
        server.create_database(APP_DB, owner=APP)
        px = make_proxy(server=server, target={"tls": "verify-full", "tls_ca_file": test_ca.ca_cert})
        with connect(px) as c:
            with c.cursor() as cur:
                cur.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
                assert cur.fetchone()[1] != ""
            assert scalar(c, "SELECT v FROM (SELECT 'over tls' AS v) x") == "over tls"
        assert px.stats()["targets"][0]["TargetHealth"]["State"] == "AVAILABLE"
    finally:
        server.stop()


# --- session state never crosses clients ---------------------------------------------------

@pytest.fixture(scope="module")
def secret_role(mariadb):
    """Role `secret_reader` (granted to OTHER, not as its default) may read vault.secret;
    OTHER alone may not (its privileges are on appdb only)."""
    mariadb.sql("CREATE DATABASE IF NOT EXISTS vault; "
            "CREATE TABLE IF NOT EXISTS vault.secret (v VARCHAR(20)); "
            "INSERT INTO vault.secret VALUES ('classified');")
    mariadb.sql(f"CREATE ROLE IF NOT EXISTS secret_reader; "
            f"GRANT SELECT ON vault.secret TO secret_reader; "
            f"GRANT secret_reader TO '{OTHER}'@'%';")
    return "secret_reader"


def read_secret(conn):
    try:
        return ("ok", scalar(conn, "SELECT v FROM vault.secret"))
    except (pymysql.err.OperationalError, pymysql.err.ProgrammingError) as exc:
        return ("error", exc.args[0])


def other_client(px, **kw):
    return connect(px, user=OTHER, password=OTHER_PW, **kw)


def next_client_on_the_same_connection(px, mariadb):
    """A fresh client of OTHER, on the one server connection the proxy holds for it."""
    conn = other_client(px)
    assert proxy_connections(mariadb, user=OTHER) == 1
    return conn


def test_a_role_set_by_one_client_never_reaches_the_next(make_proxy, mariadb, secret_role):
    px = make_proxy(budget=1)
    with other_client(px) as first:
        assert read_secret(first) == ("error", 1142)
        with first.cursor() as cur:
            cur.execute(f"SET ROLE {secret_role}")
        assert read_secret(first) == ("ok", "classified")
    with next_client_on_the_same_connection(px, mariadb) as second:
        assert read_secret(second) == ("error", 1142)
        assert scalar(second, "SELECT CURRENT_ROLE()") is None


@pytest.mark.parametrize("mode", ["NO_BACKSLASH_ESCAPES", "ANSI_QUOTES",
                                  "NO_BACKSLASH_ESCAPES,ANSI_QUOTES"])
@pytest.mark.parametrize("text", [
    "SELECT 'a\\'; SET ROLE {role}; SELECT ''",
    "SELECT \"a\\\"; SET ROLE {role}; SELECT \"\"",
    "SELECT 'a\\' /* '; SET ROLE {role}; SELECT '' */",
    "SELECT 1 # '\\\n; SET ROLE {role}",
])
@pytest.mark.parametrize("filters", [[], ["EXCLUDE_VARIABLE_SETS"]])
def test_quoting_modes_cannot_hide_a_statement(make_proxy, mariadb, secret_role, mode, text, filters):
    """Whatever sql_mode makes of backslashes and double quotes, what the server runs is
    what the proxy judged: a hidden SET ROLE never survives into the next client, even
    with EXCLUDE_VARIABLE_SETS."""
    px = make_proxy(budget=1, session_pinning_filters=filters)
    first = other_client(px, client_flag=CLIENT.MULTI_STATEMENTS)
    try:
        with first.cursor() as cur:
            cur.execute(f"SET SESSION sql_mode = '{mode}'")
            try:
                cur.execute(text.format(role=secret_role))
                while cur.nextset():
                    pass
            except pymysql.err.MySQLError:
                pass   # a text that is malformed in this mode: the server says so
        if engine(px).ledger.pinned:
            first.close()   # pinned: its connection is reset before anyone else gets it
        # Otherwise the first client stays connected and idle, and its server connection
        # serves the next client at once.
        with next_client_on_the_same_connection(px, mariadb) as second:
            assert read_secret(second) == ("error", 1142)
    finally:
        if first.open:
            first.close()


def test_one_connection_id_wherever_the_client_sees_it(make_proxy, mariadb):
    """The handshake's id, CONNECTION_ID() in any statement, and what KILL takes are one id;
    column names stay what MySQL would call them."""
    px = make_proxy()
    with connect(px) as a, connect(px) as b:
        own = a.thread_id()
        with a.cursor() as cur:
            cur.execute("SELECT CONNECTION_ID(), @@version, 'CONNECTION_ID()' AS text, "
                        "CONNECTION_ID() + 0 AS plus")
            row = cur.fetchone()
            names = [d[0] for d in cur.description]
        assert (row[0], row[2], row[3]) == (own, "CONNECTION_ID()", own)
        assert names == ["CONNECTION_ID()", "@@version", "text", "plus"]
        assert scalar(a, "SELECT COUNT(*) FROM t WHERE id <> CONNECTION_ID() OR 1") == 3
        # KILL QUERY with the id the statement reported reaches a's running query.
        result = {}

        def sleep():
            try:
                result["value"] = scalar(a, "SELECT SLEEP(20)")
            except pymysql.MySQLError as exc:
                result["error"] = exc.args[0]
        sleeper = threading.Thread(target=sleep)
        sleeper.start()
        time.sleep(0.5)
        scalar(b, f"KILL QUERY {row[0]}")
        sleeper.join(15)
        # SLEEP returns 1 when interrupted (or error 1317, depending on timing).
        assert result in ({"value": 1}, {"error": 1317}), result


def test_login_closed_by_the_proxy_gets_an_error_the_client_can_read(make_proxy):
    """Half-open logins from one address beyond max_logins_per_address are closed with an
    ERR numbered as the answer to the handshake response the client sends after the
    greeting (a client reads only then; PyMySQL checks the number)."""
    px = make_proxy(top={"max_logins_per_address": 2})
    reader_for = {}
    waiting = []
    for _ in range(6):   # greeted, answer not sent yet
        sock = socket.create_connection((px.host, px.port), timeout=10)
        reader_for[sock] = p.PacketReader()
        packets = []
        while not packets:
            packets = reader_for[sock].feed(sock.recv(65536))
        assert packets[0][0] == 0
        waiting.append(sock)
    errors = []
    try:
        for sock in waiting:
            sock.settimeout(3.0)
            packets = []
            try:
                while not packets:
                    data = sock.recv(65536)
                    if not data:
                        break
                    packets = reader_for[sock].feed(data)
            except TimeoutError:
                continue
            if packets:
                errors.append((packets[0][0], packets[0][1][:1]))
    finally:
        for sock in waiting:
            sock.close()
    assert len(errors) >= 4, errors
    assert set(errors) == {(2, b"\xff")}, errors
    # And with a real client: pymysql reads it as the error it is, not a numbering fault.
    assert connect(px).cursor().execute("SELECT 1") == 1
