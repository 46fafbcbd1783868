"""GET /metrics: RDS Proxy's CloudWatch metrics in Prometheus's text format, from live proxies
of both engines under real clients, parsed with prometheus_client's own parser."""
import urllib.request

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import connect, scalar
from utils import wait_until

LOAD = 300

PER_TARGET = ["rdsproxy_database_connections", "rdsproxy_database_connections_currently_borrowed",
              "rdsproxy_database_connections_currently_in_transaction",
              "rdsproxy_database_connections_currently_session_pinned",
              "rdsproxy_max_database_connections_allowed",
              "rdsproxy_database_connections_borrow_latency_seconds",
              "rdsproxy_query_database_response_latency_seconds"]
PER_ENDPOINT = ["rdsproxy_query_response_latency_seconds", "rdsproxy_availability_percentage"]
PROXY_WIDE = ["rdsproxy_client_connections", "rdsproxy_client_connections_received",
              "rdsproxy_client_connections_setup_succeeded", "rdsproxy_client_connections_closed",
              "rdsproxy_database_connection_requests",
              "rdsproxy_database_connections_setup_succeeded", "rdsproxy_query_requests"]


def scrape(proxy) -> dict:
    """The families of /metrics by name (the parser drops a counter's `_total`)."""
    host, port = proxy.proxy.admin_address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = reply.read().decode("utf-8")
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families, name, suffix="", **labels) -> float:
    """The one sample of `name` + `suffix` whose labels include `labels`."""
    found = [s.value for s in families[name].samples
             if s.name == name + suffix and labels.items() <= s.labels.items()]
    assert len(found) == 1, (name, suffix, labels, families[name].samples)
    return found[0]


def check_names_and_labels(families, engine, proxy_name):
    for name in PER_TARGET + PER_ENDPOINT + PROXY_WIDE:
        assert name in families, name
        assert families[name].samples, name
        for sample in families[name].samples:
            assert sample.labels["proxy"] == proxy_name and sample.labels["engine"] == engine
            if name in PER_TARGET:
                assert sample.labels["target"] == "primary", sample
            if name in PER_ENDPOINT:
                assert sample.labels["endpoint"] == "default", sample
    assert families["rdsproxy_query_requests"].type == "counter"
    assert families["rdsproxy_database_connections_currently_borrowed"].type == "gauge"
    assert families["rdsproxy_query_response_latency_seconds"].type == "histogram"
    assert value(families, "rdsproxy_availability_percentage", endpoint="default") == 100
    assert value(families, "rdsproxy_max_database_connections_allowed", target="primary") >= 1


LATENCIES = [("rdsproxy_query_response_latency_seconds", {"endpoint": "default"}),
             ("rdsproxy_query_database_response_latency_seconds", {"target": "primary"}),
             ("rdsproxy_database_connections_borrow_latency_seconds", {"target": "primary"})]


def latencies(families) -> dict:
    """name -> (count, sum) of each latency histogram, after checking its buckets add up."""
    out = {}
    for name, labels in LATENCIES:
        count = value(families, name, "_count", **labels)
        assert value(families, name, "_bucket", le="+Inf", **labels) == count
        buckets = [s.value for s in families[name].samples if s.name == name + "_bucket"]
        assert buckets == sorted(buckets)   # cumulative
        out[name] = (count, value(families, name, "_sum", **labels))
    return out


BORROW = "rdsproxy_database_connections_borrow_latency_seconds"


def check_latencies_moved(before, after):
    for name, _ in LATENCIES:
        assert after[name][0] - before[name][0] >= LOAD, name
        # Local round trips: well under a second each on average. A connection the
        # PostgreSQL relay takes idle on the spot counts as borrowed in no time.
        spent = after[name][1] - before[name][1]
        assert (0 <= spent if name == BORROW else 0 < spent) and spent / LOAD < 1, name


def gauges(proxy) -> tuple:
    families = scrape(proxy)
    return tuple(value(families, name, target="primary") for name in (
        "rdsproxy_database_connections_currently_borrowed",
        "rdsproxy_database_connections_currently_in_transaction",
        "rdsproxy_database_connections_currently_session_pinned"))


def test_postgres_metrics(proxy_factory):
    proxy = proxy_factory(engine="postgres", admin=True, target={"name": "primary"})
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("SELECT 1")
        families = scrape(proxy)
        check_names_and_labels(families, "postgresql", "postgres-test")
        before = latencies(families)
        for i in range(LOAD):
            assert conn.execute("SELECT %s::int", (i,)).fetchone()[0] == i
        check_latencies_moved(before, latencies(scrape(proxy)))
        wait_until(lambda: gauges(proxy) == (0, 0, 0))

        with psycopg.connect(proxy.dsn()) as holder:   # a transaction left open
            holder.execute("SELECT 1")
            assert gauges(proxy) == (1, 1, 0)
            borrowed = latencies(scrape(proxy))[BORROW]
            with psycopg.connect(proxy.dsn(), autocommit=True) as pinned:
                # The one idle connection is the holder's: this client waits for a new one.
                pinned.execute("CREATE TEMP TABLE metrics_pin (a int)")
                assert gauges(proxy) == (2, 1, 1)
                after = latencies(scrape(proxy))[BORROW]
                assert after[0] == borrowed[0] + 1 and after[1] > borrowed[1]
                families = scrape(proxy)
                assert value(families, "rdsproxy_session_pin_reasons",
                             "_total", reason="temporary_object") == 1
            holder.rollback()
            wait_until(lambda: gauges(proxy) == (0, 0, 0))

    stats = proxy.stats()   # /stats: the same figures under CloudWatch's names
    assert stats["QueryResponseLatency"]["default"]["count"] >= LOAD + 1
    assert stats["DatabaseConnectionsCurrentlyBorrowed"] == {"primary": 0}
    assert stats["SessionPinReasons"] == {"temporary_object": 1}


def test_mysql_metrics(proxy_factory):
    proxy = proxy_factory(engine="mysql", admin=True, target={"name": "primary"})
    conn = connect(proxy)
    try:
        assert scalar(conn, "SELECT 1") == 1
        families = scrape(proxy)
        check_names_and_labels(families, "mysql", "mysql-test")
        before = latencies(families)
        for i in range(LOAD):
            assert scalar(conn, "SELECT %s", (i,)) == i
        check_latencies_moved(before, latencies(scrape(proxy)))
        wait_until(lambda: gauges(proxy) == (0, 0, 0))

        holder = connect(proxy)
        try:
            holder.begin()
            assert scalar(holder, "SELECT 1") == 1
            assert gauges(proxy) == (1, 1, 0)
            pinned = connect(proxy)
            try:
                scalar(pinned, "SET @metrics_pin = 1")
                assert gauges(proxy) == (2, 1, 1)
                assert value(scrape(proxy), "rdsproxy_session_pin_reasons",
                             "_total", reason="user_variable") == 1
            finally:
                pinned.close()
            holder.rollback()
            wait_until(lambda: gauges(proxy) == (0, 0, 0))
        finally:
            holder.close()
    finally:
        conn.close()
    stats = proxy.stats()
    assert stats["QueryDatabaseResponseLatency"]["primary"]["count"] >= LOAD + 1
    assert stats["MaxDatabaseConnectionsAllowed"]["primary"] >= 1


@pytest.mark.parametrize("engine", ["postgres", "mysql"])
def test_unknown_path_names_metrics(proxy_factory, engine):
    proxy = proxy_factory(engine=engine, admin=True)
    host, port = proxy.proxy.admin_address
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://{host}:{port}/nothing", timeout=5)
    assert b"/metrics" in info.value.read()
