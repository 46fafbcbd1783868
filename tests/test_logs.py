"""The proxy's log as an operator reads it: `serve --log-format json --log-level ...`, a line
per client login and close for both engines, the periodic stats line, and debug_logging's
detail without a password, secret or IAM token in it (real servers, real clients, the proxy
as a subprocess)."""
from __future__ import annotations

import json
import time

import psycopg
import pytest

from harness import APP_DB, APP_PASSWORD, APP_USER, connect as mysql_connect, scalar
from rdsproxy.auth.iam import generate_token

AKID = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
REGION = "us-east-1"


def json_lines(proxy) -> list[dict]:
    """Every line of the proxy's log, each parsed as one JSON object."""
    return [json.loads(line) for line in proxy.log_text().splitlines() if line]


def wait_for_line(proxy, timeout=10.0, **fields) -> dict:
    """The first JSON log line carrying all of `fields`, waiting for it."""
    deadline = time.monotonic() + timeout
    while True:
        for line in json_lines(proxy):
            if all(line.get(name) == value for name, value in fields.items()):
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"no line with {fields}:\n{proxy.log_text()[-3000:]}")
        time.sleep(0.05)


def pg_session(proxy, password=APP_PASSWORD, **extra):
    conn = psycopg.connect(proxy.dsn(APP_USER, password, APP_DB, **extra), autocommit=True)
    assert conn.execute("select 1").fetchone() == (1,)
    return conn


def mysql_session(proxy):
    conn = mysql_connect(proxy)
    assert scalar(conn, "select 1") == 1
    return conn


SESSIONS = {"postgres": pg_session, "mysql": mysql_session}
# One more statement on a session's connection.
STATEMENTS = {"postgres": lambda conn: conn.execute("select 2").fetchone(),
              "mysql": lambda conn: scalar(conn, "select 2")}
LOG_CONNECTIONS = {"log_connections": True}
AUTH = {"postgres": "scram-sha-256", "mysql": "mysql_native_password"}


@pytest.mark.parametrize("engine", ["postgres", "mysql"])
def test_json_lines_carry_login_and_close(proxy_process_factory, engine):
    proxy = proxy_process_factory(engine=engine, serve_args=["--log-format", "json"],
                                  top=LOG_CONNECTIONS)
    conn = SESSIONS[engine](proxy)
    login = wait_for_line(proxy, event="login", engine=engine)
    client = login["client"]
    assert login["level"] == "info" and login["logger"] == "rdsproxy.sessions"
    assert login["ts"].endswith("Z") and login["ts"][10] == "T"
    assert (login["user"], login["database"], login["tls"], login["auth"]) == \
        (APP_USER, APP_DB, False, AUTH[engine])
    assert client.startswith("127.0.0.1:") and client in login["message"]
    conn.close()
    close = wait_for_line(proxy, event="close", client=client)
    assert (close["engine"], close["user"], close["reason"]) == (engine, APP_USER, "client quit")
    assert close["duration_s"] >= 0
    json_lines(proxy)   # every line of the log, the banner's too, is one JSON object


def test_quick_lane_md5_login_is_logged(proxy_process_factory):
    """Most md5 logins finish in the relay's compiled lane: they get their line too."""
    proxy = proxy_process_factory(engine="postgres", client_auth="POSTGRES_MD5",
                                  serve_args=["--log-format", "json"], top=LOG_CONNECTIONS)
    for _ in range(3):   # the first teaches the lane the greeting; the rest are the lane's
        pg_session(proxy, sslmode="disable").close()
    deadline = time.monotonic() + 10
    while True:
        # (wait_for_port's probe, which never logs in, has a close line of its own)
        lines = [line for line in json_lines(proxy) if line.get("user") == APP_USER]
        logins = [line for line in lines if line["event"] == "login"]
        closes = [line for line in lines if line["event"] == "close"]
        if len(closes) == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(logins) == 3 and {line["auth"] for line in logins} == {"md5"}
    assert sorted(line["client"] for line in closes) == sorted(line["client"] for line in logins)
    assert {line["reason"] for line in closes} == {"client quit"}


@pytest.mark.parametrize("engine", ["postgres", "mysql"])
def test_idle_timeout_is_the_close_reason(proxy_process_factory, engine):
    proxy = proxy_process_factory(engine=engine, serve_args=["--log-format", "json"],
                                  top={"idle_client_timeout": 1, **LOG_CONNECTIONS})
    conn = SESSIONS[engine](proxy)
    close = wait_for_line(proxy, timeout=15, event="close", engine=engine, user=APP_USER)
    assert close["reason"] == "idle_timeout" and close["duration_s"] >= 1
    conn.close()


def test_warning_level_hides_info_lines(proxy_process_factory):
    proxy = proxy_process_factory(engine="postgres",
                                  serve_args=["--log-format", "json", "--log-level", "warning"])
    pg_session(proxy).close()
    with pytest.raises(psycopg.OperationalError):
        pg_session(proxy, password="wrong")
    wait_for_line(proxy, level="warning", logger="rdsproxy.client")   # the failed login
    assert {line["level"] for line in json_lines(proxy)} == {"warning"}


