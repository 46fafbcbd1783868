"""SCRAM-SHA-256 (RFC 5802 / RFC 7677) as PostgreSQL speaks it, server and client side, sans-IO."""
import base64
import binascii
import functools
import hashlib
import hmac
import os
import stringprep
import unicodedata
from dataclasses import dataclass

MECHANISM = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096
# PostgreSQL's sizes: 16-byte salts, 18 random bytes per nonce (base64 -> 24 chars).
SALT_LENGTH = 16
RAW_NONCE_LENGTH = 18
# Iteration counts are int4 in PostgreSQL; anything larger is a hostile server.
MAX_ITERATIONS = 2**31 - 1
# Bounds memory/CPU spent on garbage from an unauthenticated peer.
MAX_MESSAGE_LENGTH = 8192

# The only gs2 headers we accept: no channel binding ("n"), or "client supports it but
# thinks the server does not" ("y"), which is honest here since we never offer -PLUS.
_GS2_HEADERS = (b"n,,", b"y,,")


class ScramError(Exception):
    """Authentication failed or the peer spoke malformed SCRAM. The message never holds a secret."""


@dataclass(frozen=True)
class ScramSecret:
    """What a server needs to verify SCRAM logins: the RFC 5802 StoredKey/ServerKey pair."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


def _hmac(key, msg):
    return hmac.new(key, msg, hashlib.sha256).digest()


def _h(data):
    return hashlib.sha256(data).digest()


def _xor(a, b):
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _b64(data):
    return base64.b64encode(data)


def _b64decode(text, what):
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ScramError(f"malformed SCRAM message: invalid base64 in {what}") from None


# --- SASLprep (RFC 4013), with PostgreSQL's exact quirks -------------------------------------

def _prohibited(ch):
    return (stringprep.in_table_c12(ch) or stringprep.in_table_c21_c22(ch)
            or stringprep.in_table_c3(ch) or stringprep.in_table_c4(ch)
            or stringprep.in_table_c5(ch) or stringprep.in_table_c6(ch)
            or stringprep.in_table_c7(ch) or stringprep.in_table_c8(ch)
            or stringprep.in_table_c9(ch) or stringprep.in_table_a1(ch))


def saslprep_password(password):
    """Bytes PostgreSQL would hash for `password`: SASLprep'd, or the raw UTF-8 if that fails."""
    raw = password.encode("utf-8", "surrogatepass")
    # Like pg_saslprep: pure ASCII passes unchanged (control characters included).
    if password.isascii():
        return raw
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: not valid UTF-8, PostgreSQL uses raw bytes
        return raw
    mapped = []
    for ch in password:
        if stringprep.in_table_c12(ch):
            mapped.append(" ")
        elif not stringprep.in_table_b1(ch):
            mapped.append(ch)
    if not mapped:
        return raw
    # PostgreSQL runs the prohibited/bidi checks on the mapped string, before NFKC;
    # we follow it so both sides derive the same keys.
    if any(_prohibited(ch) for ch in mapped):
        return raw
    if any(stringprep.in_table_d1(ch) for ch in mapped):
        if any(stringprep.in_table_d2(ch) for ch in mapped):
            return raw
        if not (stringprep.in_table_d1(mapped[0]) and stringprep.in_table_d1(mapped[-1])):
            return raw
    return unicodedata.normalize("NFKC", "".join(mapped)).encode("utf-8")


def _salted_password(password, salt, iterations):
    return hashlib.pbkdf2_hmac("sha256", saslprep_password(password), salt, iterations)


@functools.lru_cache(maxsize=64)
def _client_salted_password(password, salt, iterations):
    """The client side's PBKDF2, remembered per (password, salt, iterations): a server keeps
    its salt until the password changes, so every new pool connection and health check
    after the first skips the 4096 rounds (a few ms of CPU each)."""
    return _salted_password(password, salt, iterations)


