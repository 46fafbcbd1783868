"""What the client sees of the server itself through the proxy: the server's own fatal
errors, the settings it reports, compared with a direct connection."""
from __future__ import annotations

import asyncio
import threading
import time

import asyncpg
import psycopg
import pytest
from differential import error_of, proxied_differential
from utils import run


@pytest.fixture(scope="module")
def diff(tmp_path_factory, pg):
    with proxied_differential(tmp_path_factory.mktemp("proxy"), pg, max_connections_percent=5) as differential:
        yield differential


def terminate_backend_of(diff, application_name):
    with diff.direct.connect(user="postgres", password=diff.cluster.superuser_password,
                             dbname="postgres") as admin:
        pids = [row[0] for row in admin.execute(
            "select pid from pg_stat_activity where application_name = %s", (application_name,))]
        assert len(pids) == 1, pids
        admin.execute("select pg_terminate_backend(%s)", (pids[0],))


def after_terminate(side, diff, setup: str, when: str):
    """A psycopg session whose backend an administrator terminates: what its next
    statement (or the one running) gets."""
    name = f"victim_{side.name}_{when}_{abs(hash(setup)) % 1000}"
    with side.connect(application_name=name) as conn:
        if setup:
            conn.execute(setup)
        if when == "running":
            timer = threading.Timer(0.5, terminate_backend_of, (diff, name))
            timer.start()
            try:
                try:
                    conn.execute("select pg_sleep(5)")
                    return "ok"
                except psycopg.Error as exc:
                    return error_of(exc)
            finally:
                timer.join()
        terminate_backend_of(diff, name)
        time.sleep(0.3)
        try:
            conn.execute("select 1")
            return "ok"
        except psycopg.Error as exc:
            return error_of(exc)


@pytest.mark.parametrize("setup", ["create temp table pinned_here (x int)", "begin", "select 1"],
                         ids=["pinned", "in_transaction", "autocommit"])
@pytest.mark.parametrize("when", ["idle", "running"])
def test_the_servers_fatal_error_reaches_the_client(diff, setup, when):
    scenario = lambda side: after_terminate(side, diff, setup, when)
    if setup == "select 1" and when == "idle":
        # A documented difference: between transactions a client holds no backend, so
        # terminating the idle pooled one it last used ends no client session.
        seen = diff.run(scenario)
        terminated = ("error", "57P01", "terminating connection due to administrator command")
        assert seen == {"direct": terminated, "proxy": "ok"}, seen
        return
    seen = diff.assert_same(scenario)
    assert seen[1] == "57P01", seen


def test_the_servers_fatal_error_reaches_asyncpg(diff):
    def scenario(side):
        async def go():
            name = f"victim_async_{side.name}"
            con = await side.asyncpg(application_name=name)
            try:
                await con.execute("create temp table pinned_async (x int)")
                terminate_backend_of(diff, name)
                await asyncio.sleep(0.3)
                try:
                    await con.fetchval("select 1")
                    return "ok"
                except asyncpg.PostgresError as exc:
                    return error_of(exc)
                except asyncpg.InterfaceError as exc:
                    return ("interface", type(exc).__name__)
            finally:
                await con.close()
        return run(go())
    diff.assert_same(scenario)



# The settings PostgreSQL 15 reports in ParameterStatus (GUC_REPORT).
REPORTED = ("application_name", "client_encoding", "DateStyle", "default_transaction_read_only",
            "in_hot_standby", "integer_datetimes", "IntervalStyle", "is_superuser",
            "server_encoding", "server_version", "session_authorization",
            "standard_conforming_strings", "TimeZone")


def greeting(side, settings):
    """Every ParameterStatus the client got at login (asyncpg keeps them all), or the
    login's error."""
    async def reported(con):
        settings_seen = con.get_settings()
        return {name: getattr(settings_seen, name, None) for name in (*REPORTED, *settings)}
    return side.asyncpg_session(reported, **settings)


@pytest.mark.parametrize("settings", [
    {},
    {"client_encoding": "utf8"},
    {"client_encoding": "euc-jp"},
    {"DateStyle": "german"},
    {"datestyle": "iso, dmy", "TimeZone": "europe/paris", "intervalstyle": "sql_standard"},
    {"search_path": "public", "extra_float_digits": "2", "application_name": "x y"},
    {"client_encoding": "nonsense"},
    {"DateStyle": "garbage"},
    {"foo.bar": "1"},
], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "none")
def test_login_reports_what_the_server_uses(diff, settings):
    diff.assert_same(lambda side: greeting(side, settings))


def notifications(side):
    """LISTEN on one session; NOTIFY from itself and from a second session: whether each
    notification's pid is the notifier's own backend pid as the client knows it."""
    with side.connect() as listener, side.connect() as other:
        listener.execute("listen view_channel")
        listener.execute("notify view_channel, 'mine'")
        other.execute("select 1")       # a backend of its own, as its BackendKeyData says
        other.execute("notify view_channel, 'theirs'")
        seen = []
        for n in listener.notifies(timeout=5, stop_after=2):
            seen.append((n.channel, n.payload, n.pid == listener.info.backend_pid,
                         n.pid == other.info.backend_pid))
        return seen


def test_notifications_carry_the_pid_the_client_knows(diff):
    assert diff.assert_same(notifications) == [("view_channel", "mine", True, False),
                                               ("view_channel", "theirs", False, True)]
