"""MySQL / MariaDB password authentication, sans-IO: scrambles, verification, RSA exchange.

Plugins:

- `mysql_native_password`: the client sends SHA1(pw) XOR SHA1(nonce + SHA1(SHA1(pw))).
  The server stores SHA1(SHA1(pw)) (mysql.user shows it as "*" + 40 upper-case hex
  digits), which is enough to verify a response: see `native_password_verify_hash`.
- `caching_sha2_password` (MySQL 8's default): the client sends
  SHA256(pw) XOR SHA256(SHA256(SHA256(pw)) + nonce). A server holding SHA256(SHA256(pw))
  in its cache verifies that ("fast auth") and answers AuthMoreData 0x03, then OK;
  otherwise it answers 0x04 ("perform full authentication") and the client sends the
  password itself: in clear (NUL-terminated) over TLS, or on a plaintext connection
  XORed with the nonce and encrypted with the server's RSA public key (RSA-OAEP with
  SHA-1), after asking for the key with the single byte 0x02 if it does not have it.
  MariaDB 10.11 has no server side of this plugin; the proxy's own server side is here
  (`caching_sha2_verify*`, `RsaKeyPair`).
- `mysql_clear_password`: the password, NUL-terminated; only sensible over TLS (RDS Proxy
  takes IAM tokens this way).

Passwords are `str` (sent as UTF-8) or `bytes`. Nonces are the 20 bytes of a handshake or
AuthSwitchRequest; a trailing NUL (as AuthSwitchRequest carries) is ignored.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets

__all__ = [
    "MYSQL_NATIVE_PASSWORD", "CACHING_SHA2_PASSWORD", "MYSQL_CLEAR_PASSWORD", "SHA256_PASSWORD",
    "NONCE_LENGTH", "CACHING_SHA2_REQUEST_PUBLIC_KEY", "CACHING_SHA2_FAST_AUTH_SUCCESS",
    "CACHING_SHA2_PERFORM_FULL_AUTH", "generate_nonce",
    "native_password_hash", "native_double_hash", "native_password_response",
    "native_password_verify", "native_password_verify_hash",
    "caching_sha2_double_hash", "caching_sha2_response", "caching_sha2_verify",
    "caching_sha2_verify_hash", "caching_sha2_recover_hash",
    "clear_password_response", "parse_clear_password", "xor_password",
    "rsa_encrypt_password", "rsa_decrypt_password", "RsaKeyPair",
]

MYSQL_NATIVE_PASSWORD = "mysql_native_password"
CACHING_SHA2_PASSWORD = "caching_sha2_password"
MYSQL_CLEAR_PASSWORD = "mysql_clear_password"
SHA256_PASSWORD = "sha256_password"

NONCE_LENGTH = 20

# caching_sha2_password's one-byte messages. The client's request for the public key is a
# packet with just 0x02; the server's fast-auth results come as AuthMoreData (0x01 + byte).
CACHING_SHA2_REQUEST_PUBLIC_KEY = 0x02
CACHING_SHA2_FAST_AUTH_SUCCESS = 0x03
CACHING_SHA2_PERFORM_FULL_AUTH = 0x04


def _pw(password: str | bytes) -> bytes:
    return password.encode("utf-8") if isinstance(password, str) else bytes(password)


def _nonce(nonce: bytes) -> bytes:
    nonce = bytes(nonce)
    return nonce[:-1] if len(nonce) == NONCE_LENGTH + 1 and nonce.endswith(b"\x00") else nonce


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b))


def generate_nonce(length: int = NONCE_LENGTH) -> bytes:
    """A random nonce for a handshake or AuthSwitchRequest, from the OS CSPRNG.

    Like the servers' own, its bytes are 7-bit and never NUL or '$': the second part of a
    HandshakeV10 nonce is NUL-terminated, and clients treat it as a C string.
    """
    raw = bytearray(secrets.token_bytes(length))
    for i, b in enumerate(raw):
        b &= 0x7F
        if b == 0 or b == 0x24:
            b += 1
        raw[i] = b
    return bytes(raw)


# --- mysql_native_password --------------------------------------------------------------------

def native_double_hash(password: str | bytes) -> bytes:
    """SHA1(SHA1(password)): the 20 bytes a server stores."""
    return hashlib.sha1(hashlib.sha1(_pw(password)).digest()).digest()


def native_password_hash(password: str | bytes) -> str:
    """The text form in mysql.user / PASSWORD(): "*" + upper-case hex of the double hash."""
    return "*" + native_double_hash(password).hex().upper()


def _double_hash_bytes(double_hash: bytes | str) -> bytes:
    if isinstance(double_hash, str):
        text = double_hash[1:] if double_hash.startswith("*") else double_hash
        return bytes.fromhex(text)
    return bytes(double_hash)


def native_password_response(password: str | bytes, nonce: bytes) -> bytes:
    """The client's auth response for `nonce`; empty for an empty password."""
    pw = _pw(password)
    if not pw:
        return b""
    stage1 = hashlib.sha1(pw).digest()
    stage2 = hashlib.sha1(stage1).digest()
    return _xor(stage1, hashlib.sha1(_nonce(nonce) + stage2).digest())


