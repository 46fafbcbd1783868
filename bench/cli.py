"""`python -m bench`: orchestrates one full benchmark run.

Charter: parse options, raise the fd limit (inherited by every child), start PostgreSQL,
load pgbench data, start the targets (a target that fails to start is skipped with its
reason, the rest go on), run every workload in interleaved rounds with the target order
rotated per round, run the idle-client memory probe on fresh proxy processes, and write
bench/results/latest.{json,md,png}. Everything started is stopped in `finally`, also on
Ctrl-C and SIGTERM.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from bench import build, memprobe, pgbench, report, targets as tg
from bench.cluster import make_cluster, pg_tool
from bench.procs import (Reaper, cpu_seconds, log, process_tree, raise_nofile,
                         server_conns_by_pid, tail)

MEMORY_PROBE = "idle_clients_10000"
QUICK = {"duration": 5, "rounds": 2,
         "workloads": "select_c10,select_c100,select_connect_c20", "memory_probe": False}
DEFAULTS = {"duration": 10, "rounds": 3, "workloads": ",".join([*pgbench.WORKLOADS, MEMORY_PROBE]),
            "memory_probe": None}
BENCH_USER, BENCH_PASSWORD, BENCH_DB = "bench", "bench-pw-1", "bench"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="workloads: " + ", ".join([*pgbench.WORKLOADS, MEMORY_PROBE]))
    p.add_argument("--duration", type=int, help="seconds per pgbench run (default 10; quick 5)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 2)")
    p.add_argument("--workloads", help="comma list (default: all, incl. the memory probe)")
    p.add_argument("--targets", default=",".join(tg.ALL_TARGETS), help="comma list of "
                   + ", ".join(tg.ALL_TARGETS) + " (default: all of these), and optionally "
                   + ", ".join(tg.OPTIONAL_TARGETS))
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale factor (default 10)")
    p.add_argument("--quick", action="store_true",
                   help="CI preset: --duration 5 --rounds 2 --workloads "
                        "select_c10,select_c100,select_connect_c20, no memory probe")
    probe = p.add_mutually_exclusive_group()
    probe.add_argument("--memory-probe", dest="memory_probe", action="store_true", default=None,
                       help=f"run the {MEMORY_PROBE} probe even if not in --workloads")
    probe.add_argument("--no-memory-probe", dest="memory_probe", action="store_false",
                       help="skip the idle-client memory probe")
    p.add_argument("--idle-clients", type=int, default=10000,
                   help="idle client connections for the memory probe (default 10000)")
    p.add_argument("--pool-size", type=int, default=20,
                   help="server connections per pooler (PgBouncer default_pool_size; rdsproxy "
                        "percent derived from it); default 20")
    p.add_argument("--server-max-connections", type=int, default=200,
                   help="PostgreSQL max_connections (default 200: direct -c 100 plus three "
                        "pools of 20 must fit)")
    p.add_argument("--server-auth", default="md5", choices=["md5", "scram-sha-256"],
                   help="auth between poolers/pgbench and PostgreSQL (default md5 so direct "
                        "-C pays the same auth cost as the proxies' md5 client side)")
    p.add_argument("--sampling-rate", type=float, default=1.0,
                   help="pgbench --sampling-rate for the p99 logs (default 1.0 = every tx)")
    p.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    p.add_argument("--no-chart", action="store_true")
    p.add_argument("--startup-timeout", type=float, default=30.0,
                   help="seconds to wait for each rdsproxy to accept a login")
    p.add_argument("--keep-tmp", action="store_true", help="keep the scratch dir (logs)")
    p.add_argument("--no-build", action="store_true",
                   help="do not build the Cython fast path in the private source copy")
    p.add_argument("--live-tree", action="store_true",
                   help="run rdsproxy from the repository itself instead of a frozen copy")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    for key in ("duration", "rounds", "workloads"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in names if w not in pgbench.WORKLOADS and w not in (MEMORY_PROBE, "idle_clients")]
    if bad:
        p.error(f"unknown workload(s) {bad}; known: {[*pgbench.WORKLOADS, MEMORY_PROBE]}")
    args.pgbench_workloads = [w for w in names if w in pgbench.WORKLOADS]
    if args.memory_probe is None:
        args.memory_probe = any(w in (MEMORY_PROBE, "idle_clients") for w in names)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in args.targets if t not in tg.ALL_TARGETS + tg.OPTIONAL_TARGETS]
    if bad:
        p.error(f"unknown target(s) {bad}; known: {list(tg.ALL_TARGETS + tg.OPTIONAL_TARGETS)}")
    if (args.pool_size * 100) % args.server_max_connections:
        p.error("--pool-size x 100 must be divisible by --server-max-connections "
                "(rdsproxy's max_connections_percent is an integer)")
    args.max_connections_percent = args.pool_size * 100 // args.server_max_connections
    if args.duration < 1 or args.rounds < 1:
        p.error("--duration and --rounds must be >= 1")
    return args


def _version(argv) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return "unknown"


def _git_rev() -> str:
    out = _version(["git", "-C", str(tg.REPO_ROOT), "rev-parse", "--short", "HEAD"])
    return out or "no commits"


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through `finally` like Ctrl-C does


def _start_targets(names, reaper, workdir, creds, args, results, *, suffix="") -> dict:
    """Start the requested targets; the ones that fail are recorded as skipped."""
    started = {}
    for name in names:
        key = name + suffix
        try:
            if name == "direct":
                t = tg.direct_target(creds)
            elif name == "uvloop-floor":
                t = tg.start_floor(reaper, workdir, creds, pool_size=args.pool_size, name=key)
            elif name == "pgbouncer":
                t = tg.start_pgbouncer(reaper, workdir, creds, pool_size=args.pool_size,
                                       max_client_conn=max(12000, args.idle_clients + 1000),
                                       name=key)
            else:
                t = tg.start_rdsproxy(reaper, workdir, creds, pure=name.endswith("pure"),
                                      max_connections_percent=args.max_connections_percent,
                                      tree=args.rdsproxy_tree, name=key,
                                      timeout=args.startup_timeout)
            started[name] = t
            if not suffix:
                results["targets"][name] = {"status": "ok", "port": t.port, **t.info}
            log(f"{key}: up on {t.host}:{t.port}" + (f" (pid {t.pid})" if t.pid else ""))
        except tg.TargetUnavailable as exc:
            reason = str(exc)
            if not suffix:
                results["targets"][name] = {"status": "skipped", "reason": reason}
            log(f"SKIPPING {key}: {reason}")
            started[name] = reason
    return started


def _run_workloads(args, cluster, creds, live: dict, results: dict, scratch: Path) -> None:
    order = [n for n in args.targets if isinstance(live.get(n), tg.Target)]
    per_run = args.duration + 2
    total = len(args.pgbench_workloads) * args.rounds * len(order)
    log(f"{total} pgbench runs x ~{per_run}s ≈ {total * per_run / 60:.1f} min")
    done = 0
    for wname in args.pgbench_workloads:
        wl = results["workloads"].setdefault(wname, {
            "pgbench_args": pgbench.WORKLOADS[wname],
            "tps_kind": "including reconnection times" if "-C" in pgbench.WORKLOADS[wname]
            else "without initial connection time", "targets": {}})
        for rnd in range(args.rounds):
            shift = rnd % len(order) if order else 0
            for tname in order[shift:] + order[:shift]:
                t = live[tname]
                entry = wl["targets"].setdefault(tname, {"rounds": []})
                if t.proc is not None and t.proc.poll() is not None:
                    msg = f"{tname} process died (exit {t.proc.returncode})"
                    entry["rounds"].append({"round": rnd + 1, "tps": None, "error": msg})
                    log(f"{wname} round {rnd + 1}/{args.rounds} {tname}: {msg}")
                    continue
                if wname in pgbench.WRITE_WORKLOADS:
                    cluster.psql("CHECKPOINT")  # so no run inherits another's dirty buffers
                # The pooler's own CPU per transaction: unlike tps, hardly moved by whatever
                # else the (shared, 2-core) machine is doing.
                pids = process_tree(t.pid) if t.pid else []
                stats_before = tg.rdsproxy_stats(t)
                cpu_before = cpu_seconds(pids)
                res = pgbench.run_pgbench(wname, host=t.host, port=t.port, user=creds.user,
                                          password=creds.password, dbname=creds.dbname,
                                          duration=args.duration,
                                          sampling_rate=args.sampling_rate, scratch=scratch)
                done += 1
                record = {"round": rnd + 1, **res.as_dict()}
                if pids and res.processed:
                    record["cpu_us_per_txn"] = round(
                        (cpu_seconds(pids) - cpu_before) * 1e6 / res.processed, 1)
                stats_after = tg.rdsproxy_stats(t) if stats_before is not None else None
                if stats_after is not None:
                    # Why sessions were pinned during this run, and the state checks it cost.
                    before = stats_before.get("SessionPinReasons", {})
                    record["pins"] = {k: v - before.get(k, 0)
                                      for k, v in stats_after.get("SessionPinReasons", {}).items()
                                      if v - before.get(k, 0)}
                    for counter in ("SessionStateChecks", "SettingsChecks"):
                        record[counter] = (stats_after.get(counter, 0)
                                           - stats_before.get(counter, 0))
                if t.pid:  # pool parity check: server connections the pooler still holds
                    counts = server_conns_by_pid(creds.server_port)
                    record["server_conns_after"] = sum(counts.get(p, 0)
                                                       for p in process_tree(t.pid))
                entry["rounds"].append(record)
                p99 = f"{res.p99_ms:.2f}" if res.p99_ms is not None else "—"
                lat = f"{res.latency_avg_ms:.3f}" if res.latency_avg_ms is not None else "—"
                tps = f"{res.tps:,.0f}" if res.tps is not None else "—"
                conns = (f"  server conns {record['server_conns_after']}"
                         if "server_conns_after" in record else "")
                cpu = (f"  cpu {record['cpu_us_per_txn']} us/txn"
                       if "cpu_us_per_txn" in record else "")
                pins = (f"  pins {record['pins'] or 'none'}  state checks "
                        f"{record['SessionStateChecks']}  settings checks "
                        f"{record['SettingsChecks']}" if "pins" in record else "")
                log(f"[{done}/{total}] {wname} round {rnd + 1}/{args.rounds} {tname:<16} "
                    f"tps {tps:>8}  lat {lat} ms  p99 {p99} ms  failed {res.failed}{conns}{cpu}{pins}"
                    + (f"  ERROR {res.error}" if res.error else ""))


def _memory_probe(args, reaper, workdir, creds, results) -> None:
    names = [n for n in args.targets if n not in ("direct",) + tg.OPTIONAL_TARGETS]
    mem = results["memory"] = {"clients": args.idle_clients, "targets": {}}
    if not names:
        return
    for name in names:
        # A fresh process per proxy: earlier pgbench load must not pre-grow its heap.
        started = _start_targets([name], reaper, workdir, creds, args, results, suffix="-probe")
        t = started[name]
        if not isinstance(t, tg.Target):
            mem["targets"][name] = {"status": "skipped", "reason": t.splitlines()[0]}
            continue
        try:
            log(f"memory probe: {args.idle_clients} idle clients -> {name} ...")
            m = memprobe.run_probe(t, creds, args.idle_clients)
            m["status"] = "ok"
            m["implementation"] = t.info.get("implementation")
            mem["targets"][name] = m
            per = m["kib_per_client"]
            log(f"memory probe {name}: {m['clients_connected']}/{args.idle_clients} connected "
                f"in {m['connect_seconds']}s, RSS {m['rss_before_kib'] / 1024:.1f} -> "
                f"{m['rss_with_clients_kib'] / 1024:.1f} MiB, "
                f"{per if per is not None else '—'} KiB/client"
                + (f", errors {m['errors']}" if m["errors"] else ""))
        except Exception as exc:
            mem["targets"][name] = {"status": "skipped", "reason": f"{type(exc).__name__}: {exc}"}
            log(f"memory probe {name} failed: {exc}")
        finally:
            reaper.stop(t.proc)


def main(argv=None) -> int:
    args = parse_args(argv)
    nofile = raise_nofile()
    if args.memory_probe and args.idle_clients + 500 > nofile:
        log(f"WARNING: RLIMIT_NOFILE is {nofile}; lowering --idle-clients to {nofile - 500}")
        args.idle_clients = max(1, nofile - 500)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    signal.signal(signal.SIGHUP, _raise_on_sigterm)
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results = {
        "meta": {"started_at": started_at, "cpus": os.cpu_count(),
                 "kernel": platform.release(), "python": platform.python_version(),
                 "postgres": _version([pg_tool("postgres"), "--version"]),
                 "pgbench": _version([pg_tool("pgbench"), "--version"]),
                 "git_rev": _git_rev(), "rlimit_nofile": nofile,
                 "loadavg_start": os.getloadavg()},
        "config": {"duration": args.duration, "rounds": args.rounds, "scale": args.scale,
                   "targets": args.targets, "workloads": args.pgbench_workloads,
                   "memory_probe": args.memory_probe, "idle_clients": args.idle_clients,
                   "pool_size": args.pool_size,
                   "server_max_connections": args.server_max_connections,
                   "max_connections_percent": args.max_connections_percent,
                   "server_auth": args.server_auth, "client_auth": "md5",
                   "sampling_rate": args.sampling_rate, "quick": args.quick},
        "targets": {}, "workloads": {},
    }
    scratch = Path(tempfile.mkdtemp(prefix="rdsproxy-bench-"))
    os.chmod(scratch, 0o755)  # postgres (initdb, pgbouncer -u) must traverse it
    reaper = Reaper()
    interrupted = None
    t0 = time.monotonic()
    try:
        args.rdsproxy_tree = tg.REPO_ROOT
        if any(t.startswith("rdsproxy") for t in args.targets) and not args.live_tree:
            snap = build.prepare(tg.REPO_ROOT, build=not args.no_build)
            args.rdsproxy_tree = snap["tree"]
            results["meta"]["rdsproxy_source"] = {"snapshot": str(snap["tree"]),
                                                  "hash": snap["hash"], "build": snap["built"]}
            log(f"rdsproxy source snapshot {snap['hash']} (Cython build: {snap['built']})")
        cluster = make_cluster(port=None, auth=args.server_auth,
                               max_connections=args.server_max_connections,
                               settings={
                                   # measure the proxies, not this shared disk's fsync
                                   "synchronous_commit": "off",
                                   "password_encryption": "md5" if args.server_auth == "md5"
                                   else "scram-sha-256"},
                               base_dir=str(scratch / "pg"))
        reaper.register("postgres", cluster.stop)
        results["meta"]["cluster"] = f"{type(cluster).__module__}.{type(cluster).__name__}"
        log("starting PostgreSQL ...")
        cluster.start()
        cluster.create_user(BENCH_USER, BENCH_PASSWORD)
        cluster.create_database(BENCH_DB, owner=BENCH_USER)
        creds = tg.Credentials(BENCH_USER, BENCH_PASSWORD, BENCH_DB, cluster.host, int(cluster.port))
        log(f"PostgreSQL on {cluster.host}:{cluster.port}; pgbench -i -s {args.scale} ...")
        pgbench.init_data(host=creds.server_host, port=creds.server_port, user=creds.user,
                          password=creds.password, dbname=creds.dbname, scale=args.scale)
        if args.pgbench_workloads:
            live = _start_targets(args.targets, reaper, scratch, creds, args, results)
            _run_workloads(args, cluster, creds, live, results, scratch)
            for t in live.values():  # free CPU/connections before the probe
                if isinstance(t, tg.Target) and t.proc is not None:
                    reaper.stop(t.proc)
        else:
            for name in args.targets:
                results["targets"].setdefault(name, {"status": "not run"})
        if args.memory_probe:
            _memory_probe(args, reaper, scratch, creds, results)
    except KeyboardInterrupt:
        interrupted = "interrupted by Ctrl-C"
    except SystemExit as exc:
        interrupted = f"stopped by signal (exit {exc.code})"
    except Exception as exc:
        interrupted = f"harness error: {type(exc).__name__}: {exc}"
        log(interrupted)
        for pg_log in (scratch / "pg" / "server.log", scratch / "pg" / "postgres.log"):
            if pg_log.exists():
                log("postgres log tail:\n" + tail(pg_log))
    finally:
        # A second Ctrl-C during teardown would orphan whatever is not stopped yet.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        log("stopping everything (signals are ignored until done) ...")
        reaper.close()
        if args.keep_tmp:
            log(f"scratch dir kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    results["meta"]["elapsed_s"] = round(time.monotonic() - t0, 1)
    results["meta"]["loadavg_end"] = os.getloadavg()
    if interrupted:
        results["meta"]["incomplete"] = interrupted
        log(f"INCOMPLETE RUN: {interrupted}")
    out = report.write_all(results, Path(args.output_dir), make_chart=not args.no_chart)
    print(out)
    log(f"results in {args.output_dir}/latest.{{json,md,png}} ({results['meta']['elapsed_s']}s)")
    return 1 if interrupted else 0
