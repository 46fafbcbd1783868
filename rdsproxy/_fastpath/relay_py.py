"""The relay's per-chunk work: splice bytes between a client and its borrowed connection.

Pure-Python twin of `relay_c`, which setup.py compiles from this very file with
`relay_c.pxd` (C fields for the attributes read on every chunk). The engine's session
classes subclass these two and supply the slow paths this file calls by name:

  ClientRelay: startup_data(data), inspect(data) -> data, framing_error(exc), borrow(),
               on_connection(conn), close(), and the attributes engine, pool, transport, prefilter (a KeywordScanner
               that flags statements worth inspect()ing).
  ServerRelay: slow_data(data), parameter_status(), framing_error(exc).

Per chunk the relay feeds the framing scanner (headers only), writes the chunk on
unchanged (one write call), borrows an idle connection straight from the pool core when
the client has none, and hands it back at the ReadyForQuery that answers the client's last
request. Anything less common (opening, waiting, parameter sync) goes to the engine.
"""

STATE_READY = 5           # the client state in which bytes are relayed (frontend.READY)
MODE_RELAY = 1            # the server mode in which bytes are relayed (backend.RELAY)
STATUS_IDLE = 73          # ReadyForQuery 'I'
MSG_QUERY = 81            # 'Q'
MSG_PARSE = 80            # 'P'
PENDING_LIMIT = 262144    # bytes a waiting client may queue in the proxy before we pause it
REPLAY_CHUNKS = 16        # chunks of one request kept for a replay; a longer one is not replayed
HOLD_LIMIT = 65536        # bytes of an answer held back while its request may be replayed
MSG_COPY_IN = 71          # 'G' CopyInResponse
MSG_COPY_BOTH = 87        # 'W' CopyBothResponse

# Message types after which a client still expects its server with nothing outstanding:
# extended-protocol messages not yet closed by a Sync ('P', 'B', 'D', 'E', 'C', 'H').
UNSYNCED_MASK = bytearray(256)
for _t in (80, 66, 68, 69, 67, 72):  # ints: Cython iterates a bytes literal as chars
    UNSYNCED_MASK[_t] = 1


class ClientRelay:
    """The client half: its bytes go to the attached server, or wait for one."""

    def __init__(self):
        self.state = 0
        self.server = None
        self.scanner = None
        self.pool_core = None
        self.key = None
        self.desired = ()
        self.outstanding = 0
        self.pin_reason = None
        self.pinned_server = False
        self.waiting = False
        self.terminating = False
        self.reading_paused = False
        self.pending = []
        self.pending_size = 0
        self.activity = 0         # chunks received; the housekeeper turns it into idle time
        self.queries = 0          # Query messages (the QueryRequests metric)
        self.prefilter = None
        # The request bytes sent on a connection taken idle, until its answer starts: if the
        # connection dies first, the engine may send them again elsewhere (failover).
        self.replay = None
        self.borrow_entry = None  # our place in a pool's queue of waiters
        self.transport = None

    def data_received(self, data):
        if self.state != STATE_READY:
            self.startup_data(data)
            return
        self.activity += 1
        scanner = self.scanner
        try:
            n = scanner.feed(data)
        except Exception as exc:  # FramingError: a length that cannot be right
            self.framing_error(exc)
            return
        if scanner.captured:
            data = self.screen(data)
        self.outstanding += n
        server = self.server
        if server is not None:
            if data:
                server.transport.write(data)
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
            if not self.waiting:
                self.waiting = True
                conn = self.pool_core.try_borrow(self.key)
                if conn is None:
                    # Others are queued already: join them (the common case of a busy
                    # pool); otherwise let the pool decide (open one, or queue first).
                    if not self.pool_core.queue_waiter(self.key, self):
                        self.borrow()
                elif self.ready_on(conn):
                    self._attach(conn)            # the common case: an idle one, ready
                else:
                    self.on_connection(conn)      # parameters to sync first
        if self.terminating:
            self.close()

    def ready_on(self, conn):
        """Whether `conn` is open and already carries this client's session parameters."""
        return (conn.applied is self.desired or conn.applied == self.desired) and not conn.closed

    def screen(self, data):
        """Captured Query/Parse texts the prefilter clears pass here; the rest go to inspect()."""
        captured = self.scanner.captured
        prefilter = self.prefilter
        unpinned = self.pin_reason is None
        for entry in captured:
            mtype = entry[0]
            payload = entry[1]
            if mtype == MSG_QUERY:
                self.queries += 1
                if unpinned and (entry[2] > len(payload) or prefilter.may_match(payload)):
                    return self.inspect(data)
            elif mtype == MSG_PARSE:
                # An unnamed statement (first byte NUL) whose text the prefilter clears.
                if unpinned and (entry[2] > len(payload) or not payload or payload[0] != 0
                                 or prefilter.may_match(payload)):
                    return self.inspect(data)
            else:
                return self.inspect(data)  # Terminate
        captured.clear()
        return data

    def attach(self, conn):
        """Start relaying to `conn`, sending what the client wrote meanwhile."""
        self._attach(conn)

    def _attach(self, conn):  # the relay's own calls, straight from C
        self.waiting = False
        if self.pin_reason is not None and not self.pinned_server:  # pinned before attaching
            self.pinned_server = True
            self.engine.pinned_sessions += 1
        self.server = conn
        conn.client = self
        pending = self.pending
        if pending:
            self.pending = []
            self.pending_size = 0
            conn.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
            # Requests starting on a clean connection can be replayed until answered.
            self.replay = pending if self.outstanding > 0 and self.pin_reason is None else None
        else:
            self.replay = None
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
                and server.scanner.at_boundary()):
            self.server = None
            server.client = None
            # Back to the pool the connection came from (the client's may have changed).
            entry = server.pool_core.give_back(server.key, server)
            if entry is None:
                server.idle_since = self.engine.clock
                return
            # Someone is waiting. A relay client of the same key whose session parameters
            # the connection already carries takes it here; anything else (another key, a
            # parameter sync, a login) is the pool's business.
            waiter = entry[1]
            if isinstance(waiter, ClientRelay) and entry[0] == server.key:
                client = waiter
                if client.state == STATE_READY and client.waiting and client.ready_on(server):
                    client.borrow_entry = None
                    client._attach(server)
                    return
            server.pool.hand_over(server, entry)


class ServerRelay:
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
        self.idle_since = 0.0
        self.held = None          # answer chunks held back while a replay is still possible
        self.held_size = 0

    def data_received(self, data):
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
        client.transport.write(data)
        if scanner.captured:
            self.parameter_status()
        if n or not client.outstanding:  # the latter: finish a release held back mid-message
            client.on_server_ready(n, scanner.status)
