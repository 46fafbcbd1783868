# C layout of `pool_py.py` when setup.py compiles it as `rdsproxy._fastpath.pool_c`.
#
# Cython finds this file by the compiled module's name (pool_c), so the pure module never
# sees it. Counters become C integers (still readable and assignable from Python) and the
# methods cpdef with typed locals; their Python signatures are unchanged.
cimport cython

cdef double LATENCY_BOUNDS[16]
cdef Py_ssize_t LATENCY_BUCKETS


cdef class LatencyHistogram:
    cdef unsigned long long counts[17]
    cdef public double sum

    @cython.locals(i=Py_ssize_t)
    cdef inline void record(self, double seconds) noexcept
    cpdef observe(self, double seconds)
    @cython.locals(i=Py_ssize_t)
    cpdef list buckets(self)


cdef class PoolCore:
    cdef public Py_ssize_t max_size
    cdef public Py_ssize_t total
    cdef public Py_ssize_t borrowed
    cdef public Py_ssize_t idle_count
    cdef dict _idle
    cdef object _last_key
    cdef list _last_stack
    cdef object _waiters  # collections.deque of (key, waiter)
    cdef public object clock
    cdef public double borrow_timeout
    cdef public bint deadline_armed
    cdef public LatencyHistogram borrow_latency
    cdef public LatencyHistogram database_latency

    @cython.locals(stack=list)
    cdef list _stack(self, object key)
    @cython.locals(stack=list)
    cpdef object try_borrow(self, object key)
    cpdef bint reserve_new(self)
    cpdef forget(self, object borrowed)
    @cython.locals(stack=list)
    cpdef object give_back(self, object key, object conn)
    @cython.locals(entry=tuple)
    cpdef tuple add_waiter(self, object key, object waiter)
    @cython.locals(entry=tuple)
    cpdef bint queue_waiter(self, object key, object waiter) except -1
    cpdef bint remove_waiter(self, object entry) except -1
    cpdef object pop_waiter(self)
    cpdef object first_waiter(self)
    @cython.locals(stack=list)
    cpdef bint take_idle(self, object conn, object key) except -1
    cpdef list idle_items(self)
