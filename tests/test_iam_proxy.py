"""Issue 4: IAM auth tokens as passwords, verified by the proxy (real boto3 tokens, real clients)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from harness import APP_DB, APP_PASSWORD, APP_USER, raw_startup
from rdsproxy.auth.iam import generate_token

AKID = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
REGION = "us-east-1"


def boto3_token(port, user=APP_USER, host="127.0.0.1", akid=AKID, secret=SECRET, region=REGION):
    import boto3

    session = boto3.session.Session(aws_access_key_id=akid, aws_secret_access_key=secret,
                                    region_name=region)
    return session.client("rds").generate_db_auth_token(DBHostname=host, Port=port,
                                                        DBUsername=user, Region=region)


@pytest.fixture
def iam_proxy(proxy_factory, test_ca, tmp_path):
    principal = tmp_path / "principal.json"
    principal.write_text(json.dumps({"AccessKeyId": AKID, "SecretAccessKey": SECRET}))

    def make(mode="REQUIRED", **kw):
        return proxy_factory(
            tls={"cert_file": test_ca.server_cert, "key_file": test_ca.server_key},
            iam={"region": REGION, "principals": [{
                "access_key_id": AKID, "secret_access_key": "file:principal.json",
                "resources": [f"arn:aws:rds-db:{REGION}:123456789012:dbuser:*/{APP_USER}"]}]},
            iam_auth={APP_USER: mode}, **kw)
    return make


def connect(proxy, password, user=APP_USER, sslmode="require"):
    return psycopg.connect(host="127.0.0.1", port=proxy.port, user=user, password=password,
                           dbname=APP_DB, sslmode=sslmode, connect_timeout=10)


def test_boto3_token_connects(iam_proxy, caplog):
    proxy = iam_proxy()
    caplog.set_level(logging.INFO, logger="rdsproxy")
    token = boto3_token(proxy.port)
    with connect(proxy, token) as conn:
        assert conn.execute("select current_user").fetchone() == (APP_USER,)
        assert conn.pgconn.ssl_in_use
    # "localhost" is one of the default host names of a loopback endpoint.
    with connect(proxy, boto3_token(proxy.port, host="localhost")) as conn:
        conn.execute("select 1")
    assert token not in caplog.text
    assert f"IAM token of {AKID} accepted" in caplog.text
    # With REQUIRED the secret's password is no longer accepted from clients.
    with pytest.raises(psycopg.OperationalError):
        connect(proxy, APP_PASSWORD)


def test_cli_generate_auth_token(iam_proxy):
    proxy = iam_proxy()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": AKID, "AWS_SECRET_ACCESS_KEY": SECRET}
    env.pop("AWS_SESSION_TOKEN", None)
    out = subprocess.run([sys.executable, "-m", "rdsproxy", "generate-auth-token", "--hostname", "127.0.0.1",
                          "--port", str(proxy.port), "--username", APP_USER, "--region", REGION],
                         capture_output=True, text=True, env=env, timeout=30, check=True)
    token = out.stdout.strip()
    assert token.startswith(f"127.0.0.1:{proxy.port}/?Action=connect&DBUser={APP_USER}&")
    with connect(proxy, token) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def _bad_tokens(port):
    old = datetime.now(timezone.utc) - timedelta(minutes=21)
    good = boto3_token(port)
    last = good[-1]
    return {
        "expired": (generate_token(host="127.0.0.1", port=port, user=APP_USER, region=REGION,
                                   access_key_id=AKID, secret_access_key=SECRET, now=old),
                    "token has expired"),
        "wrong key": (boto3_token(port, secret=SECRET[:-1] + "X"), "token signature does not match"),
        "unknown key": (boto3_token(port, akid="AKIAOTHEROTHEROTHER1"), "token access key id is unknown"),
        "other user": (boto3_token(port, user="bob"), "token was issued for another database user"),
        "other host": (boto3_token(port, host="db.example.com"), "token was issued for another endpoint"),
        "other port": (boto3_token(port + 1), "token was issued for another endpoint"),
        "other region": (boto3_token(port, region="eu-west-1"), "token was issued for another region"),
        "tampered": (good[:-1] + ("0" if last != "0" else "1"), "token signature does not match"),
        "garbage": ("not-a-token", "token is not in HOST:PORT/?QUERY form"),
    }


def test_bad_tokens_refused_with_reason_in_log(iam_proxy, caplog, test_ca):
    proxy = iam_proxy()
    caplog.set_level(logging.INFO, logger="rdsproxy")
    engine = proxy.proxy.engine
    for name, (token, reason) in _bad_tokens(proxy.port).items():
        caplog.clear()
        # Each case starts unthrottled (throttling has its own test).
        proxy.call(engine.throttle.entries.clear)
        # The SQLSTATE, by hand over TLS ...
        import ssl
        ctx = ssl.create_default_context(cafile=test_ca.ca_cert)
        fields = raw_startup(proxy.port, context=ctx, password=token)
        assert fields.get("C") == "28P01", (name, fields)
        assert fields["M"] == f'password authentication failed for user "{APP_USER}"'
        # ... and what a real client sees.
        with pytest.raises(psycopg.OperationalError) as info:
            connect(proxy, token)
        assert "password authentication failed" in str(info.value), name
        assert f"IAM token rejected: {reason}" in caplog.text, (name, caplog.text)
        assert "127.0.0.1:" in caplog.text and repr(APP_USER) in caplog.text
        assert token not in caplog.text, name
    assert proxy.stats()["ClientConnectionsSetupFailedAuth"] == 2 * len(_bad_tokens(proxy.port))


def test_plaintext_login_of_an_iam_user_fails_as_an_unknown_users_does(iam_proxy, caplog):
    # Telling a plaintext client that this user needs TLS would tell anyone that the user
    # exists: the login runs and fails as an unknown user's, and the log says why.
    proxy = iam_proxy()
    caplog.set_level(logging.INFO, logger="rdsproxy")
    assert raw_startup(proxy.port) == raw_startup(proxy.port, user="zzz") == {"type": "R"}
    with pytest.raises(psycopg.OperationalError) as info:
        connect(proxy, boto3_token(proxy.port), sslmode="disable")
    assert f'password authentication failed for user "{APP_USER}"' in str(info.value)
    assert "IAM authentication requires TLS" in caplog.text


def test_optional_accepts_password_or_token(iam_proxy):
    proxy = iam_proxy(mode="OPTIONAL")
    with connect(proxy, boto3_token(proxy.port)) as conn:
        conn.execute("select 1")
    with connect(proxy, APP_PASSWORD) as conn:          # cleartext over TLS
        conn.execute("select 1")
    with connect(proxy, APP_PASSWORD, sslmode="disable") as conn:   # SCRAM in plaintext
        conn.execute("select 1")
    with pytest.raises(psycopg.OperationalError):
        connect(proxy, "wrong-password")


def test_repeated_failures_are_throttled_without_blocking(iam_proxy):
    proxy = iam_proxy(mode="OPTIONAL")
    timings = []
    for _ in range(7):
        start = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            connect(proxy, "wrong-password", sslmode="disable")
        timings.append(time.monotonic() - start)
    assert max(timings[:4]) < 0.5, timings
    assert timings[5] >= 0.45 and timings[6] >= 0.9, timings
    # While one failure answer is held back, the loop serves others at once.
    done = threading.Event()

    def slow_failure():
        try:
            connect(proxy, "wrong-password", sslmode="disable")
        except psycopg.OperationalError:
            pass
        done.set()
    th = threading.Thread(target=slow_failure)
    th.start()
    time.sleep(0.2)
    start = time.monotonic()
    with connect(proxy, APP_PASSWORD, sslmode="disable") as conn:
        conn.execute("select 1")
    assert time.monotonic() - start < 1.0
    assert not done.is_set()   # still waiting for its (>= 2 s) answer
    th.join(20)


def test_iam_config_errors():
    from rdsproxy.config import ConfigError, config_from_dict

    base = {"auth": [{"secret": "env:X", "iam_auth": "REQUIRED"}], "targets": [{"host": "h"}]}
    with pytest.raises(ConfigError) as info:
        config_from_dict(base, source="p.toml")
    assert info.value.key == "auth[0].iam_auth" and "iam.principals" in info.value.problem
    with pytest.raises(ConfigError) as info:
        config_from_dict({**base, "iam": {"principals": [{"secret_access_key": "env:K", "resources": ["*"]}]}},
                         source="p.toml")
    assert info.value.key == "auth[0].iam_auth" and "TLS" in info.value.problem
    with pytest.raises(ConfigError) as info:
        config_from_dict({**base, "iam": {"principals": [{"secret_access_key": "K"}]}}, source="p.toml")
    assert str(info.value).startswith("p.toml: iam.principals[0].secret_access_key: must start with")
    with pytest.raises(ConfigError) as info:
        config_from_dict({**base, "iam": {"principals": [{"secret_access_key": "env:K", "color": 1}]}},
                         source="p.toml")
    assert info.value.key == "iam.principals[0].color"


def test_lambda_example(pg, tmp_path, monkeypatch):
    """examples/lambda_iam: its proxy.toml served by `rdsproxy serve --generate-self-signed`,
    its handler.py run unchanged with only environment variables set."""
    pytest.importorskip("psycopg2")
    import importlib.util
    import shutil
    import signal
    from pathlib import Path

    from utils import free_port, wait_for_port

    repo = Path(__file__).resolve().parent.parent
    example = repo / "examples" / "lambda_iam"
    work = tmp_path / "lambda"
    shutil.copytree(example, work, ignore=shutil.ignore_patterns("tls", "__pycache__"))
    port = free_port()
    text = (work / "proxy.toml").read_text()
    assert "port = 5432" in text and 'listen = "127.0.0.1:6432"' in text
    text = text.replace("port = 5432", f"port = {pg.port}").replace(
        'listen = "127.0.0.1:6432"', f'listen = "127.0.0.1:{port}"')
    (work / "proxy.toml").write_text(text)
    (work / "secrets" / "app.json").write_text(json.dumps({"username": APP_USER, "password": APP_PASSWORD}))
    principal = json.loads((work / "secrets" / "lambda-principal.json").read_text())
    log_path = tmp_path / "proxy.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rdsproxy", "serve", "--config", str(work / "proxy.toml"),
                                 "--generate-self-signed", str(work / "tls")],
                                stdout=log, stderr=subprocess.STDOUT, cwd=repo)
    try:
        wait_for_port(port, timeout=20, proc=proc)
        banner = log_path.read_text()
        assert "SELF-SIGNED" in banner and str(work / "tls") in banner
        assert oct(os.stat(work / "tls" / "rdsproxy-self-signed.key").st_mode & 0o777) == "0o600"
        for key in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION"):
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
        env = {"DB_HOST": "127.0.0.1", "DB_PORT": str(port), "DB_USER": APP_USER, "DB_NAME": APP_DB,
               "AWS_REGION": REGION, "AWS_ACCESS_KEY_ID": principal["AccessKeyId"],
               "AWS_SECRET_ACCESS_KEY": principal["SecretAccessKey"]}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        spec = importlib.util.spec_from_file_location("lambda_iam_handler", example / "handler.py")
        handler = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(handler)
        result = handler.lambda_handler({}, None)
        assert result["statusCode"] == 200
        assert json.loads(result["body"])["user"] == APP_USER
        # A plaintext client is refused (require_tls), and the token never reaches the log.
        fields = raw_startup(port)
        assert fields["C"] == "28000"
        assert "X-Amz-Signature" not in log_path.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
