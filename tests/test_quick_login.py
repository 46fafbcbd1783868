"""The relay's quick login lane (pg_relay_py.ClientRelay.quick_login), against a real PostgreSQL.

A client whose startup packet the proxy has parsed before, for an md5 account, is logged in
by the relay itself (salt, password check, greeting) once one login of that packet went the
engine's way. Everything must be as on the engine's path: the greeting, cancel keys, wrong
passwords (28P01, throttled), rotations; and anything unusual must go back to that path.
"""
import json
import socket
import struct
import threading
import time
import urllib.request

import psycopg
import pytest
from harness import (APP_DB, APP_PASSWORD, APP_USER, Bystander, error_code, read_all,
                     startup_packet, write_secret)
from proxyproc import ProxyProcess
from utils import built, free_port, twins

from rdsproxy.auth.md5 import md5_response

READY = b"Z\0\0\0\x05I"


@pytest.fixture
def md5_proxy(proxy_factory):
    return proxy_factory(client_auth="POSTGRES_MD5", max_connections_percent=5)


def quick_logins(proxy) -> int:
    return proxy.stats()["QuickLogins"]


def password_message(salt, password=APP_PASSWORD, user=APP_USER) -> bytes:
    answer = md5_response(password, user, salt) + b"\0"
    return b"p" + struct.pack("!i", len(answer) + 4) + answer


def until_ready(sock) -> bytes:
    got = b""
    while not got.endswith(READY):
        chunk = sock.recv(65536)
        assert chunk, got
        got += chunk
    return got


def salt_of(reply: bytes) -> bytes:
    assert reply[:1] == b"R" and struct.unpack("!i", reply[5:9])[0] == 5, reply
    return reply[9:13]


def test_second_login_takes_the_quick_lane_with_the_same_greeting(md5_proxy):
    def session():
        with psycopg.connect(md5_proxy.dsn(application_name="lane"), autocommit=True) as conn:
            params = {name: conn.info.parameter_status(name) for name in
                      ("server_version", "client_encoding", "DateStyle", "TimeZone",
                       "application_name", "integer_datetimes", "standard_conforming_strings")}
            assert conn.execute("select current_user, 1").fetchone() == (APP_USER, 1)
            return params, conn.info.backend_pid

    before = quick_logins(md5_proxy)
    first, pid1 = session()
    assert quick_logins(md5_proxy) == before           # the engine's path: the plan learns
    second, pid2 = session()
    third, pid3 = session()
    assert quick_logins(md5_proxy) == before + 2
    assert first == second == third and first["application_name"] == "lane"
    assert None not in first.values()
    assert len({pid1, pid2, pid3}) == 3                 # a BackendKeyData each


def test_cancel_reaches_a_quick_lane_session(tmp_path, pg):
    # A subprocess: psycopg's conn.cancel() holds the GIL while it waits (see test_cancel).
    admin = free_port()
    proxy = ProxyProcess(tmp_path / "proxy", pg, [(APP_USER, APP_PASSWORD)],
                         client_auth="POSTGRES_MD5", top={"admin": {"listen": f"127.0.0.1:{admin}"}})
    try:
        def stats():
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats", timeout=10) as reply:
                return json.load(reply)
        dsn = proxy.dsn(user=APP_USER, password=APP_PASSWORD, dbname=APP_DB)
        with psycopg.connect(dsn, autocommit=True):
            pass
        before = stats()["QuickLogins"]
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert stats()["QuickLogins"] == before + 1
            started = time.monotonic()
            threading.Timer(0.5, conn.cancel).start()
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("select pg_sleep(10)")
            assert time.monotonic() - started < 5
            assert conn.execute("select 7").fetchone() == (7,)   # the session goes on
    finally:
        proxy.stop()


def test_wrong_password_on_a_known_packet_is_refused_as_always(md5_proxy):
    sock = socket.create_connection((md5_proxy.host, md5_proxy.port), timeout=5)
    sock.sendall(startup_packet())
    sock.sendall(password_message(salt_of(sock.recv(1024))))
    until_ready(sock)                                    # the plan has its greeting now
    sock.close()
    failed = md5_proxy.stats()["ClientConnectionsSetupFailedAuth"]
    with Bystander(md5_proxy):
        for password in ("wrong", APP_PASSWORD.upper(), ""):
            sock = socket.create_connection((md5_proxy.host, md5_proxy.port), timeout=5)
            sock.sendall(startup_packet())
            sock.sendall(password_message(salt_of(sock.recv(1024)), password))
            reply = read_all(sock)
            assert error_code(reply) == "28P01", reply
            assert b'password authentication failed for user "app"' in reply
            sock.close()
    assert md5_proxy.stats()["ClientConnectionsSetupFailedAuth"] == failed + 3


