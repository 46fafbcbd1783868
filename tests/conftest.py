"""The suite's fixtures, by section: database servers, proxies, TLS, secrets.

Servers: one session-wide PostgreSQL (`pg`) and one MariaDB (`mariadb`) serve most tests,
so each is installed once; tests that need other server settings start their own through
rdsproxy.devservers (`pg_factory` for PostgreSQL), stopped when the test ends. Proxies:
`proxy_factory` runs a proxy of either engine in front of them in this process, and
`proxy_process_factory` the same as a subprocess (tests/harness.py builds both's
configuration); `make_proxy` is the MySQL end-to-end tests' proxy with a pool budget;
`one_connection` is a module's proxy of one connection, compared with direct sessions
(tests/differential.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest

# Make the helper modules (`harness`, `utils`, ...) importable however pytest was invoked.
sys.path.insert(0, os.path.dirname(__file__))

from differential import proxied_differential  # noqa: E402
from harness import (APP_DB, APP_PASSWORD, APP_USER, MARIADB_MAX_CONNECTIONS,  # noqa: E402
                     ONE_CONNECTION, OTHER_PASSWORD, OTHER_USER, RunningProxy, proxy_config)
from proxyproc import RUNNING, ProxyProcess  # noqa: E402
from rdsproxy import config_from_dict  # noqa: E402
from rdsproxy.devservers.mariadb import MariaDBServer  # noqa: E402
from rdsproxy.devservers.postgres import PostgresCluster  # noqa: E402

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report ends with the logs of the proxy subprocesses running then:
    what the proxy saw is otherwise lost with its temporary directory."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for proxy in sorted(RUNNING, key=lambda p: p.log_path):
            report.sections.append((f"proxy log {proxy.log_path} (last 6000 characters)",
                                    proxy.log_text()[-6000:]))


# --- servers ---------------------------------------------------------------------------------

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


@pytest.fixture(scope="session")
def mariadb(test_ca):
    """Session MariaDB: max_connections=50, TLS with the test CA's server pair, 64 MiB
    packets, local infile, no host blocking; user app (all privileges) owning database
    appdb with table t (id, v) = (1, 'a'), (2, 'b'), (3, 'c'); user other with
    all privileges on appdb."""
    server = MariaDBServer(
        max_connections=MARIADB_MAX_CONNECTIONS,
        tls=(test_ca.server_cert, test_ca.server_key, test_ca.ca_cert),
        settings={"max_allowed_packet": "64M", "local_infile": "ON",
                  "max_connect_errors": 1000000})
    server.start()
    try:
        server.create_user(APP_USER, APP_PASSWORD)
        server.create_database(APP_DB, owner=APP_USER)
        server.create_user(OTHER_USER, OTHER_PASSWORD, grant=f"ALL ON {APP_DB}.*")
        server.sql("CREATE TABLE t (id INT AUTO_INCREMENT PRIMARY KEY, v VARCHAR(20)); "
                   "INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'c');", database=APP_DB)
        yield server
    finally:
        server.stop()


# --- proxies ---------------------------------------------------------------------------------

def _maker(request, start):
    """make(server=None, *, engine="postgres", **options) -> start(server, engine, ...)'s
    proxy, in front of the session server of that engine unless told otherwise; and the
    list of the proxies made, to stop."""
    made = []

    def make(server=None, *, engine="postgres", **options):
        if server is None and options.get("targets") is None and options.get("config") is None:
            server = request.getfixturevalue("pg" if engine == "postgres" else "mariadb")
        made.append(start(server, engine, **options))
        return made[-1]

    return make, made


@pytest.fixture
def proxy_factory(tmp_path, request):
    """make(server=None, engine="postgres" or "mysql", **options) -> RunningProxy: a proxy
    in front of `server` (the session `pg` or `mariadb` by default); the options are
    harness.proxy_config's (users, client_auth, top, tls, iam, iam_auth, target, targets,
    endpoints, secrets, ..., **target_group), or config={...} is a ready configuration.
    Every proxy is stopped at test end."""
    def start(server, engine, config=None, **options) -> RunningProxy:
        config = config or proxy_config(tmp_path, server, engine=engine, **options)
        return RunningProxy(config_from_dict(config, source="<test>", base_dir=tmp_path))

    make, proxies = _maker(request, start)
    yield make
    for running in proxies:
        running.stop()


@pytest.fixture
def proxy_process_factory(tmp_path, request):
    """proxy_factory's twin with the proxy as a subprocess (`rdsproxy serve`), for process
    behaviour or clients that block the GIL (psycopg's C `conn.cancel()` waits holding it,
    which would deadlock a proxy in a thread of this process): make(server=None,
    engine=..., users=None, **options) -> ProxyProcess, each in its own directory."""
    def start(server, engine, users=None, **options) -> ProxyProcess:
        return ProxyProcess(tmp_path / f"proxy{len(processes)}", server, users, engine=engine,
                            **options)

    make, processes = _maker(request, start)
    yield make
    for process in processes:
        process.stop()


@pytest.fixture(scope="module")
def one_connection(tmp_path_factory, pg):
    """A Differential whose proxy (a subprocess with an admin endpoint) lends one connection
    of the session cluster, shared by the module's tests."""
    with proxied_differential(tmp_path_factory.mktemp("one-connection"), pg, admin=True,
                              **ONE_CONNECTION) as diff:
        yield diff


@pytest.fixture
def proxy(proxy_factory):
    """A proxy in front of the session cluster: scram clients, 20% of max_connections=60."""
    return proxy_factory()


@pytest.fixture
def make_proxy(proxy_factory, mariadb):
    """make(budget=N or max_connections_percent=..., client_auth=..., top={...}, tls=...,
    iam_auth=... (for APP_USER only), server=..., ...): a MySQL proxy, once its first health
    check has told it the budget. Proxies are cheap, so each test chooses its budget:
    `budget=1` puts every client on the same server connection."""
    def make(budget=None, iam_auth=None, server=None, **options):
        server = server or mariadb
        if budget is not None:
            options["max_connections_percent"] = budget * 100 // server.max_connections
        running = proxy_factory(server, engine="mysql",
                                iam_auth={APP_USER: iam_auth} if iam_auth else None, **options)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if running.stats()["pool"]["max"] > 1 or budget == 1:
                break
            time.sleep(0.02)
        return running

    return make


# --- TLS -------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def test_ca(tmp_path_factory):
    """A private CA with a server certificate for localhost/127.0.0.1 and a client certificate
    (rdsproxy.tls.make_test_ca paths)."""
    from rdsproxy.tls import make_test_ca

    return make_test_ca(tmp_path_factory.mktemp("ca"))



# --- secrets: a local AWS Secrets Manager (moto's real server on loopback) -------------------

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
