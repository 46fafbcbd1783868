"""Tests for the PostgreSQL session pinning rules (rdsproxy.engines.postgres.pinning)."""
import pytest
from hypothesis import given, settings, strategies as st

from rdsproxy.engines.postgres import pinning
from rdsproxy.engines.postgres.pinning import (
    ADVISORY_LOCK,
    CURSOR,
    DISCARD,
    EXCLUDE_VARIABLE_SETS,
    LISTEN,
    LOAD,
    LONG_STATEMENT,
    PREPARED_STATEMENT,
    SEQUENCE_FUNCTION,
    SET_ROLE,
    SET_VARIABLE,
    TEMPORARY_OBJECT,
    UNVERIFIED,
    PinningRules,
    prepare_statement_text,
)

RULES = PinningRules()

CASES = [
    # the hot path
    ("SELECT abalance FROM pgbench_accounts WHERE aid = 42;", None),
    ("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 3;", None),
    ("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, 1, now());", None),
    ("BEGIN;", None),
    ("END;", None),
    ("COMMIT", None),
    ("", None),
    (";;;", None),
    # SET / RESET
    ("SET search_path TO x", SET_VARIABLE),
    ("set statement_timeout = 5", SET_VARIABLE),
    ("SET SESSION statement_timeout = 5", SET_VARIABLE),
    ("SET ROLE bob", SET_ROLE),
    ("set session role bob", SET_ROLE),
    ("SET SESSION AUTHORIZATION bob", SET_ROLE),
    ("SET session_authorization = bob", SET_ROLE),
    ("RESET ROLE", SET_ROLE),
    ("RESET SESSION AUTHORIZATION", SET_ROLE),
    ("SET LOCAL ROLE bob", None),
    ("SET TIME ZONE 'UTC'", SET_VARIABLE),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE", SET_VARIABLE),
    ("SET LOCAL x = 1", None),
    ("set local search_path to x", None),
    ("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", None),
    ("SET CONSTRAINTS ALL DEFERRED", None),
    ("RESET ALL", SET_VARIABLE),
    ("reset search_path", SET_VARIABLE),
    ("SELECT 1; RESET ALL", SET_VARIABLE),
    ("UPDATE t SET a=1", None),
    ("update t set a = 1 where b = 2; update u set c = 3", None),
    ("ALTER TABLE t ALTER COLUMN a SET DEFAULT 1", None),
    ("ALTER ROLE bob SET search_path = x", None),
    ("INSERT INTO t VALUES (1) ON CONFLICT (a) DO UPDATE SET b = 2", None),
    ("SELECT 'set x=1'", None),
    ("SELECT $$; SET x = 1$$", None),
    ("SELECT $tag$ $$; SET x = 1 $tag$", None),
    ("SELECT 'it''s; SET x = 1'", None),
    ("SELECT E'\\'; SET x = 1; --'", None),
    ("SELECT 'a\\'; SET x = 1; --'", SET_VARIABLE),  # standard strings: the backslash is literal
    ('SELECT 1 AS "; SET x = 1"', None),
    ("SELECT 1 -- ; SET x = 1", None),
    ("SELECT 1 /* ; SET x = 1 */", None),
    ("SELECT 1 /* nested /* ; */ SET x = 1 */", None),
    ("/* c */ SET search_path TO x", SET_VARIABLE),
    ("-- comment\nSET search_path TO x", SET_VARIABLE),
    ("/* a /* b */ c */ set x = 1", SET_VARIABLE),
    ("   \n\tSET x = 1", SET_VARIABLE),
    ("BEGIN; SET LOCAL statement_timeout = 5; COMMIT", None),
    ("BEGIN; SET statement_timeout = 5; COMMIT", SET_VARIABLE),
    ("SELECT 1;SET x=1", SET_VARIABLE),
    ("SELECT set_config('a.b', 'c', false)", SET_VARIABLE),
    ("SELECT set_config('a.b', 'c', FALSE)", SET_VARIABLE),
    ("SELECT set_config('a.b', 'c', true)", None),
    ("SELECT pg_catalog.set_config('a.b', 'c', TRUE)", None),
    ("SELECT set_config('a.b', 'c', 't')", None),
    ("SELECT set_config('a.b', 'c', 'on'::boolean)", None),
    ("SELECT set_config('a.b', lower('C'), true)", None),
    ("SELECT set_config('a.b', 'c', $1)", SET_VARIABLE),
    ("SELECT set_config('a.b', 'c', 1 = 1)", SET_VARIABLE),
    ("SELECT set_config('a.b', 'c')", SET_VARIABLE),
    ("SELECT set_config('a.b', 'c', tr", SET_VARIABLE),  # truncated: cannot tell, pin
    ("SELECT 'set_config(1,2,false)'", None),
    # prepared statements
    ("PREPARE p AS SELECT 1", PREPARED_STATEMENT),
    ("prepare p(int) as select $1", PREPARED_STATEMENT),
    ("PREPARE TRANSACTION 'gid1'", None),
    ("EXECUTE plan(1, 'x')", None),      # a prepared statement's name, not a call
    # an alias's column list is not a call; what it names still is looked at
    ("select i from generate_series(1, 3) as g(i)", None),
    ("select * from lateral (select 1) as o(n) join myfunc() f on true", UNVERIFIED),
    ("select cast(x as varchar(3)) from t", None),
    ("EXECUTE p", None),
    ("DEALLOCATE p", UNVERIFIED),   # may drop the proxy's statements: recounted after
    ("DEALLOCATE ALL", UNVERIFIED),
    # temporary objects
    ("CREATE TEMP TABLE t(a int)", TEMPORARY_OBJECT),
    ("CREATE TEMPORARY TABLE IF NOT EXISTS t(a int)", TEMPORARY_OBJECT),
    ("create temporary view v as select 1", TEMPORARY_OBJECT),
    ("CREATE OR REPLACE TEMP VIEW v AS SELECT 1", TEMPORARY_OBJECT),
    ("CREATE TEMP SEQUENCE s", TEMPORARY_OBJECT),
    ("CREATE LOCAL TEMPORARY TABLE t (a int)", TEMPORARY_OBJECT),
    ("CREATE GLOBAL TEMP TABLE t (a int) ON COMMIT DROP", TEMPORARY_OBJECT),
    ("CREATE TABLE pg_temp.t (a int)", TEMPORARY_OBJECT),
    ("CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'", TEMPORARY_OBJECT),
    ("CREATE UNLOGGED TABLE t (a int)", None),
    ("CREATE TABLE t (temp int)", None),
    ("CREATE TABLE temperatures (a int)", None),
    ("CREATE TABLE t (a int)", None),
    ("SELECT * INTO TEMP t2 FROM t", TEMPORARY_OBJECT),
    ("select a into temporary table t2 from t", TEMPORARY_OBJECT),
    ("SELECT a INTO LOCAL TEMP t2 FROM t", TEMPORARY_OBJECT),
    ("WITH x AS (SELECT 1) SELECT * INTO TEMP t2 FROM x", TEMPORARY_OBJECT),
    ("SELECT * INTO pg_temp.t2 FROM t", TEMPORARY_OBJECT),
    ("SELECT * INTO t2 FROM t", None),
    ("INSERT INTO temp VALUES (1)", None),
    ("SELECT temp FROM weather", None),
    ("EXPLAIN ANALYZE CREATE TEMP TABLE t AS SELECT 1", TEMPORARY_OBJECT),
    ("EXPLAIN (ANALYZE, BUFFERS) SELECT * INTO TEMP t FROM u", TEMPORARY_OBJECT),
    ("EXPLAIN SELECT temp FROM weather", None),
    # cursors, discard, listen, load
    ("DECLARE c CURSOR FOR SELECT 1", CURSOR),
    ("declare c scroll cursor with hold for select 1", CURSOR),
    ("FETCH 10 FROM c", None),
    ("CLOSE c", None),
    ("DISCARD ALL", DISCARD),
    ("discard temp", DISCARD),
    ("LISTEN ch", LISTEN),
    ("UNLISTEN ch", None),
    ("UNLISTEN *", None),
    ("NOTIFY ch, 'x'", None),
    ("LOAD 'auto_explain'", LOAD),
    # sequence functions
    ("SELECT nextval('s')", SEQUENCE_FUNCTION),
    ("select setval('s', 5)", SEQUENCE_FUNCTION),
    ("SELECT NEXTVAL ( 's' )", SEQUENCE_FUNCTION),
    ("SELECT pg_catalog.nextval('s')", SEQUENCE_FUNCTION),
    ('SELECT "nextval"(\'s\')', SEQUENCE_FUNCTION),
    ("INSERT INTO t (id) VALUES (nextval('t_id_seq'))", SEQUENCE_FUNCTION),
    ("SELECT currval('s')", None),
    ("SELECT lastval()", None),
    ("SELECT nextval FROM t", None),
    ("SELECT 'nextval(1)'", None),
    # advisory locks
    ("SELECT pg_advisory_lock(1)", ADVISORY_LOCK),
    ("SELECT pg_advisory_lock_shared(1)", ADVISORY_LOCK),
    ("SELECT pg_try_advisory_lock(1, 2)", ADVISORY_LOCK),
    ("SELECT PG_TRY_ADVISORY_LOCK_SHARED(1)", ADVISORY_LOCK),
    ("select pg_advisory_xact_lock(1)", None),
    ("select pg_try_advisory_xact_lock_shared(1)", None),
    ("select pg_advisory_unlock(1)", None),
    # DO blocks (best effort)
    ("DO $$BEGIN EXECUTE 'SET x.y = 1'; END$$", SET_VARIABLE),
    ("DO $$BEGIN CREATE TEMP TABLE t (a int); END$$", TEMPORARY_OBJECT),
    ("DO $$BEGIN PERFORM nextval('s'); END$$", SEQUENCE_FUNCTION),
    ("DO $$DECLARE a int; BEGIN a := 1; END$$", UNVERIFIED),
    ("DO $$ BEGIN EXECUTE 'SE'||'T ROLE admin'; END $$", UNVERIFIED),
    ("DO LANGUAGE plpgsql $$BEGIN IF true THEN RESET ALL; END IF; END$$", SET_VARIABLE),
    ("DO $$BEGIN SET LOCAL x.y = 1; END$$", UNVERIFIED),
]

