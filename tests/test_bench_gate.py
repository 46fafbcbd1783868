"""The CI bench gate's verdicts (bench/gate.py), on result files shaped as `python -m bench` writes them."""
import pytest

from bench.gate import check

BASELINE = {"candidate": "rdsproxy-cython", "reference": "pgbouncer", "tolerance": 0.15,
            "ratios": {"select_c10": 0.80, "select_connect_c20": 0.70}}


def result(impl="cython", **ratios):
    """A result file where PgBouncer ran at 1000 tps and the candidate at ratio x 1000."""
    workloads = {w: {"targets": {"pgbouncer": {"tps_median": 1000.0},
                                 "rdsproxy-cython": {"tps_median": 1000.0 * r}}}
                 for w, r in ratios.items()}
    return {"targets": {"rdsproxy-cython": {"implementation": impl}}, "workloads": workloads}


def test_ratios_within_tolerance_pass():
    ok, text = check(result(select_c10=0.70, select_connect_c20=0.90), BASELINE)
    assert ok, text  # 0.70 >= 0.85 x 0.80 = 0.68


def test_a_ratio_below_tolerance_fails():
    ok, text = check(result(select_c10=0.67, select_connect_c20=0.90), BASELINE)
    assert not ok and "FAIL" in text


def test_pure_python_under_the_cython_label_fails():
    # A fresh machine without Cython once benchmarked the twins as "rdsproxy-cython".
    ok, text = check(result("python", select_c10=0.9, select_connect_c20=0.9), BASELINE)
    assert not ok and "not only Cython" in text


def test_best_of_two_needs_cython_in_both_runs():
    runs = [result("python", select_c10=0.9, select_connect_c20=0.9),
            result("cython", select_c10=0.9, select_connect_c20=0.9)]
    assert not check(runs, BASELINE)[0]
    assert check([result(select_c10=0.5, select_connect_c20=0.5),
                  result(select_c10=0.9, select_connect_c20=0.9)], BASELINE)[0]


def test_a_run_that_measured_nothing_fails():
    ok, text = check(result(), BASELINE)
    assert not ok


def _run_with_rounds() -> dict:
    targets = ["direct", "pgbouncer", "rdsproxy-cython"]
    results = {"meta": {"git_rev": "abc1234", "started_at": "2026-12-07T06:30:00+0000"},
               "config": {"duration": 10, "rounds": 3, "targets": targets}, "workloads": {}}
    for workload, base in (("select_c10", 10000), ("select_connect_c20", 1200)):
        results["workloads"][workload] = {"targets": {
            t: {"rounds": [{"round": r + 1, "tps": base * (1 + 0.1 * i) + 100 * r,
                            "latency_avg_ms": 1.0, "p99_ms": 9.0 + i,
                            "cpu_us_per_txn": None if t == "direct" else 20.0 + i, "failed": 0}
                           for r in range(3)]}
            for i, t in enumerate(targets)}}
    return results


def test_the_summary_keeps_the_spread_over_rounds():
    from bench.report import summarize
    results = _run_with_rounds()
    summarize(results)
    t = results["workloads"]["select_c10"]["targets"]["pgbouncer"]
    assert (t["tps_min"], t["tps_median"], t["tps_max"]) == (11000, 11100, 11200)
    assert t["p99_ms"] == 10.0 and t["cpu_us_per_txn"] == 21.0


def test_the_chart_is_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    from bench.report import chart, summarize
    results = _run_with_rounds()
    summarize(results)
    assert chart(results, tmp_path / "latest.png") == f"chart written to {tmp_path / 'latest.png'}"
    assert (tmp_path / "latest.png").stat().st_size > 10_000
