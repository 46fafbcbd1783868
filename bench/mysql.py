"""sysbench through rdsproxy's MySQL engine vs straight at MariaDB.

    python3 -m bench.mysql                         # 3 rounds x 10 s, 8 threads, both workloads
    python3 -m bench.mysql --quick                 # 2 rounds x 5 s
    python3 -m bench.mysql --targets direct,rdsproxy-cython --threads 16 --duration 20

Starts a throwaway MariaDB (rdsproxy.devservers.mariadb, max_connections=200), loads
sysbench's tables, then starts rdsproxy twice from a frozen, Cython-built copy of the source
(bench.build.prepare, as the PostgreSQL bench does): `rdsproxy-cython` and `rdsproxy-pure`
(RDSPROXY_PURE_PYTHON=1), both with max_connections_percent=10 -> a pool of 20. The
workloads (oltp_point_select, oltp_read_only; sysbench uses binary prepared statements,
so this also measures the statement-id mapping) run on every target in interleaved rounds,
the target order rotated each round. Reported per workload and target: median tps, median
p95 latency, ratio to direct, and the proxy's CPU per transaction (user + system, from
/proc; on a shared machine it moves less between runs than tps does). Output: bench/results/mysql-latest.{json,md} (--output-dir).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import build
from bench.procs import Reaper, cpu_seconds, free_port, log, process_tree, tail
from bench.targets import REPO_ROOT, rdsproxy_env

WORKLOADS = ("oltp_point_select", "oltp_read_only")
TARGETS = ("direct", "rdsproxy-cython", "rdsproxy-pure")
USER, PASSWORD, DB = "sbtest", "sb-secret", "sbtest"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python3 -m bench.mysql", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds of 5 s")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--tables", type=int, default=4)
    ap.add_argument("--table-size", type=int, default=10000)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    ap.add_argument("--no-build", action="store_true", help="run the source tree as it is")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.duration = 2, 5.0
    return args


def sysbench(workload: str, port: int, args, action: str = "run", threads: int | None = None,
             duration: float | None = None) -> subprocess.CompletedProcess:
    argv = ["sysbench", workload, "--db-driver=mysql", "--mysql-host=127.0.0.1",
            f"--mysql-port={port}", f"--mysql-user={USER}", f"--mysql-password={PASSWORD}",
            f"--mysql-db={DB}", f"--tables={args.tables}", f"--table-size={args.table_size}",
            "--mysql-ssl=off"]
    if action == "run":
        argv += [f"--threads={threads or args.threads}", f"--time={int(duration or args.duration)}",
                 "--percentile=95"]
    argv.append(action)
    return subprocess.run(argv, capture_output=True, text=True,
                          timeout=(duration or args.duration) + 120)


def parse_sysbench(out: str) -> dict:
    tps = re.search(r"transactions:\s+(\d+)\s+\(([\d.]+) per sec", out)
    p95 = re.search(r"95th percentile:\s+([\d.]+)", out)
    errors = re.search(r"ignored errors:\s+(\d+)", out)
    return {"transactions": int(tps.group(1)) if tps else 0,
            "tps": float(tps.group(2)) if tps else 0.0,
            "p95_ms": float(p95.group(1)) if p95 else None,
            "errors": int(errors.group(1)) if errors else None}


def write_config(confdir: Path, server_port: int) -> tuple[Path, int]:
    confdir.mkdir(parents=True, exist_ok=True)
    (confdir / "secret.json").write_text(json.dumps({"username": USER, "password": PASSWORD}))
    port = free_port()
    path = confdir / "proxy.toml"
    path.write_text(f"""\
name = "bench-mysql"
engine_family = "MYSQL"
idle_client_timeout = 0

[[auth]]
secret = "file:secret.json"
client_password_auth_type = "MYSQL_NATIVE_PASSWORD"

[target_group]
max_connections_percent = 10
max_idle_connections_percent = 10
connection_borrow_timeout = 120

[[targets]]
host = "127.0.0.1"
port = {server_port}

