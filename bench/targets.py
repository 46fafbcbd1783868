"""The things pgbench is pointed at: direct PostgreSQL, PgBouncer, rdsproxy (two builds).

Charter: each target writes its own config under the run's temp dir, starts its process
through the `Reaper` (so it is always stopped), waits until a real md5 login + SELECT 1
succeeds, and exposes host/port/pid. Pool sizing is kept equal on purpose: PgBouncer's
default_pool_size equals rdsproxy's floor(max_connections_percent% x max_connections), and
both authenticate clients with md5 so auth cost does not skew -C results.
"""
from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench import build, pgwire
from bench.procs import Reaper, free_port, log, proc_nofile, tail

REPO_ROOT = Path(__file__).resolve().parent.parent
ALL_TARGETS = ("direct", "pgbouncer", "rdsproxy-cython", "rdsproxy-pure")
# Not run unless asked for (--targets ...,uvloop-floor): bench/floor.py, the least a uvloop +
# Python proxy can do per transaction, to show how much of a gap is Python's and not ours.
OPTIONAL_TARGETS = ("uvloop-floor",)


@dataclass
class Credentials:
    user: str
    password: str
    dbname: str
    server_host: str
    server_port: int


class TargetUnavailable(Exception):
    """The target could not be started; the run goes on without it."""


@dataclass
class Target:
    name: str
    host: str = "127.0.0.1"
    port: int = 0
    proc: subprocess.Popen | None = None
    info: dict = field(default_factory=dict)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


def _wait_ready(target: Target, creds: Credentials, log_path: Path, timeout: float) -> None:
    """Poll a real login until it works, the process dies, or time runs out."""
    deadline = time.monotonic() + timeout
    last = "not tried"
    while time.monotonic() < deadline:
        if target.proc is not None and target.proc.poll() is not None:
            raise TargetUnavailable(f"{target.name} exited with code {target.proc.returncode}; "
                                    f"log tail:\n{tail(log_path)}")
        last = asyncio.run(pgwire.check_login(target.host, target.port, creds.user,
                                              creds.password, creds.dbname))
        if not last:
            return
        time.sleep(0.3)
    raise TargetUnavailable(f"{target.name} not ready after {timeout:.0f}s (last error: {last}); "
                            f"log tail:\n{tail(log_path)}")


def direct_target(creds: Credentials) -> Target:
    return Target("direct", creds.server_host, creds.server_port)


def _chown_tree(path: Path, user: str) -> None:
    pw = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, pw.pw_uid, pw.pw_gid)
        for f in files:
            os.chown(os.path.join(root, f), pw.pw_uid, pw.pw_gid)


def start_pgbouncer(reaper: Reaper, workdir: Path, creds: Credentials, *, pool_size: int,
                    max_client_conn: int, name: str = "pgbouncer") -> Target:
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.path.exists(binary):
        raise TargetUnavailable("pgbouncer binary not found (apt-get install -y pgbouncer)")
    confdir = workdir / name
    confdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # Plain-text password in auth_file: lets PgBouncer answer md5 to clients while
    # speaking whatever the server wants (md5 or SCRAM) upstream.
    (confdir / "userlist.txt").write_text(f'"{creds.user}" "{creds.password}"\n')
    (confdir / "pgbouncer.ini").write_text(f"""\
[databases]
{creds.dbname} = host={creds.server_host} port={creds.server_port} dbname={creds.dbname}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = md5
auth_file = {confdir / 'userlist.txt'}
pool_mode = transaction
default_pool_size = {pool_size}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = {max_client_conn}
max_db_connections = 0
listen_backlog = 4096
server_tls_sslmode = disable
ignore_startup_parameters = extra_float_digits
log_connections = 0
log_disconnections = 0
log_pooler_errors = 1
stats_period = 60
logfile = {confdir / 'pgbouncer.log'}
pidfile = {confdir / 'pgbouncer.pid'}
""")
    argv = [binary]
    if os.geteuid() == 0:
        # PgBouncer refuses root; -u drops privileges but keeps the pid ours to measure.
        _chown_tree(confdir, "postgres")
        argv += ["-u", "postgres"]
    argv.append(str(confdir / "pgbouncer.ini"))
    log_path = confdir / "stdout.log"
    target = Target(name, "127.0.0.1", port)
    target.proc = reaper.spawn(name, argv, log_path=log_path)
    try:
        _wait_ready(target, creds, confdir / "pgbouncer.log", timeout=20)
    except TargetUnavailable:
        reaper.stop(target.proc)
        raise
    target.info = {"version": _pgbouncer_version(binary), "pool_size": pool_size,
                   "pool_mode": "transaction", "nofile": proc_nofile(target.proc.pid)}
    return target


def _pgbouncer_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.splitlines()[0].strip()
    except Exception:
        return "unknown"


