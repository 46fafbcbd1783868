# C types of `pg_statements_py.py` when setup.py compiles it as `rdsproxy._fastpath.pg_statements_c`.
#
# The walk over a chunk's messages is a C loop; Python objects are made only for the names
# looked up and the renamed Binds.
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItemWithError
from cpython.object cimport PyObject
from libc.string cimport memcmp, memcpy

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

@cython.locals(end=Py_ssize_t, mtype=int, types=list, buf="const unsigned char *")
cdef list _answered_types(bytes data, Py_ssize_t pos)


cdef inline bint _same_bytes(const unsigned char *buf, Py_ssize_t start, Py_ssize_t stop,
                             bytes name) noexcept:
    """Whether buf[start:stop] holds `name`'s bytes."""
    return (PyBytes_GET_SIZE(name) == stop - start
            and memcmp(buf + start, PyBytes_AS_STRING(name), stop - start) == 0)


cdef inline object _cache_get(object cache, object key):
    """cache.get(key) for the OrderedDict of a connection's statements, without a method
    call: it keeps its items in the dict it derives from."""
    cdef PyObject *found = PyDict_GetItemWithError(cache, key)
    if found == NULL:
        return None
    return <object>found


cdef inline bytes _renamed_chunk(bytes data, list renamed, Py_ssize_t length):
    """rename_binds' chunk with its named Binds' statements replaced, in order, by
    `renamed`, in one allocation of `length` bytes (the messages were walked whole)."""
    cdef const unsigned char *src = <const unsigned char *>PyBytes_AS_STRING(data)
    cdef Py_ssize_t end = PyBytes_GET_SIZE(data)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, length)
    cdef unsigned char *dst = <unsigned char *>PyBytes_AS_STRING(out)
    cdef Py_ssize_t pos = 0, start = 0, size, portal_end, name_end, new_size, n
    cdef Py_ssize_t k = 0
    cdef bytes server_name
    while pos < end:
        size = 1 + ((src[pos + 1] << 24) | (src[pos + 2] << 16) | (src[pos + 3] << 8) | src[pos + 4])
        if src[pos] == MSG_BIND:
            portal_end = pos + 5
            while src[portal_end] != 0:
                portal_end += 1
            name_end = portal_end + 1
            while src[name_end] != 0:
                name_end += 1
            if name_end > portal_end + 1:
                server_name = <bytes>renamed[k]
                k += 1
                n = pos - start
                memcpy(dst, src + start, n)
                dst += n
                new_size = size - 1 + PyBytes_GET_SIZE(server_name) - (name_end - portal_end - 1)
                dst[0] = MSG_BIND
                dst[1] = (new_size >> 24) & 0xFF
                dst[2] = (new_size >> 16) & 0xFF
                dst[3] = (new_size >> 8) & 0xFF
                dst[4] = new_size & 0xFF
                dst += 5
                n = portal_end + 1 - (pos + 5)
                memcpy(dst, src + pos + 5, n)
                dst += n
                n = PyBytes_GET_SIZE(server_name)
                memcpy(dst, PyBytes_AS_STRING(server_name), n)
                dst += n
                n = pos + size - name_end
                memcpy(dst, src + name_end, n)
                dst += n
                start = pos + size
        pos += size
    memcpy(dst, src + start, end - start)
    return out


cdef class AnswerQueue:
    cdef public object server
    cdef public Py_ssize_t capacity
    cdef public object cache
    cdef public Py_ssize_t counter
    cdef public list queue
    cdef public bint skipping
    cdef public object buf
    cdef public Py_ssize_t passing
    cdef public object metrics
    cdef public object waiter
    cdef public object client_transport
    cdef public object recent

    # cdef: only the book calls it (a cpdef's override check would cost a lookup per call).
    cdef idle(self, client_transport)


cdef class BookCore:
    cdef public dict names
    cdef public object snapshot
    cdef public object buf
    cdef public Py_ssize_t passing
    cdef public list deferred
    cdef public Py_ssize_t deferred_ready
    cdef public Py_ssize_t batch
    cdef public dict unresolved
    cdef public bint stalled
    cdef public object server
    cdef public bint spoke
    cdef public set watched
    cdef public object client
    cdef public bytes bound_name

    cpdef attached(self, server, AnswerQueue state, bint replayable, client_transport)
    @cython.locals(ready=Py_ssize_t)
    cpdef object forward(self, data, server, AnswerQueue state, client_transport,
                         Py_ssize_t in_flight)
    @cython.locals(end=Py_ssize_t, pos=Py_ssize_t, size=Py_ssize_t, mtype=int,
                   ready=Py_ssize_t, portal_end=Py_ssize_t, name_end=Py_ssize_t,
                   answered_to=Py_ssize_t, grown=Py_ssize_t, renamed=list, names=dict,
                   watched=set, name=bytes, same=bint, buf="const unsigned char *")
    cdef object _rename_binds(self, bytes data, AnswerQueue queue)
