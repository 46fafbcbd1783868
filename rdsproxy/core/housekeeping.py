"""Once a second: the coarse clock, idle and login timeouts, logins per address, pool reaping,
and every stats_log_interval seconds the log's stats line."""
from __future__ import annotations

import asyncio
import logging

from .._fastpath import Phase
from ..logs import session_lines, stats_log
from .sessions import CloseReason

log = logging.getLogger("rdsproxy.engine")
# Phases in which a client is busy though it may have nothing outstanding.
_BUSY_PHASES = (Phase.WAITING, Phase.SYNCING)
# How long a login may wait on its client before it counts as half-open, while the proxy has
# room: a busy host opening hundreds of connections at once can be seconds late.
HALF_OPEN_AFTER = 5.0


class Housekeeper:
    """Walks an engine's clients and pools; the engine closes clients in its own words."""

    def __init__(self, engine):
        self.engine = engine
        # The stats line reports counts since the previous one.
        self.stats_due = engine.clock + engine.config.stats_log_interval
        self.last_queries = 0
        self.last_logins = 0
        self.last_borrows: dict = {}   # per pool: its borrows at the previous line

    def login_waits_on_client(self, client) -> bool:
        """Not logged in yet, and the proxy waits for the client's next step (a startup
        packet, a password). A client authenticated and waiting for the pool is waiting on
        the proxy: connection_borrow_timeout bounds that, and a burst of them from one
        address (serverless functions behind one NAT) is no flood of half-open logins."""
        engine = self.engine
        return client.state not in (engine.ready_state, engine.closed_state,
                                    engine.authenticated_state)

    def limit_logins_per_address(self, waited: float = 0.0) -> int:
        """Close the newest of the clients logging in from any one address beyond
        max_logins_per_address, counting those whose login has waited on them `waited`
        seconds at least; how many were closed. Run each second (HALF_OPEN_AFTER) and
        whenever a client is refused for max_client_connections (all count), so that
        half-open logins from one address never keep others out for long (the hot path
        counts nothing per address)."""
        engine = self.engine
        cap = engine.config.max_logins_per_address
        if not cap:
            return 0
        since = engine.clock - waited
        by_address: dict[str, list] = {}
        for client in engine.clients:
            if client.connected_at <= since and self.login_waits_on_client(client):
                by_address.setdefault(client.peer_host, []).append(client)
        closed = 0
        for address, clients in by_address.items():
            if len(clients) <= cap:
                continue
            clients.sort(key=lambda c: c.connected_at)
            log.warning("address %s has %d logins waiting on their clients "
                        "(max_logins_per_address %d): closing the newest %d",
                        address, len(clients), cap, len(clients) - cap)
            for client in clients[cap:]:
                engine.close_client(client, CloseReason.LOGINS_PER_ADDRESS)
                closed += 1
        return closed

    def tick(self, now: float) -> None:
        engine = self.engine
        idle_timeout = engine.config.idle_client_timeout
        login_timeout = engine.config.login_timeout
        for client in list(engine.clients):
            if client.state == engine.ready_state:
                if client.activity != client.seen_activity:  # it sent something
                    client.seen_activity = client.activity
                    client.last_active = now
                if client.outstanding or client.phase in _BUSY_PHASES:
                    # Busy now (a request in flight): idleness starts after this tick.
                    # Holding a connection is not busy: a pinned session or an open
                    # transaction left idle is closed too (and its connection reset).
                    client.last_active = now
                # last_active is stamped with this coarse clock, up to one tick
                # early: allow that tick so an active client is never cut off.
                elif idle_timeout and now - client.last_active >= idle_timeout + 1.0:
                    log.info("client %s (user %s) idle for %gs: closing (idle_client_timeout)",
                             client.peer, client.user, idle_timeout)
                    engine.close_client(client, CloseReason.IDLE_TIMEOUT)
            elif now - client.connected_at >= login_timeout and self.login_waits_on_client(client):
                log.info("client %s: not logged in after %gs: closing (login_timeout)",
                         client.peer, login_timeout)
                engine.close_client(client, CloseReason.LOGIN_TIMEOUT)
        self.limit_logins_per_address(HALF_OPEN_AFTER)
        for pool in engine.router.pools.values():
            pool.reap()
        interval = engine.config.stats_log_interval
        if interval and now >= self.stats_due:
            self.stats_due = now + interval
            self.log_stats()
        session_lines.flush()   # the second's login and close lines

    def transactions(self) -> int:
        """Transactions since the previous stats line, counted by the connections the pools
        lent (a borrow serves one transaction, or a session from where it is pinned on);
        the borrow latency histograms count them already, so the hot path adds nothing."""
        borrows = {pool: sum(pool.core.borrow_latency.buckets())
                   for pool in self.engine.router.pools.values()}
        new = sum(n - self.last_borrows.get(pool, 0) for pool, n in borrows.items())
        self.last_borrows = borrows
        return new

    def log_stats(self) -> None:
        """The stats line: clients by phase, the pools' connections, and the logins,
        transactions and queries since the previous line."""
        engine = self.engine
        stats = engine.stats()
        phases = stats["sessions"]
        pool = stats["pool"]
        clients = len(engine.clients)
        ready = idle = 0
        for client in engine.clients:
            if client.state == engine.ready_state:
                ready += 1
                idle += client.phase == Phase.FREE
        queries = stats["QueryRequests"]
        logins = engine.metrics.ClientConnectionsSetupSucceeded
        new_queries, self.last_queries = queries - self.last_queries, queries
        new_logins, self.last_logins = logins - self.last_logins, logins
        transactions = self.transactions()
        fields = {"event": "stats", "engine": engine.name, "clients": clients,
                  "clients_logging_in": clients - ready, "clients_idle": idle,
                  **{f"clients_{phase}": n for phase, n in phases.items()},
                  "pool_open": pool["open"], "pool_idle": pool["idle"],
                  "pool_borrowed": pool["borrowed"], "pool_waiting": pool["waiting"],
                  "logins": new_logins, "transactions": transactions, "queries": new_queries}
        stats_log.info("stats: %d clients (%d logging in, %d idle, %d active, %d pinned, "
                       "%d waiting, %d syncing); pool %d open, %d idle, %d borrowed, %d waiting; "
                       "%d logins, %d transactions, %d queries since the last line", clients,
                       clients - ready, idle, phases["active"], phases["pinned"],
                       phases["waiting"], phases["syncing"], pool["open"], pool["idle"],
                       pool["borrowed"], pool["waiting"], new_logins, transactions, new_queries,
                       extra=fields)

    async def run(self) -> None:
        engine = self.engine
        while True:
            await asyncio.sleep(1.0)
            engine.clock = engine.loop.time()
            self.tick(engine.clock)
