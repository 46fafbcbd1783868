"""pgbench workloads: definitions, one run against one target, parsing its results.

Charter: a workload is a named list of pgbench switches. `run_pgbench` executes it once
for a fixed duration (`-n -T`, no progress output), parses the summary (tps, latency
average, failed transactions, connection time) and computes p99 latency from the
per-transaction logs (`-l --log-prefix` in a scratch dir that is removed afterwards).

Notes on what the numbers mean (pgbench 15):
  * tps is "without initial connection time" for persistent-connection workloads and
    "including reconnection times" under -C (pgbench prints exactly one of the two).
  * latency average is pgbench's duration x clients / transactions, so under -C it
    includes connection setup.
  * p99 comes from the per-transaction log. Under -C a transaction's own connect is not
    in its logged latency, but pgbench connects synchronously inside each thread, so the
    latency does absorb the connects of the thread's other clients: read it as a
    connection-cost indicator, not as query latency.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.cluster import pg_tool

# name -> pgbench switches (besides -n -T, connection and logging switches)
WORKLOADS: dict[str, list[str]] = {
    "select_c10": ["-S", "-c", "10", "-j", "2"],
    "select_c100": ["-S", "-c", "100", "-j", "2"],
    "select_extended_c50": ["-S", "-M", "extended", "-c", "50", "-j", "2"],
    # Named statements (what drivers do by default); against the same -M extended runs.
    "select_prepared_c50": ["-S", "-M", "prepared", "-c", "50", "-j", "2"],
    "select_extended_c10": ["-S", "-M", "extended", "-c", "10", "-j", "2"],
    "select_prepared_c10": ["-S", "-M", "prepared", "-c", "10", "-j", "2"],
    # A SET in each transaction: what carrying settings instead of pinning costs.
    "select_set_c10": ["-f", str(Path(__file__).parent / "scripts" / "set_select.sql"),
                       "-c", "10", "-j", "2"],
    "tpcb_c20": ["-c", "20", "-j", "2"],
    "select_connect_c20": ["-S", "-C", "-c", "20", "-j", "2"],
}
WRITE_WORKLOADS = {"tpcb_c20"}

_TPS_RE = re.compile(r"^tps = ([0-9.]+) \((.*)\)", re.M)
_LAT_RE = re.compile(r"^latency average = ([0-9.]+) ms", re.M)
_FAILED_RE = re.compile(r"^number of failed transactions: (\d+)", re.M)
_PROCESSED_RE = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
_CONNTIME_RE = re.compile(r"^(?:average|initial) connection time = ([0-9.]+) ms", re.M)


@dataclass
class RunResult:
    tps: float | None
    tps_kind: str
    latency_avg_ms: float | None
    p99_ms: float | None
    failed: int
    processed: int
    connection_time_ms: float | None
    exit_code: int
    error: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def percentile(values: list[int], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); no numpy dependency."""
    if not values:
        return None
    values.sort()
    rank = max(1, math.ceil(q / 100.0 * len(values)))
    return float(values[rank - 1])


def read_latencies_us(log_dir: Path) -> list[int]:
    """Latency column (3rd field, microseconds) of every pgbench per-transaction log."""
    out: list[int] = []
    for path in log_dir.iterdir():
        with open(path, "rb") as f:
            for line in f:
                parts = line.split(b" ", 3)
                if len(parts) >= 3 and parts[2].isdigit():  # skips "failed"/"skipped"
                    out.append(int(parts[2]))
    return out


def parse_summary(stdout: str) -> dict:
    def first(rx, conv=float):
        m = rx.search(stdout)
        return conv(m.group(1)) if m else None
    m = _TPS_RE.search(stdout)
    return {
        "tps": float(m.group(1)) if m else None,
        "tps_kind": m.group(2) if m else "",
        "latency_avg_ms": first(_LAT_RE),
        "failed": first(_FAILED_RE, int) or 0,
        "processed": first(_PROCESSED_RE, int) or 0,
        "connection_time_ms": first(_CONNTIME_RE),
    }


def run_pgbench(workload: str, *, host: str, port: int, user: str, password: str,
                dbname: str, duration: int, sampling_rate: float = 1.0,
                scratch: Path | None = None) -> RunResult:
    log_dir = Path(tempfile.mkdtemp(prefix=f"pgbench-{workload}-", dir=scratch))
    argv = [pg_tool("pgbench"), "-n", "-T", str(duration), *WORKLOADS[workload],
            "-h", host, "-p", str(port), "-U", user,
            "-l", "--log-prefix", str(log_dir / "tx")]
    if sampling_rate < 1.0:
        argv += ["--sampling-rate", str(sampling_rate)]
    argv.append(dbname)
    env = dict(os.environ, PGPASSWORD=password, PGSSLMODE="disable", PGCONNECT_TIMEOUT="10")
    # Own session so a terminal Ctrl-C lands on us; we kill pgbench in `finally`.
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=log_dir,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=duration + 120)
        summary = parse_summary(stdout)
        latencies = read_latencies_us(log_dir)
        p99 = percentile(latencies, 99)
        error = ""
        if proc.returncode != 0 or summary["tps"] is None:
            # Keep the distinctive part of pgbench's complaint (first + last lines).
            lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
            error = " | ".join(lines[:2] + (["..."] + lines[-2:] if len(lines) > 4 else lines[2:]))
            error = f"exit {proc.returncode}: {error}"[:600]
        return RunResult(tps=summary["tps"], tps_kind=summary["tps_kind"],
                         latency_avg_ms=summary["latency_avg_ms"],
                         p99_ms=p99 / 1000.0 if p99 is not None else None,
                         failed=summary["failed"], processed=summary["processed"],
                         connection_time_ms=summary["connection_time_ms"],
                         exit_code=proc.returncode, error=error)
    except subprocess.TimeoutExpired:
        return RunResult(None, "", None, None, 0, 0, None, -1,
                         error=f"pgbench did not finish within {duration + 120}s")
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        shutil.rmtree(log_dir, ignore_errors=True)


def init_data(*, host: str, port: int, user: str, password: str, dbname: str,
              scale: int) -> None:
    """pgbench -i with server-side data generation (G): much faster than client-side."""
    env = dict(os.environ, PGPASSWORD=password, PGSSLMODE="disable")
    res = subprocess.run([pg_tool("pgbench"), "-i", "-s", str(scale), "-I", "dtGvp", "-q",
                          "-h", host, "-p", str(port), "-U", user, dbname],
                         capture_output=True, text=True, env=env, timeout=1800,
                         stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise RuntimeError(f"pgbench -i failed:\n{res.stdout}\n{res.stderr}")
