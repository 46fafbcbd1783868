# C layout of `ledger_py.py` when setup.py compiles it as `rdsproxy._fastpath.ledger_c`
# (the relay cimports these classes: its calls to them are C calls).
cimport cython

cdef Py_ssize_t ENTROPY_BLOCK
cdef int PHASE_FREE
cdef int PHASE_WAITING
cdef int PHASE_SYNCING
cdef int PHASE_ACTIVE
cdef int PHASE_PINNED
cdef int PHASES
cdef bytearray STRAY_MOVES


cdef class Entropy:
    cdef public object urandom
    cdef public bytes block
    cdef public Py_ssize_t used

    @cython.locals(used=Py_ssize_t)
    cpdef bytes take(self, Py_ssize_t n)


cdef class MetricCounters:
    cdef public long long ClientConnectionsReceived
    cdef public long long ClientConnectionsSetupSucceeded
    cdef public long long ClientConnectionsClosed
    cdef public long long ClientConnectionsRefused
    cdef public long long ClientConnections
    cdef public long long QueryRequests
    cdef public long long QueryRequestsTLS


cdef class ClientLedger:
    cdef public set clients
    cdef public MetricCounters metrics
    cdef public Py_ssize_t limit
    cdef public Py_ssize_t waiting
    cdef public Py_ssize_t syncing
    cdef public Py_ssize_t active
    cdef public Py_ssize_t pinned
    cdef public unsigned long long stray_moves

    cpdef int move(self, int old, int new) except -1
    cdef inline int _move(self, int old, int new) noexcept
    @cython.locals(metrics=MetricCounters)
    cpdef bint admit(self, client) except -1
    @cython.locals(metrics=MetricCounters)
    cpdef release(self, client, unsigned long long queries)
