"""User-space instructions the proxy spends per pgbench transaction, counted by callgrind.

Why: on this 2-core VM tps and CPU time move by 10% between runs of the same build, so a
change worth 2% cannot be seen in them. An instruction count can: the proxy runs under
`valgrind --tool=callgrind` (no PMU is needed) while pgbench sends it N transactions, then
2N; the difference of the two totals, divided by N, is the cost of one transaction with the
start-up and the idle timers taken out. It covers the proxy's own process only (Python, C
extensions, uvloop, libc), not the kernel, whose share is the larger one: this is a probe
for comparing builds (`--tree` of each), never a throughput figure.

The MySQL workloads do the same with sysbench (`--events`, one thread) through the MySQL
engine: M is oltp_point_select (one prepared statement per transaction), R oltp_read_only
(16 statements, range queries among them); their rows also give instructions per query.

    python3 -m bench.instructions [--tree DIR ...] [--workload C|S|E|P|M|R ...] [--pure]

needs valgrind (apt-get install -y valgrind); starts its own throwaway PostgreSQL (C, S, E,
P) or MariaDB (M, R; and sysbench).
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

from bench import mysql
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
# sysbench through the MySQL engine; one small table keeps the loading short.
SYSBENCH = {"M": "oltp_point_select", "R": "oltp_read_only"}
SYSBENCH_TABLE = {"tables": 1, "table_size": 10000}
USER, PASSWORD, DB = "bench", "bench-instructions", "bench"


def callgrind_total(path: Path) -> int:
    """The instruction total of a callgrind output file."""
    for line in path.read_text(errors="replace").splitlines():
        m = re.match(r"(?:summary|totals):\s+(\d+)", line)
        if m:
            return int(m.group(1))
    raise ValueError(f"no instruction total in {path}")


def under_callgrind(reaper: Reaper, tree: Path, pure: bool, confdir: Path,
                    config: Path) -> tuple[subprocess.Popen, Path]:
    """The proxy started under callgrind; the output file is named by its pid (valgrind
    runs the program in its own process), so a forked child could not be counted in."""
    proc = reaper.spawn(confdir.name, ["valgrind", "--tool=callgrind", "--trace-children=no",
                                       f"--callgrind-out-file={confdir / 'callgrind.out.%p'}",
                                       sys.executable, "-m", "rdsproxy", "serve", "--config",
                                       str(config)],
                        log_path=confdir / "proxy.log", env=tg.rdsproxy_env(pure, tree),
                        cwd=tree)
    return proc, confdir / f"callgrind.out.{proc.pid}"


def stop_and_total(proc: subprocess.Popen, out: Path) -> int:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    return callgrind_total(out)


def confdir_for(workdir: Path, tree: Path, pure: bool, workload: str, transactions: int) -> Path:
    """A fresh directory per run: two trees may share a name, a build repeats."""
    return Path(tempfile.mkdtemp(dir=workdir, prefix=f"{tree.name}-{'pure' if pure else 'c'}-"
                                                     f"{workload}-{transactions}-"))


def count(tree: Path, pure: bool, workload: str, transactions: int, creds, workdir: Path,
          reaper: Reaper, clients: int = 1) -> tuple[int, int]:
    """(instructions, queries) of one proxy run under pgbench, from start to exit, serving
    `transactions` (one query each)."""
    port = free_port()
    confdir = confdir_for(workdir, tree, pure, workload, transactions)
    # A health check costs far more than a transaction and the 2N run lasts longer: one
    # check a minute keeps them out of the difference.
    config = tg.write_rdsproxy_config(confdir, creds, port=port, max_connections_percent=10,
                                      health_check_interval=60)
    proc, out = under_callgrind(reaper, tree, pure, confdir, config)
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
    return stop_and_total(proc, out), transactions


def count_sysbench(tree: Path, pure: bool, workload: str, transactions: int, server_port: int,
                   workdir: Path, reaper: Reaper, clients: int = 1) -> tuple[int, int]:
    """(instructions, queries) of one proxy run under sysbench through the MySQL engine,
    from start to exit, serving `transactions` of SYSBENCH[workload]."""
    confdir = confdir_for(workdir, tree, pure, workload, transactions)
    config, port = mysql.write_config(confdir, server_port, health_check_interval=60)
    proc, out = under_callgrind(reaper, tree, pure, confdir, config)
    mysql.wait_ready(proc, port, confdir / "proxy.log", timeout=180)
    # --events counts over all threads; one thread keeps every step a ping-pong (see count).
    run = subprocess.run(mysql.sysbench_argv(SYSBENCH[workload], port, threads=clients,
                                             events=transactions, **SYSBENCH_TABLE),
                         capture_output=True, text=True, timeout=1800)
    got = mysql.parse_sysbench(run.stdout)
    if run.returncode != 0 or got["errors"] or got["transactions"] != transactions:
        raise RuntimeError(f"sysbench failed ({got['transactions']} of {transactions} "
                           f"transactions, {got['errors']} errors): {run.stdout.strip()[-400:]}")
    return stop_and_total(proc, out), got["queries"]


def start_postgres(scratch: Path, reaper: Reaper):
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
    return creds


def start_mariadb(scratch: Path, reaper: Reaper) -> int:
    from rdsproxy.devservers.mariadb import MariaDBServer
    server = MariaDBServer(max_connections=50, base_dir=str(scratch / "mariadb"))
    server.start()
    reaper.register("mariadb", server.stop)
    server.create_user(mysql.USER, mysql.PASSWORD)
    server.create_database(mysql.DB, owner=mysql.USER)
    prep = subprocess.run(mysql.sysbench_argv("oltp_read_only", server.port, action="prepare",
                                              **SYSBENCH_TABLE),
                          capture_output=True, text=True, timeout=600)
    if prep.returncode != 0:
        raise RuntimeError(f"sysbench prepare failed: {(prep.stdout + prep.stderr)[-1000:]}")
    return server.port


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", type=Path,
                    help="a source tree with its extensions built (default: this one)")
    ap.add_argument("--workload", action="append", choices=sorted([*WORKLOADS, *SYSBENCH]))
    ap.add_argument("--pure", action="store_true", help="RDSPROXY_PURE_PYTHON=1")
    ap.add_argument("--transactions", type=int, default=1000, help="N (the runs do N and 2N)")
    ap.add_argument("--clients", type=int, default=1,
                    help="pgbench clients or sysbench threads (default 1: the most "
                         "repeatable count)")
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
        creds = start_postgres(scratch, reaper) if set(workloads) & set(WORKLOADS) else None
        server_port = start_mariadb(scratch, reaper) if set(workloads) & set(SYSBENCH) else None
        for workload in workloads:
            for _ in range(args.repeat):
                for tree in trees:   # builds alternate, so a drift hits them alike
                    log(f"{tree} {workload}: {n} and {2 * n} transactions under callgrind ...")
                    if workload in SYSBENCH:
                        once, twice = (count_sysbench(tree, args.pure, workload, k, server_port,
                                                      scratch, reaper, args.clients)
                                       for k in (n, 2 * n))
                    else:
                        once, twice = (count(tree, args.pure, workload, k, creds, scratch,
                                             reaper, args.clients) for k in (n, 2 * n))
                    rows.append((workload, str(tree), (twice[0] - once[0]) / n,
                                 (twice[0] - once[0]) / (twice[1] - once[1])))
    finally:
        reaper.close()
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"| workload | tree{' (pure Python)' if args.pure else ''} | instructions per "
          "transaction | per query |")
    print("|---|---|---:|---:|")
    for workload, tree, per, per_query in rows:
        what = f"sysbench {SYSBENCH[workload]}" if workload in SYSBENCH \
            else f"pgbench {' '.join(WORKLOADS[workload])}"
        print(f"| `{what}` | {tree} | {per:,.0f} | {per_query:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
