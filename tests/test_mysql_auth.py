"""rdsproxy.auth.mysql: scrambles against known values and against PyMySQL's independent
implementation, verification, and the caching_sha2_password RSA exchange both ways."""
from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymysql import _auth as pymysql_auth

from rdsproxy.auth import mysql as auth

NONCE = b"y})Q<xj+3][2&dK(${bW"        # a real MariaDB handshake nonce
NONCES = st.binary(min_size=20, max_size=20)
HYP = settings(max_examples=100, deadline=None)


TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)


@pytest.fixture(scope="module")
def keypair():
    return auth.RsaKeyPair.generate()


# --- nonces ---------------------------------------------------------------------------------

def test_generate_nonce():
    seen = set()
    for _ in range(200):
        nonce = auth.generate_nonce()
        assert len(nonce) == 20
        assert all(0 < b < 0x80 and b != ord("$") for b in nonce)
        seen.add(nonce)
    assert len(seen) == 200
    assert len(auth.generate_nonce(8)) == 8


# --- mysql_native_password ------------------------------------------------------------------

def test_native_password_hash_known_value():
    # PASSWORD('password') in MySQL / MariaDB.
    assert auth.native_password_hash("password") == "*2470C0C06DEE42FD1618BB99005ADCA2EC9D1E19"
    assert auth.native_double_hash("password") == bytes.fromhex(
        "2470C0C06DEE42FD1618BB99005ADCA2EC9D1E19")


def test_native_password_response_definition():
    stage1 = hashlib.sha1(b"secret").digest()
    mask = hashlib.sha1(NONCE + hashlib.sha1(stage1).digest()).digest()
    expected = bytes(a ^ b for a, b in zip(stage1, mask))
    assert auth.native_password_response("secret", NONCE) == expected
    # A trailing NUL (as AuthSwitchRequest carries it) does not change the scramble.
    assert auth.native_password_response("secret", NONCE + b"\x00") == expected


@HYP
@given(st.one_of(TEXT, st.binary(min_size=1, max_size=40)), NONCES)
def test_native_matches_pymysql(password, nonce):
    raw = password.encode() if isinstance(password, str) else password
    assert auth.native_password_response(password, nonce) == \
        pymysql_auth.scramble_native_password(raw, nonce)


@HYP
@given(TEXT, NONCES)
def test_native_verify(password, nonce):
    response = auth.native_password_response(password, nonce)
    assert auth.native_password_verify(password, nonce, response)
    assert auth.native_password_verify_hash(auth.native_double_hash(password), nonce, response)
    assert auth.native_password_verify_hash(auth.native_password_hash(password), nonce, response)
    assert not auth.native_password_verify(password + "x", nonce, response)
    assert not auth.native_password_verify_hash(auth.native_double_hash(password + "x"),
                                                nonce, response)
    other = bytes(20) if nonce != bytes(20) else b"\x01" * 20
    assert not auth.native_password_verify_hash(auth.native_double_hash(password), other,
                                                response)


def test_native_edge_cases():
    assert auth.native_password_response("", NONCE) == b""
    assert auth.native_password_verify("", NONCE, b"")
    assert not auth.native_password_verify("", NONCE, b"x" * 20)
    assert not auth.native_password_verify("pw", NONCE, b"")
    assert not auth.native_password_verify_hash(auth.native_double_hash("pw"), NONCE, b"short")


# --- caching_sha2_password ------------------------------------------------------------------

def test_caching_sha2_response_definition():
    stage1 = hashlib.sha256(b"secret").digest()
    stage2 = hashlib.sha256(stage1).digest()
    mask = hashlib.sha256(stage2 + NONCE).digest()
    expected = bytes(a ^ b for a, b in zip(stage1, mask))
    assert auth.caching_sha2_response("secret", NONCE) == expected
    assert auth.caching_sha2_double_hash("secret") == stage2


@HYP
@given(st.one_of(TEXT, st.binary(min_size=1, max_size=40)), NONCES)
def test_caching_sha2_matches_pymysql(password, nonce):
    raw = password.encode() if isinstance(password, str) else password
    assert auth.caching_sha2_response(password, nonce) == \
        pymysql_auth.scramble_caching_sha2(raw, nonce)


