# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The relay's sockets without the event loop's transports: the C twin of `reactor_py` (Linux).

Why: a short-lived client (a Lambda invocation, pgbench -C) costs the proxy one accepted
socket, four small reads and writes and a close. Through uvloop's transports each of those
steps goes through libuv callbacks that re-take the GIL, a weak-value registry of
transports written in Python, and a scheduled handle for connection_made: more user CPU
per connection before the proxy's own work than PgBouncer spends in all (bench/ measures
both). Here the endpoint's accepted sockets live in one epoll set of the reactor's own, and
that set is a single reader of the loop: one callback serves every client that is ready,
and reads, writes, accepts and closes are plain system calls on the descriptors.

The plain (non-TLS) database connections join the same set (adopt below): a query and its
answer then cost the proxy one loop callback per wakeup for both halves of every session,
and the chunks reach the relay's C code without a Python method call (through a libuv read
callback, every answer would take the GIL again, enter a context and look up a method).
One reactor serves a loop: every endpoint's listeners and every adopted connection (a
Tally counts what one endpoint accepted, for its wait_closed).

FdTransport offers what asyncio protocols use of a transport (write, writelines, close,
abort, is_closing, pause/resume_reading, get_extra_info, flow control, write_eof), with
asyncio's semantics: data_received with bytes, eof_received, connection_lost after the
close, never from inside it (scheduled with call_soon; for the relay's own halves, run when
the batch of events that closed them is served). TLS is handed to the loop (start_tls
below): the socket leaves the reactor and becomes one of the loop's own transports.
"""
import socket as _socket

# Linux only (epoll), where EWOULDBLOCK is EAGAIN.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.ref cimport PyObject, Py_DECREF, Py_INCREF
from libc.errno cimport EAGAIN, ECONNABORTED, EINTR, EMFILE, ENFILE, ENOBUFS, ENOMEM, EPROTO, errno
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memset, strerror

from rdsproxy._fastpath.reactor_py import BACKLOG, Listening, start_tls as _loop_start_tls
from rdsproxy._fastpath.pg_relay_c cimport SessionFactory
from rdsproxy._fastpath.relay_c cimport RelayHalf, Wire

from rdsproxy._fastpath.linux cimport *

cdef enum:
    MAX_EVENTS = 256        # events taken per wakeup
    RECV_SIZE = 262144      # one read's buffer, shared by the reactor's transports (as libuv's)
    ACCEPT_BATCH = 128      # connections accepted per wakeup before serving the others
    HIGH_WATER = 65536      # asyncio's default write-buffer limits
    LOW_WATER = 16384
    ADDR_SIZE = 28          # sizeof(struct sockaddr_in6): the largest address we accept

IMPLEMENTATION = "epoll"


cdef object _address(const char *raw, socklen_t size):
    """A socket address as Python's socket module reports it."""
    cdef char text[64]
    cdef const sockaddr_in *v4
    cdef const sockaddr_in6 *v6
    if size == 0:
        return None
    family = (<const sockaddr *>raw).sa_family
    if family == AF_INET:
        v4 = <const sockaddr_in *>raw
        inet_ntop(AF_INET, &v4.sin_addr, text, sizeof(text))
        return (text.decode("ascii"), ntohs(v4.sin_port))
    if family == AF_INET6:
        v6 = <const sockaddr_in6 *>raw
        inet_ntop(AF_INET6, &v6.sin6_addr, text, sizeof(text))
        return (text.decode("ascii"), ntohs(v6.sin6_port), ntohl(v6.sin6_flowinfo),
                v6.sin6_scope_id)
    return None


cdef inline object _os_error(int err):
    # OSError(errno, text) is the right subclass already (ConnectionResetError, ...).
    return OSError(err, strerror(err).decode("utf-8", "replace"))


# The loop's reactor, shared by its endpoints and its database connections: one epoll set
# is one reader callback however many sockets are ready.
_SHARED = {}


