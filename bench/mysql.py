"""sysbench through rdsproxy's MySQL engine vs straight at MariaDB.

    python3 -m bench.mysql                         # 3 rounds x 10 s, 8 threads, all workloads
    python3 -m bench.mysql --quick                 # 3 rounds x 3 s (what ci/bench_gate.sh runs)
    python3 -m bench.mysql --targets direct,rdsproxy-cython --threads 16 --duration 20
    python3 -m bench.mysql --workloads oltp_point_select --targets direct,haproxy,rdsproxy-cython

Starts a throwaway MariaDB (rdsproxy.devservers.mariadb, max_connections=200), loads
sysbench's tables, then starts rdsproxy twice from a frozen, Cython-built copy of the source
(bench.build.prepare, as the PostgreSQL bench does): `rdsproxy-cython` and `rdsproxy-pure`
(RDSPROXY_PURE_PYTHON=1), both with max_connections_percent=10 -> a pool of 20, and HAProxy
in TCP mode with one thread (`haproxy`): a C relay that passes the bytes on and pools
nothing, each client on its own server connection, so its CPU per query is what putting any
single-threaded relay in the path costs on this machine (the kernel's share above all). The
workloads (oltp_point_select, oltp_read_only, oltp_read_write; sysbench uses binary
prepared statements, so this also measures the statement-id mapping) run on every target in
interleaved rounds, the target order rotated each round. Reported per workload and target:
median tps, median p95 latency, ratio to direct, the proxy's CPU per transaction and per
query (user + system, from /proc; on a shared machine it moves less between runs than tps
does) and that CPU as a multiple of HAProxy's, sysbench's errors (ignored errors,
reconnects, fatal ones: any of them fails the run), and the server connections held during the run (sampled with `ss`: the proxy's for a
proxy, sysbench's own when direct; max and median), so multiplexing is visible. The fast
path each proxy really runs is read from its own /stats. Output:
bench/results/mysql-latest.{json,md} (--output-dir), shaped as bench.gate reads it.
Exit status 1 when a round had errors or a proxy did not start (HAProxy missing is
reported and skipped: it is a yardstick, not the thing measured).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench import build
from bench.procs import (Reaper, Sampler, cpu_seconds, free_port, log, process_tree,
                         server_conns_by_pid, tail)
from bench.report import _median
from bench.targets import REPO_ROOT, rdsproxy_env

WORKLOADS = ("oltp_point_select", "oltp_read_only", "oltp_read_write")
TARGETS = ("direct", "haproxy", "rdsproxy-cython", "rdsproxy-pure")
USER, PASSWORD, DB = "sbtest", "sb-secret", "sbtest"
POOL_PERCENT, SERVER_MAX_CONNECTIONS = 10, 200


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python3 -m bench.mysql", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="3 rounds of 3 s: a median of three outvotes one round that another "
                         "process on the machine slowed down")
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
        args.rounds, args.duration = 3, 3.0
    return args


def sysbench_argv(workload: str, port: int, *, tables: int, table_size: int,
                  action: str = "run", threads: int = 1, duration: float | None = None,
                  events: int | None = None) -> list[str]:
    """sysbench's command line: a timed run (`duration`) or a fixed count (`events`)."""
    argv = ["sysbench", workload, "--db-driver=mysql", "--mysql-host=127.0.0.1",
            f"--mysql-port={port}", f"--mysql-user={USER}", f"--mysql-password={PASSWORD}",
            f"--mysql-db={DB}", f"--tables={tables}", f"--table-size={table_size}",
            "--mysql-ssl=off"]
    if action == "run":
        # sysbench's default distribution sends most statements to 1% of the rows: under
        # oltp_read_write those hot rows deadlock now and then even straight at MariaDB.
        argv += [f"--threads={threads}", "--percentile=95", "--rand-type=uniform"]
        argv += [f"--events={events}", "--time=0"] if events else [f"--time={int(duration)}"]
    return argv + [action]


_FATAL_CODE = re.compile(r"^FATAL: .*?(?:MySQL error: |returned error )(\d+)", re.M)


