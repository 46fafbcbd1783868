"""The test harness: the suite's accounts, one proxy configuration for both engines, and
a proxy running in-process for synchronous clients (tests/conftest.py's fixtures use it;
tests/proxyproc.py runs the same configuration as a subprocess), with PyMySQL clients of
such a proxy for the MySQL end-to-end tests."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading

import psycopg
import pymysql

from rdsproxy import Proxy
from rdsproxy.engines.postgres import protocol as pg
from utils import free_port, libpq_dsn, recv_message, wait_until

APP_USER, APP_PASSWORD, APP_DB = "app", "app-secret", "appdb"
# MySQL tests' second account, with privileges on APP_DB only.
OTHER_USER, OTHER_PASSWORD = "other", "other-secret"
# The session MariaDB's (conftest.py), which MySQL proxies' budgets are a share of.
MARIADB_MAX_CONNECTIONS = 50

# What a proxy of each engine gets unless a test says otherwise.
ENGINES = {
    "postgres": {"engine_family": "POSTGRESQL", "client_auth": "POSTGRES_SCRAM_SHA_256",
                 "max_connections_percent": 20, "users": ((APP_USER, APP_PASSWORD),)},
    "mysql": {"engine_family": "MYSQL", "client_auth": "MYSQL_NATIVE_PASSWORD",
              "max_connections_percent": 10,
              "users": ((APP_USER, APP_PASSWORD), (OTHER_USER, OTHER_PASSWORD))},
}


def secret_path(directory, username) -> str:
    return os.path.join(str(directory), f"secret-{username}.json")


def write_secret(directory, username, password, engine="postgres", **extra) -> str:
    """A secret file for `username` in `directory`; its path."""
    path = secret_path(directory, username)
    with open(path, "w") as fh:
        json.dump({"username": username, "password": password, "engine": engine, **extra}, fh)
    return path


def proxy_config(directory, server=None, *, engine="postgres", users=None, client_auth=None,
                 iam_auth=None, secrets=None, secret_fields=None, targets=None, target=None,
                 endpoints=None, top=None, tls=None, iam=None, admin=False,
                 **target_group) -> dict:
    """A proxy configuration (the dict config_from_dict takes) in front of `server`.

    users: [(user, password)], each with a secret file in `directory` (or the reference
    in `secrets={user: "aws-secretsmanager:..."}`), plus `secret_fields` in each file;
    client_auth and iam_auth: one value for every user, or {user: value}. targets:
    [(name, server)] instead of the one `server` (whose entry `target` extends). endpoints
    default to one READ_WRITE endpoint on a free port; admin=True adds an admin endpoint.
    `top` holds other top-level keys; the remaining keywords go in [target_group].
    """
    defaults = ENGINES[engine]
    client_auth = client_auth or defaults["client_auth"]
    auth = []
    for user, password in users or defaults["users"]:
        reference = (secrets or {}).get(user) or "file:" + write_secret(
            directory, user, password, engine=engine, **(secret_fields or {}))
        method = client_auth.get(user) if isinstance(client_auth, dict) else client_auth
        entry = {"secret": reference, "client_password_auth_type": method}
        mode = iam_auth.get(user) if isinstance(iam_auth, dict) else iam_auth
        if mode:
            entry["iam_auth"] = mode
        auth.append(entry)
    target_group.setdefault("max_connections_percent", defaults["max_connections_percent"])
    target_group.setdefault("connection_borrow_timeout", 10)
    if targets is None:
        targets = [{"host": server.host, "port": server.port, **(target or {})}]
    else:
        targets = [{"name": name, "host": s.host, "port": s.port} for name, s in targets]
    config = {"name": f"{engine}-test", "engine_family": defaults["engine_family"], **(top or {}),
              "auth": auth, "target_group": target_group, "targets": targets,
              "endpoints": endpoints or [{"name": "default", "listen": "127.0.0.1:0"}]}
    if admin:
        config["admin"] = {"listen": f"127.0.0.1:{free_port()}"}
    if tls is not None:
        config["tls"] = tls
    if iam is not None:
        config["iam"] = iam
    return config


# A pool of one connection of the session cluster's 60: its clients take turns on it.
ONE_CONNECTION = {"max_connections_percent": 2}
# Health checks quick enough for tests that watch targets come and go.
FAST_CHECKS = {"health_check_interval": 0.2, "health_check_timeout": 1.0, "health_check_failures": 2}
READ_WRITE_AND_READ_ONLY = [{"name": "rw", "listen": "127.0.0.1:0"},
                            {"name": "ro", "listen": "127.0.0.1:0", "target_role": "READ_ONLY"}]


def describe_targets_cli(config_path) -> dict:
    """`rdsproxy describe-targets --json` for a config file: {target name: (role, state)}."""
    out = subprocess.run([sys.executable, "-m", "rdsproxy", "describe-targets", "--config",
                          str(config_path), "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return {t["RdsResourceId"]: (t["Role"], t["TargetHealth"]["State"])
            for t in json.loads(out.stdout)["Targets"]}


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


def raw_startup(port, user=APP_USER, context=None, password=None):
    """Speak the protocol by hand: optional SSLRequest + handshake, StartupMessage, then an
    optional cleartext password. Returns the error fields of the ErrorResponse received (or
    the first non-error message type)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        if context is not None:
            sock.sendall(struct.pack("!ii", 8, pg.SSL_REQUEST_CODE))
            assert sock.recv(1) == b"S"
            sock = context.wrap_socket(sock, server_hostname="localhost")
        sock.sendall(pg.startup_message({"user": user, "database": APP_DB}))
        while True:
            mtype, body = recv_message(sock)
            if mtype == b"E":
                return pg.parse_error_fields(body)
            if mtype == b"R" and struct.unpack("!i", body[:4])[0] == pg.AUTH_CLEARTEXT and password:
                sock.sendall(pg.password_message(password.encode() + b"\x00"))
                password = None
                continue
            return {"type": mtype.decode()}
    finally:
        sock.close()


