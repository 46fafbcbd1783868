"""Tests for SCRAM-SHA-256 and md5 (rdsproxy.auth), including logins to a throwaway PostgreSQL."""
import base64
import hashlib
import hmac
import os
import pwd
import shutil
import socket
import struct
import subprocess
import tempfile

import pytest
from hypothesis import given, settings, strategies as st

from rdsproxy.auth import (
    ScramClient,
    ScramError,
    ScramSecret,
    ScramServer,
    make_server_key_material,
    md5_password_hash,
    md5_response,
    md5_verify,
)
from rdsproxy.auth.scram import saslprep_password

# RFC 7677 section 3.
RFC_CLIENT_NONCE = b"rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = b"%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
RFC_CLIENT_FINAL = (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


@pytest.fixture(scope="module")
def pencil_secret():
    return make_server_key_material("pencil", RFC_SALT, 4096)


def test_rfc7677_vector_server(pencil_secret):
    server = ScramServer(pencil_secret, nonce=RFC_SERVER_NONCE)
    assert server.handle_client_first(RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert server.handle_client_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL


def test_rfc7677_vector_client():
    client = ScramClient("pencil", nonce=RFC_CLIENT_NONCE, username="user")
    assert client.client_first() == RFC_CLIENT_FIRST
    assert client.handle_server_first(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    client.verify_server_final(RFC_SERVER_FINAL)


def test_secret_shape(pencil_secret):
    assert isinstance(pencil_secret, ScramSecret)
    assert pencil_secret.salt == RFC_SALT and pencil_secret.iterations == 4096
    assert len(pencil_secret.stored_key) == len(pencil_secret.server_key) == 32
    with pytest.raises(Exception):
        pencil_secret.salt = b"x"  # frozen
    random_salt = make_server_key_material("pencil", iterations=1)
    assert len(random_salt.salt) == 16
    with pytest.raises(ValueError):
        make_server_key_material("pencil", iterations=0)


def _round_trip(server_password, client_password, iterations=4096):
    secret = make_server_key_material(server_password, iterations=iterations)
    server = ScramServer(secret)
    client = ScramClient(client_password)
    first = client.client_first()
    assert first.startswith(b"n,,n=,r=")
    client_final = client.handle_server_first(server.handle_client_first(first))
    client.verify_server_final(server.handle_client_final(client_final))


def test_round_trip():
    _round_trip("s3cret", "s3cret")
    _round_trip("", "")
    _round_trip("p\u00e4ssw\u00f6rd \u2168", "p\u00e4ssw\u00f6rd \u2168")


def test_saslprep_equivalent_passwords_match():
    # Soft hyphen maps to nothing, U+2168 (Roman numeral nine) NFKC-normalises to "IX".
    _round_trip("pass\u00adword\u2168", "password\u2168")
    _round_trip("\u00e9\u2168", "\u00e9IX")


def test_saslprep_rules():
    assert saslprep_password("plain ascii\x07") == b"plain ascii\x07"  # ASCII passes as is
    assert saslprep_password("a\u00adb\u2003c") == b"ab c"
    assert saslprep_password("\uff21") == b"A"  # fullwidth A
    # Prohibited (control char, bidi mix, empty after mapping): raw UTF-8 is used.
    assert saslprep_password("\u00e9\u0007") == "\u00e9\u0007".encode()
    assert saslprep_password("\u05d0a") == "\u05d0a".encode()
    assert saslprep_password("\u00ad") == "\u00ad".encode()


def test_wrong_password_rejected():
    with pytest.raises(ScramError) as info:
        _round_trip("right", "wrong")
    assert "right" not in str(info.value) and "wrong" not in str(info.value)


def _started_exchange(password="pw"):
    server = ScramServer(make_server_key_material("pw", iterations=16))
    client = ScramClient(password)
    final = client.handle_server_first(server.handle_client_first(client.client_first()))
    return server, client, final


def test_tampered_proof_rejected():
    server, _, final = _started_exchange()
    head, proof = final.rsplit(b",p=", 1)
    raw = bytearray(base64.b64decode(proof))
    raw[0] ^= 1
    with pytest.raises(ScramError):
        server.handle_client_final(head + b",p=" + base64.b64encode(bytes(raw)))


def test_tampered_nonce_rejected():
    server, _, final = _started_exchange()
    with pytest.raises(ScramError, match="nonce"):
        server.handle_client_final(final.replace(b",r=", b",r=X", 1))


def test_channel_binding_rejected():
    server = ScramServer(make_server_key_material("pw", iterations=16))
    with pytest.raises(ScramError, match="channel binding"):
        server.handle_client_first(b"p=tls-server-end-point,,n=,r=abc")


def test_channel_binding_data_must_match_header():
    server, _, final = _started_exchange()
    with pytest.raises(ScramError):
        server.handle_client_final(final.replace(b"c=biws", b"c=eSws", 1))


def _client_final(password: str, client_first: bytes, server_first: bytes) -> bytes:
    """The client-final-message for `client_first` (RFC 5802, computed here step by step)."""
    attrs = dict(item.split(b"=", 1) for item in server_first.split(b","))
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs[b"s"]),
                                 int(attrs[b"i"]))
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    gs2_header, bare = client_first.split(b",", 2)[:2], client_first.split(b",", 2)[2]
    without_proof = (b"c=" + base64.b64encode(b",".join(gs2_header) + b",") + b",r="
                     + attrs[b"r"])
    auth_message = bare + b"," + server_first + b"," + without_proof
    signature = hmac.new(hashlib.sha256(client_key).digest(), auth_message, "sha256").digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature))
    return without_proof + b",p=" + base64.b64encode(proof)


