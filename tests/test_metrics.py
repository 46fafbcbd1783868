"""GET /metrics: RDS Proxy's CloudWatch metrics in Prometheus's text format, from live proxies
of both engines under real clients, parsed with prometheus_client's own parser."""
import urllib.request

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import (APP_DB, APP_PASSWORD, APP_USER, FAST_CHECKS, connect,
                     postgres_tls_settings, scalar)
from rdsproxy.core.availability import AvailabilityRecord
from utils import wait_until

LOAD = 300

PER_TARGET = ["rdsproxy_database_connections", "rdsproxy_database_connections_currently_borrowed",
              "rdsproxy_database_connections_currently_in_transaction",
              "rdsproxy_database_connections_currently_session_pinned",
              "rdsproxy_max_database_connections_allowed",
              "rdsproxy_database_connections_borrow_latency_seconds",
              "rdsproxy_query_database_response_latency_seconds",
              "rdsproxy_database_connections_with_tls", "rdsproxy_availability_percentage"]
PER_ENDPOINT = ["rdsproxy_query_response_latency_seconds"]
PROXY_WIDE = ["rdsproxy_client_connections", "rdsproxy_client_connections_received",
              "rdsproxy_client_connections_setup_succeeded", "rdsproxy_client_connections_closed",
              "rdsproxy_client_connections_tls", "rdsproxy_client_connections_no_tls",
              "rdsproxy_database_connection_requests",
              "rdsproxy_database_connection_requests_with_tls",
              "rdsproxy_database_connections_setup_succeeded", "rdsproxy_query_requests",
              "rdsproxy_query_requests_tls", "rdsproxy_query_requests_no_tls"]


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
    assert value(families, "rdsproxy_availability_percentage", target="primary") == 100
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


def test_postgres_query_requests_count_both_protocols(proxy_factory):
    """A simple-protocol Query is one request however many statements its text holds; in
    the extended protocol each Execute is one, pipelined or not."""
    proxy = proxy_factory(engine="postgres", admin=True)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("SELECT 1")
        before = proxy.stats()["QueryRequests"]
        conn.execute("SELECT 1; SELECT 2")
        for i in range(5):
            assert conn.execute("SELECT %s::int", (i,)).fetchone()[0] == i
        with conn.pipeline():
            cursors = [conn.execute("SELECT %s::int", (i,)) for i in range(3)]
        assert [c.fetchone()[0] for c in cursors] == [0, 1, 2]
        assert proxy.stats()["QueryRequests"] - before == 1 + 5 + 3


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


# -- TLS variants ---------------------------------------------------------------------------

TLS_FIGURES = ("client_connections_tls", "client_connections_no_tls", "query_requests",
               "query_requests_tls", "query_requests_no_tls")


def tls_figures(proxy) -> dict:
    """The client TLS figures (counters without their `_total`), by short name."""
    families = scrape(proxy)
    return {name: value(families, "rdsproxy_" + name,
                        "" if name.startswith("client") else "_total")
            for name in TLS_FIGURES}


def check_tls_split(proxy, tls_client, plain_client, run):
    """`run(client, n)` makes n queries. Queries are split by the client's transport while
    it is connected and after it has gone; the gauges follow the clients."""
    start = tls_figures(proxy)
    assert start["client_connections_tls"] == 1 and start["client_connections_no_tls"] == 1
    run(tls_client, 20)
    after_tls = tls_figures(proxy)
    assert after_tls["query_requests_tls"] - start["query_requests_tls"] >= 20
    assert after_tls["query_requests_no_tls"] == start["query_requests_no_tls"]
    run(plain_client, 7)
    after_plain = tls_figures(proxy)
    assert after_plain["query_requests_no_tls"] - after_tls["query_requests_no_tls"] >= 7
    assert after_plain["query_requests_tls"] == after_tls["query_requests_tls"]
    for figures in (start, after_tls, after_plain):
        assert figures["query_requests_tls"] + figures["query_requests_no_tls"] == \
            figures["query_requests"]
    return after_plain


def check_tls_after_close(proxy, before):
    """Once both clients are gone: no client gauge left, no query lost or moved."""
    wait_until(lambda: tls_figures(proxy)["client_connections_tls"]
               + tls_figures(proxy)["client_connections_no_tls"] == 0)
    after = tls_figures(proxy)
    assert after["query_requests_tls"] >= before["query_requests_tls"]
    assert after["query_requests_no_tls"] >= before["query_requests_no_tls"]
    # Nothing was sent after the last reading but the clients' goodbyes.
    assert after["query_requests"] - before["query_requests"] <= 2


