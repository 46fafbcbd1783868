"""The client-socket reactor twins (rdsproxy._fastpath.reactor_py / reactor_c) over real sockets.

Both twins must give a protocol the same life: connection_made, data_received in order,
eof_received, flow control, close after the buffer is sent, connection_lost exactly once,
TLS through start_tls, and a failing protocol that costs only its own connection. `py` is
the event loop's own transports (the reference); `c` is the epoll reactor.
"""
import asyncio
import importlib
import os
import socket

import pytest
import uvloop

REQUIRE_CYTHON = os.environ.get("RDSPROXY_REQUIRE_CYTHON", "") not in ("", "0")


def _load(name):
    try:
        return importlib.import_module("rdsproxy._fastpath." + name)
    except ImportError:
        return None


TWINS = {"py": _load("reactor_py"), "c": _load("reactor_c")}


@pytest.fixture(params=["py", "c"])
def reactor(request):
    module = TWINS[request.param]
    if module is None:
        if REQUIRE_CYTHON:
            pytest.fail("RDSPROXY_REQUIRE_CYTHON=1 but reactor_c is not built")
        pytest.skip("reactor_c not built (needs Linux and a compiler)")
    return module


def run(coro):
    return uvloop.run(asyncio.wait_for(coro, 30))


class Recorder(asyncio.Protocol):
    """Records what the transport did to it; echoes when asked to."""

    def __init__(self, echo=False):
        self.echo = echo
        self.events = []
        self.data = bytearray()
        self.transport = None
        self.lost = asyncio.get_running_loop().create_future()
        self.paused = 0
        self.resumed = 0

    def connection_made(self, transport):
        self.transport = transport
        self.events.append("made")

    def data_received(self, data):
        assert isinstance(data, bytes)
        self.data += data
        if self.echo:
            self.transport.write(data)

    def eof_received(self):
        self.events.append("eof")

    def pause_writing(self):
        self.paused += 1

    def resume_writing(self):
        self.resumed += 1

    def connection_lost(self, exc):
        self.events.append("lost")
        assert not self.lost.done(), "connection_lost called twice"
        self.lost.set_result(exc)


async def start(reactor, factory, *, speaks_first=True):
    from rdsproxy._fastpath.reactor_py import listening_sockets
    sockets = listening_sockets("127.0.0.1", 0, client_speaks_first=speaks_first)
    server = await reactor.serve(asyncio.get_running_loop(), factory, sockets,
                                 client_speaks_first=speaks_first)
    return server, sockets[0].getsockname()[:2]


async def start_recording(reactor, protocol_class=None, **kwargs):
    """A server whose protocols are kept in `made` (in the order of their connections)."""
    made = []
    protocol_class = protocol_class or Recorder

    def factory():
        p = protocol_class(**kwargs)
        made.append(p)
        return p
    server, addr = await start(reactor, factory)
    return server, addr, made


async def first_data(made, index=0):
    """The index-th connection's protocol, once it has received something."""
    while len(made) <= index or not made[index].data:
        await asyncio.sleep(0.01)
    return made[index]


def test_echo_many_clients_in_order(reactor):
    async def main():
        server, addr = await start(reactor, lambda: Recorder(echo=True))

        async def client(i):
            r, w = await asyncio.open_connection(*addr)
            want = b""
            for k in range(20):
                chunk = f"client {i} message {k};".encode() * (k + 1)
                w.write(chunk)
                want += chunk
            got = await r.readexactly(len(want))
            w.close()
            return got == want

        results = await asyncio.gather(*(client(i) for i in range(200)))
        assert all(results)
        server.close()
        await server.wait_closed()
    run(main())


def test_addresses_match_the_socket(reactor):
    async def main():
        server, addr, made = await start_recording(reactor)
        r, w = await asyncio.open_connection(*addr)
        w.write(b"hello")
        await w.drain()
        t = (await first_data(made)).transport
        assert t.get_extra_info("peername") == w.get_extra_info("sockname")
        assert t.get_extra_info("sockname") == addr
        assert t.get_extra_info("no-such-thing", "dflt") == "dflt"
        assert t.get_protocol() is made[0]
        w.close()
        assert await made[0].lost is None
        assert made[0].events == ["made", "eof", "lost"]
        server.close()
    run(main())