def test_server_accepts_any_username_and_y_flag():
    """PostgreSQL takes the user from the startup packet, so the SCRAM user name may be
    anything (even empty); a client that could bind channels but thinks the server cannot
    says `y`. Each such login completes with the right password."""
    secret = make_server_key_material("pw", iterations=16)
    for first in (b"n,,n=,r=abc", b"n,,n=someone=2Celse,r=abc", b"y,,n=x,r=abc"):
        server = ScramServer(secret)
        server_first = server.handle_client_first(first)
        assert server_first.startswith(b"r=abc") and len(server_first.split(b",")[0]) > 5
        server_final = server.handle_client_final(_client_final("pw", first, server_first))
        assert server_final.startswith(b"v=")
        wrong = ScramServer(secret)
        with pytest.raises(ScramError):
            wrong.handle_client_final(_client_final("nope", first,
                                                    wrong.handle_client_first(first)))


def test_server_one_attempt_only():
    server, _, final = _started_exchange()
    server.handle_client_final(final)
    with pytest.raises(ScramError):
        server.handle_client_final(final)
    with pytest.raises(ScramError):
        ScramServer(make_server_key_material("pw", iterations=16)).handle_client_final(final)


def test_client_rejects_bad_server_first():
    def fresh():
        c = ScramClient("pw", nonce=b"abc")
        c.client_first()
        return c
    for bad in (b"r=xyz123,s=QUJD,i=4096",        # nonce not extending ours
                b"r=abc,s=QUJD,i=4096",           # nonce not extended at all
                b"r=abcdef,s=QUJD,i=0",           # iterations < 1
                b"r=abcdef,s=QUJD,i=-1",
                b"r=abcdef,s=QUJD,i=99999999999",
                b"r=abcdef,s=!!!,i=4096",         # bad base64
                b"r=abcdef,s=,i=4096",            # empty salt
                b"r=abcdef,i=4096",               # missing salt
                b"m=x,r=abcdef,s=QUJD,i=1",
                b"\xff\xfe",
                b""):
        with pytest.raises(ScramError):
            fresh().handle_server_first(bad)


def test_client_rejects_bad_server_final():
    secret = make_server_key_material("pw", iterations=16)
    server = ScramServer(secret)
    client = ScramClient("pw")
    final = client.handle_server_first(server.handle_client_first(client.client_first()))
    good = server.handle_client_final(final)
    wrong = b"v=" + base64.b64encode(b"\x00" * 32)
    with pytest.raises(ScramError):
        client.verify_server_final(wrong)
    for bad in (b"e=invalid-proof", b"v=###", b"", b"x=1"):
        c = ScramClient("pw")
        s = ScramServer(secret)
        f = c.handle_server_first(s.handle_client_first(c.client_first()))
        s.handle_client_final(f)
        with pytest.raises(ScramError):
            c.verify_server_final(bad)
    assert good.startswith(b"v=")


