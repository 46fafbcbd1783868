"""Targets through the proxy: role routing, failover, a dead or flapping target, reloads,
describe-targets (CLI and admin HTTP). Real primaries and streaming replicas throughout."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import psycopg
import pytest
import harness
from harness import FAST_CHECKS, READ_WRITE_AND_READ_ONLY, RunningProxy, describe_targets_cli
from proxyproc import dump_toml
from utils import free_port, wait_until

from rdsproxy import config_from_dict
from rdsproxy.devservers.postgres import PostgresCluster

USER, PASSWORD, DB = "app", "app-secret", "appdb"


def _prepare(primary: PostgresCluster) -> None:
    primary.psql(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
    primary.psql(f"CREATE DATABASE {DB} OWNER {USER}")


@pytest.fixture(scope="module")
def pair():
    """A primary with user app/appdb and its streaming replica (not to be killed)."""
    primary = PostgresCluster(max_connections=40).start()
    replica = None
    try:
        _prepare(primary)
        replica = primary.make_replica()
        yield primary, replica
    finally:
        if replica is not None:
            replica.stop("immediate")
        primary.stop("immediate")


def proxy_config(tmp_path, targets, **options) -> dict:
    """User app (md5, its secret naming appdb) in front of `targets` [(name, cluster)], with
    rw and ro endpoints and fast health checks."""
    options.setdefault("endpoints", READ_WRITE_AND_READ_ONLY)
    return harness.proxy_config(tmp_path, targets=targets, users=[(USER, PASSWORD)],
                                client_auth="POSTGRES_MD5", secret_fields={"dbname": DB},
                                **{**FAST_CHECKS, **options})


@pytest.fixture
def start_proxy(proxy_factory):
    """start(config) -> RunningProxy, stopped at test end."""
    return lambda config: proxy_factory(config=config)


@pytest.fixture
def only_target(pg_factory, start_proxy, tmp_path):
    """make(**target_group) -> (cluster, proxy): a cluster of its own with user app, and a
    proxy with it as its one target "only" (AVAILABLE) behind one rw endpoint."""
    def make(**target_group):
        cluster = pg_factory(max_connections=20)
        _prepare(cluster)
        proxy = start_proxy(proxy_config(tmp_path, [("only", cluster)], **target_group,
                                         endpoints=[{"name": "rw", "listen": "127.0.0.1:0"}]))
        wait_available(proxy, "only")
        return cluster, proxy

    return make


def dsn(proxy: RunningProxy, endpoint: str = "rw", **extra) -> str:
    host, port = proxy.proxy.addresses[endpoint]
    parts = [f"host={host} port={port} user={USER} password={PASSWORD} dbname={DB}",
             "sslmode=disable connect_timeout=20"] + [f"{k}={v}" for k, v in extra.items()]
    return " ".join(parts)


def query(proxy, sql, endpoint="rw"):
    with psycopg.connect(dsn(proxy, endpoint), autocommit=True) as conn:
        return conn.execute(sql).fetchone()[0]


def targets_by_name(proxy) -> dict:
    return {t["RdsResourceId"]: t for t in proxy.call(proxy.proxy.describe_targets)["Targets"]}


def wait_available(proxy, *names, timeout=10):
    def ready():
        found = targets_by_name(proxy)
        return all(found.get(n, {}).get("TargetHealth", {}).get("State") == "AVAILABLE" for n in names)
    wait_until(ready, timeout=timeout, message=f"{names} AVAILABLE")


# -- routing by role -----------------------------------------------------------------------

def test_roles_reader_endpoint_and_describe(pair, start_proxy, tmp_path):
    primary, replica = pair
    proxy = start_proxy(proxy_config(tmp_path, [("primary", primary), ("replica", replica)], admin=True))
    wait_available(proxy, "primary", "replica")
    assert query(proxy, "SELECT pg_is_in_recovery()") is False
    assert query(proxy, "SELECT inet_server_port()") == primary.port
    assert query(proxy, "SELECT pg_is_in_recovery()", "ro") is True
    assert query(proxy, "SELECT inet_server_port()", "ro") == replica.port
    with psycopg.connect(dsn(proxy, "ro"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("CREATE TABLE nope (x int)")

    # The admin endpoint serves describe-targets as JSON, with pool figures.
    host, port = proxy.proxy.admin_address
    with urllib.request.urlopen(f"http://{host}:{port}/targets", timeout=5) as response:
        data = json.loads(response.read())
    by_name = {t["RdsResourceId"]: t for t in data["Targets"]}
    assert by_name["primary"]["Role"] == "READ_WRITE"
    assert by_name["replica"]["Role"] == "READ_ONLY"
    assert by_name["primary"]["Endpoint"] == "127.0.0.1" and by_name["primary"]["Port"] == primary.port
    for t in by_name.values():
        assert t["TargetHealth"] == {"State": "AVAILABLE", "Reason": None, "Description": None}
        assert t["Pool"]["Open"] >= 1 and t["Pool"]["InUse"] == 0
    with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=5) as response:
        assert response.read() == b"ok\n"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://{host}:{port}/nothing", timeout=5)
    assert info.value.code == 404


def test_describe_targets_cli_with_and_without_admin(pair, tmp_path):
    primary, replica = pair
    admin_port, port = free_port(), free_port()
    config = proxy_config(tmp_path, [("primary", primary), ("replica", replica)],
                          endpoints=[{"name": "rw", "listen": f"127.0.0.1:{port}"}])
    admin = {"admin": {"listen": f"127.0.0.1:{admin_port}"}}
    # Without [admin]: one check from the CLI itself, no pool figures.
    plain = tmp_path / "plain.toml"
    plain.write_text(dump_toml(config))
    assert describe_targets_cli(plain) == {"primary": ("READ_WRITE", "AVAILABLE"),
                                           "replica": ("READ_ONLY", "AVAILABLE")}

    # With [admin]: asks the running proxy.
    with_admin = tmp_path / "admin.toml"
    with_admin.write_text(dump_toml({**config, **admin}))
    proc = subprocess.Popen([sys.executable, "-m", "rdsproxy", "serve", "--config", str(with_admin)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def table():
            out = subprocess.run([sys.executable, "-m", "rdsproxy", "describe-targets", "--config",
                                  str(with_admin)], capture_output=True, text=True, timeout=30)
            return out.stdout if out.returncode == 0 and out.stdout.count("AVAILABLE") == 2 else None
        text = wait_until(table, timeout=20, interval=0.3, message="describe-targets through the admin endpoint")
        header, *rows = text.strip().splitlines()
        assert header.split() == ["TARGET", "ENDPOINT", "ROLE", "STATE", "REASON", "IN", "USE", "IDLE",
                                  "WAITING", "PINNED"]
        assert any(r.split()[:4] == ["primary", f"127.0.0.1:{primary.port}", "READ_WRITE", "AVAILABLE"]
                   for r in rows)
        assert any(r.split()[:4] == ["replica", f"127.0.0.1:{replica.port}", "READ_ONLY", "AVAILABLE"]
                   for r in rows)

        # SIGHUP re-reads the file's [[targets]]: the replica removed from it is deregistered.
        with_admin.write_text(dump_toml({**config, **admin, "targets": config["targets"][:1]}))
        proc.send_signal(signal.SIGHUP)

        def names():
            out = subprocess.run([sys.executable, "-m", "rdsproxy", "describe-targets", "--config",
                                  str(with_admin), "--json"], capture_output=True, text=True, timeout=30)
            return [t["RdsResourceId"] for t in json.loads(out.stdout)["Targets"]] == ["primary"]
        wait_until(names, timeout=20, interval=0.3, message="replica deregistered after SIGHUP")
    finally:
        proc.terminate()
        proc.wait(20)


def _describe_targets(config_path) -> tuple[int, dict]:
    """`rdsproxy describe-targets --json`: its exit status, and each target's health."""
    out = subprocess.run([sys.executable, "-m", "rdsproxy", "describe-targets", "--config",
                          str(config_path), "--json"], capture_output=True, text=True, timeout=60)
    return out.returncode, {t["RdsResourceId"]: t["TargetHealth"]
                            for t in json.loads(out.stdout)["Targets"]}


