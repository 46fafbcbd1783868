"""The MySQL engine keeping clients apart on shared server connections: tracked session
settings and each client's own LAST_INSERT_ID()/ROW_COUNT(), the pinning rules and the
reset that ends a pin, KILL and the connection ids clients see, and session state (a
role, a statement hidden by quoting modes) that must never reach the next client.

`budget=1` puts every client on the same server connection, so whatever one client leaves
behind is there for the next one to find.
"""
from __future__ import annotations

import threading
import time

import pymysql
import pytest
from pymysql.constants import CLIENT

from harness import (APP_DB, APP_PASSWORD as APP_PW, APP_USER as APP, OTHER_PASSWORD as OTHER_PW,
                     OTHER_USER as OTHER, connect, engine, proxy_connections, scalar)
from rdsproxy.engines.mysql import protocol as p
from rdsproxy.engines.mysql.server_login import ChangeUserLogin
from utils import log_in


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

# --- connection ids -----------------------------------------------------------------------

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
