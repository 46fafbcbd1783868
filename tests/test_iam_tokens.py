"""IAM auth tokens: real botocore tokens verify, every kind of tampering is refused with a reason."""
from __future__ import annotations

import datetime as dt
import functools
import re
from unittest import mock
from urllib.parse import unquote

import boto3
import botocore.auth
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rdsproxy.auth.iam import Principal, TokenError, generate_token, resource_matches, verify_token

AKID = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
HOST, PORT, USER, REGION = "127.0.0.1", 6432, "app", "us-east-1"
T0 = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone.utc)
POLICY = ("arn:aws:rds-db:us-east-1:123456789012:dbuser:prx-*/app",)
PRINCIPALS = {AKID: Principal(AKID, SECRET, POLICY)}


@functools.lru_cache(maxsize=None)  # building a boto3 client is slow; tokens are pure
def boto_token(host=HOST, port=PORT, user=USER, region=REGION, akid=AKID, secret=SECRET,
               session_token=None, at=T0):
    """A token from real boto3, with botocore's clock frozen at `at`."""
    client = boto3.client("rds", region_name=region, aws_access_key_id=akid,
                          aws_secret_access_key=secret, aws_session_token=session_token)
    naive = at.astimezone(dt.timezone.utc).replace(tzinfo=None)
    with mock.patch.object(botocore.auth, "get_current_datetime", lambda *a, **k: naive):
        return client.generate_db_auth_token(DBHostname=host, Port=port, DBUsername=user)


def verify(token, **kw):
    args = dict(host=HOST, port=PORT, user=USER, principals=PRINCIPALS, now=T0)
    args.update(kw)
    return verify_token(token, **args)


def reject(token, match, **kw):
    with pytest.raises(TokenError, match=match) as info:
        verify(token, **kw)
    reason = str(info.value)
    assert token not in reason and SECRET not in reason and AKID not in reason
    return reason


def set_param(token, key, value):
    """Replace one raw (already encoded) query parameter value."""
    new, n = re.subn(rf"([?&]){re.escape(key)}=[^&]*", lambda m: f"{m.group(1)}{key}={value}", token)
    assert n == 1
    return new


# -- acceptance ---------------------------------------------------------------------------

def test_real_boto3_token_verifies_now():
    # Unfrozen: exactly what an application would send, checked against the real clock.
    client = boto3.client("rds", region_name="us-east-1", aws_access_key_id=AKID,
                          aws_secret_access_key=SECRET)
    token = client.generate_db_auth_token(DBHostname="127.0.0.1", Port=6432, DBUsername="app")
    assert verify_token(token, host="127.0.0.1", port=6432, user="app",
                        principals=PRINCIPALS) is PRINCIPALS[AKID]


def test_frozen_boto3_token_verifies_within_lifetime():
    token = boto_token()
    for offset in (-299, 0, 899, 900 + 299):
        assert verify(token, now=T0 + dt.timedelta(seconds=offset)) is PRINCIPALS[AKID]


def test_session_token_and_region_restriction():
    token = boto_token(session_token="FQoGZXIvYXdzE/+=abc")
    assert "X-Amz-Security-Token=" in token
    assert verify(token, region="us-east-1")
    reject(token, "another region", region="eu-west-1")
    # The security token is signed: changing it breaks the signature.
    reject(set_param(token, "X-Amz-Security-Token", "other"), "signature")


def test_host_is_case_insensitive_and_may_be_a_set():
    token = boto_token(host="Proxy.Example.COM", port=5432)
    assert verify(token, host="proxy.example.com", port=5432)
    assert verify(token, host=["10.0.0.1", "PROXY.example.com"], port=5432)
    reject(token, "another endpoint", host=["10.0.0.1"], port=5432)


def test_ipv6_host_and_default_https_port():
    token = boto_token(host="[::1]", port=443)
    assert verify(token, host="::1", port=443)
    assert verify(token, host="[::1]", port=443)


def test_odd_user_names_roundtrip():
    principals = {AKID: Principal(AKID, SECRET, ("arn:aws:rds-db:us-east-1:1:dbuser:*/*",))}
    for user in ("a p/p+ü", "x=y&z", "~._-", "UPPER"):
        token = boto_token(user=user)
        assert verify(token, user=user, principals=principals)


# -- generate_token matches botocore ------------------------------------------------------

