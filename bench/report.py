"""Turn per-round measurements into the summary: JSON, a Markdown table and a bar chart.

Charter: per workload and target take the median over rounds of tps, latency average and
p99 (medians, because the machine is shared and one noisy round must not decide), sum the
failed transactions, and express tps as ratios to PgBouncer and to direct. Rendering
only; no measuring happens here.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(results: dict) -> None:
    """Fill in the per-target aggregates of results['workloads'] in place."""
    for wl in results["workloads"].values():
        per_target = wl["targets"]
        for t in per_target.values():
            rounds = t["rounds"]
            ok = [r for r in rounds if r.get("tps") is not None and not r.get("error")]
            t["tps_median"] = _median([r["tps"] for r in ok])
            t["tps_min"] = min((r["tps"] for r in ok), default=None)
            t["tps_max"] = max((r["tps"] for r in ok), default=None)
            t["latency_avg_ms"] = _median([r["latency_avg_ms"] for r in ok])
            t["p99_ms"] = _median([r["p99_ms"] for r in ok])
            t["connection_time_ms"] = _median([r.get("connection_time_ms") for r in ok])
            t["cpu_us_per_txn"] = _median([r.get("cpu_us_per_txn") for r in ok])
            t["failed"] = sum(r.get("failed") or 0 for r in rounds)
            t["errored_rounds"] = len(rounds) - len(ok)
        for ref in ("pgbouncer", "direct"):
            ref_tps = per_target.get(ref, {}).get("tps_median")
            for t in per_target.values():
                mine = t.get("tps_median")
                t[f"ratio_to_{ref}"] = round(mine / ref_tps, 3) if mine and ref_tps else None


def prepared_gains(results: dict) -> list[dict]:
    """select_prepared_cN against select_extended_cN of the same run: each target's
    prepared tps over PgBouncer's best mode (the better of its runs in which no round
    failed or errored: PgBouncer before 1.21 serves -M prepared only while each client
    happens to find the server connection it prepared on) and over the target's own
    extended tps."""
    gains = []
    workloads = results["workloads"]
    for name, prepared in workloads.items():
        if not name.startswith("select_prepared_"):
            continue
        extended = workloads.get(name.replace("_prepared_", "_extended_"))
        if extended is None:
            continue
        bouncer = [t for t in (prepared["targets"].get("pgbouncer"), extended["targets"].get("pgbouncer"))
                   if t and t.get("tps_median") and not t.get("failed")
                   and not t.get("errored_rounds")]
        bouncer_best = max((t["tps_median"] for t in bouncer), default=None)
        for tname, t in prepared["targets"].items():
            mine = t.get("tps_median")
            own = extended["targets"].get(tname, {}).get("tps_median")
            gains.append({
                "workload": name, "target": tname, "tps": mine, "failed": t.get("failed"),
                "vs_pgbouncer_best": round(mine / bouncer_best, 3) if mine and bouncer_best else None,
                "vs_own_extended": round(mine / own, 3) if mine and own else None})
    return gains


def _fmt(v, spec="{:.2f}"):
    return "—" if v is None else spec.format(v)


def markdown(results: dict) -> str:
    cfg = results["config"]
    lines = [
        f"# rdsproxy benchmark ({results['meta']['started_at']})",
        "",
        f"pgbench -n -T {cfg['duration']} s, {cfg['rounds']} interleaved rounds, scale "
        f"{cfg['scale']}; pool size {cfg['pool_size']} for both poolers (PgBouncer "
        f"transaction mode, rdsproxy {cfg['max_connections_percent']}% of server "
        f"max_connections={cfg['server_max_connections']}); md5 client auth on both; "
        f"{results['meta']['cpus']} CPUs, shared machine.",
        "",
        "tps = median over rounds (without initial connection time; *including reconnection "
        "times* for `-C` workloads). latency = median of pgbench's latency average; p99 = "
        "median of per-round p99 from the per-transaction logs (under `-C` it absorbs the "
        "synchronous connects of the other clients in the same pgbench thread). failed = failed transactions summed over rounds. "
        "pooler CPU = user + system CPU the pooler process used per transaction (median over rounds; "
        "under `-C` that includes the connection's setup): the efficiency figure least moved by machine noise.",
        "",
    ]
    held: dict[str, int] = {}
    for wl in results["workloads"].values():
        for tname, t in wl["targets"].items():
            for r in t["rounds"]:
                if r.get("server_conns_after") is not None:
                    held[tname] = max(held.get(tname, 0), r["server_conns_after"])
    if held:
        lines.append("Pool parity check, most server connections a pooler held after a run: "
                     + ", ".join(f"{k} {v}" for k, v in held.items()) + ".")
    src = results["meta"].get("rdsproxy_source")
    if src:
        lines.append(f"rdsproxy source snapshot `{src['hash']}`, Cython build: {src['build']}.")
    for name, t in results["targets"].items():
        if name.startswith("rdsproxy") and t.get("status") == "ok":
            lines.append(f"- {name}: fast path `{t.get('implementation')}`")
    lines.append("")
    skipped = {n: t for n, t in results["targets"].items() if t.get("status") == "skipped"}
    for name, t in skipped.items():
        rlines = [ln for ln in (t.get("reason") or "no reason recorded").splitlines() if ln.strip()]
        reason = rlines[0] + (f" … {rlines[-1].strip()}" if len(rlines) > 1 else "")
        reason = reason[:400]
        lines.append(f"> **{name} skipped**: {reason}")
    if skipped:
        lines.append("")
    if results["workloads"]:
        lines += ["| workload | target | tps | lat avg ms | p99 ms | failed | vs pgbouncer "
                  "| vs direct | pooler CPU µs/txn |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for wname, wl in results["workloads"].items():
        for tname, t in wl["targets"].items():
            err = f" ({t['errored_rounds']} errored rounds)" if t.get("errored_rounds") else ""
            impl = results["targets"].get(tname, {}).get("implementation")
            if tname == "rdsproxy-cython" and impl and impl != "cython":
                err += f" (ran {impl} twins!)"
            lines.append(
                f"| {wname} | {tname}{err} | {_fmt(t['tps_median'], '{:,.0f}')} | "
                f"{_fmt(t['latency_avg_ms'], '{:.3f}')} | {_fmt(t['p99_ms'], '{:.3f}')} | "
                f"{t['failed']} | {_fmt(t['ratio_to_pgbouncer'])} | {_fmt(t['ratio_to_direct'])} | "
                f"{_fmt(t.get('cpu_us_per_txn'), '{:.1f}')} |")
    gains = prepared_gains(results)
    if gains:
        lines += ["", "## Prepared statements (`-M prepared`) against `-M extended`", "",
                  "PgBouncer's best mode: the better of its `-M prepared` and `-M extended` "
                  "runs in which no round failed or errored.", "",
                  "| workload | target | tps | failed | vs PgBouncer best | vs own extended |",
                  "|---|---|---:|---:|---:|---:|"]
        for g in gains:
            lines.append(f"| {g['workload']} | {g['target']} | {_fmt(g['tps'], '{:,.0f}')} | "
                         f"{g['failed']} | {_fmt(g['vs_pgbouncer_best'])} | {_fmt(g['vs_own_extended'])} |")
    mem = results.get("memory")
    if mem and mem.get("targets"):
        lines += ["", f"## Idle client memory ({mem['clients']} clients)", "",
                  "| target | connected | RSS before MiB | RSS with clients MiB | KiB / client "
                  "| connects/s | processes |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for tname, m in mem["targets"].items():
            if m.get("status") != "ok":
                reason = (m.get("reason") or "").splitlines()[:1] or [""]
                lines.append(f"| {tname} | skipped: {reason[0][:120]} | | | | | |")
                continue
            impl = m.get("implementation")
            label = f"{tname} ({impl})" if impl else tname
            lines.append(
                f"| {label} | {m['clients_connected']} | {m['rss_before_kib'] / 1024:.1f} | "
                f"{m['rss_with_clients_kib'] / 1024:.1f} | {_fmt(m['kib_per_client'])} | "
                f"{_fmt(m['connects_per_second'], '{:,.0f}')} | {m['processes']} |")
            if m.get("errors"):
                lines.append(f"|  ↳ errors | {'; '.join(f'{k} x{v}' for k, v in m['errors'].items())[:300]} | | | | | |")
    return "\n".join(lines) + "\n"


def chart(results: dict, path: Path) -> str:
    """The run at a glance: median tps with the spread over rounds, tps relative to
    PgBouncer, pooler CPU per transaction, p99 latency (and KiB per idle client), titled
    with the commit and the date; returns a status message."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not importable; skipping the chart (pip install matplotlib)"
    workloads = list(results["workloads"])
    all_t = results["config"]["targets"]  # stable colours: index in the requested list
    targets = [t for t in all_t
               if any(t in wl["targets"] for wl in results["workloads"].values())]
    mem = {k: v for k, v in (results.get("memory") or {}).get("targets", {}).items()
           if v.get("status") == "ok"}
    if not workloads and not mem:
        return "nothing to chart"
    fig = plt.figure(figsize=(max(10.0, 3 + 1.8 * len(workloads)), 9 if workloads else 4))
    grid = fig.add_gridspec(2 if workloads else 1, 4 if mem else 3)
    width = 0.8 / max(1, len(targets))
    centers = [j + width * (len(targets) - 1) / 2 for j in range(len(workloads))]

    def value(workload, tname, key):
        return results["workloads"][workload]["targets"].get(tname, {}).get(key)

    def bars(ax, key, ylabel, spread=False):
        for i, tname in enumerate(targets):
            xs = [j + i * width for j in range(len(workloads))]
            # A figure not measured for a target (direct has no pooler CPU) draws no bar.
            ys = [value(w, tname, key) for w in workloads]
            ys = [float("nan") if y is None else y for y in ys]
            errors = None
            if spread:   # from the slowest round to the fastest
                errors = [[y - (value(w, tname, "tps_min") or y) for w, y in zip(workloads, ys)],
                          [(value(w, tname, "tps_max") or y) - y for w, y in zip(workloads, ys)]]
            ax.bar(xs, ys, width, label=tname, color=f"C{all_t.index(tname)}", yerr=errors,
                   capsize=3 if spread else 0, error_kw={"linewidth": 0.8})
        ax.set_xticks(centers)
        ax.set_xticklabels(workloads, rotation=15, fontsize=7)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(axis="y", alpha=0.3)

    meta = results.get("meta", {})
    heading = (f"rdsproxy {meta.get('git_rev', '?')}, {meta.get('started_at', '?')}: pgbench, "
               f"{results['config']['duration']} s x {results['config']['rounds']} "
               f"interleaved rounds")
    if workloads:
        ax = fig.add_subplot(grid[0, :])
        bars(ax, "tps_median", "tps (median; bars: slowest to fastest round)", spread=True)
        ax.set_title(heading)
        ax.legend(fontsize=8)
        for column, (key, label, title) in enumerate((
                ("ratio_to_pgbouncer", "tps / PgBouncer tps", "relative to PgBouncer"),
                ("cpu_us_per_txn", "pooler CPU µs per transaction", "CPU per transaction"),
                ("p99_ms", "p99 latency, ms", "99th percentile latency"))):
            ax = fig.add_subplot(grid[1, column])
            bars(ax, key, label)
            if key == "ratio_to_pgbouncer":
                ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
            ax.set_title(title, fontsize=9)
    if mem:
        ax = fig.add_subplot(grid[1, 3] if workloads else grid[0, :])
        names = list(mem)
        ax.bar(names, [mem[n]["kib_per_client"] or 0 for n in names],
               color=[f"C{all_t.index(n)}" if n in all_t else "C0" for n in names])
        ax.set_ylabel("KiB per idle client", fontsize=8)
        ax.set_title(f"{results['memory']['clients']} idle clients", fontsize=9)
        ax.tick_params(axis="x", rotation=15, labelsize=7)
        if not workloads:
            ax.set_title(heading)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart written to {path}"


def write_all(results: dict, out_dir: Path, *, make_chart: bool = True) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    summarize(results)
    (out_dir / "latest.json").write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    md = markdown(results)
    (out_dir / "latest.md").write_text(md)
    msg = chart(results, out_dir / "latest.png") if make_chart else "chart disabled (--no-chart)"
    return md + "\n" + msg + "\n"


if __name__ == "__main__":  # re-render: python3 -m bench.report RESULTS.json [OUT_DIR]
    import sys
    src = Path(sys.argv[1])
    print(write_all(json.loads(src.read_text()), Path(sys.argv[2]) if len(sys.argv) > 2
                    else src.parent))
