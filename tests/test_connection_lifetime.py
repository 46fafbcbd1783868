"""max_connection_lifetime: a database connection is lent only within its lifetime, whether it
comes from the idle stack or straight back from another client of a saturated pool."""
from __future__ import annotations

import threading
import time

import psycopg

from conftest import APP_DB, APP_PASSWORD, APP_USER

LIFETIME = 1.0


def _pids_over_time(port: int, clients: int, seconds: float) -> dict[int, list[float]]:
    """Every client asks for its backend's pid back to back; when each pid was seen."""
    seen: dict[int, list[float]] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []
    stop_at = time.monotonic() + seconds

    def run():
        try:
            with psycopg.connect(host="127.0.0.1", port=port, user=APP_USER,
                                 password=APP_PASSWORD, dbname=APP_DB, autocommit=True) as conn:
                while time.monotonic() < stop_at:
                    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
                    with lock:
                        seen.setdefault(pid, []).append(time.monotonic())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    assert not errors, errors
    return seen


def test_a_connection_handed_from_client_to_client_is_retired(proxy_factory):
    # One connection, three clients asking back to back: it goes from one client to the
    # next without ever being idle, so only the check on its way back can retire it.
    proxy = proxy_factory(max_connections_percent=1, max_connection_lifetime=LIFETIME)
    seen = _pids_over_time(proxy.port, clients=3, seconds=5 * LIFETIME)
    assert len(seen) >= 3, f"only backends {sorted(seen)} in {5 * LIFETIME:g} s"
    for pid, times in seen.items():
        # Its lifetime, plus the coarse clock's second of lag and a scheduling margin.
        assert times[-1] - times[0] < LIFETIME + 1.5, (pid, times[-1] - times[0])


def test_an_idle_connection_past_its_lifetime_is_not_lent(proxy_factory):
    proxy = proxy_factory(max_connection_lifetime=LIFETIME)
    with psycopg.connect(host="127.0.0.1", port=proxy.port, user=APP_USER,
                         password=APP_PASSWORD, dbname=APP_DB, autocommit=True) as conn:
        first = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        time.sleep(LIFETIME + 1.5)
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] != first
