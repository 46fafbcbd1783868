"""Logins as an attacker tries them: telling known users from unknown ones by the exchange,
guessing passwords over many parallel connections, and holding logins half open.

Raw sockets speak the protocol, so the tests see every byte the proxy sends and can come
from a second loopback address (127.0.0.2) to show that one address's abuse is its own.
"""
from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import struct

import pytest
from harness import APP_DB, APP_PASSWORD, APP_USER
from differential import Differential
from utils import recv_message

from rdsproxy.auth.md5 import md5_response
from rdsproxy.auth.scram import (
    ScramClient,
    ScramError,
    ScramServer,
    decoy_server_key_material,
)
from rdsproxy.engines.postgres import protocol as wire

WRONG_PASSWORD = "not-the-password"
UNKNOWN_USER = "zzz"          # as long as APP_USER: the error text names the user


def raw_connection(port, *, source="127.0.0.1", context=None, timeout=10.0):
    """A TCP connection to the proxy from `source` (any 127.x address works on loopback);
    with `context`, after an SSLRequest the proxy accepted, a TLS one."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    if context is not None:
        sock.sendall(struct.pack("!ii", 8, wire.SSL_REQUEST_CODE))
        assert sock.recv(1) == b"S"
        sock = context.wrap_socket(sock, server_hostname="localhost")
    return sock


def login_transcript(port, user, password=WRONG_PASSWORD, **connect) -> list:
    """Log in by hand and record what an attacker can compare between two user names: each
    message's type and length, authentication requests by code (SCRAM's server-first by
    the length of each attribute, and its iteration count), and the final error's fields."""
    sock = raw_connection(port, **connect)
    seen = []
    scram = None
    try:
        sock.sendall(wire.startup_message({"user": user, "database": APP_DB}))
        while True:
            mtype, body = recv_message(sock)
            if mtype == b"E":
                fields = wire.parse_error_fields(body)
                # The text names the user: compared without the name (same length here).
                text = fields.get("M", "").replace(f'"{user}"', '"<user>"')
                seen.append(("E", len(body), fields.get("S"), fields.get("C"), text))
                return seen
            if mtype != b"R":
                seen.append((mtype.decode(), len(body)))
                return seen
            code = struct.unpack("!i", body[:4])[0]
            if code == wire.AUTH_SASL:
                seen.append(("R", len(body), code, body[4:]))
                scram = ScramClient(password)
                sock.sendall(wire.sasl_initial_response("SCRAM-SHA-256", scram.client_first()))
            elif code == wire.AUTH_SASL_CONTINUE:
                attrs = dict(part.split(b"=", 1) for part in body[4:].split(b","))
                seen.append(("R", len(body), code, len(attrs[b"r"]), len(attrs[b"s"]), attrs[b"i"]))
                sock.sendall(wire.password_message(scram.handle_server_first(body[4:])))
            elif code == wire.AUTH_MD5:
                seen.append(("R", len(body), code))
                sock.sendall(wire.password_message(md5_response(password, user, body[4:8]) + b"\0"))
            elif code == wire.AUTH_CLEARTEXT:
                seen.append(("R", len(body), code))
                sock.sendall(wire.password_message(password.encode() + b"\0"))
            else:
                seen.append(("R", len(body), code))
                return seen
    finally:
        sock.close()


def scram_salt(port, user, **connect) -> bytes:
    """The salt the server's first SCRAM message names for `user`."""
    sock = raw_connection(port, **connect)
    try:
        sock.sendall(wire.startup_message({"user": user, "database": APP_DB}))
        mtype, body = recv_message(sock)
        assert mtype == b"R" and struct.unpack("!i", body[:4])[0] == wire.AUTH_SASL, body
        sock.sendall(wire.sasl_initial_response("SCRAM-SHA-256", ScramClient("x").client_first()))
        mtype, body = recv_message(sock)
        attrs = dict(part.split(b"=", 1) for part in body[4:].split(b","))
        return base64.b64decode(attrs[b"s"])
    finally:
        sock.close()


