"""Throwaway PostgreSQL clusters for tests and for `rdsproxy serve` without a config.

Charter: this module owns the life cycle of short-lived, local-only PostgreSQL servers
built from the distribution's binaries (Debian's /usr/lib/postgresql/<ver>/bin):
initdb into a private directory, a minimal and fast configuration (no fsync, TCP on
127.0.0.1 only, a private unix socket directory), start/stop/kill, and a few admin
helpers (psql, users, databases). It also makes streaming replicas of a running cluster
(make_replica: pg_basebackup -R) and promotes them, for failover tests. It knows nothing
about the proxy itself.

Admin work goes over the cluster's own unix socket with `trust` auth; clients of the
proxy (and tests) go over TCP 127.0.0.1 with the configured password method, so the
auth paths under test are the real ones.

PostgreSQL refuses to run as root, so when we are root every server-side command runs
as the `postgres` OS user (runuser); a non-root user runs the binaries directly.
"""
from __future__ import annotations

import atexit
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import weakref

__all__ = ["PostgresCluster", "ClusterError", "PsqlError", "find_pg_bin", "free_port"]

_AUTH_METHODS = ("scram-sha-256", "md5", "trust", "password")
_PG_LIB = "/usr/lib/postgresql"
# The clusters run with synchronous_commit=off, so a kill() right after a commit can lose
# it. Admin helpers commit synchronously so their users/databases survive a kill().
_DURABLE = "SET synchronous_commit = on;\n"

# Clusters started by this process and not yet stopped; atexit stops them so a crashed
# test run or an interrupted `rdsproxy serve` does not leave postmasters behind.
_LIVE: "weakref.WeakSet[PostgresCluster]" = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()
# pg_bin -> an initdb'd data dir that new clusters copy (see PostgresCluster._initdb).
_TEMPLATES: dict[str, str] = {}
_TEMPLATE_LOCK = threading.Lock()