def native_password_verify_hash(double_hash: bytes | str, nonce: bytes, response: bytes) -> bool:
    """True when `response` proves knowledge of the password whose SHA1(SHA1()) is
    `double_hash` (20 raw bytes, or the "*HEX" text form)."""
    stored = _double_hash_bytes(double_hash)
    response = bytes(response)
    if len(response) != 20 or len(stored) != 20:
        return False
    stage1 = _xor(response, hashlib.sha1(_nonce(nonce) + stored).digest())
    return hmac.compare_digest(hashlib.sha1(stage1).digest(), stored)


def _matches(scramble, password: str | bytes, nonce: bytes, response: bytes) -> bool:
    """True when `response` is `scramble(password, nonce)` (an empty password matches only
    an empty response)."""
    if not _pw(password):
        return bytes(response) == b""
    return hmac.compare_digest(bytes(response), scramble(password, nonce))


def native_password_verify(password: str | bytes, nonce: bytes, response: bytes) -> bool:
    """True when `response` is the mysql_native_password scramble of `password` for `nonce`."""
    return _matches(native_password_response, password, nonce, response)


# --- caching_sha2_password --------------------------------------------------------------------

def caching_sha2_double_hash(password: str | bytes) -> bytes:
    """SHA256(SHA256(password)): what a caching_sha2_password server keeps in its cache."""
    return hashlib.sha256(hashlib.sha256(_pw(password)).digest()).digest()


def caching_sha2_response(password: str | bytes, nonce: bytes) -> bytes:
    """The client's scramble for `nonce`; empty for an empty password."""
    pw = _pw(password)
    if not pw:
        return b""
    stage1 = hashlib.sha256(pw).digest()
    stage2 = hashlib.sha256(stage1).digest()
    return _xor(stage1, hashlib.sha256(stage2 + _nonce(nonce)).digest())


def caching_sha2_recover_hash(double_hash: bytes, nonce: bytes, response: bytes) -> bytes | None:
    """SHA256(password) from a valid response and the cached double hash, or None when the
    response does not match."""
    response = bytes(response)
    if len(response) != 32 or len(double_hash) != 32:
        return None
    stage1 = _xor(response, hashlib.sha256(bytes(double_hash) + _nonce(nonce)).digest())
    if hmac.compare_digest(hashlib.sha256(stage1).digest(), bytes(double_hash)):
        return stage1
    return None


def caching_sha2_verify_hash(double_hash: bytes, nonce: bytes, response: bytes) -> bool:
    """Fast-auth check: True when `response` matches the cached SHA256(SHA256(password))."""
    return caching_sha2_recover_hash(double_hash, nonce, response) is not None


