"""Once a second: the coarse clock, idle and login timeouts, logins per address, pool reaping."""
from __future__ import annotations

import asyncio
import logging

from .._fastpath import Phase
from .sessions import CloseReason

log = logging.getLogger("rdsproxy.engine")
# Phases in which a client is busy though it may have nothing outstanding.
_BUSY_PHASES = (Phase.WAITING, Phase.SYNCING)


class Housekeeper:
    """Walks an engine's clients and pools; the engine closes clients in its own words."""

    def __init__(self, engine):
        self.engine = engine

    def logging_in(self, client) -> bool:
        engine = self.engine
        return client.state not in (engine.ready_state, engine.closed_state)

    def limit_logins_per_address(self) -> int:
        """Close the newest of the clients still logging in from any one address beyond
        max_logins_per_address; how many were closed. Run each second and whenever a
        client is refused for max_client_connections, so that half-open logins from one
        address never keep others out for long (the hot path counts nothing per address)."""
        engine = self.engine
        cap = engine.config.max_logins_per_address
        if not cap:
            return 0
        by_address: dict[str, list] = {}
        for client in engine.clients:
            if self.logging_in(client):
                by_address.setdefault(client.peer_host, []).append(client)
        closed = 0
        for address, clients in by_address.items():
            if len(clients) <= cap:
                continue
            clients.sort(key=lambda c: c.connected_at)
            log.warning("address %s has %d clients logging in (max_logins_per_address %d): "
                        "closing the newest %d", address, len(clients), cap, len(clients) - cap)
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
            elif now - client.connected_at >= login_timeout and self.logging_in(client):
                log.info("client %s: not logged in after %gs: closing (login_timeout)",
                         client.peer, login_timeout)
                engine.close_client(client, CloseReason.LOGIN_TIMEOUT)
        self.limit_logins_per_address()
        for pool in engine.router.pools.values():
            pool.reap()

    async def run(self) -> None:
        engine = self.engine
        while True:
            await asyncio.sleep(1.0)
            engine.clock = engine.loop.time()
            self.tick(engine.clock)
