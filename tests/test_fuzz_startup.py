"""Fuzzing the startup and authentication parsers, alone and through a live proxy."""
from __future__ import annotations

import socket
import struct

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from utils import wait_until

from rdsproxy.engines.postgres import protocol as pg


def _startup(params: dict[bytes, bytes], version: int = 196608) -> bytes:
    body = struct.pack("!i", version) + b"".join(k + b"\0" + v + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!i", len(body) + 4) + body


# Mostly well-formed-looking packets with one thing wrong, plus plain noise.
STARTUP_LIKE = st.one_of(
    st.binary(max_size=300),
    st.builds(_startup, st.dictionaries(st.binary(max_size=12), st.binary(max_size=12), max_size=4),
              st.sampled_from([196608, 196609, 131072, 80877103, 80877104, 80877102, 0, -1])),
    st.builds(lambda n, rest: struct.pack("!i", n) + rest,
              st.integers(-2**31, 2**31 - 1), st.binary(max_size=64)),
)


@settings(max_examples=2000, deadline=None)
@given(STARTUP_LIKE)
def test_startup_parser_raises_only_protocol_violations(data):
    try:
        packet, used = pg.read_startup_packet(bytearray(data))
    except pg.ProtocolViolation:
        return
    assert 0 <= used <= len(data)
    assert packet is None or packet.kind in ("startup", "ssl", "gssenc", "cancel")


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_password_message_parsers_raise_only_protocol_violations(payload):
    for parse in (pg.parse_password_message, pg.parse_sasl_initial_response):
        try:
            parse(payload)
        except pg.ProtocolViolation:
            pass


AFTER_STARTUP = st.lists(st.one_of(
    st.binary(min_size=1, max_size=64),
    st.builds(lambda t, body: t + struct.pack("!i", len(body) + 4) + body,
              st.sampled_from([b"p", b"Q", b"X", b"S", b"\0"]), st.binary(max_size=40)),
), min_size=1, max_size=4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=STARTUP_LIKE, then=AFTER_STARTUP)
def test_live_proxy_survives_random_logins(proxy, first, then):
    """Random bytes at the login stage: the proxy answers or hangs up, never breaks."""
    user_startup = _startup({b"user": b"app", b"database": b"appdb"})
    for opening in (first, user_startup):
        with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
            try:
                sock.sendall(opening)
                for chunk in then:
                    sock.sendall(chunk)
                sock.settimeout(0.2)
                while sock.recv(4096):
                    pass
            except (socket.timeout, ConnectionError):
                pass
    # Still serving, and nothing borrowed was left behind.
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    wait_until(lambda: proxy.stats()["pool"]["borrowed"] == 0, message="no leaked connection")
