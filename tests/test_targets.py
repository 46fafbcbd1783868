"""Target health and failover: core.targets state machine, the PostgreSQL probe, replicas.

The state-machine tests drive TargetGroup with a probe double (a function returning
ProbeResults or raising ProbeErrors on cue); everything about roles, failover, split
brain and flapping is also tested against real servers: a primary, a streaming replica
from PostgresCluster.make_replica(), and independent clusters.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

import psycopg
import pytest

from rdsproxy.core.targets import (AUTH_FAILURE, CONNECTION_FAILED,
                                   INVALID_REPLICATION_STATE, UNREACHABLE, ProbeError,
                                   ProbeResult, Role, Target, TargetGroup, TargetState)
from rdsproxy.devservers.base import free_port
from rdsproxy.devservers.postgres import PostgresCluster
from rdsproxy.engines.postgres.health import make_probe, probe
from rdsproxy.engines.postgres.protocol import parse_datarow

A = TargetState.AVAILABLE
U = TargetState.UNAVAILABLE
R = TargetState.REGISTERING


def run(coro, timeout: float = 60, *, use_uvloop: bool = False):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    if use_uvloop:   # the proxy's own loop
        import uvloop
        return uvloop.run(bounded())
    return asyncio.run(bounded())


async def wait_until(pred, timeout: float, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


class ProbeDouble:
    """A scripted probe: behaviour per target name (ProbeResult, an exception, or "hang")."""

    def __init__(self, **behaviour):
        self.behaviour = dict(behaviour)
        self.calls: list[tuple[str, str, float]] = []   # (name, host, monotonic time)

    async def __call__(self, target: Target) -> ProbeResult:
        self.calls.append((target.name, target.host, time.monotonic()))
        b = self.behaviour[target.name]
        if b == "hang":
            await asyncio.sleep(3600)
        if isinstance(b, BaseException):
            raise b
        return b

    def times(self, name: str) -> list[float]:
        return [t for n, _, t in self.calls if n == name]


WRITER = ProbeResult(Role.WRITER, 100)
READER = ProbeResult(Role.READER, 100)
REFUSED = ProbeError(CONNECTION_FAILED, "connection refused")


def events_recorder():
    events: list[tuple[str, str, str]] = []

    def on_change(target, what):
        events.append((target.name, what, target.state.value if what == "state"
                       else target.role.value))
    return events, on_change


# -- state machine with a probe double ---------------------------------------------------

def test_roles_states_and_describe():
    async def main():
        events, on_change = events_recorder()
        probe_ = ProbeDouble(a=WRITER, b=READER)
        ta, tb = Target("a", "hosta", 5432), Target("b", "hostb", 5433)
        group = TargetGroup([ta, tb], probe_, interval=0.05, timeout=1, failures=3,
                            on_change=on_change)
        assert ta.state is R and group.writer() is None
        assert group.describe()[0]["TargetHealth"]["State"] == "REGISTERING"
        await group.start()
        try:
            assert await group.wait_for_writer(2) is ta
            assert await group.wait_for_reader(2) is tb
            assert group.readers() == [tb]
            assert ta.max_connections == 100 and ta.last_probe_at is not None
            assert group.describe() == [
                {"Endpoint": "hosta", "Port": 5432, "RdsResourceId": "a",
                 "Type": "RDS_INSTANCE", "Role": "READ_WRITE",
                 "TargetHealth": {"State": "AVAILABLE", "Reason": None, "Description": None}},
                {"Endpoint": "hostb", "Port": 5433, "RdsResourceId": "b",
                 "Type": "RDS_INSTANCE", "Role": "READ_ONLY",
                 "TargetHealth": {"State": "AVAILABLE", "Reason": None, "Description": None}},
            ]
            await asyncio.sleep(0.2)  # more probes: no more events while nothing changes
        finally:
            await group.stop()
        assert sorted(events) == sorted([("a", "state", "AVAILABLE"), ("a", "role", "READ_WRITE"),
                                         ("b", "state", "AVAILABLE"), ("b", "role", "READ_ONLY")])
        assert len(probe_.times("a")) >= 3
    run(main())


def test_failure_threshold_reason_and_recovery():
    async def main():
        events, on_change = events_recorder()
        probe_ = ProbeDouble(a=WRITER)
        ta = Target("a", "hosta", 1)
        group = TargetGroup([ta], probe_, interval=0.05, timeout=1, failures=3,
                            on_change=on_change)
        await group.start()
        try:
            await group.wait_for_writer(2)
            probe_.behaviour["a"] = REFUSED
            n0 = len(probe_.calls)
            await wait_until(lambda: ta.state is U, 2, "UNAVAILABLE")
            # Exactly `failures` failed probes, not fewer.
            assert len(probe_.calls) - n0 == 3 and ta.consecutive_failures == 3
            assert ta.reason == CONNECTION_FAILED and ta.description == "connection refused"
            assert group.writer() is None
            assert ta.role is Role.WRITER     # last known role is kept for describe()
            # The cause of an ongoing outage is kept current.
            probe_.behaviour["a"] = ProbeError(AUTH_FAILURE, "password authentication failed")
            await wait_until(lambda: ta.reason == AUTH_FAILURE, 2, "AUTH_FAILURE")
            assert ta.state is U
            probe_.behaviour["a"] = WRITER
            assert await group.wait_for_writer(2) is ta
            assert ta.reason is None and ta.description is None and ta.consecutive_failures == 0
        finally:
            await group.stop()
        assert [e for e in events if e[1] == "state"] == [
            ("a", "state", "AVAILABLE"), ("a", "state", "UNAVAILABLE"), ("a", "state", "AVAILABLE")]
    run(main())


def test_first_failure_after_success_is_reprobed_at_once():
    async def main():
        probe_ = ProbeDouble(a=WRITER)
        ta = Target("a", "hosta", 1)
        group = TargetGroup([ta], probe_, interval=0.5, timeout=1, failures=2)
        await group.start()
        try:
            await group.wait_for_writer(2)
            probe_.behaviour["a"] = REFUSED
            t0 = time.monotonic()
            await wait_until(lambda: ta.state is U, 3, "UNAVAILABLE")
            elapsed = time.monotonic() - t0
        finally:
            await group.stop()
        times = probe_.times("a")
        # ok, fail, immediate re-probe (fail) -> UNAVAILABLE: one interval, not two.
        assert times[2] - times[1] < 0.1, times
        assert elapsed < 0.5 + 0.25, elapsed
    run(main())


def test_timeouts_and_probe_bugs():
    async def main():
        probe_ = ProbeDouble(slow="hang", buggy=RuntimeError("engine bug"))
        slow, buggy = Target("slow", "h", 1), Target("buggy", "h", 2)
        group = TargetGroup([slow, buggy], probe_, interval=0.05, timeout=0.1, failures=2)
        await group.start()
        try:
            # Before `failures` failures a new target stays REGISTERING, saying why.
            await wait_until(lambda: slow.consecutive_failures == 1, 2, "first timeout")
            assert slow.state is R and "timed out" in slow.description
            await wait_until(lambda: slow.state is U and buggy.state is U, 2, "UNAVAILABLE")
            assert slow.reason == UNREACHABLE and "timed out after 0.1s" in slow.description
            assert buggy.reason == CONNECTION_FAILED and "engine bug" in buggy.description
            t0 = time.monotonic()
            with pytest.raises(asyncio.TimeoutError, match="no AVAILABLE writer"):
                await group.wait_for_writer(0.3)
            assert 0.25 < time.monotonic() - t0 < 0.6
            with pytest.raises(asyncio.TimeoutError, match="no AVAILABLE reader"):
                await group.wait_for_reader(0.05)
        finally:
            await group.stop()
        # Checkers are really gone after stop().
        n = len(probe_.calls)
        await asyncio.sleep(0.15)
        assert len(probe_.calls) == n
    run(main())


def test_split_brain_with_probe_double(caplog):
    caplog.set_level(logging.WARNING, logger="rdsproxy.targets")

    async def main():
        probe_ = ProbeDouble(a=WRITER, b=READER)
        ta, tb = Target("a", "ha", 1), Target("b", "hb", 2)
        group = TargetGroup([ta, tb], probe_, interval=0.03, timeout=1, failures=2)
        await group.start()
        try:
            await group.wait_for_writer(2)
            await group.wait_for_reader(2)
            probe_.behaviour["b"] = WRITER
            await wait_until(lambda: tb.role is Role.WRITER, 2, "b reports WRITER")
            assert group.writer() is None and group.readers() == []
            for t in (ta, tb):
                assert t.state is A and t.reason == INVALID_REPLICATION_STATE
                assert "split brain" in t.description and "ha:1" in t.description
            await asyncio.sleep(0.2)    # many probe rounds, still one ERROR
            errors = [r for r in caplog.records if r.levelno == logging.ERROR]
            assert len(errors) == 1 and "split brain" in errors[0].getMessage()
            with pytest.raises(asyncio.TimeoutError):
                await group.wait_for_writer(0.1)
            # b steps down: resolved, writer routes again, reasons cleared.
            probe_.behaviour["b"] = READER
            assert await group.wait_for_writer(2) is ta
            assert ta.reason is None and tb.reason is None
            # A second episode is logged again.
            probe_.behaviour["b"] = WRITER
            await wait_until(lambda: group._split, 2, "second split")
            errors = [r for r in caplog.records if r.levelno == logging.ERROR]
            assert len(errors) == 2
            await group.remove_target("b")
            assert group.writer() is ta and ta.reason is None
        finally:
            await group.stop()
    run(main())


def test_wait_for_writer_wakes_on_the_change_itself():
    async def main():
        probe_ = ProbeDouble(a=READER)
        ta = Target("a", "ha", 1)
        group = TargetGroup([ta], probe_, interval=0.3, timeout=1, failures=1)
        await group.start()
        try:
            await group.wait_for_reader(2)
            waiter = asyncio.ensure_future(group.wait_for_writer(5))
            await asyncio.sleep(0.05)
            assert not waiter.done()
            probe_.behaviour["a"] = WRITER       # seen by the next probe (~0.3 s)
            assert await waiter is ta
            woke = time.monotonic()
            promoted_probe = probe_.times("a")[-1]
            # Woken by the probe that saw it, not by a polling loop of its own.
            assert woke - promoted_probe < 0.05
        finally:
            await group.stop()
    run(main())


def test_add_and_remove_targets_at_runtime():
    async def main():
        events, on_change = events_recorder()
        probe_ = ProbeDouble(a=WRITER, b="hang")
        ta = Target("a", "ha", 1)
        group = TargetGroup([ta], probe_, interval=0.03, timeout=5, failures=2,
                            on_change=on_change)
        await group.start()
        try:
            await group.wait_for_writer(2)
            with pytest.raises(ValueError, match="already registered"):
                group.add_target(Target("a", "other", 2))
            tb = group.add_target(Target("b", "hb", 2))
            assert tb.state is R and [d["RdsResourceId"] for d in group.describe()] == ["a", "b"]
            await wait_until(lambda: probe_.times("b"), 2, "b probed")
            probe_.behaviour["b"] = READER        # its first probe is still hanging...
            # ...so removal must cancel an in-flight probe.
            await group.remove_target(tb)
            assert [d["RdsResourceId"] for d in group.describe()] == ["a"]
            assert tb.state is TargetState.DEREGISTERING and group.get("b") is None
            n = len(probe_.times("b"))
            await asyncio.sleep(0.1)
            assert len(probe_.times("b")) == n
            # Re-add the same name: probed again, becomes a reader.
            tb2 = group.add_target(Target("b", "hb", 2))
            assert await group.wait_for_reader(2) is tb2
            with pytest.raises(KeyError):
                await group.remove_target("nope")
            # Removing the writer: routing stops at once, before its checker is gone.
            removal = asyncio.ensure_future(group.remove_target(ta))
            await asyncio.sleep(0)
            assert ta.state is TargetState.DEREGISTERING and group.writer() is None
            await removal
            assert group.targets == [tb2]
        finally:
            await group.stop()
        assert ("b", "state", "REGISTERING") in events
        assert ("b", "state", "DEREGISTERING") in events
        assert ("a", "state", "DEREGISTERING") in events
    run(main())


def test_probe_sees_host_changes():
    # Nothing is cached: the probe gets the Target and uses its current host name.
    async def main():
        probe_ = ProbeDouble(a=WRITER)
        ta = Target("a", "old.example", 1)
        group = TargetGroup([ta], probe_, interval=0.02, timeout=1, failures=1)
        await group.start()
        try:
            await wait_until(lambda: probe_.calls, 2, "a probe")
            ta.host = "new.example"
            await wait_until(lambda: probe_.calls[-1][1] == "new.example", 2, "new host used")
        finally:
            await group.stop()
    run(main())


def test_bad_group_parameters():
    with pytest.raises(ValueError):
        TargetGroup([], ProbeDouble(), interval=0, timeout=1, failures=1)
    with pytest.raises(ValueError):
        TargetGroup([], ProbeDouble(), interval=1, timeout=1, failures=0)
    with pytest.raises(ValueError):
        ProbeError("NOT_A_REASON", "x")


# -- real servers ------------------------------------------------------------------------

INTERVAL, FAILURES, TIMEOUT = 0.2, 3, 1.0


@pytest.fixture
def primary_and_replica():
    primary = PostgresCluster(max_connections=30).start()
    try:
        replica = primary.make_replica()
    except BaseException:
        primary.stop("immediate")
        raise
    try:
        yield primary, replica
    finally:
        replica.stop("immediate")
        primary.stop("immediate")


def real_probe(timeout: float = TIMEOUT):
    return make_probe(user="postgres", password="postgres", database="postgres",
                      timeout=timeout)


def target_of(name: str, cluster: PostgresCluster, host: str = "127.0.0.1") -> Target:
    return Target(name, host, cluster.port)


def test_parse_datarow():
    row = b"\x00\x03" + b"\x00\x00\x00\x01t" + b"\xff\xff\xff\xff" + b"\x00\x00\x00\x0250"
    assert parse_datarow(row) == [b"t", None, b"50"]
    with pytest.raises(ValueError):
        parse_datarow(b"\x00\x01\x00\x00\x00\x09abc")


def test_postgres_probe(primary_and_replica):
    primary, replica = primary_and_replica

    async def main():
        kw = dict(user="postgres", password="postgres", database="postgres", timeout=2)
        res = await probe(target_of("p", primary), **kw)
        assert res == ProbeResult(Role.WRITER, 30)
        # By name: "localhost" is resolved by the probe itself.
        res = await probe(target_of("r", replica, "localhost"), **kw)
        assert res == ProbeResult(Role.READER, 30)

        with pytest.raises(ProbeError) as info:
            await probe(target_of("p", primary), **{**kw, "password": "wrong"})
        assert info.value.reason == AUTH_FAILURE and "28P01" in info.value.description
        with pytest.raises(ProbeError) as info:
            await probe(Target("gone", "127.0.0.1", free_port()), **kw)
        assert info.value.reason == CONNECTION_FAILED
        with pytest.raises(ProbeError) as info:
            await probe(Target("dns", "no-such-host.invalid", 5432), **kw)
        assert info.value.reason == UNREACHABLE and "resolve" in info.value.description
        with pytest.raises(ProbeError) as info:
            await probe(target_of("p", primary), **{**kw, "database": "no_such_db"})
        assert info.value.reason == CONNECTION_FAILED and "3D000" in info.value.description

        # A server that accepts TCP but never answers: the probe times out on its own.
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)
            t0 = time.monotonic()
            with pytest.raises(ProbeError) as info:
                await probe(Target("silent", "127.0.0.1", silent.getsockname()[1]),
                            **{**kw, "timeout": 0.3})
            assert info.value.reason == UNREACHABLE and "timed out" in info.value.description
            assert time.monotonic() - t0 < 1.0
    run(main())
    # Probes close their connections: none left behind on the server.
    assert primary.psql("SELECT count(*) FROM pg_stat_activity "
                        "WHERE application_name = 'rdsproxy-health'") == "0"


def test_make_replica_streams_survives_primary_kill_and_promotes(primary_and_replica):
    primary, replica = primary_and_replica
    assert not primary.is_in_recovery() and replica.is_in_recovery()
    assert replica.port != primary.port and replica.base_dir != primary.base_dir
    with psycopg.connect(primary.dsn(), autocommit=True) as conn:
        conn.execute("SET synchronous_commit = on")
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1)")
    deadline = time.monotonic() + 10
    while replica.psql("SELECT count(*) FROM pg_class WHERE relname = 't'") != "1":
        assert time.monotonic() < deadline, "the row never reached the replica"
        time.sleep(0.05)
    assert replica.psql("SELECT count(*) FROM t") == "1"
    # The replica is read-only.
    with psycopg.connect(replica.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO t VALUES (2)")

    primary.kill()
    assert replica.psql("SELECT count(*) FROM t") == "1"   # still serving reads
    replica.promote()
    assert not replica.is_in_recovery()
    with psycopg.connect(replica.dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO t VALUES (2)")
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (2,)
    base = replica.base_dir
    replica.stop()
    assert not os.path.exists(base)


def test_failover_kill_primary_then_promote_replica(primary_and_replica):
    primary, replica = primary_and_replica
    timings = {}

    async def main():
        events, on_change = events_recorder()
        tp, tr = target_of("primary", primary), target_of("replica", replica)
        group = TargetGroup([tp, tr], real_probe(), interval=INTERVAL, timeout=TIMEOUT,
                            failures=FAILURES, on_change=on_change)
        await group.start()
        try:
            assert await group.wait_for_writer(10) is tp
            assert await group.wait_for_reader(10) is tr
            await wait_until(lambda: tr.state is A and tp.state is A, 10, "both AVAILABLE")
            assert (tp.role, tr.role) == (Role.WRITER, Role.READER)
            assert tp.max_connections == 30

            # pg_ctl stop -m immediate of the primary (off the loop: it blocks).
            await asyncio.to_thread(primary.kill)
            killed = time.monotonic()
            bound = INTERVAL * FAILURES + TIMEOUT
            await wait_until(lambda: tp.state is U, bound + 5, "primary UNAVAILABLE")
            timings["detect"] = time.monotonic() - killed
            assert timings["detect"] < bound, timings
            assert group.writer() is None and tp.reason == CONNECTION_FAILED
            assert group.readers() == [tr]

            # A target that never comes back: waiting for a writer times out cleanly.
            t0 = time.monotonic()
            with pytest.raises(asyncio.TimeoutError, match="primary UNAVAILABLE"):
                await group.wait_for_writer(0.5)
            assert 0.45 < time.monotonic() - t0 < 1.0

            waiter = asyncio.ensure_future(group.wait_for_writer(30))
            await asyncio.to_thread(replica.promote)
            promoted = time.monotonic()
            assert await waiter is tr
            timings["promote"] = time.monotonic() - promoted
            assert timings["promote"] < 2.0, timings
            assert tr.role is Role.WRITER and group.readers() == []

            # The old primary stays down, with its reason.
            await asyncio.sleep(INTERVAL * 3)
            assert tp.state is U and tp.reason == CONNECTION_FAILED
            assert group.writer() is tr
            health = {d["RdsResourceId"]: d for d in group.describe()}
            assert health["primary"]["TargetHealth"]["State"] == "UNAVAILABLE"
            assert health["primary"]["TargetHealth"]["Reason"] == "CONNECTION_FAILED"
            assert health["replica"]["Role"] == "READ_WRITE"
        finally:
            await group.stop()
        assert ("replica", "role", "READ_WRITE") in events
        assert ("primary", "state", "UNAVAILABLE") in events

    run(main())
    print(f"\nfailover timings: detection {timings['detect'] * 1000:.0f} ms after kill "
          f"(bound {(INTERVAL * FAILURES + TIMEOUT) * 1000:.0f} ms), writer "
          f"{timings['promote'] * 1000:.0f} ms after promote returned")


def test_split_brain_with_two_real_primaries(primary_and_replica, pg_factory, caplog):
    primary, replica = primary_and_replica
    other = pg_factory(max_connections=20)    # an independent primary, same superuser password
    caplog.set_level(logging.ERROR, logger="rdsproxy.targets")

    async def main():
        tp, tr = target_of("primary", primary), target_of("replica", replica)
        group = TargetGroup([tp, tr], real_probe(), interval=INTERVAL, timeout=TIMEOUT,
                            failures=FAILURES)
        await group.start()
        try:
            assert await group.wait_for_writer(10) is tp
            # The writer is found first; the replica's first check may still be running.
            await wait_until(lambda: tr.state is A, 10, "replica AVAILABLE")
            to = group.add_target(target_of("other", other))
            await wait_until(lambda: to.state is A, 10, "other AVAILABLE")
            assert to.role is Role.WRITER
            assert group.writer() is None
            assert group.readers() == [tr]          # readers are unaffected
            why = {d["RdsResourceId"]: d["TargetHealth"] for d in group.describe()}
            for name in ("primary", "other"):
                assert why[name]["Reason"] == "INVALID_REPLICATION_STATE"
                assert "split brain" in why[name]["Description"]
                assert str(other.port) in why[name]["Description"]
            assert why["replica"]["Reason"] is None
            await asyncio.sleep(INTERVAL * 3)
            assert len([r for r in caplog.records if "split brain" in r.getMessage()]) == 1
            await group.remove_target(to)
            assert group.writer() is tp and tp.reason is None
        finally:
            await group.stop()
    run(main())


def test_flapping_target_ends_available(pg_factory):
    cluster = pg_factory(max_connections=20)

    async def main():
        events, on_change = events_recorder()
        t = target_of("flappy", cluster)
        group = TargetGroup([t], real_probe(), interval=INTERVAL, timeout=TIMEOUT,
                            failures=2, on_change=on_change)
        await group.start()
        try:
            await group.wait_for_writer(10)
            for _ in range(2):
                await asyncio.to_thread(cluster.kill)
                await wait_until(lambda: t.state is U, 10, "UNAVAILABLE")
                assert group.writer() is None
                await asyncio.to_thread(cluster.start)
                assert await group.wait_for_writer(10) is t
            await asyncio.sleep(INTERVAL * 3)
            assert t.state is A and t.reason is None and group.writer() is t
        finally:
            await group.stop()
        assert [e[2] for e in events if e[1] == "state"] == [
            "AVAILABLE", "UNAVAILABLE", "AVAILABLE", "UNAVAILABLE", "AVAILABLE"]
    run(main())


def test_add_and_remove_real_targets(primary_and_replica):
    primary, replica = primary_and_replica

    async def main():
        tp = target_of("primary", primary)
        group = TargetGroup([tp], real_probe(), interval=INTERVAL, timeout=TIMEOUT,
                            failures=FAILURES)
        await group.start()
        try:
            assert await group.wait_for_writer(10) is tp
            with pytest.raises(asyncio.TimeoutError):
                await group.wait_for_reader(0.3)
            tr = group.add_target(target_of("replica", replica, "localhost"))
            assert tr.state is R
            assert await group.wait_for_reader(10) is tr
            assert tr.role is Role.READER and group.writer() is tp
            await group.remove_target("replica")
            assert group.readers() == [] and len(group.describe()) == 1
            await group.remove_target(tp)
            assert group.describe() == [] and group.writer() is None
        finally:
            await group.stop()
    run(main(), use_uvloop=True)
