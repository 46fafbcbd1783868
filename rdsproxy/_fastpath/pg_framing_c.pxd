# C layout of `pg_framing_py.py` when setup.py compiles it as `rdsproxy._fastpath.pg_framing_c`.
#
# Cython finds this file by the compiled module's name (pg_framing_c), so the pure module
# never sees it. It types the fields and locals of the shared source and adds the one
# thing plain Python cannot say: how to get a pointer to the chunk (_feed_buffer).
cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE

cdef int MSG_READY_FOR_QUERY
cdef int STATUS_IDLE


cdef class MessageScanner:
    cdef public bytearray counted_mask
    cdef public bytearray captured_mask
    cdef public bytearray tallied_mask
    cdef public unsigned long long tally
    cdef public Py_ssize_t capture_limit
    cdef public long long max_message_size
    cdef public list captured
    cdef public int status
    cdef public int last_type

    cdef int _hdr_len
    cdef int _hdr_type
    # Lengths are unsigned 32-bit on the wire: long long holds them on every platform.
    cdef long long _hdr_length
    cdef long long _remaining
    cdef long long _length
    cdef int _current_type
    cdef bint _capturing
    cdef bytearray _capture_buf
    cdef bint _status_next
    cdef int _status_byte

    @cython.locals(twin=MessageScanner)
    cpdef MessageScanner fresh(self)
    cdef int _start(self) except -1
    cpdef Py_ssize_t feed(self, object data) except -1
    cpdef bint at_boundary(self)

    @cython.locals(count=Py_ssize_t, pos=Py_ssize_t, take=Py_ssize_t, room=Py_ssize_t,
                   mtype=int, length="long long", keep=Py_ssize_t, payload=bytes)
    cdef Py_ssize_t _scan(self, const unsigned char *buf, Py_ssize_t end) except -1

    @cython.locals(mtype=int)
    cdef int _complete(self) except -1


cdef inline Py_ssize_t _feed_buffer(MessageScanner scanner, object data) except -1:
    # bytes are immutable: read them in place. Anything else goes through the buffer
    # protocol, whose export also stops a bytearray from being resized mid-scan.
    cdef Py_buffer view
    if PyBytes_CheckExact(data):
        return scanner._scan(<const unsigned char *>PyBytes_AS_STRING(data),
                             PyBytes_GET_SIZE(data))
    try:
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    except BufferError:
        # A non-contiguous view: the pure twin indexes it, here a copy is simplest.
        data = memoryview(data).tobytes()
        return scanner._scan(<const unsigned char *>PyBytes_AS_STRING(data),
                             PyBytes_GET_SIZE(data))
    try:
        return scanner._scan(<const unsigned char *>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
