"""What a PostgreSQL session holds, asked of the server rather than read from SQL text.

The pinning rules read statements; what they cannot see (a user's function, DO, CALL, a
FunctionCall message, names spelt with U&) can still change the session. After such a
transaction, before its connection serves another client, one query asks the server who
the session acts as and what it keeps, and `verdict` turns the answer into the reason to
pin the client (the state is its own and must stay with it) or None (nothing of the
client's is left: the connection may serve anyone). Sans-IO: SQL out, DataRows in.

Every name in the SQL is qualified and every operator spelt OPERATOR(pg_catalog.x): the
session being checked may have a search_path that puts someone's own objects first.
"""
from __future__ import annotations

from .protocol import parse_datarow
from .pinning import (
    ADVISORY_LOCK,
    CURSOR,
    LISTEN,
    PREPARED_STATEMENT,
    SET_ROLE,
    TEMPORARY_OBJECT,
)

_EQ = "OPERATOR(pg_catalog.=)"
_NE = "OPERATOR(pg_catalog.<>)"
_TEMP = "pg_catalog.pg_my_temp_schema()"
# Statements the proxy prepared for clients' named ones (statements.py) are its own, not
# the session's: rdsproxy_ and digits (or rdsproxy_missing and rdsproxy_check, which only
# live for a moment, if at all).
_NOT_PROXYS = "name OPERATOR(pg_catalog.!~) '^rdsproxy_([0-9]+|missing|check)$'"

# Settings the session itself set (SET, set_config, a function's SET), as the server
# spells their values. The role is asked for on its own.
SETTINGS_SQL = (
    "SELECT s.name, pg_catalog.current_setting(s.name) FROM pg_catalog.pg_show_all_settings() s"
    f" WHERE s.source {_EQ} 'session' AND s.name {_NE} 'role'"
    f" AND s.name {_NE} 'session_authorization'")

# Statements the session made with SQL PREPARE (its client carries them: frontend.
# _adopt_sql_statements), one row each, three columns to tell them from SETTINGS_SQL's.
SQL_STATEMENTS_SQL = (
    "SELECT NULL, name, statement FROM pg_catalog.pg_prepared_statements WHERE from_sql")

# One row of facts, then SETTINGS_SQL's rows, then SQL_STATEMENTS_SQL's.
STATE_CHECK_SQL = (
    "SELECT pg_catalog.current_setting('role'), session_user::pg_catalog.text,"
    # A session that never made a temporary object has no temporary schema (0): the
    # catalogs need not be scanned for one.
    f" CASE WHEN {_TEMP} {_EQ} 0 THEN false ELSE"
    f" EXISTS (SELECT FROM pg_catalog.pg_class WHERE relnamespace {_EQ} {_TEMP})"
    f" OR EXISTS (SELECT FROM pg_catalog.pg_proc WHERE pronamespace {_EQ} {_TEMP})"
    f" OR EXISTS (SELECT FROM pg_catalog.pg_type WHERE typnamespace {_EQ} {_TEMP}) END,"
    f" EXISTS (SELECT FROM pg_catalog.pg_locks WHERE locktype {_EQ} 'advisory'"
    f" AND pid {_EQ} pg_catalog.pg_backend_pid()),"
    " EXISTS (SELECT FROM pg_catalog.pg_listening_channels()),"
    " EXISTS (SELECT FROM pg_catalog.pg_cursors),"
    " EXISTS (SELECT FROM pg_catalog.pg_prepared_statements"
    f" WHERE NOT from_sql AND {_NOT_PROXYS}),"
    " (SELECT pg_catalog.string_agg(name, ' ') FROM pg_catalog.pg_prepared_statements"
    f" WHERE NOT from_sql AND NOT ({_NOT_PROXYS})); "
    + SETTINGS_SQL + "; " + SQL_STATEMENTS_SQL)


def data_row(payload: bytes) -> list:
    """A DataRow's columns as text (NULL as None)."""
    return [None if value is None else value.decode("utf-8", "replace")
            for value in parse_datarow(payload)]


def read_settings(rows: list[bytes]) -> dict[str, str]:
    """SETTINGS_SQL's rows (or those after the facts row) as {lower-cased name: value}:
    setting names are case-insensitive, and known_settings is keyed this way."""
    settings = {}
    for payload in rows:
        columns = data_row(payload)
        if len(columns) == 2 and columns[0] is not None:
            settings[columns[0].lower()] = columns[1]
    return settings


def read_sql_statements(rows: list[bytes]) -> list[tuple[bytes, bytes]]:
    """SQL_STATEMENTS_SQL's rows among the state check's, as (name, query text) in the
    client's encoding."""
    found = []
    for payload in rows:
        columns = parse_datarow(payload)
        if len(columns) == 3 and columns[0] is None and columns[1] is not None:
            found.append((bytes(columns[1]), bytes(columns[2] or b"")))
    return found


def current_settings_sql(names, missing_ok=False) -> str:
    """A query of the server's spelling of these settings' values, in order (with
    `missing_ok`, NULL for a custom setting that does not exist)."""
    missing = ", true" if missing_ok else ""
    return "SELECT " + ", ".join(
        "pg_catalog.current_setting(" + quote_literal(name) + missing + ")" for name in names)


def read_current_settings(names, rows: list[bytes]) -> dict[str, str]:
    """current_settings_sql's answer as {lower-cased name: value}, as read_settings."""
    columns = data_row(rows[-1]) if rows else []
    return {name.lower(): value for name, value in zip(names, columns) if value is not None}


def quote_literal(value: str) -> str:
    """A string literal that means `value` whatever standard_conforming_strings is (a
    client may have turned it off): with a backslash in it, the E'' form."""
    if "\\" in value:
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + value.replace("'", "''") + "'"


def proxy_statement_names(rows: list[bytes]) -> set[bytes]:
    """The proxy's statements the state check found on the connection."""
    listed = data_row(rows[0])[7] if rows else None
    return set(listed.encode().split()) if listed else set()


def verdict(rows: list[bytes], login_user: str, proxy_statements=()) -> str | None:
    """Why the client must keep this connection, from STATE_CHECK_SQL's answer; None
    when the session holds nothing of the client's but settings and SQL prepared
    statements (rows[1:], which the client carries with it instead: frontend.
    _adopt_settings and _adopt_sql_statements). The role always pins.
    `proxy_statements`: the names the proxy knows it prepared there; one of its names it
    does not know was made by the client."""
    if not rows:
        raise ValueError("the state check returned no row")
    facts = data_row(rows[0])
    if len(facts) != 8:
        raise ValueError(f"the state check returned {len(facts)} columns")
    role, session_user, temp, locks, listening, cursors, statements, proxys = facts
    if proxys and not set(proxys.encode().split()) <= set(proxy_statements):
        statements = "t"
    if role != "none" or session_user != login_user:
        return SET_ROLE
    for reason, held in ((TEMPORARY_OBJECT, temp), (ADVISORY_LOCK, locks), (LISTEN, listening),
                         (CURSOR, cursors), (PREPARED_STATEMENT, statements)):
        if held == "t":
            return reason
    return None
