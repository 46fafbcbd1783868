"""Shared fixtures: throwaway PostgreSQL clusters (and, below, the lead's proxy fixtures).

One session-wide cluster (`pg`) serves most tests, so initdb runs once; tests that need
different server settings (auth method, tiny max_connections, ...) get their own from
`pg_factory`, stopped when the test ends.
"""
from __future__ import annotations

import os
import sys

import pytest

# Make `tests.utils` / `utils` importable however pytest was invoked.
sys.path.insert(0, os.path.dirname(__file__))

from rdsproxy.devservers.postgres import PostgresCluster  # noqa: E402

APP_USER = "app"
APP_PASSWORD = "app-secret"
APP_DB = "appdb"


@pytest.fixture(scope="session")
def pg():
    """Session cluster: scram-sha-256, max_connections=60, user app/app-secret
    (CREATEDB) owning database appdb."""
    cluster = PostgresCluster(auth="scram-sha-256", max_connections=60)
    cluster.start()
    try:
        cluster.create_user(APP_USER, APP_PASSWORD, createdb=True)
        cluster.create_database(APP_DB, owner=APP_USER)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def pgbench_db(pg):
    """A database of the session cluster with pgbench's tables (scale 1), owned by app."""
    import subprocess
    import uuid
    name = "benchdb_" + uuid.uuid4().hex[:6]
    pg.create_database(name, owner=APP_USER)
    subprocess.run(["pgbench", "-i", "-s", "1", "-q", "-h", pg.host, "-p", str(pg.port), "-U", APP_USER,
                    name], env={**os.environ, "PGPASSWORD": APP_PASSWORD}, check=True,
                   capture_output=True, timeout=120)
    return name


@pytest.fixture
def pg_factory():
    """Call with PostgresCluster keyword arguments to get a started extra cluster;
    every cluster made this way is stopped at the end of the test."""
    clusters: list[PostgresCluster] = []

    def make(**kwargs) -> PostgresCluster:
        cluster = PostgresCluster(**kwargs)
        clusters.append(cluster)
        return cluster.start()

    yield make
    for cluster in reversed(clusters):
        try:
            cluster.stop("immediate")
        except Exception as exc:  # keep stopping the others
            print(f"warning: could not stop {cluster!r}: {exc}", file=sys.stderr)


# --- proxy fixtures (lead) ---

import asyncio  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402

from rdsproxy import Proxy, config_from_dict  # noqa: E402
from utils import libpq_dsn  # noqa: E402


class RunningProxy:
    """A Proxy serving on its own event loop in a background thread, for sync clients.

    The loop is uvloop unless RDSPROXY_TEST_LOOP=asyncio.
    """

    def __init__(self, config):
        self.config = config
        self.proxy = Proxy(config)
        self.loop = None
        self._ready = threading.Event()
        self._error = None
        self.phase_problems: list[str] = []
        self._thread = threading.Thread(target=self._main, name="rdsproxy-test", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError("proxy did not start in 30 s")
        if self._error is not None:
            raise self._error

    def _main(self):
        if os.environ.get("RDSPROXY_TEST_LOOP", "uvloop") == "uvloop":
            import uvloop
            self.loop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.proxy.start())
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.call_soon(self._audit_phases)
        self.loop.run_until_complete(self.proxy.serve_forever())
        self.loop.run_until_complete(asyncio.sleep(0.05))
        self.loop.close()

    @property
    def host(self) -> str:
        return self.proxy.address[0]

    @property
    def port(self) -> int:
        return self.proxy.address[1]

    def dsn(self, user=APP_USER, password=APP_PASSWORD, dbname=APP_DB, **extra) -> str:
        return libpq_dsn(self.host, self.port, user, password, dbname, **extra)

    def call(self, fn, *args):
        """Run `fn(*args)` on the proxy's loop and return its result (sync or coroutine)."""
        async def wrapper():
            result = fn(*args)
            if asyncio.iscoroutine(result):
                result = await result
            return result
        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(30)

    def stats(self) -> dict:
        return self.call(self.proxy.stats)

    def _audit_phases(self):
        """Every few milliseconds while it runs, the clients' phases are checked (each
        callback of the loop must leave them right); the first problems are kept."""
        engine = self.proxy.engine
        if engine is None or self.loop.is_closed():
            return
        if len(self.phase_problems) < 5:
            self.phase_problems += _phase_problems(engine)
        self.loop.call_later(0.005, self._audit_phases)

    def stop(self, drain: bool = False):
        """Stop the proxy; an AssertionError afterwards if its clients' phases were ever
        wrong (every test that runs a proxy checks them this way)."""
        if self._thread.is_alive():
            try:
                self.call(self.proxy.stop, drain)
            except Exception:
                pass
            self._thread.join(30)
            assert not self.phase_problems, self.phase_problems


def _phase_problems(engine) -> list[str]:
    from rdsproxy._fastpath import Phase
    clients = list(engine.clients)
    counted = {name: sum(1 for c in clients if c.phase == i)
               for i, name in enumerate(Phase.NAMES) if i != Phase.FREE}
    problems = []
    if engine.ledger.phases() != counted:
        problems.append(f"gauges {engine.ledger.phases()} but the clients are {counted}")
    if engine.ledger.stray_moves:
        problems.append(f"{engine.ledger.stray_moves} stray phase moves")
    for client in clients:
        holding = client.phase in (Phase.ACTIVE, Phase.PINNED)
        if holding != (client.server is not None):
            problems.append(f"client {client.peer} in phase {Phase.NAMES[client.phase]} "
                            f"with server {client.server!r}")
    return problems


