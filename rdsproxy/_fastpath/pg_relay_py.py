"""The relay's per-chunk work: splice bytes between a client and its borrowed connection.

Pure-Python twin of `pg_relay_c`, which setup.py compiles from this very file with
`pg_relay_c.pxd` (C fields for the attributes read on every chunk). The engine's session
classes subclass these two and supply the slow paths this file calls by name:

  ClientRelay: startup_data(data), inspect(data) -> data, framing_error(exc), borrow(),
               on_connection(conn), verify_session(server) (at the end of a transaction
               that left `unverified` set), refuse() (over max_client_connections),
               release_on_exit() (core.sessions.ClientSide's: it leaves in a phase
               other than PHASE_FREE); the
               engine's ClientLedger counts it in and out. Sessions are made by a
               SessionFactory, which fills the fields (engine, pool_core, prefilter: a
               KeywordScanner that flags statements worth inspect()ing, ...).
  ServerRelay: slow_data(data), server_messages(data) -> data (captured ParameterStatus
               and NotificationResponse), framing_error(exc).

Per chunk the relay feeds the framing scanner (headers only), writes the chunk on
unchanged (one write call), borrows an idle connection straight from the pool core when
the client has none, and hands it back at the ReadyForQuery that answers the client's last
request. Anything less common (opening, waiting, parameter sync) goes to the engine.

Before that, the common login of a short-lived client runs here too: a startup packet seen
before (its StartupPlan) for an md5 account, answered with the salt, then the password
checked and the whole greeting written, two chunks and two writes with no Python frame.
Anything else, wrong passwords included, goes to the engine's login code (startup_data)
in the same state, so there is one set of rules and this is only its quick lane. Plans of
users who cannot log in (decoys) are answered here alike, up to their failure.
"""
from rdsproxy.auth.md5 import md5 as _md5
from hmac import compare_digest as _compare_digest
from rdsproxy._fastpath import contract, pgwire, relay_py
from rdsproxy._fastpath.contract import Phase

try:
    import cython
except ImportError:
    # Uncompiled and Cython not installed: a stand-in for the one attribute used. Bound
    # through globals() because Cython reserves the name `cython` (no rebinding allowed).
    globals()["cython"] = type("cython", (), {"compiled": False})

if not cython.compiled:
    relay_py.bind_base(globals())   # compiled: cimported by pg_relay_c.pxd

STATE_STARTUP = contract.PG_CLIENT_STARTUP   # C ints once compiled (pg_relay_c.pxd)
STATE_AUTH_MD5 = contract.PG_CLIENT_AUTH_MD5
STATE_READY = contract.PG_CLIENT_READY         # the client state in which bytes are relayed
STATE_CLOSED = contract.PG_CLIENT_CLOSED
MODE_RELAY = contract.PG_SERVER_RELAY          # the server mode in which bytes are relayed
PENDING_LIMIT = 262144    # bytes a waiting client may queue in the proxy before we pause it
REPLAY_CHUNKS = 16        # chunks of one request kept for a replay; a longer one is not replayed
HOLD_LIMIT = 65536        # bytes of an answer held back while its request may be replayed
INFINITY = float("inf")

PHASE_FREE = Phase.FREE         # the client phases the relay moves through (pg_relay_c.pxd)
PHASE_WAITING = Phase.WAITING
PHASE_ACTIVE = Phase.ACTIVE
PHASE_PINNED = Phase.PINNED

# The wire's values (pgwire), as C ints and bytes once compiled (pg_relay_c.pxd).
STATUS_IDLE = pgwire.STATUS_IDLE
MSG_QUERY = pgwire.MSG_QUERY
MSG_PARSE = pgwire.MSG_PARSE
MSG_FUNCTION_CALL = pgwire.MSG_FUNCTION_CALL
MSG_BIND = pgwire.MSG_BIND
MSG_DESCRIBE = pgwire.MSG_DESCRIBE
MSG_CLOSE = pgwire.MSG_CLOSE
MSG_STATEMENT = pgwire.TARGET_STATEMENT
MSG_COPY_IN = pgwire.MSG_COPY_IN
MSG_COPY_BOTH = pgwire.MSG_COPY_BOTH
MSG_FLUSH = pgwire.MSG_FLUSH
MSG_PASSWORD = pgwire.MSG_PASSWORD
MD5_PASSWORD_SIZE = pgwire.MD5_PASSWORD_SIZE
AUTH_MD5_REQUEST = pgwire.AUTH_MD5_REQUEST
AUTH_OK_MESSAGE = pgwire.AUTH_OK_MESSAGE
READY_FOR_QUERY_IDLE = pgwire.READY_FOR_QUERY_IDLE
TERMINATE = pgwire.TERMINATE
SSL_REQUEST = pgwire.SSL_REQUEST
GSSENC_REQUEST = pgwire.GSSENC_REQUEST
BACKEND_KEY_DATA_HEAD = pgwire.BACKEND_KEY_DATA_HEAD

