"""The common chunk of a client whose named statements the proxy keeps: Binds renamed.

Pure-Python twin of `pg_statements_c`, which setup.py compiles from this very file with
`pg_statements_c.pxd`. The engine's StatementBook (engines/postgres/statements.py) owns the
rules; this is its quick lane for a chunk of whole messages in which nothing but Binds of
statements the connection already holds needs its hand, walked in one C loop.
"""

from collections import OrderedDict

try:
    import cython
except ImportError:
    # Uncompiled and Cython not installed: a stand-in for the one attribute used (bound
    # through globals(): Cython reserves the name).
    globals()["cython"] = type("cython", (), {"compiled": False})

from rdsproxy._fastpath import pgwire
from rdsproxy._fastpath.contract import FORWARD

# The wire's values (pgwire), as C ints once compiled (pg_statements_c.pxd).
MSG_BIND = pgwire.MSG_BIND
MSG_PARSE = pgwire.MSG_PARSE
MSG_DESCRIBE = pgwire.MSG_DESCRIBE
MSG_CLOSE = pgwire.MSG_CLOSE
MSG_QUERY = pgwire.MSG_QUERY
MSG_SYNC = pgwire.MSG_SYNC
MSG_FUNCTION_CALL = pgwire.MSG_FUNCTION_CALL
MSG_FLUSH = pgwire.MSG_FLUSH
MSG_COPY_DATA = pgwire.MSG_COPY_DATA
MSG_COPY_DONE = pgwire.MSG_COPY_DONE
MSG_COPY_FAIL = pgwire.MSG_COPY_FAIL
STATEMENT_TARGET = pgwire.TARGET_STATEMENT


_NO_TYPES = ()   # rename_binds' types when every message in the chunk is answered


class AnswerQueue:
    """What one server connection holds of the proxy's statements (`cache`: definition ->
    its name there, least recently used first) and the answers it owes a client that
    names statements (`queue`). The engine's ServerStatements builds on it; the fields are
    C fields so that the quick lane below reads them without a lookup."""

    def __init__(self, server, capacity, metrics=None):
        self.server = server          # its ServerRelay: `tracking` tells the relay to call answer()
        self.capacity = capacity
        self.cache = OrderedDict()
        # The cache's last key, or None: a Bind of it needs no move_to_end. Whatever moves
        # another key to the end (or adds one) sets it.
        self.recent = None
        self.counter = 0
        self.queue = []
        self.skipping = False         # an error was answered: the server skips to the next Sync
        self.buf = bytearray()        # a server message not yet whole
        self.passing = 0              # bytes still to pass of a streamed message
        self.metrics = metrics        # StatementsPrepared moves with each Parse sent
        self.waiter = None            # a StatementBook waiting for answers to go on
        self.client_transport = None

    def idle(self, client_transport):
        """A client starts on the connection: nothing is owed to anyone."""
        if self.queue:
            self.queue.clear()
        self.skipping = False
        if self.buf:
            self.buf.clear()
        self.passing = 0
        self.waiter = None
        self.client_transport = client_transport
        self.server.tracking = False


