"""The sans-IO login machine and response tracker over real sockets.

Part 1 logs in to a throwaway MariaDB 10.11 (the session one, with TLS from the test CA)
and runs commands, checking the tracker's completion and status flags against what the
server really sends. Part 2 runs a small MySQL-8-like server built from the protocol
module's builders and the auth module's server side, and points real clients at it
(PyMySQL, the mariadb command-line client, and ServerLogin): this checks the server-side
builders against independent parsers and covers caching_sha2_password, which MariaDB
does not have.
"""
from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import threading
import time

import pymysql
import pytest
from harness import (APP_DB, APP_PASSWORD as APP_PW, APP_USER as APP,
                     OTHER_PASSWORD as OTHER_PW, OTHER_USER as OTHER)
from utils import log_in

from rdsproxy.auth import mysql as auth
from rdsproxy.engines.mysql import protocol as p
from rdsproxy.engines.mysql.server_login import DEFAULT_CAPABILITIES, ChangeUserLogin, LoginError
from rdsproxy.tls import client_context, server_context

NO_DEPRECATE_EOF = DEFAULT_CAPABILITIES & ~p.CLIENT_DEPRECATE_EOF
BOTH_EOF_MODES = pytest.mark.parametrize("caps", [DEFAULT_CAPABILITIES, NO_DEPRECATE_EOF],
                                         ids=["deprecate_eof", "eof_packets"])


@pytest.fixture
def session(mariadb):
    s = log_in(mariadb.port, APP, APP_PW, APP_DB)
    yield s
    s.close()


# --- part 1: a real MariaDB -----------------------------------------------------------------

def test_login_native_password(mariadb):
    s = log_in(mariadb.port, APP, APP_PW, APP_DB)
    try:
        r = s.result
        assert r.is_mariadb and r.version.startswith("10.11") and r.server_version.startswith("5.5.5-")
        assert r.auth_plugin == "mysql_native_password" and not r.tls
        assert r.status_flags & p.SERVER_STATUS_AUTOCOMMIT
        for flag in (p.CLIENT_PROTOCOL_41, p.CLIENT_DEPRECATE_EOF, p.CLIENT_SESSION_TRACK,
                     p.CLIENT_MULTI_STATEMENTS, p.CLIENT_CONNECT_WITH_DB, p.CLIENT_PLUGIN_AUTH):
            assert r.capabilities & flag, hex(flag)
        assert not r.capabilities & (p.CLIENT_SSL | p.MARIADB_CAPABILITIES_MASK)
        assert int(s.scalar("SELECT CONNECTION_ID()")) == r.connection_id
        assert s.scalar("SELECT CONCAT(CURRENT_USER(), ' ', DATABASE())") == b"app@% appdb"
        mine = [row for row in mariadb.processlist() if int(row["id"]) == r.connection_id]
        assert mine and mine[0]["user"] == APP and mine[0]["db"] == APP_DB
    finally:
        s.close()


def test_wrong_password_surfaces_1045(mariadb):
    with pytest.raises(p.ServerError) as info:
        log_in(mariadb.port, APP, "not-the-password", APP_DB)
    err = info.value
    assert err.code == p.ER_ACCESS_DENIED_ERROR and err.sqlstate == "28000"
    assert "Access denied for user 'app'@" in str(err) and "using password: YES" in str(err)
    assert "login as 'app' failed" in str(err)


def test_unknown_database_and_user(mariadb):
    with pytest.raises(p.ServerError) as info:
        log_in(mariadb.port, APP, APP_PW, "nosuchdb")
    assert info.value.code in (1044, 1049)          # no access / unknown database
    with pytest.raises(p.ServerError) as info:
        log_in(mariadb.port, "nosuchuser", "x")
    assert info.value.code == 1045


def test_login_over_tls(mariadb, test_ca):
    ctx = client_context("verify-full", test_ca.ca_cert)
    s = log_in(mariadb.port, APP, APP_PW, APP_DB, tls_context=ctx)
    try:
        assert s.result.tls and s.caps & p.CLIENT_SSL
        version = s.rows("SHOW SESSION STATUS LIKE 'Ssl_version'")[0][1]
        assert version.startswith(b"TLSv1")
        assert s.scalar("SELECT 1") == b"1"
    finally:
        s.close()