UNSYNCED_MASK = pgwire.UNSYNCED_MASK


class StartupPlan:
    """What one raw startup packet means, kept by the engine for the clients that send it
    again: the session tuple (login.startup_session), and, when the quick lane may log
    such a client in, the account, md5(password + user) and the greeting's parameters."""

    def __init__(self, session, account=None, md5_inner=None):
        self.session = session
        self.user = session[0]
        self.database = session[1]
        self.key = session[3]
        self.desired = session[4]
        self.account = account
        self.md5_inner = md5_inner   # hex digest as bytes; None: the engine's path logs in
        # The quick lane's whole reply to a right password (AuthenticationOk, the greeting,
        # BackendKeyData with a zero key, ReadyForQuery); None until the first login of the
        # engine's path learns the greeting. Each quick login copies it and writes its key
        # at `key_at`: one allocation, one write.
        self.reply = None
        self.key_at = 0

    def learn_greeting(self, statuses):
        """The ParameterStatus block this packet's sessions are greeted with."""
        self.key_at = len(AUTH_OK_MESSAGE) + len(statuses) + len(BACKEND_KEY_DATA_HEAD)
        self.reply = b"".join((AUTH_OK_MESSAGE, statuses, BACKEND_KEY_DATA_HEAD, bytes(8),
                               READY_FOR_QUERY_IDLE))


class LoginDesk:
    """An engine's shared login state the quick lane reads: plans by raw startup packet,
    cancel keys, entropy and the counters it moves."""

    def __init__(self, entropy, metrics, router, unrouted, throttle_entries):
        self.plans = {}
        self.by_pid = {}
        self.entropy = entropy
        self.metrics = metrics
        self.router = router
        self.unrouted = unrouted
        self.throttle_entries = throttle_entries   # LoginThrottle's table: empty, no work
        self.tls_offered = False   # the engine has a TLS context: SSLRequest is its to answer
        self.quick_logins = 0   # logins the quick lane completed
        self.log_sessions = False   # sessions write login and close lines (session_opened/_closed)

    def forget(self, client):
        """The client is gone: its cancel key with it."""
        if client.pid:
            self.by_pid.pop(client.pid, None)

    def register_cancel_key(self, client):
        """A (pid, secret) pair for the client's BackendKeyData, both from the CSPRNG (the
        secret authorises a cancel; one draw serves both)."""
        by_pid = self.by_pid
        while True:
            raw = self.entropy.take(8)
            # `& 0xFF`: compiled, a byte of `bytes` is a signed C char.
            pid = ((raw[0] & 0x7F) << 24) | ((raw[1] & 0xFF) << 16) | ((raw[2] & 0xFF) << 8) \
                | (raw[3] & 0xFF)
            if pid and pid not in by_pid:
                break
        by_pid[pid] = client
        secret = raw[4] & 0xFF   # built in an unsigned long (a C int would overflow)
        for i in range(5, 8):
            secret = (secret << 8) | (raw[i] & 0xFF)
        return pid, secret


class SessionFactory:
    """Makes one endpoint's client sessions, one per accepted connection: the class's
    __new__ and the relay's own setup (below), no Python __init__ to run."""

    def __init__(self, cls, engine, endpoint, unrouted, prefilter, logins, scanner,
                 response_latency):
        self.cls = cls
        self.engine = engine
        self.ledger = engine.ledger
        self.endpoint = endpoint
        self.route_role = endpoint.target_role
        self.unrouted = unrouted      # the pool core of a client the router has not placed
        self.prefilter = prefilter    # the keyword scan that picks statements to inspect
        self.logins = logins          # the engine's LoginDesk
        self.scanner = scanner        # every session's scanner is a fresh() copy of this
        self.response_latency = response_latency   # the endpoint's LatencyHistogram

    def __call__(self):
        return self.make()

    def make(self):
        client = self.cls.__new__(self.cls)
        client.setup(self)
        return client