def test_big_write_to_a_slow_reader_pauses_and_resumes_the_protocol(reactor):
    payload = os.urandom(32 * 1024 * 1024)   # more than the kernel buffers of both ends

    async def main():
        server, addr, made = await start_recording(reactor)
        sock = socket.create_connection(addr)
        sock.sendall(b"go")
        p = await first_data(made)
        p.transport.write(payload)
        p.transport.close()             # closes only once everything is sent
        assert p.paused == 1 and p.transport.is_closing()
        assert p.transport.get_write_buffer_size() > 0
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        got = bytearray()
        while True:
            chunk = await loop.sock_recv(sock, 65536)
            if not chunk:
                break
            got += chunk
        assert bytes(got) == payload
        assert await p.lost is None
        assert p.resumed == 1
        sock.close()
        server.close()
    run(main())


def test_writes_after_close_are_dropped_and_abort_discards_the_buffer(reactor):
    async def main():
        server, addr, made = await start_recording(reactor)
        r, w = await asyncio.open_connection(*addr)
        w.write(b"x")
        t = (await first_data(made)).transport
        t.write(b"before")
        t.close()
        t.write(b"after")  # dropped, no error
        assert await r.read() == b"before"
        assert await made[0].lost is None
        w.close()

        sock = socket.create_connection(addr)
        sock.sendall(b"y")
        t = (await first_data(made, 1)).transport
        big = 32 * 1024 * 1024  # more than the kernel buffers hold: most stays in the transport
        t.write(b"z" * big)
        t.abort()
        assert await made[1].lost is None
        sock.settimeout(5)
        received = 0
        try:
            while chunk := sock.recv(65536):
                received += len(chunk)
        except OSError:
            pass  # a reset is fine too
        assert received < big
        sock.close()
        server.close()
    run(main())


def test_pause_reading_holds_data_until_resumed(reactor):
    async def main():
        server, addr, made = await start_recording(reactor)
        r, w = await asyncio.open_connection(*addr)
        w.write(b"first")
        p = await first_data(made)
        p.transport.pause_reading()
        w.write(b"second")
        await w.drain()
        await asyncio.sleep(0.2)
        assert bytes(p.data) == b"first"
        p.transport.resume_reading()
        while bytes(p.data) != b"firstsecond":
            await asyncio.sleep(0.01)
        w.close()
        await p.lost
        server.close()
    run(main())


def test_reset_by_peer_is_one_connection_lost(reactor):
    async def main():
        server, addr, made = await start_recording(reactor)
        sock = socket.create_connection(addr)
        sock.sendall(b"hi")
        await first_data(made)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # RST
        exc = await made[0].lost
        assert exc is None or isinstance(exc, ConnectionError)
        server.close()
    run(main())


def test_a_failing_protocol_costs_only_its_own_connection(reactor):
    class Bomb(Recorder):
        def data_received(self, data):
            if data.startswith(b"boom"):
                raise RuntimeError("protocol bug")
            super().data_received(data)

    async def main():
        loop = asyncio.get_running_loop()
        reported = []
        loop.set_exception_handler(lambda loop, ctx: reported.append(ctx))
        server, addr, made = await start_recording(reactor, Bomb, echo=True)
        r1, w1 = await asyncio.open_connection(*addr)
        r2, w2 = await asyncio.open_connection(*addr)
        w1.write(b"boom")
        assert await r1.read() == b""          # closed by the transport
        w2.write(b"still here")
        assert await r2.readexactly(10) == b"still here"
        assert any(isinstance(c.get("exception"), RuntimeError) for c in reported)
        w2.close()
        server.close()
    run(main())


def test_close_stops_accepting_and_wait_closed_waits_for_the_connections(reactor):
    async def main():
        server, addr, made = await start_recording(reactor, echo=True)
        r, w = await asyncio.open_connection(*addr)
        w.write(b"a")
        assert await r.readexactly(1) == b"a"
        server.close()
        with pytest.raises(OSError):
            await asyncio.open_connection(*addr)
        w.write(b"b")                              # the open one still works
        assert await r.readexactly(1) == b"b"
        closing = asyncio.ensure_future(server.wait_closed())
        await asyncio.sleep(0.1)
        if reactor is TWINS["c"]:
            assert not closing.done()
        w.close()
        await asyncio.wait_for(closing, 5)
    run(main())


