"""Throwaway PostgreSQL clusters for tests, benchmarks and `rdsproxy serve` without a config.

The life cycle of short-lived, local-only PostgreSQL servers built from the distribution's
binaries (Debian's /usr/lib/postgresql/<ver>/bin): initdb into a private directory (copied
from a per-process template), a minimal and fast configuration (no fsync, TCP on 127.0.0.1
only, a private unix socket directory), start/stop/kill, and a few admin helpers (psql,
users, databases). It also makes streaming replicas of a running cluster (make_replica:
pg_basebackup -R) and promotes them, for failover tests. It knows nothing about the proxy.

Admin work goes over the cluster's own unix socket with `trust` auth; clients of the
proxy (and tests) go over TCP 127.0.0.1 with the configured password method, so the
auth paths under test are the real ones.

PostgreSQL refuses to run as root, so when we are root every server-side command runs
as the `postgres` OS user (runuser); a non-root user runs the binaries directly.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import time

from .base import DevServer, DevServerError, clean_env, quoted

__all__ = ["PostgresCluster", "ClusterError", "PsqlError", "find_pg_bin"]

_AUTH_METHODS = ("scram-sha-256", "md5", "trust", "password")
_PG_LIB = "/usr/lib/postgresql"
# The clusters run with synchronous_commit=off, so a kill() right after a commit can lose
# it. Admin helpers commit synchronously so their users/databases survive a kill().
_DURABLE = "SET synchronous_commit = on;\n"


class ClusterError(DevServerError):
    """A cluster could not be created, started or stopped."""


class PsqlError(subprocess.CalledProcessError):
    """psql failed; unlike CalledProcessError, str() includes psql's stderr."""

    def __str__(self) -> str:
        err = (self.stderr or "").strip()
        return f"psql exited with status {self.returncode}: {err}"


def find_pg_bin() -> str:
    """Newest /usr/lib/postgresql/<ver>/bin holding initdb (RDSPROXY_PG_BIN overrides)."""
    override = os.environ.get("RDSPROXY_PG_BIN")
    if override:
        if not os.path.isfile(os.path.join(override, "initdb")):
            raise ClusterError(f"RDSPROXY_PG_BIN={override!r} has no initdb")
        return override
    candidates = []
    try:
        entries = os.listdir(_PG_LIB)
    except OSError:
        entries = []
    for entry in entries:
        bindir = os.path.join(_PG_LIB, entry, "bin")
        if os.path.isfile(os.path.join(bindir, "initdb")):
            # Sort numerically: "9.6" < "15" < "16".
            key = tuple(int(p) for p in re.findall(r"\d+", entry)) or (0,)
            candidates.append((key, bindir))
    if candidates:
        return max(candidates)[1]
    # Non-Debian layouts: initdb on PATH, next to pg_ctl and postgres.
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(os.path.realpath(initdb))
    raise ClusterError(
        f"no PostgreSQL server binaries found (looked for {_PG_LIB}/<version>/bin/initdb "
        "and initdb on PATH); install the postgresql package (apt-get install postgresql) "
        "or set RDSPROXY_PG_BIN")


def _quote_ident(name: str) -> str:
    return quoted(name, '"')


def _quote_literal(value: str) -> str:
    # standard_conforming_strings is on (the default), so only quotes need doubling.
    return quoted(value, "'")


def _conf_value(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "''") + "'"


def _dsn_value(value: str) -> str:
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _clean_env() -> dict[str, str]:
    return clean_env(("PG",))