def make_server_key_material(password, salt=None, iterations=DEFAULT_ITERATIONS):
    """Derive the per-user ScramSecret; this PBKDF2 is the costly step, so callers cache it."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or not 1 <= iterations <= MAX_ITERATIONS:
        raise ValueError("iterations must be an integer between 1 and 2**31-1")
    if salt is None:
        salt = os.urandom(SALT_LENGTH)
    salt = bytes(salt)
    if not salt:
        raise ValueError("salt must not be empty")
    salted = _salted_password(password, salt, iterations)
    return ScramSecret(
        salt=salt,
        iterations=iterations,
        stored_key=_h(_hmac(salted, b"Client Key")),
        server_key=_hmac(salted, b"Server Key"),
    )


def decoy_server_key_material(key, user):
    """A ScramSecret for a user that does not exist, to run the exchange a real one gets:
    the same salt at every attempt for one name and different salts for different names
    (as PostgreSQL's mock salts), the default iteration count, and keys no password
    matches. Made from `key` (the caller's secret) with HMACs: no PBKDF2 to spend on
    every name an attacker tries."""
    name = user.encode("utf-8", "surrogatepass")

    def part(label):
        return _hmac(key, label + b"\x00" + name)
    return ScramSecret(salt=part(b"salt")[:SALT_LENGTH], iterations=DEFAULT_ITERATIONS,
                       stored_key=part(b"stored"), server_key=part(b"server"))


# --- message parsing ---------------------------------------------------------------------------

def _is_printable_nonce(nonce):
    # RFC 5802 "printable": %x21-2B / %x2D-7E, i.e. visible ASCII except ','.
    return bool(nonce) and all(0x21 <= c <= 0x7E and c != 0x2C for c in nonce)


def _new_nonce():
    return _b64(os.urandom(RAW_NONCE_LENGTH))


def _check_nonce_arg(nonce):
    if nonce is None:
        return _new_nonce()
    nonce = bytes(nonce)
    if not _is_printable_nonce(nonce):
        raise ValueError("nonce must be printable ASCII without ','")
    return nonce


def _as_message(data, what):
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ScramError(f"malformed SCRAM {what}: not bytes")
    data = bytes(data)
    if len(data) > MAX_MESSAGE_LENGTH:
        raise ScramError(f"malformed SCRAM {what}: too long")
    if b"\x00" in data:
        raise ScramError(f"malformed SCRAM {what}: contains NUL")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise ScramError(f"malformed SCRAM {what}: not UTF-8") from None
    return data


def _attributes(text, what):
    """Split 'a=v,b=w' into [(b'a', b'v'), ...], insisting on one-letter attribute names."""
    attrs = []
    for part in text.split(b","):
        if len(part) < 2 or part[1:2] != b"=" or not (0x41 <= part[0] <= 0x5A or 0x61 <= part[0] <= 0x7A):
            raise ScramError(f"malformed SCRAM {what}: bad attribute")
        attrs.append((part[:1], part[2:]))
    return attrs


def _escape_saslname(name):
    return name.replace("=", "=3D").replace(",", "=2C")


# --- server side -------------------------------------------------------------------------------

class ScramServer:
    """Verifies one client's SCRAM-SHA-256 login against a cached ScramSecret."""

    def __init__(self, secret, nonce=None):
        self._secret = secret
        self._server_nonce = _check_nonce_arg(nonce)
        self._state = "first"
        self._gs2_header = None
        self._nonce = None
        self._client_first_bare = None
        self._server_first = None

    def handle_client_first(self, data):
        if self._state != "first":
            raise ScramError("SCRAM exchange out of order")
        self._state = "failed"  # until this message proves well formed
        data = _as_message(data, "client-first-message")
        flag = data[:1]
        if flag == b"p":
            raise ScramError("SCRAM channel binding is not supported")
        if flag not in (b"n", b"y") or data[1:2] != b",":
            raise ScramError("malformed SCRAM client-first-message: bad gs2 header")
        # Authorization identities are not supported, as in PostgreSQL.
        if data[2:3] != b",":
            raise ScramError("SCRAM authorization identity is not supported")
        self._gs2_header = data[:3]
        bare = data[3:]
        attrs = _attributes(bare, "client-first-message")
        if attrs[0][0] == b"m":
            raise ScramError("SCRAM mandatory extensions are not supported")
        if len(attrs) < 2 or attrs[0][0] != b"n" or attrs[1][0] != b"r":
            raise ScramError("malformed SCRAM client-first-message: expected n= and r=")
        for key, _ in attrs[2:]:
            if key == b"m":
                raise ScramError("SCRAM mandatory extensions are not supported")
        # PostgreSQL ignores the SCRAM username (the startup packet names the user), so any
        # n= value is fine; its nonce must be printable though.
        client_nonce = attrs[1][1]
        if not _is_printable_nonce(client_nonce):
            raise ScramError("malformed SCRAM client-first-message: bad nonce")
        self._client_first_bare = bare
        self._nonce = client_nonce + self._server_nonce
        self._server_first = b"r=%s,s=%s,i=%d" % (
            self._nonce, _b64(self._secret.salt), self._secret.iterations)
        self._state = "final"
        return self._server_first

    def handle_client_final(self, data):
        if self._state != "final":
            raise ScramError("SCRAM exchange out of order")
        self._state = "failed"  # one attempt only
        data = _as_message(data, "client-final-message")
        head, sep, proof_b64 = data.rpartition(b",p=")
        if not sep:
            raise ScramError("malformed SCRAM client-final-message: no proof")
        attrs = _attributes(head, "client-final-message")
        if len(attrs) < 2 or attrs[0][0] != b"c" or attrs[1][0] != b"r":
            raise ScramError("malformed SCRAM client-final-message: expected c= and r=")
        for key, _ in attrs[2:]:
            if key == b"m":
                raise ScramError("SCRAM mandatory extensions are not supported")
        if _b64decode(attrs[0][1], "channel binding") != self._gs2_header:
            raise ScramError("SCRAM channel binding data does not match")
        if not hmac.compare_digest(attrs[1][1], self._nonce):
            raise ScramError("SCRAM nonce mismatch")
        proof = _b64decode(proof_b64, "proof")
        if len(proof) != len(self._secret.stored_key):
            raise ScramError("malformed SCRAM client-final-message: bad proof length")
        auth_message = b",".join((self._client_first_bare, self._server_first, head))
        client_signature = _hmac(self._secret.stored_key, auth_message)
        client_key = _xor(proof, client_signature)
        if not hmac.compare_digest(_h(client_key), self._secret.stored_key):
            raise ScramError("password authentication failed")
        self._state = "done"
        return b"v=" + _b64(_hmac(self._secret.server_key, auth_message))


# --- client side -------------------------------------------------------------------------------

class ScramClient:
    """Logs into a PostgreSQL server with SCRAM-SHA-256, no channel binding.

    `username` defaults to empty as libpq sends it (the server reads the startup packet);
    it exists so the RFC test vectors, which carry n=user, can be reproduced.
    """

    def __init__(self, password, nonce=None, *, username=""):
        self._password = password
        self._nonce = _check_nonce_arg(nonce)
        self._first_bare = ("n=%s,r=" % _escape_saslname(username)).encode("utf-8") + self._nonce
        self._state = "first"
        self._expected_server_signature = None

    def client_first(self):
        if self._state != "first":
            raise ScramError("SCRAM exchange out of order")
        self._state = "server-first"
        return b"n,," + self._first_bare

    def handle_server_first(self, data):
        if self._state != "server-first":
            raise ScramError("SCRAM exchange out of order")
        self._state = "failed"
        data = _as_message(data, "server-first-message")
        attrs = _attributes(data, "server-first-message")
        if attrs and attrs[0][0] == b"m":
            raise ScramError("SCRAM mandatory extensions are not supported")
        if len(attrs) < 3 or [k for k, _ in attrs[:3]] != [b"r", b"s", b"i"]:
            raise ScramError("malformed SCRAM server-first-message: expected r=, s=, i=")
        nonce, salt_b64, iter_text = attrs[0][1], attrs[1][1], attrs[2][1]
        if not _is_printable_nonce(nonce):
            raise ScramError("malformed SCRAM server-first-message: bad nonce")
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise ScramError("SCRAM server nonce does not extend the client nonce")
        salt = _b64decode(salt_b64, "salt")
        if not salt:
            raise ScramError("malformed SCRAM server-first-message: empty salt")
        if not iter_text.isdigit() or len(iter_text) > 10:
            raise ScramError("malformed SCRAM server-first-message: bad iteration count")
        iterations = int(iter_text)
        if not 1 <= iterations <= MAX_ITERATIONS:
            raise ScramError("SCRAM iteration count out of range")
        salted = _client_salted_password(self._password, bytes(salt), iterations)
        client_key = _hmac(salted, b"Client Key")
        without_proof = b"c=" + _b64(b"n,,") + b",r=" + nonce
        auth_message = b",".join((self._first_bare, data, without_proof))
        client_signature = _hmac(_h(client_key), auth_message)
        self._expected_server_signature = _hmac(_hmac(salted, b"Server Key"), auth_message)
        self._state = "server-final"
        return without_proof + b",p=" + _b64(_xor(client_key, client_signature))

    def verify_server_final(self, data):
        if self._state != "server-final":
            raise ScramError("SCRAM exchange out of order")
        self._state = "failed"
        data = _as_message(data, "server-final-message")
        first = data.split(b",", 1)[0]
        if first.startswith(b"e="):
            # The server's error names a condition (e.g. invalid-proof), never a secret.
            reason = first[2:].decode("ascii", "replace")
            raise ScramError(f"SCRAM server reported an error: {reason}")
        if not first.startswith(b"v="):
            raise ScramError("malformed SCRAM server-final-message")
        signature = _b64decode(first[2:], "server signature")
        if not hmac.compare_digest(signature, self._expected_server_signature):
            raise ScramError("SCRAM server signature is invalid")
        self._state = "done"