async def connected_socket(addr):
    """A connected non-blocking socket, as the backend opens one for a database."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, addr)
    return sock


def test_an_adopted_connection_is_a_transport_like_the_loops(reactor):
    # Database connections: the backend connects a socket and the reactor takes it over.
    async def main():
        loop = asyncio.get_running_loop()
        peers = []

        async def serve_peer(r, w):
            peers.append(w)
            w.write(b"hello")                        # a server that speaks first
            while data := await r.read(65536):
                w.write(data.upper())
            w.close()
        peer = await asyncio.start_server(serve_peer, "127.0.0.1", 0)
        addr = peer.sockets[0].getsockname()[:2]
        sock = await connected_socket(addr)
        local = sock.getsockname()
        transport, protocol = await reactor.adopt(loop, Recorder, sock)
        assert protocol.transport is transport and protocol.events == ["made"]
        assert transport.get_extra_info("peername") == addr
        assert transport.get_extra_info("sockname") == local
        with socket.socket(fileno=os.dup(transport_fd(transport))) as view:
            assert view.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        transport.write(b"abc")
        transport.writelines([b"d", b"ef"])
        while bytes(protocol.data) != b"helloABCDEF":
            await asyncio.sleep(0.01)
        peers[0].close()                             # the database goes away
        assert await asyncio.wait_for(protocol.lost, 5) is None
        assert protocol.events == ["made", "eof", "lost"]
        peer.close()
    run(main())


def transport_fd(transport):
    """The transport's descriptor, found by its local address (the C transport keeps no
    socket object to ask)."""
    local = transport.get_extra_info("sockname")
    for name in os.listdir("/proc/self/fd"):
        try:
            s = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        try:
            if s.type == socket.SOCK_STREAM and s.getsockname() == local:
                return s.detach()
        except OSError:
            pass
        finally:
            s.close()
    raise AssertionError("no descriptor for the transport")


def test_wait_closed_does_not_wait_for_adopted_connections(reactor):
    async def main():
        loop = asyncio.get_running_loop()
        peer = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        sock = await connected_socket(peer.sockets[0].getsockname()[:2])
        transport, protocol = await reactor.adopt(loop, Recorder, sock)
        server, addr, made = await start_recording(reactor, echo=True)
        r, w = await asyncio.open_connection(*addr)
        w.write(b"x")
        assert await r.readexactly(1) == b"x"
        w.close()
        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)   # the database connection is not its
        assert not transport.is_closing()
        transport.close()
        await asyncio.wait_for(protocol.lost, 5)
        peer.close()
    run(main())


def test_a_client_that_sends_nothing_is_served_once_it_does(reactor):
    # TCP_DEFER_ACCEPT: the connection is accepted when its first bytes arrive.
    async def main():
        server, addr = await start(reactor, lambda: Recorder(echo=True))
        r, w = await asyncio.open_connection(*addr)
        await asyncio.sleep(0.3)
        w.write(b"late")
        assert await r.readexactly(4) == b"late"
        w.close()
        server.close()
    run(main())


def test_server_speaks_first_without_defer_accept(reactor):
    class Greeter(Recorder):
        def connection_made(self, transport):
            super().connection_made(transport)
            transport.write(b"hello\n")

    async def main():
        server, addr = await start(reactor, Greeter, speaks_first=False)
        r, w = await asyncio.open_connection(*addr)
        assert await r.readline() == b"hello\n"
        w.close()
        server.close()
    run(main())


def test_start_tls_hands_the_connection_to_a_tls_transport(reactor, test_ca):
    from rdsproxy.tls import client_context, server_context
    server_ctx = server_context(test_ca.server_cert, test_ca.server_key)

    class Upgrader(Recorder):
        """Plain 'STARTTLS' line, then echo over TLS."""
        def data_received(self, data):
            if self.transport is not None and not getattr(self, "tls", False):
                self.transport.write(b"OK\n")
                self.tls = True
                asyncio.ensure_future(self.upgrade())
                return
            self.data += data
            self.transport.write(data.upper())

        async def upgrade(self):
            raw = self.transport
            self.transport = await reactor.start_tls(asyncio.get_running_loop(), raw, self,
                                                     server_ctx, 10.0)

        def connection_made(self, transport):
            if self.transport is None:  # a second call is the TLS transport (C twin)
                super().connection_made(transport)

    async def main():
        server, addr, made = await start_recording(reactor, Upgrader)
        r, w = await asyncio.open_connection(*addr)
        w.write(b"STARTTLS\n")
        assert await r.readline() == b"OK\n"
        await w.start_tls(client_context("verify-full", test_ca.ca_cert),
                          server_hostname="localhost")
        w.write(b"secret")
        assert await r.readexactly(6) == b"SECRET"
        assert made[0].transport.get_extra_info("ssl_object") is not None
        w.close()
        assert await made[0].lost is None
        assert made[0].events.count("made") == 1 and made[0].events[-1] == "lost"
        server.close()
    run(main())


def test_listening_sockets_pass_nodelay_to_accepted_ones():
    from rdsproxy._fastpath.reactor_py import listening_sockets
    speaks_first, = listening_sockets("127.0.0.1", 0, client_speaks_first=True)
    greets_first, = listening_sockets("127.0.0.1", 0, client_speaks_first=False)
    try:
        assert speaks_first.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) > 0
        assert greets_first.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) == 0
        client = socket.create_connection(speaks_first.getsockname())
        client.sendall(b"x")
        speaks_first.setblocking(True)
        accepted, _ = speaks_first.accept()
        # The C reactor sets no option of its own on accepted sockets.
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        accepted.close()
        client.close()
    finally:
        speaks_first.close()
        greets_first.close()


def _relay_half_class():
    """A ClientRelay the C reactor treats as the relay's own (its chunks reach received()
    in C, its connection_lost comes at the end of the batch), recording its life."""
    if TWINS["c"] is None:
        if REQUIRE_CYTHON:
            pytest.fail("RDSPROXY_REQUIRE_CYTHON=1 but reactor_c is not built")
        pytest.skip("reactor_c not built (needs Linux and a compiler)")
    pg_relay_c = importlib.import_module("rdsproxy._fastpath.pg_relay_c")

    class Half(pg_relay_c.ClientRelay):
        def __init__(self, events, close_on_data=True):
            super().__init__()
            self.events = events
            self.close_on_data = close_on_data
            self.peer_half = None
            self.lost = asyncio.get_running_loop().create_future()

        def connection_made(self, transport):
            self.transport = transport

        def startup_data(self, data):   # with no login desk every chunk comes here
            self.events.append(("data", data))
            if self.close_on_data:
                self.transport.close()
                self.events.append(("closed", data))

        def connection_lost(self, exc):
            self.events.append(("lost", exc))
            assert not self.lost.done(), "connection_lost called twice"
            self.lost.set_result(exc)
            if self.peer_half is not None:   # closing a half from inside a delivery
                self.peer_half.transport.close()
    return Half


def test_a_relay_half_is_lost_after_its_batch_never_inside_close():
    Half = _relay_half_class()

    async def main():
        events = []
        made = []

        def factory():
            made.append(Half(events))
            return made[-1]
        server, addr = await start(TWINS["c"], factory)
        s = socket.create_connection(addr)
        s.sendall(b"bye")
        while not made:
            await asyncio.sleep(0.01)
        assert await asyncio.wait_for(made[0].lost, 5) is None
        # close() ran inside received(); connection_lost only after it returned.
        assert events == [("data", b"bye"), ("closed", b"bye"), ("lost", None)]
        assert s.recv(10) == b""            # the socket was closed at close()
        s.close()
        server.close()
        await server.wait_closed()
    run(main())


def test_a_relay_half_closed_outside_a_batch_is_lost_from_the_loop():
    # An idle timeout or an admin's kill closes a session from a timer or a task: no
    # batch is being served, so the loop must deliver its connection_lost.
    Half = _relay_half_class()

    async def main():
        loop = asyncio.get_running_loop()
        events = []
        made = []

        def factory():
            made.append(Half(events, close_on_data=False))
            return made[-1]
        server, addr = await start(TWINS["c"], factory)
        first = socket.create_connection(addr)
        second = socket.create_connection(addr)
        first.sendall(b"1")
        second.sendall(b"2")
        while len(events) < 2:
            await asyncio.sleep(0.01)
        a, b = made
        a.peer_half = b          # a's connection_lost closes b: both must be delivered
        loop.call_soon(a.transport.close)
        assert await asyncio.wait_for(a.lost, 5) is None
        assert await asyncio.wait_for(b.lost, 5) is None
        assert [e for e in events if e[0] == "lost"] == [("lost", None), ("lost", None)]
        first.close()
        second.close()
        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)   # both counted out of the tally
    run(main())


def test_the_relay_writes_to_the_c_transport_in_c():
    # FdTransport derives from relay_c.Wire: without it every chunk's write would fall
    # back to a Python method call, correct but slower, and no other test would notice.
    _relay_half_class()
    relay_c = importlib.import_module("rdsproxy._fastpath.relay_c")
    assert issubclass(TWINS["c"].FdTransport, relay_c.Wire)
