# C layout of `relay_py.py` when setup.py compiles it as `rdsproxy._fastpath.relay_c`.
#
# The fields read on every chunk become C struct members (no dict lookups); the engine's
# Python subclasses still add their own attributes in a __dict__.
cimport cython

cdef int STATE_READY
cdef int MODE_RELAY
cdef int STATUS_IDLE


cdef class ClientRelay:
    cdef public int state
    cdef public object server
    cdef public object scanner
    cdef public Py_ssize_t outstanding
    cdef public object pin_reason
    cdef public bint waiting
    cdef public bint terminating
    cdef public bint reading_paused
    cdef public list pending
    cdef public double last_active
    cdef public object engine
    cdef public object pool
    cdef public object transport
    cdef dict __dict__

    @cython.locals(n=Py_ssize_t)
    cpdef data_received(self, data)

    cpdef attach(self, conn)

    @cython.locals(outstanding=Py_ssize_t)
    cpdef on_server_ready(self, Py_ssize_t n, int status)


cdef class ServerRelay:
    cdef public int mode
    cdef public object client
    cdef public object scanner
    cdef public object transport
    cdef dict __dict__

    @cython.locals(n=Py_ssize_t)
    cpdef data_received(self, data)
