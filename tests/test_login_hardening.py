"""Logins as an attacker abuses them: many parallel guesses, logins held half open.
(Telling users apart by their exchange: test_user_enumeration.py.)"""
from __future__ import annotations

import socket
import struct

from harness import APP_PASSWORD, APP_USER, startup_packet
from utils import message_fields, recv_message

OTHER_USER, OTHER_PASSWORD = "other", "other-secret"


def read_message(sock) -> tuple[int, bytes]:
    mtype, body = recv_message(sock)
    return mtype[0], body


def test_half_open_logins_are_closed_after_login_timeout(proxy_factory):
    """A client that sends half a startup packet (or stops at the password) is told and
    closed after login_timeout, as PostgreSQL does after authentication_timeout; clients
    that log in are not affected."""
    import psycopg
    proxy = proxy_factory(top={"login_timeout": 1})
    half = socket.create_connection((proxy.host, proxy.port), timeout=15)
    half.sendall(startup_packet(APP_USER)[:7])
    at_password = socket.create_connection((proxy.host, proxy.port), timeout=15)
    at_password.sendall(startup_packet(APP_USER))
    assert read_message(at_password)[0] == ord("R")
    with psycopg.connect(proxy.dsn(), autocommit=True) as client:
        for sock in (half, at_password):
            mtype, body = read_message(sock)
            fields = message_fields(body)
            assert (chr(mtype), fields["S"], fields["C"], fields["M"]) == (
                "E", "FATAL", "57014", "canceling authentication due to timeout")
            assert sock.recv(1) == b""
            sock.close()
        assert client.execute("select 1").fetchone() == (1,)


def md5_login(proxy, password: str, source: str = "127.0.0.1") -> str:
    """Log in with md5 from `source`: 'ok', or the error's SQLSTATE."""
    from rdsproxy.auth.md5 import md5_response
    with socket.create_connection((proxy.host, proxy.port), timeout=30,
                                  source_address=(source, 0)) as sock:
        sock.sendall(startup_packet(APP_USER))
        mtype, body = read_message(sock)
        if mtype == ord("E"):   # refused before authentication
            return message_fields(body)["C"]
        assert struct.unpack("!i", body[:4])[0] == 5
        answer = md5_response(password, APP_USER, body[4:8]) + b"\x00"
        sock.sendall(b"p" + struct.pack("!i", len(answer) + 4) + answer)
        mtype, body = read_message(sock)
        if mtype == ord("R"):
            return "ok"
        fields = message_fields(body)
        return fields["C"]


def test_parallel_guesses_from_one_address_are_bounded(proxy_factory):
    """Forty connections guessing at once from one address: once its guesses are spent,
    even the right password is refused from there (unchecked), while another address
    logs in at once."""
    from concurrent.futures import ThreadPoolExecutor
    proxy = proxy_factory(client_auth="POSTGRES_MD5")
    with ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(lambda i: md5_login(proxy, f"guess-{i}"), range(40)))
    assert answers == ["28P01"] * 40
    assert md5_login(proxy, APP_PASSWORD) == "28P01"
    assert md5_login(proxy, APP_PASSWORD, source="127.0.0.2") == "ok"


def test_one_address_cannot_fill_the_proxy_with_half_open_logins(proxy_factory):
    """Thirty half-open logins from one address against max_client_connections 20: beyond
    max_logins_per_address they are closed (53300), and another address logs in."""
    import time
    proxy = proxy_factory(client_auth="POSTGRES_MD5",
                          top={"max_client_connections": 20, "max_logins_per_address": 5})
    slow = []
    for _ in range(30):
        sock = socket.create_connection((proxy.host, proxy.port), timeout=15)
        sock.sendall(startup_packet(APP_USER)[:3])
        slow.append(sock)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            result = md5_login(proxy, APP_PASSWORD, source="127.0.0.2")
        except ConnectionError:
            result = "closed"
        if result == "ok":
            break
        time.sleep(0.2)
    assert result == "ok"
    closed = 0
    for sock in slow:
        sock.settimeout(0.5)
        try:
            _, body = read_message(sock)
        except TimeoutError:
            continue
        fields = message_fields(body)
        if fields.get("C") == "53300":
            closed += 1
        sock.close()
    # At most 20 were admitted (the rest wait, refused, for a startup packet) and only 5
    # of them may stay.
    assert closed >= 20 - 5
