"""The connection budget: derived from max_connections, never exceeded, borrow timeout, idle trimming."""
from __future__ import annotations

import re
import threading
import time

import psycopg
import pytest
from harness import APP_DB, APP_PASSWORD, APP_USER
from utils import run_cmd, wait_until


def proxy_backends(cluster, user=APP_USER) -> int:
    """Client backends the proxy holds on `cluster` (its only client there is the proxy)."""
    # Health checks log in briefly as application_name rdsproxy-health; like RDS Proxy's
    # monitoring connections they are outside the pool's budget, so not counted here.
    return int(cluster.psql(f"select count(*) from pg_stat_activity where usename = '{user}' "
                            "and backend_type = 'client backend' "
                            "and application_name <> 'rdsproxy-health'"))


class BackendSampler:
    """Polls pg_stat_activity in a thread and keeps the maximum it saw."""

    def __init__(self, cluster, interval=0.1):
        self.cluster, self.interval = cluster, interval
        self.maximum = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.maximum = max(self.maximum, proxy_backends(self.cluster))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)


def pgbench(proxy_or_cluster_port, *args, timeout=120, dbname="bench", password=APP_PASSWORD):
    proc = run_cmd(["pgbench", "-h", "127.0.0.1", "-p", str(proxy_or_cluster_port), "-U", APP_USER,
                    "-n", *args, dbname], env={"PGPASSWORD": password}, timeout=timeout, check=False)
    out = proc.stdout + proc.stderr
    failed = re.search(r"number of failed transactions: (\d+)", out)
    tps = re.search(r"tps = ([\d.]+)", out)
    return proc.returncode, (int(failed.group(1)) if failed else None), \
        (float(tps.group(1)) if tps else 0.0), out


@pytest.fixture(scope="module")
def small_pg(request):
    """A PostgreSQL that can take only 50 connections, with pgbench tables."""
    from rdsproxy.devservers.postgres import PostgresCluster
    cluster = PostgresCluster(auth="scram-sha-256", max_connections=50)
    cluster.start()
    request.addfinalizer(cluster.stop)
    cluster.create_user(APP_USER, APP_PASSWORD)
    cluster.create_database("bench", owner=APP_USER)
    run_cmd(["pgbench", "-h", cluster.host, "-p", str(cluster.port), "-U", APP_USER, "-i", "-s", "1",
             "-q", "bench"], env={"PGPASSWORD": APP_PASSWORD}, timeout=120)
    return cluster


def test_budget_is_derived_from_max_connections(proxy_factory, pg):
    proxy = proxy_factory(max_connections_percent=25, max_idle_connections_percent=10)
    with psycopg.connect(proxy.dsn()) as conn:
        conn.execute("select 1")
    pool = proxy.stats()["pool"]
    assert pool["max"] == 15 and pool["max_idle"] == 6  # 25% and 10% of max_connections=60


def test_500_clients_through_20_connections(proxy_factory, small_pg):
    """The acceptance run: 500 pgbench clients, max_connections=50, 40% budget."""
    # md5 on the client leg keeps pgbench's own SCRAM work (500 logins) out of the run time.
    proxy = proxy_factory(small_pg, max_connections_percent=40, connection_borrow_timeout=60,
                          client_auth="POSTGRES_MD5")
    with BackendSampler(small_pg) as sampler:
        rc, failed, tps, out = pgbench(proxy.port, "-S", "-c", "500", "-j", "2", "-T", "20")
    assert rc == 0, out
    assert failed == 0 and tps > 0, out
    assert sampler.samples > 10
    assert 0 < sampler.maximum <= 20, f"saw {sampler.maximum} proxy backends"
    assert proxy.stats()["pool"]["open"] <= 20


def test_500_clients_directly_fail(small_pg):
    """The same load without the proxy runs out of connections (the problem we solve)."""
    rc, failed, tps, out = pgbench(small_pg.port, "-S", "-c", "500", "-j", "2", "-T", "2")
    assert rc != 0
    assert "too many clients" in out or "remaining connection slots" in out, out[-2000:]


def test_connection_per_transaction(proxy_factory, small_pg):
    """pgbench -C: a new client connection for every transaction (the Lambda pattern)."""
    proxy = proxy_factory(small_pg, max_connections_percent=40)
    rc, failed, tps, out = pgbench(proxy.port, "-C", "-S", "-c", "50", "-j", "2", "-T", "5")
    assert rc == 0 and failed == 0 and tps > 0, out
    assert proxy.stats()["pool"]["open"] <= 20


def test_borrow_timeout_is_an_error_for_that_client_only(proxy_factory):
    proxy = proxy_factory(max_connections_percent=2, connection_borrow_timeout=1)  # budget 1
    holder = psycopg.connect(proxy.dsn())
    holder.execute("select 1")  # psycopg opened a transaction: the only connection is held
    waiter = psycopg.connect(proxy.dsn(), autocommit=True)
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as info:
        waiter.execute("select 2")
    assert time.monotonic() - started >= 0.9
    assert info.value.sqlstate == "53300"
    assert "connection_borrow_timeout" in str(info.value)
    holder.commit()
    # The waiting client kept its connection to the proxy and works now.
    assert waiter.execute("select 3").fetchone() == (3,)
    assert proxy.stats()["DatabaseConnectionsBorrowTimeouts"] == 1
    holder.close()
    waiter.close()


