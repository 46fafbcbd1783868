"""The core's reasons for closing a client (idle timeout, login timeout, too many logins from
one address, shutdown), as each engine's clients read them: PostgreSQL SQLSTATEs, MySQL error
numbers, the same text. Raw sockets, so the last packet before the close is what is checked."""
from __future__ import annotations

import socket
import time

import pytest

from harness import APP_DB, APP_PASSWORD, APP_USER
from rdsproxy.engines.mysql import protocol as p
from rdsproxy.engines.postgres import protocol as pg
from utils import log_in, md5_session, recv_message

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
            assert recv_message(self.sock)[0] == b"R"   # asked for a password: none comes

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
            assert p.Handshake.parse(self._packet())   # the greeting: no answer comes

    def _packet(self) -> bytes:
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.pending += [payload for _seq, payload in self.reader.feed(data)]
        return self.pending.pop(0)

    def last_words(self):
        payload = self.session.recv_packet()[1] if self.session else self._packet()
        error = p.ErrPacket.parse(payload)
        return (error.code, error.sqlstate), error.message

    def close(self):
        self.sock.close()


CLIENTS = {"postgres": PostgresClient, "mysql": MysqlClient}


def _proxy(proxy_factory, engine, **top):
    # md5 for the PostgreSQL client above (the session cluster's SCRAM serves the pool).
    client_auth = {"client_auth": "POSTGRES_MD5"} if engine == "postgres" else {}
    return proxy_factory(engine=engine, top=top, **client_auth)


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
def test_clients_at_shutdown(proxy_factory, engine):
    proxy = _proxy(proxy_factory, engine)
    client = CLIENTS[engine](proxy.port, logged_in=True)
    try:
        proxy.stop()
        assert client.last_words() == (CODES[engine]["shutdown"], TEXTS["shutdown"])
    finally:
        client.close()
