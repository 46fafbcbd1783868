# C layout of `relay_py.py` when setup.py compiles it as `rdsproxy._fastpath.relay_c`: the
# base the reactor calls in C, cimported by pg_relay_c, mysql_relay_c and reactor_c.
cimport cython


cdef extern from *:
    """
    #include <time.h>
    static inline double rdsproxy_monotonic(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    }
    """
    double c_monotonic "rdsproxy_monotonic"() nogil


cdef double now() noexcept


cdef class Wire:
    cpdef write(self, data)


@cython.locals(wire=Wire)
cdef wire_write(object transport, object data)


cdef class RelayHalf:
    cpdef data_received(self, data)
    cdef received(self, data)
    cpdef connection_lost(self, exc)
