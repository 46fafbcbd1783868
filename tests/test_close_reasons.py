"""The core's reasons for closing a client (idle timeout, login timeout, too many logins from
one address, shutdown), as each engine's clients read them: PostgreSQL SQLSTATEs, MySQL error
numbers, the same text. Raw sockets, so the last packet before the close is what is checked."""
from __future__ import annotations

import socket
import struct
import threading
import time

import psycopg
import pymysql
import pytest

from harness import APP_DB, APP_PASSWORD, APP_USER, ONE_CONNECTION
from rdsproxy.engines.mysql import protocol as p
from rdsproxy.engines.mysql.server_login import ServerLogin
from rdsproxy.engines.postgres import protocol as pg
from rdsproxy.auth.md5 import md5_response
from utils import Session, drive_login, log_in, md5_session, recv_message

TEXTS = {
    "idle": "terminating connection due to idle_client_timeout",
    "login": "canceling authentication due to timeout",
    "address": "too many connections logging in from this address (max_logins_per_address)",
    "shutdown": "terminating connection because the proxy is shutting down",
}
CODES = {
    "postgres": {"idle": "57P05", "login": "57014", "address": "53300", "shutdown": "57P01"},
    "mysql": {"idle": (4031, "HY000"), "login": (1158, "08S01"), "address": (1040, "08004"),
              "shutdown": (1053, "08S01")},
}
ENGINES = pytest.mark.parametrize("engine", ["postgres", "mysql"])


class PostgresClient:
    """A client socket of the PostgreSQL engine, logged in (md5) or stopped mid-login."""

    def __init__(self, port: int, logged_in: bool):
        if logged_in:
            self.sock = md5_session("127.0.0.1", port, APP_USER, APP_PASSWORD, APP_DB)
        else:
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            self.sock.sendall(pg.startup_message({"user": APP_USER, "database": APP_DB}))
            mtype, body = recv_message(self.sock)
            assert mtype == b"R"   # asked for a password: none comes (until finish_login)
            self.salt = body[4:8]

    def finish_login(self):
        answer = md5_response(APP_PASSWORD, APP_USER, self.salt) + b"\0"
        self.sock.sendall(b"p" + struct.pack("!i", len(answer) + 4) + answer)
        self._until_ready()

    def select_one(self):
        self.sock.sendall(pg.query("select 1"))
        return int(self._until_ready()[-1][1][6:].decode())

    def _until_ready(self) -> list:
        messages = []
        while not messages or messages[-1][0] != b"Z":
            messages.append(recv_message(self.sock))
            assert messages[-1][0] != b"E", pg.parse_error_fields(messages[-1][1])
        return [m for m in messages if m[0] == b"D"] or messages

    def last_words(self):
        """(code, text) of the error the proxy sent before closing."""
        while True:
            mtype, body = recv_message(self.sock)
            if mtype == b"E":
                fields = pg.parse_error_fields(body)
                return fields["C"], fields["M"]

    def close(self):
        self.sock.close()


class MysqlClient:
    """A client socket of the MySQL engine, logged in or stopped after the greeting."""

    def __init__(self, port: int, logged_in: bool):
        if logged_in:
            self.session = log_in(port, APP_USER, APP_PASSWORD, APP_DB)
            self.sock = self.session.sock
        else:
            self.session = None
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            self.reader = p.PacketReader()
            self.pending: list[bytes] = []
            self.received = b""
            assert p.Handshake.parse(self._packet())   # the greeting: no answer comes

    def finish_login(self):
        login = ServerLogin(APP_USER, APP_PASSWORD, APP_DB)
        first = login.receive_data(self.received)   # the greeting, read already
        self.session = Session(drive_login(self.sock, login, first), login)

    def select_one(self):
        return int(self.session.scalar("select 1"))

    def _packet(self) -> bytes:
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.received += data
            self.pending += [payload for _seq, payload in self.reader.feed(data)]
        return self.pending.pop(0)

    def last_words(self):
        payload = self.session.recv_packet()[1] if self.session else self._packet()
        error = p.ErrPacket.parse(payload)
        return (error.code, error.sqlstate), error.message

    def close(self):
        self.sock.close()


CLIENTS = {"postgres": PostgresClient, "mysql": MysqlClient}


def _proxy(proxy_factory, engine, target_group=None, **top):
    # md5 for the PostgreSQL client above (the session cluster's SCRAM serves the pool).
    client_auth = {"client_auth": "POSTGRES_MD5"} if engine == "postgres" else {}
    return proxy_factory(engine=engine, top=top, **client_auth, **(target_group or {}))


