"""DDL that needs a database to itself (DROP, RENAME, CREATE ... TEMPLATE) works through
the proxy as it does directly once the clients of that database have left: the proxy's
own idle connections never hold it."""
from __future__ import annotations

import pytest
from differential import outcome, proxied_differential


@pytest.fixture(scope="module")
def diff(tmp_path_factory, pg):
    with proxied_differential(tmp_path_factory.mktemp("proxy"), pg, max_connections_percent=10, max_idle_connections_percent=10) as differential:
        yield differential


def use_database(side, name, clients=3):
    for _ in range(clients):
        with side.connect(dbname=name) as conn:
            conn.execute("select 1")


def fresh_database(diff, name):
    with diff.direct.connect() as conn:
        conn.execute(f'drop database if exists "{name}"')
        conn.execute(f'create database "{name}"')


@pytest.mark.parametrize("statement", [
    "drop database {name}",
    'drop database if exists "{name}"',
    "alter database {name} rename to {name}_renamed",
    "create database {name}_copy template {name}",
])
def test_ddl_after_every_client_has_left(diff, statement):
    def scenario(side):
        name = f"ddl_{side.name}"
        for leftover in (name, f"{name}_renamed", f"{name}_copy"):
            with diff.direct.connect() as conn:
                conn.execute(f'drop database if exists "{leftover}"')
        fresh_database(diff, name)
        use_database(side, name)
        with side.connect() as conn:    # from another database, as one must
            return outcome(conn.execute, statement.format(name=name))[0]
    assert diff.assert_same(scenario) == "ok"


def test_ddl_on_a_database_in_real_use_fails_as_directly(diff):
    def scenario(side):
        name = f"busy_{side.name}"
        fresh_database(diff, name)
        with side.connect(dbname=name, autocommit=False) as holder:
            holder.execute("select 1")      # an open transaction: a real session
            with side.connect() as conn:
                seen = outcome(conn.execute, f"drop database {name}")
        return seen[0], seen[1], seen[2].replace(name, "<db>")
    seen = diff.assert_same(scenario)
    assert seen[:2] == ("error", "55006")
