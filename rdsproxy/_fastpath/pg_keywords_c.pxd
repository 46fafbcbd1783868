# C layout of `pg_keywords_py.py` when setup.py compiles it as `rdsproxy._fastpath.pg_keywords_c`.
#
# The scan runs as one C loop over the text (no lower-cased copy, no regex engine).
cimport cython


cdef class KeywordScanner:
    cdef public list leading
    cdef public list anywhere
    cdef object _regex
    cdef bytearray _leading_pairs
    cdef bytearray _anywhere_pairs
    cdef bytearray _anywhere_first

    cpdef bint may_match(self, bytes data) except -1

    @cython.locals(at_start=bint, i=Py_ssize_t, c=int, pair=int, word=bytes, n=Py_ssize_t,
                   lower="const unsigned char *", leading_pairs="const unsigned char *",
                   anywhere_pairs="const unsigned char *", anywhere_first="const unsigned char *")
    cdef bint _scan(self, const unsigned char *buf, Py_ssize_t end) except -1

    @cython.locals(n=Py_ssize_t, k=Py_ssize_t, lower="const unsigned char *")
    cdef bint _matches_at(self, const unsigned char *buf, Py_ssize_t end, Py_ssize_t i,
                          bytes word) except -1


cdef bytes _LOWER
cdef bint _word_byte(int c)
