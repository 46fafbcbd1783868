"""Process plumbing for the benchmark: spawning, stopping, ports, limits, memory.

Charter: every long-lived helper process (PgBouncer, rdsproxy) is started here in its own
session/process group, registered with a `Reaper`, and torn down by it (SIGTERM to the
group, then SIGKILL) no matter how the run ends. Also: free-port picking, RLIMIT_NOFILE
raising (children inherit it), and RSS measurement from /proc.
"""
from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterable


def log(msg: str) -> None:
    """Progress line on stderr, flushed (stdout is reserved for the final table)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (tiny race window, fine for a bench)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile(wanted: int = 1 << 20) -> int:
    """Raise the soft (and, as root, hard) fd limit; children inherit it. Returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, wanted)
    if hard != resource.RLIM_INFINITY and target > hard:
        try:  # root may lift the hard limit itself unless the container forbids it
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        except (ValueError, OSError):
            target = hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target


def proc_nofile(pid: int) -> int | None:
    """The soft 'Max open files' of a running process, from /proc/<pid>/limits."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                value = line.split()[3]
                return -1 if value == "unlimited" else int(value)
    except OSError:
        return None
    return None


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            out.extend(int(c) for c in text.split())
    except OSError:
        pass
    return out


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (a proxy may fork workers; count them all)."""
    seen, stack = [], [pid]
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.append(p)
        stack.extend(_children(p))
    return seen


def cpu_seconds(pids) -> float:
    """User + system CPU time consumed so far by these processes (from /proc/<pid>/stat)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / ticks


def rss_kib(pid: int) -> int:
    """VmRSS summed over the process tree rooted at pid, in KiB."""
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
    return total


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the child's process group, wait, then SIGKILL whatever is left."""
    if proc.poll() is not None:
        return
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class Reaper:
    """Owns the cleanup of everything the run started, in reverse order of start."""

    def __init__(self) -> None:
        self._undo: list[tuple[str, object]] = []

    def spawn(self, name: str, argv: list[str], *, log_path: Path, env: dict | None = None,
              cwd: str | os.PathLike | None = None) -> subprocess.Popen:
        logf = open(log_path, "ab")
        # Own session: a terminal Ctrl-C reaches only us, and we stop the group in order.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
        logf.close()
        self._undo.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        kill_group(proc)
        self._undo = [(n, p) for n, p in self._undo if p is not proc]

    def register(self, name: str, stop_callable) -> None:
        self._undo.append((name, stop_callable))

    def close(self) -> None:
        while self._undo:
            name, item = self._undo.pop()
            try:
                if isinstance(item, subprocess.Popen):
                    kill_group(item)
                else:
                    item()
            except Exception as exc:  # keep tearing down the rest
                log(f"cleanup of {name} failed: {exc}")


def run_checked(argv: Iterable[str], *, env: dict | None = None, timeout: float = 600,
                cwd=None) -> str:
    """Run a short command to completion; raise with its output on failure."""
    argv = list(argv)
    res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         env=env, timeout=timeout, cwd=cwd)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res.stdout


def server_conns_by_pid(server_port: int) -> dict[int, int]:
    """Established TCP connections to server_port per owning pid (via `ss -tnp`).

    Used to confirm that both poolers really hold the same number of server connections.
    Returns {} when ss is unavailable.
    """
    try:
        out = subprocess.run(["ss", "-tnpH", "state", "established",
                              f"( dport = :{server_port} )"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    counts: dict[int, int] = {}
    for line in out.splitlines():
        idx = line.find("pid=")
        if idx >= 0:
            pid = int(line[idx + 4:].split(",")[0])
            counts[pid] = counts.get(pid, 0) + 1
    return counts


class Sampler:
    """Calls `probe` every `interval` seconds in a thread while the `with` block runs and
    keeps what it returns in `samples` (a failing probe is skipped, not fatal)."""

    def __init__(self, probe, interval: float = 0.2) -> None:
        self.probe, self.interval, self.samples = probe, interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.samples.append(self.probe())
            except Exception:
                continue

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