@pytest.mark.parametrize("host,port,user,region,session", [
    (HOST, PORT, USER, REGION, None),
    ("My.Proxy.Example", 443, "a p/p+ü", "eu-west-1", None),
    ("[::1]", 5432, "app", "ap-southeast-2", "tok/en+=x"),
])
def test_generate_token_equals_botocore(host, port, user, region, session):
    ours = generate_token(host=host, port=port, user=user, region=region, access_key_id=AKID,
                          secret_access_key=SECRET, session_token=session, now=T0)
    assert ours == boto_token(host=host, port=port, user=user, region=region,
                              session_token=session)


def test_generate_token_naive_now_is_utc_and_verifies():
    naive = T0.replace(tzinfo=None)
    token = generate_token(host=HOST, port=PORT, user=USER, region=REGION,
                           access_key_id=AKID, secret_access_key=SECRET, now=naive)
    assert token == boto_token()
    assert verify(token, now=naive)


# -- rejections ---------------------------------------------------------------------------

def test_expired_and_future():
    token = boto_token()
    reject(token, "expired", now=T0 + dt.timedelta(minutes=16) + dt.timedelta(seconds=300))
    reject(token, "expired", now=T0 + dt.timedelta(minutes=16), clock_skew=0)
    reject(token, "future", now=T0 - dt.timedelta(minutes=6))
    reject(token, "future", now=T0 - dt.timedelta(seconds=1), clock_skew=0)


def test_expired_after_16_minutes_with_default_skew_window():
    # 900 s lifetime + 300 s skew: +16 min is inside, +21 min is not.
    token = boto_token()
    assert verify(token, now=T0 + dt.timedelta(minutes=16))
    reject(token, "expired", now=T0 + dt.timedelta(minutes=21))


def test_wrong_secret_key():
    reject(boto_token(secret="not-the-secret"), "signature")


def test_unknown_access_key():
    reject(boto_token(akid="AKIAUNKNOWNKEY000000"), "unknown")


def test_other_user_host_port():
    token = boto_token()
    reject(token, "another database user", user="admin")
    reject(token, "another endpoint", host="127.0.0.2")
    reject(token, "another endpoint", port=6433)
    reject(boto_token(user="admin"), "another database user")
    reject(boto_token(host="localhost"), "another endpoint")
    reject(boto_token(port=5432), "another endpoint")


def test_tampered_fields():
    token = boto_token()
    reject(set_param(token, "Action", "Connect"), "action")
    reject(set_param(token, "DBUser", "admin"), "another database user")
    # DBUser tampered and verified as that user: the signature catches it.
    reject(set_param(token, "DBUser", "admin"), "signature", user="admin")
    reject(set_param(token, "X-Amz-Algorithm", "AWS4-HMAC-SHA1"), "algorithm")
    reject(set_param(token, "X-Amz-Credential",
                     f"{AKID}%2F20240506%2Fus-west-2%2Frds-db%2Faws4_request"), "signature")
    reject(set_param(token, "X-Amz-Credential",
                     f"{AKID}%2F20240506%2Fus-east-1%2Frds%2Faws4_request"), "rds-db")
    reject(set_param(token, "X-Amz-Credential",
                     f"{AKID}%2F20240507%2Fus-east-1%2Frds-db%2Faws4_request"), "scope date")
    reject(set_param(token, "X-Amz-Credential", f"{AKID}%2F20240506%2Fus-east-1"), "scope")
    reject(set_param(token, "X-Amz-Date", "20240506T070810Z"), "signature")
    reject(set_param(token, "X-Amz-Date", "20240506T250000Z"), "date")
    reject(set_param(token, "X-Amz-Date", "2024-05-06"), "date")
    reject(set_param(token, "X-Amz-Expires", "899"), "signature")
    reject(set_param(token, "X-Amz-SignedHeaders", "host%3Bx-amz-date"), "signed headers")
    sig = re.search(r"X-Amz-Signature=([0-9a-f]+)", token).group(1)
    flipped = sig[:-1] + ("0" if sig[-1] != "0" else "1")
    reject(set_param(token, "X-Amz-Signature", flipped), "signature")
    reject(set_param(token, "X-Amz-Signature", sig.upper()), "signature")
    reject(set_param(token, "X-Amz-Signature", sig[:-2]), "signature")
    reject(token + "&Extra=1", "unexpected parameter")
    reject(token + "&DBUser=app", "repeats")
    reject(token.replace("&X-Amz-Date=20240506T070809Z", ""), "lacks X-Amz-Date")