def test_postgres_tls_figures(proxy_factory, pg_factory, test_ca):
    cluster = pg_factory(settings=postgres_tls_settings(test_ca), max_connections=30)
    cluster.create_user(APP_USER, APP_PASSWORD)
    cluster.create_database(APP_DB, owner=APP_USER)
    proxy = proxy_factory(cluster, admin=True,
                          tls={"cert_file": test_ca.server_cert, "key_file": test_ca.server_key},
                          target={"name": "primary", "tls": "verify-full",
                                  "tls_ca_file": test_ca.ca_cert})

    def run(conn, n):
        # Without parameters: the simple protocol's Query, which QueryRequests counts.
        for i in range(n):
            assert conn.execute(f"SELECT {i}").fetchone()[0] == i

    with psycopg.connect(proxy.dsn(sslmode="verify-full", sslrootcert=test_ca.ca_cert),
                         autocommit=True) as tls_client, \
            psycopg.connect(proxy.dsn(sslmode="disable"), autocommit=True) as plain_client:
        assert tls_client.pgconn.ssl_in_use and not plain_client.pgconn.ssl_in_use
        before = check_tls_split(proxy, tls_client, plain_client, run)
        families = scrape(proxy)
        # The target's tls is verify-full: every database connection uses TLS.
        opened = value(families, "rdsproxy_database_connections", target="primary")
        assert opened >= 1
        assert value(families, "rdsproxy_database_connections_with_tls", target="primary") == opened
        requests = value(families, "rdsproxy_database_connection_requests", "_total")
        assert requests >= 1
        assert value(families, "rdsproxy_database_connection_requests_with_tls",
                     "_total") == requests
    check_tls_after_close(proxy, before)
    stats = proxy.stats()
    assert stats["ClientConnectionsTLS"] == 0 and stats["QueryRequestsTLS"] >= 20


def test_mysql_tls_figures(make_proxy, test_ca):
    px = make_proxy(admin=True, target={"name": "primary"},
                    tls={"cert_file": test_ca.server_cert, "key_file": test_ca.server_key})

    def run(conn, n):
        for i in range(n):
            assert scalar(conn, "SELECT %s", (i,)) == i

    tls_client = connect(px, ssl={"ca": test_ca.ca_cert})
    plain_client = connect(px, ssl_disabled=True)
    try:
        before = check_tls_split(px, tls_client, plain_client, run)
        families = scrape(px)
        # A target without tls: its connections are plaintext.
        assert value(families, "rdsproxy_database_connections", target="primary") >= 1
        assert value(families, "rdsproxy_database_connections_with_tls", target="primary") == 0
        assert value(families, "rdsproxy_database_connection_requests_with_tls", "_total") == 0
    finally:
        tls_client.close()
        plain_client.close()
    check_tls_after_close(px, before)


# -- AvailabilityPercentage -----------------------------------------------------------------

def test_availability_share_of_the_window():
    record = AvailabilityRecord()
    assert record.percentage(60, now=0.0) is None            # no verdict yet
    record.record(True, now=100.0)
    assert record.percentage(60, now=100.0) == 100.0
    assert record.percentage(60, now=130.0) == 100.0         # only the time since the verdict
    record.record(True, now=130.0)                            # a repeat changes nothing
    record.record(False, now=150.0)
    assert record.percentage(60, now=160.0) == pytest.approx(50 * 100 / 60)
    record.record(True, now=170.0)
    # [110, 170): up 110-150, down 150-170.
    assert record.percentage(60, now=170.0) == pytest.approx(40 * 100 / 60)
    # [140, 200): down 150-170 only.
    assert record.percentage(60, now=200.0) == pytest.approx(40 * 100 / 60)
    assert record.percentage(60, now=230.0) == 100.0          # the outage left the window
    assert record.percentage(10, now=175.0) == pytest.approx(50.0)
    record.record(False, now=240.0)
    assert record.percentage(60, now=240.0) == 100.0
    assert record.percentage(60, now=300.0) == 0.0


def test_availability_forgets_old_changes():
    record = AvailabilityRecord()
    for i in range(10000):
        record.record(i % 2 == 0, now=float(i))
    # Only the last hour's changes, and the one the hour starts in.
    assert len(record.changes) <= 3602
    assert record.percentage(60, now=10000.0) == pytest.approx(50.0)


def test_availability_falls_in_an_outage_and_recovers(proxy_factory, pg_factory):
    cluster = pg_factory(max_connections=20)
    cluster.create_user(APP_USER, APP_PASSWORD)
    cluster.create_database(APP_DB, owner=APP_USER)
    proxy = proxy_factory(cluster, admin=True, top={"availability_window": 3},
                          target={"name": "primary"}, **FAST_CHECKS)

    def availability():
        families = scrape(proxy)
        found = [s.value for s in families["rdsproxy_availability_percentage"].samples
                 if s.labels["target"] == "primary"]
        return found[0] if found else None

    wait_until(lambda: availability() == 100, timeout=15, message="available")
    cluster.kill()
    wait_until(lambda: availability() < 100, timeout=15, message="falls in the outage")
    wait_until(lambda: availability() == 0, timeout=15, message="0 over a window all down")
    assert proxy.stats()["AvailabilityPercentage"] == {"primary": 0}
    cluster.start()
    wait_until(lambda: 0 < availability() < 100, timeout=30, message="recovering")
    wait_until(lambda: availability() == 100, timeout=15, message="recovered")