def test_each_queued_waiter_times_out_on_its_own_deadline(proxy_factory):
    """Waiters behind the first join the queue in the relay (C); each still gets its own
    connection_borrow_timeout, counted from its own arrival."""
    proxy = proxy_factory(max_connections_percent=2, connection_borrow_timeout=1.5)  # budget 1
    holder = psycopg.connect(proxy.dsn())
    holder.execute("select 1")  # the only connection is held
    outcomes = {}

    def waiter(i):
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            started = time.monotonic()
            try:
                conn.execute("select 2")
                outcomes[i] = ("served", time.monotonic() - started)
            except psycopg.OperationalError as exc:
                outcomes[i] = (exc.sqlstate, time.monotonic() - started)
            # Refused once, the session goes on: it is served when a connection is free.
            wait_until(lambda: proxy.stats()["pool"]["borrowed"] == 0, timeout=10,
                       message="holder committed")
            assert conn.execute("select 3").fetchone() == (3,)

    threads = []
    for i in range(3):
        threads.append(threading.Thread(target=waiter, args=(i,)))
        threads[-1].start()
        wait_until(lambda: proxy.stats()["pool"]["waiting"] == i + 1, message=f"waiter {i} queued")
        time.sleep(0.4)  # staggered arrivals: staggered deadlines
    wait_until(lambda: len(outcomes) == 3, timeout=10, message="all three timed out")
    holder.commit()
    for t in threads:
        t.join(15)
    assert [outcomes[i][0] for i in range(3)] == ["53300"] * 3, outcomes
    assert all(1.3 <= outcomes[i][1] < 3.0 for i in range(3)), outcomes
    assert proxy.stats()["DatabaseConnectionsBorrowTimeouts"] == 3
    holder.close()


def test_waiters_are_served_in_arrival_order(proxy_factory):
    proxy = proxy_factory(max_connections_percent=2, connection_borrow_timeout=20)
    holder = psycopg.connect(proxy.dsn())
    holder.execute("select 1")
    order = []
    lock = threading.Lock()

    def client(i):
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            served_at = conn.execute("select clock_timestamp()").fetchone()[0]
            with lock:
                order.append((served_at, i))

    threads = []
    for i in range(5):
        t = threading.Thread(target=client, args=(i,))
        t.start()
        threads.append(t)
        wait_until(lambda: proxy.stats()["pool"]["waiting"] == i + 1, message=f"waiter {i} queued")
    holder.commit()
    for t in threads:
        t.join(20)
    assert [i for _, i in sorted(order)] == [0, 1, 2, 3, 4]  # the server's order of service
    holder.close()


def test_excess_idle_connections_are_closed(proxy_factory, pg):
    proxy = proxy_factory(max_connections_percent=20, max_idle_connections_percent=5,
                          idle_connection_grace=0.5)  # budget 12, at most 3 idle
    conns = [psycopg.connect(proxy.dsn()) for _ in range(8)]
    for conn in conns:
        conn.execute("select 1")  # eight open transactions: eight server connections
    assert proxy.stats()["pool"]["open"] == 8
    for conn in conns:
        conn.commit()
    wait_until(lambda: proxy.stats()["pool"]["open"] == 3, timeout=5, message="idle trimmed to 3")
    wait_until(lambda: proxy_backends(pg) == 3, timeout=5, message="server sees 3")
    for conn in conns:
        conn.close()


def test_init_query_runs_on_every_new_connection(proxy_factory):
    proxy = proxy_factory(init_query="SET statement_timeout = '12345ms'")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("show statement_timeout").fetchone()[0] == "12345ms"
        conn.execute("CREATE TEMP TABLE pin_and_reset(a int)")  # pins; reset on exit
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("show statement_timeout").fetchone()[0] == "12345ms"


def test_budget_is_shared_by_users_and_databases(proxy_factory, pg):
    pg.create_user("budget2", "budget2-secret")
    proxy = proxy_factory(users=[(APP_USER, APP_PASSWORD), ("budget2", "budget2-secret")],
                          max_connections_percent=2, connection_borrow_timeout=10)
    for _ in range(3):  # alternate users on a budget of one: the connection is traded
        with psycopg.connect(proxy.dsn(), autocommit=True) as a:
            assert a.execute("select current_user").fetchone()[0] == APP_USER
        with psycopg.connect(proxy.dsn(user="budget2", password="budget2-secret", dbname=APP_DB),
                             autocommit=True) as b:
            assert b.execute("select current_user").fetchone()[0] == "budget2"
        assert proxy.stats()["pool"]["open"] <= 1


def test_max_client_connections_refuses_the_next_client(proxy_factory):
    """Over max_client_connections a client gets 53300 like PostgreSQL's own limit; the
    others keep working and a slot frees when one leaves."""
    proxy = proxy_factory(top={"max_client_connections": 3})
    held = [psycopg.connect(proxy.dsn(), autocommit=True) for _ in range(3)]
    try:
        with pytest.raises(psycopg.OperationalError, match="too many clients already"):
            psycopg.connect(proxy.dsn())
        assert all(c.execute("SELECT 1").fetchone()[0] == 1 for c in held)
        assert proxy.stats()["ClientConnectionsRefused"] == 1
        held.pop().close()
        wait_until(lambda: proxy.stats()["ClientConnections"] == 2, message="slot freed")
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            assert conn.execute("SELECT 2").fetchone()[0] == 2
    finally:
        for c in held:
            c.close()