# --- MySQL through a running proxy: PyMySQL clients and the proxy's side of them ------------

def connect(px, user=APP_USER, password=APP_PASSWORD, database=APP_DB, **kw):
    kw.setdefault("autocommit", True)
    return pymysql.connect(host=px.host, port=px.port, user=user, password=password,
                           database=database, connect_timeout=10, read_timeout=30, **kw)


def scalar(conn, sql, args=None):
    with conn.cursor() as cur:
        cur.execute(sql, args)
        row = cur.fetchone()
        return row[0] if row is not None else None


def proxy_connections(mariadb, user=APP_USER) -> int:
    """Server connections from the proxy (the health check's are not pool connections)."""
    return sum(1 for row in mariadb.processlist()
               if row["user"] == user and "rdsproxy-health" not in row["info"])


def engine(px):
    return px.proxy.engine


# --- raw PostgreSQL clients ------------------------------------------------------------------

def startup_packet(user=APP_USER, database=APP_DB) -> bytes:
    """A StartupMessage (protocol 3.0) for `user` and `database`."""
    body = struct.pack("!i", 196608) + b"user\0" + user.encode() + b"\0database\0" + database.encode() + b"\0\0"
    return struct.pack("!i", len(body) + 4) + body


def read_all(sock, timeout=5.0) -> bytes:
    """Everything the peer sends until it closes or falls silent for `timeout` seconds."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except (socket.timeout, ConnectionResetError):
        pass
    return b"".join(chunks)


def error_code(reply: bytes) -> str | None:
    """SQLSTATE of the first ErrorResponse in a raw reply."""
    pos = reply.find(b"E")
    while pos >= 0:
        if pos + 5 <= len(reply):
            length = struct.unpack("!i", reply[pos + 1:pos + 5])[0]
            body = reply[pos + 5:pos + 1 + length]
            for field in body.split(b"\0"):
                if field.startswith(b"C"):
                    return field[1:].decode()
        pos = reply.find(b"E", pos + 1)
    return None


class Bystander:
    """A well-behaved client looping over queries in a thread; any error is a failure."""

    def __init__(self, proxy):
        self.proxy = proxy
        self.errors = []
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            # prepare_threshold=None: unnamed statements only, so the bystander multiplexes.
            with psycopg.connect(self.proxy.dsn(), autocommit=True, prepare_threshold=None) as conn:
                while not self._stop.is_set():
                    with conn.transaction():
                        assert conn.execute("select %s::int", (self.count,)).fetchone() == (self.count,)
                    self.count += 1
        except Exception as exc:  # reported by __exit__
            self.errors.append(exc)

    def __enter__(self):
        self._thread.start()
        wait_until(lambda: self.count > 0 or self.errors, message="bystander running")
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)
        assert not self.errors, self.errors
        assert self.count > 0
