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


def write_config(path, *, top: dict, auth: list[dict], target_group: dict, targets: list[dict],
                 endpoints: list[dict]) -> None:
    lines = [f"{k} = {toml_value(v)}" for k, v in top.items()]
    if target_group:
        lines.append("\n[target_group]")
        lines += [f"{k} = {toml_value(v)}" for k, v in target_group.items()]
    for name, entries in (("auth", auth), ("targets", targets), ("endpoints", endpoints)):
        for entry in entries:
            lines.append(f"\n[[{name}]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in entry.items()]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def write_secret_file(path, username, password) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump({"username": username, "password": password, "engine": "postgres"}, fh)


class ProxyProcess:
    """A proxy subprocess with its config in `directory`; secrets live in
    directory/secrets/<user>.json and are referenced relative to the config file."""

    def __init__(self, directory, cluster, users, *, top=None, client_auth="POSTGRES_SCRAM_SHA_256",
                 env=None, **target_group):
        self.directory = str(directory)
        self.port = free_port()
        self.host = "127.0.0.1"
        self.config_path = os.path.join(self.directory, "proxy.toml")
        self.log_path = os.path.join(self.directory, "proxy.log")
        auth = []
        for user, password in users:
            write_secret_file(self.secret_path(user), user, password)
            auth.append({"secret": f"file:secrets/{user}.json", "client_password_auth_type": client_auth})
        target_group.setdefault("max_connections_percent", 20)
        target_group.setdefault("connection_borrow_timeout", 10)
        write_config(self.config_path, top={"name": "subprocess-proxy", "engine_family": "POSTGRESQL",
                                            **(top or {})},
                     auth=auth, target_group=target_group,
                     targets=[{"host": cluster.host, "port": cluster.port}],
                     endpoints=[{"name": "default", "listen": f"127.0.0.1:{self.port}"}])
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rdsproxy", "serve", "--config", self.config_path],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, **(env or {})})
        try:
            wait_for_port(self.port, timeout=20, proc=self.proc)
        except BaseException:
            self.stop()
            raise

    def secret_path(self, user) -> str:
        return os.path.join(self.directory, "secrets", f"{user}.json")

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
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
