"""The CI bench gate's verdicts (bench/gate.py), on result files shaped as `python -m bench` writes them."""
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