class ClientRelay(RelayHalf):  # noqa: F821 (see the imports)
    """The client half: its bytes go to the attached server, or wait for one."""

    def __init__(self, factory=None):
        self.setup(factory)

    def setup(self, factory):
        """Every field's first value; with a SessionFactory, a session of its endpoint."""
        self.state = 0
        self.server = None
        self.scanner = None
        self.pool_core = None
        self.pool = None          # the pool of its last route (see Router.route)
        self.key = None
        self.desired = ()
        self.sql_prepared = ()    # (name, PREPARE text) pairs the client made with SQL
        self.outstanding = 0
        self.type_before_chunk = 0
        self.pin_reason = None
        self.phase = PHASE_FREE   # moved by enter() only
        # Sent something whose effect on the session the text does not show: the engine
        # asks the server about the session before the connection serves anyone else.
        self.unverified = False
        # The client names statements: its bytes are rewritten for the connection it holds
        # (the engine's StatementBook, with `forward`, `attached` and `rewind`).
        self.statements = None
        self.chunk_at_boundary = True   # the chunk being handled began at a message boundary
        self.terminating = False
        self.reading_paused = False
        self.pending = []
        self.pending_size = 0
        self.activity = 0         # chunks received; the housekeeper turns it into idle time
        self.prefilter = None
        # The request bytes sent on a connection taken idle, until its answer starts: if the
        # connection dies first, the engine may send them again elsewhere (failover).
        self.replay = None
        self.borrow_entry = None  # our place in a pool's queue of waiters
        self.transport = None
        self.user = ""
        self.database = ""
        # The login's quick lane: the engine's LoginDesk (None: no quick lane), how far it
        # got (0: nothing seen yet, 2: TLS declined, 1: salt sent, -1: the engine's path
        # has the login) and the plan it follows.
        self.logins = None
        self.login_step = 0
        self.plan = None
        self._auth = None         # the quick lane's md5 salt while it awaits the password
        self._account = None
        self.pid = 0              # its BackendKeyData
        self.secret = 0
        self.engine = None
        self.ledger = None
        self.endpoint = None
        self.route_role = None
        self.connected_at = 0.0
        self.last_active = 0.0    # advanced by the housekeeper from `activity`
        # When the request being answered came in and when it went to the database (now()),
        # and the histogram of the whole round trip as the client sees it.
        self.request_at = 0.0
        self.forwarded_at = 0.0
        self.response_latency = None
        if factory is not None:
            engine = factory.engine
            self.engine = engine
            self.ledger = factory.ledger
            self.endpoint = factory.endpoint
            self.route_role = factory.route_role
            self.pool_core = factory.unrouted
            self.prefilter = factory.prefilter
            self.logins = factory.logins
            self.scanner = factory.scanner.fresh()
            self.response_latency = factory.response_latency
            self.connected_at = self.last_active = engine.clock

    @property
    def queries(self):
        """Its Query and Execute messages so far (QueryRequests): its scanner's tally."""
        return self.scanner.tally if self.scanner is not None else 0

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport):
        if self.transport is not None:
            # The C reactor handed the socket to the loop for TLS: the same connection,
            # now on the TLS transport (the engine's upgrade_client_tls takes it from here).
            return
        self.transport = transport
        if not self.ledger.admit(self):
            self.refuse()

    def connection_lost(self, exc):
        if self.state == STATE_CLOSED and self.transport is None:
            return
        self.state = STATE_CLOSED
        if self.phase != PHASE_FREE:
            self.release_on_exit()
        self.pending = []
        self.ledger.release(self, self.queries)
        logins = self.logins
        if logins is not None:
            logins.forget(self)
            if logins.log_sessions:
                self.session_closed(exc)

    def close(self):
        transport = self.transport
        if transport is None:
            self.state = STATE_CLOSED
        elif not transport.is_closing():
            transport.close()

    def received(self, data):
        """data_received's work, which the C reactor calls directly (no method lookup)."""
        if self.state != STATE_READY:
            if self.login_step < 0 or not self.quick_login(data):
                self.login_step = -1
                self.startup_data(data)
            return
        self.activity += 1
        scanner = self.scanner
        # Kept for a Terminate that comes alone: what the client sent before it is what
        # its server connection is left with (see terminate()).
        self.type_before_chunk = scanner.last_type
        self.chunk_at_boundary = scanner.at_boundary()
        try:
            n = scanner.feed(data)
        except Exception as exc:  # FramingError: a length that cannot be right
            self.framing_error(exc)
            return
        if scanner.captured:
            data = self.screen(data)
        if self.outstanding == 0 and self.chunk_at_boundary:
            # A request begins with nothing owed before it: its latencies count from here.
            self.request_at = self.forwarded_at = now()
        self.outstanding += n
        server = self.server
        if server is not None:
            if data:
                statements = self.statements
                if statements is None:
                    wire_write(server.transport, data)
                else:
                    out = statements.forward(data, server, server.answers, self.transport,
                                             self.outstanding - n)
                    if out:
                        wire_write(server.transport, out)
                replay = self.replay
                if replay is not None:
                    if len(replay) < REPLAY_CHUNKS:
                        replay.append(data)
                    else:
                        self.replay = None
        elif data:
            self.pending.append(data)
            self.pending_size += len(data)
            if self.pending_size > PENDING_LIMIT and not self.reading_paused:
                # A client that keeps writing while it waits: leave the rest in the kernel.
                self.reading_paused = True
                self.transport.pause_reading()
            if self.phase == PHASE_FREE:
                conn = self.pool_core.try_borrow(self.key)
                if conn is None:
                    # Others are queued already: join them (the common case of a busy
                    # pool); otherwise let the pool decide (open one, or queue first).
                    self._enter(PHASE_WAITING)
                    if not self.pool_core.queue_waiter(self.key, self):
                        self.borrow()
                elif self.ready_on(conn):
                    self._attach(conn)            # the common case: an idle one, ready
                else:
                    self._enter(PHASE_WAITING)
                    self.on_connection(conn)      # parameters to sync first
        if self.terminating:
            self.close()

    def quick_login(self, data):
        """Take this chunk of the login in the quick lane; False leaves it (and the rest of
        the login) to the engine's path, the session's state as that path expects it."""
        logins = self.logins
        if logins is None:
            return False
        # Each step answers first and does its bookkeeping after: the client (a process
        # waiting on the other core) gets on with its part meanwhile.
        if type(data) is not bytes:
            return False
        chunk = data
        step = self.login_step
        if step == 0 or step == 2:
            plan = logins.plans.get(chunk)   # the whole chunk is a known startup packet
            if plan is None:
                if step == 0 and (chunk == GSSENC_REQUEST
                                  or (chunk == SSL_REQUEST and not logins.tls_offered)):
                    # libpq's default (sslmode=prefer) asks for TLS first: without TLS to
                    # offer the answer is 'N' and the startup packet follows in the clear.
                    wire_write(self.transport, b"N")
                    self.login_step = 2
                    return True
                return False
            if plan.md5_inner is None:
                return False
            salt = logins.entropy.take(4)
            wire_write(self.transport, AUTH_MD5_REQUEST + salt)
            self._auth = salt
            self.state = STATE_AUTH_MD5
            self.login_step = 1
            self.plan = plan
            self.user = plan.user
            self.database = plan.database
            self.key = plan.key
            self.desired = plan.desired
            self._account = plan.account
            return True
        if step != 1 or self.state != STATE_AUTH_MD5:
            return False
        if (len(chunk) != MD5_PASSWORD_SIZE or chunk[0] != MSG_PASSWORD or chunk[1] != 0
                or chunk[2] != 0 or chunk[3] != 0 or chunk[4] != 40 or chunk[40] != 0):
            return False
        if logins.throttle_entries and self.peer_host in logins.throttle_entries:
            # An address with recent failures: over its guesses, the engine's path refuses.
            if not self.engine.throttle.may_check(self.peer_host, self.engine.loop.time()):
                return False
        plan = self.plan
        expected = _md5(plan.md5_inner + self._auth).hexdigest().encode("ascii")
        # Constant time whatever byte differs; a mismatch is the engine's to report. So is
        # the first login of a packet (it learns the greeting).
        if (chunk[5:8] != b"md5" or not _compare_digest(chunk[8:40], expected)
                or plan.reply is None):
            return False
        pid, secret = logins.register_cancel_key(self)
        reply = bytearray(plan.reply)
        at = plan.key_at
        for i in range(4):   # both big-endian, as every integer on the wire
            reply[at + i] = (pid >> (24 - 8 * i)) & 0xFF
            reply[at + 4 + i] = (secret >> (24 - 8 * i)) & 0xFF
        wire_write(self.transport, reply)
        self.pid = pid
        self.secret = secret
        self.state = STATE_READY
        self._auth = None
        if self.pool_core is logins.unrouted:
            logins.router.route(self)
        logins.metrics.ClientConnectionsSetupSucceeded += 1
        logins.quick_logins += 1
        if logins.log_sessions:
            self.session_opened("md5")
        return True

    def ready_on(self, conn):
        """Whether `conn` is open and already carries this client's session parameters
        and SQL prepared statements."""
        return ((conn.applied is self.desired or conn.applied == self.desired)
                and (conn.sql_prepared is self.sql_prepared
                     or conn.sql_prepared == self.sql_prepared)
                and not conn.closed)

    def screen(self, data):
        """Captured Query/Parse texts the prefilter clears pass here; the rest go to inspect()."""
        captured = self.scanner.captured
        prefilter = self.prefilter
        unpinned = self.pin_reason is None
        for entry in captured:
            mtype = entry[0]
            payload = entry[1]
            if mtype == MSG_QUERY:
                if unpinned and (entry[2] > len(payload) or prefilter.may_match(payload)):
                    return self.inspect(data)
            elif mtype == MSG_PARSE:
                # An unnamed statement (first byte NUL) whose text the prefilter clears;
                # a named one is the engine's (the proxy keeps it, or the client is pinned).
                if not payload or payload[0] != 0:
                    if unpinned or self.statements is None:
                        return self.inspect(data)
                elif unpinned and (entry[2] > len(payload) or prefilter.may_match(payload)):
                    return self.inspect(data)
            elif mtype == MSG_FUNCTION_CALL:
                if unpinned:
                    return self.inspect(data)
            elif mtype == MSG_BIND:
                # A named statement sent as it is (no StatementBook): the engine checks it
                # is none of the proxy's own.
                if self.statements is None:
                    nul = payload.find(b"\x00")
                    if nul < 0 or nul + 1 >= len(payload) or payload[nul + 1] != 0:
                        return self.inspect(data)
            elif mtype == MSG_DESCRIBE or mtype == MSG_CLOSE:
                if (self.statements is None and len(payload) > 1 and payload[0] == MSG_STATEMENT
                        and payload[1] != 0):
                    return self.inspect(data)
            else:
                captured.clear()
                return self.terminate(data)
        captured.clear()
        return data

    def terminate(self, data):
        """The client sent Terminate: it is leaving, and nothing from that message on is
        for the server. What of the chunk is left to send."""
        self.terminating = True
        scanner = self.scanner
        if len(data) == 5:
            # The chunk is the Terminate (the scanner found one): the session ends as the
            # client's previous message left it (an unsynced Execute stays unsynced).
            scanner.last_type = self.type_before_chunk
            return b""
        # Other messages came with it: which one was last is not known here, so the
        # server connection is taken as unsynced (never returned without proof).
        scanner.last_type = MSG_FLUSH
        end = data.rfind(TERMINATE)
        return data[:end] if end >= 0 else b""

    def enter(self, phase):
        """Move to `phase` (PHASE_*), and the ledger's gauges with it."""
        self._enter(phase)

    def _enter(self, phase):  # the relay's own calls, straight from C
        self.phase = self.ledger._move(self.phase, phase)

    def attach(self, conn):
        """Start relaying to `conn`, sending what the client wrote meanwhile."""
        self._attach(conn)

    def _attach(self, conn):  # the relay's own calls, straight from C
        waited = self.phase != PHASE_FREE   # FREE: the quick lane took it on the spot
        self._enter(PHASE_ACTIVE if self.pin_reason is None else PHASE_PINNED)
        self.server = conn
        conn.client = self
        conn.last_client_pid = self.pid
        pending = self.pending
        statements = self.statements
        if pending:
            # A request asked for this connection: it is borrowed, and forwarded, now. One
            # taken on the spot waited for nothing worth a clock reading.
            borrowed = 0.0
            if waited:
                clock = now()
                self.forwarded_at = clock
                borrowed = clock - self.request_at
            core = conn.pool_core
            if core is not None:
                core.borrow_latency.record(borrowed)
            self.pending = []
            self.pending_size = 0
            # Requests starting on a clean connection can be replayed until answered.
            self.replay = pending if self.outstanding > 0 and self.pin_reason is None else None
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            if statements is not None:
                statements.attached(conn, conn.answers, self.replay is not None, self.transport)
                data = statements.forward(data, conn, conn.answers, self.transport, 0)
            if data:
                wire_write(conn.transport, data)
        else:
            self.replay = None
            if statements is not None:
                statements.attached(conn, conn.answers, False, self.transport)
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()

    def on_server_ready(self, n, status):
        """The attached server sent `n` ReadyForQuery messages, the last with `status`."""
        outstanding = self.outstanding - n
        self.outstanding = outstanding if outstanding > 0 else 0
        server = self.server
        if (outstanding <= 0 and status == STATUS_IDLE and self.pin_reason is None
                and not UNSYNCED_MASK[self.scanner.last_type] and self.scanner.at_boundary()
                and server.scanner.at_boundary() and not server.tracking):
            if self.unverified:
                self.verify_session(server)   # the engine's: it releases or pins
                return
            self.server = None
            server.client = None
            self._enter(PHASE_FREE)
            clock = self.engine.clock
            if clock >= server.retire_at:
                server.pool.release(server)   # past its lifetime: the pool retires it
                return
            # Back to the pool the connection came from (the client's may have changed).
            entry = server.pool_core.give_back(server.key, server)
            if entry is None:
                server.idle_since = clock
                return
            # Someone is waiting. A relay client of the same key whose session parameters
            # the connection already carries takes it here; anything else (another key, a
            # parameter sync, a login) is the pool's business.
            waiter = entry[1]
            if isinstance(waiter, ClientRelay) and entry[0] == server.key:
                client = waiter
                if (client.state == STATE_READY and client.phase == PHASE_WAITING
                        and client.ready_on(server)):
                    client.borrow_entry = None
                    client._attach(server)
                    return
            server.pool.hand_over(server, entry)


