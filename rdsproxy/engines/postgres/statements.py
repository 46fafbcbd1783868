"""Protocol-level named prepared statements shared across a pool without pinning.

A client's named statements live in its StatementBook: client name -> the statement's
definition (query text, NUL, parameter types: the Parse payload after the name). Each server
connection keeps a ServerStatements: definition -> the name it is prepared under there
(`rdsproxy_<n>`), least recently used first, at most `max_prepared_statements`.

While a client that names statements holds a connection, its bytes pass through
`StatementBook.forward`: a Parse of a definition the connection already holds is answered by
the proxy (ParseComplete) instead of being sent; one it lacks is sent under the
connection's name for it; a Bind or Describe of a statement the connection lacks gets a Parse
of it first; Close of a statement only leaves the client's view. Each message sent then has
an entry in the connection's queue, in order, saying which answer it gets and what to do with
it (pass it on, swallow it, put a proxy-made answer in its place, rewrite its error).
`ServerStatements.answer` walks the server's messages against that queue, so that the client
sees the answers it would see on a connection of its own: after an error the server skips
to the next Sync, and so do the proxy's answers.

What a message does to the book (a name added, closed, deallocated) or to the connection's
statements (one prepared) is done when it is sent and undone if the server fails or skips it. Within one Sync's worth of messages that is
exact: a message the server runs had nothing fail before it. Across Syncs it is not, so a
message that reads the book while an earlier Sync's changes are still unanswered waits
(with a Flush sent, so that the answers come) until they are. Sans-IO: bytes in, bytes out.
"""
from __future__ import annotations

import re

from ..._fastpath import AnswerQueue, BookCore, drops_statements
from ..._fastpath.pgwire import (
    CLOSE_COMPLETE,
    FLUSH,
    MSG_BIND,
    MSG_CLOSE,
    MSG_DESCRIBE,
    MSG_EXECUTE,
    MSG_FUNCTION_CALL,
    MSG_PARSE,
    MSG_QUERY,
    MSG_SYNC,
    PARSE_COMPLETE,
    STATUS_FAILED,
)
from ..._fastpath.contract import FORWARD
from . import protocol as pg

SERVER_NAME_PREFIX = b"rdsproxy_"
# A name the proxy never prepares: a Bind or Describe of it fails on the server exactly as
# one of an unknown name does (26000, the transaction aborted, the rest skipped to Sync).
MISSING = SERVER_NAME_PREFIX + b"missing"
# The name a Parse is checked under when its answer must be the server's (then closed).
CHECK = SERVER_NAME_PREFIX + b"check"
# A Parse's key (text, NUL, parameter types) for the empty query: the statement the server
# drops when a client DEALLOCATEs one of its own (see StatementBook._deallocating).
EMPTY_KEY = b"\x00\x00\x00"


def reserved_statement_name(mtype: int, payload: bytes) -> bool:
    """Whether a Parse, Bind, Describe or Close names a statement as the proxy names its own."""
    if mtype == MSG_BIND:
        start = payload.find(b"\x00") + 1
    elif mtype == MSG_PARSE:
        start = 0
    else:
        start = 1 if payload[:1] == b"S" else len(payload)
    return payload.startswith(SERVER_NAME_PREFIX, start)


# Entry kinds besides a client message's type byte.
FAKE = 0        # a proxy-made answer, sent when every earlier answer has been
BARRIER = 1     # `count` ReadyForQuery answers to requests sent before tracking began

# What to do with the answer: pass it on; drop it (it answers the proxy's own message);
# rewrite its error (SQLSTATE, text); name the client's statement in its error where the
# server names its own.
SWALLOW, REWRITE, RENAME = 1, 2, 3   # FORWARD (0) is the quick lane's

# Client messages the book must see whole (they name statements); the rest stream through.
_WHOLE_CLIENT = bytearray(256)
for _t in (MSG_PARSE, MSG_BIND, MSG_DESCRIBE, MSG_CLOSE, MSG_QUERY):
    _WHOLE_CLIENT[_t] = 1