def caching_sha2_verify(password: str | bytes, nonce: bytes, response: bytes) -> bool:
    """True when `response` is the caching_sha2_password scramble of `password` for `nonce`."""
    return _matches(caching_sha2_response, password, nonce, response)


# --- cleartext ----------------------------------------------------------------------------------

def clear_password_response(password: str | bytes) -> bytes:
    """The password NUL-terminated, as mysql_clear_password and caching_sha2_password's
    full authentication over TLS send it."""
    return _pw(password) + b"\x00"


def parse_clear_password(payload: bytes) -> bytes:
    """The password from a cleartext response (without its trailing NUL)."""
    payload = bytes(payload)
    return payload[:-1] if payload.endswith(b"\x00") else payload


# --- RSA exchange (caching_sha2_password / sha256_password on plaintext connections) -------------

def xor_password(password: bytes, nonce: bytes) -> bytes:
    """The NUL-terminated password XORed with the nonce repeated (what gets RSA-encrypted);
    the same function undoes it."""
    nonce = _nonce(nonce)
    if not nonce:
        raise ValueError("empty nonce")
    return bytes(b ^ nonce[i % len(nonce)] for i, b in enumerate(password))


def _oaep():
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    return padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(),
                        label=None)


def rsa_encrypt_password(password: str | bytes, nonce: bytes, public_key_pem: bytes | str) -> bytes:
    """Client side: encrypt the password for a server that sent `public_key_pem`.

    Raises ValueError if the key is not an RSA public key or the password is too long for
    it (214 bytes with a 2048-bit key).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = public_key_pem.encode("ascii") if isinstance(public_key_pem, str) else bytes(public_key_pem)
    key = serialization.load_pem_public_key(pem.rstrip(b"\x00"))
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("the server's public key is not an RSA key")
    plain = xor_password(_pw(password) + b"\x00", nonce)
    limit = key.key_size // 8 - 42          # OAEP with SHA-1: 2 * 20 + 2 bytes of overhead
    if len(plain) > limit:
        raise ValueError(f"password too long for a {key.key_size}-bit RSA key "
                         f"({len(plain) - 1} bytes, at most {limit - 1})")
    return key.encrypt(plain, _oaep())


def rsa_decrypt_password(ciphertext: bytes, nonce: bytes, private_key) -> bytes:
    """Server side: the password (without NUL) from the client's encrypted response.

    `private_key` is a cryptography RSAPrivateKey or PEM bytes. Raises ValueError when
    decryption fails (wrong key, tampered data).
    """
    if isinstance(private_key, (bytes, str)):
        private_key = _load_private_key(private_key)
    plain = private_key.decrypt(bytes(ciphertext), _oaep())
    password = xor_password(plain, nonce)
    return password[:-1] if password.endswith(b"\x00") else password


def _load_private_key(pem: bytes | str):
    from cryptography.hazmat.primitives import serialization

    data = pem.encode("ascii") if isinstance(pem, str) else bytes(pem)
    return serialization.load_pem_private_key(data, password=None)


class RsaKeyPair:
    """The proxy's RSA key pair for caching_sha2_password full authentication on plaintext
    client connections: `public_key_pem` is sent to clients that ask (0x02), and
    decrypt_password() recovers what they send."""

    def __init__(self, private_key):
        from cryptography.hazmat.primitives import serialization

        self.private_key = private_key
        self.public_key_pem: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    @classmethod
    def generate(cls, bits: int = 2048) -> "RsaKeyPair":
        from cryptography.hazmat.primitives.asymmetric import rsa

        return cls(rsa.generate_private_key(public_exponent=65537, key_size=bits))

    @classmethod
    def from_pem(cls, private_pem: bytes | str) -> "RsaKeyPair":
        return cls(_load_private_key(private_pem))

    def private_key_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.private_key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())

    def decrypt_password(self, ciphertext: bytes, nonce: bytes) -> bytes:
        return rsa_decrypt_password(ciphertext, nonce, self.private_key)