def shape(transcript) -> list:
    """A transcript without lengths: what PostgreSQL and the proxy must agree on."""
    out = []
    for entry in transcript:
        if entry[0] == "E":
            out.append(("E",) + entry[2:])
        else:
            out.append(entry[:1] + entry[2:3])
    return out


# -- user enumeration ------------------------------------------------------------------

@pytest.fixture
def md5_cluster(pg_factory):
    """A PostgreSQL asking for md5, with APP_USER's password stored as md5 (stored as SCRAM,
    PostgreSQL would ask that user for SCRAM even under md5)."""
    cluster = pg_factory(auth="md5", settings={"password_encryption": "md5"})
    cluster.create_user(APP_USER, APP_PASSWORD)
    cluster.create_database(APP_DB, owner=APP_USER)
    return cluster


def known_and_unknown(side) -> dict:
    """The scenario: a wrong password for the known user and for an unknown one, compared."""
    known = login_transcript(side.port, APP_USER)
    unknown = login_transcript(side.port, UNKNOWN_USER)
    return {"exchange": shape(known), "unknown user answered alike": known == unknown}


@pytest.mark.parametrize("client_auth", ["POSTGRES_SCRAM_SHA_256", "POSTGRES_MD5"])
def test_an_unknown_user_gets_the_exchange_of_a_known_one(proxy_factory, pg, md5_cluster,
                                                         client_auth):
    cluster = md5_cluster if client_auth == "POSTGRES_MD5" else pg
    proxy = proxy_factory(cluster, client_auth=client_auth)
    seen = Differential(cluster, proxy).assert_same(known_and_unknown)
    assert seen["unknown user answered alike"]
    method = wire.AUTH_SASL if client_auth == "POSTGRES_SCRAM_SHA_256" else wire.AUTH_MD5
    assert seen["exchange"][0] == ("R", method)
    assert seen["exchange"][-1] == ("E", "FATAL", "28P01",
                                    'password authentication failed for user "<user>"')
    # The quick lane answers known md5 packets it has seen; a second round goes through it.
    assert login_transcript(proxy.port, APP_USER) == login_transcript(proxy.port, UNKNOWN_USER)


def test_scram_salts_do_not_tell_unknown_users_apart(proxy_factory):
    # A salt is the same each time for one user, and differs between users, known or not:
    # one shared stand-in salt would mark every name that shows it as unknown.
    proxy = proxy_factory()
    salts = {user: scram_salt(proxy.port, user) for user in (APP_USER, "zzz", "yyy")}
    assert len(set(salts.values())) == 3
    assert all(scram_salt(proxy.port, user) == salt for user, salt in salts.items())
    assert {len(salt) for salt in salts.values()} == {16}


@pytest.fixture
def accounts_proxy(proxy_factory, pg):
    """make(accounts=[(user, client_password_auth_type, iam_auth)], tls=..., iam=..., top=...):
    a proxy whose accounts use different methods (each with APP_PASSWORD)."""
    def make(accounts, *, tls=None, iam=None, top=None):
        for user, _, _ in accounts:   # the health checks log in as the first one
            pg.psql(f"DO $$ BEGIN CREATE ROLE {user} LOGIN PASSWORD '{APP_PASSWORD}'; "
                    "EXCEPTION WHEN duplicate_object THEN NULL; END $$")
        return proxy_factory(users=[(user, APP_PASSWORD) for user, _, _ in accounts],
                             client_auth={user: method for user, method, _ in accounts},
                             iam_auth={user: iam_auth for user, _, iam_auth in accounts},
                             tls=tls, iam=iam, top=top, max_connections_percent=20)

    return make


SCRAM, MD5 = "POSTGRES_SCRAM_SHA_256", "POSTGRES_MD5"