# Server messages that answer a request (popped from the queue); DataRows and the like stream.
_WHOLE_SERVER = bytearray(256)
for _t in b"123tTnCIsEZ":
    _WHOLE_SERVER[_t] = 1
# Client messages that get no answer of their own: Flush, CopyData, CopyDone, CopyFail.
_UNANSWERED = frozenset(b"Hdcf")
_ENDS_WITH_READY = frozenset((MSG_SYNC, MSG_QUERY, MSG_FUNCTION_CALL))

# DEALLOCATE [PREPARE] name | ALL, and DISCARD ALL, as a whole statement.
_DEALLOCATE = re.compile(
    rb'\s*deallocate\s+(?:prepare\s+)?(all|"(?:[^"]|"")+"|[a-z_\x80-\xff][a-z0-9_$\x80-\xff]*)\s*;?\s*',
    re.IGNORECASE)
_DISCARD_ALL = re.compile(rb"\s*discard\s+all\s*;?\s*", re.IGNORECASE)


class _Walk:
    """The messages of one chunk of a stream, for a walker that keeps `passing` (bytes still
    to pass of a message streamed through) and `buf` (a message not yet whole) between
    chunks: ServerStatements over the server's bytes, StatementBook over the client's.
    Types marked in `whole` come whole; the rest stream, a piece at a time. `out` starts with
    the rest of a message streamed from the chunk before."""

    __slots__ = ("walker", "whole", "data", "pos", "start", "out")

    def __init__(self, walker, data, whole):
        self.walker = walker
        self.whole = whole
        self.out = []
        if walker.passing:
            take = min(walker.passing, len(data))
            self.out.append(bytes(data[:take]))
            walker.passing -= take
            data = data[take:]
        buf = walker.buf
        if buf:
            buf += data
            data = bytes(buf)
            buf.clear()
        self.data = data
        self.pos = 0
        self.start = 0

    def next(self):
        """(type, bytes, whole) of the next message, a streamed one's bytes possibly in part;
        None at the end of the chunk (a message begun in it is kept for the next)."""
        data = self.data
        pos = self.pos
        end = len(data)
        if pos >= end:
            return None
        self.start = pos
        if end - pos < 5:
            return self.hold()
        mtype = data[pos]
        size = 1 + int.from_bytes(data[pos + 1:pos + 5], "big")
        if not self.whole[mtype]:
            if pos + size > end:
                self.walker.passing = pos + size - end
                size = end - pos
            self.pos = pos + size
            return mtype, bytes(data[pos:pos + size]), False
        if pos + size > end:
            return self.hold()
        self.pos = pos + size
        return mtype, bytes(data[pos:pos + size]), True

    def hold(self):
        """Keep the message begun (and the rest of the chunk) for later; the walk ends."""
        self.walker.buf += self.data[self.start:]
        self.pos = len(self.data)
        return None

    def rest(self) -> bytes:
        """The chunk from the next message on, as it is; the walk ends."""
        rest = self.data[self.pos:]
        self.pos = len(self.data)
        return bytes(rest)


class Effect:
    """A change a client message made to its book, until the server has answered for it."""

    __slots__ = ("book", "batch", "undo", "failed", "at_execute")

    def __init__(self, book, undo, at_execute=False):
        self.book = book
        self.batch = book.batch
        self.undo = undo
        self.failed = False      # a Query's error: settled at its ReadyForQuery
        # SQL sent in a Parse of the unnamed statement runs (and may fail: DISCARD ALL in
        # a transaction block) at its Execute, which settles the change in its stead.
        self.at_execute = at_execute
        book.unresolved[self.batch] = book.unresolved.get(self.batch, 0) + 1


def _nothing():
    pass


def _settle(entry, ok: bool) -> None:
    """The server answered (or failed, or skipped) the message of `entry`."""
    data = entry[2]
    if not ok and entry[0] == MSG_PARSE and data is not None:
        cache, key, name = data     # the statement it would have prepared is not there
        if cache.get(key) == name:
            del cache[key]
    effect = entry[3]
    if effect is not None:
        if not ok or effect.failed:
            effect.undo()
        effect.book.resolved(effect.batch)


