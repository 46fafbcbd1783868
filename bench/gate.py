"""CI performance gate: rdsproxy's tps relative to a reference must not regress.

Charter: read result files of one engine (`python -m bench`: PostgreSQL, rdsproxy-cython /
PgBouncer; `python -m bench.mysql`: MySQL, rdsproxy-cython / HAProxy as a TCP relay) and that
engine's section of `ci/bench_baseline.json`; for every workload in the section, compare the
measured tps ratio candidate/reference (medians over rounds) with the baseline ratio. A
workload fails when measured < (1 - tolerance) x baseline (tolerance 0.15 unless the
baseline says otherwise), when it ran but produced no ratio (a proxy that does not start
must not pass the gate), when a run of it counted errors (sysbench's; correctness, so no
best-of-N), or when the candidate's proxy CPU figure the section names (`cpu_figure`) is
missing. The run fails when the candidate did not run the Cython fast path. Baseline
workloads the run did not include are listed as skipped, and a run that compared none
fails. Ratios rather than absolute tps, because the machine is shared and both targets ran
interleaved under the same noise.

    python3 -m bench.gate RESULTS.json [RERUN.json] BASELINE.json   # exit 0 pass, 1 fail
    python3 -m bench.gate RESULTS.json [MORE.json...] BASELINE.json --rebaseline
        # write the measured ratios into the engine's section (per workload the lowest
        # over the runs given); the other engines' sections are kept
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_TOLERANCE = 0.15
# What each engine's bench measures the candidate against, and the proxy CPU figure its
# result files carry per workload and target.
# MySQL has no PgBouncer: HAProxy relaying the bytes (one thread, no pooling) is the C
# yardstick that pays the same kernel and scheduling costs per query as the proxy does.
REFERENCES = {"postgresql": "pgbouncer", "mysql": "haproxy"}
CPU_FIGURES = {"postgresql": "cpu_us_per_txn", "mysql": "cpu_us_per_query"}


def engine_of(results: dict) -> str:
    return results.get("engine", "postgresql")  # pgbench result files predate the key


def section(baseline: dict, engine: str) -> dict | None:
    """The engine's part of the baseline; a baseline without `engines` is one engine's."""
    if "engines" not in baseline:
        return baseline
    return baseline["engines"].get(engine)


def measured_ratio(results: dict, workload: str, cand: str, ref: str):
    """(ratio or None, candidate tps, reference tps, why-missing)."""
    wl = results.get("workloads", {}).get(workload)
    if wl is None:
        return None, None, None, "workload not run"
    c = wl["targets"].get(cand, {}).get("tps_median")
    r = wl["targets"].get(ref, {}).get("tps_median")
    if c is None or r is None:
        missing = cand if c is None else ref
        reason = results.get("targets", {}).get(missing, {}).get("reason", "no successful round")
        return None, c, r, f"{missing}: {reason.splitlines()[0][:100]}"
    return c / r, c, r, ""


def _target(results: dict, workload: str, target: str) -> dict:
    return results.get("workloads", {}).get(workload, {}).get("targets", {}).get(target, {})


def best_ratio(runs: list[dict], workload: str, cand: str, ref: str):
    """measured_ratio of the run where the candidate fared best (None ratios rank last)."""
    found = [measured_ratio(r, workload, cand, ref) for r in runs]
    return max(found, key=lambda m: -1.0 if m[0] is None else m[0])


def check(runs: list[dict] | dict, baseline: dict,
          tolerance: float | None = None) -> tuple[bool, str]:
    """Gate verdict and its table. Several runs (a confirmation re-run) count best-of-N."""
    runs = [runs] if isinstance(runs, dict) else runs
    engines = {engine_of(r) for r in runs}
    if len(engines) != 1:
        return False, f"GATE FAILED: result files of several engines given: {sorted(engines)}"
    engine = engines.pop()
    baseline = section(baseline, engine)
    if baseline is None:
        return False, f"GATE FAILED: the baseline has no section for {engine}"
    cand = baseline.get("candidate", "rdsproxy-cython")
    ref = baseline.get("reference", REFERENCES.get(engine, "pgbouncer"))
    tol = tolerance if tolerance is not None else baseline.get("tolerance", DEFAULT_TOLERANCE)
    cpu_figure = baseline.get("cpu_figure")
    out = [f"engine: {engine}"]
    if baseline.get("placeholder"):
        out.append("!" * 78)
        out.append("!!! WARNING: baseline is a placeholder -- ratios are guesses, not "
                   "measurements. Re-baseline:")
        out.append("!!!   python3 -m bench.gate RUN1.json RUN2.json ci/bench_baseline.json --rebaseline")
        out.append("!" * 78)
    impls = {r.get("targets", {}).get(cand, {}).get("implementation") for r in runs}
    if cand.endswith("cython") and impls != {"cython"}:
        # Measuring the twins under the Cython label would gate nothing that matters.
        out.append(f"GATE FAILED: {cand} ran {sorted(map(str, impls))}, not only Cython (the "
                   "fast path did not build: see the build log in the report)")
        return False, "\n".join(out)
    if baseline.get("implementation") and baseline["implementation"] != "cython" \
            and cand.endswith("cython"):
        out.append(f"WARNING: the baseline was measured with the '{baseline['implementation']}' "
                   "twins; re-baseline once the Cython fast path builds")
    for r in runs:
        if r.get("meta", {}).get("incomplete"):
            out.append(f"WARNING: a result file is incomplete: {r['meta']['incomplete']}")
    out.append(f"gate: tps({cand}) / tps({ref}) must be >= {1 - tol:.2f} x baseline"
               + (f" (best of {len(runs)} runs)" if len(runs) > 1 else ""))
    header = f"{'workload':<22} {'baseline':>8} {'min':>7} {'measured':>8} " \
             f"{cand + ' tps':>20} {ref + ' tps':>15} {'cpu µs':>7}  result"
    out += [header, "-" * len(header)]
    ok, compared = True, 0
    for workload, base in baseline.get("ratios", {}).items():
        ratio, c, r, why = best_ratio(runs, workload, cand, ref)
        floor = (1 - tol) * base
        errors = sum(_target(run, workload, t).get("errors") or 0
                     for run in runs for t in (cand, ref))
        cpu = [_target(run, workload, cand).get(cpu_figure) for run in runs
               if workload in run.get("workloads", {})] if cpu_figure else []
        if not any(workload in run.get("workloads", {}) for run in runs):
            verdict = "skipped (not part of this run)"  # e.g. a full-run baseline, --quick run
        elif errors:
            verdict, ok = f"FAIL ({errors} errors in the runs: see the result file)", False
        elif ratio is not None and any(c is None for c in cpu):
            verdict, ok = f"FAIL (proxy CPU {cpu_figure} of {cand} not reported)", False
        elif ratio is None:
            verdict, ok = f"FAIL (not measured: {why})", False
        elif ratio < floor:
            verdict, ok = f"FAIL ({(ratio / base - 1) * 100:+.1f}% vs baseline)", False
        else:
            verdict = f"ok ({(ratio / base - 1) * 100:+.1f}%)"
        compared += ratio is not None
        fmt = lambda v, s: "—" if v is None else s.format(v)  # noqa: E731
        out.append(f"{workload:<22} {base:>8.3f} {floor:>7.3f} {fmt(ratio, '{:.3f}'):>8} "
                   f"{fmt(c, '{:,.0f}'):>20} {fmt(r, '{:,.0f}'):>15} "
                   f"{'/'.join(fmt(v, '{:.1f}') for v in cpu) or '—':>7}  {verdict}")
    extra = sorted({w for run in runs for w in run.get("workloads", {})}
                   - set(baseline.get("ratios", {})))
    if extra:
        out.append(f"(no baseline for: {', '.join(extra)})")
    if not compared:
        ok = False
        out.append("no workload of the baseline was measured")
    out.append("GATE PASSED" if ok else "GATE FAILED")
    return ok, "\n".join(out)


def rebaseline(runs: list[dict], baseline_path: Path, cand: str, ref: str | None) -> str:
    """The engine's section = the lowest ratio each workload showed over the given runs
    (noise-proof); the other engines' sections stay as they are."""
    engine = engine_of(runs[-1])
    ref = ref or REFERENCES.get(engine, "pgbouncer")
    ratios: dict[str, float] = {}
    for results in runs:
        for workload in results.get("workloads", {}):
            ratio, *_ = measured_ratio(results, workload, cand, ref)
            if ratio is not None:
                ratios[workload] = min(round(ratio, 3), ratios.get(workload, float("inf")))
    results = runs[-1]
    if not ratios:
        raise SystemExit(f"no {cand}/{ref} ratios in the result file; nothing to baseline")
    try:
        doc = json.loads(baseline_path.read_text())
    except (OSError, ValueError):
        doc = {}
    if "engines" not in doc:  # a one-engine file (or none): start the sectioned form
        doc = {"engines": {"postgresql": doc} if doc.get("ratios") else {}}
    doc["comment"] = ("per engine: tps ratio candidate/reference per workload (medians over "
                      "rounds; the lowest over the runs given), written by `python3 -m "
                      "bench.gate RESULTS... BASELINE --rebaseline`; the gate fails when a "
                      "measured ratio < (1 - tolerance) x this")
    doc["engines"][engine] = {
        "placeholder": False,
        "candidate": cand, "reference": ref, "tolerance": DEFAULT_TOLERANCE,
        "cpu_figure": CPU_FIGURES.get(engine),
        "implementation": results.get("targets", {}).get(cand, {}).get("implementation"),
        "measured_at": [r.get("meta", {}).get("started_at") for r in runs],
        "measured_with": [{k: r.get("config", {}).get(k) for k in ("duration", "rounds", "scale",
                                                                    "threads")
                           if k in r.get("config", {})} for r in runs],
        "source": [r.get("meta", {}).get("rdsproxy_source", {}).get("hash") for r in runs],
        "ratios": ratios,
    }
    doc = {"comment": doc.pop("comment"), **doc}
    baseline_path.write_text(json.dumps(doc, indent=2) + "\n")
    return f"{engine} baseline written to {baseline_path}: {ratios}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.gate", description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, nargs="+",
                   help="result file(s); checking several is best-of-N per workload (for a "
                        "confirmation re-run), rebaselining several takes the lowest ratio")
    p.add_argument("baseline", type=Path)
    p.add_argument("--tolerance", type=float, help=f"override (default from baseline, else "
                   f"{DEFAULT_TOLERANCE})")
    p.add_argument("--rebaseline", action="store_true",
                   help="write the measured ratios into BASELINE instead of checking")
    p.add_argument("--candidate", default="rdsproxy-cython")
    p.add_argument("--reference", help="default: pgbouncer (PostgreSQL), haproxy (MySQL)")
    args = p.parse_args(argv)
    runs = []
    for path in args.results:
        try:
            runs.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            print(f"gate: cannot read results {path}: {exc}", file=sys.stderr)
            return 2
    if args.rebaseline:
        print(rebaseline(runs, args.baseline, args.candidate, args.reference))
        return 0
    try:
        baseline = json.loads(args.baseline.read_text())
    except (OSError, ValueError) as exc:
        print(f"gate: cannot read baseline {args.baseline}: {exc}", file=sys.stderr)
        return 2
    ok, text = check(runs, baseline, args.tolerance)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
