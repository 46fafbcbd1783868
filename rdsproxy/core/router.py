"""Which target's pool serves a borrow, and where borrowers wait while no target fits.

Engine-agnostic. One Pool per target; the TargetGroup says which targets are AVAILABLE and
which one is the writer. `acquire(role, key, waiter)` routes a READ_WRITE borrow to the
writer's pool and a READ_ONLY borrow to the AVAILABLE reader with the fewest connections
(or the writer, with read_only_fallback_to_writer). When no target fits (the writer died
and nothing is promoted yet, split brain, all readers down), the borrower waits here, first
come first served, until the topology changes or its connection_borrow_timeout passes:
that is what turns a failover into a pause instead of errors.

A borrower keeps pointing at the pool it was routed to (its `pool`/`pool_core`), so the
relay can take idle connections from it without asking again. On any topology change the
router points every such borrower at an empty core, which sends its next borrow back here
to be routed afresh; idle connections of a target that is down or changed role are closed.

The admin console's PAUSE uses the same cut: while a database is paused, its borrowers are
routed nowhere, so each new transaction waits here (as in a failover) until RESUME.
"""
from __future__ import annotations

import logging
from collections import deque

from .._fastpath import PoolCore
from .pool import BorrowTimeout, Pool
from .targets import Role, Target, TargetGroup, TargetState

log = logging.getLogger("rdsproxy.router")

# A core that never has an idle connection: a borrower pointing here asks the router.
UNROUTED = PoolCore(0)