class BookCore:
    """A client's named statements (`names`: client name -> definition) and the quick lane
    of the engine's StatementBook: a borrow's start, and a chunk in which nothing needs the
    proxy's hand but Binds of statements the connection holds. Anything else goes to the
    book's forward_slow."""

    def __init__(self):
        self.names = {}
        self.snapshot = None          # the names as a replay of the borrow's first request finds them
        self.buf = bytearray()
        self.passing = 0
        self.deferred = []
        self.deferred_ready = 0       # ReadyForQuery answers due to requests sent untracked
        self.batch = 0                # Syncs (and Queries) sent: the book's changes are per batch
        self.unresolved = {}          # batch -> its changes the server has not answered
        self.stalled = False          # waiting for them before reading the book again
        self.server = None
        self.spoke = False            # answered the client itself during this borrow
        # Definitions whose run may change the session (a SET, a function call): a Bind
        # of one takes the long way, which has the client's session checked afterwards.
        self.watched = set()
        self.client = None            # the engine's client session, told of such a Bind
        # The statement name of the last Bind the quick lane read: the next Bind of the same
        # name is looked up with this object (its hash kept), not a new copy.
        self.bound_name = b""

    def attached(self, server, state, replayable, client_transport):
        """A borrow of `server` (whose AnswerQueue is `state`) starts, nothing in flight; if
        its first request may be sent again elsewhere (failover), the names as they stand
        are kept for the replay: the same dict, which forward_slow copies before it changes
        anything."""
        state.idle(client_transport)
        self.server = server
        self.snapshot = self.names if replayable else None
        if self.deferred:
            self.deferred = []
        self.deferred_ready = 0
        if self.unresolved:
            self.unresolved.clear()
        self.stalled = False
        self.spoke = False

    def forward(self, data, server, state, client_transport, in_flight):
        """The client's bytes as `server` (whose AnswerQueue is `state`) is to get them;
        answers the proxy makes go to `client_transport`. `in_flight`: requests sent before
        these whose ReadyForQuery the client has not been given yet."""
        if self.stalled:
            self.buf += data
            return b""
        if not (state.queue or state.skipping or self.passing or self.buf):
            walked = self._rename_binds(data if type(data) is bytes else bytes(data), state)
            if walked is not None:
                sent, ready, unsynced = walked
                if ready:
                    if unsynced:
                        self.deferred = [(t, FORWARD, None, None) for t in unsynced]
                    elif self.deferred:
                        self.deferred = []
                    self.deferred_ready = in_flight + ready
                    self.batch += ready
                else:
                    if unsynced:
                        self.deferred += [(t, FORWARD, None, None) for t in unsynced]
                    self.deferred_ready = in_flight
                return sent
        if self.snapshot is self.names:
            self.names = dict(self.names)   # the replay's view stays as it was
        return self.forward_slow(data, server, client_transport, in_flight)

    def rename_binds(self, data, queue):
        """(the chunk with each named Bind's statement renamed to the connection's name for
        it, the Syncs, Queries and FunctionCalls in it, the types of the answered messages
        after the last of those), or None when a message needs the long way: a partial one,
        a named Parse, Describe or Close, a Bind of a statement the client (`names`) or the
        connection (`queue.cache`: definition -> its name there, most recently used last)
        lacks, SQL that may drop statements, a Bind of a definition in `watched`."""
        return self._rename_binds(data, queue)

    def _rename_binds(self, data, queue):  # the quick lane's own calls, straight from C
        names = self.names
        watched = self.watched
        cache = queue.cache
        end = len(data)
        buf = data   # compiled: a pointer to the chunk's bytes (pg_statements_c.pxd)
        pos = 0
        ready = 0
        answered_to = 0   # where the messages after the last Sync, Query or FunctionCall start
        renamed = None    # the connection's names for the named Binds, in order
        grown = 0         # how much longer the chunk gets
        while pos < end:
            if end - pos < 5:
                return None
            mtype = buf[pos]
            size = 1 + ((buf[pos + 1] << 24) | (buf[pos + 2] << 16) | (buf[pos + 3] << 8)
                        | buf[pos + 4])
            if size < 5 or pos + size > end:
                return None
            if mtype == MSG_BIND:
                portal_end = pos + 5
                while portal_end < pos + size and buf[portal_end] != 0:
                    portal_end += 1
                name_end = portal_end + 1
                while name_end < pos + size and buf[name_end] != 0:
                    name_end += 1
                if name_end >= pos + size:
                    return None
                if name_end > portal_end + 1:
                    name = self.bound_name
                    if cython.compiled:
                        same = _same_bytes(buf, portal_end + 1, name_end, name)  # noqa: F821
                    else:
                        same = data[portal_end + 1:name_end] == name
                    if not same:
                        name = data[portal_end + 1:name_end]
                        self.bound_name = name
                    key = names.get(name)
                    if key is None or (watched and key in watched):
                        return None
                    if cython.compiled:
                        server_name = _cache_get(cache, key)  # noqa: F821
                    else:
                        server_name = cache.get(key)
                    if server_name is None:
                        return None
                    if key is not queue.recent:
                        cache.move_to_end(key)
                        queue.recent = key
                    if renamed is None:
                        renamed = []
                    renamed.append(server_name)
                    grown += len(server_name) - (name_end - portal_end - 1)
            elif mtype == MSG_SYNC or mtype == MSG_FUNCTION_CALL:
                ready += 1
                answered_to = pos + size
            elif mtype == MSG_QUERY:
                if drops_statements(buf[pos + 5:pos + size]):
                    return None
                ready += 1
                answered_to = pos + size
            elif mtype == MSG_PARSE:
                if size < 6 or buf[pos + 5] != 0 or drops_statements(buf[pos + 6:pos + size]):
                    return None
            elif mtype == MSG_DESCRIBE or mtype == MSG_CLOSE:
                if size < 7 or (buf[pos + 5] == STATEMENT_TARGET and buf[pos + 6] != 0):
                    return None
            pos += size
        unsynced = _answered_types(data, answered_to) if answered_to < end else _NO_TYPES
        if renamed is not None:
            if cython.compiled:
                # One allocation, filled by memcpy (pg_statements_c.pxd).
                data = _renamed_chunk(data, renamed, end + grown)  # noqa: F821
            else:
                data = _renamed_pieces(data, renamed)
        return data, ready, unsynced

    def forward_slow(self, data, server, client_transport, in_flight):
        raise NotImplementedError


def _answered_types(data, pos):
    """The types of the messages from `pos` on that the server answers (all but Flush and
    COPY data), in a chunk of whole messages."""
    buf = data
    end = len(data)
    types = []
    while pos < end:
        mtype = buf[pos]
        if (mtype != MSG_FLUSH and mtype != MSG_COPY_DATA and mtype != MSG_COPY_DONE
                and mtype != MSG_COPY_FAIL):
            types.append(mtype)
        pos += 1 + ((buf[pos + 1] << 24) | (buf[pos + 2] << 16) | (buf[pos + 3] << 8)
                    | buf[pos + 4])
    return types


def drops_statements(sql):
    """Whether SQL text may be DEALLOCATE or DISCARD (which change a client's statements)."""
    head = sql[:24].lstrip().lower()
    return head.startswith(b"deallocate") or head.startswith(b"discard")


def _renamed_pieces(data, renamed):
    """The chunk with its named Binds' statements replaced, in order, by `renamed`
    (the messages are known whole: rename_binds walked them)."""
    pieces = []
    start = pos = 0
    k = 0
    while pos < len(data):
        size = 1 + int.from_bytes(data[pos + 1:pos + 5], "big")
        if data[pos] == MSG_BIND:
            portal_end = data.index(0, pos + 5)
            name_end = data.index(0, portal_end + 1)
            if name_end > portal_end + 1:
                server_name = renamed[k]
                k += 1
                length = size - 1 + len(server_name) - (name_end - portal_end - 1)
                pieces += [data[start:pos], b"B", length.to_bytes(4, "big"),
                           data[pos + 5:portal_end + 1], server_name, data[name_end:pos + size]]
                start = pos + size
        pos += size
    pieces.append(data[start:])
    return b"".join(pieces)
