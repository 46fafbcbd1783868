"""The MySQL relay's quick lane: a plain command to a ready connection, and its answer back.

Pure-Python twin of `mysql_relay_c`, which setup.py compiles from this very file with
`mysql_relay_c.pxd`. The engine's ClientConnection (engines/mysql/client.py) and
ServerConnection (backend.py) subclass ClientRelay and ServerRelay and keep all their
Python code as the slow path, which is the one set of rules: this file only takes the
commands for which those rules come to nothing but "send it, relay the answer, keep or
return the connection", and does exactly that in the same fields. The engine's classes
supply what this file calls by name:

  ClientRelay: slow_data(data) (everything else a client sends), on_connection(conn) (a
               borrowed connection that needs syncing first), _next() (queued commands).
  ServerRelay: slow_data(data), lane_handoff(data) (the answer's first packet is one the
               lane does not follow: the slow path takes it with a fresh ResponseTracker),
               _broken(why), excess(count).

Client side, taken only when all of this holds: the session is READY and idle, nothing is
queued or half read, the chunk is exactly one whole packet with sequence id 0, and it is a
COM_QUERY whose text the slow path found plain (the engine's `rules.plain_packets`: raw
packet -> Verdict, filled by commands.py) or a COM_STMT_EXECUTE of a plain statement,
without a cursor or parameter count, whose types are known; the connection is the one the
client holds or an idle one of its key, usable, with the client's schema and variables and
the statement prepared. Server side, the answer's packet headers are walked in place (OK,
ERR, result sets with or without CLIENT_DEPRECATE_EOF, more results) and the chunks go on
unchanged; at its end the lane does what CommandDispatch.response_done and _command_done
do for such an answer.
"""
from rdsproxy._fastpath import contract, relay_py
from rdsproxy._fastpath.contract import Phase

try:
    import cython
except ImportError:
    # Uncompiled and Cython not installed: a stand-in for the one attribute used. Bound
    # through globals() because Cython reserves the name `cython` (no rebinding allowed).
    globals()["cython"] = type("cython", (), {"compiled": False})

if not cython.compiled:
    relay_py.bind_base(globals())   # compiled: cimported by mysql_relay_c.pxd

CLIENT_READY = contract.MYSQL_CLIENT_READY   # C ints once compiled (mysql_relay_c.pxd)
SERVER_IDLE = contract.MYSQL_SERVER_IDLE
SERVER_BUSY = contract.MYSQL_SERVER_BUSY
PHASE_FREE = Phase.FREE
PHASE_ACTIVE = Phase.ACTIVE
PHASE_PINNED = Phase.PINNED

# MySQL's wire values (engines/mysql/protocol/constants.py; tests/test_mysql_lane.py checks
# they agree): commands, packet headers, capability and status bits.
COM_QUERY = 0x03
COM_STMT_EXECUTE = 0x17
OK_HEADER = 0x00
EOF_HEADER = 0xFE
ERR_HEADER = 0xFF
LOCAL_INFILE_HEADER = 0xFB
CURSOR_TYPE_MASK = 0x07
PARAMETER_COUNT_AVAILABLE = 0x08
LAST_STATEMENT_ID = 0xFFFFFFFF
CLIENT_PROTOCOL_41 = 0x200
CLIENT_DEPRECATE_EOF = 1 << 24
# MariaDB's progress reports and cached metadata change the answer's shape: not followed here.
UNFOLLOWED_CAPABILITIES = (1 << 32) | (1 << 36)
SERVER_MORE_RESULTS_EXISTS = 0x0008
SERVER_STATUS_CURSOR_EXISTS = 0x0040
HOLD_STATUS = 0x0001 | 0x0040      # in a transaction or a cursor: the client keeps it
MAX_PACKET = 0xFFFFFF

# Where the lane is in an answer (ServerRelay.lane); 0: not a lane answer.
LANE_OFF = 0
LANE_FIRST = 1        # OK / ERR / a result set's column count
LANE_COLUMNS = 2      # column definitions (lane_columns to go)
LANE_COLUMNS_EOF = 3  # the EOF after them (no CLIENT_DEPRECATE_EOF)
LANE_ROWS = 4         # rows until the EOF / OK that ends the result
# What scan() returns besides an end offset.
SCAN_MORE = -1        # the answer goes on in later chunks
SCAN_HANDOFF = -2     # its first packet is for the slow path (nothing consumed yet)
SCAN_BROKEN = -3      # not a valid answer