def test_describe_targets_cli_fails_for_a_target_down_or_refusing_the_login(pair, tmp_path):
    primary, _ = pair
    nothing = SimpleNamespace(host="127.0.0.1", port=free_port())   # nothing listens there
    down = tmp_path / "down.toml"
    down.write_text(dump_toml(proxy_config(tmp_path, [("primary", primary), ("gone", nothing)])))
    status, health = _describe_targets(down)
    assert status == 1
    assert health["primary"]["State"] == "AVAILABLE"
    assert health["gone"]["State"] == "UNAVAILABLE"
    assert health["gone"]["Reason"] in ("UNREACHABLE", "CONNECTION_FAILED"), health["gone"]

    refused = tmp_path / "refused.toml"
    refused.write_text(dump_toml(harness.proxy_config(
        tmp_path, targets=[("primary", primary)], users=[(USER, "not-the-password")],
        client_auth="POSTGRES_MD5", secret_fields={"dbname": DB})))
    status, health = _describe_targets(refused)
    assert status == 1
    assert health["primary"]["State"] == "UNAVAILABLE"
    assert health["primary"]["Reason"] == "AUTH_FAILURE", health["primary"]


def test_ready_follows_the_targets_across_an_outage(pg_factory, start_proxy, tmp_path):
    primary = pg_factory(max_connections=20)
    _prepare(primary)
    proxy = start_proxy(proxy_config(tmp_path, [("primary", primary)], admin=True,
                                     endpoints=[{"name": "rw", "listen": "127.0.0.1:0"}]))
    host, port = proxy.proxy.admin_address

    def ready():
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/ready", timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    wait_until(lambda: ready()[0] == 200, timeout=15, message="ready")
    assert ready()[1] == {"Ready": True, "Endpoints": {"rw": "primary"}}
    with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=5) as response:
        assert response.read() == b"ok\n"
    primary.kill()
    wait_until(lambda: ready()[0] == 503, timeout=15, message="not ready while the writer is down")
    assert ready()[1] == {"Ready": False, "Endpoints": {"rw": None}}
    with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=5) as response:
        assert response.read() == b"ok\n"                      # alive all the same
    primary.start()
    wait_until(lambda: ready()[0] == 200, timeout=30, message="ready again")
    assert query(proxy, "SELECT 1") == 1


