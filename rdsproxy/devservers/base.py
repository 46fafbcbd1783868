"""What every throwaway database server shares: ports, private directories, the OS user
it runs as, one installed template per process, orphan reaping and stop-at-exit.

A server lives in its own directory under /tmp named `<dir_prefix>XXXX`, marked with the
creating process's pid (owner.pid). Servers still running when the process exits are
stopped by an atexit hook; servers left behind by a process that died without cleaning up
(SIGKILL, a test-runner timeout) are stopped and removed by the next process that starts
a server of the same kind. The engine-specific parts (install, configure, start, stop,
admin SQL) live in the subclasses.
"""
from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Callable

__all__ = ["DevServer", "DevServerError", "clean_env", "free_port", "pid_alive", "quoted",
           "read_pid"]

_OWNER_FILE = "owner.pid"

# Servers started by this process and not yet stopped, for the atexit hook.
_LIVE: "weakref.WeakSet[DevServer]" = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()
# (kind, binaries...) -> an installed data dir that new servers of that kind copy.
_TEMPLATES: dict[tuple[str, ...], str] = {}
# Guards the template cache and the once-per-process orphan sweep.
_SHARED_LOCK = threading.Lock()


class DevServerError(RuntimeError):
    """A throwaway server could not be created, started or stopped."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (racy by nature; start() retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quoted(value: str, quote: str) -> str:
    """`value` between `quote`s with every `quote` inside doubled (SQL identifiers, and
    literals where backslashes are not escapes)."""
    return quote + value.replace(quote, quote + quote) + quote


def clean_env(drop_prefixes: tuple[str, ...]) -> dict[str, str]:
    """os.environ without the variables a server's own tools would obey (PGHOST,
    MYSQL_PWD, ...), which must not redirect admin commands; messages in the C locale."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes)}
    env["LC_ALL"] = "C"
    return env


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_pid(path: str) -> int:
    """The pid in a pid file, 0 when it is missing or unreadable."""
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def _mark_owned(directory: str) -> None:
    with open(os.path.join(directory, _OWNER_FILE), "w") as f:
        f.write(str(os.getpid()))


def _atexit_stop_all() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        try:
            server.stop_at_exit()
        except Exception:
            pass
    for template in list(_TEMPLATES.values()):
        shutil.rmtree(os.path.dirname(template), ignore_errors=True)
    _TEMPLATES.clear()


atexit.register(_atexit_stop_all)