[[endpoints]]
name = "default"
listen = "127.0.0.1:{port}"
""")
    return path, port


def start_proxy(reaper: Reaper, workdir: Path, name: str, tree: Path, server_port: int) -> dict:
    pure = name.endswith("pure")
    confdir = workdir / name
    config, port = write_config(confdir, server_port)
    impl, where = build.implementation(tree, pure)
    log_path = confdir / "rdsproxy.log"
    proc = reaper.spawn(name, [sys.executable, "-m", "rdsproxy", "serve", "--config", str(config)],
                        log_path=log_path, env=rdsproxy_env(pure, tree), cwd=tree)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited: {tail(log_path)}")
        check = subprocess.run(["mariadb", "--no-defaults", "-h", "127.0.0.1", "-P", str(port),
                                "-u", USER, f"-p{PASSWORD}", DB, "-e", "SELECT 1"],
                               capture_output=True, text=True, timeout=10)
        if check.returncode == 0:
            return {"name": name, "port": port, "proc": proc, "implementation": impl}
        time.sleep(0.3)
    raise RuntimeError(f"{name} not ready: {tail(log_path)}")


def markdown(results: dict) -> str:
    lines = [f"# rdsproxy MySQL bench ({results['started']})", "",
             f"MariaDB {results['server_version']}, {results['sysbench']}, "
             f"{results['threads']} threads, {results['rounds']} rounds x {results['duration']:g} s "
             f"(interleaved), pool of 20 (max_connections_percent=10 of 200). Median of rounds.", "",
             "| workload | target | tps | p95 ms | tps vs direct | proxy CPU µs/txn |",
             "|---|---|---:|---:|---:|---:|"]
    for workload, per_target in results["summary"].items():
        direct = per_target.get("direct", {}).get("tps")
        for target, s in per_target.items():
            ratio = f"{s['tps'] / direct:.2f}" if direct else "-"
            cpu = f"{1000 * s['cpu_per_1000_tx']:.0f}" if s.get("cpu_per_1000_tx") is not None else "-"
            p95 = f"{s['p95_ms']:.2f}" if s.get("p95_ms") is not None else "-"
            lines.append(f"| {workload} | {target} | {s['tps']:.0f} | {p95} | {ratio} | {cpu} |")
    lines += ["", f"Implementations: {results['implementations']}", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from rdsproxy.devservers.mariadb import MariaDBServer

    workloads = [w for w in args.workloads.split(",") if w]
    targets = [t for t in args.targets.split(",") if t]
    reaper = Reaper()
    workdir = Path(tempfile.mkdtemp(prefix="rdsproxy-bench-mysql-"))
    server = MariaDBServer(max_connections=200, settings={"innodb_buffer_pool_size": "128M"})
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": args.threads,
               "rounds": args.rounds, "duration": args.duration, "runs": [],
               "implementations": {}}
    try:
        server.start()
        reaper.register("mariadb", server.stop)
        server.create_user(USER, PASSWORD)
        server.create_database(DB, owner=USER)
        results["server_version"] = server.variable("version")
        results["sysbench"] = subprocess.run(["sysbench", "--version"], capture_output=True,
                                             text=True).stdout.strip()
        log("loading sysbench tables ...")
        prep = sysbench("oltp_read_only", server.port, args, action="prepare")
        if prep.returncode != 0:
            raise RuntimeError(f"sysbench prepare failed: {prep.stderr[-2000:]}")
        tree = REPO_ROOT if args.no_build else build.prepare(REPO_ROOT)["tree"]
        live = {}
        for name in targets:
            if name == "direct":
                live[name] = {"name": name, "port": server.port, "proc": None,
                              "implementation": "-"}
            else:
                live[name] = start_proxy(reaper, workdir, name, Path(tree), server.port)
            results["implementations"][name] = live[name]["implementation"]
        for rnd in range(args.rounds):
            order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
            for workload in workloads:
                for name in order:
                    t = live[name]
                    pids = process_tree(t["proc"].pid) if t["proc"] else []
                    cpu0 = cpu_seconds(pids)
                    res = sysbench(workload, t["port"], args)
                    cpu = cpu_seconds(pids) - cpu0 if pids else None
                    run = {"round": rnd, "workload": workload, "target": name,
                           **parse_sysbench(res.stdout), "proxy_cpu_s": cpu,
                           "exit": res.returncode}
                    if res.returncode != 0:
                        run["stderr"] = res.stderr[-1000:]
                    results["runs"].append(run)
                    log(f"round {rnd} {workload:18} {name:16} {run['tps']:9.0f} tps "
                        f"p95 {run['p95_ms']} ms")
        summary: dict = {}
        for workload in workloads:
            summary[workload] = {}
            for name in targets:
                runs = [r for r in results["runs"] if r["workload"] == workload and r["target"] == name]
                if not runs:
                    continue
                tx = sum(r["transactions"] for r in runs)
                cpu = [r["proxy_cpu_s"] for r in runs if r["proxy_cpu_s"] is not None]
                summary[workload][name] = {
                    "tps": statistics.median(r["tps"] for r in runs),
                    "p95_ms": statistics.median(r["p95_ms"] for r in runs if r["p95_ms"] is not None)
                    if any(r["p95_ms"] is not None for r in runs) else None,
                    "errors": sum(r["errors"] or 0 for r in runs),
                    "cpu_per_1000_tx": (1000 * sum(cpu) / tx) if cpu and tx else None,
                }
        results["summary"] = summary
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "mysql-latest.json").write_text(json.dumps(results, indent=2))
        md = markdown(results)
        (args.output_dir / "mysql-latest.md").write_text(md)
        print(md)
        return 0
    finally:
        reaper.close()


if __name__ == "__main__":
    sys.exit(main())
