"""bench.mysql's reading of sysbench reports and the gate's verdicts on MySQL result files,
from sysbench output as 1.0.20 prints it (no sysbench or server is run here)."""
import json

from bench.gate import check, rebaseline
from bench.mysql import parse_sysbench, summarize

REPORT = """\
sysbench 1.0.20 (using system LuaJIT 2.1.0-beta3)

Running the test with following options:
Number of threads: 8
Initializing random number generator from current time


Initializing worker threads...

Threads started!

SQL statistics:
    queries performed:
        read:                            84490
        write:                           24140
        other:                           12070
        total:                           120700
    transactions:                        6035   (1205.52 per sec.)
    queries:                             120700 (24110.31 per sec.)
    ignored errors:                      {ignored:<6} (0.00 per sec.)
    reconnects:                          {reconnects:<6} (0.00 per sec.)

General statistics:
    total time:                          5.0053s
    total number of events:              6035

Latency (ms):
         min:                                    0.55
         avg:                                    6.63
         max:                                  104.96
         95th percentile:                       10.84
         sum:                                40009.69

Threads fairness:
    events (avg/stddev):           754.3750/119.70
    execution time (avg/stddev):   5.0012/0.00

"""

# A thread whose statement fails stops the run: sysbench prints these and exits 1.
FATAL_IN_RUN = """\
sysbench 1.0.20 (using system LuaJIT 2.1.0-beta3)

Threads started!

FATAL: mysql_stmt_execute() returned error 2013 (Lost connection to MySQL server during query) for query 'SELECT c FROM sbtest1 WHERE id=?'
FATAL: `thread_run' function failed: /usr/share/sysbench/oltp_common.lua:432: SQL error, errno = 2013, state = 'HY000': Lost connection to MySQL server during query
"""

FATAL_AT_START = """\
Initializing worker threads...

FATAL: mysql_stmt_prepare() failed
FATAL: MySQL error: 1146 "Table 'sbtest.sbtest5' doesn't exist"
FATAL: `thread_init' function failed: /usr/share/sysbench/oltp_common.lua:284: SQL API error
FATAL: mysql_stmt_prepare() failed
FATAL: MySQL error: 1146 "Table 'sbtest.sbtest5' doesn't exist"
FATAL: `thread_init' function failed: /usr/share/sysbench/oltp_common.lua:284: SQL API error
FATAL: Thread initialization failed!
"""


def test_a_clean_report_has_no_errors():
    got = parse_sysbench(REPORT.format(ignored=0, reconnects=0))
    assert (got["transactions"], got["tps"], got["queries"]) == (6035, 1205.52, 120700)
    assert (got["p95_ms"], got["latency_avg_ms"]) == (10.84, 6.63)
    assert got["errors"] == 0 and got["fatal_errors"] == []


def test_ignored_errors_and_reconnects_count_as_errors():
    # sysbench retries a deadlock (1213) and counts it as ignored: still an error here.
    got = parse_sysbench(REPORT.format(ignored=3, reconnects=2))
    assert (got["ignored_errors"], got["reconnects"], got["errors"]) == (3, 2, 5)


def test_fatal_mysql_errors_are_counted_once_each():
    got = parse_sysbench(FATAL_IN_RUN)
    assert got["fatal_errors"] == [2013] and got["errors"] == 1 and got["tps"] is None
    got = parse_sysbench(FATAL_AT_START)
    assert got["fatal_errors"] == [1146, 1146] and got["errors"] == 2
    assert got["fatal"][0] == "FATAL: mysql_stmt_prepare() failed"


def mysql_result(ratio=0.5, errors=0, impl="cython", cpu=35.0) -> dict:
    """A bench.mysql result file, summarized, where the reference relay (HAProxy) ran at
    2000 tps."""
    def rnd(tps, out, cpu_us):
        return {"round": 0, "exit": 0 if not parse_sysbench(out)["errors"] else 1,
                **parse_sysbench(out), "tps": tps, "cpu_us_per_txn": cpu_us,
                "cpu_us_per_query": cpu_us and cpu_us / 20, "server_conns_max": 8,
                "server_conns_median": 8}
    clean, bad = REPORT.format(ignored=0, reconnects=0), REPORT.format(ignored=errors,
                                                                        reconnects=0)
    results = {"engine": "mysql", "targets": {"haproxy": {"status": "ok"},
                                              "rdsproxy-cython": {"implementation": impl}},
               "workloads": {"oltp_read_write": {"targets": {
                   "haproxy": {"rounds": [rnd(2000.0, clean, 30.0)]},
                   "rdsproxy-cython": {"rounds": [rnd(2000.0 * ratio, bad, cpu)]}}}}}
    summarize(results)
    return results


BASELINE = {"engines": {
    "postgresql": {"reference": "pgbouncer", "ratios": {"select_c10": 0.9}},
    "mysql": {"candidate": "rdsproxy-cython", "reference": "haproxy", "tolerance": 0.15,
              "cpu_figure": "cpu_us_per_query", "ratios": {"oltp_read_write": 0.5}}}}


def test_the_mysql_section_gates_mysql_results():
    ok, text = check(mysql_result(ratio=0.45), BASELINE)
    assert ok, text
    ok, text = check(mysql_result(ratio=0.40), BASELINE)
    assert not ok and "FAIL (-20.0% vs baseline)" in text


def test_errors_fail_the_gate_whatever_the_ratio():
    ok, text = check(mysql_result(ratio=0.6, errors=1), BASELINE)
    assert not ok and "1 errors" in text
    # A clean confirmation run does not wash the errors of the first one out.
    assert not check([mysql_result(ratio=0.6, errors=1), mysql_result(ratio=0.6)], BASELINE)[0]


def test_a_proxy_without_its_cpu_figure_fails():
    ok, text = check(mysql_result(cpu=None), BASELINE)
    assert not ok and "cpu_us_per_query of rdsproxy-cython not reported" in text


def test_a_proxy_process_on_the_python_twins_fails():
    ok, text = check(mysql_result(impl="python"), BASELINE)
    assert not ok and "not only Cython" in text


def test_an_engine_without_a_section_fails():
    ok, text = check(mysql_result(), {"engines": {"postgresql": BASELINE["engines"]["postgresql"]}})
    assert not ok and "no section for mysql" in text


def test_rebaseline_writes_the_engine_section_and_keeps_the_other(tmp_path):
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(BASELINE))
    rebaseline([mysql_result(ratio=0.47), mysql_result(ratio=0.44)], path, "rdsproxy-cython",
               None)
    doc = json.loads(path.read_text())
    assert doc["engines"]["postgresql"] == BASELINE["engines"]["postgresql"]
    mysql = doc["engines"]["mysql"]
    assert (mysql["reference"], mysql["cpu_figure"]) == ("haproxy", "cpu_us_per_query")
    assert mysql["ratios"] == {"oltp_read_write": 0.44}
    assert check(mysql_result(ratio=0.44), doc)[0]


def test_the_proxy_cpu_is_reported_against_haproxys():
    targets = mysql_result(cpu=36.0)["workloads"]["oltp_read_write"]["targets"]
    assert targets["haproxy"]["cpu_vs_haproxy"] == 1.0
    assert targets["rdsproxy-cython"]["cpu_vs_haproxy"] == 1.2
    # Without HAProxy in the run there is no such figure.
    lone = mysql_result()
    del lone["workloads"]["oltp_read_write"]["targets"]["haproxy"]
    summarize(lone)
    assert lone["workloads"]["oltp_read_write"]["targets"]["rdsproxy-cython"][
        "cpu_vs_haproxy"] is None