CASES += [
    # role and session authorization pin, whatever else is excluded
    ("select set_config('role', 'admin', false)", SET_ROLE),
    ("select set_config('ROLE ', 'admin', false)", SET_ROLE),
    ("select set_config('session_authorization', 'x', false)", SET_ROLE),
    ("select set_config($1, $2, false)", SET_ROLE),   # a name it cannot read may be the role
    ("select set_config('role', 'admin', true)", None),
    # what the text cannot show: the server is asked afterwards
    ("select my_function(1)", UNVERIFIED),
    ("select public.lower('a')", UNVERIFIED),
    ('select "MyFunction"()', UNVERIFIED),
    ("CALL my_procedure()", UNVERIFIED),
    ("select U&\"set\\005fconfig\"('role', 'admin', false)", UNVERIFIED),
    ("create table U&\"pg\\005ftemp\".accounts(a int)", UNVERIFIED),
    ("select U&\"pg_advisory\\005flock\"(1)", UNVERIFIED),
    ("select a from U&\"t\\0061\"", UNVERIFIED),
    # with standard_conforming_strings off a backslash quotes: both readings count
    ("select 'a\\''; SET ROLE admin; select ''''", SET_ROLE),
    ("select 'a\\'', my_function()", UNVERIFIED),
    # calls known to be harmless, and syntax that only looks like a call
    ("select pg_catalog.lower('A'), count(*), coalesce(a, 1)::numeric(10, 2) from t", None),
    ("select * from t where a in (1, 2) and exists (select 1) and b = any($1)", None),
    ("INSERT INTO public.t (a, b) VALUES ($1, $2) ON CONFLICT (a) DO NOTHING", None),
    ("CREATE TABLE IF NOT EXISTS t (a int REFERENCES u (a), CHECK (a > 0))", None),
    ("WITH x AS (select 1) select * from x join y using (id)", None),
]


