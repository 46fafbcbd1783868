"""Memory probe: what does one idle, authenticated client connection cost a proxy?

Charter: against a freshly started proxy process, measure RSS (VmRSS summed over the
process tree) after a warm-up login, then open N fully authenticated idle clients
(startup + md5 + ReadyForQuery, via `bench.pgwire`), let it settle, measure again and
report KiB per client. A handful of the idle clients then run SELECT 1 to prove the
proxy still serves them. Everything is closed before returning.
"""
from __future__ import annotations

import asyncio
import time

from bench import pgwire
from bench.procs import rss_kib, process_tree, proc_nofile


async def _probe(target, creds, n: int, concurrency: int, connect_timeout: float) -> dict:
    sem = asyncio.Semaphore(concurrency)  # stays below a typical accept backlog
    conns: list = []
    errors: dict[str, int] = {}

    async def one(i: int):
        async with sem:
            try:
                r, w = await asyncio.wait_for(
                    pgwire.connect(target.host, target.port, creds.user, creds.password,
                                   creds.dbname, application_name=f"idle{i}"), connect_timeout)
                conns.append((r, w))
            except Exception as exc:
                key = f"{type(exc).__name__}: {exc}"[:160]
                errors[key] = errors.get(key, 0) + 1

    # Warm-up login so lazily created pools/caches are in the "before" number.
    warm = await pgwire.check_login(target.host, target.port, creds.user, creds.password,
                                    creds.dbname)
    await asyncio.sleep(1.0)
    before = rss_kib(target.pid)
    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(n)))
    connect_s = time.monotonic() - t0
    await asyncio.sleep(2.0)  # let the proxy finish any post-login bookkeeping
    with_clients = rss_kib(target.pid)
    procs = len(process_tree(target.pid))
    sample_ok = 0
    for r, w in conns[:: max(1, len(conns) // 5)][:5]:
        try:
            rows = await asyncio.wait_for(pgwire.simple_query(r, w, "SELECT 1"), 10)
            sample_ok += rows == [["1"]]
        except Exception as exc:
            key = f"sample query: {type(exc).__name__}: {exc}"[:160]
            errors[key] = errors.get(key, 0) + 1
    connected = len(conns)
    await asyncio.gather(*(pgwire.close(w) for _, w in conns))
    conns.clear()
    delta = with_clients - before
    return {
        "clients_requested": n,
        "clients_connected": connected,
        "connect_failures": n - connected,
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
        "warmup_error": warm,
        "rss_before_kib": before,
        "rss_with_clients_kib": with_clients,
        "kib_per_client": round(delta / connected, 2) if connected else None,
        "connect_seconds": round(connect_s, 2),
        "connects_per_second": round(connected / connect_s, 1) if connect_s > 0 else None,
        "sample_queries_ok": sample_ok,
        "processes": procs,
        "proxy_nofile": proc_nofile(target.pid),
    }


def run_probe(target, creds, n: int, *, concurrency: int = 100,
              connect_timeout: float = 60.0) -> dict:
    try:
        import uvloop  # cheaper client side, so the proxy is the bottleneck
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    return runner(_probe(target, creds, n, concurrency, connect_timeout))
