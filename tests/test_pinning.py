"""Session pinning: each RDS Proxy rule pins, and no client ever sees another client's session state."""
from __future__ import annotations

import psycopg
import pytest
from harness import APP_DB, APP_PASSWORD, APP_USER
from utils import wait_until

SUPERUSER = ("postgres", "postgres")


def backend_pid(conn) -> int:
    return conn.execute("select pg_backend_pid()").fetchone()[0]


def error_state(conn, sql) -> str | None:
    """Run `sql`; return the SQLSTATE it failed with, or None."""
    try:
        conn.execute(sql)
    except psycopg.Error as exc:
        conn.rollback()
        return exc.sqlstate
    return None


# (name, SQL run by the first client, reason, check run by the next client on the same
#  server connection: returns True when it sees no trace of the first client's state)
RULES = [
    ("temp_table", ["CREATE TEMP TABLE pin_t(a int)", "INSERT INTO pin_t VALUES (1)"], "temporary_object",
     lambda c: error_state(c, "select * from pin_t") == "42P01"),
    ("temp_view", ["CREATE TEMPORARY VIEW pin_v AS SELECT 1 AS a"], "temporary_object",
     lambda c: error_state(c, "select * from pin_v") == "42P01"),
    ("temp_sequence", ["CREATE TEMP SEQUENCE pin_s"], "temporary_object",
     lambda c: error_state(c, "select last_value from pin_s") == "42P01"),
    ("declare", ["BEGIN", "DECLARE pin_c CURSOR WITH HOLD FOR SELECT 1", "COMMIT"], "declare_cursor",
     lambda c: error_state(c, "FETCH pin_c") == "34000"),
    ("discard", ["DISCARD PLANS"], "discard", None),
    ("listen", ["LISTEN pin_channel"], "listen",
     lambda c: c.execute("select count(*) from pg_listening_channels()").fetchone()[0] == 0),
    ("nextval", ["select nextval('pin_shared_seq')"], "sequence_function",
     lambda c: error_state(c, "select currval('pin_shared_seq')") == "55000"),
    ("advisory_lock", ["select pg_advisory_lock(4242)"], "advisory_lock",
     lambda c: c.execute("select count(*) from pg_locks where locktype = 'advisory' "
                         "and pid = pg_backend_pid()").fetchone()[0] == 0),
    ("long_statement", ["SELECT 1 /* " + "x" * 17000 + " */"], "statement_over_16kb", None),
]


@pytest.fixture(scope="module")
def shared_sequence(pg):
    pg.psql("CREATE SEQUENCE IF NOT EXISTS pin_shared_seq; GRANT ALL ON pin_shared_seq TO app",
            dbname=APP_DB)


@pytest.mark.parametrize("name,statements,reason,clean", RULES, ids=[r[0] for r in RULES])
def test_rule_pins_and_state_never_leaks(proxy_factory, shared_sequence, name, statements, reason, clean):
    # One connection in the budget (2% of 60), so the second client must get the same one.
    proxy = proxy_factory(max_connections_percent=2)
    with psycopg.connect(proxy.dsn(), autocommit=True) as first:
        pid = backend_pid(first)
        for sql in statements:
            first.execute(sql)
        stats = proxy.stats()
        assert stats["SessionPinReasons"].get(reason) == 1, stats["SessionPinReasons"]
        assert stats["pinned_sessions"] == 1
        # Pinned: still on the same backend after further transactions.
        assert backend_pid(first) == pid
    wait_until(lambda: proxy.stats()["pool"]["borrowed"] == 0, message="connection returned")
    with psycopg.connect(proxy.dsn(), autocommit=True) as second:
        assert backend_pid(second) == pid, "the budget of one should hand over the same connection"
        if clean is not None:
            assert clean(second), f"{name}: the next client saw the first client's state"
        assert proxy.stats()["pinned_sessions"] == 0


def test_protocol_named_parse_pins_when_statements_are_not_kept(proxy_factory):
    """max_prepared_statements = 0: a named Parse pins, as in RDS Proxy."""
    proxy = proxy_factory(max_connections_percent=2, max_prepared_statements=0)
    with psycopg.connect(proxy.dsn(), autocommit=True) as first:
        first.execute("select %s::int", (1,), prepare=True)  # a named statement (_pg3_0)
        assert proxy.stats()["SessionPinReasons"].get("prepared_statement") == 1
    with psycopg.connect(proxy.dsn(), autocommit=True) as second:
        # DISCARD ALL removed it: the same name can be prepared again without a clash.
        second.execute("select %s::int", (2,), prepare=True)
        assert second.execute("select count(*) from pg_prepared_statements").fetchone()[0] == 1