cdef Reactor _shared(loop):
    cdef Reactor reactor = _SHARED.get(loop)
    if reactor is None or reactor.epfd < 0:
        reactor = Reactor(loop)
        _SHARED[loop] = reactor
    return reactor


cdef class Reactor:
    """One epoll set of a loop's relay sockets (accepted clients, listening sockets and
    adopted database connections), served by one reader callback of the event loop."""
    cdef int epfd
    cdef object loop
    cdef object call_soon   # the loop's, bound once
    # Relay halves whose socket closed: their connection_lost runs when the batch of events
    # that closed them is served (see _lose), not from a loop handle each.
    cdef list lost
    cdef bint serving         # inside _ready: the batch's end delivers `lost`
    cdef bint flush_scheduled
    cdef epoll_event *events
    cdef char *rbuf
    # fd -> the Listener or FdTransport registered for it (a strong reference), so an event
    # is always looked up afresh: a descriptor closed earlier in the same batch finds NULL.
    cdef PyObject **slots
    cdef int nslots
    cdef Py_ssize_t transports
    cdef Py_ssize_t listeners
    cdef bint registered

    def __cinit__(self):
        self.epfd = -1

    def __init__(self, loop):
        self.loop = loop
        self.call_soon = loop.call_soon
        self.lost = []
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise _os_error(errno)
        self.events = <epoll_event *>malloc(sizeof(epoll_event) * MAX_EVENTS)
        self.rbuf = <char *>malloc(RECV_SIZE)
        if self.events == NULL or self.rbuf == NULL:
            raise MemoryError()
        loop.add_reader(self.epfd, self._ready)
        self.registered = True

    def __dealloc__(self):
        cdef int fd
        if self.slots != NULL:
            for fd in range(self.nslots):
                if self.slots[fd] != NULL:
                    Py_DECREF(<object>self.slots[fd])
            free(self.slots)
        if self.epfd >= 0:
            c_close(self.epfd)
        free(self.events)
        free(self.rbuf)

    cdef int _watch(self, int fd, object handler, unsigned int events) except -1:
        cdef epoll_event ev
        cdef int size
        cdef PyObject **grown
        if fd >= self.nslots:
            size = self.nslots * 2 if self.nslots else 1024
            while size <= fd:
                size *= 2
            grown = <PyObject **>realloc(self.slots, sizeof(PyObject *) * size)
            if grown == NULL:
                raise MemoryError()
            memset(grown + self.nslots, 0, sizeof(PyObject *) * (size - self.nslots))
            self.slots = grown
            self.nslots = size
        memset(&ev, 0, sizeof(ev))
        ev.events = events
        ev.data.fd = fd
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            raise _os_error(errno)
        Py_INCREF(handler)
        self.slots[fd] = <PyObject *>handler
        return 0

    cdef int _change(self, int fd, unsigned int events) except -1:
        cdef epoll_event ev
        memset(&ev, 0, sizeof(ev))
        ev.events = events
        ev.data.fd = fd
        if epoll_ctl(self.epfd, EPOLL_CTL_MOD, fd, &ev) < 0:
            raise _os_error(errno)
        return 0

    cdef void _forget(self, int fd, bint unwatch):
        """Drop `fd`'s handler; `unwatch` also takes it out of the epoll set (a descriptor
        that is closed right after leaves it by itself)."""
        cdef PyObject *handler
        if unwatch:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, NULL)
        if 0 <= fd < self.nslots and self.slots[fd] != NULL:
            handler = self.slots[fd]
            self.slots[fd] = NULL
            Py_DECREF(<object>handler)

    def _ready(self):
        """The loop's reader callback: serve every descriptor that is ready."""
        cdef int n
        n = epoll_wait(self.epfd, self.events, MAX_EVENTS, 0)
        if n < 0:
            if errno != EINTR:
                self.loop.call_exception_handler({"message": "reactor: epoll_wait failed",
                                                  "exception": _os_error(errno)})
            return
        self.serving = True
        try:
            self._serve(n)
        finally:
            self._deliver_lost()

    cdef void _serve(self, int n):
        cdef int i, fd
        cdef unsigned int ev
        cdef FdTransport transport
        for i in range(n):
            fd = self.events[i].data.fd
            ev = self.events[i].events
            if fd >= self.nslots or self.slots[fd] == NULL:
                continue  # closed earlier in this batch
            handler = <object>self.slots[fd]
            if type(handler) is FdTransport:
                transport = <FdTransport>handler
                if ev & EPOLLOUT:
                    transport._write_ready()
                if ev & (EPOLLIN | EPOLLHUP | EPOLLERR) and transport.fd == fd:
                    # A hang-up or error is confirmed by the read itself (a reused
                    # descriptor may carry a stale event: then the read finds nothing).
                    transport._read_ready()
            else:
                (<Listener>handler)._accept_ready()

    cdef void _lose(self, FdTransport transport, exc):
        """A relay half's socket closed: its connection_lost(exc) runs once the events being
        served are (asyncio's rule: never from inside close()), or from the loop when it
        closed outside a batch (a timer, a task). One list instead of a loop handle per
        closed connection: under connection churn the handle was a tenth of the proxy's
        instructions per connection."""
        self.lost.append((transport, exc))
        if not self.serving and not self.flush_scheduled:
            self.flush_scheduled = True
            self.call_soon(self._flush_lost)

    def _flush_lost(self):
        self.flush_scheduled = False
        if not self.serving:
            self.serving = True
            self._deliver_lost()

    cdef void _deliver_lost(self):
        """connection_lost for every relay half in `lost`, those that closing one of them
        closes too included; ends the batch."""
        cdef list batch
        while self.lost:
            batch, self.lost = self.lost, []
            for transport, exc in batch:
                (<FdTransport>transport)._lost_now(exc)
        self.serving = False

    cdef void _transport_done(self):
        self.transports -= 1
        self._maybe_retire()

    cdef void _maybe_retire(self):
        """With no listener and no transport left the reactor leaves the loop."""
        if self.transports > 0 or self.listeners > 0:
            return
        if _SHARED.get(self.loop) is self:
            del _SHARED[self.loop]
        if self.registered:
            self.registered = False
            try:
                self.loop.remove_reader(self.epfd)
            except Exception:  # noqa: BLE001 - the loop is closing
                pass
            c_close(self.epfd)
            self.epfd = -1