class ClientRelay(RelayHalf):  # noqa: F821 (see the imports)
    """The client half: the quick lane for its commands (see the module docstring)."""

    def __init__(self):
        self.quick_commands = 0   # commands the lane took (tests and stats read it)

    def received(self, data):
        """data_received's work, which the C reactor calls directly (no method lookup)."""
        if not self.quick_command(data):
            self.slow_data(data)

    def quick_command(self, data):
        """Send this chunk in the quick lane; False leaves it to slow_data, nothing changed."""
        if self.state != CLIENT_READY or self.busy or type(data) is not bytes:
            return False
        chunk = data
        n = len(chunk)
        if n < 5 or chunk[3] != 0:
            return False
        length = chunk[0] | (chunk[1] << 8) | (chunk[2] << 16)
        if length + 4 != n or length >= MAX_PACKET:
            return False
        reader = self.reader
        if self.queue or reader.buffered or length > reader.max_payload:
            return False
        cmd = chunk[4]
        stmt = None
        types = None
        at = 0
        if cmd == COM_QUERY:
            verdict = self.verdicts.get(chunk)
            if verdict is None:
                return False
        elif cmd == COM_STMT_EXECUTE:
            if n < 14 or self.long_data:
                return False
            sid = chunk[5] | (chunk[6] << 8) | (chunk[7] << 16) | (chunk[8] << 24)
            if sid == LAST_STATEMENT_ID:
                sid = self.last_stmt_id
            stmt = self.stmts.get(sid)
            if stmt is None or not stmt.plain or chunk[9] & (CURSOR_TYPE_MASK
                                                             | PARAMETER_COUNT_AVAILABLE):
                return False
            verdict = stmt.verdict
            nparams = stmt.num_params
            if nparams:
                at = 14 + (nparams + 7) // 8      # the new-params-bound byte
                if n <= at:
                    return False
                if chunk[at] == 1:
                    types = chunk[at + 1:at + 1 + 2 * nparams]
                elif not stmt.param_types:
                    return False
        else:
            return False
        conn = self.server
        borrowed = False
        if conn is None:
            if self.pin_reason is not None:
                return False
            conn = self.pool_core.try_borrow(self.key)
            if conn is None:
                return False
            if conn.closed or self.engine.clock >= conn.retire_at:
                # Pool.usable's rule, as the slow path applies it before it borrows anew.
                conn.pool.core.forget(True)
                conn.close()
                return False
            borrowed = True
        elif not self.ready_on(conn):
            return False
        prepared = None      # the connection's (PrepareOk, packets) for the statement
        if stmt is not None:
            prepared = conn.prepared.get((conn.schema, stmt.sql))
            if prepared is None and not borrowed:
                return False
        # The command is this lane's from here: what CommandDispatch._dispatch and the
        # COM_* handler set, so that the slow path finds it all if anything goes wrong.
        self.activity += 1
        reader.next_seq = 1
        self.cmd_raw = chunk
        self.busy = True
        self.outstanding = 1
        self.queries += 1
        clock = now()  # noqa: F821
        self.request_at = clock
        self.forwarded_at = clock
        payload = chunk[4:]
        self.cmd = payload
        self.cmd_seq = 0
        self.verdict = verdict
        self.stmt = stmt
        if at:
            if types is not None:
                stmt.param_types = types
            else:
                # The server statement may be shared (or new): always bind the types.
                types = stmt.param_types
        if borrowed:
            if (stmt is not None and prepared is None) or not self.ready_on(conn):
                if at and chunk[at] != 1:
                    self.cmd_payload_override = (payload[:at - 4] + b"\x01" + types
                                                 + payload[at - 3:])
                self.on_connection(conn)   # the slow path syncs it, then sends
                return True
            conn.pool_core.borrow_latency.record(0.0)
            self._enter(PHASE_ACTIVE if self.pin_reason is None else PHASE_PINNED)
            self.server = conn
            conn.client = self
        out = chunk
        if stmt is not None:
            out = execute_packet(chunk, prepared[0].statement_id, at, types)
            self.long_data = False
        conn.start_answer()
        wire_write(conn.transport, out)  # noqa: F821
        self.quick_commands += 1
        return True

    def ready_on(self, conn):
        """Whether `conn` carries this client's session as the slow path would leave it
        before sending (StateSync._sync_and_send), for an answer the lane can follow (a
        statement's being prepared there is checked apart)."""
        return ((conn.schema is self.schema or conn.schema == self.schema)
                and (conn.vars is self.vars or conn.vars == self.vars)
                and not conn.closed
                and conn.capabilities & CLIENT_PROTOCOL_41
                and not conn.capabilities & UNFOLLOWED_CAPABILITIES)

    def holds_state(self, conn):
        """state_held(self, conn), for the engine's Python."""
        return state_held(self, conn)

    def _enter(self, phase):  # the relay's own calls, straight from C
        self.phase = self.ledger._move(self.phase, phase)


