"""PostgreSQL md5 password authentication: stored hash, client response and server check, sans-IO."""
import functools
import hmac

try:
    # CPython's own MD5: no OpenSSL digest lookup per call (two to three times quicker for
    # one 36-byte hash), and it works where OpenSSL is in FIPS mode and refuses MD5, which
    # PostgreSQL's md5 authentication still needs.
    from _md5 import md5
except ImportError:  # an interpreter built without it
    from hashlib import md5


def _md5_hex(data):
    return md5(data).hexdigest().encode("ascii")


def md5_password_hash(password, user):
    """The value PostgreSQL stores in pg_authid: "md5" + hex(md5(password + user))."""
    return "md5" + _md5_hex(password.encode("utf-8") + user.encode("utf-8")).decode("ascii")


@functools.lru_cache(maxsize=256)
def md5_inner_hash(password, user):
    """hex(md5(password + user)), what a salt is hashed with. The same for every login of
    an account: computed once (a rotated password is a new key)."""
    return _md5_hex(password.encode("utf-8") + user.encode("utf-8"))


def md5_response(password, user, salt):
    """The PasswordMessage payload a client sends for a 4-byte salt, without the trailing NUL."""
    return b"md5" + _md5_hex(md5_inner_hash(password, user) + bytes(salt))


def md5_verify(password, user, salt, response):
    """True when `response` (with or without its trailing NUL) proves knowledge of the password."""
    response = bytes(response)
    if response.endswith(b"\x00"):
        response = response[:-1]
    # compare_digest keeps the comparison time independent of where the bytes differ.
    return hmac.compare_digest(response, md5_response(password, user, salt))