def rdsproxy_env(pure: bool, tree: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    if pure:
        env["RDSPROXY_PURE_PYTHON"] = "1"
    else:
        env.pop("RDSPROXY_PURE_PYTHON", None)
    return env


def write_rdsproxy_config(confdir: Path, creds: Credentials, *, port: int,
                          max_connections_percent: int,
                          health_check_interval: float = 1.0, admin_port: int = 0) -> Path:
    """The TOML contract from the issue; secret.json sits beside it (relative path)."""
    confdir.mkdir(parents=True, exist_ok=True)
    (confdir / "secret.json").write_text(json.dumps({
        "username": creds.user, "password": creds.password, "engine": "postgres",
        "host": creds.server_host, "port": creds.server_port, "dbname": creds.dbname}))
    path = confdir / "proxy.toml"
    path.write_text(f"""\
name = "bench"
engine_family = "POSTGRESQL"
require_tls = false
idle_client_timeout = 0
debug_logging = false

[[auth]]
auth_scheme = "SECRETS"
secret = "file:secret.json"
iam_auth = "DISABLED"
client_password_auth_type = "POSTGRES_MD5"

[target_group]
max_connections_percent = {max_connections_percent}
max_idle_connections_percent = {max_connections_percent}
connection_borrow_timeout = 120
session_pinning_filters = []
init_query = ""
health_check_interval = {health_check_interval}

[[targets]]
host = "{creds.server_host}"
port = {creds.server_port}

[[endpoints]]
name = "default"
listen = "127.0.0.1:{port}"
target_role = "READ_WRITE"
""" + (f"""
[admin]
listen = "127.0.0.1:{admin_port}"
""" if admin_port else ""))
    return path


def rdsproxy_stats(target: Target) -> dict | None:
    """The proxy's /stats (pins by reason and the rest), when it has an admin port."""
    admin = target.info.get("admin")
    if not admin:
        return None
    try:
        with urllib.request.urlopen(f"http://{admin}/stats", timeout=5) as reply:
            return json.loads(reply.read())
    except Exception:
        return None


def start_rdsproxy(reaper: Reaper, workdir: Path, creds: Credentials, *, pure: bool,
                   max_connections_percent: int, tree: Path = REPO_ROOT,
                   name: str | None = None, timeout: float = 30) -> Target:
    name = name or ("rdsproxy-pure" if pure else "rdsproxy-cython")
    confdir = workdir / name
    port = free_port()
    admin_port = free_port()
    config = write_rdsproxy_config(confdir, creds, port=port,
                                   max_connections_percent=max_connections_percent,
                                   admin_port=admin_port)
    impl, where = build.implementation(tree, pure)
    if not pure and impl != "cython":
        log(f"WARNING: {name} will run the '{impl}' twins, not Cython (the fast path "
            "did not build; see the build status in the report)")
    log_path = confdir / "rdsproxy.log"
    target = Target(name, "127.0.0.1", port)
    target.proc = reaper.spawn(name, [sys.executable, "-m", "rdsproxy", "serve",
                                      "--config", str(config)],
                               log_path=log_path, env=rdsproxy_env(pure, tree), cwd=tree)
    try:
        _wait_ready(target, creds, log_path, timeout=timeout)
    except TargetUnavailable:
        reaper.stop(target.proc)
        raise
    target.info = {"implementation": impl, "pure_python_env": pure, "source": where,
                   "max_connections_percent": max_connections_percent,
                   "nofile": proc_nofile(target.proc.pid), "admin": f"127.0.0.1:{admin_port}"}
    # The gate trusts what the serving process imported, not a sibling's import.
    served = (rdsproxy_stats(target) or {}).get("fastpath")
    target.info["implementation"] = served or f"unknown (no /stats; a sibling import saw {impl})"
    return target


def start_floor(reaper: Reaper, workdir: Path, creds: Credentials, *, pool_size: int,
                name: str = "uvloop-floor") -> Target:
    confdir = workdir / name
    confdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = confdir / "floor.log"
    target = Target(name, "127.0.0.1", port)
    target.proc = reaper.spawn(name, [sys.executable, "-m", "bench.floor",
                                      "--listen", f"127.0.0.1:{port}",
                                      "--server", f"{creds.server_host}:{creds.server_port}",
                                      "--user", creds.user, "--password", creds.password,
                                      "--dbname", creds.dbname, "--pool", str(pool_size)],
                               log_path=log_path, env=rdsproxy_env(False, REPO_ROOT), cwd=REPO_ROOT)
    try:
        _wait_ready(target, creds, log_path, timeout=30)
    except TargetUnavailable:
        reaper.stop(target.proc)
        raise
    target.info = {"pool_size": pool_size, "what": "reference: bench/floor.py, not a pooler"}
    return target
