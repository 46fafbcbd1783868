"""One target's connection budget, shared by every (user, database) pool: borrow, return, wait, reap.

Engine-agnostic: connections come from an engine-supplied `connector` coroutine and only
need `key`, `close()`, `closed`, `discarded`, `created_at` and `idle_since` (the pool sets
`retire_at`). Borrowing is callback based
(no task or future per transaction): `acquire()` returns an idle connection at once when
there is one, and otherwise calls the waiter's `on_connection(conn)` or `on_borrow_error(exc)`
later. Waiters are served first come, first served across keys.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from .._fastpath import PoolCore

log = logging.getLogger("rdsproxy.pool")


class BorrowTimeout(Exception):
    """No connection became free within connection_borrow_timeout."""


class PoolClosed(Exception):
    pass


class Pool:
    def __init__(self, name: str, connector: Callable[[Any, bool], Awaitable[Any]], *,
                 max_connections_percent: int, max_idle_connections_percent: int,
                 borrow_timeout: float, idle_grace: float = 60.0, lifetime: float = 86400.0,
                 metrics=None, loop=None, defaults: dict | None = None, on_open_failure=None):
        self.name = name
        self._connector = connector
        self.max_connections_percent = max_connections_percent
        self.max_idle_connections_percent = max_idle_connections_percent
        self.borrow_timeout = borrow_timeout
        self.idle_grace = idle_grace
        self.lifetime = lifetime
        self.metrics = metrics
        self.loop = loop or asyncio.get_event_loop()
        # Until the first connection tells us the database's max_connections, allow one.
        self.server_max_connections: int | None = None
        self.core = PoolCore(1)
        self.core.clock = self.loop.time
        self.core.borrow_timeout = borrow_timeout
        self.max_idle = 0
        # Per key, what the engine learnt at the first connect (shared by a target group's pools).
        self.defaults: dict[Any, dict] = {} if defaults is None else defaults
        # Called as on_open_failure(key, waiter, exc) when opening fails; True means it took
        # care of the waiter (the router queues it while the target's health is checked).
        self.on_open_failure = on_open_failure
        # Called as on_connection_died(pool) when one of its connections ends unexpectedly.
        self.on_connection_died = None
        # Its connections ask for TLS (the target's tls is not "disable").
        self.tls = False
        self._opening: set[asyncio.Task] = set()
        self._closed = False
        # Connections given back while release() hands one over (see release).
        self._returning: list | None = None
        self._deadline_timer = None

    # -- budget ------------------------------------------------------------------------
    def set_server_max_connections(self, value: int) -> None:
        """Derive the budget from the database's max_connections (RDS Proxy's percentages)."""
        self.server_max_connections = value
        self.core.max_size = max(1, value * self.max_connections_percent // 100)
        self.max_idle = value * self.max_idle_connections_percent // 100
        log.info("pool %s: database max_connections=%d, budget=%d, max idle=%d",
                 self.name, value, self.core.max_size, self.max_idle)
        self._serve_waiters()

    def reconfigure(self, *, max_connections_percent: int, max_idle_connections_percent: int,
                    borrow_timeout: float, idle_grace: float, lifetime: float) -> None:
        """New settings from a reload. The budget follows at once (connections above a
        smaller one close as they come back idle); the lifetime counts for connections
        opened from now on."""
        self.max_connections_percent = max_connections_percent
        self.max_idle_connections_percent = max_idle_connections_percent
        self.borrow_timeout = self.core.borrow_timeout = borrow_timeout
        self.idle_grace = idle_grace
        self.lifetime = lifetime
        if self.server_max_connections is not None:
            self.set_server_max_connections(self.server_max_connections)

    def retire_all(self, borrowed) -> int:
        """Retire every connection: the idle ones now, `borrowed` (the ones lent out) when
        they come back. How many idle ones were closed."""
        for conn in borrowed:
            conn.retire_at = float("-inf")
        return self.close_idle()

    @property
    def max_size(self) -> int:
        return self.core.max_size

    def load(self) -> int:
        """Connections lent out or asked for: what least-connections routing compares."""
        return self.core.borrowed + self.core.waiting

    def stats(self) -> dict:
        core = self.core
        return {"max": core.max_size, "open": core.total, "borrowed": core.borrowed,
                "idle": core.idle_count, "waiting": core.waiting, "max_idle": self.max_idle}

    # -- borrowing ---------------------------------------------------------------------
    @staticmethod
    def usable(conn, now: float) -> bool:
        """The one test a connection passes before it is lent: still open and not past
        max_connection_lifetime. Applied when it is borrowed from the idle stack, when it
        comes back (the relay applies it to its typed fields on the coarse clock) and
        each second to the idle ones (reap)."""
        return not conn.closed and now < conn.retire_at

    def acquire(self, key, waiter):
        """An idle connection now, or None and a callback to `waiter` later."""
        if self._closed:
            raise PoolClosed(f"pool {self.name} is closed")
        core = self.core
        conn = core.try_borrow(key)
        while conn is not None:
            if self.usable(conn, self.loop.time()):
                return conn
            core.forget(True)
            conn.close()
            conn = core.try_borrow(key)
        if not core.waiting:  # never jump the queue
            if core.reserve_new() or self._evict_idle_for_budget():
                self._open_for(key, waiter)
                return None
        waiter.borrow_entry = core.add_waiter(key, waiter)
        if self.borrow_timeout > 0:
            if waiter.borrow_deadline is None:  # one deadline per borrow, wherever it waits
                waiter.borrow_deadline = self.loop.time() + self.borrow_timeout
            if self._deadline_timer is None:
                self._arm_deadline(waiter.borrow_deadline)
        return None

    def _arm_deadline(self, when: float) -> None:
        self._deadline_timer = self.loop.call_at(when, self._expire_waiters)
        self.core.deadline_armed = True  # lets the relay queue waiters without asking us

    def cancel_wait(self, waiter) -> None:
        """The waiter went away before it was served."""
        entry = getattr(waiter, "borrow_entry", None)
        if entry is not None and self.core.remove_waiter(entry):
            waiter.borrow_entry = None

    def _evict_idle_for_budget(self) -> bool:
        """Budget spent, but some other key has an idle connection: close it to make room."""
        for key, conn in self.core.idle_items():
            if self.core.take_idle(conn, key):
                self.core.forget(False)
                conn.close()
                return self.core.reserve_new()
        return False

    def _expire_waiters(self) -> None:
        """Fail the waiters whose connection_borrow_timeout has passed.

        One timer serves the whole queue: every waiter has the same timeout and joins at
        the back, so deadlines only grow from front to back (no timer per waiter).
        """
        self._deadline_timer = None
        core = self.core
        core.deadline_armed = False
        now = self.loop.time()
        while True:
            entry = core.first_waiter()
            if entry is None:
                return
            waiter = entry[1]
            if waiter.borrow_deadline > now:
                self._arm_deadline(waiter.borrow_deadline)
                return
            core.pop_waiter()
            waiter.borrow_entry = None
            if self.metrics:
                self.metrics.DatabaseConnectionsBorrowTimeouts += 1
            waiter.on_borrow_error(BorrowTimeout(
                f"timed out after {self.borrow_timeout:g} s waiting for a database connection "
                f"(connection_borrow_timeout; pool {self.name} has {core.max_size} connections, "
                f"all busy)"))

    def _open_for(self, key, waiter) -> None:
        task = self.loop.create_task(self._open(key, waiter))
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)

    async def _open(self, key, waiter) -> None:
        if self.metrics:
            self.metrics.DatabaseConnectionRequests += 1
            self.metrics.DatabaseConnectionRequestsWithTLS += self.tls
        try:
            conn = await self._connector(key, self.server_max_connections is None)
        except Exception as exc:
            self.core.forget(True)
            if self.metrics:
                self.metrics.DatabaseConnectionsSetupFailed += 1
            log.warning("pool %s: cannot open a database connection: %s", self.name, exc)
            try:
                handled = self.on_open_failure is not None and self.on_open_failure(key, waiter, exc)
            except Exception:  # a bug there must not leave the waiter hanging
                log.exception("pool %s: on_open_failure failed", self.name)
                handled = False
            if not handled:
                waiter.on_borrow_error(exc)
            self._serve_waiters()
            return
        if self.metrics:
            self.metrics.DatabaseConnectionsSetupSucceeded += 1
        conn.key = key
        conn.pool = self
        conn.pool_core = self.core
        conn.retire_at = conn.created_at + self.lifetime
        if self._closed:
            self.core.forget(True)
            conn.close()
            waiter.on_borrow_error(PoolClosed(f"pool {self.name} is closed"))
            return
        waiter.on_connection(conn)

    # -- returning ---------------------------------------------------------------------
    def release(self, conn) -> None:
        """Give back a clean connection: to the first waiter, or onto the idle stack.

        A waiter that gives the connection straight back (a MySQL login waiting for its
        key's first connection) does so from inside hand_over: that return is finished
        here once hand_over is done, so hundreds of such waiters make a loop, not a call
        chain that overflows the stack."""
        if self._returning is not None:
            self._returning.append(conn)
            return
        self._returning = returning = [conn]
        try:
            while returning:
                conn = returning.pop(0)
                now = self.loop.time()
                if self._closed or not self.usable(conn, now):
                    self.discard(conn)
                    continue
                entry = self.core.give_back(conn.key, conn)
                if entry is None:
                    conn.idle_since = now
                else:
                    self.hand_over(conn, entry)
        finally:
            self._returning = None

    def hand_over(self, conn, entry) -> None:
        """`conn` came back while `entry` (key, waiter) was first in the queue."""
        key, waiter = entry
        waiter.borrow_entry = None
        if key == conn.key:
            waiter.on_connection(conn)
        else:
            # The first waiter wants another user/database: trade this connection's budget.
            self.core.forget(True)
            conn.close()
            self.core.reserve_new()
            self._open_for(key, waiter)

    def discard(self, conn, borrowed: bool = True) -> None:
        """A borrowed connection is broken or dirty: close it and free its budget, once
        (a client leaving and its connection's last callback may both get here)."""
        conn.close()
        if conn.discarded:
            return
        conn.discarded = True
        self.core.forget(borrowed)
        self._serve_waiters()

    def idle_connection_lost(self, conn) -> None:
        """An idle connection was closed by the server or the network."""
        if self.core.take_idle(conn, conn.key):
            self.core.forget(False)
            if self.on_connection_died is not None:
                self.on_connection_died(self)
            self._serve_waiters()

    def _serve_waiters(self) -> None:
        core = self.core
        while core.waiting and core.total < core.max_size:
            key, waiter = core.pop_waiter()
            waiter.borrow_entry = None
            core.reserve_new()
            self._open_for(key, waiter)

    def close_idle(self, keys=None) -> int:
        """Close every idle connection (its target went away or changed role), or those
        whose key `keys(key)` accepts."""
        closed = 0
        for key, conn in self.core.idle_items():
            if (keys is None or keys(key)) and self.core.take_idle(conn, key):
                self.core.forget(False)
                conn.close()
                closed += 1
        return closed

    def take_waiters(self) -> list:
        """Remove and return every queued (key, waiter): they are to be routed elsewhere."""
        moved = []
        while True:
            entry = self.core.pop_waiter()
            if entry is None:
                return moved
            entry[1].borrow_entry = None
            moved.append(entry)

    # -- housekeeping ------------------------------------------------------------------
    def reap(self) -> None:
        """Close idle connections past their lifetime, and those above the idle limit."""
        now = self.loop.time()
        items = self.core.idle_items()
        excess = self.core.idle_count - self.max_idle
        for key, conn in items:  # oldest first within each key
            surplus = excess > 0 and now - conn.idle_since >= self.idle_grace
            if (surplus or not self.usable(conn, now)) and self.core.take_idle(conn, key):
                self.core.forget(False)
                conn.close()
                excess -= 1

    def idle_connections(self):
        return [conn for _, conn in self.core.idle_items()]

    async def close(self) -> None:
        self._closed = True
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
            self.core.deadline_armed = False
        for task in list(self._opening):
            task.cancel()
        while True:
            entry = self.core.pop_waiter()
            if entry is None:
                break
            entry[1].borrow_entry = None
            entry[1].on_borrow_error(PoolClosed(f"pool {self.name} is closed"))
        self.close_idle()