def test_read_only_endpoint_waits_or_falls_back_to_writer(pair, start_proxy, tmp_path):
    primary, _ = pair
    # No reader at all: the READ_ONLY endpoint waits for one, up to the borrow timeout...
    proxy = start_proxy(proxy_config(tmp_path, [("primary", primary)], connection_borrow_timeout=1))
    wait_available(proxy, "primary")
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError, match="AVAILABLE reader"):
        query(proxy, "SELECT 1", "ro")
    assert 0.9 <= time.monotonic() - started < 5
    assert query(proxy, "SELECT 1") == 1            # the proxy is fine
    # ...unless read_only_fallback_to_writer sends it to the writer.
    fallback = start_proxy(proxy_config(tmp_path, [("primary", primary)],
                                        read_only_fallback_to_writer=True))
    wait_available(fallback, "primary")
    assert query(fallback, "SELECT inet_server_port()", "ro") == primary.port


def test_reader_endpoint_spreads_by_least_connections(pair, start_proxy, tmp_path):
    primary, replica = pair
    # Two "readers": the replica twice under different names (same server, two pools).
    proxy = start_proxy(proxy_config(tmp_path, [("primary", primary), ("replica-a", replica),
                                                ("replica-b", replica)]))
    wait_available(proxy, "primary", "replica-a", "replica-b")
    conns = [psycopg.connect(dsn(proxy, "ro")) for _ in range(4)]   # each holds a transaction
    try:
        for conn in conns:
            conn.execute("SELECT 1")
        in_use = {name: t["Pool"]["InUse"] for name, t in targets_by_name(proxy).items()}
        assert in_use == {"primary": 0, "replica-a": 2, "replica-b": 2}
    finally:
        for conn in conns:
            conn.close()


def test_targets_removed_and_readded_by_reload(pair, start_proxy, tmp_path):
    primary, replica = pair
    both = proxy_config(tmp_path, [("primary", primary), ("replica", replica)], connection_borrow_timeout=2)
    proxy = start_proxy(both)
    wait_available(proxy, "primary", "replica")
    assert query(proxy, "SELECT inet_server_port()", "ro") == replica.port

    only_primary = proxy_config(tmp_path, [("primary", primary)], connection_borrow_timeout=2)
    proxy.call(proxy.proxy.reload, config_from_dict(only_primary, base_dir=tmp_path))
    assert set(targets_by_name(proxy)) == {"primary"}
    with pytest.raises(psycopg.OperationalError, match="AVAILABLE reader"):
        query(proxy, "SELECT 1", "ro")
    assert query(proxy, "SELECT 1") == 1

    proxy.call(proxy.proxy.reload, config_from_dict(both, base_dir=tmp_path))
    assert targets_by_name(proxy)["replica"]["TargetHealth"]["State"] in ("REGISTERING", "AVAILABLE")
    wait_available(proxy, "replica")
    assert query(proxy, "SELECT inet_server_port()", "ro") == replica.port


# -- a dead target, a flapping one ---------------------------------------------------------

