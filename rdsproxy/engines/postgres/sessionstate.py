"""What a PostgreSQL session holds: asked of the server rather than read from SQL text,
carried by its client, and brought to each connection the client borrows.

The pinning rules read statements; what they cannot see (a user's function, DO, CALL, a
FunctionCall message, names spelt with U&) can still change the session. After such a
transaction, before its connection serves another client, one query asks the server who
the session acts as and what it keeps, and `verdict` turns the answer into the reason to
pin the client (the state is its own and must stay with it) or None (nothing of the
client's is left: the connection may serve anyone). What a client may keep without a pin,
its settings and its SQL prepared statements, `carried_settings` and `carried_statements`
turn into what it carries (the relay's `desired` and `sql_prepared`), and `SessionSync`
brings a connection's session (its `applied`, `known_settings` and `sql_prepared`) to that.
Sans-IO: SQL out, DataRows in.

Every name in the SQL is qualified and every operator spelt OPERATOR(pg_catalog.x): the
session being checked may have a search_path that puts someone's own objects first.
"""
from __future__ import annotations

from . import protocol as pg
from .protocol import parse_datarow
from .pinning import (
    ADVISORY_LOCK,
    CURSOR,
    LISTEN,
    PREPARED_STATEMENT,
    SET_ROLE,
    SET_VARIABLE,
    TEMPORARY_OBJECT,
    prepare_statement_text,
)
from .statements import CHECK, MISSING, SERVER_NAME_PREFIX

_EQ = "OPERATOR(pg_catalog.=)"
_NE = "OPERATOR(pg_catalog.<>)"
_TEMP = "pg_catalog.pg_my_temp_schema()"
# Statements the proxy prepared for clients' named ones (statements.py) are its own, not
# the session's: rdsproxy_ and digits (or MISSING and CHECK, which only live for a
# moment, if at all).
_NOT_PROXYS = ("name OPERATOR(pg_catalog.!~) '^" + SERVER_NAME_PREFIX.decode() + "([0-9]+|"
               + MISSING[len(SERVER_NAME_PREFIX):].decode() + "|"
               + CHECK[len(SERVER_NAME_PREFIX):].decode() + ")$'")

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


def settings_after(known: dict, names, rows: list[bytes]) -> dict:
    """The session's settings once a transaction changed only the settings `names`:
    `known` with their values as current_settings_sql(names, missing_ok=True) read them
    (a custom setting that does not exist is left out)."""
    if not rows:
        raise ValueError("the settings read returned no row")
    values = read_current_settings(names, rows)
    settings = dict(known)
    for name in names:
        name = name.lower()
        if name in values:
            settings[name] = values[name]
        else:
            settings.pop(name, None)
    return settings


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


def quote_identifier(name: bytes) -> bytes:
    return b'"' + name.replace(b'"', b'""') + b'"'