_SECRET = make_server_key_material("pw", salt=b"0123456789abcdef", iterations=2)
_CLIENT_FIRST = b"n,,n=,r=clientnonce"


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_client_first_raises_only_scram_error(data):
    try:
        ScramServer(_SECRET).handle_client_first(data)
    except ScramError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    st.binary(max_size=200),
    st.builds(lambda tail: b"c=biws,r=clientnonce" + tail, st.binary(max_size=80)),
    st.builds(lambda tail: b"c=biws,r=clientnonceSERVERNONCE,p=" + tail, st.binary(max_size=60)),
))
def test_fuzz_client_final_raises_only_scram_error(data):
    server = ScramServer(_SECRET, nonce=b"SERVERNONCE")
    server.handle_client_first(_CLIENT_FIRST)
    try:
        server.handle_client_final(data)
    except ScramError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_client_side_raises_only_scram_error(data):
    client = ScramClient("pw", nonce=b"abc")
    client.client_first()
    try:
        client.handle_server_first(data)
    except ScramError:
        pass


# --- md5 -----------------------------------------------------------------------------------------

def test_md5_known_values():
    inner = hashlib.md5(b"secretalice").hexdigest()
    assert md5_password_hash("secret", "alice") == "md5" + inner
    salt = b"\x01\x02\x03\x04"
    expected = b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode()
    assert md5_response("secret", "alice", salt) == expected
    assert md5_verify("secret", "alice", salt, expected)
    assert md5_verify("secret", "alice", salt, expected + b"\x00")
    assert not md5_verify("secret", "alice", salt, expected[:-1] + b"0\x00")
    assert not md5_verify("secret", "alice", b"\x01\x02\x03\x05", expected)
    assert not md5_verify("Secret", "alice", salt, expected)
    assert not md5_verify("secret", "alice", salt, b"")


# --- against a real PostgreSQL -------------------------------------------------------------------

PG_BIN = "/usr/lib/postgresql/15/bin"
SUPERUSER_PASSWORD = "initdb-pw"
MD5_ROLE, MD5_PASSWORD = "md5user", "md5 secret"
# Passwords that exercise every SASLprep branch on the server too.
SCRAM_ROLES = {
    "plainuser": "pencil",
    "mappeduser": "pass\u00adword\u2003\u2168\uff21",  # mapped to nothing, to space, NFKC
    "prohibiteduser": "\u00e9\u0007",                  # control char: raw bytes are hashed
    "bidiuser": "\u05d0a",                              # bidi violation: raw bytes
    "unassigneduser": "\u00e9\u0221",                   # unassigned in Unicode 3.2: raw bytes
}

needs_postgres = pytest.mark.skipif(
    not os.path.isdir("/usr/lib/postgresql") or not os.path.exists(f"{PG_BIN}/initdb")
    or os.geteuid() != 0 or shutil.which("runuser") is None,
    reason="needs PostgreSQL server binaries and root (runuser) to start a throwaway cluster",
)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(*args, **kwargs):
    return subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True,
                          capture_output=True, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def cluster():
    """A cluster whose TCP logins need SCRAM (md5 for one role); yields its port."""
    if not os.path.isdir("/usr/lib/postgresql"):
        pytest.skip("no PostgreSQL server binaries")
    postgres_user = pwd.getpwnam("postgres")
    base = tempfile.mkdtemp(prefix="rdsproxy-auth-")
    os.chown(base, postgres_user.pw_uid, postgres_user.pw_gid)
    data = os.path.join(base, "data")
    pwfile = os.path.join(base, "pwfile")
    with open(pwfile, "w") as f:
        f.write(SUPERUSER_PASSWORD + "\n")
    os.chown(pwfile, postgres_user.pw_uid, postgres_user.pw_gid)
    port = _free_port()
    started = False
    try:
        _as_postgres(f"{PG_BIN}/initdb", "-D", data, "-U", "postgres", "--auth=scram-sha-256",
                     f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C")
        hba = os.path.join(data, "pg_hba.conf")
        with open(hba) as f:
            rules = f.read()
        with open(hba, "w") as f:  # same inode, so ownership stays with postgres
            f.write(f"host all {MD5_ROLE} 127.0.0.1/32 md5\n" + rules)
        _as_postgres(f"{PG_BIN}/pg_ctl", "-D", data, "-l", os.path.join(base, "log"), "-w",
                     "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start")
        started = True
        _setup_roles(port)
        yield port
    finally:
        if started:
            subprocess.run(["runuser", "-u", "postgres", "--", f"{PG_BIN}/pg_ctl", "-D", data,
                            "-m", "fast", "-w", "stop"], capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


def _setup_roles(port):
    import psycopg
    from psycopg import sql

    with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                         password=SUPERUSER_PASSWORD, autocommit=True) as conn:
        conn.execute("SET password_encryption = 'md5'")
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(MD5_ROLE), sql.Literal(MD5_PASSWORD)))
        conn.execute("SET password_encryption = 'scram-sha-256'")
        for role, password in SCRAM_ROLES.items():
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)))