cdef class Tally:
    """The connections one serve() accepted, for its wait_closed (the reactor is shared
    with other endpoints and with database connections)."""
    cdef Py_ssize_t open
    cdef bint accepting
    cdef object loop
    cdef list waiters

    def __init__(self, loop):
        self.loop = loop
        self.accepting = True
        self.waiters = []

    cdef void done(self):
        self.open -= 1
        self._wake()

    cdef void _wake(self):
        if self.open > 0 or self.accepting:
            return
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def stop_accepting(self):
        self.accepting = False
        self._wake()

    async def wait_idle(self):
        if self.open > 0 or self.accepting:
            waiter = self.loop.create_future()
            self.waiters.append(waiter)
            await waiter


cdef class Listener:
    """A listening socket of the reactor; each accepted connection gets a protocol from
    `factory` and an FdTransport."""
    cdef Reactor reactor
    cdef Tally tally
    cdef object sock
    cdef object factory
    cdef int fd
    cdef bint closed
    cdef bint read_first

    def __init__(self, Reactor reactor, Tally tally, sock, factory, bint read_first):
        self.reactor = reactor
        self.tally = tally
        self.sock = sock
        self.factory = factory
        self.fd = sock.fileno()
        self.read_first = read_first
        reactor._watch(self.fd, self, EPOLLIN)
        reactor.listeners += 1

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.reactor._forget(self.fd, True)
        self.sock.close()
        self.reactor.listeners -= 1
        self.reactor._maybe_retire()

    def _resume_accepting(self):
        if not self.closed:
            self.reactor._change(self.fd, EPOLLIN)

    cdef void _accept_ready(self):
        cdef sockaddr_storage addr
        cdef socklen_t size
        cdef int fd, err, i
        for i in range(ACCEPT_BATCH):
            size = sizeof(addr)
            fd = accept4(self.fd, <sockaddr *>&addr, &size, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                err = errno
                if err == EAGAIN:
                    return
                if err == EINTR or err == ECONNABORTED or err == EPROTO:
                    continue  # that one connection is gone; others may wait
                if err == EMFILE or err == ENFILE or err == ENOBUFS or err == ENOMEM:
                    # Out of descriptors or memory: stop accepting for a second rather
                    # than spin on a listener that stays readable.
                    self.reactor.loop.call_exception_handler({
                        "message": "reactor: cannot accept connections; pausing for 1 s",
                        "exception": _os_error(err)})
                    try:
                        self.reactor._change(self.fd, 0)
                        self.reactor.loop.call_later(1.0, self._resume_accepting)
                    except OSError:
                        pass
                    return
                self.reactor.loop.call_exception_handler({
                    "message": "reactor: accept failed", "exception": _os_error(err)})
                return
            # TCP_NODELAY comes from the listening socket (Linux passes it on).
            self._connection(fd, <const char *>&addr, size)

    cdef void _connection(self, int fd, const char *addr, socklen_t size):
        cdef FdTransport transport = _new_transport(self.reactor, fd, addr, size)
        try:
            if type(self.factory) is SessionFactory:
                protocol = (<SessionFactory>self.factory).make()   # a C call, no __call__
            else:
                protocol = self.factory()
            self.reactor._watch(fd, transport, EPOLLIN)
        except BaseException as exc:
            c_close(fd)
            transport.fd = -1
            self.reactor.loop.call_exception_handler({
                "message": "reactor: cannot serve an accepted connection", "exception": exc})
            return
        transport.tally = self.tally
        if not transport._start(protocol):
            return
        if self.read_first and transport.interest & EPOLLIN:
            # TCP_DEFER_ACCEPT: the first bytes are here already; serve them in this wakeup.
            transport._read_ready()


cdef FdTransport _new_transport(Reactor reactor, int fd, const char *addr, socklen_t size):
    cdef FdTransport transport = FdTransport.__new__(FdTransport)
    transport.fd = fd
    transport.reactor = reactor
    transport.interest = EPOLLIN
    if size > ADDR_SIZE:
        size = 0
    memcpy(transport.peer, addr, size)
    transport.peer_size = size
    return transport


# The Python-level method, to tell a relay half from a subclass that overrides it.
_HALF_DATA_RECEIVED = getattr(RelayHalf, "data_received")


cdef bint _relay_half(protocol):
    """Whether `protocol` is a half of the relay whose data_received the reactor may skip
    to call its C body: not another protocol, nor a subclass overriding data_received."""
    return (isinstance(protocol, RelayHalf)
            and getattr(type(protocol), "data_received") is _HALF_DATA_RECEIVED)


cdef class FdTransport(Wire):
    """An accepted TCP connection of the reactor, as an asyncio transport (a Wire: the
    relay's writes to it are C calls)."""
    cdef int fd
    cdef Reactor reactor
    cdef object protocol
    cdef RelayHalf half             # the protocol, when it is one of the relay's halves:
                                    # its chunks go to it in C
    cdef Tally tally                # the accepting endpoint's count (None: adopted)
    cdef unsigned int interest      # the epoll events asked for
    cdef bint closing
    cdef bint lost                  # connection_lost scheduled (or the socket detached)
    cdef bint reading_paused
    cdef bint protocol_paused
    cdef bint eof_pending           # write_eof() once the buffer is sent
    cdef bytearray wbuf             # what the kernel did not take yet
    cdef Py_ssize_t high_water
    cdef Py_ssize_t low_water
    cdef char peer[ADDR_SIZE]
    cdef socklen_t peer_size
    cdef object sockname

    def __cinit__(self):
        self.fd = -1
        self.high_water = HIGH_WATER
        self.low_water = LOW_WATER

    def __repr__(self):
        return f"<FdTransport fd={self.fd} closing={bool(self.closing)}>"

    cdef bint _start(self, protocol):
        """The descriptor is watched: count it in and tell the protocol; False when its
        connection_made failed (the transport is aborted then)."""
        self.reactor.transports += 1
        if self.tally is not None:
            self.tally.open += 1
        self._bind(protocol)
        try:
            protocol.connection_made(self)
        except BaseException as exc:
            self._protocol_failed(exc, "connection_made")
            return False
        return True

    # -- reading ------------------------------------------------------------------------
    cdef void _read_ready(self):
        cdef ssize_t n
        cdef int err
        if self.closing or self.reading_paused:
            return
        n = recv(self.fd, self.reactor.rbuf, RECV_SIZE, 0)
        if n > 0:
            data = PyBytes_FromStringAndSize(self.reactor.rbuf, n)
            try:
                if self.half is not None:
                    self.half.received(data)
                else:
                    self.protocol.data_received(data)
            except BaseException as exc:
                self._protocol_failed(exc, "data_received")
        elif n == 0:
            self._eof()
        else:
            err = errno
            if err != EAGAIN and err != EINTR:
                self._finish(_os_error(err))

    cdef void _eof(self):
        try:
            keep_open = self.protocol.eof_received()
        except BaseException as exc:
            self._protocol_failed(exc, "eof_received")
            return
        if keep_open and not self.closing:
            self.reading_paused = True   # half-closed: a readable EOF would wake us forever
            self._set_interest(self.interest & ~EPOLLIN)
        else:
            self.close()

    def pause_reading(self):
        if self.closing or self.reading_paused:
            return
        self.reading_paused = True
        self._set_interest(self.interest & ~EPOLLIN)

    def resume_reading(self):
        if self.closing or not self.reading_paused:
            return
        self.reading_paused = False
        self._set_interest(self.interest | EPOLLIN)

    def is_reading(self):
        return not self.closing and not self.reading_paused

    cdef void _set_interest(self, unsigned int events):
        if events == self.interest or self.fd < 0:
            return
        self.interest = events
        try:
            self.reactor._change(self.fd, events)
        except OSError as exc:
            self._finish(exc)

    # -- writing ------------------------------------------------------------------------
    cpdef write(self, data):
        cdef const char *p
        cdef Py_ssize_t size
        cdef Py_buffer view
        if self.closing or self.fd < 0:
            return  # as asyncio: writes after close() are dropped
        if PyBytes_CheckExact(data):
            p = PyBytes_AS_STRING(data)
            size = PyBytes_GET_SIZE(data)
            self._write(p, size, data)
        else:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            try:
                self._write(<const char *>view.buf, view.len, None)
            finally:
                PyBuffer_Release(&view)

    cdef void _write(self, const char *p, Py_ssize_t size, object whole):
        cdef ssize_t n = 0
        cdef int err
        if size == 0:
            return
        if self.wbuf is None or not self.wbuf:
            n = send(self.fd, p, size, MSG_NOSIGNAL)
            if n == size:
                return
            if n < 0:
                err = errno
                if err != EAGAIN and err != EINTR:
                    self._finish(_os_error(err))
                    return
                n = 0
            if self.wbuf is None:
                self.wbuf = bytearray()
            self._set_interest(self.interest | EPOLLOUT)
        self.wbuf += p[n:size]
        if not self.protocol_paused and len(self.wbuf) > self.high_water:
            self.protocol_paused = True
            try:
                self.protocol.pause_writing()
            except BaseException as exc:
                self._protocol_failed(exc, "pause_writing")

    def writelines(self, chunks):
        self.write(b"".join(chunks))

    cdef void _write_ready(self):
        cdef ssize_t n
        cdef int err
        if self.fd < 0 or self.wbuf is None or not self.wbuf:
            self._set_interest(self.interest & ~EPOLLOUT)
            return
        n = send(self.fd, <char *>self.wbuf, len(self.wbuf), MSG_NOSIGNAL)
        if n < 0:
            err = errno
            if err != EAGAIN and err != EINTR:
                self.wbuf.clear()
                self._finish(_os_error(err))
            return
        del self.wbuf[:n]
        if self.protocol_paused and len(self.wbuf) <= self.low_water:
            self.protocol_paused = False
            try:
                self.protocol.resume_writing()
            except BaseException as exc:
                self._protocol_failed(exc, "resume_writing")
                return
        if self.wbuf:
            return
        self._set_interest(self.interest & ~EPOLLOUT)
        if self.closing:
            self._finish(None)
        elif self.eof_pending:
            self.eof_pending = False
            shutdown(self.fd, SHUT_WR)

    def get_write_buffer_size(self):
        return len(self.wbuf) if self.wbuf is not None else 0

    def get_write_buffer_limits(self):
        return (self.low_water, self.high_water)

    def set_write_buffer_limits(self, high=None, low=None):
        if high is None:
            high = HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self.high_water = high
        self.low_water = low

    def can_write_eof(self):
        return True

    def write_eof(self):
        if self.closing or self.fd < 0:
            return
        if self.wbuf:
            self.eof_pending = True
        else:
            shutdown(self.fd, SHUT_WR)

    # -- closing ------------------------------------------------------------------------
    def is_closing(self):
        return self.closing

    cpdef close(self):
        if self.closing:
            return
        self.closing = True
        if self.wbuf:
            self._set_interest(EPOLLOUT)   # flush what is buffered, then close
        else:
            self._finish(None)

    def abort(self):
        self.closing = True
        if self.wbuf is not None:
            self.wbuf.clear()
        self._finish(None)

    cdef void _finish(self, exc):
        """Close the descriptor now; connection_lost(exc) follows from the loop."""
        cdef int fd = self.fd
        self.closing = True
        if fd < 0:
            return
        self.fd = -1
        self.reactor._forget(fd, False)   # close() takes it out of the epoll set
        c_close(fd)
        if not self.lost:
            self.lost = True
            if self.half is not None:
                self.reactor._lose(self, exc)
            else:   # another protocol: asyncio's order against the callbacks scheduled before
                self.reactor.call_soon(self._connection_lost, exc)

    def _connection_lost(self, exc):
        self._lost_now(exc)

    cdef void _lost_now(self, exc):
        cdef RelayHalf half = self.half
        protocol, self.protocol = self.protocol, None
        self.half = None
        try:
            if half is not None:
                half.connection_lost(exc)   # a C call (its Python override, if any, runs)
            else:
                protocol.connection_lost(exc)
        except BaseException as err:
            self.reactor.loop.call_exception_handler({
                "message": "reactor: protocol.connection_lost() failed", "exception": err,
                "transport": self, "protocol": protocol})
        finally:
            self._done()

    cdef void _done(self):
        """Counted out of the reactor (and of its endpoint's tally)."""
        tally, self.tally = self.tally, None
        if tally is not None:
            (<Tally>tally).done()
        self.reactor._transport_done()

    cdef void _protocol_failed(self, exc, what):
        """A protocol callback raised: report it and drop the connection (asyncio's rule)."""
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            self.abort()
            raise exc
        self.reactor.loop.call_exception_handler({
            "message": f"reactor: protocol.{what}() failed", "exception": exc,
            "transport": self, "protocol": self.protocol})
        self.abort()

    cdef int _detach(self) except -2:
        """Take the socket out of the reactor without closing it; returns the descriptor."""
        cdef int fd = self.fd
        if fd < 0 or self.wbuf:
            return -1
        self.fd = -1
        self.closing = True
        self.lost = True
        self.reactor._forget(fd, True)
        self._done()
        return fd

    # -- the rest of the transport API ----------------------------------------------------
    def get_extra_info(self, name, default=None):
        cdef sockaddr_storage addr
        cdef socklen_t size
        if name == "peername":
            return _address(self.peer, self.peer_size)
        if name == "sockname":
            if self.sockname is None and self.fd >= 0:
                size = sizeof(addr)
                if getsockname(self.fd, <sockaddr *>&addr, &size) == 0:
                    self.sockname = _address(<const char *>&addr, size)
            return self.sockname if self.sockname is not None else default
        return default

    def get_protocol(self):
        return self.protocol

    def set_protocol(self, protocol):
        self._bind(protocol)

    cdef void _bind(self, protocol):
        self.protocol = protocol
        self.half = <RelayHalf>protocol if _relay_half(protocol) else None


async def serve(loop, protocol_factory, sockets, *, bint client_speaks_first=False):
    """Accept connections on `sockets` (from reactor_py.listening_sockets) in the loop's
    reactor."""
    reactor = _shared(loop)
    tally = Tally(loop)
    listeners = [Listener(reactor, tally, sock, protocol_factory, client_speaks_first)
                 for sock in sockets]
    return Listening([_ReactorServer(tally, listeners)], sockets)


async def adopt(loop, protocol_factory, sock):
    """A transport and protocol for `sock`, a connected TCP socket (a database connection):
    the socket joins the loop's reactor, as reactor_py.adopt joins it to the loop."""
    cdef sockaddr_storage addr
    cdef socklen_t size = sizeof(addr)
    cdef int one = 1
    cdef Reactor reactor = _shared(loop)
    cdef int fd = sock.fileno()
    if getpeername(fd, <sockaddr *>&addr, &size) != 0:
        raise _os_error(errno)
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
    protocol = protocol_factory()
    fd = sock.detach()
    cdef FdTransport transport = _new_transport(reactor, fd, <const char *>&addr, size)
    try:
        reactor._watch(fd, transport, EPOLLIN)
    except BaseException:
        c_close(fd)
        transport.fd = -1
        raise
    if not transport._start(protocol):
        raise ConnectionError("the protocol failed in connection_made")
    return transport, protocol


class _ReactorServer:
    """close() stops accepting; wait_closed() waits for the accepted connections to end."""

    def __init__(self, tally, listeners):
        self._tally = tally
        self._listeners = listeners

    def close(self):
        for listener in self._listeners:
            listener.close()
        self._tally.stop_accepting()

    async def wait_closed(self):
        await self._tally.wait_idle()


async def start_tls(loop, transport, protocol, sslcontext, handshake_timeout, *,
                    early=b"", feed=None):
    """Server-side TLS: the socket leaves the reactor and the loop runs the handshake on it
    (uvloop's start_tls only accepts its own transports). The protocol then sees
    connection_made(tls_transport), data_received, connection_lost from the loop. `early`
    and `feed`: as reactor_py.start_tls."""
    if type(transport) is not FdTransport:
        return await _loop_start_tls(loop, transport, protocol, sslcontext, handshake_timeout,
                                     early=early, feed=feed)
    peer = transport.get_extra_info("peername")
    fd = (<FdTransport>transport)._detach()
    if fd < 0:
        raise ConnectionError("connection closed (or still writing) before the TLS handshake")
    family = _socket.AF_INET6 if peer is not None and len(peer) == 4 else _socket.AF_INET
    sock = _socket.socket(family, _socket.SOCK_STREAM, 0, fileno=fd)
    if early:
        # The ClientHello was read already: the TLS layer must get it before the socket's
        # next bytes, which only the loop's own start_tls lets us do (on a loop transport).
        plain, _ = await loop.connect_accepted_socket(lambda: protocol, sock)
        return await _loop_start_tls(loop, plain, protocol, sslcontext, handshake_timeout,
                                     early=early, feed=feed)
    tls_transport, _ = await loop.connect_accepted_socket(
        lambda: protocol, sock, ssl=sslcontext, ssl_handshake_timeout=handshake_timeout)
    return tls_transport
