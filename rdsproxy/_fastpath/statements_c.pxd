# C types of `statements_py.py` when setup.py compiles it as `rdsproxy._fastpath.statements_c`.
#
# The walk over a chunk's messages is a C loop; Python objects are made only for the names
# looked up and the renamed Binds.
cimport cython

cdef int MSG_BIND
cdef int MSG_PARSE
cdef int MSG_DESCRIBE
cdef int MSG_CLOSE
cdef int MSG_QUERY
cdef int MSG_SYNC
cdef int MSG_FUNCTION_CALL
cdef int MSG_FLUSH
cdef int MSG_COPY_DATA
cdef int MSG_COPY_DONE
cdef int MSG_COPY_FAIL
cdef int STATEMENT_TARGET

cpdef bint drops_statements(bytes sql) except -1

@cython.locals(end=Py_ssize_t, pos=Py_ssize_t, start=Py_ssize_t, size=Py_ssize_t, mtype=int,
               ready=Py_ssize_t, portal_end=Py_ssize_t, name_end=Py_ssize_t, length=Py_ssize_t,
               pieces=list, unsynced=list, buf="const unsigned char *")
cpdef object rename_binds(bytes data, dict names, object cache)
