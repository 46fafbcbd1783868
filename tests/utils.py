"""Small helpers shared by the test suite (no pytest plugins needed): waiting, running
commands and coroutines, fast-path twins, and raw wire clients of both engines.

The suite does not depend on pytest-asyncio: async code runs through `run(coro)` from
plain sync tests, one fresh event loop per call.
"""
from __future__ import annotations

import asyncio
import importlib
import os
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pytest

from rdsproxy.devservers.base import free_port
from rdsproxy.engines.mysql import protocol as p
from rdsproxy.engines.mysql.server_login import ServerLogin

__all__ = [
    "concurrently",
    "drive_login",
    "free_port",
    "libpq_dsn",
    "log_in",
    "message_fields",
    "port_is_open",
    "recv_message",
    "run",
    "run_cmd",
    "twins",
    "built",
    "pick",
    "wait_for_port",
    "wait_until",
]

T = TypeVar("T")

REQUIRE_CYTHON = os.environ.get("RDSPROXY_REQUIRE_CYTHON", "") not in ("", "0")


def twins(name: str) -> dict:
    """{"py": rdsproxy._fastpath.<name>_py, "c": <name>_c, or None where it is not built}.
    With RDSPROXY_REQUIRE_CYTHON=1 a compiled twin that is not built fails the module's
    collection, and so the run."""
    modules = {"py": importlib.import_module(f"rdsproxy._fastpath.{name}_py"), "c": None}
    try:
        modules["c"] = importlib.import_module(f"rdsproxy._fastpath.{name}_c")
    except ImportError:
        if REQUIRE_CYTHON:
            raise
    return modules


def built(modules: dict) -> dict:
    """The twins of `modules` that exist here, by name."""
    return {impl: module for impl, module in modules.items() if module is not None}


def pick(modules: dict, impl: str):
    """Twin `impl` of `modules` for a test, which is skipped where that twin is not built."""
    module = modules[impl]
    if module is None:
        pytest.skip("Cython twin not built")
    return module


def run(coro: Awaitable[T], *, timeout: float | None = 60) -> T:
    """Run a coroutine to completion on a fresh event loop, with an overall timeout so a
    hung proxy fails the test instead of the whole suite."""
    async def _guarded() -> T:
        if timeout is None:
            return await coro
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(_guarded())


def port_is_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 15.0,
                  proc: subprocess.Popen | None = None) -> None:
    """Block until host:port accepts TCP connections. If `proc` is given and exits first,
    fail at once with its output instead of waiting out the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_is_open(port, host):
            return
        if proc is not None and proc.poll() is not None:
            out = ""
            if proc.stdout is not None:
                out = proc.stdout.read() or ""
                if isinstance(out, bytes):
                    out = out.decode(errors="replace")
            raise RuntimeError(f"process exited with {proc.returncode} before "
                               f"{host}:{port} opened:\n{out[-4000:]}")
        time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} did not open within {timeout}s")


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0,
               interval: float = 0.05, message: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{message} not met within {timeout}s")
        time.sleep(interval)


def run_cmd(argv: Sequence[str], *, timeout: float = 60, check: bool = True,
            env: dict[str, str] | None = None, input: str | None = None,
            cwd: str | None = None) -> subprocess.CompletedProcess:
    """subprocess.run with a timeout and captured text output; on failure the raised
    error's message includes stdout and stderr (CalledProcessError's does not)."""
    full_env = None if env is None else {**os.environ, **env}
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          env=full_env, input=input, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(map(str, argv))}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


def recv_message(sock) -> tuple[bytes, bytes]:
    """One PostgreSQL message from a raw socket: (type byte, payload)."""
    head = b""
    while len(head) < 5:
        chunk = sock.recv(5 - len(head))
        if not chunk:
            raise ConnectionError("closed")
        head += chunk
    (length,) = struct.unpack("!i", head[1:5])
    body = b""
    while len(body) < length - 4:
        chunk = sock.recv(length - 4 - len(body))
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
    return head[:1], body


def message_fields(body: bytes) -> dict[str, str]:
    """An ErrorResponse's or NoticeResponse's fields by their one-letter codes."""
    return {f[:1].decode(): f[1:].decode() for f in body.split(b"\x00") if f}


def libpq_dsn(host, port, user, password, dbname, **extra) -> str:
    """A libpq keyword DSN for a test client: no TLS, a connect timeout."""
    parts = [f"host={host}", f"port={port}", f"user={user}", f"dbname={dbname}",
             "sslmode=disable", "connect_timeout=10"]
    if password is not None:
        parts.append(f"password={password}")
    parts += [f"{k}='{v}'" for k, v in extra.items()]
    return " ".join(parts)


def md5_session(host, port, user, password, database, backend_key: list | None = None):
    """A raw socket logged in through an md5 exchange, past its first ReadyForQuery: for
    protocol messages no driver sends (FunctionCall, say). `backend_key`, if given, gets
    the (pid, secret) of BackendKeyData appended."""
    from rdsproxy.auth.md5 import md5_response
    sock = socket.create_connection((host, port), timeout=10)
    body = (struct.pack("!i", 196608) + b"user\0" + user.encode() + b"\0database\0"
            + database.encode() + b"\0\0")
    sock.sendall(struct.pack("!i", len(body) + 4) + body)
    mtype, payload = recv_message(sock)
    assert mtype == b"R" and struct.unpack("!i", payload[:4])[0] == 5, (mtype, payload)
    answer = md5_response(password, user, payload[4:8]) + b"\0"
    sock.sendall(b"p" + struct.pack("!i", len(answer) + 4) + answer)
    while mtype != b"Z":
        mtype, payload = recv_message(sock)
        assert mtype != b"E", message_fields(payload)
        if mtype == b"K" and backend_key is not None:
            backend_key.append(struct.unpack("!iI", payload[:8]))
    return sock


def function_call(sock, oid: int, *args: str) -> list[tuple[bytes, bytes]]:
    """Send a FunctionCall of `oid` with text arguments; the messages up to ReadyForQuery."""
    body = struct.pack("!ihh", oid, 1, 0)   # one format code: text for every argument
    body += struct.pack("!h", len(args))
    for arg in args:
        data = arg.encode()
        body += struct.pack("!i", len(data)) + data
    body += struct.pack("!h", 0)            # result in text
    sock.sendall(b"F" + struct.pack("!i", len(body) + 4) + body)
    messages = []
    while True:
        mtype, payload = recv_message(sock)
        messages.append((mtype, payload))
        if mtype == b"Z":
            return messages


def concurrently(fn, args, timeout: float = 60) -> dict:
    """fn(arg) for every arg, each in a thread of its own, all at once: {arg: result}.
    The first exception a call raised is raised here, once all have ended."""
    import threading
    results, errors = {}, []

    def call(arg):
        try:
            results[arg] = fn(arg)
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(arg,)) for arg in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if errors:
        raise errors[0]
    return results


# --- MySQL: a blocking client driving the sans-IO login and response tracker -----------------

def drive_login(sock, login, first: bytes = b"", tls_context: ssl.SSLContext | None = None):
    """Run a sans-IO login machine (rdsproxy.core.login.LoginMachine) over `sock` until it
    is done, starting TLS when it asks; the socket to go on with (the TLS one, then)."""
    try:
        if first:
            sock.sendall(first)
        while not login.done:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection during login")
            out = login.receive_data(data)
            if out:
                sock.sendall(out)
            if login.need_tls:
                sock = tls_context.wrap_socket(sock, server_hostname="127.0.0.1")
                sock.sendall(login.tls_started())
    except BaseException:
        sock.close()
        raise
    return sock


def log_in(port: int, user: str, password: str, database: str | None = None, *,
           tls_context: ssl.SSLContext | None = None, **options) -> "Session":
    """Open a TCP connection and run MySQL's ServerLogin over it (TLS when a context is
    given)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    if tls_context is not None:
        options.setdefault("tls", "require")
    login = ServerLogin(user, password, database, **options)
    return Session(drive_login(sock, login, tls_context=tls_context), login)


