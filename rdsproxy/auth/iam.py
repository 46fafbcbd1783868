"""IAM database authentication tokens (RDS `generate_db_auth_token` format): sans-IO verify and generate."""
from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from urllib.parse import quote, unquote

__all__ = ["Principal", "TokenError", "verify_token", "generate_token", "resource_matches"]

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "rds-db"
MAX_EXPIRES = 900                     # RDS tokens live 15 minutes at most
MAX_TOKEN_LENGTH = 16384              # session tokens make tokens long, but bound the work
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_DATE_RE = re.compile(r"\d{8}T\d{6}Z\Z")
_EXPIRES_RE = re.compile(r"[0-9]{1,6}\Z")
_SIGNATURE_RE = re.compile(r"[0-9a-f]{64}\Z")
_BAD_ESCAPE_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_PORT_RE = re.compile(r"[0-9]{1,5}\Z")
_REQUIRED = ("Action", "DBUser", "X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date",
             "X-Amz-Expires", "X-Amz-SignedHeaders", "X-Amz-Signature")
_ALLOWED = frozenset(_REQUIRED + ("X-Amz-Security-Token",))


@dataclass(frozen=True)
class Principal:
    """An IAM identity we can verify: its key pair and the rds-db:connect resource patterns it may use."""
    access_key_id: str
    secret_access_key: str = field(repr=False)
    resources: tuple[str, ...] = ()


class TokenError(Exception):
    """Token rejected; str() is a fixed reason that is safe to log (never the token, never a key)."""


# -- SigV4 pieces -------------------------------------------------------------------------

def _uri_encode(value: str) -> str:
    # SigV4 leaves only the RFC 3986 unreserved characters unescaped (so '/' and '+' are escaped).
    return quote(value.encode("utf-8"), safe="-_.~")


def _signing_key(secret_access_key: str, date: str, region: str) -> bytes:
    key = ("AWS4" + secret_access_key).encode("utf-8")
    for part in (date, region, SERVICE, "aws4_request"):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return key


def _host_header(host: str, port: int) -> str:
    # As botocore signs it: lower-case host, IPv6 in brackets, no port when it is https's 443.
    host = host.lower()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return host if port == 443 else f"{host}:{port}"