class ServerStatements(AnswerQueue):
    """What one server connection holds of the proxy's statements, and the queue of answers
    it owes to a client that names statements (fields: AnswerQueue, in the fast path)."""

    __slots__ = ()

    def new_name(self) -> bytes:
        """A name for a statement the proxy prepares on this connection, never used before."""
        self.counter += 1
        return SERVER_NAME_PREFIX + str(self.counter).encode()

    def clear(self) -> None:
        """The server dropped every prepared statement (DISCARD ALL, DEALLOCATE ALL)."""
        self.cache.clear()

    def keep_only(self, names) -> None:
        """The server holds just these of the proxy's names (a state check said so)."""
        for key, name in list(self.cache.items()):
            if name not in names:
                del self.cache[key]

    def names(self) -> set:
        return set(self.cache.values())

    def touch(self, key) -> None:
        """`key` was used: the last to be closed."""
        self.cache.move_to_end(key)
        self.recent = key

    # -- the queue ------------------------------------------------------------------------
    def push(self, entry) -> None:
        queue = self.queue
        if self.skipping:
            # The server is discarding messages until a Sync: so are their answers.
            if entry[0] == MSG_SYNC:
                self.skipping = False
            else:
                _settle(entry, False)
                return
        queue.append(entry)
        if len(queue) == 1:
            self.server.tracking = True

    def _flush_fakes(self, out: list) -> None:
        queue = self.queue
        while queue and queue[0][0] == FAKE:
            entry = queue.pop(0)
            out.append(entry[2])
            _settle(entry, True)
        if not queue:
            self.server.tracking = False

    def answer(self, data) -> bytes:
        """The server's bytes as the client is to see them."""
        walk = _Walk(self, data, _WHOLE_SERVER)
        out = walk.out
        queue = self.queue
        # Answers the proxy makes wait for the server's next one: until then the client
        # has seen nothing of the request, which may still be sent elsewhere (failover).
        self._flush_fakes(out)
        while True:
            if not queue:
                out.append(walk.rest())   # nothing owed: the rest as it is
                break
            message = walk.next()
            if message is None:
                break
            mtype, raw, whole = message
            if whole:
                self._answer_message(mtype, raw, out)
            else:
                out.append(raw)
        if not queue:
            self.server.tracking = False
        waiter = self.waiter
        if waiter is not None and waiter.ready():
            # The answers it waited for are in: they go first, then what it held back.
            self.waiter = None
            if out:
                self.client_transport.write(b"".join(out))
            waiter.resume()
            return b""
        return b"".join(out)

    def _answer_message(self, mtype: int, message: bytes, out: list) -> None:
        queue = self.queue
        head = queue[0]
        kind = head[0]
        if kind == BARRIER:
            out.append(message)
            if mtype == 90:   # 'Z'
                head[2] -= 1
                if head[2] <= 0:
                    queue.pop(0)
                    self._flush_fakes(out)
            return
        if mtype == 69:   # 'E' ErrorResponse
            if kind in _ENDS_WITH_READY:
                # A Query (or FunctionCall) goes on to its ReadyForQuery; what it changed
                # is undone there.
                if head[3] is not None:
                    head[3].failed = True
                out.append(_client_error(message, head))
                return
            queue.pop(0)
            failed = [head]
            out.append(_client_error(message, head))
            # The server now discards everything up to the next Sync; so do its answers.
            while queue and queue[0][0] != MSG_SYNC:
                failed.append(queue.pop(0))
            if not queue:
                self.skipping = True
            for entry in reversed(failed):   # the last change first, as a stack unwinds
                _settle(entry, False)
            return
        if mtype == 90:   # 'Z'
            while queue and queue[0][0] not in _ENDS_WITH_READY:
                _settle(queue.pop(0), False)   # not with a well-behaved server; never wedge
            if queue:
                _settle(queue.pop(0), True)
            out.append(message)
            self._flush_fakes(out)
            return
        pops = False
        if mtype == 49:        # '1' ParseComplete
            pops = kind == MSG_PARSE
        elif mtype == 50:      # '2' BindComplete
            pops = kind == MSG_BIND
        elif mtype == 51:      # '3' CloseComplete
            pops = kind == MSG_CLOSE
        elif mtype in (84, 110):   # 'T' RowDescription, 'n' NoData
            pops = kind == MSG_DESCRIBE
        elif mtype in (67, 73, 115):   # 'C', 'I' EmptyQueryResponse, 's' PortalSuspended
            pops = kind == MSG_EXECUTE
        if pops:
            queue.pop(0)
            effect = head[3]
            if effect is not None and effect.at_execute and _hand_to_execute(queue, effect):
                head = (head[0], head[1], head[2], None)
            _settle(head, True)
            if head[1] != SWALLOW:
                out.append(message)
            self._flush_fakes(out)
        else:
            out.append(message)   # 't', or a Query's own answers