class Session:
    """A logged-in connection: send commands, track responses with ResponseTracker."""

    def __init__(self, sock, login: ServerLogin):
        self.sock = sock
        self.login = login
        self.result = login.result
        self.caps = login.result.capabilities
        self.status = login.result.status_flags
        self.reader = p.PacketReader(max_payload=256 << 20)
        self.pending: list[tuple[int, bytes]] = []

    def recv_packet(self) -> tuple[int, bytes]:
        while not self.pending:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("server closed the connection")
            self.pending += self.reader.feed(data)
        return self.pending.pop(0)

    def command(self, payload: bytes, infile: bytes | None = None):
        """Send one command; return (tracker, server payloads). With `infile`, answer a
        LOCAL INFILE request with that data."""
        self.sock.sendall(p.packet(0, payload))
        tracker = p.ResponseTracker(payload, self.caps, status_flags=self.status)
        packets = []
        seq = p.seq_after(0, len(payload))
        while not tracker.done:
            if tracker.awaiting_client:
                assert infile is not None, "server asked for a file"
                data = p.packet(seq, infile) + p.packet(seq + 1, b"")
                tracker.feed_client(infile)
                tracker.feed_client(b"")
                self.sock.sendall(data)
                seq += 2
                continue
            s, payload_in = self.recv_packet()
            assert s == seq & 0xFF, (s, seq)
            seq = p.seq_after(s, len(payload_in))
            packets.append(payload_in)
            tracker.feed(payload_in)
        self.status = tracker.status_flags
        return tracker, packets

    def query(self, sql: str, **kw):
        return self.command(p.com_query(sql), **kw)

    def rows(self, sql: str) -> list[list[bytes | None]]:
        """Text-protocol rows of a single-result query."""
        tracker, packets = self.query(sql)
        assert tracker.error is None, tracker.error
        ncols, _ = p.read_lenenc_int(packets[0])
        start = 1 + ncols + (0 if self.caps & p.CLIENT_DEPRECATE_EOF else 1)
        return [p.parse_text_row(row, ncols) for row in packets[start:-1]]

    def scalar(self, sql: str) -> bytes | None:
        return self.rows(sql)[0][0]

    def close(self) -> None:
        try:
            self.sock.sendall(p.packet(0, p.com_quit()))
        except OSError:
            pass
        self.sock.close()
