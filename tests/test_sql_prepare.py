"""Statements a client makes with SQL PREPARE travel with it instead of pinning it.

Two clients take turns on a pool of one connection; what each sees is compared with two
direct sessions running the same turns. Each client's PREPAREs are made again on the
connection it borrows and dropped before another client gets it, so neither can EXECUTE,
DEALLOCATE or see the other's.
"""
from __future__ import annotations

import os
import socket

import psycopg
import pytest

from differential import stats_around_turns, take_turns
from harness import ONE_CONNECTION
from utils import wait_until

CLIENT_STATEMENTS = ("select coalesce(string_agg(name, ',' order by name), '-')"
                     " from pg_prepared_statements where from_sql")


SCENARIOS = {
    "each_client_its_own": [
        (0, "prepare twice(int) as select $1 * 2"), (1, CLIENT_STATEMENTS),
        (1, "execute twice(4)"), (0, "execute twice(21)"),
        (1, "prepare twice as select 'the other one'"), (0, "execute twice(2)"),
        (1, "execute twice"), (0, CLIENT_STATEMENTS), (1, CLIENT_STATEMENTS)],
    "deallocate_one_and_all": [
        (0, "prepare a as select 1"), (0, "prepare b as select 2"), (1, "prepare a as select 3"),
        (0, "deallocate a"), (0, "execute a"), (1, "execute a"), (0, "execute b"),
        (0, "deallocate all"), (0, "execute b"), (1, "execute a"), (0, CLIENT_STATEMENTS),
        (0, "deallocate prepare a"), (1, "deallocate prepare a"), (1, "execute a")],
    "prepare_is_not_undone_by_rollback": [
        (0, "begin"), (0, "prepare kept as select 'kept'"), (0, "rollback"), (1, "execute kept"),
        (0, "execute kept")],
    "failed_prepare_and_duplicate": [
        (0, "prepare bad as select * from no_such_table"), (0, "execute bad"),
        (0, "prepare dup as select 1"), (1, "prepare dup as select 2"),
        (0, "prepare dup as select 3"), (0, "execute dup"), (1, "execute dup")],
    "several_in_one_text": [
        (0, "prepare x as select 'x;'; select 1; prepare \"Y z\"(text) as select $1 || 'y'"),
        (1, "execute x"), (0, "execute x"), (0, "execute \"Y z\"('why ')"), (1, CLIENT_STATEMENTS),
        (0, CLIENT_STATEMENTS)],
    "made_by_code_the_text_does_not_show": [
        (0, "do $$ begin execute 'prepare ' || 'dyn as select 42'; end $$"), (1, "execute dyn"),
        (0, "execute dyn")],
    "read_under_the_clients_settings": [
        (0, "prepare mem as select current_setting('work_mem')"), (0, "set work_mem = '9MB'"),
        (1, "set work_mem = '11MB'"), (1, "prepare mem as select 'mine: ' || current_setting('work_mem')"),
        (0, "execute mem"), (1, "execute mem"), (0, "reset work_mem"), (0, "execute mem")],
    "execute_arguments_still_inspected": [
        (0, "prepare echo(text) as select $1"), (1, "show work_mem"),
        (0, "execute echo(set_config('work_mem', '3MB', false))"), (1, "show work_mem"),
        (0, "show work_mem")],
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_sql_statements_follow_their_client(one_connection, name):
    one_connection.assert_same(lambda side: take_turns(side, SCENARIOS[name]))


def test_sql_prepare_does_not_pin(one_connection):
    before, after = stats_around_turns(one_connection, SCENARIOS["each_client_its_own"],
                                       SCENARIOS["several_in_one_text"])
    assert after["SessionPinReasons"] == before["SessionPinReasons"]
    assert after["SQLStatementsAdopted"] >= before["SQLStatementsAdopted"] + 3


UNREADABLE = {
    # Which of the two is left is not in the text the server keeps.
    "made_twice_in_one_text": [
        (0, "prepare twice_made as select 1; deallocate twice_made; prepare twice_made as select 2"),
        (0, "execute twice_made")],
    # A backslash reads two ways while standard_conforming_strings is off.
    "backslash_while_strings_are_not_standard": [
        (0, "set standard_conforming_strings = off"), (0, "prepare quoted as select 'it\\'s'"),
        (0, "execute quoted")],
}


@pytest.mark.parametrize("name", sorted(UNREADABLE))
def test_statement_the_proxy_cannot_make_again_pins(one_connection, name):
    before = one_connection.proxied.stats()["SessionPinReasons"].get("prepared_statement", 0)
    # One client alone: pinned, it keeps the one connection.
    one_connection.assert_same(lambda side: take_turns(side, UNREADABLE[name]))
    after = one_connection.proxied.stats()["SessionPinReasons"].get("prepared_statement", 0)
    assert after == before + 1


def test_a_vanished_clients_statements_are_dropped(proxy_factory):
    proxy = proxy_factory(**ONE_CONNECTION)
    first = psycopg.connect(proxy.dsn(), autocommit=True)
    first.execute("prepare first_only as select 'first client only'")
    socket.socket(fileno=os.dup(first.fileno())).shutdown(socket.SHUT_RDWR)   # gone, no goodbye
    with psycopg.connect(proxy.dsn(), autocommit=True) as second:
        assert second.execute(CLIENT_STATEMENTS).fetchone()[0] == "-"
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            second.execute("execute first_only")
    first.close()


def test_a_statement_that_cannot_be_made_again_is_lost_alone(proxy_factory):
    """Directly, EXECUTE of a statement whose table was dropped fails for the table; through
    the proxy the statement could not be made again on the next connection, so it fails as
    unknown (README: differences). The client's other statements and session go on."""
    proxy = proxy_factory(**ONE_CONNECTION)
    table = f"gone_soon_{os.getpid()}"
    with psycopg.connect(proxy.dsn(), autocommit=True) as owner, \
            psycopg.connect(proxy.dsn(), autocommit=True) as other:
        owner.execute(f"create table {table} (a int)")
        owner.execute(f"prepare counting as select count(*) from {table}")
        owner.execute("prepare greeting as select 'still here'")
        assert owner.execute("execute counting").fetchone()[0] == 0
        other.execute(f"drop table {table}")
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            owner.execute("execute counting")
        assert owner.execute("execute greeting").fetchone()[0] == "still here"
        assert proxy.stats()["SessionPinReasons"] == {}


ATTACKS = {
    # Names a statement the proxy made for another client: unknown, as it is to a direct
    # session; where the proxy cannot see it dropped (in DO), it makes it again.
    "drop_the_proxys": ("deallocate rdsproxy_1", {}),
    "drop_the_proxys_in_do": ("do $$ begin execute 'deallocate rdsproxy_1'; end $$", {}),
    # Makes one under the proxy's name, as if it were the other client's: pinned, alone.
    "make_one_under_its_name": (
        "do $$ begin execute 'deallocate rdsproxy_1';"
        " execute 'prepare rdsproxy_1 as select ''evil''::text'; end $$",
        {"prepared_statement": 1}),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_sql_cannot_pass_for_the_proxys_statements(proxy_factory, name):
    attack, pins = ATTACKS[name]
    proxy = proxy_factory(**ONE_CONNECTION)
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as victim:
        # Prepared by name on the one connection: the proxy's rdsproxy_1 there.
        assert victim.execute("select %s::text", ["mine"]).fetchone()[0] == "mine"
        with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None) as attacker:
            if name == "drop_the_proxys":
                with pytest.raises(psycopg.errors.InvalidSqlStatementName):
                    attacker.execute(attack)
            else:
                attacker.execute(attack)
            wait_until(lambda: proxy.stats()["SessionPinReasons"] == pins
                       and proxy.stats()["SessionStateChecks"] >= 1, message="state checked")
            if not pins:
                assert victim.execute("select %s::text", ["mine"]).fetchone()[0] == "mine"
        for _ in range(3):
            assert victim.execute("select %s::text", ["mine"]).fetchone()[0] == "mine"