def _hand_to_execute(queue: list, effect: Effect) -> bool:
    """Let the Execute that runs the unnamed statement just parsed settle `effect`; False
    when none is owed yet (sent later, if at all: the Parse settles it then)."""
    for i, entry in enumerate(queue):
        kind = entry[0]
        if kind == MSG_EXECUTE and entry[3] is None:
            queue[i] = (kind, entry[1], entry[2], effect)
            effect.at_execute = False
            return True
        if kind == MSG_PARSE or kind in _ENDS_WITH_READY:
            return False
    return False


def _client_error(message: bytes, entry) -> bytes:
    """The server's ErrorResponse to the message of `entry`, as the client is to read it."""
    action = entry[1]
    if action == REWRITE:
        return _rewritten_error(message, entry[2])
    if action == RENAME:
        server_name, client_name = entry[2]
        message = message.replace(b'"' + server_name + b'"', b'"' + client_name + b'"')
        return pg.message(b"E", message[5:])
    return message


def _rewritten_error(message: bytes, change) -> bytes:
    """The server's ErrorResponse with the SQLSTATE and text the client would have got
    (where the SQLSTATE changes, without the server's source location, which is not it)."""
    code, text = change
    fields = [field for field in message[5:].split(b"\x00") if field]
    if not any(field == b"C" + code for field in fields):
        fields = [field for field in fields if field[:1] not in (b"F", b"L", b"R")]
    fields = [b"M" + text if field[:1] == b"M" else b"C" + code if field[:1] == b"C" else field
              for field in fields]
    return pg.message(b"E", b"\x00".join(fields) + b"\x00\x00")