@pytest.mark.parametrize("sql,expected", CASES)
def test_classify_query(sql, expected):
    assert RULES.classify_query(sql.encode()) == expected


@pytest.mark.parametrize("sql,expected", CASES)
def test_trailing_nul_and_case_do_not_matter(sql, expected):
    assert RULES.classify_query(sql.encode() + b"\x00") == expected
    if "'" not in sql and '"' not in sql and "$" not in sql:
        assert RULES.classify_query(sql.swapcase().encode()) == expected


@pytest.mark.parametrize("sql,expected", CASES)
def test_prefilter_never_hides_a_pin(sql, expected):
    # The careful analysis alone must agree wherever the pre-filter lets text through.
    assert RULES._analyze(sql, 0) == expected


def test_first_reason_wins():
    assert RULES.classify_query(b"SELECT nextval('s'); SET x = 1") == SEQUENCE_FUNCTION
    assert RULES.classify_query(b"SET x = 1; SELECT nextval('s')") == SET_VARIABLE
    assert RULES.classify_query(b"LISTEN a; DISCARD ALL") == LISTEN


def test_exclude_variable_sets_drops_only_set_variable():
    rules = PinningRules([EXCLUDE_VARIABLE_SETS])
    assert rules.classify_query(b"SET search_path TO x") is None
    assert rules.classify_query(b"RESET ALL") is None
    assert rules.classify_query(b"SELECT set_config('a.b', 'c', false)") is None
    assert rules.classify_query(b"SET x = 1; SELECT nextval('s')") == SEQUENCE_FUNCTION
    assert rules.classify_query(b"SET x = 1; CREATE TEMP TABLE t (a int)") == TEMPORARY_OBJECT
    assert rules.classify_query(b"PREPARE p AS SELECT 1") == PREPARED_STATEMENT
    assert rules.classify_query(b"DISCARD ALL") == DISCARD


