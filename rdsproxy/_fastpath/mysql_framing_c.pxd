# C layout of `mysql_framing_py.py` when setup.py compiles it as
# `rdsproxy._fastpath.mysql_framing_c`: the header walk runs as a C loop over the chunk.
cimport cython


cdef class ResponseScanner:
    cdef public bytes partial
    cdef public Py_ssize_t skip
    cdef public bint continued

    cpdef reset(self)

    @cython.locals(n=Py_ssize_t, pos=Py_ssize_t, length=Py_ssize_t, body=Py_ssize_t,
                   end=Py_ssize_t, base=Py_ssize_t, rows=Py_ssize_t, in_rows=bint, deprecate=bint, passed=bint, first=int,
                   buf='const unsigned char *')
    cpdef Py_ssize_t scan(self, bytes data, object tracker) except -2