class StatementBook(BookCore):
    """A client's named statements, and the rewriting of its bytes for the connection it
    holds. While the connection owes the client nothing out of the ordinary, nothing is
    queued: the entries of the request being sent wait in `deferred` and are dropped at its
    Sync. Once something needs the proxy's hand (a Parse answered here, a statement prepared
    first, an error to rewrite), the connection's queue takes a barrier for the answers still
    due to earlier requests, then those entries, then every entry until it empties."""

    __slots__ = ()

    def rewind(self) -> None:
        """The request is to be sent again from its start on another connection."""
        if self.snapshot is not None:
            self.names = self.snapshot
            self.snapshot = None
        self.buf.clear()
        self.passing = 0
        self.stalled = False

    def resolved(self, batch: int) -> None:
        left = self.unresolved[batch] - 1
        if left:
            self.unresolved[batch] = left
        else:
            del self.unresolved[batch]

    def ready(self) -> bool:
        """Nothing an earlier batch changed in the book is still unanswered."""
        unresolved = self.unresolved
        return not unresolved or min(unresolved) >= self.batch

    def resume(self) -> None:
        """Send what waited for the answers."""
        self.stalled = False
        data = bytes(self.buf)
        self.buf.clear()
        server = self.server
        state = server.answers
        out = self.forward(data, server, state, state.client_transport, 0)
        if out:
            server.transport.write(out)

    def forward_slow(self, data, server, client_transport, in_flight: int) -> bytes:
        """BookCore.forward for a chunk its quick lane does not take."""
        state = server.answers
        if not state.queue:
            self.deferred_ready = in_flight
        walk = _Walk(self, data, _WHOLE_CLIENT)
        out = walk.out
        while True:
            message = walk.next()
            if message is None:
                break
            mtype, raw, whole = message
            if not whole:
                out.append(raw)
                if mtype not in _UNANSWERED:
                    self._owe([(mtype, FORWARD, None, None)], state)
                    if mtype in _ENDS_WITH_READY:
                        self.batch += 1
                continue
            payload = raw[5:]
            if not self.ready() and not state.skipping and _reads_book(mtype, payload):
                # What this message means depends on how the server answered an earlier
                # batch: wait for those answers (a Flush makes the server send them).
                walk.hold()
                self.stalled = True
                state.waiter = self
                out.append(FLUSH)
                break
            entries: list = []
            try:
                sent = self._rewrite(mtype, payload, state, entries)
            except ValueError:
                # A name without its NUL: sent as it is, the server refuses it (08P01) and
                # ends this one session; the book is left as it was.
                entries = [(mtype, FORWARD, None, None)]
                sent = None
            out.append(raw if sent is None else sent)
            self._owe(entries, state)
            if mtype == MSG_QUERY:
                self.batch += 1
        queue = state.queue
        if queue and all(entry[0] == FAKE for entry in queue):
            # Nothing sent will bring an answer to put them before: they go now, and the
            # request can no longer be sent elsewhere as if unanswered.
            fakes: list = []
            state._flush_fakes(fakes)
            client_transport.write(b"".join(fakes))
            self.spoke = True
        return b"".join(out)

    def _owe(self, entries: list, state: ServerStatements) -> None:
        """Record the answers owed for one client message's worth of sent messages."""
        if not (state.queue or state.skipping):
            if all(entry[1] == FORWARD and entry[2] is None and entry[3] is None
                   for entry in entries):
                if entries[-1][0] in _ENDS_WITH_READY:
                    # A request answered as the server answers it: nothing to track.
                    self.deferred_ready += 1
                    self.deferred = []
                else:
                    self.deferred += entries
                return
            # Tracking starts: the answers to what went before come first, as they are.
            if self.deferred_ready:
                state.push([BARRIER, FORWARD, self.deferred_ready, None])
            entries = self.deferred + entries
            self.deferred = []
        self.deferred_ready = 0
        for entry in entries:
            state.push(entry)

    def _rewrite(self, mtype: int, payload: bytes, state: ServerStatements, entries: list):
        """The bytes to send for one whole client message (None: as it came), with the
        queue entries of what is sent, in order."""
        if state.skipping:
            # The server discards it unseen (an error earlier in this batch): so does the book.
            entries.append((mtype, FORWARD, None, None))
            return None
        if mtype == MSG_BIND:
            portal_end = payload.index(b"\x00")
            name_end = payload.index(b"\x00", portal_end + 1)
            name = payload[portal_end + 1:name_end]
            if not name:
                entries.append((MSG_BIND, FORWARD, None, None))
                return None
            before, server_name = self._statement(name, state, entries, MSG_BIND)
            return before + pg.message(b"B", payload[:portal_end + 1] + server_name + payload[name_end:])
        if mtype == MSG_DESCRIBE or mtype == MSG_CLOSE:
            name = payload[1:-1]
            if payload[:1] != b"S" or not name:
                entries.append((mtype, FORWARD, None, None))
                return None
            if mtype == MSG_CLOSE:
                # Only the client's view changes; the connection keeps it for others.
                effect = None
                key = self.names.pop(name, None)
                if key is not None:
                    effect = Effect(self, lambda: self.names.setdefault(name, key))
                entries.append((FAKE, FORWARD, CLOSE_COMPLETE, effect))
                return b""
            before, server_name = self._statement(name, state, entries, MSG_DESCRIBE)
            return before + pg.message(b"D", b"S" + server_name + b"\x00")
        if mtype == MSG_PARSE:
            name_end = payload.index(b"\x00")
            name = payload[:name_end]
            if not name:
                text_end = payload.find(b"\x00", 1)
                change = self._deallocating(payload[1:text_end], state, entries, MSG_PARSE) \
                    if text_end > 0 else None
                if not entries:
                    entries.append((MSG_PARSE, FORWARD, None, None))
                if change is None:
                    return None
                before, text = change
                return before + pg.message(b"P", b"\x00" + text + payload[text_end:])
            return self._parse(name, payload[name_end + 1:], state, entries)
        change = self._deallocating(payload[:-1], state, entries, MSG_QUERY)
        if not entries:
            entries.append((MSG_QUERY, FORWARD, None, None))
        if change is None:
            return None
        before, text = change
        return before + pg.message(b"Q", text + b"\x00")

    def _parse(self, name: bytes, key: bytes, state: ServerStatements, entries: list) -> bytes:
        # Where the answer must be the server's, the text is parsed as CHECK (and closed
        # again): it checks the text first (syntax, names, a failed transaction).
        check = pg.message(b"P", CHECK + b"\x00" + key) + pg.message(b"C", b"S" + CHECK + b"\x00")
        names = self.names
        if name in names:
            # ... and the name after: a Bind of MISSING fails, aborting as the Parse would.
            text = b'prepared statement "' + name + b'" already exists'
            entries += [(MSG_PARSE, SWALLOW, None, None), (MSG_CLOSE, SWALLOW, None, None),
                        (MSG_BIND, REWRITE, (b"42P05", text), None)]
            return check + pg.message(b"B", b"\x00" + MISSING + b"\x00" + bytes(6))
        names[name] = key
        effect = Effect(self, lambda: names.get(name) == key and names.pop(name))
        if key in state.cache:
            state.touch(key)
            if (not state.queue and not self.deferred and not self.deferred_ready
                    and state.server.scanner.status != STATUS_FAILED):
                entries.append((FAKE, FORWARD, PARSE_COMPLETE, effect))
                return b""
            # The answer depends on the transaction's state when the server gets there (a
            # failed one refuses it): the server gives it.
            entries += [(MSG_PARSE, FORWARD, None, effect), (MSG_CLOSE, SWALLOW, None, None)]
            return check
        before, _ = self._prepare(key, state, entries, FORWARD, effect)
        return before

    def _statement(self, name: bytes, state: ServerStatements, entries: list, mtype: int):
        """(bytes to send first, the server's name) for the client's statement `name`: a
        Parse first where the connection lacks it. An unknown name becomes MISSING, whose
        error is rewritten to name it."""
        key = self.names.get(name)
        if key in self.watched and mtype == MSG_BIND:
            self.client.statement_may_change_session()
        if key is None:
            text = b'prepared statement "' + name + b'" does not exist'
            entries.append((mtype, REWRITE, (b"26000", text), None))
            return b"", MISSING
        server_name = state.cache.get(key)
        if server_name is not None:
            state.touch(key)
            before = b""
        else:
            before, server_name = self._prepare(key, state, entries, SWALLOW, None)
        if state.queue or entries:
            # Answers are being tracked anyway: should the server not know its name, the
            # client hears of its own.
            entries.append((mtype, RENAME, (server_name, name), None))
        else:
            entries.append((mtype, FORWARD, None, None))
        return before, server_name

    def _prepare(self, key: bytes, state: ServerStatements, entries: list, action, effect):
        """(the Parse of `key` under a new server name, that name), closing the least
        recently used statement first when the connection holds its maximum."""
        sent = []
        if len(state.cache) >= state.capacity:
            _, old = state.cache.popitem(last=False)
            sent.append(pg.message(b"C", b"S" + old + b"\x00"))
            entries.append((MSG_CLOSE, SWALLOW, None, None))
        server_name = state.new_name()
        state.cache[key] = server_name
        state.recent = key
        if state.metrics is not None:
            state.metrics.StatementsPrepared += 1
        sent.append(pg.message(b"P", server_name + b"\x00" + key))
        if effect is None:
            # Later batches must not count on it before the server has answered for it.
            effect = Effect(self, _nothing)
        entries.append((MSG_PARSE, action, (state.cache, key, server_name), effect))
        return b"".join(sent), server_name

    def _deallocating(self, sql: bytes, state: ServerStatements, entries: list, mtype: int):
        """SQL (a Query's, an unnamed Parse's) that drops statements changes the views.
        DEALLOCATE of one of the client's protocol-level statements becomes (bytes to send
        first, the new text); anything else is sent as it is (None)."""
        if not drops_statements(sql):
            return None
        names = self.names
        target = b"all" if _DISCARD_ALL.fullmatch(sql) else None
        if target is None:
            match = _DEALLOCATE.fullmatch(sql)
            if match is None:
                return None
            target = match.group(1)
        at_execute = mtype == MSG_PARSE
        if target.lower() == b"all":
            before = dict(names)
            cached = dict(state.cache)
            names.clear()
            state.clear()

            def undo_all():   # refused (DISCARD ALL in a transaction block): all still there
                names.update(before)
                for key, server_name in cached.items():
                    state.cache.setdefault(key, server_name)
            entries.append((mtype, FORWARD, None, Effect(self, undo_all, at_execute)))
            return None
        name = _statement_name(target)
        key = names.pop(name, None)
        if key is None:
            if name.startswith(SERVER_NAME_PREFIX):
                # One of the proxy's, which any client can read of in pg_prepared_statements:
                # not its to drop. A direct session has no such statement; nor has MISSING.
                entries.append((mtype, RENAME, (MISSING, name), None))
                return b"", b"DEALLOCATE " + MISSING
            return None   # not one of the client's: the server answers as it would
        # The answer must be the server's (DEALLOCATE, or the error of a failed transaction)
        # but what it drops must not be: the statement of the client's text stays for the
        # others, and DEALLOCATE ALL would take the session's SQL PREPAREd ones. The server
        # drops a statement of the empty query, prepared first where the connection has none.
        cache = state.cache
        server_name = cache.pop(EMPTY_KEY, None)
        before = b""
        if server_name is None:
            server_name = state.new_name()
            before = pg.message(b"P", server_name + b"\x00" + EMPTY_KEY)
            # Should it fail or be skipped, _settle takes it out of the cache again (after
            # the undo below put it back: failed entries are settled last first).
            entries.append((MSG_PARSE, SWALLOW, (cache, EMPTY_KEY, server_name),
                            Effect(self, _nothing)))

        def undo():   # not dropped: the client keeps its name, the connection the statement
            names.setdefault(name, key)
            cache.setdefault(EMPTY_KEY, server_name)
        entries.append((mtype, FORWARD, None, Effect(self, undo, at_execute)))
        return before, b"DEALLOCATE " + server_name


