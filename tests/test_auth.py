"""Authentication: clients to the proxy (scram, md5) and the proxy to servers (every method)."""
from __future__ import annotations

import logging
import socket
import struct
import time
import uuid

import asyncpg
import psycopg
import pytest

from harness import APP_DB, APP_PASSWORD, APP_USER
from utils import run, wait_until

WRONG = "wrong-Pa55word-" + uuid.uuid4().hex[:8]


def connect(dsn, **kw):
    return psycopg.connect(dsn, connect_timeout=10, autocommit=True, **kw)


def assert_auth_failed(exc_info, user=APP_USER):
    exc = exc_info.value
    assert f'password authentication failed for user "{user}"' in str(exc)
    assert exc.sqlstate in (None, "28P01")


async def asyncpg_error(proxy, **kw):
    args = dict(host=proxy.host, port=proxy.port, user=APP_USER, password=APP_PASSWORD,
                database=APP_DB, ssl=False, timeout=10)
    args.update(kw)
    try:
        conn = await asyncpg.connect(**args)
    except asyncpg.PostgresError as exc:
        return exc
    await conn.close()
    return None


def no_password_in_logs(caplog, *secrets):
    assert caplog.records, "expected the failure to be logged"
    for record in caplog.records:
        text = record.getMessage() + repr(record.args) + str(record.exc_text or "")
        for secret in secrets:
            assert secret not in text, f"password leaked into the log: {text!r}"


@pytest.mark.parametrize("client_auth", ["POSTGRES_SCRAM_SHA_256", "POSTGRES_MD5"])
def test_wrong_password(proxy_factory, caplog, client_auth):
    caplog.set_level(logging.INFO, logger="rdsproxy")
    proxy = proxy_factory(client_auth=client_auth)
    with pytest.raises(psycopg.OperationalError) as info:
        connect(proxy.dsn(password=WRONG))
    assert_auth_failed(info)
    err = run(asyncpg_error(proxy, password=WRONG))
    assert isinstance(err, asyncpg.InvalidPasswordError)
    assert err.sqlstate == "28P01"
    failures = [r for r in caplog.records if r.name == "rdsproxy.client"
                and "authentication failed" in r.getMessage()]
    assert len(failures) >= 2
    assert APP_USER in failures[0].getMessage()
    no_password_in_logs(caplog, WRONG, APP_PASSWORD)
    assert proxy.stats()["ClientConnectionsSetupFailedAuth"] >= 2
    # The right password still works.
    with connect(proxy.dsn()) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (APP_USER,)


@pytest.mark.parametrize("client_auth", ["POSTGRES_SCRAM_SHA_256", "POSTGRES_MD5"])
def test_unknown_user(proxy_factory, caplog, client_auth):
    caplog.set_level(logging.INFO, logger="rdsproxy")
    proxy = proxy_factory(client_auth=client_auth)
    with pytest.raises(psycopg.OperationalError) as info:
        connect(proxy.dsn(user="nobody_here", password=WRONG))
    assert_auth_failed(info, user="nobody_here")
    err = run(asyncpg_error(proxy, user="nobody_here", password=WRONG))
    assert isinstance(err, asyncpg.InvalidPasswordError) and err.sqlstate == "28P01"
    no_password_in_logs(caplog, WRONG)


def test_md5_client_auth_works(proxy_factory):
    proxy = proxy_factory(client_auth="POSTGRES_MD5")
    with connect(proxy.dsn()) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == (APP_USER, APP_DB)

    async def via_asyncpg():
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user=APP_USER,
                                     password=APP_PASSWORD, database=APP_DB, ssl=False, timeout=10)
        try:
            return await conn.fetchval("SELECT 1")
        finally:
            await conn.close()
    assert run(via_asyncpg()) == 1


@pytest.mark.parametrize("server_auth", ["scram-sha-256", "md5", "password", "trust"])
def test_proxy_logs_into_server_with_each_method(pg_factory, proxy_factory, server_auth):
    cluster = pg_factory(auth=server_auth, max_connections=20)
    cluster.create_user("app", "app-secret")
    cluster.create_database("appdb", owner="app")
    proxy = proxy_factory(cluster)
    with connect(proxy.dsn()) as conn:
        row = conn.execute("SELECT current_user, current_database(), current_setting('port')").fetchone()
        assert row == ("app", "appdb", str(cluster.port))
    stats = proxy.stats()
    assert stats["pool"]["max"] == 4     # 20% of the new cluster's max_connections=20
    assert stats["pool"]["open"] >= 1


def test_secret_wrong_for_server(pg, proxy_factory):
    # The proxy knows app2 by a password the server does not accept; app is fine.
    user2 = "app2_" + uuid.uuid4().hex[:6]
    pg.create_user(user2, "the-real-one")
    proxy = proxy_factory(users=((APP_USER, APP_PASSWORD), (user2, "stale-password")))
    start = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as info:
        connect(proxy.dsn(user=user2, password="stale-password"))
    assert time.monotonic() - start < 8, "the failure took too long (a hang?)"
    assert "password authentication failed" in str(info.value)
    assert user2 in str(info.value)
    # Same with asyncpg: a proper server error, not a timeout.
    err = run(asyncpg_error(proxy, user=user2, password="stale-password"), timeout=20)
    assert isinstance(err, asyncpg.PostgresError)
    assert err.sqlstate in ("28P01", "28000")
    # The proxy is healthy: other users work, nothing is left borrowed or waiting.
    for _ in range(3):
        with connect(proxy.dsn()) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    wait_until(lambda: proxy.stats()["pool"]["borrowed"] == 0, timeout=5, message="nothing borrowed")
    stats = proxy.stats()
    assert stats["pool"]["waiting"] == 0
    assert stats["pool"]["open"] <= stats["pool"]["max"]


def test_database_does_not_exist(proxy):
    with pytest.raises(psycopg.OperationalError) as info:
        connect(proxy.dsn(dbname="no_such_db"))
    assert 'database "no_such_db" does not exist' in str(info.value)
    assert info.value.sqlstate in (None, "3D000")
    err = run(asyncpg_error(proxy, database="no_such_db"))
    assert isinstance(err, asyncpg.InvalidCatalogNameError)
    assert err.sqlstate == "3D000"
    # And the proxy carries on.
    with connect(proxy.dsn()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def read_message(sock):
    head = b""
    while len(head) < 5:
        chunk = sock.recv(5 - len(head))
        if not chunk:
            return None, b""
        head += chunk
    mtype, length = head[:1], struct.unpack("!I", head[1:])[0]
    body = b""
    while len(body) < length - 4:
        chunk = sock.recv(length - 4 - len(body))
        if not chunk:
            break
        body += chunk
    return mtype, body


def error_fields(body):
    fields = {}
    for part in body.split(b"\x00"):
        if part:
            fields[chr(part[0])] = part[1:].decode()
    return fields


def test_startup_without_user(proxy):
    params = b"database\x00appdb\x00\x00"
    packet = struct.pack("!II", 8 + len(params), 196608) + params
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        sock.sendall(packet)
        mtype, body = read_message(sock)
        assert mtype == b"E"
        fields = error_fields(body)
        assert fields["S"] == "FATAL"
        assert fields["C"] == "28000"
        assert "user" in fields["M"]
        # Then the proxy closes the connection.
        assert sock.recv(1) == b""