class PostgresCluster(DevServer):
    """One local PostgreSQL server in its own directory; see the module docstring."""

    kind = "postgres"
    dir_prefix = "rdsproxy-pg-"
    os_user = "postgres"
    package = "postgresql"
    error = ClusterError

    def __init__(self, port: int | None = None, *, auth: str = "scram-sha-256",
                 max_connections: int = 100, superuser_password: str = "postgres",
                 settings: dict[str, str] | None = None, base_dir: str | None = None,
                 pg_bin: str | None = None):
        if auth not in _AUTH_METHODS:
            raise ValueError(f"auth must be one of {_AUTH_METHODS}, not {auth!r}")
        self.auth = auth
        self.max_connections = int(max_connections)
        self.superuser_password = superuser_password
        self.settings = dict(settings or {})
        self.pg_bin = pg_bin or find_pg_bin()
        super().__init__(port, base_dir)
        self._running = False
        self._set_base_dir(base_dir or "")
        # Set on a replica made by make_replica(): where its first start() clones from
        # (host, port, user, password) instead of copying the initdb template.
        self._clone_from: tuple[str, int, str, str] | None = None
        # On a primary: the replication role's password once make_replica() created it.
        self._replication_password: str | None = None

    # -- paths and processes -------------------------------------------------------------

    def _set_base_dir(self, base_dir: str) -> None:
        self.base_dir = os.path.abspath(base_dir) if base_dir else ""
        if self.base_dir:
            self.data_dir = os.path.join(self.base_dir, "data")
            self.socket_dir = os.path.join(self.base_dir, "sock")
            self.log_path = os.path.join(self.base_dir, "server.log")
        else:
            self.data_dir = self.socket_dir = self.log_path = ""

    def _prepare_dirs(self) -> None:
        if self._own_base and (not self.base_dir or not os.path.isdir(self.base_dir)):
            self._set_base_dir(self._make_base_dir())
        os.makedirs(self.base_dir, exist_ok=True)
        os.makedirs(self.socket_dir, exist_ok=True)
        for path in (self.base_dir, self.socket_dir):
            os.chmod(path, 0o755)
            self.chown(path)
        if self._as_os_user:
            self._check_traversable(self.base_dir)

    def _check_traversable(self, path: str) -> None:
        # A base_dir under e.g. pytest's 0700 tmp_path would fail later with an obscure
        # initdb error; say what is wrong instead.
        parent = os.path.dirname(path)
        while parent and parent != "/":
            st = os.stat(parent)
            if not (st.st_mode & 0o001 or (st.st_uid == self._uid and st.st_mode & 0o100)
                    or (st.st_gid == self._gid and st.st_mode & 0o010)):
                raise ClusterError(
                    f"{parent} is not traversable by the postgres OS user; choose a base_dir "
                    "whose parents are world-executable (e.g. under /tmp) or leave base_dir=None")
            parent = os.path.dirname(parent)

    def _stop_orphan(self, directory: str) -> None:
        data = os.path.join(directory, "data")
        if os.path.isfile(os.path.join(data, "postmaster.pid")):
            subprocess.run(self._server_cmd(self._bin("pg_ctl"), "stop", "-w", "-m",
                                            "immediate", "-D", data),
                           capture_output=True, timeout=60, env=_clean_env(), cwd="/")

    def _server_cmd(self, *argv: str) -> list[str]:
        if self._as_os_user:
            return ["runuser", "-u", "postgres", "--", *argv]
        return list(argv)

    def _bin(self, name: str) -> str:
        return os.path.join(self.pg_bin, name)

    def _run(self, argv: list[str], *, input: str | None = None, timeout: float = 120,
             check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(self._server_cmd(*argv), input=input, capture_output=True,
                              text=True, timeout=timeout, check=check, env=_clean_env(),
                              cwd=self.base_dir or "/")

    # -- life cycle ----------------------------------------------------------------------

    def _initdb(self) -> None:
        template = self._template(
            (self.pg_bin,), self._run_initdb,
            lambda data: os.path.isfile(os.path.join(data, "PG_VERSION")))
        self._copy_template(template, self.data_dir)

    def _run_initdb(self, data_dir: str, cwd: str) -> None:
        proc = subprocess.run(self._server_cmd(
            self._bin("initdb"), "-D", data_dir, "-U", "postgres", "-E", "UTF8",
            "--locale=C", "--no-sync", "--auth-local=trust", "--auth-host=scram-sha-256",
        ), capture_output=True, text=True, timeout=120, env=_clean_env(), cwd=cwd)
        if proc.returncode != 0:
            raise ClusterError(f"initdb failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")

    def _write_config(self) -> None:
        conf = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": self.socket_dir,
            "max_connections": str(self.max_connections),
            # Throwaway data: durability only costs time.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "password_encryption": "md5" if self.auth == "md5" else "scram-sha-256",
        }
        conf.update(self.settings)  # caller's settings win
        # Our settings live in an included file rewritten on every start, so a restart
        # with a new port (retry) or new settings never piles up duplicates.
        body = "# written by rdsproxy.devservers on every start\n" + "".join(
            f"{k} = {_conf_value(v)}\n" for k, v in conf.items())
        self._write_data_file("rdsproxy.conf", body)
        main_conf = os.path.join(self.data_dir, "postgresql.conf")
        with open(main_conf, encoding="utf-8") as f:
            text = f.read()
        if "include_if_exists = 'rdsproxy.conf'" not in text:
            with open(main_conf, "a", encoding="utf-8") as f:
                f.write("\ninclude_if_exists = 'rdsproxy.conf'\n")

        # Local socket: trust, for our own admin. TCP: the method under test.
        hba = (
            "# written by rdsproxy.devservers\n"
            "local   all          all                 trust\n"
            "local   replication  all                 trust\n"
            f"host    all          all  127.0.0.1/32   {self.auth}\n"
            f"host    all          all  ::1/128        {self.auth}\n"
            f"host    replication  all  127.0.0.1/32   {self.auth}\n"
        )
        self._write_data_file("pg_hba.conf", hba)

    def _write_data_file(self, name: str, body: str) -> None:
        path = os.path.join(self.data_dir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(body)
        os.chmod(path, 0o600)
        self.chown(path)

    def _pg_ctl_running(self) -> bool:
        if not self.data_dir or not os.path.isfile(os.path.join(self.data_dir, "PG_VERSION")):
            return False
        proc = self._run([self._bin("pg_ctl"), "status", "-D", self.data_dir], check=False)
        return proc.returncode == 0

    def _pg_ctl_start(self, timeout: float) -> bool:
        """Start the server; False when the port turned out to be taken."""
        self._fresh_log()
        proc = self._run([self._bin("pg_ctl"), "start", "-w", "-t", str(int(timeout)),
                          "-D", self.data_dir, "-l", self.log_path],
                         check=False, timeout=timeout + 30)
        if proc.returncode == 0:
            return True
        tail = self.log_tail()
        if re.search(r"could not bind|could not create any TCP/IP sockets|"
                     r"Address already in use", tail):
            return False
        raise ClusterError(
            f"PostgreSQL failed to start on port {self.port} (pg_ctl exit {proc.returncode}: "
            f"{(proc.stderr or proc.stdout).strip()})\n--- server log tail ({self.log_path}) ---\n"
            f"{tail}")

    def _still_running(self) -> bool:
        if self._running and self._pg_ctl_running():
            return True
        self._running = False
        return False

    def _start(self, timeout: float) -> None:
        """initdb if needed, configure, start, and set the superuser password."""
        self._prepare_dirs()
        fresh = not os.path.isfile(os.path.join(self.data_dir, "PG_VERSION"))
        if fresh and self._clone_from is not None:
            self._basebackup()
        elif fresh:
            self._initdb()
        elif self._pg_ctl_running():
            # A server left over on this data dir (e.g. by an earlier process): restart
            # it so it runs with the configuration asked for now.
            self._run([self._bin("pg_ctl"), "stop", "-w", "-m", "fast", "-D",
                       self.data_dir], check=False)
        attempts = 6
        for attempt in range(attempts):
            self._write_config()
            if self._pg_ctl_start(timeout):
                break
            if not self._next_port(attempt, attempts):
                raise ClusterError(
                    f"port {self.port} is already in use\n--- server log tail ---\n"
                    f"{self.log_tail()}")
        self._running = True
        if fresh and self._clone_from is None:
            # (A replica is read-only and already has the primary's password.)
            self.psql(f"{_DURABLE}ALTER ROLE postgres PASSWORD "
                      f"{_quote_literal(self.superuser_password)}")

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop -m mode (no-op if not running); removes base_dir if we created it."""
        with self._lock:
            if self.data_dir and os.path.isfile(os.path.join(self.data_dir, "postmaster.pid")):
                proc = self._run([self._bin("pg_ctl"), "stop", "-w", "-t", "60", "-m", mode,
                                  "-D", self.data_dir], check=False, timeout=90)
                if proc.returncode != 0 and self._pg_ctl_running():
                    raise ClusterError(f"pg_ctl stop -m {mode} failed: {proc.stderr.strip()}")
            self._running = False
            self._forget()

    def stop_at_exit(self) -> None:
        self.stop("immediate")

    def kill(self) -> None:
        """Stop abruptly (-m immediate), like a crash; the data dir is kept, so start()
        brings the same cluster back. Call stop() afterwards to clean up."""
        with self._lock:
            if self.data_dir and os.path.isfile(os.path.join(self.data_dir, "postmaster.pid")):
                self._run([self._bin("pg_ctl"), "stop", "-w", "-m", "immediate", "-D",
                           self.data_dir], check=False, timeout=90)
            self._running = False

    def restart(self) -> "PostgresCluster":
        """Fast stop and start again on the same data and port."""
        with self._lock:
            if self._running:
                self._run([self._bin("pg_ctl"), "stop", "-w", "-m", "fast", "-D",
                           self.data_dir], check=False, timeout=90)
                self._running = False
            return self.start()

    # -- replication ---------------------------------------------------------------------

    _REPLICATION_USER = "rdsproxy_replicator"

    def make_replica(self, port: int | None = None) -> "PostgresCluster":
        """A streaming replica (hot standby) of this running cluster, started on its own
        port and directory; stop() removes its directory like any cluster's.

        It is cloned over TCP with pg_basebackup -R -X stream as a REPLICATION role, so
        primary_conninfo (in the replica's postgresql.auto.conf) is a real TCP login too.
        """
        with self._lock:
            if not self._running:
                raise ClusterError("make_replica() needs a running primary")
            password = self._ensure_replication_user()
            replica = PostgresCluster(
                port, auth=self.auth, max_connections=self.max_connections,
                superuser_password=self.superuser_password, settings=self.settings,
                pg_bin=self.pg_bin)
            replica._clone_from = (self.host, self.port, self._REPLICATION_USER, password)
        replica.start()
        try:
            replica._wait_streaming()
        except BaseException:
            replica.stop("immediate")
            raise
        return replica

    def _ensure_replication_user(self) -> str:
        if self._replication_password is None:
            password = secrets.token_hex(16)
            name = _quote_ident(self._REPLICATION_USER)
            exists = self.psql("SELECT count(*) FROM pg_roles WHERE rolname = "
                               f"{_quote_literal(self._REPLICATION_USER)}") == "1"
            verb = "ALTER" if exists else "CREATE"
            self.psql(f"{_DURABLE}{verb} ROLE {name} REPLICATION LOGIN "
                      f"PASSWORD {_quote_literal(password)}")
            self._replication_password = password
        return self._replication_password

    def _basebackup(self) -> None:
        host, port, user, password = self._clone_from
        # The password goes in the conninfo (not PGPASSWORD: runuser/_clean_env would drop
        # it) so that -R writes it into primary_conninfo and the standby can log in.
        # -c fast: do not wait for a spread checkpoint; -N: throwaway data, skip fsync.
        conninfo = f"password={_dsn_value(password)} application_name=rdsproxy_replica"
        proc = self._run([self._bin("pg_basebackup"), "-D", self.data_dir, "-R",
                          "-X", "stream", "-c", "fast", "-N", "-h", host, "-p", str(port),
                          "-U", user, "-w", "-d", conninfo], check=False, timeout=300)
        if proc.returncode != 0:
            raise ClusterError(f"pg_basebackup from {host}:{port} failed "
                               f"({proc.returncode}): {(proc.stderr or proc.stdout).strip()}")

    def _wait_streaming(self, timeout: float = 30.0) -> None:
        # pg_ctl start -w returns once the standby accepts read-only connections; wait
        # for its WAL receiver too, so writes made on the primary from now on arrive.
        deadline = time.monotonic() + timeout
        while True:
            status = self.psql("SELECT status FROM pg_stat_wal_receiver")
            if status == "streaming":
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"replica on port {self.port} is not streaming after "
                                   f"{timeout}s (status {status!r})\n{self.log_tail()}")
            time.sleep(0.05)

    def promote(self) -> None:
        """pg_ctl promote -w: the standby leaves recovery and accepts writes when this returns."""
        with self._lock:
            proc = self._run([self._bin("pg_ctl"), "promote", "-w", "-t", "60", "-D",
                              self.data_dir], check=False, timeout=90)
            if proc.returncode != 0:
                raise ClusterError(f"pg_ctl promote failed ({proc.returncode}): "
                                   f"{(proc.stderr or proc.stdout).strip()}\n{self.log_tail()}")

    def is_in_recovery(self) -> bool:
        """True on a standby (pg_is_in_recovery())."""
        return self.psql("SELECT pg_is_in_recovery()") == "t"

    @property
    def running(self) -> bool:
        return self._running

    def __repr__(self) -> str:
        state = "running" if self._running else "stopped"
        return f"<PostgresCluster {self.host}:{self.port} auth={self.auth} {state} {self.base_dir!r}>"

    # -- client helpers ------------------------------------------------------------------

    def dsn(self, user: str = "postgres", password: str | None = None,
            dbname: str = "postgres") -> str:
        """libpq keyword DSN for TCP 127.0.0.1. For `postgres`, password defaults to the
        superuser password; for other users it is omitted unless given."""
        if password is None and user == "postgres":
            password = self.superuser_password
        parts = [f"host={self.host}", f"port={self.port}", f"user={_dsn_value(user)}",
                 f"dbname={_dsn_value(dbname)}"]
        if password is not None:
            parts.append(f"password={_dsn_value(password)}")
        return " ".join(parts)

    def psql(self, sql: str, *, dbname: str = "postgres", user: str = "postgres") -> str:
        """Run SQL with psql over the unix socket (trust), -Atq, ON_ERROR_STOP=1.

        Returns stdout without its trailing newline; raises PsqlError (a
        CalledProcessError carrying stderr) on failure.
        """
        # SQL on stdin (not -c) so multi-statement scripts run statement by statement,
        # which CREATE DATABASE and friends need.
        argv = [self._bin("psql"), "-X", "-Atq", "-v", "ON_ERROR_STOP=1",
                "-h", self.socket_dir, "-p", str(self.port), "-U", user, "-d", dbname, "-f", "-"]
        proc = self._run(argv, input=sql, check=False)
        if proc.returncode != 0:
            raise PsqlError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc.stdout.rstrip("\n")

    def create_user(self, name: str, password: str, *, superuser: bool = False,
                    createdb: bool = False) -> None:
        """CREATE ROLE ... LOGIN; the password is hashed per the cluster's password_encryption."""
        opts = ["LOGIN", "SUPERUSER" if superuser else "NOSUPERUSER"]
        if createdb:
            opts.append("CREATEDB")
        self.psql(f"{_DURABLE}CREATE ROLE {_quote_ident(name)} {' '.join(opts)} "
                  f"PASSWORD {_quote_literal(password)}")

    def create_database(self, name: str, owner: str | None = None) -> None:
        sql = f"{_DURABLE}CREATE DATABASE {_quote_ident(name)}"
        if owner:
            sql += f" OWNER {_quote_ident(owner)}"
        self.psql(sql)
