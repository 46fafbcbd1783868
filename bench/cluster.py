"""The throwaway PostgreSQL server the benchmark runs against.

Charter: prefer the project's own `rdsproxy.devservers.postgres.PostgresCluster`; while that
module is missing (or broken mid-edit) fall back to `FallbackCluster`, a minimal stand-in with the
same API (start/stop/host/port/psql/create_user/create_database/dsn) so the suite runs
either way. PostgreSQL refuses to run as root, so the stand-in runs initdb/pg_ctl as the
`postgres` user.
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.procs import free_port, log, run_checked

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))


def pg_tool(name: str) -> str:
    """Path of a PostgreSQL client/server binary (version-pinned dir first, then PATH)."""
    candidate = PG_BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found in {PG_BIN} or PATH")
    return found


def _as_postgres(argv: list[str]) -> list[str]:
    return argv if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--", *argv]


class FallbackCluster:
    """Just enough of PostgresCluster for the benchmark."""

    def __init__(self, port=None, *, auth="scram-sha-256", max_connections=100,
                 superuser_password="postgres", settings=None, base_dir=None):
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.auth = auth
        self.max_connections = max_connections
        self.superuser_password = superuser_password
        self.settings = dict(settings or {})
        self._own_base = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="bench-pg-"))
        self.data_dir = self.base_dir / "data"
        self._started = False

    def start(self):
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.base_dir, pw.pw_uid, pw.pw_gid)
        pwfile = self.base_dir / "pwfile"
        pwfile.write_text(self.superuser_password + "\n")
        if os.geteuid() == 0:
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        run_checked(_as_postgres([pg_tool("initdb"), "-D", str(self.data_dir), "-U", "postgres",
                                  f"--pwfile={pwfile}", "--auth-local=trust",
                                  f"--auth-host={self.auth}", "-E", "UTF8", "--no-sync"]))
        pwfile.unlink()
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.data_dir}'",
            "max_connections": str(self.max_connections),
            # throwaway data, same as rdsproxy.devservers: durability only costs time
            "fsync": "off",
            "full_page_writes": "off",
            "synchronous_commit": "off",
            # md5 in pg_hba silently upgrades to SCRAM when secrets are stored as SCRAM.
            "password_encryption": "'md5'" if self.auth == "md5" else "'scram-sha-256'",
        }
        for key, value in self.settings.items():
            conf[key] = value if isinstance(value, (int, float)) or str(value).startswith("'") \
                else f"'{value}'"
        with open(self.data_dir / "postgresql.auto.conf", "a") as f:
            for key, value in conf.items():
                f.write(f"{key} = {value}\n")
        run_checked(_as_postgres([pg_tool("pg_ctl"), "-D", str(self.data_dir), "-w", "-t", "60",
                                  "-l", str(self.base_dir / "postgres.log"), "start"]))
        self._started = True
        return self

    def stop(self):
        if self._started:
            subprocess.run(_as_postgres([pg_tool("pg_ctl"), "-D", str(self.data_dir), "-w",
                                         "-m", "fast", "stop"]), capture_output=True, timeout=120)
            self._started = False
        if self._own_base:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def psql(self, sql, dbname="postgres", user="postgres"):
        # Unix socket + trust: no password juggling for admin statements.
        return run_checked(_as_postgres([pg_tool("psql"), "-X", "-q", "-A", "-t", "-v",
                                         "ON_ERROR_STOP=1", "-h", str(self.data_dir),
                                         "-p", str(self.port), "-U", user, "-d", dbname,
                                         "-c", sql]))

    def create_user(self, name, password, superuser=False):
        role = "SUPERUSER" if superuser else "NOSUPERUSER"
        pw = password.replace("'", "''")
        self.psql(f"CREATE ROLE \"{name}\" LOGIN {role} PASSWORD '{pw}'")

    def create_database(self, name, owner=None):
        self.psql(f"CREATE DATABASE \"{name}\"" + (f" OWNER \"{owner}\"" if owner else ""))

    def dsn(self, dbname="postgres", user="postgres", password=None):
        pw = f" password={password}" if password else ""
        return f"host={self.host} port={self.port} dbname={dbname} user={user}{pw}"


def make_cluster(**kwargs):
    """A PostgresCluster when importable, else the stand-in."""
    try:
        from rdsproxy.devservers.postgres import PostgresCluster  # the project's own helper
        log("using rdsproxy.devservers.postgres.PostgresCluster")
        return PostgresCluster(**kwargs)
    except Exception as exc:  # missing, or mid-edit by a colleague
        log(f"rdsproxy.devservers.postgres unavailable ({type(exc).__name__}: {exc}); "
            "using bench.cluster.FallbackCluster")
        return FallbackCluster(**kwargs)