def test_target_that_never_comes_back(only_target):
    cluster, proxy = only_target(connection_borrow_timeout=2)
    conn = psycopg.connect(dsn(proxy), autocommit=True)
    assert conn.execute("SELECT 1").fetchone()[0] == 1
    cluster.kill()
    wait_until(lambda: targets_by_name(proxy)["only"]["TargetHealth"]["State"] == "UNAVAILABLE",
               timeout=5, message="UNAVAILABLE")
    assert targets_by_name(proxy)["only"]["TargetHealth"]["Reason"] == "CONNECTION_FAILED"
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError, match="waiting for an AVAILABLE writer"):
        conn.execute("SELECT 1")
    assert 1.5 <= time.monotonic() - started < 6
    # New clients get the same clear error after the same wait; the proxy itself is fine.
    with pytest.raises(psycopg.OperationalError, match="connection_borrow_timeout"):
        with psycopg.connect(dsn(proxy), autocommit=True) as other:
            other.execute("SELECT 1")
    stats = proxy.stats()
    assert stats["pool"]["borrowed"] == 0 and stats["pool"]["waiting"] == 0
    cluster.start()
    wait_available(proxy, "only")
    assert query(proxy, "SELECT 1") == 1


def test_flapping_target_clients_wait_instead_of_failing(only_target):
    cluster, proxy = only_target(connection_borrow_timeout=20)
    stop = threading.Event()
    results = {"ok": 0, "errors": []}

    def client():
        conn = psycopg.connect(dsn(proxy), autocommit=True, prepare_threshold=None)
        while not stop.is_set():
            try:
                conn.execute("SELECT 1").fetchone()
                results["ok"] += 1
            except psycopg.Error as exc:
                results["errors"].append(str(exc))
                conn = psycopg.connect(dsn(proxy), autocommit=True, prepare_threshold=None)
            time.sleep(0.01)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):            # down for about a second, up again, three times
            time.sleep(0.5)
            cluster.kill()
            time.sleep(1.0)
            cluster.start()
        before = results["ok"]
        wait_until(lambda: results["ok"] > before + 20, timeout=20, message="clients working again")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert results["errors"] == []
    assert targets_by_name(proxy)["only"]["TargetHealth"]["State"] == "AVAILABLE"


def test_pinned_session_on_a_dead_target_gets_a_clear_error(only_target):
    cluster, proxy = only_target()
    pinned = psycopg.connect(dsn(proxy), autocommit=True)
    pinned.execute("CREATE TEMP TABLE pinned_here (a int)")   # pins: temporary_object
    plain = psycopg.connect(dsn(proxy), autocommit=True, prepare_threshold=None)
    plain.execute("SELECT 1")
    cluster.kill()
    with pytest.raises(psycopg.OperationalError, match="session state is gone"):
        pinned.execute("SELECT 1")
    cluster.start()
    # The unpinned client only waited.
    assert plain.execute("SELECT 2").fetchone()[0] == 2
    assert proxy.stats()["RequestsReplayed"] == 0     # nothing was in flight


def test_what_a_client_carries_outlives_its_database_connections(only_target):
    """Settings, SQL PREPAREd statements and named protocol statements are the client's,
    not its connection's: after the database restarts under an idle client, its next
    statements find them on a new connection, with no error."""
    cluster, proxy = only_target(connection_borrow_timeout=20)
    with psycopg.connect(dsn(proxy), autocommit=True, prepare_threshold=None) as conn:
        conn.execute("set work_mem = '7MB'")
        conn.execute("prepare doubled(int) as select $1 * 2")
        assert conn.execute("select %s::int + 1", [1], prepare=True).fetchone()[0] == 2
        pid = conn.execute("select pg_backend_pid()").fetchone()[0]
        wait_until(lambda: proxy.stats()["pool"]["borrowed"] == 0, message="connection returned")
        cluster.kill()
        cluster.start()
        assert conn.execute("execute doubled(21)").fetchone()[0] == 42
        assert conn.execute("show work_mem").fetchone()[0] == "7MB"
        assert conn.execute("select %s::int + 1", [2], prepare=True).fetchone()[0] == 3
        assert conn.execute("select pg_backend_pid()").fetchone()[0] != pid
    assert proxy.stats()["SessionPinReasons"] == {}


# -- failover --------------------------------------------------------------------------------

def test_failover_drill_no_errors_outside_transactions():
    """50 clients with psycopg's defaults (named statements after five runs), primary
    stopped -m immediate, replica promoted."""
    from bench.failover import drill

    result = drill(clients=50, promote_after=0.5, interval=0.2, failures=2, log=lambda m: None)
    summary = json.dumps(result, indent=1)
    assert result["errors_outside_transaction"] == 0, summary
    assert result["errors_inside_transaction_max"] <= 1, summary
    assert result["workers_on_new_writer"] == 50, summary      # every client resumed there
    assert result["pause_seconds"] is not None and result["pause_seconds"] < 2.0, summary
    # psycopg's defaults: every client prepared its statements by name, and none was pinned.
    assert result["proxy_statement_clients"] >= 50, summary
    assert result["proxy_pin_reasons"] == {}, summary