def _stored_verifiers(port):
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                         password=SUPERUSER_PASSWORD) as conn:
        return dict(conn.execute("SELECT rolname, rolpassword FROM pg_authid").fetchall())


class _Wire:
    """Just enough of the v3 protocol to log in: startup, auth messages, ReadyForQuery."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""

    def close(self):
        try:
            self.sock.sendall(b"X\x00\x00\x00\x04")
        except OSError:
            pass
        self.sock.close()

    def _recv_exact(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read(self):
        kind, length = struct.unpack("!cI", self._recv_exact(5))
        return kind, self._recv_exact(length - 4)

    def send(self, kind, payload):
        self.sock.sendall(kind + struct.pack("!I", len(payload) + 4) + payload)

    def startup(self, user):
        body = struct.pack("!I", 196608) + b"user\x00" + user.encode() + b"\x00database\x00postgres\x00\x00"
        self.sock.sendall(struct.pack("!I", len(body) + 4) + body)


def _error_fields(payload):
    return {f[:1]: f[1:].decode() for f in payload.split(b"\x00") if f}


def _login(port, user, password):
    """Log in with our client code; returns the auth request codes seen, or raises with the SQLSTATE."""
    wire = _Wire(port)
    seen = []
    scram = None
    try:
        wire.startup(user)
        while True:
            kind, payload = wire.read()
            if kind == b"E":
                fields = _error_fields(payload)
                raise PermissionError(fields.get(b"C"), fields.get(b"M"))
            if kind == b"Z":
                return seen
            if kind != b"R":
                continue
            code = struct.unpack("!I", payload[:4])[0]
            seen.append(code)
            if code == 10:  # AuthenticationSASL
                assert b"SCRAM-SHA-256\x00" in payload[4:]
                scram = ScramClient(password)
                first = scram.client_first()
                wire.send(b"p", b"SCRAM-SHA-256\x00" + struct.pack("!I", len(first)) + first)
            elif code == 11:  # AuthenticationSASLContinue
                wire.send(b"p", scram.handle_server_first(payload[4:]))
            elif code == 12:  # AuthenticationSASLFinal
                scram.verify_server_final(payload[4:])
            elif code == 5:  # AuthenticationMD5Password
                wire.send(b"p", md5_response(password, user, payload[4:8]) + b"\x00")
            elif code != 0:
                raise AssertionError(f"unexpected auth request {code}")
    finally:
        wire.close()


@needs_postgres
def test_real_server_scram_login(cluster):
    assert _login(cluster, "postgres", SUPERUSER_PASSWORD) == [10, 11, 12, 0]


@needs_postgres
@pytest.mark.parametrize("role", sorted(SCRAM_ROLES))
def test_real_server_scram_login_saslprep(cluster, role):
    assert _login(cluster, role, SCRAM_ROLES[role]) == [10, 11, 12, 0]


@needs_postgres
def test_real_server_scram_wrong_password(cluster):
    with pytest.raises(PermissionError) as info:
        _login(cluster, "postgres", "not-the-password")
    assert info.value.args[0] == "28P01"


@needs_postgres
def test_real_server_md5_login(cluster):
    assert _login(cluster, MD5_ROLE, MD5_PASSWORD) == [5, 0]
    with pytest.raises(PermissionError) as info:
        _login(cluster, MD5_ROLE, "wrong")
    assert info.value.args[0] == "28P01"


@needs_postgres
def test_our_verifiers_match_postgres(cluster):
    # PostgreSQL stores SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey> after its own
    # SASLprep; deriving from the same salt must give the same keys, and md5 the same hash.
    stored = _stored_verifiers(cluster)
    assert stored[MD5_ROLE] == md5_password_hash(MD5_PASSWORD, MD5_ROLE)
    for role, password in {**SCRAM_ROLES, "postgres": SUPERUSER_PASSWORD}.items():
        scheme, rest = stored[role].split("$", 1)
        params, keys = rest.split("$")
        iterations, salt = params.split(":")
        stored_key, server_key = keys.split(":")
        assert scheme == "SCRAM-SHA-256"
        ours = make_server_key_material(password, base64.b64decode(salt), int(iterations))
        assert ours.stored_key == base64.b64decode(stored_key), role
        assert ours.server_key == base64.b64decode(server_key), role
