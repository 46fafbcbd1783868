"""User-space instructions the proxy spends per pgbench transaction, counted by callgrind.

Why: on this 2-core VM tps and CPU time move by 10% between runs of the same build, so a
change worth 2% cannot be seen in them. An instruction count can: the proxy runs under
`valgrind --tool=callgrind` (no PMU is needed) while pgbench sends it N transactions, then
2N; the difference of the two totals, divided by N, is the cost of one transaction with the
start-up and the idle timers taken out. It covers the proxy's own process only (Python, C
extensions, uvloop, libc), not the kernel, whose share is the larger one: this is a probe
for comparing builds (`--tree` of each), never a throughput figure.

    python3 -m bench.instructions [--tree DIR ...] [--workload C|S|E|P ...] [--pure]

needs valgrind (apt-get install -y valgrind); starts its own throwaway PostgreSQL.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import pgbench as pgb
from bench import targets as tg
from bench.cluster import make_cluster, pg_tool
from bench.procs import Reaper, free_port, log

WORKLOADS = {
    "C": ["-S", "-C"],   # a new client connection per transaction (login, query, close)
    "S": ["-S"],         # one SELECT per transaction on open connections
    "E": ["-S", "-M", "extended"],   # the same over the extended protocol, unnamed
    "P": ["-S", "-M", "prepared"],   # ... and a named statement (the proxy renames it)
}
USER, PASSWORD, DB = "bench", "bench-instructions", "bench"


def callgrind_total(path: Path) -> int:
    """The instruction total of a callgrind output file."""
    for line in path.read_text(errors="replace").splitlines():
        m = re.match(r"(?:summary|totals):\s+(\d+)", line)
        if m:
            return int(m.group(1))
    raise ValueError(f"no instruction total in {path}")


def count(tree: Path, pure: bool, workload: str, transactions: int, creds, workdir: Path,
          reaper: Reaper, clients: int = 1) -> int:
    """Instructions of one proxy run, from start to exit, serving `transactions`."""
    port = free_port()
    confdir = workdir / f"{tree.name}-{'pure' if pure else 'c'}-{workload}-{transactions}"
    # A health check costs far more than a transaction and the 2N run lasts longer: one
    # check a minute keeps them out of the difference.
    config = tg.write_rdsproxy_config(confdir, creds, port=port, max_connections_percent=10,
                                      health_check_interval=60)
    out = confdir / "callgrind.out"
    proc = reaper.spawn(confdir.name, ["valgrind", "--tool=callgrind",
                                       f"--callgrind-out-file={out}", sys.executable, "-m",
                                       "rdsproxy", "serve", "--config", str(config)],
                        log_path=confdir / "proxy.log", env=tg.rdsproxy_env(pure, tree),
                        cwd=tree)
    target = tg.Target(confdir.name, "127.0.0.1", port, proc)
    tg._wait_ready(target, creds, confdir / "proxy.log", timeout=180)
    env = dict(os.environ, PGPASSWORD=creds.password, PGSSLMODE="disable")
    # pgbench's -t counts per client. One client makes every step a ping-pong, so the
    # proxy wakes the same number of times in each run; with more, how many events share
    # a wakeup follows the timing (valgrind's above all), and the count moves by 5%.
    run = subprocess.run([pg_tool("pgbench"), "-n", *WORKLOADS[workload], "-c", str(clients),
                          "-j", "1", "-t", str(transactions // clients), "-h", "127.0.0.1",
                          "-p", str(port),
                          "-U", creds.user, creds.dbname],
                         capture_output=True, text=True, env=env, timeout=1800)
    if run.returncode != 0:
        raise RuntimeError(f"pgbench failed: {run.stderr.strip()[-400:]}")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    return callgrind_total(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", type=Path,
                    help="a source tree with its extensions built (default: this one)")
    ap.add_argument("--workload", action="append", choices=sorted(WORKLOADS))
    ap.add_argument("--pure", action="store_true", help="RDSPROXY_PURE_PYTHON=1")
    ap.add_argument("--transactions", type=int, default=1000, help="N (the runs do N and 2N)")
    ap.add_argument("--clients", type=int, default=1,
                    help="pgbench clients (default 1: the most repeatable count)")
    ap.add_argument("--repeat", type=int, default=1, help="measure each build this many times")
    args = ap.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install -y valgrind)", file=sys.stderr)
        return 2
    trees = [t.resolve() for t in (args.tree or [tg.REPO_ROOT])]
    workloads = args.workload or ["C", "S"]
    n = args.transactions
    scratch = Path(tempfile.mkdtemp(prefix="rdsproxy-instructions-"))
    os.chmod(scratch, 0o755)
    reaper = Reaper()
    rows = []
    try:
        cluster = make_cluster(port=None, auth="md5", max_connections=50,
                               settings={"password_encryption": "md5"},
                               base_dir=str(scratch / "pg"))
        reaper.register("postgres", cluster.stop)
        cluster.start()
        cluster.create_user(USER, PASSWORD)
        cluster.create_database(DB, owner=USER)
        creds = tg.Credentials(USER, PASSWORD, DB, cluster.host, int(cluster.port))
        pgb.init_data(host=creds.server_host, port=creds.server_port, user=USER,
                      password=PASSWORD, dbname=DB, scale=1)
        for workload in workloads:
            for _ in range(args.repeat):
                for tree in trees:   # builds alternate, so a drift hits them alike
                    log(f"{tree} {workload}: {n} and {2 * n} transactions under callgrind ...")
                    once = count(tree, args.pure, workload, n, creds, scratch, reaper,
                                 args.clients)
                    twice = count(tree, args.pure, workload, 2 * n, creds, scratch, reaper,
                                  args.clients)
                    rows.append((workload, str(tree), (twice - once) / n))
    finally:
        reaper.close()
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"| workload | tree{' (pure Python)' if args.pure else ''} | instructions per transaction |")
    print("|---|---|---:|")
    for workload, tree, per in rows:
        print(f"| `pgbench {' '.join(WORKLOADS[workload])}` | {tree} | {per:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
