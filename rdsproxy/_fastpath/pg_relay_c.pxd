# C layout of `pg_relay_py.py` when setup.py compiles it as `rdsproxy._fastpath.pg_relay_c`.
#
# The fields read on every chunk become C struct members typed with the other fast-path
# classes, so scanning, borrowing and returning are C calls (no attribute lookups); the
# engine's Python subclasses still add their own attributes in a __dict__.
cimport cython

from rdsproxy._fastpath.pg_framing_c cimport MessageScanner
from rdsproxy._fastpath.pg_keywords_c cimport KeywordScanner
from rdsproxy._fastpath.ledger_c cimport ClientLedger, Entropy, MetricCounters
from rdsproxy._fastpath.pool_c cimport LatencyHistogram, PoolCore
from rdsproxy._fastpath.relay_c cimport RelayHalf, Wire, now, wire_write


from rdsproxy._fastpath.pg_statements_c cimport AnswerQueue, BookCore

cdef int STATE_STARTUP
cdef int STATE_AUTH_MD5
cdef int STATE_READY
cdef int STATE_CLOSED
cdef int MODE_RELAY
cdef int STATUS_IDLE
cdef int MSG_QUERY
cdef int MSG_PARSE
cdef int MSG_FUNCTION_CALL
cdef int MSG_BIND
cdef int MSG_DESCRIBE
cdef int MSG_CLOSE
cdef int MSG_STATEMENT
cdef Py_ssize_t PENDING_LIMIT
cdef Py_ssize_t REPLAY_CHUNKS
cdef Py_ssize_t HOLD_LIMIT
cdef int MSG_COPY_IN
cdef int MSG_COPY_BOTH
cdef int MSG_FLUSH
cdef bytearray UNSYNCED_MASK
cdef int MSG_PASSWORD
cdef Py_ssize_t MD5_PASSWORD_SIZE
cdef bytes AUTH_MD5_REQUEST
cdef bytes AUTH_OK_MESSAGE
cdef bytes READY_FOR_QUERY_IDLE
cdef bytes TERMINATE
cdef bytes SSL_REQUEST
cdef bytes GSSENC_REQUEST
cdef bytes BACKEND_KEY_DATA_HEAD
cdef int PHASE_FREE
cdef int PHASE_WAITING
cdef int PHASE_ACTIVE
cdef int PHASE_PINNED

cdef class ClientRelay


cdef class StartupPlan:
    cdef public tuple session
    cdef public object user
    cdef public object database
    cdef public object key
    cdef public object desired
    cdef public object account
    cdef public bytes md5_inner
    cdef public bytes reply
    cdef public Py_ssize_t key_at

    cpdef learn_greeting(self, bytes statuses)


cdef class LoginDesk:
    cdef public dict plans
    cdef public dict by_pid
    cdef public Entropy entropy
    cdef public MetricCounters metrics
    cdef public object router
    cdef public object unrouted
    cdef public object throttle_entries
    cdef public bint tls_offered
    cdef public unsigned long long quick_logins
    cdef public bint log_sessions

    cpdef forget(self, ClientRelay client)

    @cython.locals(raw=bytes, pid=long, secret="unsigned long", i=int)
    cpdef tuple register_cancel_key(self, client)


cdef class SessionFactory:
    cdef public object cls
    cdef public object engine
    cdef public ClientLedger ledger
    cdef public object endpoint
    cdef public object route_role
    cdef public object unrouted
    cdef public KeywordScanner prefilter
    cdef public LoginDesk logins
    cdef public MessageScanner scanner
    cdef public LatencyHistogram response_latency

    @cython.locals(client=ClientRelay)
    cpdef ClientRelay make(self)


cdef class ServerRelay


cdef class ClientRelay(RelayHalf):
    cdef public int state
    cdef public ServerRelay server
    cdef public MessageScanner scanner
    cdef public PoolCore pool_core
    cdef public object key
    cdef public object desired
    cdef public object sql_prepared
    cdef public Py_ssize_t outstanding
    cdef public int type_before_chunk
    cdef public object pin_reason
    cdef public int phase
    cdef public bint unverified
    cdef public BookCore statements
    cdef public bint chunk_at_boundary
    cdef public bint terminating
    cdef public bint reading_paused
    cdef public list pending
    cdef public Py_ssize_t pending_size
    cdef public unsigned long long activity
    cdef public KeywordScanner prefilter
    cdef public object engine
    cdef public ClientLedger ledger
    cdef public object pool
    cdef public object transport
    cdef public list replay
    cdef public object borrow_entry
    cdef public object user
    cdef public object database
    cdef public LoginDesk logins
    cdef public int login_step
    cdef public StartupPlan plan
    cdef public object _auth
    cdef public object _account
    cdef public long pid
    cdef public unsigned long secret
    cdef public object endpoint
    cdef public object route_role
    cdef public double connected_at
    cdef public double last_active
    cdef public double request_at
    cdef public double forwarded_at
    cdef public LatencyHistogram response_latency
    cdef dict __dict__

    @cython.locals(engine=object)
    cpdef setup(self, SessionFactory factory)
    cpdef connection_made(self, transport)
    cpdef connection_lost(self, exc)
    cpdef close(self)

    @cython.locals(n=Py_ssize_t, server=ServerRelay, scanner=MessageScanner, conn=ServerRelay,
                   replay=list, statements=BookCore, out=object)
    cdef received(self, data)

    # cdef (C calls only): Cython checks every call of a cpdef method on an instance with a
    # __dict__ for a Python override, an attribute lookup plus a bound method per call.
    cdef bint ready_on(self, ServerRelay conn) except -1

    @cython.locals(logins=LoginDesk, plan=StartupPlan, salt=bytes, expected=bytes, pid=long,
                   secret="unsigned long", chunk=bytes, step=int, reply=bytearray,
                   at=Py_ssize_t, i=int)
    cdef bint quick_login(self, data) except -1

    @cython.locals(mtype=int, payload=bytes, entry=tuple, prefilter=KeywordScanner, unpinned=bint,
                   nul=Py_ssize_t)
    cdef screen(self, data)
    @cython.locals(scanner=MessageScanner)
    cpdef terminate(self, data)

    cpdef enter(self, int phase)
    cdef inline void _enter(self, int phase) noexcept
    cpdef attach(self, ServerRelay conn)
    @cython.locals(statements=BookCore, waited=bint, clock=double, borrowed=double,
                   core=PoolCore)
    cdef _attach(self, ServerRelay conn)

    @cython.locals(outstanding=Py_ssize_t, server=ServerRelay, entry=tuple, client=ClientRelay,
                   clock=double)
    cdef on_server_ready(self, Py_ssize_t n, int status)


cdef class ServerRelay(RelayHalf):
    cdef public int mode
    cdef public ClientRelay client
    cdef public MessageScanner scanner
    cdef public object transport
    cdef public object key
    cdef public object pool
    cdef public PoolCore pool_core
    cdef public bint closed
    cdef public object applied
    cdef public object sql_prepared
    cdef public double idle_since
    cdef public double retire_at
    cdef public list held
    cdef public Py_ssize_t held_size
    cdef public long last_client_pid
    cdef public AnswerQueue answers
    cdef public bint tracking
    cdef dict __dict__

    @cython.locals(n=Py_ssize_t, client=ClientRelay, scanner=MessageScanner, last=int,
                   held=list, clock=double, core=PoolCore)
    cdef received(self, data)