@HYP
@given(TEXT, NONCES)
def test_caching_sha2_verify(password, nonce):
    response = auth.caching_sha2_response(password, nonce)
    cached = auth.caching_sha2_double_hash(password)
    assert auth.caching_sha2_verify(password, nonce, response)
    assert auth.caching_sha2_verify_hash(cached, nonce, response)
    assert auth.caching_sha2_recover_hash(cached, nonce, response) == \
        hashlib.sha256(password.encode()).digest()
    assert not auth.caching_sha2_verify(password + "x", nonce, response)
    assert not auth.caching_sha2_verify_hash(auth.caching_sha2_double_hash(password + "x"),
                                             nonce, response)
    flipped = response[:-1] + bytes((response[-1] ^ 1,))
    assert auth.caching_sha2_recover_hash(cached, nonce, flipped) is None


def test_caching_sha2_edge_cases():
    assert auth.caching_sha2_response("", NONCE) == b""
    assert auth.caching_sha2_verify("", NONCE, b"")
    assert not auth.caching_sha2_verify_hash(auth.caching_sha2_double_hash("x"), NONCE, b"x")
    assert (auth.CACHING_SHA2_REQUEST_PUBLIC_KEY, auth.CACHING_SHA2_FAST_AUTH_SUCCESS,
            auth.CACHING_SHA2_PERFORM_FULL_AUTH) == (2, 3, 4)


# --- cleartext and RSA ------------------------------------------------------------------------

def test_clear_password():
    assert auth.clear_password_response("tök") == "tök".encode() + b"\x00"
    assert auth.parse_clear_password(b"token\x00") == b"token"
    assert auth.parse_clear_password(b"token") == b"token"


def test_xor_password_is_an_involution():
    data = b"a-long-password-longer-than-the-nonce\x00"
    masked = auth.xor_password(data, NONCE)
    assert masked != data and auth.xor_password(masked, NONCE) == data
    assert masked[20] == data[20] ^ NONCE[0]          # the nonce repeats


@settings(max_examples=25, deadline=None)
@given(TEXT, NONCES)
def test_rsa_round_trip(keypair, password, nonce):
    encrypted = auth.rsa_encrypt_password(password, nonce, keypair.public_key_pem)
    assert len(encrypted) == 256
    assert keypair.decrypt_password(encrypted, nonce) == password.encode()


@settings(max_examples=25, deadline=None)
@given(TEXT, NONCES)
def test_rsa_pymysql_client_to_our_server(keypair, password, nonce):
    # PyMySQL's own client-side encryption (used by real clients) decrypts with our key.
    encrypted = pymysql_auth.sha2_rsa_encrypt(password.encode(), nonce, keypair.public_key_pem)
    assert keypair.decrypt_password(encrypted, nonce) == password.encode()


def test_rsa_our_client_to_cryptography(keypair):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    encrypted = auth.rsa_encrypt_password("pw", NONCE, keypair.public_key_pem.decode())
    plain = keypair.private_key.decrypt(encrypted, padding.OAEP(
        mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None))
    assert plain == bytes(a ^ b for a, b in zip(b"pw\x00", NONCE))


def test_rsa_errors_and_pem_round_trip(keypair):
    with pytest.raises(ValueError, match="too long"):
        auth.rsa_encrypt_password("x" * 300, NONCE, keypair.public_key_pem)
    other = auth.RsaKeyPair.generate(1024)
    encrypted = auth.rsa_encrypt_password("pw", NONCE, other.public_key_pem)
    with pytest.raises(ValueError):
        keypair.decrypt_password(encrypted, NONCE)
    # Wrong nonce: decrypts, but to garbage.
    assert other.decrypt_password(encrypted, b"\x01" * 20) != b"pw"
    again = auth.RsaKeyPair.from_pem(other.private_key_pem())
    assert again.public_key_pem == other.public_key_pem
    assert auth.rsa_decrypt_password(encrypted, NONCE, other.private_key_pem()) == b"pw"
    # The PEM as a server sends it (AuthMoreData, sometimes NUL-terminated).
    assert auth.rsa_encrypt_password("pw", NONCE, other.public_key_pem + b"\x00")
    with pytest.raises(ValueError):
        auth.rsa_encrypt_password("pw", NONCE, b"not a key")