class DevServer:
    """The engine-neutral half of a throwaway server; subclasses set the class attributes
    and implement _start(), stop(), stop_at_exit() and _stop_orphan()."""

    host = "127.0.0.1"
    kind = ""                    # "postgres", "mariadb": names the template cache entries
    dir_prefix = ""              # of the private directory under /tmp
    os_user = ""                 # who runs the server when we are root
    package = ""                 # what to install when that user is missing
    log_name = "server log"      # what log_tail() calls the log when it is missing
    error: type[Exception] = DevServerError
    # Set on a subclass once this process has swept that kind's orphans.
    _orphans_reaped = False

    def __init__(self, port: int | None, base_dir: str | None):
        self._auto_port = port is None
        self.port = free_port() if port is None else int(port)
        self._own_base = base_dir is None
        self._lock = threading.RLock()
        # The servers refuse to run as root: then they run as their own OS user.
        self._as_os_user = os.geteuid() == 0
        self._uid = self._gid = None
        if self._as_os_user:
            import pwd
            try:
                pw = pwd.getpwnam(self.os_user)
            except KeyError:
                raise self.error(
                    f"running as root but there is no {self.os_user!r} OS user to run the "
                    f"server as; install the {self.package} package") from None
            self._uid, self._gid = pw.pw_uid, pw.pw_gid

    # -- directories and files -------------------------------------------------------------

    def chown(self, path: str) -> None:
        """Give `path` to the server's OS user when we run it as that user."""
        if self._as_os_user:
            os.chown(path, self._uid, self._gid)

    def _make_base_dir(self) -> str:
        """A fresh owned directory under /tmp (not $TMPDIR, which may be a 0700 dir the
        server's user cannot enter) with a short name, because a unix socket path is
        limited to ~107 bytes. Sweeps this kind's orphans first, once per process."""
        cls = type(self)
        with _SHARED_LOCK:
            if not cls._orphans_reaped:
                cls._orphans_reaped = True
                self._reap_orphans()
        directory = tempfile.mkdtemp(prefix=self.dir_prefix, dir="/tmp")
        _mark_owned(directory)
        return directory

    def _reap_orphans(self) -> None:
        for entry in os.listdir("/tmp"):
            if not entry.startswith(self.dir_prefix):
                continue
            directory = os.path.join("/tmp", entry)
            owner = read_pid(os.path.join(directory, _OWNER_FILE))
            if owner <= 0 or pid_alive(owner):
                continue
            self._stop_orphan(directory)
            shutil.rmtree(directory, ignore_errors=True)

    def _stop_orphan(self, directory: str) -> None:
        """Stop the server a dead process left running in `directory`, if any."""
        raise NotImplementedError

    def _template(self, key: tuple[str, ...], install: Callable[[str, str], None],
                  installed: Callable[[str], bool]) -> str:
        """The data dir installed once per process for `key` (installing costs most of a
        start-up, and its output does not depend on our options, which are applied at
        every start). install(data_dir, work_dir) makes one; installed(data_dir) says
        whether a cached one is still whole."""
        key = (self.kind, *key)
        with _SHARED_LOCK:
            template = _TEMPLATES.get(key)
            if template is None or not installed(template):
                tdir = tempfile.mkdtemp(prefix=self.dir_prefix + "template-", dir="/tmp")
                _mark_owned(tdir)
                os.chmod(tdir, 0o755)
                self.chown(tdir)
                template = os.path.join(tdir, "data")
                try:
                    install(template, tdir)
                except BaseException:
                    shutil.rmtree(tdir, ignore_errors=True)
                    raise
                _TEMPLATES[key] = template
        return template

    def _copy_template(self, template: str, data_dir: str) -> None:
        # cp -a keeps the server user as owner and the modes the server insists on.
        proc = subprocess.run(["cp", "-a", template, data_dir], capture_output=True,
                              text=True, timeout=120)
        if proc.returncode != 0:
            raise self.error(f"copying the data dir template failed: {proc.stderr.strip()}")

    def _fresh_log(self) -> None:
        """Truncate the log so the tail in an error message belongs to this attempt."""
        with open(self.log_path, "w"):
            pass
        self.chown(self.log_path)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's log (for error messages)."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return f"(no {self.log_name})"

    # -- life cycle --------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 60.0):
        """Install if needed, configure, start and wait until it accepts connections.
        Returns self.

        Safe to call again: a running server is left alone; a killed one is restarted on
        its existing data (crash recovery), keeping its users and databases.
        """
        with self._lock:
            if self._still_running():
                return self
            try:
                self._start(timeout)
            except BaseException:
                # Leave nothing behind: no half-started server, no orphaned directory.
                try:
                    self.stop_at_exit()
                except Exception:
                    pass
                raise
            with _LIVE_LOCK:
                _LIVE.add(self)
            return self

    def _still_running(self) -> bool:
        return self.running

    def _start(self, timeout: float) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def stop_at_exit(self) -> None:
        """Stop as fast as the server allows (at exit, or after a failed start)."""
        raise NotImplementedError

    def _forget(self) -> None:
        """After a stop: no longer live; our own directory removed."""
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if self._own_base and self.base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self._set_base_dir("")

    def _set_base_dir(self, base_dir: str) -> None:
        raise NotImplementedError

    def _next_port(self, attempt: int, attempts: int) -> bool:
        """After a start lost the race for its port: pick another and say True, unless the
        port was the caller's choice or this was the last attempt."""
        if not self._auto_port or attempt == attempts - 1:
            return False
        self.port = free_port()
        return True

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
