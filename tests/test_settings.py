"""Settings a client changes (SET, RESET, set_config) travel with it instead of pinning it.

Two clients take turns on a pool of one connection; what each sees of its settings is
compared with two direct sessions running the same turns.
"""
from __future__ import annotations

import psycopg
import pytest

from differential import stats_around_turns, take_turns
from harness import ONE_CONNECTION
from utils import concurrently, wait_until


SCENARIOS = {
    "set_then_other_client": [
        (0, "set work_mem = '77MB'"), (1, "show work_mem"), (0, "show work_mem"),
        (1, "show work_mem"), (0, "select current_setting('work_mem')")],
    "set_config_session_and_local": [
        (0, "select set_config('work_mem', '66MB', false)"), (1, "show work_mem"),
        (0, "show work_mem"), (0, "begin"), (0, "select set_config('work_mem', '9MB', true)"),
        (0, "show work_mem"), (0, "commit"), (0, "show work_mem")],
    "rolled_back_set_is_undone": [
        (0, "begin"), (0, "set work_mem = '55MB'"), (0, "show work_mem"), (0, "rollback"),
        (1, "show work_mem"), (0, "show work_mem")],
    "set_local_is_not_kept": [
        (0, "begin"), (0, "set local statement_timeout = '3s'"), (0, "show statement_timeout"),
        (0, "commit"), (1, "show statement_timeout"), (0, "show statement_timeout")],
    "reset_and_reset_all": [
        (0, "set work_mem = '12MB'"), (0, "set lock_timeout = '7s'"), (1, "set work_mem = '13MB'"),
        (0, "reset work_mem"), (0, "show work_mem"), (0, "show lock_timeout"), (1, "show work_mem"),
        (0, "reset all"), (0, "show lock_timeout"), (1, "show work_mem")],
    "list_settings_keep_their_elements": [
        (0, "set search_path = pg_catalog, public"), (1, "show search_path"),
        (0, "show search_path"), (0, "select current_schemas(false)::text")],
    "timezone_any_spelling": [
        (0, "set TimeZone = 'Asia/Tokyo'"), (1, "set timezone = 'America/Lima'"),
        (0, "select now()::text like '%+09'"), (1, "show TimeZone"), (0, "show timezone")],
    # A plain SET asks the server for its setting only; anything else in the same
    # transaction (here a set_config) has the whole session read.
    "set_then_set_config_in_one_transaction": [
        (0, "begin"), (0, "set work_mem = '3MB'"),
        (0, "select set_config('lock_timeout', '4s', false)"), (0, "commit"),
        (1, "show lock_timeout"), (0, "show lock_timeout"), (0, "show work_mem")],
    "set_and_set_config_in_one_text": [
        (0, "set work_mem = '6MB'; select set_config('lock_timeout', '5s', false)"),
        (1, "show lock_timeout"), (0, "show lock_timeout"), (0, "show work_mem")],
    "set_custom_and_spelled_forms": [
        (0, "set myapp.tenant = 'acme'; set time zone 'Asia/Tokyo'; set schema 'pg_catalog'"),
        # (an empty placeholder another client defined is visible: README, differences)
        (1, "select coalesce(nullif(current_setting('myapp.tenant', true), ''), '-')"),
        (0, "select current_setting('myapp.tenant')"), (0, "show timezone"),
        (0, "show search_path"), (1, "show search_path"), (0, "reset myapp.tenant"),
        (0, "select coalesce(current_setting('myapp.tenant', true), '-')")],
    "bad_value_changes_nothing": [
        (0, "set work_mem = '5MB'"), (0, "set work_mem = 'lots'"), (1, "show work_mem"),
        (0, "show work_mem")],
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_settings_follow_their_client(one_connection, name):
    one_connection.assert_same(lambda side: take_turns(side, SCENARIOS[name]))


def test_set_does_not_pin(one_connection):
    before, after = stats_around_turns(one_connection, SCENARIOS["set_then_other_client"])
    assert after["SessionPinReasons"] == before["SessionPinReasons"]
    assert after["SettingsAdopted"] > before["SettingsAdopted"]


def test_plain_set_reads_only_its_settings(one_connection):
    """A transaction whose only marked statements were plain SETs costs a read of those
    settings, not the whole state check; one with anything more gets the whole check."""
    def counts():
        stats = one_connection.proxied.stats()
        return stats["SettingsChecks"], stats["SessionStateChecks"]
    light, full = counts()
    take_turns(one_connection.proxy, SCENARIOS["set_then_other_client"])
    assert counts() == (light + 1, full)
    take_turns(one_connection.proxy, SCENARIOS["set_and_set_config_in_one_text"])
    assert counts() == (light + 1, full + 1)


def test_many_clients_each_see_their_own_time_zone(proxy_factory):
    proxy = proxy_factory(max_connections_percent=4)   # two connections
    zones = ["UTC", "Asia/Tokyo", "America/Lima", "Europe/Paris", "Australia/Sydney",
             "Africa/Cairo", "America/New_York", "Asia/Kolkata"]

    def client(zone):
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:   # driver defaults
            conn.execute(f"set time zone '{zone}'")
            return {conn.execute("show timezone").fetchone()[0] for _ in range(30)}

    assert concurrently(client, zones) == {zone: {zone} for zone in zones}
    stats = proxy.stats()
    assert stats["SessionPinReasons"] == {} and stats["pool"]["open"] <= 2


def test_list_startup_parameter_keeps_its_elements(one_connection):
    """A list setting from the startup packet is applied as the server reads it there."""
    async def use(con):
        return [await con.fetchval("show search_path"),
                await con.fetchval("select current_schemas(false)::text")]
    one_connection.assert_same(
        lambda side: side.asyncpg_session(use, search_path="pg_catalog, public"))


@pytest.mark.parametrize("change", ["set statement_timeout = '5s'", "reset statement_timeout",
                                    "reset all"])
def test_init_query_settings_survive_a_client_that_changes_them(proxy_factory, change):
    """init_query's settings are the proxy's, for every client: a client that changes one
    is pinned (other settings still travel), and the next client finds the proxy's value."""
    proxy = proxy_factory(init_query="SET statement_timeout = '31s'", **ONE_CONNECTION)
    with psycopg.connect(proxy.dsn(), autocommit=True) as first, \
            psycopg.connect(proxy.dsn(), autocommit=True) as second:
        first.execute("set work_mem = '21MB'")
        assert second.execute("show statement_timeout").fetchone()[0] == "31s"
        assert second.execute("show work_mem").fetchone()[0] == "4MB"
        assert first.execute("show work_mem").fetchone()[0] == "21MB"
        assert proxy.stats()["SessionPinReasons"] == {}
        first.execute(change)
        # (the check runs once the answer has gone to the client)
        wait_until(lambda: proxy.stats()["SessionPinReasons"] == {"set_variable": 1},
                   message="pinned by the state check")
    wait_until(lambda: proxy.stats()["pool"]["borrowed"] == 0, message="connection returned")
    with psycopg.connect(proxy.dsn(), autocommit=True) as third:
        assert third.execute("show statement_timeout").fetchone()[0] == "31s"
        assert third.execute("show work_mem").fetchone()[0] == "4MB"