def _signature(secret_access_key: str, amz_date: str, region: str, host_header: str,
               params: Iterable[tuple[str, str]]) -> str:
    """Hex SigV4 signature of `GET /?<params>` with only the host header signed, empty payload."""
    canonical_query = "&".join(f"{k}={v}" for k, v in
                               sorted((_uri_encode(k), _uri_encode(v)) for k, v in params))
    canonical_request = "\n".join(
        ("GET", "/", canonical_query, f"host:{host_header}", "", "host", _EMPTY_SHA256))
    scope = f"{amz_date[:8]}/{region}/{SERVICE}/aws4_request"
    string_to_sign = "\n".join(
        (ALGORITHM, amz_date, scope, hashlib.sha256(canonical_request.encode("utf-8")).hexdigest()))
    return hmac.new(_signing_key(secret_access_key, amz_date[:8], region),
                    string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    # A naive datetime is taken to be UTC, like botocore's own clock.
    return now.replace(tzinfo=timezone.utc) if now.tzinfo is None else now.astimezone(timezone.utc)


# -- generation ---------------------------------------------------------------------------

def generate_token(*, host: str, port: int, user: str, region: str, access_key_id: str,
                   secret_access_key: str, session_token: str | None = None,
                   now: datetime | None = None, expires: int = MAX_EXPIRES) -> str:
    """A token byte-for-byte identical to botocore's `generate_db_auth_token` for the same inputs and time."""
    if not 0 < expires <= 604800:
        raise ValueError("expires must be between 1 and 604800 seconds")
    amz_date = _utc(now).strftime("%Y%m%dT%H%M%SZ")
    display_host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    # Parameter order as botocore emits it: operation params, then auth params, signature last.
    params = [("Action", "connect"), ("DBUser", user),
              ("X-Amz-Algorithm", ALGORITHM),
              ("X-Amz-Credential", f"{access_key_id}/{amz_date[:8]}/{region}/{SERVICE}/aws4_request"),
              ("X-Amz-Date", amz_date), ("X-Amz-Expires", str(expires)),
              ("X-Amz-SignedHeaders", "host")]
    if session_token is not None:
        params.append(("X-Amz-Security-Token", session_token))
    signature = _signature(secret_access_key, amz_date, region, _host_header(display_host, port), params)
    query = "&".join(f"{_uri_encode(k)}={_uri_encode(v)}" for k, v in params)
    return f"{display_host}:{port}/?{query}&X-Amz-Signature={signature}"


# -- resource policy ----------------------------------------------------------------------

def _glob(pattern: str, text: str) -> bool:
    """IAM-style wildcard match: `*` any run (also empty), `?` exactly one character; case-sensitive."""
    p = t = 0
    star_p, star_t = -1, 0
    while t < len(text):
        if p < len(pattern) and (pattern[p] == "?" or pattern[p] == text[t]):
            p += 1
            t += 1
        elif p < len(pattern) and pattern[p] == "*":
            star_p, star_t = p, t
            p += 1
        elif star_p >= 0:          # backtrack: let the last star swallow one more character
            p = star_p + 1
            star_t += 1
            t = star_t
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


def resource_matches(pattern: str, *, region: str, user: str) -> bool:
    """Does an rds-db:connect resource pattern allow `user` in `region`?

    A pattern is `arn:<partition>:rds-db:<region>:<account>:dbuser:<resource-id>/<user>` with
    IAM's `*` and `?` wildcards, or `*` alone (everything). We know neither the AWS account nor
    a proxy resource id, so the partition, account and resource-id segments are not checked
    (any value matches); the service segment must match `rds-db`, the region segment must match
    the token's region, the resource type must match `dbuser`, and the part after the first `/`
    of the dbuser segment must match the user. A dbuser segment without `/` can only name the
    user through a wildcard spanning the slash, so it matches only if it is all `*` (fail closed).
    """
    if pattern == "*":
        return True
    parts = pattern.split(":", 6)
    if len(parts) != 7 or parts[0] != "arn":
        return False
    _, _partition, service, pat_region, _account, rtype, rest = parts
    if not (_glob(service, SERVICE) and _glob(pat_region, region) and _glob(rtype, "dbuser")):
        return False
    _resource_id, slash, user_pattern = rest.partition("/")
    if not slash:
        return rest != "" and set(rest) == {"*"}
    return _glob(user_pattern, user)


# -- verification -------------------------------------------------------------------------

def _parse(token: str) -> tuple[str, str, dict[str, str], list[tuple[str, str]]]:
    """Split a token into (host, port, decoded params, decoded params in order); TokenError if malformed."""
    if not isinstance(token, str) or not token:
        raise TokenError("token is empty or not text")
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenError("token is too long")
    if not token.isascii() or not token.isprintable() or " " in token:
        raise TokenError("token contains characters a token never has")
    endpoint, sep, query = token.partition("/?")
    if not sep or not query:
        raise TokenError("token is not in HOST:PORT/?QUERY form")
    host, colon, port = endpoint.rpartition(":")
    if not colon or not host or not _PORT_RE.match(port) or "/" in host or "@" in host:
        raise TokenError("token does not start with HOST:PORT")
    if "#" in query or _BAD_ESCAPE_RE.search(query):
        raise TokenError("token query is malformed")
    ordered: list[tuple[str, str]] = []
    params: dict[str, str] = {}
    for pair in query.split("&"):
        raw_key, eq, raw_value = pair.partition("=")
        if not eq or not raw_key:
            raise TokenError("token query is malformed")
        try:
            key = unquote(raw_key, errors="strict")
            value = unquote(raw_value, errors="strict")
        except UnicodeDecodeError:
            raise TokenError("token query is malformed") from None
        if key in params:
            raise TokenError("token repeats a parameter")
        if key not in _ALLOWED:
            raise TokenError("token has an unexpected parameter")
        params[key] = value
        ordered.append((key, value))
    for key in _REQUIRED:
        if key not in params:
            raise TokenError(f"token lacks {key}")
    return host, port, params, ordered


def _host_set(host: str | Iterable[str]) -> set[str]:
    names = [host] if isinstance(host, str) else list(host)
    return {n.strip("[]").lower() for n in names}


def verify_token(token: str, *, host: str | Iterable[str], port: int, user: str,
                 principals: Mapping[str, Principal], now: datetime | None = None,
                 clock_skew: float = 300.0, region: str | None = None) -> Principal:
    """Check an IAM auth token presented by a client as its password; return the signing principal.

    `host`/`port` are the endpoint the client connected to (host may also be a collection of
    acceptable names, e.g. a DNS name and an IP address; compared case-insensitively);
    `user` is the startup user; `principals` maps access key id -> Principal; `region`, when
    given, is the only region accepted in the credential scope. Raises TokenError with a
    loggable reason. X-Amz-Security-Token (temporary credentials) is covered by the signature
    but not validated further: only AWS STS could do that, so a principal is identified by its
    access key id and secret alone. See `resource_matches` for how policies are applied.
    """
    tok_host, tok_port, params, ordered = _parse(token)

    if params["Action"] != "connect":
        raise TokenError("token action is not connect")
    if params["DBUser"] != user:
        raise TokenError("token was issued for another database user")
    if int(tok_port) != port or tok_host.strip("[]").lower() not in _host_set(host):
        raise TokenError("token was issued for another endpoint")
    if params["X-Amz-Algorithm"] != ALGORITHM:
        raise TokenError("token signing algorithm is not AWS4-HMAC-SHA256")
    if params["X-Amz-SignedHeaders"] != "host":
        raise TokenError("token signed headers are not exactly 'host'")

    amz_date = params["X-Amz-Date"]
    if not _DATE_RE.match(amz_date):
        raise TokenError("token date is malformed")
    try:
        signed_at = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        raise TokenError("token date is malformed") from None

    scope = params["X-Amz-Credential"].split("/")
    if len(scope) != 5 or not all(scope):
        raise TokenError("token credential scope is malformed")
    akid, scope_date, scope_region, service, terminator = scope
    if service != SERVICE or terminator != "aws4_request":
        raise TokenError("token credential scope is not for rds-db")
    if scope_date != amz_date[:8]:
        raise TokenError("token credential scope date does not match its date")
    if region is not None and scope_region != region:
        raise TokenError("token was issued for another region")

    principal = principals.get(akid)
    if principal is None:
        raise TokenError("token access key id is unknown")

    expires = params["X-Amz-Expires"]
    if not _EXPIRES_RE.match(expires) or not 0 < int(expires) <= MAX_EXPIRES:
        raise TokenError(f"token expiry must be between 1 and {MAX_EXPIRES} seconds")
    now_utc = _utc(now)
    skew = timedelta(seconds=clock_skew)
    if signed_at + timedelta(seconds=int(expires)) + skew < now_utc:
        raise TokenError("token has expired")
    if signed_at - skew > now_utc:
        raise TokenError("token is dated in the future")

    signature = params["X-Amz-Signature"]
    unsigned = [(k, v) for k, v in ordered if k != "X-Amz-Signature"]
    expected = _signature(principal.secret_access_key, amz_date, scope_region,
                          _host_header(tok_host, int(tok_port)), unsigned)
    # Compare whatever was sent (even if malformed) in constant time.
    if not hmac.compare_digest(expected.encode("ascii"), signature.encode("utf-8")) \
            or not _SIGNATURE_RE.match(signature):
        raise TokenError("token signature does not match")

    if not any(resource_matches(p, region=scope_region, user=user) for p in principal.resources):
        raise TokenError("no rds-db:connect resource of the principal allows this user and region")
    return principal
