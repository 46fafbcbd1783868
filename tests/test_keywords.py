"""The keyword prefilter twins: the regex (pure) and the C loop (compiled) flag the same texts."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from utils import pick, twins

from rdsproxy.engines.postgres.pinning import PREFILTER

KEYWORDS = twins("pg_keywords")
LEADING = [b"/*", b"--", b"set", b"reset", b"prepare", b"declare", b"discard", b"do",
           b"listen", b"load", b"drop", b"alter", b"create", b"call", b"deallocate"]
ANYWHERE = [b"temp", b"tval", b"_config", b"y_lock", b"(", b"u&"]


@pytest.fixture(scope="module", params=sorted(KEYWORDS))
def scanner(request):
    return pick(KEYWORDS, request.param).KeywordScanner(LEADING, ANYWHERE)


@pytest.mark.parametrize("sql,expected", [
    (b"SELECT abalance FROM pgbench_accounts WHERE aid = 42;", False),
    (b"UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 3;", False),
    (b"BEGIN;", False),
    (b"SET search_path TO x", True),
    (b"  \n\tset x=1", True),
    (b"\x00SeT x=1", True),
    (b"select 1; RESET ALL", True),
    (b"select 1;reset all", True),
    (b"settings", False),           # a word that only starts like SET
    (b"set_x", False),
    (b"do $$ begin end $$", True),
    (b"dog", False),
    (b"/* c */ select 1", True),
    (b"-- c\nselect 1", True),
    (b"select 1 -- trailing comment", False),
    (b"create TEMP table t(a int)", True),
    (b"select nextval('s')", True),
    (b"select SETVAL('s', 1)", True),
    (b"select set_config('a', 'b', false)", True),
    (b"select pg_advisory_lock(1)", True),
    (b"select pg_advisory_xact_lock(1)", True),   # any call: the rules' cache answers
    (b"select a from t where b = $1", False),
    (b"select a from U&\"t\"", True),
    (b"CALL p()", True),
    (b"LISTEN ch", True),
    (b"load 'x'", True),
    (b"select 'listen' as w", False),
    (b"", False),
    (b"set", True),
    (b"\xff\xfeset", False),
])
def test_examples(scanner, sql, expected):
    assert scanner.may_match(sql) is expected


TEXT = st.lists(st.one_of(
    st.sampled_from(LEADING + ANYWHERE + [b";", b" ", b"\x00", b"\n", b"_", b"x", b"1", b"S",
                                          b"SET", b"Temp", b"\xc3\xa9", b"a"]),
    st.binary(max_size=4)), max_size=20).map(b"".join)


@settings(max_examples=3000, deadline=None)
@given(TEXT)
def test_twins_agree(sql):
    py = KEYWORDS["py"].KeywordScanner(LEADING, ANYWHERE)
    assert py.may_match(sql) == py._scan(sql, len(sql)), "regex and loop differ"
    if "c" in KEYWORDS:
        c = KEYWORDS["c"].KeywordScanner(LEADING, ANYWHERE)
        assert c.may_match(sql) == py.may_match(sql)


def test_pinning_uses_the_same_lists():
    assert PREFILTER.leading == LEADING and PREFILTER.anywhere == ANYWHERE