def test_a_decoy_secret_is_stable_per_name_and_no_password_passes_it():
    key = os.urandom(32)
    secret = decoy_server_key_material(key, "zzz")
    assert secret == decoy_server_key_material(key, "zzz")
    assert secret.salt != decoy_server_key_material(key, "yyy").salt
    assert secret.salt != decoy_server_key_material(os.urandom(32), "zzz").salt
    assert (len(secret.salt), secret.iterations) == (16, 4096)   # as a real account's
    for password in ("", "zzz", APP_PASSWORD, key.hex()):
        server, client = ScramServer(secret), ScramClient(password)
        final = client.handle_server_first(server.handle_client_first(client.client_first()))
        with pytest.raises(ScramError):
            server.handle_client_final(final)


def test_with_mixed_methods_an_unknown_user_looks_like_the_most_common(accounts_proxy):
    # Unknown users get the method most accounts use: they look like one of those.
    for methods, common in (((SCRAM, SCRAM, MD5), SCRAM), ((MD5, SCRAM, MD5), MD5)):
        accounts = [(user, method, "DISABLED") for user, method in zip(("ann", "bob", "cat"), methods)]
        proxy = accounts_proxy(accounts)
        like = next(user for user, method, _ in accounts if method == common)
        code = wire.AUTH_SASL if common == SCRAM else wire.AUTH_MD5
        assert login_transcript(proxy.port, like)[0][2] == code
        assert login_transcript(proxy.port, "zzz") == login_transcript(proxy.port, like)
        # The same once the packets are known (md5's quick lane answers those).
        assert login_transcript(proxy.port, "zzz") == login_transcript(proxy.port, like)
    # A tie goes to SCRAM, the default method.
    proxy = accounts_proxy([("ann", MD5, "DISABLED"), ("bob", SCRAM, "DISABLED")])
    assert login_transcript(proxy.port, "zzz") == login_transcript(proxy.port, "bob")


@pytest.fixture
def iam_settings(tmp_path, test_ca):
    principal = tmp_path / "principal.json"
    principal.write_text(json.dumps({"AccessKeyId": "AKIAIOSFODNN7EXAMPLE",
                                     "SecretAccessKey": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}))
    return {"tls": {"cert_file": test_ca.server_cert, "key_file": test_ca.server_key},
            "iam": {"region": "us-east-1", "principals": [{
                "secret_access_key": "file:principal.json", "resources": ["*"]}]}}


def test_an_iam_user_looks_like_an_unknown_user(accounts_proxy, iam_settings, test_ca):
    context = ssl.create_default_context(cafile=test_ca.ca_cert)
    # One IAM account: over TLS unknown users are asked for a token (a cleartext password)
    # as the IAM user is; over plaintext the IAM user, who cannot log in there, is answered
    # as an unknown user is.
    proxy = accounts_proxy([("ann", SCRAM, "REQUIRED")], **iam_settings)
    over_tls = login_transcript(proxy.port, "ann", context=context)
    assert over_tls[0] == ("R", 4, wire.AUTH_CLEARTEXT)
    assert login_transcript(proxy.port, "zzz", context=context) == over_tls
    plain = login_transcript(proxy.port, "ann")
    assert plain[0][2] == wire.AUTH_SASL
    assert login_transcript(proxy.port, "zzz") == plain
    assert plain[-1][2:] == ("FATAL", "28P01", 'password authentication failed for user "<user>"')
    # Two IAM accounts and one SCRAM account: the same over TLS; over plaintext the
    # unknown user looks like the SCRAM one (the only method used there).
    proxy = accounts_proxy([("ann", SCRAM, "REQUIRED"), ("bob", MD5, "OPTIONAL"),
                            ("cat", SCRAM, "DISABLED")], **iam_settings)
    assert (login_transcript(proxy.port, "zzz", context=context)
            == login_transcript(proxy.port, "ann", context=context)
            == login_transcript(proxy.port, "bob", context=context))
    assert login_transcript(proxy.port, "cat", context=context)[0][2] == wire.AUTH_SASL
    assert login_transcript(proxy.port, "zzz") == login_transcript(proxy.port, "cat")
