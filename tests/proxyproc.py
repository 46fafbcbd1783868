"""`rdsproxy serve --config F` as a real subprocess, for tests that need process-level
behaviour (signals, exit codes) or clients that block the GIL (psycopg's C `cancel()`
would deadlock a proxy running in a thread of the same process)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from harness import proxy_config, secret_path
from utils import free_port, libpq_dsn, wait_for_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table: top={"admin": {"listen": ...}}
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def dump_toml(doc: dict) -> str:
    """A configuration dict as a TOML file's text: scalars and plain lists first, then each
    table, then each array of tables (auth, targets, endpoints)."""
    lines = []
    for key, value in doc.items():
        if not isinstance(value, (dict, list)) or (isinstance(value, list) and not
                                                     any(isinstance(v, dict) for v in value)):
            lines.append(f"{key} = {toml_value(value)}")
    for key, value in doc.items():
        if isinstance(value, dict):
            lines.append(f"\n[{key}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in value.items()]
        elif isinstance(value, list) and any(isinstance(v, dict) for v in value):
            for entry in value:
                lines.append(f"\n[[{key}]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in entry.items()]
    return "\n".join(lines) + "\n"


# The proxies running now: a failing test's report shows their logs (see conftest).
RUNNING: set["ProxyProcess"] = set()


class ProxyProcess:
    """`rdsproxy serve` in front of `server` with its config (harness.proxy_config's, with
    the same options), its command line's `serve_args` after --config, and its log in
    `directory`."""

    def __init__(self, directory, server, users, *, env=None, serve_args=(), **options):
        self.directory = str(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.port = free_port()
        self.host = "127.0.0.1"
        self.config_path = os.path.join(self.directory, "proxy.toml")
        self.log_path = os.path.join(self.directory, "proxy.log")
        config = proxy_config(self.directory, server, users=users,
                              endpoints=[{"name": "default", "listen": f"127.0.0.1:{self.port}"}],
                              **options)
        with open(self.config_path, "w") as fh:
            fh.write(dump_toml(config))
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rdsproxy", "serve", "--config", self.config_path, *serve_args],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, **(env or {})})
        RUNNING.add(self)
        try:
            wait_for_port(self.port, timeout=20, proc=self.proc)
        except BaseException:
            self.stop()
            raise

    def secret_path(self, user) -> str:
        return secret_path(self.directory, user)

    def dsn(self, user, password, dbname, **extra) -> str:
        return libpq_dsn(self.host, self.port, user, password, dbname, **extra)

    def log_text(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def signal(self, signum) -> None:
        self.proc.send_signal(signum)

    def wait_for_log(self, text, timeout=10.0, start=0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_text()[start:]:
                return
            time.sleep(0.05)
        raise TimeoutError(f"{text!r} not logged within {timeout}s:\n{self.log_text()[-3000:]}")

    def stop(self) -> None:
        RUNNING.discard(self)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