def test_unknown_filter_rejected():
    with pytest.raises(ValueError):
        PinningRules(["EXCLUDE_NOTHING"])


def test_long_statement():
    assert RULES.classify_query(b"SELECT 1", full_length=16385) == LONG_STATEMENT
    assert RULES.classify_query(b"SELECT 1", full_length=16384) is None
    body = b"SELECT '" + b"x" * 16380 + b"'"
    assert len(body) > 16384
    assert RULES.classify_query(body) == LONG_STATEMENT
    exact = b"SELECT '" + b"x" * (16384 - 9) + b"'"
    assert len(exact) == 16384
    assert RULES.classify_query(exact) is None
    assert RULES.classify_query(exact + b"\x00") is None


def test_prefix_of_long_statement_is_analysed_safely():
    # An unterminated literal in a truncated prefix must not raise nor pin by itself.
    assert RULES.classify_query(b"SELECT 'abc", full_length=100) is None
    assert RULES.classify_query(b"SELECT $x$ abc", full_length=100) is None
    assert RULES.classify_query(b"/* abc", full_length=100) is None
    assert RULES.classify_query(b"SET x = 'abc", full_length=100) == SET_VARIABLE


def test_parse_texts_are_read_as_queries():
    # A Parse's text is classified as a Query's (a named Parse is the frontend's: the
    # proxy keeps the statement, or pins when it cannot: test_pinning).
    assert RULES.classify_query(b"SELECT 1") is None
    assert RULES.classify_query(b"SELECT nextval('s')") == SEQUENCE_FUNCTION
    assert RULES.classify_query(b"SELECT 1", full_length=20000) == LONG_STATEMENT


def test_non_utf8_and_other_buffers():
    assert RULES.classify_query(b"SELECT '\xff\xfe'; SET x = 1") == SET_VARIABLE
    assert RULES.classify_query(b"SELECT \xc3\xa9temp FROM t") is None
    assert RULES.classify_query(bytearray(b"SET x = 1")) == SET_VARIABLE
    assert RULES.classify_query(memoryview(b"SET x = 1")) == SET_VARIABLE