def test_login_without_database_and_empty_password(mariadb):
    mariadb.create_user("nopw", "", grant=None)
    s = log_in(mariadb.port, "nopw", "")
    try:
        assert not s.caps & p.CLIENT_CONNECT_WITH_DB
        assert s.scalar("SELECT DATABASE()") is None
    finally:
        s.close()


@BOTH_EOF_MODES
def test_select_1(mariadb, caps):
    s = log_in(mariadb.port, APP, APP_PW, APP_DB, capabilities=caps)
    try:
        tracker, packets = s.query("SELECT 1")
        assert tracker.done and tracker.results == 1 and tracker.rows == 1
        assert len(packets) == (4 if caps & p.CLIENT_DEPRECATE_EOF else 5)
        assert tracker.status_flags == p.SERVER_STATUS_AUTOCOMMIT
        assert p.parse_text_row(packets[-2], 1) == [b"1"]
    finally:
        s.close()


@BOTH_EOF_MODES
def test_multi_statements_and_multi_results(mariadb, caps):
    s = log_in(mariadb.port, APP, APP_PW, APP_DB, capabilities=caps)
    try:
        tracker, packets = s.query("SELECT id, v FROM t ORDER BY id; SELECT 2; "
                                   "UPDATE t SET v = v WHERE id = 1; DO 1")
        assert tracker.done and tracker.error is None
        assert tracker.results == 4 and tracker.rows == 4
        assert not tracker.status_flags & p.SERVER_MORE_RESULTS_EXISTS
        # Every response packet was consumed: the next command answers normally.
        assert s.scalar("SELECT 42") == b"42"
        # An error stops the batch, and is the end of the response.
        tracker, _ = s.query("SELECT 1; SELECT nosuch; SELECT 3")
        assert tracker.error.code == 1054 and tracker.results == 1
        assert s.scalar("SELECT 43") == b"43"
    finally:
        s.close()


def test_transaction_status_flags(session):
    s = session
    assert not s.query("BEGIN")[0].error
    assert s.status & p.SERVER_STATUS_IN_TRANS
    tracker, _ = s.query("INSERT INTO t VALUES (100, 'x')")
    assert tracker.in_transaction and tracker.last_ok.affected_rows == 1
    tracker, _ = s.query("SELECT COUNT(*) FROM t")
    assert tracker.in_transaction                      # the EOF/OK ending rows carries it
    tracker, _ = s.query("ROLLBACK")
    assert not tracker.in_transaction and tracker.status_flags & p.SERVER_STATUS_AUTOCOMMIT
    tracker, _ = s.query("START TRANSACTION READ ONLY")
    assert tracker.status_flags & p.SERVER_STATUS_IN_TRANS_READONLY and tracker.in_transaction
    tracker, _ = s.query("COMMIT")
    assert not tracker.status_flags & (p.SERVER_STATUS_IN_TRANS | p.SERVER_STATUS_IN_TRANS_READONLY)
    # An error inside a transaction: ERR has no status; the tracker keeps the last known.
    tracker, _ = s.query("BEGIN; SELECT nosuch")
    assert tracker.error.code == 1054 and tracker.in_transaction
    assert s.scalar("SELECT @@in_transaction") == b"1"
    s.query("ROLLBACK")


def test_autocommit_off_status(session):
    # MariaDB reports autocommit=0 as SERVER_STATUS_AUTOCOMMIT off, but SERVER_STATUS_IN_TRANS
    # only once a transactional table was touched; after COMMIT it stays off.
    s = session
    tracker, _ = s.query("SET autocommit = 0")
    assert not tracker.status_flags & (p.SERVER_STATUS_AUTOCOMMIT | p.SERVER_STATUS_IN_TRANS)
    assert tracker.last_ok.system_variables() == {"autocommit": "OFF"}
    assert not s.query("SELECT 1")[0].in_transaction
    assert s.query("UPDATE t SET v = v WHERE id = 2")[0].in_transaction
    tracker, _ = s.query("COMMIT")
    assert not tracker.in_transaction and not tracker.status_flags & p.SERVER_STATUS_AUTOCOMMIT
    tracker, _ = s.query("SET autocommit = 1")
    assert tracker.status_flags & p.SERVER_STATUS_AUTOCOMMIT