def quote_setting_name(name: str) -> str:
    """A setting's name as quoted identifiers (a custom one is dotted: each part quoted)."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


def carried_settings(desired: tuple, known: dict, init_settings: dict,
                     settings: dict) -> tuple[str | None, tuple]:
    """(pin reason or None, the client's settings to carry) once its transaction left the
    session with `settings` (read from the server) where `known` were before: what the
    client changed becomes its own, what it RESET goes back to the server's default. A
    setting of init_query changed pins instead (SET_VARIABLE): only a reset (DISCARD ALL,
    then init_query again) brings the proxy's value back for the next client."""
    for name, value in init_settings.items():
        if settings.get(name) != value:
            return SET_VARIABLE, desired
    carried = dict(desired)
    spelled = {name.lower(): name for name in carried}   # settings are keyed lower-case
    for name, value in settings.items():
        if known.get(name) != value:
            carried[spelled.get(name, name)] = value
    for name in known:
        if name not in settings:   # RESET by the client: the server's default now
            carried.pop(spelled.get(name, name), None)
    return None, tuple(sorted(carried.items()))


def carried_statements(found: list, allowed: bool) -> tuple[str | None, tuple]:
    """(pin reason or None, the client's SQL prepared statements to carry, as sorted
    (name, PREPARE text) pairs) from what the state check found (`found`: each name and
    the query text it came from). PREPARED_STATEMENT when a text does not show how to
    make one again, a name would pass for one of the proxy's, or named statements are
    turned off (`allowed` false)."""
    if found and not allowed:
        return PREPARED_STATEMENT, ()
    carried = {}
    for name, source in found:
        if name.startswith(SERVER_NAME_PREFIX):
            return PREPARED_STATEMENT, ()
        text = prepare_statement_text(source, name)
        if text is None:
            return PREPARED_STATEMENT, ()
        carried[name] = text
    return None, tuple(sorted(carried.items()))


class SessionSync:
    """How to bring a connection's session to a client's: `requests` (wire bytes, each
    answered by one ReadyForQuery) and what their answers mean. Settings first, in one
    Query: RESET of those the client lacks, set_config (which reads a list setting such as
    search_path as the configuration file would) of those that differ, and a read of the
    server's spelling of them. Then, with `statements`, DEALLOCATE of the SQL prepared
    statements the client lacks, and each of its PREPAREs alone over the extended
    protocol, which runs exactly one statement whatever the text holds: one that fails
    (its table dropped since, say) costs the client that statement only."""

    __slots__ = ("requests", "set_names", "reset_names", "prepares")

    def __init__(self, desired: tuple, applied: tuple, client_statements: tuple = (),
                 server_statements: tuple = (), statements: bool = False):
        # Setting names are case-insensitive: "TimeZone" from a startup packet and
        # "timezone" from a client's SET are one setting.
        want = {name.lower(): (name, value) for name, value in desired}
        have = {name.lower(): value for name, value in applied}
        settings = []
        self.set_names = []
        self.reset_names = []
        for key in sorted(set(want) | set(have)):
            if key not in want:
                settings.append(f"RESET {quote_setting_name(key)}")
                self.reset_names.append(key)
            elif want[key][1] != have.get(key):
                self.set_names.append(want[key][0])
        values = dict(want.values())
        if self.set_names:
            settings.append("SELECT " + ", ".join(
                f"pg_catalog.set_config({quote_literal(name)}, {quote_literal(values[name])}, false)"
                for name in self.set_names))
            settings.append(current_settings_sql(self.set_names))
        self.requests = [pg.query("; ".join(settings))] if settings else []
        self.prepares = []
        if statements and client_statements != server_statements:
            wanted = dict(client_statements)
            held = dict(server_statements)
            drop = [name for name, text in held.items() if wanted.get(name) != text]
            if drop:
                self.requests.append(pg.message(b"Q", b"; ".join(
                    b"DEALLOCATE " + quote_identifier(name) for name in drop) + b"\x00"))
            for name, text in client_statements:
                if held.get(name) != text:
                    self.requests.append(pg.single_statement(text))
                    self.prepares.append(name)
        if not self.requests:
            self.requests.append(pg.query(""))   # names differed only in case: nothing to do

    def failed_statements(self, errors: list) -> set:
        """The names whose PREPARE failed (`errors`: one entry per request, all answered)."""
        if len(errors) != len(self.requests) or not self.prepares:
            return set()
        return {name for name, failure in zip(self.prepares, errors[-len(self.prepares):])
                if failure is not None}

    def settings_failed(self, errors: list) -> bool:
        """Whether a request other than a PREPARE failed, or not all were answered."""
        answered = len(errors) == len(self.requests)
        return not answered or any(errors[:len(errors) - len(self.prepares)])

    def learn(self, known: dict, rows: list) -> None:
        """The server's spelling of what was set, into the connection's known_settings, so
        that a later state check tells the proxy's settings from a client's."""
        for name in self.reset_names:
            known.pop(name.lower(), None)
        known.update(read_current_settings(self.set_names, rows))