def parse_sysbench(out: str) -> dict:
    """The figures of a sysbench run's report. `errors` adds up everything that went wrong:
    errors sysbench ignored and retried (deadlocks and the like), reconnects, and the MySQL
    errors of FATAL lines (which stop a thread; sysbench then exits non-zero)."""
    def number(pattern, cast=int):
        m = re.search(pattern, out)
        return cast(m.group(1)) if m else None

    tps = re.search(r"transactions:\s+(\d+)\s+\(([\d.]+) per sec", out)
    fatal = [line for line in out.splitlines() if line.startswith("FATAL:")]
    ignored = number(r"ignored errors:\s+(\d+)") or 0
    reconnects = number(r"reconnects:\s+(\d+)") or 0
    fatal_codes = _FATAL_CODE.findall(out)
    return {"transactions": int(tps.group(1)) if tps else 0,
            "tps": float(tps.group(2)) if tps else None,
            "queries": number(r"\n\s+queries:\s+(\d+)") or 0,
            "p95_ms": number(r"95th percentile:\s+([\d.]+)", float),
            "latency_avg_ms": number(r"\bavg:\s+([\d.]+)", float),
            "ignored_errors": ignored, "reconnects": reconnects,
            "fatal_errors": [int(c) for c in fatal_codes],
            "fatal": fatal[:3],
            "errors": ignored + reconnects + len(fatal_codes)}


def write_config(confdir: Path, server_port: int, *, health_check_interval: float = 1.0,
                 admin_port: int = 0) -> tuple[Path, int]:
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
max_connections_percent = {POOL_PERCENT}
max_idle_connections_percent = {POOL_PERCENT}
connection_borrow_timeout = 120
health_check_interval = {health_check_interval}

[[targets]]
host = "127.0.0.1"
port = {server_port}

[[endpoints]]
name = "default"
listen = "127.0.0.1:{port}"
""" + (f"""
[admin]
listen = "127.0.0.1:{admin_port}"
""" if admin_port else ""))
    return path, port


def wait_ready(proc: subprocess.Popen, port: int, log_path: Path, timeout: float = 30) -> None:
    """Until a real login and SELECT 1 through the proxy works (the mariadb client)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode}: {tail(log_path)}")
        check = subprocess.run(["mariadb", "--no-defaults", "-h", "127.0.0.1", "-P", str(port),
                                "-u", USER, f"-p{PASSWORD}", DB, "-e", "SELECT 1"],
                               capture_output=True, text=True, timeout=30)
        if check.returncode == 0:
            return
        time.sleep(0.3)
    raise RuntimeError(f"not ready after {timeout:.0f}s: {tail(log_path)}")


