"""The MySQL engine end to end at the door: logins and authentication, TLS on either leg,
IAM tokens, health checks, real clients (the `mariadb` command-line client, sysbench) and
the limits on clients and logins.

Like test_mysql_relay.py, test_mysql_isolation.py and test_mysql_faults.py: the session
MariaDB, a proxy made per test by conftest's `make_proxy`, real clients (PyMySQL, and the
sans-IO test client in utils.py for raw packets).
"""
from __future__ import annotations

import json
import re
import socket
import subprocess
import time

import pymysql
import pytest

from harness import (APP_DB, APP_PASSWORD as APP_PW, APP_USER as APP,
                     MARIADB_MAX_CONNECTIONS as MAX_CONNECTIONS, connect, engine, scalar)
from rdsproxy.devservers.mariadb import MariaDBServer
from rdsproxy.engines.mysql import protocol as p


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

# --- TLS ----------------------------------------------------------------------------------

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
        assert px.stats()["ClientConnectionsTLS"] == 1
    finally:
        sock.close()


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

# --- clients: the mariadb command-line client, sysbench -----------------------------------

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


# --- limits -------------------------------------------------------------------------------

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
        # The newest four go once they have waited on their clients for a few seconds.
        for age, sock in enumerate(reversed(waiting)):
            sock.settimeout(15.0 if age < 4 else 0.5)
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
