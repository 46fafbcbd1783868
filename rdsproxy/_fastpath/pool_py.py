"""Borrow/return bookkeeping of a connection budget: idle stacks per key and a FIFO of
waiters; and the latency histograms of its borrows and of its connections' answers.

Pure-Python twin of `pool_c`, which setup.py compiles from this very file with the C types
of `pool_c.pxd` beside it (a cdef class with C-integer counters). It holds no I/O and no
timers: `rdsproxy.core.pool` opens and closes connections and runs the clocks; this class
only decides who gets which connection, in O(1) on the common paths.
"""
try:
    import cython
except ImportError:
    # Uncompiled and Cython not installed: a stand-in for the one attribute used. Bound
    # through globals() because Cython reserves the name `cython` (no rebinding allowed).
    globals()["cython"] = type("cython", (), {"compiled": False})

from collections import deque  # noqa: E402

from rdsproxy._fastpath import contract  # noqa: E402

# The buckets' upper bounds, a C array once compiled (pool_c.pxd): recording is then a few
# compares and adds. The last bucket, past them, is +Inf's.
LATENCY_BOUNDS = contract.LATENCY_BOUNDS
LATENCY_BUCKETS = len(LATENCY_BOUNDS) + 1


class LatencyHistogram:
    """Counts of durations by bucket (LATENCY_BOUNDS), with their sum: what a Prometheus
    histogram shows. The relay records from C (record); Python code calls observe."""

    def __init__(self):
        if not cython.compiled:   # compiled: a C array, zeroed with the object
            self.counts = [0] * LATENCY_BUCKETS
        self.sum = 0.0

    def record(self, seconds):
        i = 0
        while i < LATENCY_BUCKETS - 1 and seconds > LATENCY_BOUNDS[i]:
            i += 1
        self.counts[i] += 1
        self.sum += seconds

    def observe(self, seconds):
        self.record(seconds)

    def buckets(self):
        """The count of each bucket (not cumulative), the +Inf one last."""
        return [self.counts[i] for i in range(LATENCY_BUCKETS)]


class PoolCore:
    """Counts every connection of one budget and pairs free ones with waiters.

    `total` counts open and opening connections; `borrowed` those lent out. Idle connections
    sit on a stack per key (last in, first out, so the least used ones age and get reaped).
    Waiters are served strictly first come, first served across keys.
    """

    def __init__(self, max_size):
        self.max_size = max_size
        self.total = 0
        self.borrowed = 0
        self.idle_count = 0
        self._idle = {}
        # The stack last looked up, by the identity of its key: a pool mostly serves one
        # key (one user and database), and `is` spares hashing and comparing its tuple.
        # Stacks stay in _idle once made, so the one kept here is never stale.
        self._last_key = None
        self._last_stack = None
        self._waiters = deque()
        # Set by the owning Pool so the relay can queue a borrower without calling it:
        # its loop's clock, its connection_borrow_timeout, and whether its deadline timer
        # is running (it then covers every waiter queued behind the first).
        self.clock = None
        self.borrow_timeout = 0.0
        self.deadline_armed = False
        # From asking for a connection to getting one, and from a request forwarded on one
        # of this budget's connections to its answer (recorded by the engines and the relay).
        self.borrow_latency = LatencyHistogram()
        self.database_latency = LatencyHistogram()

    # -- borrowing ---------------------------------------------------------------------
    def _stack(self, key):
        """The idle stack of `key` (made empty the first time)."""
        if key is self._last_key:
            return self._last_stack
        stack = self._idle.get(key)
        if stack is None:
            stack = self._idle[key] = []
        self._last_key = key
        self._last_stack = stack
        return stack

    def try_borrow(self, key):
        """An idle connection for `key`, or None. Counts it as borrowed."""
        stack = self._stack(key)
        if stack:
            self.idle_count -= 1
            self.borrowed += 1
            return stack.pop()
        return None

    def reserve_new(self):
        """Claim budget for a new connection; False when the budget is spent."""
        if self.total < self.max_size:
            self.total += 1
            self.borrowed += 1
            return True
        return False

    def forget(self, borrowed):
        """A connection was closed (or failed to open): give its budget back."""
        self.total -= 1
        if borrowed:
            self.borrowed -= 1

    # -- returning ---------------------------------------------------------------------
    def give_back(self, key, conn):
        """Return a borrowed connection.

        Returns the waiter entry (key, waiter) that should now get a connection, or None
        when `conn` went onto its idle stack. When the first waiter wants the same key the
        caller hands `conn` over as it is; otherwise it closes `conn` and opens one for them.
        """
        if self._waiters:
            return self._waiters.popleft()
        self.borrowed -= 1
        self.idle_count += 1
        self._stack(key).append(conn)
        return None

    # -- waiting -----------------------------------------------------------------------
    def add_waiter(self, key, waiter):
        entry = (key, waiter)
        self._waiters.append(entry)
        return entry

    def queue_waiter(self, key, waiter):
        """Queue `waiter` behind others already waiting, when that is all the pool would do.

        With waiters queued the pool never opens a connection for a newcomer (no jumping the
        queue), so a borrower that found no idle connection just joins the back; it gets
        the deadline the pool would give it. Returns False when the pool must decide
        (nobody waits yet, or no deadline timer is running): the caller asks the pool.
        """
        if not self._waiters or (self.borrow_timeout > 0 and not self.deadline_armed):
            return False
        entry = (key, waiter)
        self._waiters.append(entry)
        waiter.borrow_entry = entry
        if self.borrow_timeout > 0:
            waiter.borrow_deadline = self.clock() + self.borrow_timeout
        return True

    def remove_waiter(self, entry):
        """Drop a waiter that timed out or went away; False if it was already served."""
        try:
            self._waiters.remove(entry)
        except ValueError:
            return False
        return True

    def pop_waiter(self):
        return self._waiters.popleft() if self._waiters else None

    def first_waiter(self):
        """The entry that would be served next, without removing it; None when none waits."""
        return self._waiters[0] if self._waiters else None

    @property
    def waiting(self):
        return len(self._waiters)

    # -- idle housekeeping -------------------------------------------------------------
    def take_idle(self, conn, key):
        """Remove one idle connection (to close it); False if it is not idle any more."""
        stack = self._idle.get(key)
        if not stack:
            return False
        try:
            stack.remove(conn)
        except ValueError:
            return False
        self.idle_count -= 1
        return True

    def idle_items(self):
        """(key, conn) for every idle connection, oldest first within a key."""
        return [(key, conn) for key, stack in self._idle.items() for conn in stack]