@ENGINES
def test_idle_client(proxy_factory, engine):
    proxy = _proxy(proxy_factory, engine, idle_client_timeout=1)
    client = CLIENTS[engine](proxy.port, logged_in=True)
    try:
        assert client.last_words() == (CODES[engine]["idle"], TEXTS["idle"])
    finally:
        client.close()


@ENGINES
def test_client_that_does_not_finish_its_login(proxy_factory, engine):
    proxy = _proxy(proxy_factory, engine, login_timeout=1)
    started = time.monotonic()
    client = CLIENTS[engine](proxy.port, logged_in=False)
    try:
        assert client.last_words() == (CODES[engine]["login"], TEXTS["login"])
        assert time.monotonic() - started < 5
    finally:
        client.close()


@ENGINES
def test_logins_from_one_address_beyond_the_cap(proxy_factory, engine):
    proxy = _proxy(proxy_factory, engine, max_logins_per_address=1)
    first = CLIENTS[engine](proxy.port, logged_in=False)
    time.sleep(1.2)   # clients are stamped with the proxy's one-second clock: the newest goes
    second = CLIENTS[engine](proxy.port, logged_in=False)
    try:
        assert second.last_words() == (CODES[engine]["address"], TEXTS["address"])
        first.sock.settimeout(0.5)
        with pytest.raises(socket.timeout):   # the older one may go on logging in
            first.sock.recv(1)
    finally:
        first.close()
        second.close()


@ENGINES
def test_logins_a_few_seconds_late_are_not_half_open(proxy_factory, engine):
    """Logins from one address beyond the cap that wait on their clients for a moment (a
    busy host opening many connections at once) are let be while the proxy has room."""
    proxy = _proxy(proxy_factory, engine, max_logins_per_address=2)
    clients = [CLIENTS[engine](proxy.port, logged_in=False) for _ in range(6)]
    try:
        time.sleep(2.5)   # two housekeeping rounds, each login waiting on its client
        for client in clients:
            client.finish_login()
            assert client.select_one() == 1
    finally:
        for client in clients:
            client.close()


def _connect(engine, proxy, **extra):
    if engine == "postgres":
        return psycopg.connect(proxy.dsn(connect_timeout=30, **extra), autocommit=True)
    return pymysql.connect(host=proxy.host, port=proxy.port, user=APP_USER,
                           password=APP_PASSWORD, database=APP_DB, connect_timeout=30, **extra)


def _select_one(conn):
    with conn.cursor() as cur:
        cur.execute("select 1")
        return cur.fetchone()[0]


@ENGINES
def test_a_burst_waiting_on_the_pool_is_not_closed_for_its_address(proxy_factory, engine):
    """Authenticated clients waiting for the proxy (the first login of their kind borrows a
    connection) are neither half-open logins nor late ones: a burst from one address beyond
    the cap, held past login_timeout by a pool that is busy, all log in."""
    proxy = _proxy(proxy_factory, engine, max_logins_per_address=2, login_timeout=1,
                   target_group=ONE_CONNECTION)
    holder = _connect(engine, proxy)
    # A kind of login the proxy has not seen: its first borrows a connection to learn it.
    unseen = {"dbname": "postgres"} if engine == "postgres" else {"charset": "latin1"}
    try:
        with holder.cursor() as cur:   # the pool's one connection, held by a transaction
            cur.execute("begin")
            cur.execute("select 1")
        results: dict = {}

        def connect_one(n):
            try:
                results[n] = _connect(engine, proxy, **unseen)
            except Exception as exc:  # noqa: BLE001 - compared below
                results[n] = exc

        burst = [threading.Thread(target=connect_one, args=(n,)) for n in range(8)]
        for thread in burst:
            thread.start()
        time.sleep(2.5)
        assert results == {}   # still waiting on the pool
        with holder.cursor() as cur:
            cur.execute("commit")
        for thread in burst:
            thread.join(60)
        try:
            assert [_select_one(results[n]) for n in range(8)] == [1] * 8
        finally:
            for conn in results.values():
                if not isinstance(conn, Exception):
                    conn.close()
    finally:
        holder.close()


@ENGINES
def test_clients_at_shutdown(proxy_factory, engine):
    proxy = _proxy(proxy_factory, engine)
    client = CLIENTS[engine](proxy.port, logged_in=True)
    try:
        proxy.stop()
        assert client.last_words() == (CODES[engine]["shutdown"], TEXTS["shutdown"])
    finally:
        client.close()
