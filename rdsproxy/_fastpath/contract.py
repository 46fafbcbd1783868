"""Values the compiled fast path and the engines' Python code agree on, other than the
wire's own (pgwire): a client's borrow phases, the states and modes the relay reads, the
statement book's one action and the latency histograms' buckets. Plain Python and never compiled; the twins copy what they read per chunk into C
ints at import (their `.pxd` declares those names).
"""

# A PostgreSQL client session's states, in the order it goes through them
# (engines/postgres/login.py and frontend.py name them; the relay reads four).
(PG_CLIENT_STARTUP, PG_CLIENT_AUTH_SASL_FIRST, PG_CLIENT_AUTH_SASL_FINAL, PG_CLIENT_AUTH_MD5,
 PG_CLIENT_LOGIN, PG_CLIENT_READY, PG_CLIENT_CLOSED, PG_CLIENT_AUTH_CLEARTEXT) = range(8)

# A PostgreSQL server connection's modes (engines/postgres/backend.py). RETIRING: its client
# left it in a state nothing can prove harmless, and it was asked to end.
(PG_SERVER_STARTING, PG_SERVER_RELAY, PG_SERVER_INTERNAL, PG_SERVER_CLOSED,
 PG_SERVER_RETIRING) = range(5)

# A MySQL client connection's states (engines/mysql/clientstate.py): greeting sent,
# authenticating (the login or COM_CHANGE_USER), authenticated but waiting for the first
# connection with its key, relaying commands, gone. The relay reads READY.
MYSQL_CLIENT_STARTUP, MYSQL_CLIENT_AUTH, MYSQL_CLIENT_LOGIN, MYSQL_CLIENT_READY, \
    MYSQL_CLIENT_CLOSED = range(5)

# A MySQL server connection's modes (engines/mysql/backend.py).
MYSQL_SERVER_STARTING, MYSQL_SERVER_IDLE, MYSQL_SERVER_BUSY, MYSQL_SERVER_CLOSED = range(4)

# What the statement book does with an answer it is owed: FORWARD passes it on as the
# server sent it (the quick lane's only action; engines/postgres/statements.py has the rest).
FORWARD = 0

# Upper bounds (seconds) of the latency histograms' buckets (pool_py.LatencyHistogram),
# with one more bucket past the last for +Inf.
LATENCY_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                  0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Phase:
    """Where a client stands with the database connections: its `phase`, which only
    ClientLedger.move changes (both engines' clients call it through their `enter`)."""
    FREE = 0      # holds none and asks for none: between transactions, logging in, gone
    WAITING = 1   # asked for one: queued at a pool or the router, or held for a health check
    SYNCING = 2   # the proxy holds one for it: bringing it to the client's session, or
                  # reading what the client's transaction left on it
    ACTIVE = 3    # holds one for its transaction
    PINNED = 4    # holds one for the rest of its session
    NAMES = ("free", "waiting", "syncing", "active", "pinned")
