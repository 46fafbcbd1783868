"""What a client carries from connection to connection, and the requests that bring a
connection's session to it (sessionstate: sans-IO, no server needed)."""
from __future__ import annotations

import pytest

from rdsproxy.engines.postgres import protocol as pg
from rdsproxy.engines.postgres.pinning import PREPARED_STATEMENT, SET_VARIABLE
from rdsproxy.engines.postgres.sessionstate import (
    SessionSync,
    carried_settings,
    carried_statements,
    settings_after,
)


def split(request: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of each message in a request."""
    out = []
    while request:
        size = 1 + int.from_bytes(request[1:5], "big")
        out.append((request[:1], request[5:size]))
        request = request[size:]
    return out


def test_settings_the_client_changed_and_reset():
    desired = (("TimeZone", "UTC"), ("work_mem", "8MB"))
    known = {"timezone": "UTC", "work_mem": "8MB", "lock_timeout": "2s"}
    after = {"timezone": "Asia/Tokyo", "lock_timeout": "2s", "search_path": "a, b"}
    reason, carried = carried_settings(desired, known, {}, after)
    # The startup spelling of a name is kept; a RESET drops it; a new one is added.
    assert (reason, carried) == (None, (("TimeZone", "Asia/Tokyo"), ("search_path", "a, b")))


def test_changing_an_init_query_setting_pins():
    known = {"statement_timeout": "31s"}
    for after in ({"statement_timeout": "5s"}, {}):
        reason, carried = carried_settings((), known, {"statement_timeout": "31s"}, after)
        assert (reason, carried) == (SET_VARIABLE, ())


def test_statements_carried_from_the_texts_they_came_from():
    found = [(b"b", b"prepare a as select 1; prepare b(int) as select $1"),
             (b"a", b"prepare a as select 1; prepare b(int) as select $1")]
    assert carried_statements(found, True) == (
        None, ((b"a", b"prepare a as select 1"), (b"b", b"prepare b(int) as select $1")))
    assert carried_statements([], True) == (None, ())


def test_statements_that_cannot_be_carried_pin():
    for found in ([(b"a", b"prepare a as select 1; deallocate a; prepare a as select 2")],
                  [(b"rdsproxy_1", b"prepare rdsproxy_1 as select 1")],
                  [(b"q", b"select 1")]):
        assert carried_statements(found, True) == (PREPARED_STATEMENT, ())
    assert carried_statements([(b"a", b"prepare a as select 1")], False) == (PREPARED_STATEMENT, ())


def test_sync_quotes_every_name_and_value():
    sync = SessionSync((("my.setting", "it's \\ here"), ("work_mem", "8MB")),
                       (("work_mem", "8MB"), ('odd"name.x', "1")))
    [(kind, payload)] = split(sync.requests[0])
    assert kind == b"Q"
    sql = payload.rstrip(b"\x00").decode()
    assert sql.startswith('RESET "odd""name"."x"; SELECT pg_catalog.set_config(\'my.setting\', '
                          "E'it''s \\\\ here', false); SELECT pg_catalog.current_setting(")
    assert sync.reset_names == ['odd"name.x'] and sync.set_names == ["my.setting"]
    assert len(sync.requests) == 1


def test_sync_of_statements_drops_theirs_and_makes_the_clients_one_by_one():
    mine = ((b"a", b"prepare a as select 1"), (b"b", b"prepare b as select 2"))
    theirs = ((b"a", b"prepare a as select 'other'"), (b'c"d', b'prepare "c""d" as select 3'))
    sync = SessionSync((), (), mine, theirs, statements=True)
    assert split(sync.requests[0]) == [(b"Q", b'DEALLOCATE "a"; DEALLOCATE "c""d"\x00')]
    assert sync.requests[1:] == [pg.single_statement(text) for _, text in mine]
    assert sync.prepares == [b"a", b"b"]
    # Each PREPARE is one statement over the extended protocol, then Sync.
    assert [kind for kind, _ in split(sync.requests[1])] == [b"P", b"B", b"E", b"S"]
    error = Exception("relation does not exist")
    assert sync.failed_statements([None, None, error]) == {b"b"}
    assert not sync.settings_failed([None, None, error])
    assert sync.settings_failed([error, None, None])
    assert sync.settings_failed([None])    # not all answered (the connection was lost)
    assert sync.failed_statements([None]) == set()


def test_sync_without_statements_leaves_them():
    sync = SessionSync((("work_mem", "1MB"),), (), ((b"a", b"prepare a as select 1"),), ())
    assert len(sync.requests) == 1 and sync.prepares == []
    # Names that differ only in case need nothing, but the request still gets its answer.
    sync = SessionSync((("TimeZone", "UTC"),), (("timezone", "UTC"),))
    assert sync.requests == [pg.query("")]


def data_row(*columns) -> bytes:
    out = len(columns).to_bytes(2, "big")
    for value in columns:
        out += (b"\xff\xff\xff\xff" if value is None
                else len(value).to_bytes(4, "big") + value)
    return out


def test_settings_after_a_plain_set_read():
    known = {"work_mem": "4MB", "myapp.tenant": "acme", "timezone": "UTC"}
    after = settings_after(known, ["myapp.tenant", "work_mem"], [data_row(None, b"8MB")])
    # A custom setting that no longer exists is left out; the rest is the known state.
    assert after == {"work_mem": "8MB", "timezone": "UTC"}
    assert known == {"work_mem": "4MB", "myapp.tenant": "acme", "timezone": "UTC"}
    with pytest.raises(ValueError):
        settings_after(known, ["work_mem"], [])   # no answer: the state is unknown
