"""max_connection_lifetime, for both engines: a database connection is lent only within its
lifetime, whether it comes from the idle stack or straight back from another client of a
saturated pool."""
from __future__ import annotations

import threading
import time

import psycopg
import pymysql
import pytest

from harness import APP_DB, APP_PASSWORD, APP_USER

LIFETIME = 1.0
ENGINES = pytest.mark.parametrize("engine", ["postgres", "mysql"])


def _connect(engine: str, port: int):
    """A client of `engine` through the proxy, and a statement naming its server connection
    (MySQL's CONNECTION_ID() is the proxy's id for the client; the thread id is the server's)."""
    if engine == "postgres":
        conn = psycopg.connect(host="127.0.0.1", port=port, user=APP_USER, password=APP_PASSWORD,
                               dbname=APP_DB, autocommit=True)
        return conn, "SELECT pg_backend_pid()"
    conn = pymysql.connect(host="127.0.0.1", port=port, user=APP_USER, password=APP_PASSWORD,
                           database=APP_DB, autocommit=True)
    return conn, "SELECT @@pseudo_thread_id"


def _server_id(conn, sql: str) -> int:
    cur = conn.cursor()
    cur.execute(sql)
    return cur.fetchone()[0]


def _ids_over_time(engine: str, port: int, clients: int, seconds: float) -> dict:
    """Every client asks for its server connection's id back to back; when each was seen."""
    seen: dict[int, list[float]] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []
    stop_at = time.monotonic() + seconds

    def run():
        try:
            conn, sql = _connect(engine, port)
            with conn:
                while time.monotonic() < stop_at:
                    server_id = _server_id(conn, sql)
                    with lock:
                        seen.setdefault(server_id, []).append(time.monotonic())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    assert not errors, errors
    return seen


@ENGINES
def test_a_connection_handed_from_client_to_client_is_retired(proxy_factory, engine):
    # One connection, three clients asking back to back: it goes from one client to the
    # next without ever being idle, so only the check on its way back can retire it.
    proxy = proxy_factory(engine=engine, max_connections_percent=2,
                          max_connection_lifetime=LIFETIME)
    seen = _ids_over_time(engine, proxy.port, clients=3, seconds=5 * LIFETIME)
    assert len(seen) >= 3, f"only server connections {sorted(seen)} in {5 * LIFETIME:g} s"
    for server_id, times in seen.items():
        # Its lifetime, plus the coarse clock's second of lag and a scheduling margin.
        assert times[-1] - times[0] < LIFETIME + 1.5, (server_id, times[-1] - times[0])


@ENGINES
def test_an_idle_connection_past_its_lifetime_is_not_lent(proxy_factory, engine):
    proxy = proxy_factory(engine=engine, max_connection_lifetime=LIFETIME)
    conn, sql = _connect(engine, proxy.port)
    with conn:
        first = _server_id(conn, sql)
        time.sleep(LIFETIME + 1.5)
        assert _server_id(conn, sql) != first
