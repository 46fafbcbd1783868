"""core.pool.Pool.release when the waiters it hands a connection to give it straight back
(MySQL logins waiting for their key's first connection do): served in turn, in a loop."""
from __future__ import annotations

import asyncio
import math

from rdsproxy.core.pool import Pool

KEY = ("app", "appdb")


class Conn:
    closed = False
    discarded = False
    retire_at = math.inf
    idle_since = 0.0
    key = KEY

    def close(self):
        self.closed = True


class GivesItBack:
    """A waiter that only needed to know a connection exists."""

    borrow_entry = None

    def __init__(self, pool, served):
        self.pool = pool
        self.served = served

    def on_connection(self, conn):
        self.served.append(self)
        self.pool.release(conn)


def test_a_long_queue_of_waiters_that_give_the_connection_back():
    loop = asyncio.new_event_loop()
    try:
        pool = Pool("p", None, max_connections_percent=10, max_idle_connections_percent=10,
                    borrow_timeout=0, loop=loop)
        served = []
        waiters = [GivesItBack(pool, served) for _ in range(5000)]   # far past the stack
        for waiter in waiters:
            pool.core.add_waiter(KEY, waiter)
        conn = Conn()
        assert pool.core.reserve_new()
        pool.release(conn)
        assert served == waiters                     # each in its turn, first come first
        assert pool.core.try_borrow(KEY) is conn     # and it ends idle
        assert pool.core.waiting == 0
    finally:
        loop.close()
