"""`python3 -m bench.micro`: run the micro-benchmarks, print the Cython/pure ratio per component.

Runs bench/micro/test_micro.py under pytest-benchmark (both twins of every case, one
process), then reads its JSON and writes `micro-latest.json` and `micro-latest.md` to the
output directory (bench/results/). A report, not a gate: nothing here fails on a timing.
Exits 0 with a message, measuring nothing, where the Cython twins are not built.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile

from bench.micro import IMPLS, missing_c

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def run_benchmarks(raw_json: str, min_time: float, max_time: float, select: str | None) -> int:
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", HERE,
            f"--benchmark-json={raw_json}", f"--benchmark-min-time={min_time}",
            f"--benchmark-max-time={max_time}", "--benchmark-columns=median,min,rounds",
            "--benchmark-sort=name"]
    if select:
        argv += ["-k", select]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    return subprocess.call(argv, cwd=REPO, env=env)


def summarize(raw: dict) -> dict:
    """Per case: the median time of each twin and pure/Cython; per component: the geometric
    mean of its cases' ratios."""
    by_case: dict = {}
    for bench in raw["benchmarks"]:
        info = bench["extra_info"]
        entry = by_case.setdefault((info["component"], info["case"]),
                                   {"component": info["component"], "case": info["case"]})
        entry[info["impl"]] = {key: bench["stats"][key]
                               for key in ("min", "median", "mean", "stddev", "rounds")}
    cases = list(by_case.values())
    components: dict = {}
    for entry in cases:
        if all(impl in entry for impl in IMPLS):
            entry["ratio"] = entry["py"]["median"] / entry["c"]["median"]
            components.setdefault(entry["component"], []).append(entry["ratio"])
    from rdsproxy._fastpath import TWINNED
    return {
        "date": raw.get("datetime") or datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "python": platform.python_version(),
        "machine": raw.get("machine_info", {}).get("cpu", {}).get("brand_raw", platform.machine()),
        "commit": raw.get("commit_info", {}).get("id"),
        "cases": cases,
        "components": {name: math.exp(sum(map(math.log, ratios)) / len(ratios))
                       for name, ratios in components.items()},
        # Twinned modules no case measures (a new one shows up here until it has a case).
        "unmeasured": [name for name in TWINNED
                       if name not in {entry["component"] for entry in cases}],
    }


def _us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:,.0f}" if us >= 100 else f"{us:.2f}"


def markdown(summary: dict) -> str:
    when = summary["date"][:16].replace("T", " ")
    lines = [f"Micro-benchmarks of the fast-path twins ({when} UTC, Python {summary['python']}, "
             f"{summary['machine']}): median time per call of "
             "each case's body, pure-Python twin against the compiled one.", "",
             "| component | case | pure µs | Cython µs | pure/Cython |",
             "|---|---|---:|---:|---:|"]
    for entry in summary["cases"]:
        if "ratio" not in entry:
            continue
        lines.append(f"| {entry['component']} | {entry['case']} | {_us(entry['py']['median'])} "
                     f"| {_us(entry['c']['median'])} | {entry['ratio']:.1f}x |")
    lines += ["", "| component | pure/Cython (geometric mean of its cases) |", "|---|---:|"]
    lines += [f"| {name} | {ratio:.1f}x |" for name, ratio in summary["components"].items()]
    if summary["unmeasured"]:
        lines += ["", "Twinned but not measured: " + ", ".join(summary["unmeasured"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.micro",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default=os.path.join(REPO, "bench", "results"))
    parser.add_argument("--min-time", type=float, default=0.0001,
                        help="seconds a timed round lasts at least (pytest-benchmark)")
    parser.add_argument("--max-time", type=float, default=0.5,
                        help="seconds spent on each benchmark, about (pytest-benchmark)")
    parser.add_argument("-k", dest="select", help="only the cases pytest -k selects")
    parser.add_argument("--from-json", metavar="FILE",
                        help="report on an existing pytest-benchmark JSON instead of running")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as fh:
            raw = json.load(fh)
    else:
        missing = missing_c()
        if missing:
            print("bench.micro: skipped, the Cython twins are not built here ("
                  + ", ".join(f"{m}_c" for m in missing)
                  + "); build them with `python setup.py build_ext --inplace`", file=sys.stderr)
            return 0
        with tempfile.TemporaryDirectory() as tmp:
            raw_json = os.path.join(tmp, "raw.json")
            rc = run_benchmarks(raw_json, args.min_time, args.max_time, args.select)
            if rc != 0:
                print(f"bench.micro: the benchmarks failed (pytest exit {rc})", file=sys.stderr)
                return rc
            with open(raw_json) as fh:
                raw = json.load(fh)
    summary = summarize(raw)
    text = markdown(summary)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "micro-latest.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    with open(os.path.join(args.output_dir, "micro-latest.md"), "w") as fh:
        fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