def state_held(client, conn):
    """Whether `conn` carries the session state of `client`, which no other client may get:
    a pin, an open transaction or cursor, statement data sent ahead. The one rule for
    keeping a connection after a command, resetting it when the client leaves, and whether
    losing it loses the session."""
    return (client.pin_reason is not None or (conn.status & HOLD_STATUS) != 0
            or client.long_data)


def execute_packet(chunk, statement_id, at, types):
    """The COM_STMT_EXECUTE packet `chunk` with the connection's `statement_id`, and with
    the parameter types bound when `types` is given (at `at`, its new-params-bound byte)."""
    if types is None or chunk[at] == 1:
        types = None
        length = len(chunk) - 4
    else:
        length = len(chunk) - 4 + len(types)
    if cython.compiled:
        # One allocation and three copies (the names are pxd cimports).
        out = PyBytes_FromStringAndSize(cython.NULL, length + 4)  # noqa: F821
        dst = PyBytes_AS_STRING(out)  # noqa: F821
        src = chunk
        dst[0] = length & 0xFF
        dst[1] = (length >> 8) & 0xFF
        dst[2] = length >> 16
        dst[3] = 0
        dst[4] = COM_STMT_EXECUTE
        dst[5] = statement_id & 0xFF
        dst[6] = (statement_id >> 8) & 0xFF
        dst[7] = (statement_id >> 16) & 0xFF
        dst[8] = (statement_id >> 24) & 0xFF
        if types is None:
            memcpy(dst + 9, src + 9, len(chunk) - 9)  # noqa: F821
        else:
            bound = types
            tsrc = bound
            memcpy(dst + 9, src + 9, at - 9)  # noqa: F821
            dst[at] = 1
            memcpy(dst + at + 1, tsrc, len(bound))  # noqa: F821
            memcpy(dst + at + 1 + len(bound), src + at + 1, len(chunk) - at - 1)  # noqa: F821
        return out
    sid = bytes((statement_id & 0xFF, (statement_id >> 8) & 0xFF, (statement_id >> 16) & 0xFF,
                 (statement_id >> 24) & 0xFF))
    if types is None:
        return chunk[:5] + sid + chunk[9:]
    return (bytes((length & 0xFF, (length >> 8) & 0xFF, length >> 16, 0, COM_STMT_EXECUTE))
            + sid + chunk[9:at] + b"\x01" + types + chunk[at + 1:])


