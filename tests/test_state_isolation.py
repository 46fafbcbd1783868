"""No client inherits another's session state, however the state was made.

Each attack runs through a proxy whose budget is one server connection, so the next
client is served by the very backend the attacker used. The attacker's state must stay
with the attacker (pinned, with its reason counted) and the next client must see a clean
session: its own role, the default search_path, no lock, channel, statement or temporary
object of anyone else's.
"""
from __future__ import annotations

import asyncio
import itertools

import asyncpg
import psycopg
import pytest
from harness import APP_DB
from utils import function_call, md5_session, message_fields, recv_message, wait_until

SETUP = r"""
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'iso_admin') THEN
    CREATE ROLE iso_admin NOLOGIN;
  END IF;
END $$;
ALTER ROLE iso_user NOINHERIT;   -- a member acts as iso_admin only after SET ROLE
GRANT iso_admin TO iso_user;
CREATE TABLE IF NOT EXISTS iso_secret (v text);
ALTER TABLE iso_secret OWNER TO iso_admin;
REVOKE ALL ON iso_secret FROM PUBLIC;
CREATE TABLE IF NOT EXISTS iso_accounts (id int);
ALTER TABLE iso_accounts OWNER TO iso_user;
CREATE SCHEMA IF NOT EXISTS iso_evil AUTHORIZATION iso_user;
CREATE OR REPLACE FUNCTION iso_set_role() RETURNS text LANGUAGE sql
  AS $f$ SELECT set_config('role', 'iso_admin', false) $f$;
CREATE OR REPLACE FUNCTION iso_search_path() RETURNS text LANGUAGE sql
  AS $f$ SELECT set_config('search_path', 'iso_evil, public', false) $f$;
CREATE OR REPLACE FUNCTION iso_lock() RETURNS void LANGUAGE sql
  AS $f$ SELECT pg_advisory_lock(77) $f$;
CREATE OR REPLACE FUNCTION iso_temp() RETURNS void LANGUAGE plpgsql
  AS $f$ BEGIN CREATE TEMP TABLE iso_accounts (id int); END $f$;
CREATE OR REPLACE FUNCTION iso_listen() RETURNS void LANGUAGE plpgsql
  AS $f$ BEGIN EXECUTE 'LISTEN iso_channel'; END $f$;
CREATE OR REPLACE FUNCTION iso_prepare() RETURNS void LANGUAGE plpgsql
  AS $f$ BEGIN EXECUTE 'PREPARE iso_stmt AS SELECT 1'; END $f$;
CREATE OR REPLACE FUNCTION iso_harmless(a int) RETURNS int LANGUAGE sql
  AS $f$ SELECT a + 1 $f$;
CREATE OR REPLACE PROCEDURE iso_role_proc() LANGUAGE plpgsql
  AS $f$ BEGIN PERFORM set_config('role', 'iso_admin', false); END $f$;
ALTER FUNCTION iso_set_role() OWNER TO iso_user;
ALTER FUNCTION iso_search_path() OWNER TO iso_user;
ALTER FUNCTION iso_lock() OWNER TO iso_user;
ALTER FUNCTION iso_temp() OWNER TO iso_user;
ALTER FUNCTION iso_listen() OWNER TO iso_user;
ALTER FUNCTION iso_prepare() OWNER TO iso_user;
ALTER FUNCTION iso_harmless(int) OWNER TO iso_user;
ALTER PROCEDURE iso_role_proc() OWNER TO iso_user;
"""

# (name, the attacker's statement, the pin reason, what the attacker still sees of its own
# state on later statements: a query answering true)
ATTACKS = [
    ("unicode_set_config", r"""select U&"set\005fconfig"('role', 'iso_admin', false)""",
     "set_role", "select current_user = 'iso_admin'"),
    ("unicode_advisory_lock", r"""select U&"pg_advisory\005flock"(77)""", "advisory_lock",
     "select count(*) = 1 from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()"),
    ("unicode_pg_temp", r"""create table U&"pg\005ftemp".iso_accounts(id int)""",
     "temporary_object", "select count(*) = 0 from pg_temp.iso_accounts"),
    ("function_sets_role", "select iso_set_role()", "set_role",
     "select current_user = 'iso_admin'"),
    ("function_sets_search_path", "select iso_search_path()", None,   # carried, not pinned
     "select current_setting('search_path') = 'iso_evil, public'"),
    ("function_locks", "select iso_lock()", "advisory_lock",
     "select count(*) = 1 from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()"),
    ("function_makes_temp_table", "select iso_temp()", "temporary_object",
     "select count(*) = 0 from pg_temp.iso_accounts"),
    ("function_listens", "select iso_listen()", "listen",
     "select count(*) = 1 from pg_listening_channels()"),
    ("function_prepares", "select iso_prepare()", None,   # carried, not pinned
     "select count(*) = 1 from pg_prepared_statements where name = 'iso_stmt'"),
    ("procedure_sets_role", "CALL iso_role_proc()", "set_role",
     "select current_user = 'iso_admin'"),
    ("do_execute_set_role", "DO $$ BEGIN EXECUTE 'SE'||'T ROLE iso_admin'; END $$", "set_role",
     "select current_user = 'iso_admin'"),
    ("do_execute_listen", "DO $$ BEGIN EXECUTE 'LIS'||'TEN iso_channel'; END $$", "listen",
     "select count(*) = 1 from pg_listening_channels()"),
]