def test_failover_promote_command_promotes_the_reader(start_proxy, tmp_path):
    """Off by default; when set, the proxy runs it once when the writer is gone and a reader
    is AVAILABLE, naming the reader in RDSPROXY_PROMOTE_* variables."""
    import os
    import shlex

    primary = PostgresCluster(max_connections=30).start()
    replica = None
    try:
        _prepare(primary)
        replica = primary.make_replica()
        marker = tmp_path / "promoted"
        pg_ctl = os.path.join(replica.pg_bin, "pg_ctl")
        command = (f'echo "$RDSPROXY_PROMOTE_NAME $RDSPROXY_PROMOTE_PORT" > {shlex.quote(str(marker))} && '
                   f"runuser -u postgres -- {pg_ctl} promote -w -D {shlex.quote(replica.data_dir)}")
        proxy = start_proxy(proxy_config(tmp_path, [("primary", primary), ("replica", replica)],
                                         failover_promote_command=command,
                                         connection_borrow_timeout=30))
        wait_available(proxy, "primary", "replica")
        conn = psycopg.connect(dsn(proxy), autocommit=True, prepare_threshold=None)
        assert conn.execute("SELECT inet_server_port()").fetchone()[0] == primary.port
        primary.kill()
        # Nobody promotes but the proxy: the next query waits, then runs on the new writer.
        assert conn.execute("SELECT inet_server_port()").fetchone()[0] == replica.port
        assert marker.read_text().split() == ["replica", str(replica.port)]
        assert replica.is_in_recovery() is False
    finally:
        if replica is not None:
            replica.stop("immediate")
        primary.stop("immediate")


def test_split_brain_routes_writes_nowhere(pg_factory, start_proxy, tmp_path):
    """Two targets both claiming to be the writer: no write goes to either (it could be lost
    on the wrong one), and the describe output and the client's error say why."""
    one, two = pg_factory(max_connections=20), pg_factory(max_connections=20)
    for cluster in (one, two):
        _prepare(cluster)
    proxy = start_proxy(proxy_config(tmp_path, [("one", one), ("two", two)], connection_borrow_timeout=1))
    wait_available(proxy, "one", "two")
    wait_until(lambda: all(t["TargetHealth"]["Reason"] == "INVALID_REPLICATION_STATE"
                           for t in targets_by_name(proxy).values()), timeout=5, message="split brain seen")
    assert "split brain" in targets_by_name(proxy)["one"]["TargetHealth"]["Description"]
    assert proxy.stats()["TargetStateChanges"] >= 2
    with pytest.raises(psycopg.OperationalError, match="split brain"):
        query(proxy, "SELECT 1")
    # Once one of them is gone, the other is the writer again.
    two.kill()
    wait_until(lambda: targets_by_name(proxy)["two"]["TargetHealth"]["State"] == "UNAVAILABLE",
               timeout=5, message="two UNAVAILABLE")
    assert query(proxy, "SELECT inet_server_port()") == one.port


def test_admin_endpoint_answers_bad_requests_and_keeps_serving(pair, start_proxy, tmp_path):
    """Garbage, a wrong method, an oversized head or a silent peer get an HTTP error (or a
    close) for that connection only; the endpoint and the proxy go on."""
    import socket as sock

    primary, _ = pair
    proxy = start_proxy(proxy_config(tmp_path, [("primary", primary)], admin=True,
                                     endpoints=[{"name": "rw", "listen": "127.0.0.1:0"}]))
    host, port = proxy.proxy.admin_address

    def raw(data: bytes) -> bytes:
        with sock.create_connection((host, port), timeout=10) as s:
            s.sendall(data)
            chunks = []
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)

    assert raw(b"\xff\xfe garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw(b"POST /targets HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    assert raw(b"GET /" + b"x" * 9000 + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 431 ")
    with sock.create_connection((host, port), timeout=10) as silent:
        silent.sendall(b"GET /targets HTTP/1.1\r\n")     # never finishes its head
        healthy = raw(b"GET /health HTTP/1.1\r\n\r\n")
    assert healthy.startswith(b"HTTP/1.1 200 ") and healthy.endswith(b"ok\n")
    wait_available(proxy, "primary")
    assert query(proxy, "SELECT 1") == 1
