"""Target health for one target group: which databases are up, and which one is the writer.

Charter: engine-agnostic health checking, modelled on RDS Proxy's DescribeDBProxyTargets.
A TargetGroup runs one checker task per Target that calls an engine-supplied `probe`
coroutine every `interval` seconds and turns its results into a state (REGISTERING ->
AVAILABLE / UNAVAILABLE, DEREGISTERING on removal), a role (READ_WRITE / READ_ONLY) and an
RDS-style reason. Routing asks `writer()` / `readers()`, or waits for one with
`wait_for_writer()` / `wait_for_reader()`, which wake on the change itself (no polling).

Rules:
* `failures` consecutive failed or timed-out probes make a target UNAVAILABLE; one
  success makes it AVAILABLE again. The first failure after a success is re-probed at
  once rather than after a full interval, so a dead writer is noticed fast.
* Two or more AVAILABLE writers is split brain: `writer()` returns None (writing to
  either could lose data), each writer's reason/description says why, and it is logged
  at ERROR once per episode. It resolves by itself when only one writer remains.
* Nothing about a target's address is cached here: the probe gets the Target and
  connects by its host name each time, so DNS changes (a failover that moves an
  endpoint) are seen on the next probe.

This module knows nothing about PostgreSQL; see rdsproxy.engines.postgres.health.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Awaitable, Callable

from .availability import AvailabilityRecord

log = logging.getLogger("rdsproxy.targets")

__all__ = ["TargetState", "Role", "ProbeResult", "ProbeError", "Target", "TargetGroup", "probe_failure",
           "run_probe",
           "CONNECTION_FAILED", "AUTH_FAILURE", "PENDING_PROXY_CAPACITY", "UNREACHABLE",
           "INVALID_REPLICATION_STATE"]

# RDS Proxy's TargetHealth.Reason values.
CONNECTION_FAILED = "CONNECTION_FAILED"
AUTH_FAILURE = "AUTH_FAILURE"
PENDING_PROXY_CAPACITY = "PENDING_PROXY_CAPACITY"
UNREACHABLE = "UNREACHABLE"
INVALID_REPLICATION_STATE = "INVALID_REPLICATION_STATE"
REASONS = (CONNECTION_FAILED, AUTH_FAILURE, PENDING_PROXY_CAPACITY, UNREACHABLE,
           INVALID_REPLICATION_STATE)


_UNREACHABLE_ERRNOS = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT,
                       errno.EHOSTDOWN, errno.ENETDOWN}


def probe_failure(exc: BaseException, where: str, timeout: float, stage: str) -> ProbeError:
    """RDS Proxy's reason for a probe that failed without an answer from the database
    (engines classify their servers' own errors first): timeouts, unresolvable names and
    unreachable networks -> UNREACHABLE; refused, reset, closed and the rest ->
    CONNECTION_FAILED. Cancellation and other BaseExceptions are re-raised."""
    if not isinstance(exc, Exception):
        raise exc
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return ProbeError(UNREACHABLE, f"{where}: {stage} timed out after {timeout:g}s")
    if isinstance(exc, socket.gaierror):
        return ProbeError(UNREACHABLE, f"{where}: cannot resolve host: {exc}")
    if isinstance(exc, OSError) and exc.errno in _UNREACHABLE_ERRNOS:
        return ProbeError(UNREACHABLE, f"{where}: {exc.strerror or exc}")
    if isinstance(exc, OSError):
        return ProbeError(CONNECTION_FAILED, f"{where}: {exc}")
    return ProbeError(CONNECTION_FAILED, f"{where}: {type(exc).__name__}: {exc}")


async def _with_timeout(aw, timeout: float):
    """await `aw` for at most `timeout` s (asyncio.TimeoutError). asyncio.timeout() on 3.11+
    tells an outside cancel from its own timeout reliably; wait_for on 3.10 is the fallback."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(timeout):
            return await aw
    return await asyncio.wait_for(aw, timeout)


class TargetState(str, Enum):
    AVAILABLE = "AVAILABLE"
    UNAVAILABLE = "UNAVAILABLE"
    REGISTERING = "REGISTERING"
    DEREGISTERING = "DEREGISTERING"


class Role(str, Enum):
    WRITER = "READ_WRITE"
    READER = "READ_ONLY"
    UNKNOWN = "UNKNOWN"


@dataclass
class ProbeResult:
    role: Role
    max_connections: int


class ProbeError(Exception):
    """A probe failure the engine could classify: `reason` is one of REASONS."""

    def __init__(self, reason: str, description: str):
        if reason not in REASONS:
            raise ValueError(f"unknown target health reason {reason!r}")
        super().__init__(description)
        self.reason = reason
        self.description = description


async def run_probe(connect, ask, classify, timeout: float, loop=None) -> ProbeResult:
    """The frame of every engine's health check. `connect()` opens a logged-in connection
    (within `timeout`, its own business); `ask(conn)` gets the ProbeResult in what is left
    of `timeout` (raising ProbeError for an answer it cannot read); the connection is always
    closed. Any other failure becomes the ProbeError `classify(exc, stage)` returns, stage
    being "connect" or "health query"."""
    loop = loop or asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        conn = await connect()
    except BaseException as exc:
        raise classify(exc, "connect") from None
    try:
        return await asyncio.wait_for(ask(conn), max(0.001, deadline - loop.time()))
    except ProbeError:
        raise
    except BaseException as exc:
        raise classify(exc, "health query") from None
    finally:
        conn.close()


@dataclass(eq=False)  # identity semantics: targets are dict keys of their checker tasks
class Target:
    name: str
    host: str
    port: int
    state: TargetState = TargetState.REGISTERING
    role: Role = Role.UNKNOWN
    reason: str | None = None
    description: str | None = "waiting for the first health check"
    consecutive_failures: int = 0
    last_probe_at: float | None = None      # time.time() of the last finished probe
    max_connections: int | None = None
    probes: int = field(default=0, repr=False)
    probe_started: float | None = field(default=None, repr=False)   # loop time
    ever_available: bool = False   # since it was registered
    # Its health verdicts over time: AvailabilityPercentage.
    availability: AvailabilityRecord = field(default_factory=AvailabilityRecord, repr=False)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


class TargetGroup:
    def __init__(self, targets: list[Target],
                 probe: Callable[[Target], Awaitable[ProbeResult]], *,
                 interval: float, timeout: float, failures: int, loop=None,
                 on_change: Callable[[Target, str], None] | None = None,
                 on_probe: Callable[[Target], None] | None = None):
        if interval <= 0 or timeout <= 0 or failures < 1:
            raise ValueError("interval and timeout must be > 0 and failures >= 1")
        self._targets: list[Target] = []
        self._probe = probe
        self.interval = float(interval)
        self.timeout = float(timeout)
        self.failures = int(failures)
        self.loop = loop
        self.on_change = on_change
        self.on_probe = on_probe              # after every finished probe
        self._wake: dict[Target, asyncio.Event] = {}
        self._tasks: dict[Target, asyncio.Task] = {}
        self._started = False
        self._split: set[Target] = set()    # writers of the current split-brain episode
        # The one AVAILABLE writer or None (see writer()); read as an attribute by the
        # router on every login, so keep it current rather than computed.
        self.current_writer: Target | None = None
        # Replaced on every change; waiters hold the old one, so one set() wakes them all.
        self._changed = asyncio.Event()
        for t in targets:
            self._register(t)

    # -- life cycle --------------------------------------------------------------------
    async def start(self) -> None:
        """Start one checker per target (each probes at once); returns without waiting."""
        if self._started:
            return
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        self._started = True
        for t in self._targets:
            self._spawn(t)

    async def stop(self) -> None:
        """Cancel every checker and wait for them; targets keep their last state."""
        self._started = False
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def targets(self) -> list[Target]:
        return list(self._targets)

    def get(self, name: str) -> Target | None:
        for t in self._targets:
            if t.name == name:
                return t
        return None

    def add_target(self, target: Target) -> Target:
        """Register a target at runtime: REGISTERING until its first successful probe."""
        self._register(target)
        if self._started:
            self._spawn(target)
        self._emit(target, "state")
        self._recompute()
        return target

    async def remove_target(self, target: Target | str) -> None:
        """DEREGISTERING at once (no routing to it), dropped once its checker has stopped."""
        if isinstance(target, str):
            found = self.get(target)
            if found is None:
                raise KeyError(target)
            target = found
        if target not in self._targets:
            raise KeyError(target.name)
        self._set_state(target, TargetState.DEREGISTERING, None, "deregistering")
        self._recompute()
        task = self._tasks.pop(target, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._targets.remove(target)
        self._split.discard(target)
        self._recompute()

    def _register(self, target: Target) -> None:
        if any(t.name == target.name for t in self._targets):
            raise ValueError(f"target {target.name!r} is already registered")
        target.state = TargetState.REGISTERING
        target.ever_available = False
        target.availability = AvailabilityRecord()
        target.reason = None
        target.description = "waiting for the first health check"
        target.consecutive_failures = 0
        self._targets.append(target)

    def _spawn(self, target: Target) -> None:
        self._tasks[target] = self.loop.create_task(self._check(target),
                                                    name=f"health-check {target.name}")

    # -- routing -----------------------------------------------------------------------
    def writer(self) -> Target | None:
        """The one AVAILABLE writer; None when there is none or more than one (split brain).
        Every login routes through here: it is worked out in _recompute, after each change."""
        return self.current_writer

    def readers(self) -> list[Target]:
        return [t for t in self._targets
                if t.state is TargetState.AVAILABLE and t.role is Role.READER]

    async def wait_for_writer(self, timeout: float) -> Target:
        """The writer as soon as there is one; asyncio.TimeoutError after `timeout` s."""
        return await self._wait(self.writer, timeout, "writer")

    async def wait_for_reader(self, timeout: float) -> Target:
        """An AVAILABLE reader as soon as there is one; asyncio.TimeoutError after `timeout` s."""
        return await self._wait(lambda: next(iter(self.readers()), None), timeout, "reader")

    async def _wait(self, pick, timeout: float, what: str) -> Target:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            found = pick()
            if found is not None:
                return found
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise asyncio.TimeoutError(
                    f"no AVAILABLE {what} within {timeout:g}s: {self.summary()}")
            try:
                await _with_timeout(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass   # loop once more: pick() again, then raise with the summary

    def describe(self) -> list[dict]:
        """Like `aws rds describe-db-proxy-targets` (Targets[])."""
        return [{
            "Endpoint": t.host,
            "Port": t.port,
            "RdsResourceId": t.name,
            "Type": "RDS_INSTANCE",
            "Role": t.role.value,
            "TargetHealth": {"State": t.state.value, "Reason": t.reason,
                             "Description": t.description},
        } for t in self._targets]

    async def check_all(self) -> None:
        """Probe every target once, now (without the checker tasks), each answer taken as
        final: a one-shot view, in which a failed check makes a target UNAVAILABLE with
        its reason (AUTH_FAILURE, UNREACHABLE...) rather than leave it REGISTERING."""
        failures, self.failures = self.failures, 1
        try:
            await asyncio.gather(*(self._probe_once(t) for t in self._targets))
        finally:
            self.failures = failures

    def probe_soon(self, target: Target) -> None:
        """Check `target` now rather than at its next interval (a connection to it failed)."""
        event = self._wake.get(target)
        if event is not None:
            event.set()

    def summary(self) -> str:
        return "; ".join(f"{t.name} {t.state.value} {t.role.value}"
                         + (f" ({t.reason}: {t.description})" if t.reason else "")
                         for t in self._targets) or "no targets"

    # -- checking ----------------------------------------------------------------------
    async def _check(self, target: Target) -> None:
        me = asyncio.current_task()
        while True:
            ok_before = target.consecutive_failures == 0 and target.state is TargetState.AVAILABLE
            ok = await self._probe_once(target)
            # stop()/remove_target() unregister the task before cancelling it. Python <3.12's
            # wait_for can swallow a cancel that races its own timeout, so do not rely on
            # CancelledError alone to end this loop.
            if self._tasks.get(target) is not me or target.state is TargetState.DEREGISTERING:
                return
            # A first failure after a success is re-probed at once: if the target is
            # really gone we reach `failures` (and fail over) an interval sooner.
            delay = 0 if (ok_before and not ok) else self.interval
            wake = self._wake.setdefault(target, asyncio.Event())
            wake.clear()
            try:
                await _with_timeout(wake.wait(), delay)
            except asyncio.TimeoutError:
                pass

    async def _probe_once(self, target: Target) -> bool:
        target.probe_started = self.loop.time()
        try:
            result = await _with_timeout(self._probe(target), self.timeout)
        except asyncio.CancelledError:
            raise
        except asyncio.TimeoutError:
            reason, description = UNREACHABLE, f"health check timed out after {self.timeout:g}s"
            result = None
        except ProbeError as exc:
            reason, description = exc.reason, exc.description
            result = None
        except Exception as exc:  # an engine bug must not kill the checker
            reason, description = CONNECTION_FAILED, f"{type(exc).__name__}: {exc}"
            result = None
        target.last_probe_at = time.time()
        target.probes += 1
        if target.state is TargetState.DEREGISTERING:
            return result is not None
        if result is not None:
            self._on_success(target, result)
        else:
            self._on_failure(target, reason, description)
        if self.on_probe is not None:
            try:
                self.on_probe(target)
            except Exception:
                log.exception("target group on_probe callback failed for %s", target.name)
        return result is not None

    def _on_success(self, target: Target, result: ProbeResult) -> None:
        target.consecutive_failures = 0
        target.max_connections = result.max_connections
        role_changed = result.role is not target.role
        if role_changed:
            log.info("target %s (%s) role %s -> %s", target.name, target.endpoint,
                     target.role.value, result.role.value)
            target.role = result.role
        if target.state is not TargetState.AVAILABLE:
            log.info("target %s (%s) is AVAILABLE (%s)", target.name, target.endpoint,
                     target.role.value)
            self._set_state(target, TargetState.AVAILABLE, None, None)
        elif target.reason is not None and target not in self._split:
            target.reason = target.description = None
        self._recompute()
        if role_changed:
            self._emit(target, "role")

    def _on_failure(self, target: Target, reason: str, description: str) -> None:
        target.consecutive_failures += 1
        n = target.consecutive_failures
        if n < self.failures:
            log.debug("target %s (%s): health check %d/%d failed: %s", target.name,
                      target.endpoint, n, self.failures, description)
            if target.state is TargetState.REGISTERING:
                target.description = f"health check failed ({n}/{self.failures}): {description}"
            return
        if target.state is not TargetState.UNAVAILABLE:
            log.warning("target %s (%s) is UNAVAILABLE after %d failed health checks: %s (%s)",
                        target.name, target.endpoint, n, reason, description)
            self._set_state(target, TargetState.UNAVAILABLE, reason, description)
            self._recompute()
        else:
            # Still down; keep the latest cause (it may change, e.g. refused -> auth).
            target.reason, target.description = reason, description

    def _set_state(self, target: Target, state: TargetState, reason, description) -> None:
        changed = target.state is not state
        target.state = state
        if state is TargetState.AVAILABLE:
            target.ever_available = True
        if state is not TargetState.REGISTERING:
            target.availability.record(state is TargetState.AVAILABLE)
        target.reason = reason
        target.description = description
        if changed:
            self._emit(target, "state")

    def _recompute(self) -> None:
        """Split-brain bookkeeping, then wake every waiter (something changed)."""
        writers = self._refresh_writer()
        if len(writers) >= 2:
            names = ", ".join(f"{t.name} ({t.endpoint})" for t in writers)
            text = (f"split brain: {len(writers)} AVAILABLE targets report role READ_WRITE "
                    f"({names}); no writes are routed until only one remains")
            if not self._split:
                log.error("target group %s", text)
            for t in self._split - set(writers):
                self._clear_split(t)
            self._split = set(writers)
            for t in writers:
                t.reason, t.description = INVALID_REPLICATION_STATE, text
        elif self._split:
            log.warning("split brain resolved: writer is now %s",
                        writers[0].name if writers else "none")
            for t in self._split:
                self._clear_split(t)
            self._split = set()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    @staticmethod
    def _clear_split(t: Target) -> None:
        if t.state is TargetState.AVAILABLE and t.reason == INVALID_REPLICATION_STATE:
            t.reason = t.description = None

    def _available_writers(self) -> list[Target]:
        return [t for t in self._targets
                if t.state is TargetState.AVAILABLE and t.role is Role.WRITER]

    def _refresh_writer(self) -> list[Target]:
        """writer() after a change of state, role or membership; the available writers."""
        writers = self._available_writers()
        self.current_writer = writers[0] if len(writers) == 1 else None
        return writers

    def _emit(self, target: Target, what: str) -> None:
        self._refresh_writer()   # what the callback reads must already be true
        if self.on_change is None:
            return
        try:
            self.on_change(target, what)
        except Exception:
            log.exception("target group on_change callback failed for %s (%s)",
                          target.name, what)