def _binary_rows(packets: list[bytes], caps: int) -> list[list]:
    """Decode a binary-protocol result set of integer / string columns, using its own
    column definitions (enough for these tests)."""
    ncols, _ = p.read_lenenc_int(packets[0])
    types = [p.ColumnDefinition.parse(c).type for c in packets[1:1 + ncols]]
    start = 1 + ncols + (0 if caps & p.CLIENT_DEPRECATE_EOF else 1)
    return [_binary_row(row, types) for row in packets[start:-1]]


def _binary_row(payload: bytes, types: list[int]) -> list:
    assert payload[0] == 0
    nbits = (len(types) + 7 + 2) // 8
    bitmap = payload[1:1 + nbits]
    pos = 1 + nbits
    values = []
    for i, ctype in enumerate(types):
        if bitmap[(i + 2) // 8] & (1 << ((i + 2) % 8)):
            values.append(None)
        elif ctype == p.MYSQL_TYPE_LONGLONG:
            values.append(struct.unpack_from("<q", payload, pos)[0])
            pos += 8
        elif ctype in (p.MYSQL_TYPE_LONG, p.MYSQL_TYPE_INT24):
            values.append(struct.unpack_from("<i", payload, pos)[0])
            pos += 4
        else:
            raw, pos = p.read_lenenc_str(payload, pos)
            values.append(raw)
    return values


@BOTH_EOF_MODES
def test_prepared_statements(mariadb, caps):
    s = log_in(mariadb.port, APP, APP_PW, APP_DB, capabilities=caps)
    try:
        tracker, packets = s.command(p.com_stmt_prepare("SELECT CAST(? AS SIGNED) + 1, ?, NULL"))
        ok = tracker.prepare_ok
        assert tracker.done and ok.num_params == 2 and ok.num_columns == 3
        eof = 0 if caps & p.CLIENT_DEPRECATE_EOF else 1
        assert len(packets) == 1 + 2 + 3 + 2 * eof
        start = 1 + 2 + eof                   # PREPARE_OK, parameters, [EOF], columns
        names = [p.ColumnDefinition.parse(c).name for c in packets[start:start + 3]]
        assert names == ["CAST(? AS SIGNED) + 1", "?", "NULL"]

        tracker, packets = s.command(p.com_stmt_execute(ok.statement_id, [41, "word"]))
        assert tracker.done and tracker.rows == 1 and tracker.results == 1
        assert _binary_rows(packets, caps) == [[42, b"word", None]]

        # Remapping: a payload written for statement A, rewritten to name statement B.
        other = s.command(p.com_stmt_prepare("SELECT CAST(? AS SIGNED) * 10, ?, 'b'"))[0].prepare_ok
        payload = p.with_statement_id(p.com_stmt_execute(ok.statement_id, [4, "w"]),
                                      other.statement_id)
        tracker, packets = s.command(payload)
        assert _binary_rows(packets, caps) == [[40, b"w", b"b"]]

        # Reused parameter types (new_params_bound = 0) on the same connection.
        first = p.StmtExecute.parse(p.com_stmt_execute(ok.statement_id, [1, "a"]), 2)
        reuse = p.StmtExecute(ok.statement_id, 0, 1, first.null_bitmap, False, b"",
                              first.values).build()
        tracker, packets = s.command(reuse)
        assert _binary_rows(packets, caps) == [[2, b"a", None]]

        # Close: no response; the id is gone afterwards.
        tracker, packets = s.command(p.com_stmt_close(other.statement_id))
        assert not tracker.expects_response and packets == []
        tracker, _ = s.command(p.com_stmt_execute(other.statement_id, [1, "x"]))
        assert tracker.error.code == p.ER_UNKNOWN_STMT_HANDLER
        assert s.command(p.com_stmt_reset(ok.statement_id))[0].error is None
    finally:
        s.close()


@BOTH_EOF_MODES
def test_cursor_and_fetch(mariadb, caps):
    s = log_in(mariadb.port, APP, APP_PW, APP_DB, capabilities=caps)
    try:
        ok = s.command(p.com_stmt_prepare("SELECT id FROM t WHERE id <= ? ORDER BY id"))[0].prepare_ok
        tracker, _ = s.command(p.com_stmt_execute(ok.statement_id, [3],
                                                  flags=p.CURSOR_TYPE_READ_ONLY))
        assert tracker.done and tracker.cursor_open and tracker.rows == 0
        tracker, _ = s.command(p.com_stmt_fetch(ok.statement_id, 2))
        assert tracker.rows == 2 and tracker.cursor_open
        tracker, _ = s.command(p.com_stmt_fetch(ok.statement_id, 10))
        assert tracker.rows == 1 and not tracker.cursor_open
        assert tracker.status_flags & p.SERVER_STATUS_LAST_ROW_SENT
        # A cursor closed by COM_STMT_RESET.
        s.command(p.com_stmt_execute(ok.statement_id, [3], flags=p.CURSOR_TYPE_READ_ONLY))
        assert s.status & p.SERVER_STATUS_CURSOR_EXISTS
        tracker, _ = s.command(p.com_stmt_reset(ok.statement_id))
        assert not tracker.cursor_open
        assert s.command(p.com_stmt_fetch(ok.statement_id, 1))[0].error.code == 1421
    finally:
        s.close()


@BOTH_EOF_MODES
def test_simple_commands(mariadb, caps):
    s = log_in(mariadb.port, APP, APP_PW, None, capabilities=caps)
    try:
        tracker, packets = s.command(p.com_ping())
        assert tracker.done and len(packets) == 1 and tracker.status_flags & p.SERVER_STATUS_AUTOCOMMIT
        tracker, _ = s.command(p.com_init_db(APP_DB))
        assert tracker.last_ok.schema() == APP_DB
        tracker, packets = s.command(p.com_statistics())
        assert tracker.done and packets[0].startswith(b"Uptime:")
        tracker, packets = s.command(p.com_field_list("t"))
        assert tracker.done and len(packets) == 3
        assert [p.ColumnDefinition.parse(c).name for c in packets[:2]] == ["id", "v"]
        tracker, _ = s.command(p.com_set_option(p.MYSQL_OPTION_MULTI_STATEMENTS_OFF))
        assert tracker.done and tracker.error is None
        assert s.query("SELECT 1; SELECT 2")[0].error.code == 1064
        s.command(p.com_set_option(p.MYSQL_OPTION_MULTI_STATEMENTS_ON))
        s.query("SET @x = 5, autocommit = 0")
        tracker, _ = s.command(p.com_reset_connection())
        assert tracker.done and tracker.status_flags & p.SERVER_STATUS_AUTOCOMMIT
        assert s.scalar("SELECT @x") is None
    finally:
        s.close()


def test_local_infile(mariadb):
    s = log_in(mariadb.port, APP, APP_PW, APP_DB,
               capabilities=DEFAULT_CAPABILITIES | p.CLIENT_LOCAL_FILES)
    try:
        s.query("CREATE TEMPORARY TABLE li (a INT, b VARCHAR(10))")
        tracker, _ = s.query("LOAD DATA LOCAL INFILE 'whatever.tsv' INTO TABLE li; "
                             "SELECT COUNT(*) FROM li", infile=b"1\tone\n2\ttwo\n")
        assert tracker.infile_filename == "whatever.tsv"
        assert tracker.done and tracker.error is None and tracker.results == 2
        assert s.scalar("SELECT GROUP_CONCAT(b ORDER BY a) FROM li") == b"one,two"
    finally:
        s.close()


def test_packets_over_16_mib(session):
    s = session
    n = 17 << 20
    # A command split over two packets by packet(), joined by the server...
    assert s.scalar("SELECT LENGTH('" + "a" * n + "')") == str(n).encode()
    # ...and a row the server splits, joined by PacketReader; it starts with 0xFE.
    tracker, packets = s.query(f"SELECT REPEAT('b', {n})")
    assert tracker.done and tracker.rows == 1
    row = packets[-2]
    assert row[0] == 0xFE and len(row) == n + 9
    assert p.parse_text_row(row, 1)[0] == b"b" * n


def test_change_user(mariadb, session):
    s = session
    s.query("SET @x = 1")
    change = ChangeUserLogin(OTHER, OTHER_PW, APP_DB, nonce=s.result.handshake.auth_plugin_data,
                             capabilities=s.caps)
    s.sock.sendall(change.start())
    while not change.done:
        out = change.receive_packet(*s.recv_packet())
        if out:
            s.sock.sendall(out)
    assert change.ok.status_flags & p.SERVER_STATUS_AUTOCOMMIT
    assert s.scalar("SELECT CURRENT_USER()") == b"other@%"
    assert s.scalar("SELECT @x") is None                 # the session was reset
    bad = ChangeUserLogin(APP, "wrong", nonce=s.result.handshake.auth_plugin_data,
                          capabilities=s.caps)
    s.sock.sendall(bad.start())
    with pytest.raises(p.ServerError) as info:
        while not bad.done:
            out = bad.receive_packet(*s.recv_packet())
            if out:
                s.sock.sendall(out)
    assert info.value.code == 1045 and bad.failed


def test_too_many_connections(mariadb):
    # At max_connections a user without SUPER gets ERR 1040 after authenticating; one more
    # connection is kept for SUPER, and beyond it the server answers a new connection with
    # ERR 1040 in place of the HandshakeV10 (MariaDB sends that one without a SQLSTATE).
    before = mariadb.variable("max_connections")
    sessions = []
    try:
        mariadb.sql(f"SET GLOBAL max_connections = {mariadb.connection_count() + 1}")
        with pytest.raises(p.ServerError) as info:
            # (max_connections is at least 10; closed connections may still count a moment.)
            for _ in range(30):
                sessions.append(log_in(mariadb.port, OTHER, OTHER_PW))
        assert sessions and info.value.code == p.ER_CON_COUNT_ERROR
        assert info.value.sqlstate == "08004" and "login as 'other' failed" in str(info.value)
        with pytest.raises(p.ServerError) as info:
            for _ in range(10):     # root has SUPER: it gets the slot kept for SUPER
                sessions.append(log_in(mariadb.port, "root", ""))
        assert info.value.code == p.ER_CON_COUNT_ERROR and info.value.sqlstate == "HY000"
        assert "server refused the connection" in str(info.value)
        assert "Too many connections" in str(info.value)
    finally:
        for s in sessions:
            s.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                mariadb.sql(f"SET GLOBAL max_connections = {before}")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def test_processlist_counts(mariadb):
    mariadb.create_user("counted", "c-pw", grant=None)
    assert mariadb.connection_count("counted") == 0
    sessions = [log_in(mariadb.port, "counted", "c-pw") for _ in range(3)]
    try:
        assert mariadb.connection_count("counted") == 3
        assert mariadb.connection_count() >= 3
        assert {row["command"] for row in mariadb.processlist()
                if row["user"] == "counted"} == {"Sleep"}
    finally:
        for s in sessions:
            s.close()
    deadline = time.monotonic() + 5
    while mariadb.connection_count("counted") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert mariadb.connection_count("counted") == 0


# --- part 2: a server built from our builders, real clients against it -------------------------

SERVER_CAPS = (p.CLIENT_LONG_PASSWORD | p.CLIENT_FOUND_ROWS | p.CLIENT_LONG_FLAG
               | p.CLIENT_CONNECT_WITH_DB | p.CLIENT_PROTOCOL_41 | p.CLIENT_TRANSACTIONS
               | p.CLIENT_SECURE_CONNECTION | p.CLIENT_MULTI_STATEMENTS | p.CLIENT_MULTI_RESULTS
               | p.CLIENT_PS_MULTI_RESULTS | p.CLIENT_PLUGIN_AUTH | p.CLIENT_CONNECT_ATTRS
               | p.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA | p.CLIENT_SESSION_TRACK
               | p.CLIENT_DEPRECATE_EOF | p.CLIENT_RESERVED)


class BuiltServer:
    """A MySQL-8-like server made of protocol builders, one thread per connection.

    users: {name: (plugin, password)}. caching_sha2_password users get fast auth once
    their double hash is cached (after a full authentication, as MySQL does). `events`
    records how each login went: "native", "sha2-fast", "sha2-full-rsa", "sha2-full-tls",
    "clear", plus "switch" when an AuthSwitchRequest was needed, or "denied".
    """

    def __init__(self, users, *, default_plugin="caching_sha2_password", tls=None,
                 keypair=None):
        self.users = users
        self.default_plugin = default_plugin
        self.tls = tls
        self.keypair = keypair
        self.cache: dict[str, bytes] = {}
        self.events: list[str] = []
        self.queries: list[str] = []
        self.errors: list[BaseException] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._next_id = 100
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def close(self):
        self.listener.close()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self._next_id += 1
            threading.Thread(target=self._serve, args=(conn, self._next_id), daemon=True).start()

    # -- one connection --
    def _serve(self, sock, conn_id):
        sock.settimeout(10)
        conn = {"sock": sock}              # replaced by the TLS socket after an SSLRequest
        reader = p.PacketReader()
        pending = []

        def recv():
            while not pending:
                data = conn["sock"].recv(65536)
                if not data:
                    raise ConnectionError("client went away")
                pending.extend(reader.feed(data))
            return pending.pop(0)

        def send(seq, payload):
            conn["sock"].sendall(p.packet(seq, payload))
            return p.seq_after(seq, len(payload))

        try:
            nonce = auth.generate_nonce()
            caps = SERVER_CAPS | (p.CLIENT_SSL if self.tls else 0)
            send(0, p.Handshake("8.0.36-rdsproxy-test", conn_id, nonce, caps, 255,
                                p.SERVER_STATUS_AUTOCOMMIT, self.default_plugin).build())
            # The first packet is read exactly: after an SSLRequest the next bytes are the
            # TLS ClientHello, which must be left in the socket for wrap_socket().
            header = _recv_exact(sock, 4)
            seq, payload = header[3], _recv_exact(sock, int.from_bytes(header[:3], "little"))
            tls = False
            if p.HandshakeResponse.is_ssl_request(payload):
                conn["sock"] = self.tls.wrap_socket(sock, server_side=True)
                tls = True
                seq, payload = recv()
            resp = p.HandshakeResponse.parse(payload)
            negotiated = resp.capabilities & (caps | p.MARIADB_CAPABILITIES_MASK) & 0xFFFFFFFF
            seq = p.seq_after(seq, len(payload))
            ok = self._authenticate(resp, nonce, tls, seq, send, recv, negotiated)
            if ok is None:
                return
            self._commands(negotiated, send, recv, lambda data: conn["sock"].sendall(data))
        except ConnectionError:
            pass
        except BaseException as exc:           # surfaced by the tests through self.errors
            self.errors.append(exc)
        finally:
            conn["sock"].close()

    def _authenticate(self, resp, nonce, tls, seq, send, recv, caps):
        def deny(seq):
            self.events.append("denied")
            send(seq, p.ErrPacket(p.ER_ACCESS_DENIED_ERROR,
                                  f"Access denied for user '{resp.username}'@'localhost' "
                                  "(using password: YES)", "28000").build(caps))

        if resp.username not in self.users:
            return deny(seq)
        plugin, password = self.users[resp.username]
        answer = resp.auth_response
        if resp.auth_plugin_name != plugin:
            self.events.append("switch")
            nonce = auth.generate_nonce()
            seq = send(seq, p.AuthSwitchRequest(plugin, nonce + b"\x00").build())
            seq, answer = recv()
            seq = p.seq_after(seq, len(answer))
        if plugin == "mysql_native_password":
            good = auth.native_password_verify_hash(auth.native_double_hash(password), nonce,
                                                    answer)
            self.events.append("native")
        elif plugin == "mysql_clear_password":
            good = auth.parse_clear_password(answer) == password.encode()
            self.events.append("clear")
        else:
            cached = self.cache.get(resp.username)
            if cached is not None:
                good = auth.caching_sha2_verify_hash(cached, nonce, answer)
                self.events.append("sha2-fast")
                if good:
                    seq = send(seq, p.AuthMoreData(b"\x03").build())
            else:
                seq = send(seq, p.AuthMoreData(b"\x04").build())
                seq, answer = recv()
                if tls:
                    self.events.append("sha2-full-tls")
                    given = auth.parse_clear_password(answer)
                else:
                    if answer == b"\x02":
                        seq = send(p.seq_after(seq, 1),
                                   p.AuthMoreData(self.keypair.public_key_pem).build())
                        seq, answer = recv()
                    self.events.append("sha2-full-rsa")
                    given = self.keypair.decrypt_password(answer, nonce)
                seq = p.seq_after(seq, len(answer))
                good = given == password.encode()
                if good:
                    self.cache[resp.username] = auth.caching_sha2_double_hash(password)
        if not good:
            return deny(seq)
        send(seq, p.OkPacket(status_flags=p.SERVER_STATUS_AUTOCOMMIT).build(caps))
        return True

    def _commands(self, caps, send, recv, send_raw):
        columns = [p.ColumnDefinition("id", p.MYSQL_TYPE_LONGLONG, p.CHARSET_BINARY, 20,
                                      p.NOT_NULL_FLAG, org_name="id"),
                   p.ColumnDefinition("name", p.MYSQL_TYPE_VAR_STRING, p.CHARSET_UTF8MB4, 80,
                                      org_name="name")]
        while True:
            seq, payload = recv()
            seq = p.seq_after(seq, len(payload))
            cmd = payload[0]
            if cmd == p.COM_QUIT:
                return
            if cmd in (p.COM_PING, p.COM_INIT_DB):
                send(seq, p.OkPacket().build(caps))
                continue
            if cmd != p.COM_QUERY:
                send(seq, p.ErrPacket(p.ER_UNKNOWN_COM_ERROR, "Unknown command", "08S01").build(caps))
                continue
            sql = payload[1:].decode()
            self.queries.append(sql)
            upper = sql.strip().upper()
            if upper == "SELECT 1":
                send_raw(p.result_set(
                    [p.ColumnDefinition("1", p.MYSQL_TYPE_LONGLONG, p.CHARSET_BINARY, 1,
                                        p.NOT_NULL_FLAG | p.BINARY_FLAG)], [[1]], caps, seq=seq))
            elif upper == "SELECT ROWS":
                send_raw(p.result_set(columns, [[1, "ä"], [2, None]], caps, seq=seq))
            elif upper.startswith("INSERT"):
                send(seq, p.OkPacket(3, 42, p.SERVER_STATUS_AUTOCOMMIT, 1,
                                     "Records: 3  Duplicates: 0  Warnings: 1").build(caps))
            elif upper.startswith(("SET", "COMMIT", "ROLLBACK", "BEGIN")):
                send(seq, p.OkPacket().build(caps))
            else:
                send(seq, p.ErrPacket(1064, f"You have an error in your SQL syntax near '{sql}'",
                                      "42000").build(caps))


def _recv_exact(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("client went away")
        data += chunk
    return data


@pytest.fixture(scope="module")
def keypair():
    return auth.RsaKeyPair.generate()


@pytest.fixture
def built_server(keypair, test_ca):
    servers = []

    def make(users=None, **options):
        users = users or {"native": ("mysql_native_password", "n-pw"),
                          "sha2": ("caching_sha2_password", "s-pw"),
                          "sha2b": ("caching_sha2_password", "s-pw-b"),
                          "clear": ("mysql_clear_password", "token")}
        options.setdefault("keypair", keypair)
        server = BuiltServer(users, **options)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()
        assert not server.errors, server.errors


def test_pymysql_reads_our_packets(built_server):
    server = built_server(default_plugin="mysql_native_password")
    conn = pymysql.connect(host="127.0.0.1", port=server.port, user="native", password="n-pw",
                           database="db", connect_timeout=5)
    try:
        assert conn.get_server_info() == "8.0.36-rdsproxy-test"
        assert conn.thread_id() > 100
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchall() == ((1,),)
            cur.execute("SELECT rows")
            assert [d[0] for d in cur.description] == ["id", "name"]
            assert cur.fetchall() == ((1, "ä"), (2, None))
            assert cur.execute("INSERT INTO t VALUES (1), (2), (3)") == 3
            assert cur.lastrowid == 42
            with pytest.raises(pymysql.err.ProgrammingError) as info:
                cur.execute("SELEKT")
            assert info.value.args[0] == 1064 and "SELEKT" in info.value.args[1]
        conn.ping(reconnect=False)
        conn.commit()
    finally:
        conn.close()
    assert server.events == ["native"]


def test_pymysql_wrong_password_gets_1045(built_server):
    server = built_server(default_plugin="mysql_native_password")
    with pytest.raises(pymysql.err.OperationalError) as info:
        pymysql.connect(host="127.0.0.1", port=server.port, user="native", password="bad",
                        connect_timeout=5)
    assert info.value.args[0] == 1045 and "Access denied for user 'native'" in info.value.args[1]


def test_pymysql_auth_switch(built_server):
    server = built_server(default_plugin="caching_sha2_password")
    conn = pymysql.connect(host="127.0.0.1", port=server.port, user="native", password="n-pw",
                           connect_timeout=5)
    conn.close()
    assert server.events == ["switch", "native"]


def test_pymysql_caching_sha2_rsa_then_fast(built_server):
    server = built_server()
    for _ in range(2):
        conn = pymysql.connect(host="127.0.0.1", port=server.port, user="sha2", password="s-pw",
                               connect_timeout=5)
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
        conn.close()
    # The first login needed full authentication (PyMySQL asked for our key and sent the
    # password RSA-encrypted); the second one hit the cache.
    assert server.events == ["sha2-full-rsa", "sha2-fast"]
    with pytest.raises(pymysql.err.OperationalError) as info:
        pymysql.connect(host="127.0.0.1", port=server.port, user="sha2", password="wrong",
                        connect_timeout=5)
    assert info.value.args[0] == 1045


def test_pymysql_caching_sha2_full_auth_over_tls(built_server, test_ca):
    server = built_server(tls=server_context(test_ca.server_cert, test_ca.server_key))
    conn = pymysql.connect(host="127.0.0.1", port=server.port, user="sha2", password="s-pw",
                           ssl=client_context("verify-full", test_ca.ca_cert), connect_timeout=5)
    conn.close()
    assert server.events == ["sha2-full-tls"]


def test_mariadb_cli_reads_our_packets(built_server):
    # The mariadb client (libmariadb) negotiates CLIENT_DEPRECATE_EOF and session tracking,
    # which PyMySQL does not: the other half of the builders.
    client = shutil.which("mariadb")
    if client is None:
        pytest.skip("no mariadb command-line client")
    server = built_server(default_plugin="mysql_native_password")
    proc = subprocess.run(
        [client, "--no-defaults", "-h127.0.0.1", f"-P{server.port}", "-unative", "-pn-pw",
         "--skip-ssl", "--batch", "-e", "SELECT rows"],
        capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["id\tname", "1\tä", "2\tNULL"]
    assert server.queries[-1] == "SELECT rows"


def test_login_caching_sha2_paths(built_server, keypair, test_ca):
    tls_server = server_context(test_ca.server_cert, test_ca.server_key)
    ctx = client_context("verify-full", test_ca.ca_cert)
    server = built_server(tls=tls_server)
    # Full authentication without TLS: ask for the key, send the password encrypted.
    s = log_in(server.port, "sha2", "s-pw")
    assert s.result.auth_plugin == "caching_sha2_password" and not s.result.tls
    assert not s.result.is_mariadb and s.result.version == "8.0.36-rdsproxy-test"
    assert s.scalar("SELECT 1") == b"1"
    s.close()
    # Cached now: fast authentication.
    log_in(server.port, "sha2", "s-pw").close()
    # Full authentication with a known server key (no request for it).
    log_in(server.port, "sha2b", "s-pw-b", server_public_key=keypair.public_key_pem).close()
    assert server.events == ["sha2-full-rsa", "sha2-fast", "sha2-full-rsa"]
    # Full authentication over TLS sends the password in clear, inside TLS.
    server.cache.clear()
    log_in(server.port, "sha2", "s-pw", tls_context=ctx).close()
    assert server.events[-1] == "sha2-full-tls"
    # Without TLS, without a key and with retrieval off: refused on our side.
    server.cache.clear()
    with pytest.raises(LoginError, match="public key"):
        log_in(server.port, "sha2", "s-pw", allow_public_key_retrieval=False)
    with pytest.raises(p.ServerError) as info:
        log_in(server.port, "sha2", "wrong")
    assert info.value.code == 1045


def test_login_auth_switch_and_clear_password(built_server, test_ca):
    ctx = client_context("verify-full", test_ca.ca_cert)
    server = built_server(tls=server_context(test_ca.server_cert, test_ca.server_key))
    s = log_in(server.port, "native", "n-pw")             # handshake says caching_sha2
    assert s.result.auth_plugin == "mysql_native_password"
    s.close()
    assert server.events == ["switch", "native"]
    s = log_in(server.port, "clear", "token", tls_context=ctx)
    assert s.result.auth_plugin == "mysql_clear_password" and s.result.tls
    s.close()
    with pytest.raises(LoginError, match="mysql_clear_password on a connection without TLS"):
        log_in(server.port, "clear", "token")
    log_in(server.port, "clear", "token", allow_cleartext=True).close()


def test_login_tls_required_but_not_offered(built_server):
    server = built_server(default_plugin="mysql_native_password")
    with pytest.raises(LoginError, match="TLS is required"):
        log_in(server.port, "native", "n-pw", tls="require")
    s = log_in(server.port, "native", "n-pw", tls="prefer")   # falls back to plaintext
    assert not s.result.tls
    s.close()