def test_expires_limits():
    for value in ("901", "3600", "0", "-1", "abc", ""):
        token = generate_token(host=HOST, port=PORT, user=USER, region=REGION, access_key_id=AKID,
                               secret_access_key=SECRET, now=T0)
        reject(set_param(token, "X-Amz-Expires", value), "expiry")
    # Even correctly signed, an over-long lifetime is refused.
    long_lived = generate_token(host=HOST, port=PORT, user=USER, region=REGION,
                                access_key_id=AKID, secret_access_key=SECRET, now=T0, expires=3600)
    reject(long_lived, "expiry")
    short = generate_token(host=HOST, port=PORT, user=USER, region=REGION, access_key_id=AKID,
                           secret_access_key=SECRET, now=T0, expires=60)
    assert verify(short, now=T0 + dt.timedelta(seconds=60 + 299))
    reject(short, "expired", now=T0 + dt.timedelta(seconds=60 + 301))


def test_policy_must_match_user_and_region():
    token = boto_token()
    other_user = {AKID: Principal(AKID, SECRET, ("arn:aws:rds-db:us-east-1:1:dbuser:prx-*/other",))}
    other_region = {AKID: Principal(AKID, SECRET, ("arn:aws:rds-db:eu-west-1:1:dbuser:prx-*/app",))}
    no_policy = {AKID: Principal(AKID, SECRET, ())}
    for principals in (other_user, other_region, no_policy):
        reject(token, "resource", principals=principals)
    several = {AKID: Principal(AKID, SECRET, ("arn:aws:rds-db:eu-west-1:1:dbuser:*/*",
                                              "arn:aws:rds-db:us-*:1:dbuser:prx-abc/a?p"))}
    assert verify(token, principals=several)


def test_resource_matching_rules():
    m = resource_matches
    assert m("*", region="us-east-1", user="app")
    assert m("arn:aws:rds-db:us-east-1:123456789012:dbuser:prx-0abc/app", region="us-east-1", user="app")
    assert m("arn:aws:rds-db:*:*:dbuser:*/*", region="eu-west-1", user="x")
    assert m("arn:aws:rds-db:us-east-?:1:dbuser:db-X/ap*", region="us-east-2", user="app_rw")
    assert m("arn:aws-cn:rds-db:cn-north-1:1:dbuser:*/app", region="cn-north-1", user="app")
    assert m("arn:aws:rds-db:us-east-1:1:dbuser:*", region="us-east-1", user="app")
    assert not m("arn:aws:rds-db:us-east-1:1:dbuser:prx-*", region="us-east-1", user="app")
    assert not m("arn:aws:rds-db:us-east-1:1:dbuser:*/App", region="us-east-1", user="app")
    assert not m("arn:aws:rds-db:us-east-1:1:dbuser:*/ap", region="us-east-1", user="app")
    assert not m("arn:aws:rds-db:us-east-1:1:dbuser:*/app?", region="us-east-1", user="app")
    assert not m("arn:aws:rds:us-east-1:1:dbuser:*/app", region="us-east-1", user="app")
    assert not m("arn:aws:rds-db:us-east-1:1:cluster:*/app", region="us-east-1", user="app")
    assert not m("arn:aws:rds-db:us-west-2:1:dbuser:*/app", region="us-east-1", user="app")
    assert not m("rds-db:us-east-1:1:dbuser:*/app", region="us-east-1", user="app")
    assert not m("", region="us-east-1", user="app")


@pytest.mark.parametrize("garbage", [
    "", "password", "127.0.0.1:6432", "127.0.0.1:6432/?", "/?Action=connect", ":6432/?a=b",
    "127.0.0.1:port/?Action=connect", "127.0.0.1:6432/?Action", "127.0.0.1:6432/?=x",
    "127.0.0.1:6432/?Action=connect&DBUser=%ZZ", "127.0.0.1:6432/?DBUser=%ff%fe",
    "127.0.0.1:6432/?Action=connect&DBUser=app", "x" * 100000, "ü" * 10, "a b/?c=d",
    "127.0.0.1:6432/?Action=connect#frag", "\x00\x01",
])
def test_garbage_is_refused(garbage):
    with pytest.raises(TokenError):
        verify(garbage)


def test_non_string_is_refused():
    with pytest.raises(TokenError):
        verify(b"127.0.0.1:6432/?Action=connect")  # type: ignore[arg-type]


@settings(max_examples=400, deadline=None)
@given(st.text())
def test_random_text_only_raises_token_error(text):
    try:
        verify(text)
    except TokenError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=400), st.text(min_size=0, max_size=5))
def test_random_mutations_of_a_valid_token_only_raise_token_error(pos, insert):
    token = boto_token()
    mutated = token[:pos] + insert + token[pos + len(insert):]
    try:
        verify(mutated)
    except TokenError:
        return
    # Anything accepted is the original up to percent-escape spelling (e.g. %2f for %2F).
    assert unquote(mutated) == unquote(token)
