"""CI performance gate: rdsproxy's tps relative to PgBouncer must not regress.

Charter: read a `python -m bench` result file and `ci/bench_baseline.json`; for every
workload in the baseline, compare the measured tps ratio candidate/reference (default
rdsproxy-cython / pgbouncer, medians over rounds) with the baseline ratio. A workload
fails when measured < (1 - tolerance) x baseline (tolerance 0.15 unless the baseline
says otherwise) or when it ran but produced no ratio (a proxy that does not start must
not pass the gate); baseline workloads the run did not include are listed as skipped,
and a run that compared none fails. Ratios rather than absolute tps, because the machine is shared and both
targets ran interleaved under the same noise.

    python3 -m bench.gate RESULTS.json [RERUN.json] BASELINE.json   # exit 0 pass, 1 fail
    python3 -m bench.gate RESULTS.json [MORE.json...] BASELINE.json --rebaseline
        # write the measured ratios (per workload the lowest over the runs given)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_TOLERANCE = 0.15


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


def best_ratio(runs: list[dict], workload: str, cand: str, ref: str):
    """measured_ratio of the run where the candidate fared best (None ratios rank last)."""
    found = [measured_ratio(r, workload, cand, ref) for r in runs]
    return max(found, key=lambda m: -1.0 if m[0] is None else m[0])


def check(runs: list[dict] | dict, baseline: dict,
          tolerance: float | None = None) -> tuple[bool, str]:
    """Gate verdict and its table. Several runs (a confirmation re-run) count best-of-N."""
    runs = [runs] if isinstance(runs, dict) else runs
    results = runs[-1]
    cand = baseline.get("candidate", "rdsproxy-cython")
    ref = baseline.get("reference", "pgbouncer")
    tol = tolerance if tolerance is not None else baseline.get("tolerance", DEFAULT_TOLERANCE)
    out = []
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
             f"{cand + ' tps':>20} {ref + ' tps':>15}  result"
    out += [header, "-" * len(header)]
    ok, compared = True, 0
    for workload, base in baseline.get("ratios", {}).items():
        ratio, c, r, why = best_ratio(runs, workload, cand, ref)
        floor = (1 - tol) * base
        if not any(workload in run.get("workloads", {}) for run in runs):
            verdict = "skipped (not part of this run)"  # e.g. a full-run baseline, --quick run
        elif ratio is None:
            verdict, ok = f"FAIL (not measured: {why})", False
        elif ratio < floor:
            verdict, ok = f"FAIL ({(ratio / base - 1) * 100:+.1f}% vs baseline)", False
        else:
            verdict = f"ok ({(ratio / base - 1) * 100:+.1f}%)"
        compared += ratio is not None
        fmt = lambda v, s: "—" if v is None else s.format(v)  # noqa: E731
        out.append(f"{workload:<22} {base:>8.3f} {floor:>7.3f} {fmt(ratio, '{:.3f}'):>8} "
                   f"{fmt(c, '{:,.0f}'):>20} {fmt(r, '{:,.0f}'):>15}  {verdict}")
    extra = sorted({w for run in runs for w in run.get("workloads", {})}
                   - set(baseline.get("ratios", {})))
    if extra:
        out.append(f"(no baseline for: {', '.join(extra)})")
    if not compared:
        ok = False
        out.append("no workload of the baseline was measured")
    out.append("GATE PASSED" if ok else "GATE FAILED")
    return ok, "\n".join(out)


def rebaseline(runs: list[dict], baseline_path: Path, cand: str, ref: str) -> str:
    """Baseline = the lowest ratio each workload showed over the given runs (noise-proof)."""
    ratios: dict[str, float] = {}
    for results in runs:
        for workload in results.get("workloads", {}):
            ratio, *_ = measured_ratio(results, workload, cand, ref)
            if ratio is not None:
                ratios[workload] = min(round(ratio, 3), ratios.get(workload, float("inf")))
    results = runs[-1]
    if not ratios:
        raise SystemExit(f"no {cand}/{ref} ratios in the result file; nothing to baseline")
    doc = {
        "comment": "tps ratio candidate/reference per workload (medians over rounds; the "
                   "lowest over the runs given), written by `python3 -m bench.gate RESULTS... "
                   "BASELINE --rebaseline`; the gate fails when a measured ratio < "
                   "(1 - tolerance) x this",
        "placeholder": False,
        "candidate": cand, "reference": ref, "tolerance": DEFAULT_TOLERANCE,
        "implementation": results.get("targets", {}).get(cand, {}).get("implementation"),
        "measured_at": [r.get("meta", {}).get("started_at") for r in runs],
        "measured_with": [{k: r.get("config", {}).get(k) for k in ("duration", "rounds", "scale")}
                          for r in runs],
        "source": [r.get("meta", {}).get("rdsproxy_source", {}).get("hash") for r in runs],
        "ratios": ratios,
    }
    baseline_path.write_text(json.dumps(doc, indent=2) + "\n")
    return f"baseline written to {baseline_path}: {ratios}"


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
    p.add_argument("--reference", default="pgbouncer")
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