def proxy_stats(admin_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats", timeout=10) as reply:
        return json.loads(reply.read())


def start_proxy(reaper: Reaper, workdir: Path, name: str, tree: Path, server_port: int) -> dict:
    pure = name.endswith("pure")
    confdir = workdir / name
    admin_port = free_port()
    config, port = write_config(confdir, server_port, admin_port=admin_port)
    log_path = confdir / "rdsproxy.log"
    proc = reaper.spawn(name, [sys.executable, "-m", "rdsproxy", "serve", "--config", str(config)],
                        log_path=log_path, env=rdsproxy_env(pure, tree), cwd=tree)
    wait_ready(proc, port, log_path)
    # What the serving process itself imported, not what a sibling process would.
    return {"name": name, "port": port, "proc": proc, "admin_port": admin_port,
            "implementation": proxy_stats(admin_port).get("fastpath")}


class ReferenceUnavailable(RuntimeError):
    """The reference relay is not installed; the run goes on without it."""


def start_haproxy(reaper: Reaper, workdir: Path, server_port: int) -> dict:
    """HAProxy as a plain TCP relay to the server: one thread, no pooling."""
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(binary).exists():
        raise ReferenceUnavailable("haproxy not found (apt-get install -y haproxy)")
    confdir = workdir / "haproxy"
    confdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = confdir / "haproxy.cfg"
    config.write_text(f"""\
global
    nbthread 1
    maxconn 4096

defaults
    mode tcp
    timeout connect 10s
    timeout client 300s
    timeout server 300s

listen mariadb
    bind 127.0.0.1:{port}
    server target 127.0.0.1:{server_port}
""")
    log_path = confdir / "haproxy.log"
    # -db: stay in the foreground, so the reaper's process is the one doing the work.
    proc = reaper.spawn("haproxy", [binary, "-db", "-f", str(config)], log_path=log_path)
    wait_ready(proc, port, log_path)
    version = subprocess.run([binary, "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    return {"name": "haproxy", "port": port, "proc": proc,
            "implementation": " ".join(version.split()[:3])}


def pins(target: dict) -> int | None:
    """Sessions pinned so far, by the proxy's /stats (None: direct, or no answer)."""
    if not target.get("admin_port"):
        return None
    try:
        return sum(proxy_stats(target["admin_port"]).get("SessionPinReasons", {}).values())
    except (OSError, ValueError):
        return None


def run_once(workload: str, target: dict, server_port: int, args) -> dict:
    """One timed sysbench run at one target, with the proxy's CPU and the server
    connections held (sampled every 0.2 s) over it."""
    pids = process_tree(target["proc"].pid) if target["proc"] else []
    pins0 = pins(target)
    cpu0 = cpu_seconds(pids)
    sb = subprocess.Popen(sysbench_argv(workload, target["port"], tables=args.tables,
                                        table_size=args.table_size, threads=args.threads,
                                        duration=args.duration),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    holders = pids or [sb.pid]
    with Sampler(lambda: sum(n for pid, n in server_conns_by_pid(server_port).items()
                             if pid in holders), interval=0.2) as held:
        try:
            out, _ = sb.communicate(timeout=args.duration + 120)
        except subprocess.TimeoutExpired:
            sb.kill()
            out, _ = sb.communicate()
    cpu = cpu_seconds(pids) - cpu0 if pids else None
    run = {"workload": workload, "target": target["name"], **parse_sysbench(out),
           "exit": sb.returncode, "proxy_cpu_s": cpu,
           "server_conns_max": max(held.samples, default=None),
           "server_conns_median": _median(held.samples)}
    pins1 = pins(target)
    if pins0 is not None and pins1 is not None:
        run["pins"] = pins1 - pins0
    if cpu is not None and run["transactions"]:
        run["cpu_us_per_txn"] = 1e6 * cpu / run["transactions"]
        run["cpu_us_per_query"] = 1e6 * cpu / run["queries"] if run["queries"] else None
    if sb.returncode != 0:
        run["output_tail"] = out[-1500:]
        run["errors"] = max(run["errors"], 1)  # a failed run is never error-free
    return run


def summarize(results: dict) -> None:
    """Per workload and target: medians over rounds, errors summed, ratio to direct."""
    for wl in results["workloads"].values():
        for t in wl["targets"].values():
            rounds = t["rounds"]
            ok = [r for r in rounds if r.get("tps") is not None and r.get("exit") == 0]
            t["tps_median"] = _median([r["tps"] for r in ok])
            for key in ("p95_ms", "latency_avg_ms", "cpu_us_per_txn", "cpu_us_per_query",
                        "server_conns_median"):
                t[key] = _median([r.get(key) for r in ok])
            t["server_conns_max"] = max((r["server_conns_max"] for r in rounds
                                         if r.get("server_conns_max") is not None), default=None)
            t["errors"] = sum(r["errors"] for r in rounds)
            t["pins"] = sum(r.get("pins") or 0 for r in rounds)
            t["errored_rounds"] = len(rounds) - len(ok)
        direct = wl["targets"].get("direct", {}).get("tps_median")
        relay_cpu = wl["targets"].get("haproxy", {}).get("cpu_us_per_query")
        for t in wl["targets"].values():
            t["ratio_to_direct"] = round(t["tps_median"] / direct, 3) \
                if t.get("tps_median") and direct else None
            t["cpu_vs_haproxy"] = round(t["cpu_us_per_query"] / relay_cpu, 2) \
                if t.get("cpu_us_per_query") and relay_cpu else None


def _fmt(v, spec="{:.2f}"):
    return "-" if v is None else spec.format(v)


def markdown(results: dict) -> str:
    cfg = results["config"]
    lines = [f"# rdsproxy MySQL bench ({results['meta']['started_at']})", "",
             f"MariaDB {results['meta']['server_version']}, {results['meta']['sysbench']}, "
             f"{cfg['threads']} threads, {cfg['rounds']} rounds x {cfg['duration']:g} s "
             f"(interleaved), pool of {cfg['pool_size']} (max_connections_percent="
             f"{POOL_PERCENT} of {SERVER_MAX_CONNECTIONS}). Median of rounds; errors summed; "
             "server connections: the most and the median held, sampled every 0.2 s. "
             "CPU vs haproxy: proxy CPU per query as a multiple of HAProxy's (a C relay "
             "that pools nothing).", "",
             "| workload | target | tps | p95 ms | tps vs direct | proxy CPU µs/txn "
             "| µs/query | CPU vs haproxy | errors | server conns max / median | pins |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for workload, wl in results["workloads"].items():
        for target, s in wl["targets"].items():
            lines.append(
                f"| {workload} | {target} | {_fmt(s['tps_median'], '{:.0f}')} | "
                f"{_fmt(s['p95_ms'])} | {_fmt(s['ratio_to_direct'])} | "
                f"{_fmt(s['cpu_us_per_txn'], '{:.0f}')} | {_fmt(s['cpu_us_per_query'], '{:.1f}')} | "
                f"{_fmt(s.get('cpu_vs_haproxy'))} | "
                f"{s['errors']} | {_fmt(s['server_conns_max'], '{}')} / "
                f"{_fmt(s['server_conns_median'], '{:g}')} | "
                f"{s['pins'] if target.startswith('rdsproxy') else '-'} |")
    lines += ["", "Fast path in each proxy process: " + ", ".join(
        f"{n} {t.get('implementation') or t.get('reason', '?')[:200]}"
        for n, t in results["targets"].items() if n != "direct"), ""]
    for r in (r for wl in results["workloads"].values() for t in wl["targets"].values()
              for r in t["rounds"] if r["errors"]):
        lines.append(f"> errors in round {r['round']} {r['workload']} {r['target']}: "
                     f"ignored {r['ignored_errors']}, reconnects {r['reconnects']}, "
                     f"fatal {r['fatal_errors']}, exit {r['exit']}; {' / '.join(r['fatal'])[:300]}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    from rdsproxy.devservers.mariadb import MariaDBServer

    workloads = [w for w in args.workloads.split(",") if w]
    targets = [t for t in args.targets.split(",") if t]
    reaper = Reaper()
    workdir = Path(tempfile.mkdtemp(prefix="rdsproxy-bench-mysql-"))
    server = MariaDBServer(max_connections=SERVER_MAX_CONNECTIONS,
                           settings={"innodb_buffer_pool_size": "128M"})
    results = {"engine": "mysql",
               "meta": {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
               "config": {"threads": args.threads, "rounds": args.rounds,
                          "duration": args.duration, "tables": args.tables,
                          "table_size": args.table_size, "targets": targets,
                          "pool_size": SERVER_MAX_CONNECTIONS * POOL_PERCENT // 100},
               "targets": {}, "workloads": {}}
    failed = False
    try:
        server.start()
        reaper.register("mariadb", server.stop)
        server.create_user(USER, PASSWORD)
        server.create_database(DB, owner=USER)
        results["meta"]["server_version"] = server.variable("version")
        results["meta"]["sysbench"] = subprocess.run(["sysbench", "--version"],
                                                     capture_output=True, text=True).stdout.strip()
        log("loading sysbench tables ...")
        prep = subprocess.run(sysbench_argv("oltp_read_write", server.port, tables=args.tables,
                                            table_size=args.table_size, action="prepare"),
                              capture_output=True, text=True, timeout=600)
        if prep.returncode != 0:
            raise RuntimeError(f"sysbench prepare failed: {(prep.stdout + prep.stderr)[-2000:]}")
        if args.no_build:
            tree, source = REPO_ROOT, {"hash": build.source_hash(REPO_ROOT), "build": "--no-build"}
        else:
            snap = build.prepare(REPO_ROOT)
            tree, source = snap["tree"], {"hash": snap["hash"], "build": snap["built"]}
        results["meta"]["rdsproxy_source"] = source
        live = {}
        for name in targets:
            if name == "direct":
                live[name] = {"name": name, "port": server.port, "proc": None}
                results["targets"][name] = {"status": "ok"}
                continue
            if name == "haproxy":
                try:
                    live[name] = start_haproxy(reaper, workdir, server.port)
                    results["targets"][name] = {"status": "ok",
                                                "implementation": live[name]["implementation"]}
                except (RuntimeError, OSError) as exc:
                    log(f"{name} skipped: {exc}")
                    results["targets"][name] = {"status": "skipped", "reason": str(exc)}
                    failed |= not isinstance(exc, ReferenceUnavailable)  # installed, broken
                continue
            try:
                live[name] = start_proxy(reaper, workdir, name, Path(tree), server.port)
                results["targets"][name] = {"status": "ok",
                                            "implementation": live[name]["implementation"]}
            except (RuntimeError, OSError, ValueError) as exc:
                log(f"{name} skipped: {exc}")
                results["targets"][name] = {"status": "skipped", "reason": str(exc)}
                failed = True
        for workload in workloads:
            results["workloads"][workload] = {"targets": {n: {"rounds": []} for n in live}}
        for rnd in range(args.rounds):
            order = [n for n in targets[rnd % len(targets):] + targets[:rnd % len(targets)]
                     if n in live]
            for workload in workloads:
                for name in order:
                    run = {"round": rnd, **run_once(workload, live[name], server.port, args)}
                    results["workloads"][workload]["targets"][name]["rounds"].append(run)
                    failed |= bool(run["errors"])
                    log(f"round {rnd} {workload:18} {name:16} {_fmt(run['tps'], '{:9.0f}')} tps "
                        f"p95 {run['p95_ms']} ms, errors {run['errors']}, server conns "
                        f"max {run['server_conns_max']}")
        summarize(results)
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "mysql-latest.json").write_text(json.dumps(results, indent=2) + "\n")
        md = markdown(results)
        (args.output_dir / "mysql-latest.md").write_text(md)
        print(md)
        return 1 if failed else 0
    finally:
        reaper.close()
        shutil.rmtree(workdir, ignore_errors=True)  # failures carry their log tails


if __name__ == "__main__":
    sys.exit(main())
