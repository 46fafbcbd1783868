"""Throwaway MariaDB servers for tests and benchmarks of the MySQL engine family.

The life cycle of short-lived, local-only MariaDB servers built from the distribution's
binaries (Debian's mariadb-server: mariadb-install-db, mariadbd, mariadb): a private
directory under /tmp with its own data dir (copied from a per-process template), unix
socket, pid file and error log; a minimal, fast configuration (no durability, TCP on
127.0.0.1 only, no binary log, no performance_schema); start / stop / kill; and a few admin
helpers (SQL as root over the unix socket, users with a chosen auth plugin, databases,
SHOW PROCESSLIST counts). It knows nothing about the proxy.

Every option is given on the command line after --no-defaults, so the machine's own
/etc/mysql configuration (and the system MariaDB on port 3306) never interferes.

Admin work goes over the server's unix socket as root (empty password: the data dir is
made with --auth-root-authentication-method=normal, so that works whoever runs us);
clients under test use TCP 127.0.0.1 and the users they were given, so the auth paths
under test are the real ones.

mariadbd refuses to run as root, so when we are root it is started with --user=mysql
(it drops privileges itself, so the pid we hold is the server's own) and its directory is
owned by the `mysql` OS user; a non-root user runs it as itself.

Note: MariaDB 10.11 has no server side of caching_sha2_password (MySQL 8's default
plugin): users here are mysql_native_password (or unix_socket / ed25519). caching_sha2 is
tested against the proxy's own server-side code instead.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time

from .base import DevServer, DevServerError, clean_env, pid_alive, quoted, read_pid

__all__ = ["MariaDBServer", "MariaDBError", "SqlError", "find_mariadb_bin"]

_INSTALL_DB_NAMES = ("mariadb-install-db", "mysql_install_db")
_SERVER_NAMES = ("mariadbd", "mysqld")
_CLIENT_NAMES = ("mariadb", "mysql")
_SEARCH_PATH = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin",
                "/usr/local/mysql/bin")


class MariaDBError(DevServerError):
    """A server could not be created, started or stopped."""


class SqlError(subprocess.CalledProcessError):
    """The mariadb client failed; unlike CalledProcessError, str() includes its stderr."""

    def __str__(self) -> str:
        err = (self.stderr or "").strip()
        return f"mariadb exited with status {self.returncode}: {err}"


def _which(names, env_var: str) -> str:
    override = os.environ.get(env_var)
    if override:
        if not os.access(override, os.X_OK):
            raise MariaDBError(f"{env_var}={override!r} is not executable")
        return override
    for name in names:
        found = shutil.which(name)
        if found:
            return found
        for directory in _SEARCH_PATH:
            path = os.path.join(directory, name)
            if os.access(path, os.X_OK):
                return path
    raise MariaDBError(
        f"none of {', '.join(names)} found on PATH or in {', '.join(_SEARCH_PATH)}; install "
        f"the mariadb-server package (apt-get install mariadb-server) or set {env_var}")


def find_mariadb_bin() -> dict[str, str]:
    """Paths of the server, install-db and client programs (RDSPROXY_MARIADBD,
    RDSPROXY_MARIADB_INSTALL_DB and RDSPROXY_MARIADB_CLIENT override)."""
    return {
        "server": _which(_SERVER_NAMES, "RDSPROXY_MARIADBD"),
        "install_db": _which(_INSTALL_DB_NAMES, "RDSPROXY_MARIADB_INSTALL_DB"),
        "client": _which(_CLIENT_NAMES, "RDSPROXY_MARIADB_CLIENT"),
    }


def _quote_ident(name: str) -> str:
    return quoted(name, "`")


def _quote_literal(value: str) -> str:
    # Backslashes too: the server runs with the default sql_mode (backslash escapes on).
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _clean_env() -> dict[str, str]:
    return clean_env(("MYSQL", "MARIADB"))


def _is_mariadbd(pid: int) -> bool:
    # Never signal a pid that was recycled by an unrelated process.
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() in _SERVER_NAMES
    except OSError:
        return False


def _kill_pid(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM (clean shutdown), then SIGKILL after `timeout` s; waits for it to be gone."""
    if pid <= 0 or not _is_mariadbd(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and _is_mariadbd(pid):
        if time.monotonic() > deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + 10
        time.sleep(0.02)


class MariaDBServer(DevServer):
    """One local MariaDB server in its own directory; see the module docstring.

    `settings` are extra server options ({"innodb_buffer_pool_size": "256M", ...}; a value
    of None gives a bare flag such as --skip-grant-tables), applied on every start and
    winning over ours. `tls` is (cert_file, key_file) or (cert_file, key_file, ca_file):
    the files are copied where the server can read them and ssl_cert / ssl_key / ssl_ca
    point there.
    """

    kind = "mariadb"
    dir_prefix = "rdsproxy-my-"
    os_user = "mysql"
    package = "mariadb-server"
    log_name = "error log"
    error = MariaDBError

    def __init__(self, port: int | None = None, *, max_connections: int = 151,
                 settings: dict[str, str | int | None] | None = None,
                 tls: tuple[str, ...] | None = None, base_dir: str | None = None):
        self.max_connections = int(max_connections)
        self.settings = dict(settings or {})
        self.tls = tuple(tls) if tls else None
        self.bins = find_mariadb_bin()
        super().__init__(port, base_dir)
        self._set_base_dir(base_dir or "")
        self._proc: subprocess.Popen | None = None

    # -- paths ----------------------------------------------------------------------------

    def _set_base_dir(self, base_dir: str) -> None:
        self.base_dir = os.path.abspath(base_dir) if base_dir else ""
        paths = {"data_dir": "data", "socket_path": "mariadbd.sock",
                 "pid_file": "mariadbd.pid", "log_path": "error.log"}
        for attribute, name in paths.items():
            setattr(self, attribute, os.path.join(self.base_dir, name) if self.base_dir else "")

    @property
    def pid(self) -> int:
        """The server's process id (0 when not running)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else 0

    @property
    def running(self) -> bool:
        return self.pid != 0

    def _prepare_dirs(self) -> None:
        if self._own_base and not self.base_dir:
            self._set_base_dir(self._make_base_dir())
        os.makedirs(self.base_dir, exist_ok=True)
        os.chmod(self.base_dir, 0o755)
        self.chown(self.base_dir)
        tmp = os.path.join(self.base_dir, "tmp")
        os.makedirs(tmp, exist_ok=True)
        os.chmod(tmp, 0o700)
        self.chown(tmp)

    def _stop_orphan(self, directory: str) -> None:
        _kill_pid(read_pid(os.path.join(directory, "mariadbd.pid")), timeout=10)

    # -- life cycle -------------------------------------------------------------------------

    def _install(self) -> None:
        template = self._template(
            (self.bins["install_db"], self.bins["server"]), self._run_install_db,
            lambda data: os.path.isdir(os.path.join(data, "mysql")))
        self._copy_template(template, self.data_dir)

    def _run_install_db(self, data_dir: str, cwd: str) -> None:
        argv = [self.bins["install_db"], "--no-defaults", f"--datadir={data_dir}",
                "--auth-root-authentication-method=normal", "--skip-test-db",
                "--skip-name-resolve", "--innodb-log-file-size=16M", f"--tmpdir={cwd}"]
        if self._as_os_user:
            argv.append("--user=mysql")
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=180,
                              env=_clean_env(), cwd=cwd)
        if proc.returncode != 0 or not os.path.isdir(os.path.join(data_dir, "mysql")):
            raise MariaDBError(f"mariadb-install-db failed ({proc.returncode}):\n"
                               f"{proc.stderr}{proc.stdout}")

    def _tls_options(self) -> dict[str, str]:
        if not self.tls:
            return {}
        directory = os.path.join(self.base_dir, "tls")
        os.makedirs(directory, exist_ok=True)
        os.chmod(directory, 0o755)
        self.chown(directory)
        names = ("server-cert.pem", "server-key.pem", "ca.pem")
        options = {}
        for option, name, source in zip(("ssl_cert", "ssl_key", "ssl_ca"), names, self.tls):
            target = os.path.join(directory, name)
            shutil.copyfile(source, target)
            os.chmod(target, 0o600 if option == "ssl_key" else 0o644)
            self.chown(target)
            options[option] = target
        return options

    def _argv(self) -> list[str]:
        options: dict[str, str | int | None] = {
            "datadir": self.data_dir,
            "socket": self.socket_path,
            "pid-file": self.pid_file,
            "log-error": self.log_path,
            "tmpdir": os.path.join(self.base_dir, "tmp"),
            "port": self.port,
            "bind-address": self.host,
            "max_connections": self.max_connections,
            "skip-name-resolve": None,
            "skip-log-bin": None,
            "performance_schema": "OFF",
            "character-set-server": "utf8mb4",
            # Throwaway data: durability only costs time.
            "innodb_flush_log_at_trx_commit": 0,
            "innodb_doublewrite": 0,
            "innodb_buffer_pool_size": "64M",
            "innodb_log_file_size": "16M",
            "skip-innodb-adaptive-hash-index": None,
        }
        options.update(self._tls_options())
        options.update(self.settings)    # the caller's settings win
        argv = [self.bins["server"], "--no-defaults"]
        if self._as_os_user:
            argv.append("--user=mysql")
        for key, value in options.items():
            argv.append(f"--{key}" if value is None else f"--{key}={value}")
        return argv

    def _start(self, timeout: float) -> None:
        self._prepare_dirs()
        if not os.path.isdir(os.path.join(self.data_dir, "mysql")):
            self._install()
        attempts = 6
        for attempt in range(attempts):
            self._fresh_log()
            self._proc = subprocess.Popen(
                self._argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, env=_clean_env(), cwd=self.base_dir,
                start_new_session=True)
            if self._wait_ready(timeout):
                return
            tail = self.log_tail()
            if re.search(r"Address already in use|Can't start server: Bind", tail) \
                    and self._next_port(attempt, attempts):
                continue
            raise MariaDBError(f"mariadbd failed to start on port {self.port} (exit "
                               f"{self._proc.poll()})\n--- error log tail ({self.log_path}) "
                               f"---\n{tail}")

    def _wait_ready(self, timeout: float) -> bool:
        """True once the server answers on TCP with a HandshakeV10; False if it exited."""
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=2) as s:
                    header = s.recv(5)
                    if len(header) == 5 and header[4] == 10:
                        return True
            except OSError:
                pass
            if time.monotonic() > deadline:
                self._kill_proc()
                raise MariaDBError(f"mariadbd on port {self.port} not ready after {timeout}s"
                                   f"\n--- error log tail ---\n{self.log_tail()}")
            time.sleep(0.03)

    def _kill_proc(self, timeout: float = 30.0) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
        self._proc = None

    def stop(self) -> None:
        """Shut down (SIGTERM, SIGKILL if that takes over 30 s) and remove the directory if
        we created it. No-op when stopped."""
        with self._lock:
            self._kill_proc()
            if self.pid_file:
                # A server left over on this directory by an earlier process.
                _kill_pid(read_pid(self.pid_file), timeout=10)
            self._forget()

    def stop_at_exit(self) -> None:
        self.stop()

    def kill(self) -> None:
        """SIGKILL, like a crash; the data dir is kept, so start() brings the same server
        back (after crash recovery). Call stop() afterwards to clean up."""
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(30)
            self._proc = None

    def restart(self) -> "MariaDBServer":
        """Clean shutdown and start again on the same data and port."""
        with self._lock:
            self._kill_proc()
            return self.start()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<MariaDBServer {self.host}:{self.port} {state} {self.base_dir!r}>"

    # -- admin helpers --------------------------------------------------------------------

    def sql(self, sql: str, *, database: str | None = None, timeout: float = 60) -> str:
        """Run SQL as root over the unix socket with the mariadb client (batch mode, no
        column names). Returns stdout without its trailing newline; raises SqlError."""
        argv = [self.bins["client"], "--no-defaults", f"--socket={self.socket_path}",
                "--user=root", "--batch", "--skip-column-names", "--raw"]
        if database:
            argv.append(f"--database={database}")
        proc = subprocess.run(argv, input=sql, capture_output=True, text=True, timeout=timeout,
                              env=_clean_env())
        if proc.returncode != 0:
            raise SqlError(proc.returncode, argv, proc.stdout, proc.stderr)
        return proc.stdout.rstrip("\n")

    def query(self, sql: str, *, database: str | None = None) -> list[list[str]]:
        """Rows of the last result as lists of strings ("NULL" for NULL)."""
        out = self.sql(sql, database=database)
        return [line.split("\t") for line in out.split("\n")] if out else []

    def create_user(self, name: str, password: str = "", *,
                    plugin: str = "mysql_native_password", host: str = "%",
                    grant: str | None = "ALL PRIVILEGES ON *.*") -> None:
        """CREATE USER name@host with the given auth plugin (mysql_native_password, or
        ed25519 if its plugin is installed), then GRANT `grant` (None: no grant)."""
        who = f"{_quote_literal(name)}@{_quote_literal(host)}"
        if plugin == "mysql_native_password":
            ident = f"IDENTIFIED VIA mysql_native_password USING PASSWORD({_quote_literal(password)})"
        else:
            ident = f"IDENTIFIED VIA {plugin} USING PASSWORD({_quote_literal(password)})"
        statements = [f"CREATE USER {who} {ident};"]
        if grant:
            statements.append(f"GRANT {grant} TO {who};")
        self.sql("\n".join(statements))

    def drop_user(self, name: str, host: str = "%") -> None:
        self.sql(f"DROP USER IF EXISTS {_quote_literal(name)}@{_quote_literal(host)};")

    def create_database(self, name: str, owner: str | None = None,
                        owner_host: str = "%") -> None:
        """CREATE DATABASE, and grant all on it to `owner` if given."""
        statements = [f"CREATE DATABASE {_quote_ident(name)};"]
        if owner:
            statements.append(f"GRANT ALL PRIVILEGES ON {_quote_ident(name)}.* TO "
                              f"{_quote_literal(owner)}@{_quote_literal(owner_host)};")
        self.sql("\n".join(statements))

    def processlist(self) -> list[dict[str, str]]:
        """Client connections (SHOW PROCESSLIST rows as dicts), without this helper's own
        connection and the server's background threads."""
        rows = self.query(
            "SELECT ID, USER, HOST, IFNULL(DB, 'NULL'), COMMAND, TIME, IFNULL(STATE, ''), "
            "IFNULL(INFO, 'NULL') FROM information_schema.PROCESSLIST "
            "WHERE ID <> CONNECTION_ID() AND COMMAND NOT IN ('Daemon', 'Binlog Dump') "
            "AND USER <> 'system user'")
        keys = ("id", "user", "host", "db", "command", "time", "state", "info")
        return [dict(zip(keys, row)) for row in rows]

    def connection_count(self, user: str | None = None) -> int:
        """How many client connections are open (from `user` only, if given)."""
        return sum(1 for row in self.processlist() if user is None or row["user"] == user)

    def variable(self, name: str) -> str:
        """A global system variable's value."""
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise ValueError(f"not a variable name: {name!r}")
        return self.sql(f"SELECT @@GLOBAL.{name}")