def test_sql_prepare_pins_when_statements_are_not_kept(proxy_factory):
    """max_prepared_statements = 0: PREPARE pins, as in RDS Proxy (otherwise the client
    carries its statements: test_sql_prepare)."""
    proxy = proxy_factory(max_connections_percent=2, max_prepared_statements=0)
    with psycopg.connect(proxy.dsn(), autocommit=True) as first:
        pid = backend_pid(first)
        first.execute("PREPARE pinme AS SELECT 1")
        assert proxy.stats()["SessionPinReasons"] == {"prepared_statement": 1}
        assert backend_pid(first) == pid
        assert first.execute("EXECUTE pinme").fetchone() == (1,)
    wait_until(lambda: proxy.stats()["pool"]["borrowed"] == 0, message="connection returned")
    with psycopg.connect(proxy.dsn(), autocommit=True) as second:
        assert backend_pid(second) == pid
        assert error_state(second, "EXECUTE pinme") == "26000"


def test_protocol_named_parse_does_not_pin(proxy_factory):
    proxy = proxy_factory(max_connections_percent=2)
    with psycopg.connect(proxy.dsn(), autocommit=True) as first:
        assert first.execute("select %s::int", (1,), prepare=True).fetchone() == (1,)
    with psycopg.connect(proxy.dsn(), autocommit=True) as second:
        # The same client name on the same connection: each client has its own view.
        assert second.execute("select %s::int", (2,), prepare=True).fetchone() == (2,)
        assert second.execute("select %s::text", ("x",), prepare=True).fetchone() == ("x",)
    stats = proxy.stats()
    assert stats["SessionPinReasons"] == {} and stats["StatementClients"] == 2


def test_startup_options_pin_and_apply(proxy_factory):
    proxy = proxy_factory(max_connections_percent=4)
    with psycopg.connect(proxy.dsn(options="-c work_mem=5MB"), autocommit=True) as opt:
        assert opt.execute("show work_mem").fetchone()[0] == "5MB"
        assert proxy.stats()["SessionPinReasons"].get("startup_options") == 1
        with psycopg.connect(proxy.dsn(), autocommit=True) as plain:
            assert plain.execute("show work_mem").fetchone()[0] == "4MB"


def test_load_pins_and_the_connection_is_not_reused(proxy_factory):
    proxy = proxy_factory(users=[SUPERUSER], max_connections_percent=2)
    dsn = proxy.dsn(user=SUPERUSER[0], password=SUPERUSER[1], dbname="postgres")
    with psycopg.connect(dsn, autocommit=True) as first:
        first.execute("LOAD 'auto_explain'")
        pid = backend_pid(first)
        assert proxy.stats()["SessionPinReasons"].get("load") == 1
    with psycopg.connect(dsn, autocommit=True) as second:
        assert backend_pid(second) != pid, "a LOADed library cannot be unloaded: close, never reuse"


