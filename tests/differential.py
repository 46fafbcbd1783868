"""Differential testing: one client scenario, run directly against PostgreSQL and through
the proxy, and what the client saw on each side compared.

A scenario is a function of a `Side` (where to connect) returning an observation: plain
data (rows, SQLSTATEs and messages, ParameterStatus values, transaction status, pids as
the client can match them). `Differential.assert_same` runs it on both sides and fails
with both observations when they differ, so a difference reads as a diff, not as a
single wrong value.
"""
from __future__ import annotations

import json
import select
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass

import asyncpg
import psycopg
from harness import APP_DB, APP_PASSWORD, APP_USER
from proxyproc import ProxyProcess
from psycopg import pq
from utils import free_port, libpq_dsn, run


@dataclass
class Side:
    """Where a scenario connects: the database itself or the proxy in front of it."""

    name: str
    host: str
    port: int

    def dsn(self, user=APP_USER, password=APP_PASSWORD, dbname=APP_DB, **extra) -> str:
        return libpq_dsn(self.host, self.port, user, password, dbname, **extra)

    def asyncpg_session(self, use, **settings):
        """use(connection)'s result for an asyncpg session with these startup parameters,
        or the login's error as error_of gives it."""
        async def session():
            try:
                con = await self.asyncpg(**settings)
            except asyncpg.PostgresError as exc:
                return error_of(exc)
            try:
                return await use(con)
            finally:
                await con.close()
        return run(session())

    def asyncpg(self, **settings):
        """An asyncpg connection (a coroutine), with these startup parameters."""
        return asyncpg.connect(host=self.host, port=self.port, user=APP_USER,
                               password=APP_PASSWORD, database=APP_DB, ssl=False,
                               server_settings=settings or None)

    def connect(self, *, autocommit=True, **extra) -> psycopg.Connection:
        return psycopg.connect(self.dsn(**extra), autocommit=autocommit)

    @property
    def through_proxy(self) -> bool:
        return self.name == "proxy"


class Differential:
    """The two sides of one comparison: `direct` (the cluster) and `proxy`."""

    def __init__(self, cluster, proxy):
        self.cluster = cluster
        self.proxied = proxy
        self.direct = Side("direct", cluster.host, cluster.port)
        self.proxy = Side("proxy", proxy.host, proxy.port)

    def run(self, scenario) -> dict:
        """{'direct': observation, 'proxy': observation}, direct first."""
        return {side.name: scenario(side) for side in (self.direct, self.proxy)}

    def assert_same(self, scenario):
        """Run `scenario` on both sides; the observation when they agree."""
        seen = self.run(scenario)
        assert seen["proxy"] == seen["direct"], (
            f"the client sees a difference through the proxy:\n"
            f"  direct: {seen['direct']!r}\n  proxy:  {seen['proxy']!r}")
        return seen["direct"]


@contextmanager
def proxied_differential(directory, cluster, admin=False, **target_group):
    """A Differential over a proxy subprocess in front of `cluster` (libpq's blocking
    calls would hold the GIL against a proxy in the test's own process); with `admin`,
    its /stats are `diff.proxied.stats()`."""
    top = {}
    if admin:
        top["admin"] = {"listen": f"127.0.0.1:{free_port()}"}
    process = ProxyProcess(directory, cluster, [(APP_USER, APP_PASSWORD)], top=top, **target_group)
    if admin:
        process.stats = lambda: admin_stats(top["admin"]["listen"])
    try:
        yield Differential(cluster, process)
    finally:
        process.stop()


def take_turns(side, steps) -> list:
    """Run (client 0, 1, ..., SQL) steps on that many sessions of `side` in order, over the
    simple query protocol (a step may hold several statements); what each answered: the
    first column of its last result's first row, its status, or its error's SQLSTATE.
    Through a proxy with one database connection, the sessions must have shared it."""
    sessions = [psycopg.connect(side.dsn(), autocommit=True, prepare_threshold=None)
                for _ in range(1 + max(who for who, _ in steps))]
    seen = []
    try:
        for who, sql in steps:
            try:
                cur = sessions[who].execute(sql)
                while cur.nextset():
                    pass
                row = cur.fetchone() if cur.description else None
                seen.append((who, sql, row[0] if row else cur.statusmessage))
            except psycopg.Error as exc:
                seen.append((who, sql, exc.sqlstate))
        if side.through_proxy:   # one connection for both (directly there are two)
            assert len({s.execute("select pg_backend_pid()").fetchone()[0] for s in sessions}) == 1
    finally:
        for conn in sessions:
            conn.close()
    return seen


def stats_around_turns(diff, *scenarios) -> tuple[dict, dict]:
    """The proxy's admin stats before and after take_turns of each scenario through it."""
    before = diff.proxied.stats()
    for steps in scenarios:
        take_turns(diff.proxy, steps)
    return before, diff.proxied.stats()


def outcome(fn, *args):
    """('ok', value) or ('error', SQLSTATE, primary message) of fn(*args)."""
    try:
        return ("ok", fn(*args))
    except psycopg.Error as exc:
        return error_of(exc)


def error_of(exc) -> tuple:
    """('error', SQLSTATE, primary message) as the client sees them, for psycopg, asyncpg
    and psycopg2 exceptions."""
    diag = getattr(exc, "diag", None)
    if diag is not None and getattr(diag, "sqlstate", None) is not None:
        return ("error", diag.sqlstate, diag.message_primary)
    sqlstate = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    message = getattr(exc, "message", None) or getattr(exc, "pgerror", None) or str(exc)
    return ("error", sqlstate, message.strip())


def admin_stats(address: str) -> dict:
    """/stats of a proxy whose [admin] listener is at `address` ("host:port")."""
    with urllib.request.urlopen(f"http://{address}/stats", timeout=10) as reply:
        return json.loads(reply.read())


def next_result(conn: pq.PGconn, timeout: float = 20.0):
    """The next result of a libpq connection (pipeline mode included), waited for in
    Python: a blocking libpq call would hold the GIL."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn.consume_input()
        if not conn.is_busy():
            return conn.get_result()
        select.select([conn.socket], [], [], 0.2)
    said = conn.error_message.decode(errors="replace").strip() or "no error"
    raise TimeoutError(f"no result from the server in {timeout:g} s (libpq: {said})")


def flush(conn: pq.PGconn) -> None:
    """Send everything libpq has queued."""
    while conn.flush() != 0:
        select.select([], [conn.socket], [], 1.0)