def write_secret(directory, username, password, **extra) -> str:
    path = os.path.join(str(directory), f"secret-{username}.json")
    with open(path, "w") as fh:
        json.dump({"username": username, "password": password, "engine": "postgres", **extra}, fh)
    return path


@pytest.fixture
def proxy_factory(tmp_path, pg):
    """make(cluster=pg, users=[(user, password)], client_auth=..., **target_group) -> RunningProxy.

    Extra top-level config keys go in `top={...}`; every proxy is stopped at test end.
    """
    proxies: list[RunningProxy] = []

    def make(cluster=None, users=((APP_USER, APP_PASSWORD),), client_auth="POSTGRES_SCRAM_SHA_256",
             top=None, **target_group) -> RunningProxy:
        cluster = cluster or pg
        auth = [{"secret": f"file:{write_secret(tmp_path, u, p)}",
                 "client_password_auth_type": client_auth} for u, p in users]
        target_group.setdefault("max_connections_percent", 20)
        target_group.setdefault("connection_borrow_timeout", 10)
        config = config_from_dict({
            "name": "test-proxy", "engine_family": "POSTGRESQL", **(top or {}),
            "auth": auth, "target_group": target_group,
            "targets": [{"host": cluster.host, "port": cluster.port}],
            "endpoints": [{"name": "default", "listen": "127.0.0.1:0"}],
        }, source="<test>", base_dir=tmp_path)
        running = RunningProxy(config)
        proxies.append(running)
        return running

    yield make
    for running in proxies:
        running.stop()


@pytest.fixture
def proxy(proxy_factory):
    """A proxy in front of the session cluster: scram clients, 20% of max_connections=60."""
    return proxy_factory()


# --- TLS / IAM / secrets fixtures ---

import shutil  # noqa: E402
import tempfile  # noqa: E402


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory):
    """A private CA with a server certificate for localhost/127.0.0.1 and a client certificate
    (rdsproxy.tls.make_test_ca paths)."""
    from rdsproxy.tls import make_test_ca

    return make_test_ca(tmp_path_factory.mktemp("ca"))


def postgres_tls_settings(ca) -> dict:
    """PostgresCluster settings turning on ssl with `ca`'s server pair, copied where the
    postgres OS user can read them (key 0600, owned by it, as PostgreSQL insists)."""
    directory = tempfile.mkdtemp(prefix="rdsproxy-pgtls-", dir="/tmp")
    os.chmod(directory, 0o755)
    cert = os.path.join(directory, "server.pem")
    key = os.path.join(directory, "server.key")
    shutil.copyfile(ca.server_cert, cert)
    shutil.copyfile(ca.server_key, key)
    os.chmod(cert, 0o644)
    os.chmod(key, 0o600)
    if os.geteuid() == 0:
        import pwd
        pw = pwd.getpwnam("postgres")
        for path in (directory, cert, key):
            os.chown(path, pw.pw_uid, pw.pw_gid)
    return {"ssl": "on", "ssl_cert_file": cert, "ssl_key_file": key}


@pytest.fixture
def secure_proxy_factory(tmp_path, pg):
    """proxy_factory plus the TLS, IAM and secrets settings:

    make(cluster=pg, users=[(user, password)], client_auth=..., top={...},
         tls={cert_file, key_file, ...}, iam={region, host_names, principals: [...]},
         iam_auth="REQUIRED" or {user: mode}, target={tls, tls_ca_file},
         secrets={user: "aws-secretsmanager:..."} (instead of a file), **target_group)
    """
    proxies: list[RunningProxy] = []

    def make(cluster=None, users=((APP_USER, APP_PASSWORD),), client_auth="POSTGRES_SCRAM_SHA_256",
             top=None, tls=None, iam=None, iam_auth=None, target=None, secrets=None,
             **target_group) -> RunningProxy:
        cluster = cluster or pg
        auth = []
        for user, password in users:
            reference = (secrets or {}).get(user) or f"file:{write_secret(tmp_path, user, password)}"
            entry = {"secret": reference, "client_password_auth_type": client_auth}
            mode = iam_auth.get(user) if isinstance(iam_auth, dict) else iam_auth
            if mode:
                entry["iam_auth"] = mode
            auth.append(entry)
        target_group.setdefault("max_connections_percent", 20)
        target_group.setdefault("connection_borrow_timeout", 10)
        data = {
            "name": "test-proxy", "engine_family": "POSTGRESQL", **(top or {}),
            "auth": auth, "target_group": target_group,
            "targets": [{"host": cluster.host, "port": cluster.port, **(target or {})}],
            "endpoints": [{"name": "default", "listen": "127.0.0.1:0"}],
        }
        if tls is not None:
            data["tls"] = tls
        if iam is not None:
            data["iam"] = iam
        running = RunningProxy(config_from_dict(data, source="<test>", base_dir=tmp_path))
        proxies.append(running)
        return running

    yield make
    for running in proxies:
        running.stop()


# --- a local AWS Secrets Manager (moto's real server on loopback) ---

@pytest.fixture(scope="session")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def secretsmanager(moto_endpoint, monkeypatch, tmp_path):
    """A boto3 secretsmanager client for the moto server; the environment points boto3
    (and so the proxy's aws-secretsmanager: provider) at it, with fake credentials."""
    for key in ("AWS_ENDPOINT_URL_SECRETS_MANAGER", "AWS_PROFILE", "AWS_SESSION_TOKEN",
                "AWS_SECURITY_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    # Keep any real AWS configuration on this machine out of the tests.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    import boto3

    return boto3.session.Session().client("secretsmanager", region_name="us-east-1")