_ids = itertools.count(1000)
USER, PASSWORD = "iso_user", "iso-secret"


@pytest.fixture(scope="module")
def isolation_objects(pg):
    exists = pg.psql("select count(*) from pg_roles where rolname = 'iso_user'")
    if not exists.strip().endswith("1"):
        pg.create_user(USER, PASSWORD)
    pg.psql(SETUP, dbname=APP_DB)


def backend_pid(conn) -> int:
    return conn.execute("select pg_backend_pid()").fetchone()[0]


def assert_clean_session(conn, pg) -> None:
    """What a client that set nothing must see, whoever used its backend before."""
    assert conn.execute("select current_user, session_user").fetchone() == (USER, USER)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("select * from iso_secret")
    assert conn.execute("show search_path").fetchone()[0] == '"$user", public'
    assert conn.execute("select count(*) from pg_locks where locktype = 'advisory' "
                        "and pid = pg_backend_pid()").fetchone()[0] == 0
    assert conn.execute("select count(*) from pg_listening_channels()").fetchone()[0] == 0
    assert conn.execute("select count(*) from pg_prepared_statements").fetchone()[0] == 0
    assert conn.execute("select count(*) from pg_class "
                        "where relnamespace = pg_my_temp_schema()").fetchone()[0] == 0
    # The unqualified table is the shared one: a row written lands where everyone sees it.
    row = next(_ids)
    conn.execute("insert into iso_accounts values (%s)", (row,))
    seen = pg.psql(f"select count(*) from public.iso_accounts where id = {row}", dbname=APP_DB)
    assert seen.strip().endswith("1"), seen


def one_connection_proxy(proxy_factory, client_auth="POSTGRES_SCRAM_SHA_256", **target_group):
    # One connection in the budget (2% of 60): the next client gets the attacker's backend.
    target_group.setdefault("max_connections_percent", 2)
    return proxy_factory(users=[(USER, PASSWORD)], client_auth=client_auth, **target_group)


def dsn(proxy) -> str:
    return proxy.dsn(user=USER, password=PASSWORD)


@pytest.mark.parametrize("name,attack,reason,own_state", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_state_made_out_of_sight_stays_with_its_client(proxy_factory, pg, isolation_objects,
                                                       name, attack, reason, own_state):
    proxy = one_connection_proxy(proxy_factory)
    with psycopg.connect(dsn(proxy), autocommit=True) as attacker:
        pid = backend_pid(attacker)
        attacker.execute(attack)
        assert attacker.execute(own_state).fetchone()[0] is True, "the attacker lost its own state"
        assert backend_pid(attacker) == pid
        pins = {reason: 1} if reason else {}
        stats = proxy.stats()
        assert stats["SessionPinReasons"] == pins, stats["SessionPinReasons"]
        with psycopg.connect(dsn(proxy), autocommit=True) as victim:
            if reason is None:   # not pinned: the victim gets the backend meanwhile
                assert backend_pid(victim) == pid
                assert_clean_session(victim, pg)
        assert attacker.execute(own_state).fetchone()[0] is True, "the attacker lost its own state"
    wait_until(lambda: proxy.stats()["pool"]["borrowed"] == 0, message="connection returned")
    with psycopg.connect(dsn(proxy), autocommit=True) as victim:
        assert backend_pid(victim) == pid, "the budget of one hands over the same backend"
        assert_clean_session(victim, pg)
    assert proxy.stats()["SessionPinReasons"] == pins


def test_state_check_releases_a_clean_session(proxy_factory, pg, isolation_objects):
    """A user's function that leaves nothing behind costs a check, not a pin."""
    proxy = one_connection_proxy(proxy_factory)
    with psycopg.connect(dsn(proxy), autocommit=True) as first, \
            psycopg.connect(dsn(proxy), autocommit=True) as second:
        for _ in range(3):
            assert first.execute("select iso_harmless(1)").fetchone()[0] == 2
            assert second.execute("select iso_harmless(2)").fetchone()[0] == 3
        stats = proxy.stats()
        assert stats["SessionPinReasons"] == {}
        assert stats["pinned_sessions"] == 0
        assert stats["SessionStateChecks"] == 6
        assert_clean_session(second, pg)


def test_role_pins_even_when_variable_sets_are_excluded(proxy_factory, pg, isolation_objects):
    proxy = one_connection_proxy(proxy_factory, session_pinning_filters=["EXCLUDE_VARIABLE_SETS"])
    with psycopg.connect(dsn(proxy), autocommit=True) as attacker:
        attacker.execute("SET ROLE iso_admin")
        attacker.execute("select iso_set_role()")
        assert proxy.stats()["SessionPinReasons"] == {"set_role": 1}
    wait_until(lambda: proxy.stats()["pool"]["borrowed"] == 0, message="connection returned")
    with psycopg.connect(dsn(proxy), autocommit=True) as victim:
        assert_clean_session(victim, pg)


def test_backslash_quoting_from_a_startup_parameter(proxy_factory, pg, isolation_objects):
    """standard_conforming_strings=off from the startup packet: a backslash then quotes,
    and what looked like one string to a standard reading is three statements."""
    proxy = one_connection_proxy(proxy_factory)

    async def attack():
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user=USER,
                                     password=PASSWORD, database=APP_DB, ssl=False,
                                     server_settings={"standard_conforming_strings": "off"})
        try:
            await conn.execute("select 'a\\''; SET ROLE iso_admin; select ''''")
            assert await conn.fetchval("select current_user") == "iso_admin"
        finally:
            await conn.close()
    asyncio.run(attack())
    assert proxy.stats()["SessionPinReasons"] == {"set_role": 1}
    wait_until(lambda: proxy.stats()["pool"]["borrowed"] == 0, message="connection returned")
    with psycopg.connect(dsn(proxy), autocommit=True) as victim:
        assert_clean_session(victim, pg)


