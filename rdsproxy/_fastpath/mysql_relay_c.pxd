# C layout of `mysql_relay_py.py` when setup.py compiles it as `rdsproxy._fastpath.mysql_relay_c`.
#
# The fields the quick lane reads and writes become C struct members (the engine's Python
# classes read and assign them as before, through their descriptors); the rest of what the
# engine keeps stays in each instance's __dict__.
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.string cimport memcpy

from rdsproxy._fastpath.ledger_c cimport ClientLedger
from rdsproxy._fastpath.pool_c cimport LatencyHistogram, PoolCore
from rdsproxy._fastpath.relay_c cimport RelayHalf, now, wire_write

cdef int CLIENT_READY
cdef int SERVER_IDLE
cdef int SERVER_BUSY
cdef int PHASE_FREE
cdef int PHASE_ACTIVE
cdef int PHASE_PINNED
cdef int COM_QUERY
cdef int COM_STMT_EXECUTE
cdef int OK_HEADER
cdef int EOF_HEADER
cdef int ERR_HEADER
cdef int LOCAL_INFILE_HEADER
cdef int CURSOR_TYPE_MASK
cdef int PARAMETER_COUNT_AVAILABLE
cdef unsigned long long LAST_STATEMENT_ID
cdef unsigned long long CLIENT_PROTOCOL_41
cdef unsigned long long CLIENT_DEPRECATE_EOF
cdef unsigned long long UNFOLLOWED_CAPABILITIES
cdef int SERVER_MORE_RESULTS_EXISTS
cdef int SERVER_STATUS_CURSOR_EXISTS
cdef int HOLD_STATUS
cdef Py_ssize_t MAX_PACKET
cdef int LANE_OFF
cdef int LANE_FIRST
cdef int LANE_COLUMNS
cdef int LANE_COLUMNS_EOF
cdef int LANE_ROWS
cdef Py_ssize_t SCAN_MORE
cdef Py_ssize_t SCAN_HANDOFF
cdef Py_ssize_t SCAN_BROKEN

cdef class ServerRelay


@cython.locals(sid=bytes, length=Py_ssize_t, out=bytes, dst="char *", src="const char *",
               bound=bytes, tsrc="const char *")
cdef bytes execute_packet(bytes chunk, unsigned long long statement_id, Py_ssize_t at,
                          object types)


cdef class ClientRelay(RelayHalf):
    cdef public int state
    cdef public bint busy
    cdef public object queue
    cdef public object reader
    cdef public ServerRelay server
    cdef public PoolCore pool_core
    cdef public object key
    cdef public object schema
    cdef public object vars
    cdef public object pin_reason
    cdef public bint long_data
    cdef public int phase
    cdef public ClientLedger ledger
    cdef public object engine
    cdef public object transport
    cdef public LatencyHistogram response_latency
    cdef public dict verdicts
    cdef public dict stmts
    cdef public object last_stmt_id
    cdef public object cursor_stmt
    cdef public object last_insert_id
    cdef public object lid_version
    cdef public object row_count
    cdef public object last_server
    cdef public object connection_id
    cdef public object cmd
    cdef public object cmd_seq
    cdef public object cmd_raw
    cdef public object cmd_payload_override
    cdef public object verdict
    cdef public object stmt
    cdef public Py_ssize_t outstanding
    cdef public unsigned long long queries
    cdef public unsigned long long activity
    cdef public unsigned long long quick_commands
    cdef public double request_at
    cdef public double forwarded_at
    cdef dict __dict__

    @cython.locals(chunk=bytes, n=Py_ssize_t, length=Py_ssize_t, cmd=int, at=Py_ssize_t,
                   sid="unsigned long long", nparams=Py_ssize_t, conn=ServerRelay,
                   borrowed=bint, clock=double, payload=bytes, out=bytes, types=object,
                   prepared=object)
    cdef bint quick_command(self, data) except -1
    cdef bint ready_on(self, ServerRelay conn) except -1
    cdef inline void _enter(self, int phase) noexcept


cdef class ServerRelay(RelayHalf):
    cdef public ClientRelay client
    cdef public object transport
    cdef public object key
    cdef public object pool
    cdef public PoolCore pool_core
    cdef public bint closed
    cdef public int mode
    cdef public int status
    cdef public unsigned long long capabilities
    cdef public object schema
    cdef public object vars
    cdef public object prepared
    cdef public object lid_owner
    cdef public object tracker
    cdef public bint forwarded
    cdef public double retire_at
    cdef public double idle_since
    cdef public int lane
    cdef public Py_ssize_t lane_columns
    cdef public Py_ssize_t lane_skip
    cdef public bytes lane_partial
    cdef public bint lane_continued
    cdef public bint lane_deprecate
    cdef public bint lane_fresh
    cdef public int lane_status
    cdef public int lane_ok
    cdef public unsigned long long lane_affected
    cdef public unsigned long long lane_insert_id
    cdef public Py_ssize_t lane_at
    cdef dict __dict__

    cdef void start_answer(self)
    @cython.locals(client=ClientRelay, end=Py_ssize_t)
    cdef received(self, data)
    @cython.locals(status=int, clock=double)
    cdef answer_done(self, ClientRelay client)
    @cython.locals(n=Py_ssize_t, pos=Py_ssize_t, base=Py_ssize_t, length=Py_ssize_t,
                   body=Py_ssize_t, end=Py_ssize_t, first=int, state=int, deprecate=bint,
                   count="unsigned long long", buf="const unsigned char *", passed=bint)
    cdef Py_ssize_t scan(self, bytes data) except -9
    @cython.locals(affected="unsigned long long", insert_id="unsigned long long",
                   at=Py_ssize_t)
    cdef bint read_ok(self, const unsigned char *buf, Py_ssize_t body, Py_ssize_t end) noexcept
    @cython.locals(first=int, size=int, value="unsigned long long", i=int)
    cdef unsigned long long read_length(self, const unsigned char *buf, Py_ssize_t at,
                                        Py_ssize_t end) noexcept


cdef bint state_held(ClientRelay client, ServerRelay conn) except -1
cpdef begin_answer(ServerRelay relay)
cpdef Py_ssize_t scan_chunk(ServerRelay relay, bytes data) except -9
