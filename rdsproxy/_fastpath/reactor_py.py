"""Sockets of the relay: listening, accepting, and the transports client sessions and their
database connections talk through.

The twin of `reactor_c` with the same API: here the event loop's own machinery serves
(`loop.create_server` on the given sockets, `loop.start_tls`), which is the behaviour the C
reactor must reproduce. The C twin owns its accepted sockets instead: one epoll set of its
own, registered with the loop as a single reader, and transports that read, write and
close the file descriptors directly (see reactor_c.pyx for why).

    server = await serve(loop, protocol_factory, sockets, client_speaks_first=True)
    sock, _ = await connect_socket(loop, host, port)
    transport, protocol = await adopt(loop, protocol_factory, sock)
    ...
    tls_transport = await start_tls(loop, transport, protocol, sslcontext, handshake_timeout)
    server.close(); await server.wait_closed()
"""
from __future__ import annotations

import socket

BACKLOG = 4096
# TCP_DEFER_ACCEPT: a connection is accepted once its first bytes have arrived (or after
# this many seconds), so accepting and reading the startup packet take one wakeup. Only for
# protocols where the client speaks first (PostgreSQL, not MySQL).
DEFER_ACCEPT_SECONDS = 45


def listening_sockets(host: str | None, port: int, *, client_speaks_first: bool = False,
                      backlog: int = BACKLOG) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for `host` ("" or "0.0.0.0"/"::" for all
    addresses) and `port` (0: any free port), as `loop.create_server` would make them."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    sockets, seen = [], set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Accepted sockets inherit it on Linux (no setsockopt per client there).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if family == socket.AF_INET6:
                # Both families are bound separately, as create_server does.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if client_speaks_first and hasattr(socket, "TCP_DEFER_ACCEPT"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_SECONDS)
            if port == 0 and len(sockets) > 1:
                # "Any free port" on several addresses: the same port on all of them.
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def connect_socket(loop, host: str, port: int, first=None):
    """A connected non-blocking socket (for adopt) to the first of `host`'s addresses that
    answers; with `first` (an async step on the socket), also the first on which that step
    works. Returns (socket, what `first` returned)."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last_error: Exception | None = None
    for family, type_, proto, _, address in infos:
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
            result = await first(sock) if first is not None else None
        except OSError as exc:
            sock.close()
            last_error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock, result
    raise last_error or OSError(f"cannot resolve {host}")


class Listening:
    """The servers of one endpoint: `sockets`, `close()`, `await wait_closed()`."""

    def __init__(self, servers, sockets):
        self._servers = servers
        self.sockets = sockets

    def close(self) -> None:
        for server in self._servers:
            server.close()

    async def wait_closed(self) -> None:
        for server in self._servers:
            await server.wait_closed()


async def serve(loop, protocol_factory, sockets, *, client_speaks_first: bool = False):
    """Accept connections on `sockets` (from listening_sockets), one protocol each."""
    servers = [await loop.create_server(protocol_factory, sock=sock, backlog=BACKLOG)
               for sock in sockets]
    return Listening(servers, sockets)


async def adopt(loop, protocol_factory, sock):
    """A transport and protocol for `sock`, a connected TCP socket (a database connection
    the caller opened): what loop.create_connection(protocol_factory, sock=sock) returns."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return await loop.create_connection(protocol_factory, sock=sock)


async def start_tls(loop, transport, protocol, sslcontext, handshake_timeout: float, *,
                    early: bytes = b"", feed=None):
    """Server-side TLS on an accepted connection whose protocol stays `protocol`; returns
    the TLS transport. The protocol may see connection_made(tls_transport) first (the C
    twin hands the socket to the loop), which it must take as the same connection.
    `early`: bytes of the ClientHello read already, which `feed(transport, early)` hands to
    the TLS layer once start_tls has installed it."""
    if early:
        # start_tls installs its protocol in its first step and schedules that protocol's
        # connection_made: the early bytes go right after.
        loop.call_soon(loop.call_soon, feed, transport, early)
    return await loop.start_tls(transport, protocol, sslcontext, server_side=True,
                                ssl_handshake_timeout=handshake_timeout)