class ServerRelay(RelayHalf):  # noqa: F821
    """The server half: follows the answers the client half's lane asked for."""

    def __init__(self):
        self.lane = LANE_OFF
        self.lane_columns = 0
        self.lane_skip = 0          # bytes of a row (or continuation) still to come
        self.lane_partial = None    # the start of a packet the lane must read whole
        self.lane_continued = False
        self.lane_deprecate = False
        self.lane_fresh = False     # no packet of the answer consumed yet
        self.lane_status = 0
        self.lane_ok = -1           # the header of the last OK seen (-1: none)
        self.lane_affected = 0
        self.lane_insert_id = 0
        self.lane_at = 0

    def start_answer(self):
        """A lane command was written: follow its answer (what send() sets, but no
        ResponseTracker)."""
        self.forwarded = False
        self.tracker = None
        self.mode = SERVER_BUSY
        self.lane = LANE_FIRST
        self.lane_columns = 0
        self.lane_skip = 0
        self.lane_partial = None
        self.lane_continued = False
        self.lane_deprecate = (self.capabilities & CLIENT_DEPRECATE_EOF) != 0
        self.lane_fresh = True
        self.lane_status = self.status
        self.lane_ok = -1
        self.lane_affected = 0
        self.lane_insert_id = 0

    def received(self, data):
        """data_received's work, which the C reactor calls directly (no method lookup)."""
        client = self.client
        if self.lane == LANE_OFF or client is None:
            self.slow_data(data)
            return
        end = self.scan(data)
        if end == SCAN_HANDOFF:
            self.lane = LANE_OFF
            self.lane_handoff(data)
            return
        if end == SCAN_BROKEN:
            self.lane = LANE_OFF
            self._broken("unexpected answer from the server")
            return
        if end == SCAN_MORE:
            wire_write(client.transport, data)  # noqa: F821
            self.forwarded = True
            return
        if end == len(data):
            wire_write(client.transport, data)  # noqa: F821
        else:
            wire_write(client.transport, data[:end])  # noqa: F821
            self.excess(len(data) - end)
        self.forwarded = True
        self.answer_done(client)

    def answer_done(self, client):
        """The answer is out: CommandDispatch.response_done and _command_done for it."""
        self.lane = LANE_OFF
        self.mode = SERVER_IDLE
        status = self.lane_status
        self.status = status
        clock = now()  # noqa: F821
        self.pool_core.database_latency.record(clock - client.forwarded_at)
        client.response_latency.record(clock - client.request_at)
        if client.state != CLIENT_READY:
            return
        if self.lane_ok >= 0 and self.lane_insert_id:
            client.last_insert_id = self.lane_insert_id
            client.lid_version += 1
            self.lid_owner = (client.connection_id, client.lid_version)
        client.row_count = self.lane_affected if self.lane_ok == OK_HEADER else -1
        client.last_server = self
        if client.stmt is not None and not status & SERVER_STATUS_CURSOR_EXISTS:
            client.cursor_stmt = None
        client.busy = False
        client.outstanding = 0
        client.cmd = None
        if client.queue:
            client._next()   # the slow path's: the connection stays for what is queued
            return
        if state_held(client, self):
            return
        client.server = None
        self.client = None
        client._enter(PHASE_FREE)
        clock = client.engine.clock
        if self.closed or clock >= self.retire_at:
            self.pool.release(self)   # the pool discards it
            return
        entry = self.pool_core.give_back(self.key, self)
        if entry is None:
            self.idle_since = clock
            return
        self.pool.hand_over(self, entry)

    def scan(self, data):
        """Walk the packets of `data`, the next chunk of the answer. Returns the offset in
        `data` where the answer ends, or SCAN_MORE / SCAN_HANDOFF / SCAN_BROKEN."""
        n = len(data)
        pos = 0
        base = 0                 # bytes at the front of `data` that came in an earlier chunk
        if self.lane_skip:
            if self.lane_skip >= n:
                self.lane_skip -= n
                return SCAN_MORE
            pos = self.lane_skip
            self.lane_skip = 0
        if self.lane_partial is not None:
            base = len(self.lane_partial)
            data = self.lane_partial + data[pos:]
            self.lane_partial = None
            n = len(data)
            pos = 0
        buf = data
        deprecate = self.lane_deprecate
        while True:
            if n - pos < 5:
                if self.lane_fresh:
                    return SCAN_HANDOFF
                if pos < n:
                    self.lane_partial = data[pos:]
                return SCAN_MORE
            length = buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16)
            body = pos + 4
            end = body + length
            # The rest of a packet of 16 MiB or more is never one the lane reads.
            passed = self.lane_continued
            if not passed:
                if length == 0:
                    return SCAN_HANDOFF if self.lane_fresh else SCAN_BROKEN
                first = buf[body]
                state = self.lane
                if first != ERR_HEADER and (
                        state == LANE_COLUMNS
                        or (state == LANE_ROWS and not (first == EOF_HEADER and length < (
                            MAX_PACKET if deprecate else 9)))):
                    # A column definition or a row: its body is stepped over, unread.
                    if state == LANE_COLUMNS:
                        self.lane_columns -= 1
                        if self.lane_columns <= 0:
                            self.lane = LANE_ROWS if deprecate else LANE_COLUMNS_EOF
                    passed = True
            if passed:
                self.lane_continued = length == MAX_PACKET
                if end > n:
                    self.lane_skip = end - n
                    return SCAN_MORE
                pos = end
                continue
            if end > n:
                # A packet the lane reads whole (OK, EOF, ERR, a column count).
                if self.lane_fresh:
                    return SCAN_HANDOFF
                self.lane_partial = data[pos:]
                return SCAN_MORE
            if first == ERR_HEADER:
                return end - base
            if state == LANE_ROWS or (state == LANE_FIRST and first == EOF_HEADER
                                       and length < 9):
                if deprecate:
                    if not self.read_ok(buf, body, end):
                        return SCAN_BROKEN
                elif length < 5:
                    return SCAN_BROKEN
                else:
                    self.lane_status = buf[body + 3] | (buf[body + 4] << 8)
                if not self.lane_status & SERVER_MORE_RESULTS_EXISTS:
                    return end - base
                self.lane = LANE_FIRST
            elif state == LANE_FIRST:
                if first == OK_HEADER:
                    if not self.read_ok(buf, body, end):
                        return SCAN_BROKEN
                    if not self.lane_status & SERVER_MORE_RESULTS_EXISTS:
                        return end - base
                elif first == LOCAL_INFILE_HEADER:
                    # The server asks for a file: the slow path's (it cannot come later
                    # in an answer to one statement).
                    return SCAN_HANDOFF if self.lane_fresh else SCAN_BROKEN
                else:
                    count = self.read_length(buf, body, end)
                    if self.lane_at < 0 or count == 0:
                        return SCAN_BROKEN
                    self.lane_columns = count
                    self.lane = LANE_COLUMNS
            else:   # LANE_COLUMNS_EOF
                if first != EOF_HEADER or length < 5 or length >= 9:
                    return SCAN_BROKEN
                self.lane_status = buf[body + 3] | (buf[body + 4] << 8)
                self.lane = LANE_ROWS
            self.lane_fresh = False
            pos = end

    def read_ok(self, buf, body, end):
        """An OK packet's affected rows, insert id and status (OkPacket.parse's fields the
        slow path reads), into the lane_* fields; False when it is cut short."""
        affected = self.read_length(buf, body + 1, end)
        if self.lane_at < 0:
            return False
        insert_id = self.read_length(buf, self.lane_at, end)
        at = self.lane_at
        if at < 0 or at + 4 > end:
            return False
        self.lane_ok = buf[body]
        self.lane_affected = affected
        self.lane_insert_id = insert_id
        self.lane_status = buf[at] | (buf[at + 1] << 8)
        return True

    def read_length(self, buf, at, end):
        """The length-encoded integer at `at`; lane_at is then the position after it, or
        -1 when the packet is cut short or holds no such integer there."""
        self.lane_at = -1
        if at >= end:
            return 0
        first = buf[at]
        if first < 0xFB:
            self.lane_at = at + 1
            return first
        if first == 0xFC:
            size = 2
        elif first == 0xFD:
            size = 3
        elif first == 0xFE:
            size = 8
        else:
            return 0
        if at + 1 + size > end:
            return 0
        value = 0
        for i in range(size):
            value |= buf[at + 1 + i] << (8 * i)
        self.lane_at = at + 1 + size
        return value


def begin_answer(relay):
    """relay.start_answer(), callable from Python (tests: it is a C method once compiled)."""
    relay.start_answer()


def scan_chunk(relay, data):
    """relay.scan(data), callable from Python (tests: it is a C method once compiled)."""
    return relay.scan(data)