def deallocates_proxy_statement(mtype: int, payload: bytes) -> bool:
    """Whether a Query, or a Parse of the unnamed statement, is a DEALLOCATE of a name the
    proxy gives statements (only a book answers for those as a direct session would)."""
    if mtype == MSG_PARSE:
        if payload[:1] != b"\x00":
            return False
        payload = payload[1:]
    text = payload[:payload.find(b"\x00")] if b"\x00" in payload else payload
    if not drops_statements(text):
        return False
    match = _DEALLOCATE.fullmatch(text)
    return match is not None and _statement_name(match.group(1)).startswith(SERVER_NAME_PREFIX)


def _statement_name(identifier: bytes) -> bytes:
    """A statement name as SQL spells it, as the server keeps it."""
    if identifier.startswith(b'"'):
        return identifier[1:-1].replace(b'""', b'"')
    return identifier.lower()


def _reads_book(mtype: int, payload: bytes) -> bool:
    """Whether what a whole client message means depends on the client's named statements."""
    if mtype == MSG_BIND:
        nul = payload.find(b"\x00")
        return 0 <= nul < len(payload) - 1 and payload[nul + 1] != 0
    if mtype == MSG_DESCRIBE or mtype == MSG_CLOSE:
        return payload[:1] == b"S" and len(payload) > 2
    if mtype == MSG_PARSE:
        return payload[:1] != b"\x00" or drops_statements(payload[1:])
    return drops_statements(payload)