def test_reason_values():
    assert pinning.CURSOR == "declare_cursor"
    assert pinning.LONG_STATEMENT == "statement_over_16kb"
    assert pinning.STARTUP_OPTIONS == "startup_options"


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise(data):
    result = RULES.classify_query(data)
    assert result is None or isinstance(result, str)
    settings = RULES.settings_named(data)
    assert settings is None or all(isinstance(name, str) for name in settings)


_FRAGMENTS = [
    "SELECT", "select", "SET", "set", "LOCAL", "RESET", "PREPARE", "DECLARE", "DISCARD", "LISTEN",
    "LOAD", "CREATE", "TEMP", "temporary", "TABLE", "INTO", "FROM", "DO", "EXPLAIN", "ANALYZE",
    "nextval", "setval", "set_config", "pg_advisory_lock", "pg_advisory_xact_lock", "pg_temp",
    "(", ")", ",", ";", ".", "'", "''", '"', "$$", "$a$", "E'", "\\", "--", "\n", "/*", "*/",
    " ", "  ", "\x00", "1", "true", "false", "x", "t", "é", "BEGIN", "EXECUTE", "transaction",
]


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=25))
def test_prefilter_is_a_superset_of_the_careful_analysis(parts):
    # Whatever the careful analysis would pin, the fast path must not wave through.
    text = " ".join(parts) if parts and parts[0] == "x" else "".join(parts)
    data = text.encode("utf-8")
    assert RULES.classify_query(data) == RULES._analyze(data.decode("latin-1"), 0)


@pytest.mark.parametrize("source,name,expected", [
    (b"PREPARE a AS SELECT 1", b"a", b"PREPARE a AS SELECT 1"),
    (b"prepare a(int) as select $1; select 2; prepare b as select ';'", b"a",
     b"prepare a(int) as select $1"),
    (b"prepare a(int) as select $1; select 2; prepare b as select ';'", b"b",
     b"prepare b as select ';'"),
    (b"/* c; */ PREPARE \"Mixed \"\"q\"\"\" AS SELECT $$;$$ -- end", b'Mixed "q"',
     b"PREPARE \"Mixed \"\"q\"\"\" AS SELECT $$;$$ -- end"),
    (b"PREPARE Upper AS SELECT 1", b"upper", b"PREPARE Upper AS SELECT 1"),
    (b"PREPARE Upper AS SELECT 1", b"Upper", None),          # the server folded it
    (b"PREPARE a AS SELECT 1", b"b", None),
    (b"select 'prepare a as select 1'", b"a", None),         # inside a string
    (b"prepare a as select 1; deallocate a; prepare a as select 2", b"a", None),
    (b"select 'x\\'; prepare a as select 1; --'", b"a", None),   # two readings
    (b"prepare a as select E'\\n'", b"a", None),            # a backslash in it
    (b"PREPARE TRANSACTION 'a'", b"a", None),
])
def test_prepare_statement_text(source, name, expected):
    assert prepare_statement_text(source, name) == expected


@pytest.mark.parametrize("sql,names", [
    (b"SET work_mem = 1", ("work_mem",)),
    (b"set session TimeZone to 'UTC'", ("timezone",)),
    (b"SET TIME ZONE 'Asia/Tokyo'", ("timezone",)),
    (b"set names utf8", ("client_encoding",)),
    (b"reset work_mem", ("work_mem",)),
    (b"set work_mem='1MB'; set myapp.user_id = 5", ("work_mem", "myapp.user_id")),
    (b'set search_path = a, "B", public', ("search_path",)),
    (b'SET "Work_Mem" TO DEFAULT', ("work_mem",)),
    (b"SET statement_timeout = -1", ("statement_timeout",)),
    # anything else has the whole session read
    (b"reset all", None),
    (b"set role x", None),
    (b"set session authorization x", None),
    (b"set work_mem = (select 1)", None),
    (b"set work_mem = 1; select 1", None),
    (b"set local work_mem = 1", None),
    (b"set work_mem = 'a\\'", None),
    (b"set seed = 0.5", None),
    (b"select set_config('work_mem', '1MB', false)", None),
    (b"set x.y", None),
])
def test_settings_named(sql, names):
    assert PinningRules().settings_named(sql) == names