def test_a_replayed_answer_for_another_salt_is_refused(md5_proxy):
    # Each login has a fresh salt: an md5 answer seen on the wire does not log anyone in.
    def salt_and_answer():
        sock = socket.create_connection((md5_proxy.host, md5_proxy.port), timeout=5)
        sock.sendall(startup_packet())
        salt = salt_of(sock.recv(1024))
        return sock, salt
    sock, salt = salt_and_answer()
    sock.sendall(password_message(salt))
    until_ready(sock)
    sock.close()
    sock, other_salt = salt_and_answer()
    assert other_salt != salt
    sock.sendall(password_message(salt))                 # the old salt's answer
    assert error_code(read_all(sock)) == "28P01"
    sock.close()


def test_unusual_clients_go_the_engines_way(md5_proxy):
    packet = startup_packet()
    with psycopg.connect(md5_proxy.dsn(), autocommit=True):
        pass
    sock = socket.create_connection((md5_proxy.host, md5_proxy.port), timeout=5)
    sock.sendall(packet)
    sock.sendall(password_message(salt_of(sock.recv(1024))))
    until_ready(sock)
    sock.close()
    before = quick_logins(md5_proxy)

    # The startup packet in two pieces.
    sock = socket.create_connection((md5_proxy.host, md5_proxy.port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(packet[:7])
    time.sleep(0.1)
    sock.sendall(packet[7:])
    sock.sendall(password_message(salt_of(sock.recv(1024))))
    until_ready(sock)
    sock.close()

    # The password and a query in one chunk (the engine's path keeps what follows).
    sock = socket.create_connection((md5_proxy.host, md5_proxy.port), timeout=5)
    sock.sendall(packet)
    query = b"select 42\0"
    sock.sendall(password_message(salt_of(sock.recv(1024)))
                 + b"Q" + struct.pack("!i", len(query) + 4) + query)
    got = until_ready(sock)
    while b"42" not in got or not got.endswith(READY):
        got += sock.recv(65536)
    sock.close()
    assert quick_logins(md5_proxy) == before

    # A password message of the right size with a broken layout: refused, nothing else hurt.
    with Bystander(md5_proxy):
        sock = socket.create_connection((md5_proxy.host, md5_proxy.port), timeout=5)
        sock.sendall(packet)
        salt_of(sock.recv(1024))
        broken = bytearray(password_message(b"\0\0\0\0"))
        broken[-1] = 0x41                               # no terminating NUL
        sock.sendall(bytes(broken))
        assert error_code(read_all(sock)) in ("08P01", "28P01")
        sock.close()


SSL_REQUEST = struct.pack("!ii", 8, 80877103)
GSSENC_REQUEST = struct.pack("!ii", 8, 80877104)


def test_libpq_default_sslmode_takes_the_quick_lane_when_tls_is_not_offered(md5_proxy):
    # sslmode=prefer (libpq's and so psql's, pgbench's and psycopg's default) opens with an
    # SSLRequest; a proxy without TLS says 'N' and the login goes on in the clear.
    def session():
        with psycopg.connect(md5_proxy.dsn(sslmode="prefer", gssencmode="disable"),
                             autocommit=True) as conn:
            assert conn.info.pgconn.ssl_in_use is False
            return conn.execute("select current_user").fetchone()[0]
    assert session() == APP_USER
    before = quick_logins(md5_proxy)
    assert session() == APP_USER
    assert session() == APP_USER
    assert quick_logins(md5_proxy) == before + 2


@pytest.mark.parametrize("request_packet", [SSL_REQUEST, GSSENC_REQUEST], ids=["ssl", "gssenc"])
def test_an_encryption_request_is_declined_once_then_the_login_runs(md5_proxy, request_packet):
    def login(first):
        sock = socket.create_connection((md5_proxy.host, md5_proxy.port), timeout=5)
        sock.sendall(first)
        assert sock.recv(16) == b"N"
        sock.sendall(startup_packet())
        sock.sendall(password_message(salt_of(sock.recv(1024))))
        until_ready(sock)
        sock.sendall(b"X\0\0\0\x04")
        sock.close()
    login(request_packet)
    before = quick_logins(md5_proxy)
    login(request_packet)
    assert quick_logins(md5_proxy) == before + 1
    # A second request after the 'N' is the engine's (it declines again): still served.
    sock = socket.create_connection((md5_proxy.host, md5_proxy.port), timeout=5)
    sock.sendall(request_packet)
    assert sock.recv(16) == b"N"
    sock.sendall(SSL_REQUEST)
    assert sock.recv(16) == b"N"
    sock.sendall(startup_packet())
    sock.sendall(password_message(salt_of(sock.recv(1024))))
    until_ready(sock)
    sock.close()


def test_a_proxy_with_tls_runs_the_handshake_for_an_ssl_request(proxy_factory, test_ca):
    proxy = proxy_factory(client_auth="POSTGRES_MD5",
                          tls={"cert_file": test_ca.server_cert, "key_file": test_ca.server_key})
    for _ in range(3):
        with psycopg.connect(proxy.dsn(sslmode="require"), autocommit=True) as conn:
            assert conn.info.pgconn.ssl_in_use is True
            assert conn.execute("select 1").fetchone() == (1,)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:   # sslmode=disable: quick
        assert conn.execute("select 1").fetchone() == (1,)


def test_a_rotated_password_takes_effect_in_the_quick_lane(md5_proxy, pg, tmp_path):
    def login(password):
        with psycopg.connect(md5_proxy.dsn(password=password), autocommit=True) as conn:
            return conn.execute("select 1").fetchone()[0]
    assert login(APP_PASSWORD) == 1
    assert login(APP_PASSWORD) == 1
    before = quick_logins(md5_proxy)
    assert before >= 1
    new = APP_PASSWORD + "-rotated"
    pg.psql(f"ALTER ROLE {APP_USER} PASSWORD '{new}'")
    try:
        write_secret(tmp_path, APP_USER, new)            # the file the proxy's secret names
        md5_proxy.call(md5_proxy.proxy.reload)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            login(APP_PASSWORD)
        assert login(new) == 1
        assert login(new) == 1
        assert quick_logins(md5_proxy) > before          # the new password, quick again
    finally:
        pg.psql(f"ALTER ROLE {APP_USER} PASSWORD '{APP_PASSWORD}'")


# -- the lane's C pieces against their pure twins (no database) ----------------------------
import random  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

RELAY = twins("pg_relay")
LEDGER = twins("ledger")


def block_of(seed: int) -> bytes:
    return random.Random(seed).randbytes(4096)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2 ** 32), st.lists(st.integers(1, 16), max_size=600))
