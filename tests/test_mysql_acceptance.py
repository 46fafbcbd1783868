"""The acceptance run: 500 concurrent PyMySQL clients through the proxy against a
MariaDB with max_connections=50 (the session one), and the same load straight at MariaDB.

Each client thread connects, runs two queries and a short transaction, and disconnects,
over and over for 15 s (through the proxy, a client that has not finished a session by then
goes on until it has: the test asks that every client is served, not how fast). Through
the proxy (a subprocess with its own event loop, as in production;
max_connections_percent=40, so a budget of 20) no client may see an error, and SHOW
PROCESSLIST, sampled every 20 ms, may never show more than 20 server connections of the
application user. The health checks are outside the budget, like RDS Proxy's
monitoring connections, and are excluded explicitly: they log in as their own user
(`monitor`, the first [[auth]] entry, which the proxy uses for probes), and since a
connection still logging in shows as "unauthenticated user" whoever it is, the checks run
every 30 s here, so none falls inside the 15 s of load. Server connections still logging in
are counted as the application's.
Straight at MariaDB the same load must fail (error 1040, too many connections).
"""
from __future__ import annotations

import threading
import time

import pymysql
import pytest

from harness import APP_DB, APP_PASSWORD as APP_PW, APP_USER as APP
from proxyproc import ProxyProcess
from rdsproxy.devservers.mariadb import MariaDBServer

MONITOR, MONITOR_PW = "monitor", "monitor-secret"
CLIENTS = 500
DURATION = 15.0
DIRECT_DURATION = 5.0


@pytest.fixture(scope="module")
def mdb(mariadb):
    """The session MariaDB with the monitor user the health checks log in as and the table
    the load writes to; both go at the end of the module."""
    mariadb.create_user(MONITOR, MONITOR_PW, grant=None)
    mariadb.sql("CREATE TABLE hits (id BIGINT AUTO_INCREMENT PRIMARY KEY, worker INT)",
                database=APP_DB)
    yield mariadb
    mariadb.drop_user(MONITOR)
    mariadb.sql("DROP TABLE hits", database=APP_DB)


def run_load(host: str, port: int, duration: float, io_timeout: float = 120,
             until_each_served: bool = False):
    """CLIENTS threads looping connect / 2 queries / a transaction / close; returns
    (sessions completed by each client, errors by kind). With until_each_served, a client
    with no completed session keeps going past `duration` (up to io_timeout more)."""
    stop_at = time.monotonic() + duration
    give_up_at = stop_at + io_timeout
    done = [0] * CLIENTS
    errors: dict = {}
    lock = threading.Lock()
    start = threading.Barrier(CLIENTS)

    def worker(i: int) -> None:
        start.wait()
        while True:
            now = time.monotonic()
            if now >= stop_at and not (until_each_served and done[i] == 0 and now < give_up_at):
                break
            try:
                c = pymysql.connect(host=host, port=port, user=APP, password=APP_PW,
                                    database=APP_DB, autocommit=True,
                                    connect_timeout=min(60, io_timeout), read_timeout=io_timeout,
                                    write_timeout=io_timeout, ssl_disabled=True)
                try:
                    with c.cursor() as cur:
                        cur.execute("SELECT 1")
                        cur.execute("SELECT v FROM t WHERE id = %s", (i % 3 + 1,))
                        assert cur.fetchone()[0] in ("a", "b", "c")
                        c.begin()
                        cur.execute("INSERT INTO hits (worker) VALUES (%s)", (i,))
                        cur.execute("SELECT COUNT(*) FROM hits WHERE worker = %s", (i,))
                        c.commit()
                finally:
                    c.close()
                done[i] += 1
            except Exception as exc:  # noqa: BLE001 - counted, the point of the test
                key = f"{type(exc).__name__}: {exc.args[0] if exc.args else ''}"
                with lock:
                    errors[key] = errors.get(key, 0) + 1
                time.sleep(0.05)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(CLIENTS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(duration + io_timeout + 30)
    return done, errors


class Sampler(threading.Thread):
    """SHOW PROCESSLIST (as root, over the unix socket) every 20 ms: the most connections
    of the application (and not-yet-authenticated ones) seen at once."""

    def __init__(self, server: MariaDBServer):
        super().__init__(daemon=True)
        self.conn = pymysql.connect(unix_socket=server.socket_path, user="root")
        self.peak = 0
        self.samples = 0
        self.worst: list = []
        self.running = True

    def run(self) -> None:
        with self.conn.cursor() as cur:
            while self.running:
                cur.execute("SELECT USER, COMMAND, STATE, INFO, TIME_MS FROM "
                            "information_schema.PROCESSLIST "
                            "WHERE USER IN (%s, 'unauthenticated user')", (APP,))
                rows = cur.fetchall()
                if len(rows) > self.peak:
                    self.peak, self.worst = len(rows), rows
                self.samples += 1
                time.sleep(0.02)

    def stop(self) -> None:
        self.running = False
        self.join(5)
        self.conn.close()


def test_500_clients_through_the_proxy_with_a_budget_of_20(mdb, tmp_path):
    proxy = ProxyProcess(tmp_path, mdb, [(MONITOR, MONITOR_PW), (APP, APP_PW)], engine="mysql",
                         # 500 clients from one address stand for a fleet behind NAT: on a
                         # loaded machine more than the default 100 are mid-login at once.
                         top={"max_client_connections": 2000, "max_logins_per_address": 1000},
                         max_connections_percent=40,
                         connection_borrow_timeout=120, health_check_interval=30)
    sampler = Sampler(mdb)
    sampler.start()
    try:
        done, errors = run_load(proxy.host, proxy.port, DURATION, until_each_served=True)
    finally:
        sampler.stop()
        proxy.stop()
    print(f"through the proxy: {sum(done)} sessions, fewest by one client {min(done)}, "
          f"errors {errors}, peak server connections {sampler.peak} "
          f"over {sampler.samples} samples")
    if sampler.peak > 20:
        print("\n".join(map(str, sampler.worst)))
    assert errors == {}
    assert min(done) >= 1, f"{done.count(0)} clients never completed a session"
    assert sampler.samples > 100
    assert 0 < sampler.peak <= 20


def test_the_same_load_straight_at_mariadb_fails(mdb):
    # Short timeouts: an overloaded server also leaves clients hanging in its handshake.
    done, errors = run_load(mdb.host, mdb.port, DIRECT_DURATION, io_timeout=10)
    print(f"direct: {sum(done)} sessions, errors {errors}")
    assert sum(errors.values()) > 0
    assert any("1040" in key for key in errors), errors