def test_text_format_by_default(proxy_process_factory):
    proxy = proxy_process_factory(engine="postgres", top=LOG_CONNECTIONS)
    pg_session(proxy).close()
    proxy.wait_for_log("closed: user app")
    text = proxy.log_text()
    assert "INFO rdsproxy.sessions: client 127.0.0.1:" in text
    assert "logged in: user app, database appdb, no TLS, auth scram-sha-256" in text
    with pytest.raises(json.JSONDecodeError):
        json_lines(proxy)


@pytest.mark.parametrize("engine", ["postgres", "mysql"])
def test_stats_line_each_interval(proxy_process_factory, engine):
    proxy = proxy_process_factory(engine=engine, serve_args=["--log-format", "json"],
                                  top={"stats_log_interval": 1})
    conn = SESSIONS[engine](proxy)
    for _ in range(4):   # five autocommit statements: a transaction each
        STATEMENTS[engine](conn)
    # They (and, for MySQL, the driver's own) land in some stats lines.
    deadline = time.monotonic() + 15
    while True:
        stats = [line for line in json_lines(proxy) if line.get("event") == "stats"]
        if (sum(line["queries"] for line in stats) >= 5
                and sum(line["transactions"] for line in stats) >= 5 and len(stats) >= 2):
            break
        assert time.monotonic() < deadline, proxy.log_text()[-3000:]
        time.sleep(0.2)
    last = stats[-1]
    assert last["engine"] == engine and last["logger"] == "rdsproxy.stats"
    assert last["clients"] == 1 and last["clients_idle"] == 1 and last["clients_logging_in"] == 0
    assert last["pool_open"] >= 1 and last["pool_borrowed"] == 0
    assert sum(line["logins"] for line in stats) == 1
    busy = next(line for line in stats if line["transactions"])
    assert f"{busy['transactions']} transactions, " in busy["message"]
    assert sum(line["transactions"] for line in stats) <= 7   # the driver's own, at most
    for name in ("clients_active", "clients_pinned", "clients_waiting", "pool_idle",
                 "pool_waiting"):
        assert name in last
    conn.close()


def test_no_session_lines_without_log_connections(proxy_process_factory):
    proxy = proxy_process_factory(engine="postgres", serve_args=["--log-format", "json"],
                                  top={"stats_log_interval": 1})
    pg_session(proxy).close()
    wait_for_line(proxy, event="stats")   # a second has passed, and buffered lines are out
    assert not [line for line in json_lines(proxy) if line.get("event") in ("login", "close")]


def test_stats_line_off_with_zero(proxy_process_factory):
    proxy = proxy_process_factory(engine="postgres", serve_args=["--log-format", "json"],
                                  top={"stats_log_interval": 0})
    pg_session(proxy).close()
    time.sleep(2.5)
    assert not [line for line in json_lines(proxy) if line.get("event") == "stats"]


def test_debug_logging_shows_statements_but_no_secret(proxy_process_factory, test_ca, tmp_path):
    principal = tmp_path / "principal.json"
    principal.write_text(json.dumps({"AccessKeyId": AKID, "SecretAccessKey": SECRET}))
    proxy = proxy_process_factory(
        engine="postgres", serve_args=["--log-format", "json"],
        top={"debug_logging": True, **LOG_CONNECTIONS},
        tls={"cert_file": test_ca.server_cert, "key_file": test_ca.server_key},
        iam={"region": REGION, "principals": [{
            "access_key_id": AKID, "secret_access_key": f"file:{principal}",
            "resources": [f"arn:aws:rds-db:{REGION}:123456789012:dbuser:*/{APP_USER}"]}]},
        iam_auth={APP_USER: "OPTIONAL"})
    # Over TLS with OPTIONAL the password itself, then an IAM token, cross in the clear.
    with pg_session(proxy, sslmode="require") as conn:
        # A statement that pins, with the password as a literal in it.
        conn.execute(f"select pg_advisory_lock(hashtext('{APP_PASSWORD}'))")
    token = generate_token(host="127.0.0.1", port=proxy.port, user=APP_USER, region=REGION,
                           access_key_id=AKID, secret_access_key=SECRET)
    pg_session(proxy, password=token, sslmode="require").close()
    wait_for_line(proxy, event="login", auth="iam")
    wait_for_line(proxy, event="close", reason="client quit")
    pinned = wait_for_line(proxy, pin_reason="advisory_lock")
    assert pinned["level"] == "debug" and "pg_advisory_lock(hashtext('?'))" in pinned["statement"]
    logins = [line for line in json_lines(proxy) if line.get("event") == "login"]
    assert [line["auth"] for line in logins] == ["password", "iam"]
    assert all(line["tls"] for line in logins)
    text = proxy.log_text()
    assert "debug" in {line["level"] for line in json_lines(proxy)}
    for secret in (APP_PASSWORD, token, token.split("X-Amz-Signature=")[1], SECRET):
        assert secret not in text
