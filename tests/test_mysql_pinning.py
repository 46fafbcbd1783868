"""The MySQL statement rules (rdsproxy.engines.mysql.pinning), statement by statement."""
from __future__ import annotations

import pytest

from rdsproxy.engines.mysql.pinning import Rules

RULES = Rules()

PINS = [
    (b"SELECT 1", None),
    (b"select c from sbtest1 where id = ?", None),
    (b"SELECT '@x', \"@y\", `@z` FROM t -- @w", None),
    (b"SELECT @@version, @@session.sql_mode", None),
    (b"SET @x = 1", "user_variable"),
    (b"SELECT @x", "user_variable"),
    (b"SELECT a INTO @x FROM t", "user_variable"),
    (b"SELECT GET_LOCK('a', 1)", "get_lock"),
    (b"SELECT get_lock ('a', 1)", "get_lock"),
    (b"LOCK TABLES t READ", "lock_tables"),
    (b"FLUSH TABLES WITH READ LOCK", "lock_tables"),
    (b"CREATE TEMPORARY TABLE t (a INT)", "temporary_table"),
    (b"CREATE OR REPLACE TEMPORARY TABLE t (a INT)", "temporary_table"),
    (b"CREATE TABLE temporary_stuff (a INT)", None),
    (b"PREPARE s FROM 'SELECT 1'", "text_prepared_statement"),
    (b"EXECUTE s", "text_prepared_statement"),
    (b"DEALLOCATE PREPARE s", "text_prepared_statement"),
    (b"SELECT SQL_CALC_FOUND_ROWS * FROM t", "found_rows"),
    (b"SELECT FOUND_ROWS()", "found_rows"),
    (b"/*!40101 SET NAMES utf8 */", "executable_comment"),
    (b"SELECT /*M!100000 1 */ 2", "executable_comment"),
    (b"SELECT /* a comment */ 2", None),
    (b"SET foo_bar = 1", "set_variable"),
    (b"SET SESSION max_sp_recursion_depth = 3", "set_variable"),
    (b"SET time_zone = (SELECT '+00:00')", "set_variable"),
    (b"SET GLOBAL max_connections = 10", None),
    (b"SET @@global.max_connections = 10", None),
    (b"SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "next_transaction_characteristics"),
    (b"XA START 'x'", "xa_transaction"),
    (b"HANDLER t OPEN", "handler_statement"),
    (b"SELECT 'x'" + b" " * 16400, "statement_over_16kb"),
    (b"SELECT 1; SET @a = 2", "user_variable"),
]


@pytest.mark.parametrize("sql,reason", PINS, ids=[s[:40].decode() for s, _ in PINS])
def test_pin_reasons(sql, reason):
    assert RULES.classify(sql).pin == reason


def test_exclude_variable_sets():
    rules = Rules(["EXCLUDE_VARIABLE_SETS"])
    assert rules.classify(b"SET foo_bar = 1").pin is None
    assert rules.classify(b"SET @x = 1").pin == "user_variable"
    with pytest.raises(ValueError):
        Rules(["NOPE"])


@pytest.mark.parametrize("sql,sets", [
    (b"SET NAMES utf8mb4", [("names", "NAMES utf8mb4")]),
    (b"SET NAMES 'latin1' COLLATE 'latin1_bin'", [("names", "NAMES 'latin1' COLLATE 'latin1_bin'")]),
    (b"SET CHARACTER SET utf8", [("names", "CHARACTER SET utf8")]),
    (b"SET time_zone = '+01:00', @@session.sql_mode = ''",
     [("time_zone", "@@SESSION.time_zone = '+01:00'"), ("sql_mode", "@@SESSION.sql_mode = ''")]),
    (b"SET SESSION autocommit = 0", [("autocommit", "@@SESSION.autocommit = 0")]),
    (b"SET LOCAL wait_timeout := 60", [("wait_timeout", "@@SESSION.wait_timeout = 60")]),
    (b"SET time_zone = DEFAULT", [("time_zone", None)]),
    (b"SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
     [("transaction", "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")]),
    (b"SET SESSION TRANSACTION READ ONLY", [("transaction", "SET SESSION TRANSACTION READ ONLY")]),
])
def test_tracked_sets(sql, sets):
    verdict = RULES.classify(sql)
    assert verdict.pin is None and verdict.sets == sets


def test_other_facts():
    assert RULES.classify(b"USE `my db`").use_db == "my db"
    assert RULES.classify(b"SELECT ROW_COUNT()").simple_row_count
    assert not RULES.classify(b"SELECT ROW_COUNT() + 1").simple_row_count
    assert RULES.classify(b"SELECT CONNECTION_ID()").simple_connection_id
    assert RULES.classify(b"INSERT INTO t VALUES (LAST_INSERT_ID())").last_insert_id
    assert RULES.classify(b"COMMIT").ends_transaction
    assert not RULES.classify(b"ROLLBACK TO SAVEPOINT a").ends_transaction
    assert RULES.classify(b"SELECT 1").read_only and RULES.classify(b"SHOW TABLES").read_only
    assert not RULES.classify(b"SELECT 1; DELETE FROM t").read_only
    assert RULES.classify(b"KILL 5").kill == (False, 5)
    assert RULES.classify(b"KILL HARD QUERY 7").kill == (True, 7)
    assert RULES.classify(b"KILL 2+3").kill == (False, None)
    assert RULES.classify(b"KILL USER app").kill is None


@pytest.mark.parametrize("sql", [
    rb"SELECT 'a\'; SET ROLE r; SELECT ''",          # three statements without backslash escapes
    rb'SELECT "a\"; SET ROLE r; SELECT ""',          # ... or with ANSI_QUOTES
    rb"SELECT 'a\' /* '; DO GET_LOCK('x', 0); SELECT '' */",
])
def test_texts_that_read_otherwise_under_another_sql_mode_pin(sql):
    """sql_mode decides what a backslash or a double quote means, and a function can change
    it unseen: a text whose statements differ between the readings keeps its connection."""
    for rules in (Rules(), Rules(["EXCLUDE_VARIABLE_SETS"])):
        assert rules.classify(sql).pin is not None


@pytest.mark.parametrize("sql", [rb"SELECT 'a\nb'", rb"SELECT 'C:\\temp'",
                                 rb"SELECT * FROM t WHERE v LIKE 'a\_%'"])
def test_backslashes_that_mean_the_same_in_every_mode_do_not_pin(sql):
    assert Rules().classify(sql).pin is None


def test_set_role_pins_even_when_variable_sets_are_excluded():
    assert Rules(["EXCLUDE_VARIABLE_SETS"]).classify(b"SET ROLE admin").pin == "set_role"