class ClusterError(RuntimeError):
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (racy by nature; start() retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    # standard_conforming_strings is on (the default), so only quotes need doubling.
    return "'" + value.replace("'", "''") + "'"


def _conf_value(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "''") + "'"


def _dsn_value(value: str) -> str:
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _clean_env() -> dict[str, str]:
    # Stray PGHOST/PGPASSWORD/PGSERVICE... from the caller must not redirect admin commands.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.setdefault("LC_ALL", "C")
    return env


def _atexit_stop_all() -> None:
    with _LIVE_LOCK:
        clusters = list(_LIVE)
    for cluster in clusters:
        try:
            cluster.stop("immediate")
        except Exception:
            pass
    for template in list(_TEMPLATES.values()):
        shutil.rmtree(os.path.dirname(template), ignore_errors=True)
    _TEMPLATES.clear()


atexit.register(_atexit_stop_all)

_OWNER_FILE = "owner.pid"
_reaped = False


def _mark_owned(tmp_dir: str) -> None:
    with open(os.path.join(tmp_dir, _OWNER_FILE), "w") as f:
        f.write(str(os.getpid()))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap_orphans(pg_bin: str, wrap) -> None:
    """Stop and remove temp clusters whose creating process died without cleaning up
    (SIGKILL, a test-runner timeout): otherwise each such run leaks a postmaster and a
    data dir on the machine. Only dirs carrying our owner.pid of a dead pid are touched."""
    global _reaped
    if _reaped:
        return
    _reaped = True
    for entry in os.listdir("/tmp"):
        if not entry.startswith("rdsproxy-pg-"):
            continue
        tmp_dir = os.path.join("/tmp", entry)
        try:
            with open(os.path.join(tmp_dir, _OWNER_FILE)) as f:
                pid = int(f.read().strip() or 0)
        except (OSError, ValueError):
            continue
        if pid <= 0 or _pid_alive(pid):
            continue
        data = os.path.join(tmp_dir, "data")
        if os.path.isfile(os.path.join(data, "postmaster.pid")):
            subprocess.run(wrap(os.path.join(pg_bin, "pg_ctl"), "stop", "-w", "-m",
                                "immediate", "-D", data),
                           capture_output=True, timeout=60, env=_clean_env(), cwd="/")
        shutil.rmtree(tmp_dir, ignore_errors=True)


class PostgresCluster:
    """One local PostgreSQL server in its own directory; see the module docstring."""

    host = "127.0.0.1"

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
        self._auto_port = port is None
        self.port = free_port() if port is None else int(port)
        self._own_base = base_dir is None
        self._base_dir_arg = base_dir
        self.base_dir = ""
        self.data_dir = ""
        self.socket_dir = ""
        self.log_path = ""
        self._running = False
        self._lock = threading.RLock()
        self._set_paths(base_dir)
        # Set on a replica made by make_replica(): where its first start() clones from
        # (host, port, user, password) instead of copying the initdb template.
        self._clone_from: tuple[str, int, str, str] | None = None
        # On a primary: the replication role's password once make_replica() created it.
        self._replication_password: str | None = None

        self._as_postgres = os.geteuid() == 0
        self._pg_uid = self._pg_gid = None
        if self._as_postgres:
            import pwd
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise ClusterError(
                    "running as root but there is no 'postgres' OS user to run the server "
                    "as; install the postgresql package") from None
            self._pg_uid, self._pg_gid = pw.pw_uid, pw.pw_gid

    # -- paths and processes -------------------------------------------------------------

    def _set_paths(self, base_dir: str | None) -> None:
        self.base_dir = os.path.abspath(base_dir) if base_dir else ""
        if self.base_dir:
            self.data_dir = os.path.join(self.base_dir, "data")
            self.socket_dir = os.path.join(self.base_dir, "sock")
            self.log_path = os.path.join(self.base_dir, "server.log")
        else:
            self.data_dir = self.socket_dir = self.log_path = ""

    def _prepare_dirs(self) -> None:
        if self._own_base and (not self.base_dir or not os.path.isdir(self.base_dir)):
            # Under /tmp (not $TMPDIR, which may be a 0700 dir postgres cannot enter) and
            # short, because the unix socket path is limited to ~107 bytes.
            with _TEMPLATE_LOCK:
                _reap_orphans(self.pg_bin, self._server_cmd)
            self._set_paths(tempfile.mkdtemp(prefix="rdsproxy-pg-", dir="/tmp"))
            _mark_owned(self.base_dir)
        os.makedirs(self.base_dir, exist_ok=True)
        os.makedirs(self.socket_dir, exist_ok=True)
        for path in (self.base_dir, self.socket_dir):
            os.chmod(path, 0o755)
            if self._as_postgres:
                os.chown(path, self._pg_uid, self._pg_gid)
        if self._as_postgres:
            self._check_traversable(self.base_dir)

    def _check_traversable(self, path: str) -> None:
        # A base_dir under e.g. pytest's 0700 tmp_path would fail later with an obscure
        # initdb error; say what is wrong instead.
        parent = os.path.dirname(path)
        while parent and parent != "/":
            st = os.stat(parent)
            if not (st.st_mode & 0o001 or (st.st_uid == self._pg_uid and st.st_mode & 0o100)
                    or (st.st_gid == self._pg_gid and st.st_mode & 0o010)):
                raise ClusterError(
                    f"{parent} is not traversable by the postgres OS user; choose a base_dir "
                    "whose parents are world-executable (e.g. under /tmp) or leave base_dir=None")
            parent = os.path.dirname(parent)

    def _server_cmd(self, *argv: str) -> list[str]:
        if self._as_postgres:
            return ["runuser", "-u", "postgres", "--", *argv]
        return list(argv)

    def _bin(self, name: str) -> str:
        return os.path.join(self.pg_bin, name)

    def _run(self, argv: list[str], *, input: str | None = None, timeout: float = 120,
             check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(self._server_cmd(*argv), input=input, capture_output=True,
                              text=True, timeout=timeout, check=check, env=_clean_env(),
                              cwd=self.base_dir or "/")

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server log (for error messages)."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no server log)"

    # -- life cycle ----------------------------------------------------------------------

    def _initdb(self) -> None:
        # initdb is most of a cluster's start-up time, and its output does not depend on
        # our options (pg_hba and settings are rewritten on every start), so run it once
        # per process and pg_bin into a template and copy that (~0.1 s vs ~1 s).
        with _TEMPLATE_LOCK:
            template = _TEMPLATES.get(self.pg_bin)
            if template is None or not os.path.isfile(os.path.join(template, "PG_VERSION")):
                tdir = tempfile.mkdtemp(prefix="rdsproxy-pg-template-", dir="/tmp")
                _mark_owned(tdir)
                os.chmod(tdir, 0o755)
                if self._as_postgres:
                    os.chown(tdir, self._pg_uid, self._pg_gid)
                template = os.path.join(tdir, "data")
                try:
                    self._run_initdb(template, cwd=tdir)
                except BaseException:
                    shutil.rmtree(tdir, ignore_errors=True)
                    raise
                _TEMPLATES[self.pg_bin] = template
        # cp -a keeps owner (postgres) and the 0700 mode PostgreSQL insists on.
        proc = subprocess.run(["cp", "-a", template, self.data_dir], capture_output=True,
                              text=True, timeout=120)
        if proc.returncode != 0:
            raise ClusterError(f"copying the initdb template failed: {proc.stderr.strip()}")

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
        body = "# written by rdsproxy.devcluster on every start\n" + "".join(
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
            "# written by rdsproxy.devcluster\n"
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
        if self._as_postgres:
            os.chown(path, self._pg_uid, self._pg_gid)

    def _pg_ctl_running(self) -> bool:
        if not self.data_dir or not os.path.isfile(os.path.join(self.data_dir, "PG_VERSION")):
            return False
        proc = self._run([self._bin("pg_ctl"), "status", "-D", self.data_dir], check=False)
        return proc.returncode == 0

    def _pg_ctl_start(self) -> bool:
        """Start the server; False when the port turned out to be taken."""
        # Truncate the log so the tail in an error message belongs to this attempt.
        with open(self.log_path, "w"):
            pass
        if self._as_postgres:
            os.chown(self.log_path, self._pg_uid, self._pg_gid)
        proc = self._run([self._bin("pg_ctl"), "start", "-w", "-t", "60", "-D", self.data_dir,
                          "-l", self.log_path], check=False, timeout=90)
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

    def start(self) -> "PostgresCluster":
        """initdb if needed, configure, start, and set the superuser password. Returns self.

        Safe to call again: a running cluster is left alone; a killed one is restarted on
        its existing data (crash recovery), keeping its users and databases.
        """
        with self._lock:
            if self._running and self._pg_ctl_running():
                return self
            self._running = False
            try:
                return self._start()
            except BaseException:
                # Leave nothing behind: no half-started server, no orphaned temp dir.
                try:
                    self.stop("immediate")
                except Exception:
                    pass
                raise

    def _start(self) -> "PostgresCluster":
        with self._lock:
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
            for attempt in range(6):
                self._write_config()
                if self._pg_ctl_start():
                    break
                if not self._auto_port or attempt == 5:
                    raise ClusterError(
                        f"port {self.port} is already in use\n--- server log tail ---\n"
                        f"{self.log_tail()}")
                self.port = free_port()  # lost the race for an auto-picked port
            self._running = True
            with _LIVE_LOCK:
                _LIVE.add(self)
            if fresh and self._clone_from is None:
                # (A replica is read-only and already has the primary's password.)
                self.psql(f"{_DURABLE}ALTER ROLE postgres PASSWORD "
                          f"{_quote_literal(self.superuser_password)}")
            return self

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop -m mode (no-op if not running); removes base_dir if we created it."""
        with self._lock:
            if self.data_dir and os.path.isfile(os.path.join(self.data_dir, "postmaster.pid")):
                proc = self._run([self._bin("pg_ctl"), "stop", "-w", "-t", "60", "-m", mode,
                                  "-D", self.data_dir], check=False, timeout=90)
                if proc.returncode != 0 and self._pg_ctl_running():
                    raise ClusterError(f"pg_ctl stop -m {mode} failed: {proc.stderr.strip()}")
            self._running = False
            with _LIVE_LOCK:
                _LIVE.discard(self)
            if self._own_base and self.base_dir:
                shutil.rmtree(self.base_dir, ignore_errors=True)
                self._set_paths(None)

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
        import time
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

    def __enter__(self) -> "PostgresCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

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