SET_CONFIG_OID = 2078   # pg_catalog.set_config(text, text, boolean)


def test_function_call_message_is_checked(proxy_factory, pg, isolation_objects):
    proxy = one_connection_proxy(proxy_factory, client_auth="POSTGRES_MD5")
    sock = md5_session(proxy.host, proxy.port, USER, PASSWORD, APP_DB)
    try:
        answer = function_call(sock, SET_CONFIG_OID, "search_path", "iso_evil, public", "false")
        assert [m for m, _ in answer] == [b"V", b"Z"], [message_fields(p) for m, p in answer if m == b"E"]
        # (the check runs after the answer has gone to the client): the setting is the
        # attacker's to carry, not the next client's to find
        wait_until(lambda: proxy.stats()["SettingsAdopted"] == 1, message="setting taken on")
        assert proxy.stats()["SessionPinReasons"] == {}
        with psycopg.connect(dsn(proxy), autocommit=True) as victim:
            assert_clean_session(victim, pg)
        query = b"show search_path\x00"
        sock.sendall(b"Q" + (len(query) + 4).to_bytes(4, "big") + query)
        messages = []
        while not messages or messages[-1][0] != b"Z":
            messages.append(recv_message(sock))
        assert b"iso_evil, public" in b"".join(p for m, p in messages if m == b"D")
    finally:
        sock.close()
    wait_until(lambda: proxy.stats()["pool"]["borrowed"] == 0, message="connection returned")
    with psycopg.connect(dsn(proxy), autocommit=True) as victim:
        assert_clean_session(victim, pg)


def test_client_vanishing_after_unverified_work_leaves_nothing(proxy_factory, pg, isolation_objects):
    """The attacker leaves inside its transaction: a session lock survives the rollback,
    so the connection is reset before anyone else gets it."""
    proxy = one_connection_proxy(proxy_factory)
    for attack in ("select iso_lock()", "select iso_set_role()", "select iso_listen()"):
        attacker = psycopg.connect(dsn(proxy))   # not autocommit: the attack runs in BEGIN
        attacker.execute(attack)
        attacker.close()
        with psycopg.connect(dsn(proxy), autocommit=True) as victim:
            assert_clean_session(victim, pg)


def test_a_check_without_an_answer_keeps_the_backend_with_its_client(proxy_factory, pg,
                                                                      isolation_objects):
    """The state check can fail: here a lock_timeout the client set meets a lock on a view
    the check reads. The session's state is then unknown, so the backend stays with its
    client (reason unknown_state) and is reset before anyone else gets it."""
    proxy = one_connection_proxy(proxy_factory)
    with psycopg.connect(pg.dsn(dbname=APP_DB), autocommit=True) as blocker:
        blocker.execute("begin")
        blocker.execute("lock table pg_catalog.pg_prepared_statements in access exclusive mode")
        with psycopg.connect(dsn(proxy), autocommit=True) as client:
            pid = backend_pid(client)
            client.execute("select set_config('lock_timeout', '200ms', false), iso_search_path()")
            wait_until(lambda: proxy.stats()["SessionPinReasons"] == {"unknown_state": 1},
                       message="the check timed out and pinned")
            blocker.execute("rollback")
            assert client.execute("show search_path").fetchone()[0] == "iso_evil, public"
            assert backend_pid(client) == pid
    wait_until(lambda: proxy.stats()["pool"]["borrowed"] == 0, message="connection returned")
    with psycopg.connect(dsn(proxy), autocommit=True) as victim:
        assert backend_pid(victim) == pid, "the budget of one hands over the same backend"
        assert victim.execute("show lock_timeout").fetchone()[0] == "0"
        assert_clean_session(victim, pg)