class ServerRelay(RelayHalf):  # noqa: F821
    """The server half: while a client is attached its bytes go straight to that client."""

    def __init__(self):
        self.mode = 0
        self.client = None
        self.scanner = None
        self.transport = None
        self.key = None
        self.pool = None
        self.pool_core = None     # set by the pool that opened it
        self.closed = False
        self.applied = ()
        self.sql_prepared = ()    # the SQL prepared statements it holds, as a client's
        self.idle_since = 0.0
        self.retire_at = INFINITY   # set by the pool that opens it (Pool.usable)
        self.held = None          # answer chunks held back while a replay is still possible
        self.held_size = 0
        self.last_client_pid = 0  # the BackendKeyData pid of the client it served last
        # Named statements (the engine's ServerStatements, or None), and whether answers
        # owed to the client need its hand before they reach it.
        self.answers = None
        self.tracking = False

    def received(self, data):
        """data_received's work, which the C reactor calls directly (no method lookup)."""
        client = self.client
        if self.mode != MODE_RELAY or client is None:
            self.slow_data(data)
            return
        scanner = self.scanner
        try:
            n = scanner.feed(data)
        except Exception as exc:  # FramingError
            self.framing_error(exc)
            return
        if client.replay is not None:
            # The answer to a request that could still be replayed: hold it back until it
            # is complete (a ReadyForQuery), so that if the connection dies first the client
            # has seen nothing and the engine may send the request elsewhere. Not for COPY
            # (the server waits for the client) nor past HOLD_LIMIT bytes (big results
            # stream as usual, without a replay).
            last = scanner.last_type
            if (n == 0 and last != MSG_COPY_IN and last != MSG_COPY_BOTH
                    and self.held_size + len(data) <= HOLD_LIMIT):
                held = self.held
                if held is None:
                    self.held = [data]
                else:
                    held.append(data)
                self.held_size += len(data)
                return
            client.replay = None
            if self.held is not None:
                self.held.append(data)
                data = b"".join(self.held)
                self.held = None
                self.held_size = 0
        if scanner.captured:
            data = self.server_messages(data)
        if self.tracking:
            data = self.answers.answer(data)
        if data:
            wire_write(client.transport, data)
        if n > 0 and client.outstanding <= n and client.response_latency is not None:
            # The answer that leaves the client owed nothing is out. One clock reading ends
            # both round trips: the database's includes handing on this last chunk.
            clock = now()
            client.response_latency.record(clock - client.request_at)
            core = self.pool_core
            if core is not None:
                core.database_latency.record(clock - client.forwarded_at)
        if n or not client.outstanding:  # the latter: finish a release held back mid-message
            client.on_server_ready(n, scanner.status)
