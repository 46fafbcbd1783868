"""What both engines and the relay count alike: the connected clients and their borrow
phases (ClientLedger), the counters every client connection moves (MetricCounters), and
the CSPRNG bytes logins draw (Entropy).

Pure-Python twin of `ledger_c`, which setup.py compiles from this very file with
`ledger_c.pxd`; the relay cimports these classes, so its calls to them are C calls.
"""
from rdsproxy._fastpath.contract import Phase

ENTROPY_BLOCK = 4096

PHASE_FREE = Phase.FREE   # C ints once compiled (ledger_c.pxd)
PHASE_WAITING = Phase.WAITING
PHASE_SYNCING = Phase.SYNCING
PHASE_ACTIVE = Phase.ACTIVE
PHASE_PINNED = Phase.PINNED
PHASES = len(Phase.NAMES)
# Moves that mean a bug: a connection prepared for a client that never asked, a pinned
# session checked (its connection never goes back) or waiting (it lost its connection,
# and its session with it). They are counted (stray_moves) and carried out all the same,
# so that the gauges still add up.
STRAY_MOVES = bytearray(PHASES * PHASES)
for _old, _new in ((PHASE_FREE, PHASE_SYNCING), (PHASE_PINNED, PHASE_SYNCING),
                   (PHASE_PINNED, PHASE_WAITING)):
    STRAY_MOVES[_old * PHASES + _new] = 1


class Entropy:
    """Bytes from the OS CSPRNG (salts, cancel secrets), drawn 4 KiB at a time so that a
    login costs no getrandom() call of its own; each byte is handed out once."""

    def __init__(self, urandom):
        self.urandom = urandom
        self.block = b""
        self.used = 0

    def take(self, n):
        used = self.used
        if used + n > len(self.block):
            self.block = self.urandom(ENTROPY_BLOCK)
            used = 0
        self.used = used + n
        return self.block[used:used + n]


class MetricCounters:
    """The counters every client connection moves, as C integers once compiled
    (ledger_c.pxd): an update is then one add, not an attribute lookup and store in a
    dict. core.metrics.Metrics derives from it and keeps the rest."""

    def __init__(self):
        self.ClientConnectionsReceived = 0
        self.ClientConnectionsSetupSucceeded = 0
        self.ClientConnectionsClosed = 0
        self.ClientConnectionsRefused = 0
        self.ClientConnections = 0      # a gauge: connected now
        self.QueryRequests = 0          # of the clients gone (BaseEngine adds those here)
        self.QueryRequestsTLS = 0       # ... of those that came over TLS


class ClientLedger:
    """Who is connected and what they hold: an engine's set of clients, its
    max_client_connections, the ClientConnections counters and the gauges of clients by
    phase, kept the same way for both engines and the relay."""

    def __init__(self, clients, metrics, limit):
        self.clients = clients
        self.metrics = metrics
        self.limit = limit
        self.waiting = 0   # clients in PHASE_WAITING, and so on
        self.syncing = 0
        self.active = 0
        self.pinned = 0
        self.stray_moves = 0

    def move(self, old, new):
        """A client goes from phase `old` to `new`: the one place the phase gauges change.
        Returns `new`, for the client to keep."""
        return self._move(old, new)

    def _move(self, old, new):  # the relay's own calls, straight from C
        if old == new:
            return new
        if STRAY_MOVES[old * PHASES + new]:
            self.stray_moves += 1
        if old == PHASE_ACTIVE:
            self.active -= 1
        elif old == PHASE_WAITING:
            self.waiting -= 1
        elif old == PHASE_PINNED:
            self.pinned -= 1
        elif old == PHASE_SYNCING:
            self.syncing -= 1
        if new == PHASE_ACTIVE:
            self.active += 1
        elif new == PHASE_WAITING:
            self.waiting += 1
        elif new == PHASE_PINNED:
            self.pinned += 1
        elif new == PHASE_SYNCING:
            self.syncing += 1
        return new

    def phases(self):
        """The gauges by phase name."""
        return {"waiting": self.waiting, "syncing": self.syncing, "active": self.active,
                "pinned": self.pinned}

    def admit(self, client):
        """Count a new client in; False when it is over the limit (it is then refused in
        its protocol's words, and not counted as connected)."""
        metrics = self.metrics
        metrics.ClientConnectionsReceived += 1
        clients = self.clients
        if len(clients) >= self.limit:
            metrics.ClientConnectionsRefused += 1
            return False
        clients.add(client)
        metrics.ClientConnections = len(clients)
        return True

    def release(self, client, queries):
        clients = self.clients
        clients.discard(client)
        metrics = self.metrics
        metrics.ClientConnectionsClosed += 1
        metrics.QueryRequests += queries
        if client.tls:   # split once per client, not per query
            metrics.QueryRequestsTLS += queries
        metrics.ClientConnections = len(clients)