class Router:
    def __init__(self, group: TargetGroup, pools: dict[Target, Pool], *, borrow_timeout: float,
                 read_only_fallback_to_writer: bool = False, metrics=None, loop=None):
        self.group = group
        self.pools = pools
        self.borrow_timeout = borrow_timeout
        self.read_only_fallback_to_writer = read_only_fallback_to_writer
        self.metrics = metrics
        self.loop = loop
        self.borrowers: set = set()     # every client that may hold a routed pool_core
        self._waiters: deque = deque()  # (role, key, waiter), FIFO
        self._timer = None
        self._routes: dict[Role, Target | None] = {}
        # PAUSE: whether one is in force (the only test a borrow pays for), and of which
        # databases (None: every one).
        self.pausing = False
        self.paused_databases: set | None = set()

    # -- routing -----------------------------------------------------------------------
    def target_for(self, role: Role) -> Target | None:
        if role is Role.READER:
            readers = [t for t in self.group.readers() if t in self.pools]
            if readers:
                # Least connections: spread sessions over the readers.
                return min(readers, key=lambda t: self.pools[t].load())
            if not self.read_only_fallback_to_writer:
                return None
        writer = self.group.writer()
        return writer if writer in self.pools else None

    def route(self, client, role: Role | None = None):
        """Point `client` at the pool of the target that fits its role now (a client that
        just logged in: its first borrow can then take an idle connection in the relay
        without asking here). The pool, or None when no target fits."""
        role = client.route_role if role is None else role
        if self.pausing and self.is_paused(client.key):
            client.pool_core = UNROUTED
            return None
        # Every login of a READ_WRITE endpoint comes here: take the writer directly.
        target = self.group.current_writer if role is Role.WRITER else self.target_for(role)
        pool = self.pools.get(target)   # None: no target, or one without a pool (yet)
        if pool is None:
            return None
        client.pool = pool
        client.pool_core = pool.core
        return pool

    def acquire(self, role: Role, key, waiter):
        """Like Pool.acquire, through the pool of the target that fits `role` now."""
        pool = self.route(waiter, role)
        if pool is None:
            self._wait(role, key, waiter)
            return None
        return pool.acquire(key, waiter)

    # -- pausing (the admin console's PAUSE and RESUME) --------------------------------
    def is_paused(self, key) -> bool:
        """Whether borrows for pool key `key` (user, database, ...) wait for RESUME."""
        return self.paused_databases is None or key[1] in self.paused_databases

    def pause(self, database: str | None = None) -> None:
        """New transactions on `database` (None: every one) wait until resume(); those
        under way keep their connections until they end."""
        if database is None:
            self.paused_databases = None
        elif self.paused_databases is not None:
            self.paused_databases.add(database)
        self.pausing = True
        # Cut the relay's shortcut to idle connections, and bring the pools' queued
        # borrowers here, where the paused ones wait and the others are routed again.
        self.reroute_all()
        for pool in self.pools.values():
            for key, waiter in pool.take_waiters():
                self._wait(waiter.route_role, key, waiter)
        self.serve_waiters()

    def resume(self, database: str | None = None) -> None:
        """End pause(`database`) (None: every pause, including a pause of every database);
        the waiting borrowers go on."""
        if database is None or self.paused_databases is None:
            self.paused_databases = set()
        else:
            self.paused_databases.discard(database)
        self.pausing = bool(self.paused_databases)
        self.serve_waiters()

    def _hopeless(self) -> bool:
        """No target has ever been AVAILABLE and every one has failed its checks: a wrong
        address, password or TLS setting rather than a failover. Waiting would only turn
        the clear reason into a timeout."""
        targets = self.group.targets
        return bool(targets) and all(t.state is TargetState.UNAVAILABLE and not t.ever_available
                                     for t in targets)

    def _fail_hopeless(self, waiter) -> None:
        waiter.on_borrow_error(ConnectionError(
            f"no database target is reachable: {self.group.summary()}"))

    def _wait(self, role: Role, key, waiter) -> None:
        if self._hopeless():
            waiter.waiting_for_route = False
            self._fail_hopeless(waiter)
            return
        if waiter.borrow_deadline is None:  # a new borrow (a moved one keeps its deadline)
            waiter.borrow_deadline = self.loop.time() + self.borrow_timeout
        waiter.waiting_for_route = True
        waiter.pool_core = UNROUTED
        self._waiters.append((role, key, waiter))
        if self._timer is None and self.borrow_timeout > 0:
            self._timer = self.loop.call_at(waiter.borrow_deadline, self._expire)

    def requeue(self, role: Role, key, waiter, target: Target, exc: Exception) -> None:
        """Opening a connection to `target` failed as if it were down: wait for the health
        checks to say so (or not) instead of failing the client, and check it now."""
        log.info("cannot open a connection to %s (%s); the borrower waits for its health check",
                 target.name, exc)
        self.group.probe_soon(target)
        self._wait(role, key, waiter)

    def cancel_wait(self, waiter) -> None:
        if waiter.waiting_for_route:
            waiter.waiting_for_route = False
            for entry in self._waiters:
                if entry[2] is waiter:
                    self._waiters.remove(entry)
                    break
        elif waiter.pool is not None:
            waiter.pool.cancel_wait(waiter)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _expire(self) -> None:
        self._timer = None
        now = self.loop.time()
        keep = deque()
        expired = []
        for entry in self._waiters:
            (expired if entry[2].borrow_deadline <= now else keep).append(entry)
        self._waiters = keep
        for role, key, waiter in expired:
            waiter.waiting_for_route = False
            if self.metrics:
                self.metrics.DatabaseConnectionsBorrowTimeouts += 1
            if self.pausing and self.is_paused(key):
                awaited = f"RESUME of database {key[1]!r} (paused by the admin console)"
            else:
                what = "writer" if role is Role.WRITER else "reader"
                awaited = f"an AVAILABLE {what}"
            waiter.on_borrow_error(BorrowTimeout(
                f"timed out after {self.borrow_timeout:g} s waiting for {awaited} "
                f"(connection_borrow_timeout; targets: {self.group.summary()})"))
        if keep:
            first = min(entry[2].borrow_deadline for entry in keep)
            self._timer = self.loop.call_at(first, self._expire)

    def serve_waiters(self) -> None:
        """Route the queued borrowers whose role has a target now, in arrival order."""
        if not self._waiters:
            return
        queued, self._waiters = self._waiters, deque()
        for role, key, waiter in queued:
            if not waiter.waiting_for_route:
                continue
            if self.pausing and self.is_paused(key):
                self._waiters.append((role, key, waiter))
                continue
            if self.target_for(role) is None:
                if self._hopeless():
                    waiter.waiting_for_route = False
                    self._fail_hopeless(waiter)
                else:
                    self._waiters.append((role, key, waiter))
                continue
            waiter.waiting_for_route = False
            try:
                conn = self.acquire(role, key, waiter)
            except Exception as exc:  # PoolClosed
                waiter.on_borrow_error(exc)
                continue
            if conn is not None:
                waiter.on_connection(conn)

    # -- topology changes --------------------------------------------------------------
    def on_change(self, target: Target, what: str) -> None:
        """TargetGroup callback: a target changed state or role."""
        pool = self.pools.get(target)
        if pool is not None:
            if target.state is not TargetState.AVAILABLE or what == "role":
                # Connections to a dead target are useless; after a role change they would
                # send writes to a reader (or reads meant for replicas to the writer).
                closed = pool.close_idle()
                moved = pool.take_waiters()
                if closed or moved:
                    log.info("target %s %s %s: closed %d idle connection(s), %d borrower(s) "
                             "re-routed", target.name, target.state.value, target.role.value,
                             closed, len(moved))
                for key, waiter in moved:
                    self._wait(waiter.route_role, key, waiter)
            if (target.max_connections and target.state is TargetState.AVAILABLE
                    and target.max_connections != pool.server_max_connections):
                pool.set_server_max_connections(target.max_connections)
        self.reroute_all()
        routes = {role: self.target_for(role) for role in (Role.WRITER, Role.READER)}
        if routes != self._routes:
            self._routes = routes
            log.info("routing: READ_WRITE -> %s, READ_ONLY -> %s",
                     *(t.name if t else "none (borrowers wait)" for t in routes.values()))
        self.serve_waiters()

    def on_probe(self, target: Target) -> None:
        """After every health check: the budget may have changed; queued borrowers may fit."""
        pool = self.pools.get(target)
        if (pool is not None and target.max_connections and target.state is TargetState.AVAILABLE
                and target.max_connections != pool.server_max_connections):
            pool.set_server_max_connections(target.max_connections)
        self.serve_waiters()

    def reroute_all(self) -> None:
        """Every borrower asks again at its next borrow (its idle shortcut is cut)."""
        for client in self.borrowers:
            client.pool_core = UNROUTED