@pytest.mark.parametrize("statements", [
    ["BEGIN", "SET LOCAL work_mem = '9MB'", "COMMIT"],
    ["BEGIN", "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "select 1", "COMMIT"],
    ["select pg_advisory_xact_lock(1)"],
    ["UPDATE pg_class SET relname = relname WHERE false"],
    ["select 'SET x = 1' as text"],
], ids=["set_local", "set_transaction", "xact_lock", "update_set", "string"])
def test_transaction_scoped_state_does_not_pin(proxy, statements):
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for sql in statements:
            try:
                conn.execute(sql)
            except psycopg.errors.InsufficientPrivilege:
                pass
        stats = proxy.stats()
        assert stats["SessionPinReasons"] == {}
        assert stats["pinned_sessions"] == 0
        assert stats["pool"]["borrowed"] == 0, "the connection goes back between transactions"


# SET and its kin do not pin: the client's settings are carried with it (tests/test_settings.py
# compares them with direct sessions). Here: the next client on the same backend is clean.
SETTINGS = [
    ("set", "SET search_path TO pg_catalog",
     lambda c: c.execute("show search_path").fetchone()[0] == '"$user", public'),
    ("reset", "RESET work_mem", None),
    ("set_config", "select set_config('work_mem', '77MB', false)",
     lambda c: c.execute("show work_mem").fetchone()[0] != "77MB"),
]


@pytest.mark.parametrize("name,sql,clean", SETTINGS, ids=[s[0] for s in SETTINGS])
def test_settings_do_not_pin_and_do_not_leak(proxy_factory, name, sql, clean):
    proxy = proxy_factory(max_connections_percent=2)
    with psycopg.connect(proxy.dsn(), autocommit=True) as first:
        pid = backend_pid(first)
        first.execute(sql)
        assert proxy.stats()["pinned_sessions"] == 0
    wait_until(lambda: proxy.stats()["pool"]["borrowed"] == 0, message="connection returned")
    with psycopg.connect(proxy.dsn(), autocommit=True) as second:
        assert backend_pid(second) == pid, "the budget of one should hand over the same connection"
        if clean is not None:
            assert clean(second), f"{name}: the next client saw the first client's setting"
    assert proxy.stats()["SessionPinReasons"] == {}


def test_exclude_variable_sets_filter(proxy_factory):
    proxy = proxy_factory(session_pinning_filters=["EXCLUDE_VARIABLE_SETS"])
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("SET work_mem = '8MB'")
        assert proxy.stats()["pinned_sessions"] == 0
        conn.execute("CREATE TEMP TABLE still_pins(a int)")  # the filter drops only SET
        assert proxy.stats()["SessionPinReasons"] == {"temporary_object": 1}


def test_pinned_client_holds_its_connection_while_others_multiplex(proxy_factory):
    proxy = proxy_factory(max_connections_percent=4)  # budget 2
    with psycopg.connect(proxy.dsn(), autocommit=True) as pinned:
        pinned.execute("SET application_name = 'pinned-one'")
        pinned.execute("CREATE TEMP TABLE pinned_here (a int)")   # pins
        pid = backend_pid(pinned)
        others = [psycopg.connect(proxy.dsn(), autocommit=True) for _ in range(5)]
        try:
            for _ in range(3):
                for conn in others:
                    assert backend_pid(conn) != pid
                    assert conn.execute("show application_name").fetchone()[0] != "pinned-one"
        finally:
            for conn in others:
                conn.close()
        assert backend_pid(pinned) == pid


def test_tracked_startup_parameters_follow_the_client(proxy_factory):
    """application_name / TimeZone from the startup packet hold on any borrowed connection."""
    proxy = proxy_factory(max_connections_percent=2)
    a = psycopg.connect(proxy.dsn(application_name="client-a", options=""), autocommit=True)
    b = psycopg.connect(proxy.dsn(application_name="client-b"), autocommit=True)
    try:
        for _ in range(3):
            assert a.execute("show application_name").fetchone()[0] == "client-a"
            assert b.execute("show application_name").fetchone()[0] == "client-b"
        assert proxy.stats()["pinned_sessions"] == 0
    finally:
        a.close()
        b.close()


def test_repeated_startup_packets_share_one_parse_but_not_their_settings(proxy_factory):
    """Short-lived clients reuse the parse of an identical startup packet; a packet that
    differs in any parameter is parsed for itself and keeps its own settings."""
    proxy = proxy_factory(max_connections_percent=2)
    plans = proxy.proxy.engine.startup_plans
    for round_ in range(3):
        for name in ("lambda-a", "lambda-b"):
            with psycopg.connect(proxy.dsn(application_name=name), autocommit=True) as conn:
                assert conn.execute("show application_name").fetchone()[0] == name
                assert conn.execute("select current_user").fetchone()[0] == APP_USER
    mine = [p.session for p in plans.values()
            if dict(p.desired).get("application_name", "").startswith("lambda-")]
    assert sorted(dict(s[4])["application_name"] for s in mine) == ["lambda-a", "lambda-b"]
    assert all(s[0] == APP_USER and s[3] == (APP_USER, APP_DB, "") for s in mine)
    # Packets come before authentication, so what is kept is bounded: no packet over 1 KiB,
    # at most 1024 of them (no client is connecting while the test pokes the table).
    engine = proxy.proxy.engine
    engine.remember_startup(b"x" * 1025, mine[0])
    assert b"x" * 1025 not in plans
    for i in range(1100):
        engine.remember_startup(b"p%d" % i, mine[0])
    assert 0 < len(plans) <= 1024


def test_second_user_never_sees_first_users_connection(proxy_factory, pg):
    pg.create_user("other", "other-secret")
    proxy = proxy_factory(users=[(APP_USER, APP_PASSWORD), ("other", "other-secret")],
                          max_connections_percent=2)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("select current_user").fetchone()[0] == APP_USER
    with psycopg.connect(proxy.dsn(user="other", password="other-secret", dbname=APP_DB),
                         autocommit=True) as conn:
        assert conn.execute("select current_user").fetchone()[0] == "other"