def test_entropy_hands_out_each_byte_once_alike_in_both_twins(seed, sizes):
    block = block_of(seed)
    outs = {}
    for name, ledger in built(LEDGER).items():
        blocks = iter([block, block[::-1]] * 100)
        entropy = ledger.Entropy(lambda n: next(blocks))
        outs[name] = [entropy.take(n) for n in sizes]
    reference = outs["py"]
    assert all(got == reference for got in outs.values())
    assert [len(x) for x in reference] == sizes
    joined = b"".join(reference)
    # Until a block runs out, the pieces are consecutive bytes of it, none used twice.
    first = 0
    for size in sizes:
        if first + size > 4096:
            break
        first += size
    assert joined[:first] == block[:first]


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2 ** 32))
def test_cancel_keys_alike_in_both_twins(seed):
    block = block_of(seed)
    keys = {}
    for name, relay in built(RELAY).items():
        blocks = iter([block] + [bytes(range(256)) * 16] * 10)
        desk = relay.LoginDesk(LEDGER[name].Entropy(lambda n: next(blocks)), None, None, None, {})
        keys[name] = [desk.register_cancel_key(object()) for _ in range(100)]
        assert len(desk.by_pid) == len({pid for pid, _ in keys[name]}) == 100
    assert all(got == keys["py"] for got in keys.values())
    for pid, secret in keys["py"]:
        assert 0 < pid < 2 ** 31 and 0 <= secret < 2 ** 32
