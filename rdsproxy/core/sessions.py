"""What every engine's client and server sessions do alike, whatever their wire protocol.

Mixins, listed before asyncio.Protocol among a session class's bases (whose flow-control
methods are no-ops). A client session supplies `engine`, `ledger`, `phase`, `server`,
`route_role`, `key`, `on_connection(conn)`, `on_borrow_error(exc)` and
`_return_after_exit(server)`; a server connection supplies `client`.
"""
from __future__ import annotations

import logging
from enum import Enum

from .._fastpath import Phase
from ..auth.iam import verify_token
from ..logs import session_lines
from .pool import PoolClosed


log = logging.getLogger("rdsproxy.auth")


class CloseReason(Enum):
    """Why the core ends a client's connection, and the text the client is shown; each
    engine supplies the error code in its protocol (BaseEngine.close_codes)."""
    IDLE_TIMEOUT = "terminating connection due to idle_client_timeout"
    LOGIN_TIMEOUT = "canceling authentication due to timeout"
    LOGINS_PER_ADDRESS = ("too many connections logging in from this address "
                          "(max_logins_per_address)")
    SHUTDOWN = "terminating connection because the proxy is shutting down"
    ADMIN_KILL = "terminating connection due to administrator command"   # the console's KILL


def _pause_reading(peer) -> None:
    if peer is not None and peer.transport is not None:
        peer.transport.pause_reading()


def _resume_reading(peer) -> None:
    if peer is not None and peer.transport is not None:
        peer.transport.resume_reading()


def describe_peer(peername, unknown_host: str | None = None) -> tuple[str, str]:
    """(peer "host:port", peer_host) of a transport's peername. A peer without an address
    is named by `unknown_host`, or else by what it is."""
    if isinstance(peername, tuple):
        return f"{peername[0]}:{peername[1]}", peername[0]
    peer = "?" if peername is None else str(peername)
    return peer, peer if unknown_host is None else unknown_host


class ClientSide:
    __slots__ = ()
    # Why the proxy ended the session (a CloseReason's name or the error text the client
    # was sent); None: the client went away by itself.
    close_reason = None

    def session_opened(self, auth: str) -> None:
        """The login line: who logged in, where from, and how."""
        session_lines.login(self.engine.name, self.peer, self.user, self.database,
                            bool(self.tls), auth)

    def session_closed(self, exc) -> None:
        """The close line: how long the client stayed and why it left (from
        connection_lost)."""
        engine = self.engine
        reason = self.close_reason
        if reason is None:
            reason = "client quit" if exc is None else f"connection error: {exc}"
        # To the second: both ends are the housekeeper's clock.
        duration = round(max(0.0, engine.clock - self.connected_at))
        session_lines.close(engine.name, self.peer, self.user, self.database, duration, reason)

    def note_addresses(self, transport, unknown_host: str | None = None) -> None:
        """peer ("host:port") and peer_host of a new connection (local_address() gives the
        other end, when asked: only IAM tokens name it)."""
        self.peer, self.peer_host = describe_peer(transport.get_extra_info("peername"),
                                                  unknown_host)

    def local_address(self) -> tuple[str, int]:
        """(host, port) the client reached: ("", 0) when the transport cannot tell."""
        sock = self.transport.get_extra_info("sockname") if self.transport is not None else None
        return (sock[0], sock[1]) if isinstance(sock, tuple) else ("", 0)

    def check_iam_token(self, token: str, user: str):
        """The principal that signed the IAM token `user` presented (TokenError if none did).
        The token may name the endpoint's configured host names or the address the client
        really reached (so an endpoint listening on 0.0.0.0 accepts tokens for its own)."""
        engine = self.engine
        names = engine.config.iam_host_names(self.endpoint)
        local_host, local_port = self.local_address()
        if local_host:
            names.append(local_host)
        principal = verify_token(token, host=names, port=local_port, user=user,
                                 principals=engine.accounts.principals,
                                 region=engine.accounts.iam_region)
        log.info("client %s (user %s): IAM token of %s accepted", self.peer, user,
                 principal.access_key_id)
        return principal

    def enter(self, phase: int) -> None:
        """Move to `phase` (a Phase), and the ledger's gauges with it. (The PostgreSQL
        client's is the relay's, compiled; both ask the ledger.)"""
        self.phase = self.ledger.move(self.phase, phase)

    def detach(self, server, phase: int = Phase.FREE) -> None:
        """`server` no longer serves this client, which moves to `phase`: the connection
        and the holding phases change together. (The relay's own return, in C, does the
        same inline.)"""
        self.server = None
        server.client = None
        self.enter(phase)

    def release_on_exit(self) -> None:
        """The client is gone in a phase other than FREE: it stops waiting, and the
        connection it held goes back clean or is closed (a connection being synced or
        checked for it comes back through that callback)."""
        if self.phase == Phase.WAITING:
            self.engine.router.cancel_wait(self)
        server = self.server
        if server is not None:
            self.detach(server)
            self._return_after_exit(server)
        self.enter(Phase.FREE)

    def borrow(self) -> None:
        """A connection for this client's next request: now (on_connection) or later
        (on_connection or on_borrow_error), through the router."""
        self.enter(Phase.WAITING)
        self.borrow_deadline = None  # a new borrow gets a new deadline
        try:
            conn = self.engine.router.acquire(self.route_role, self.key, self)
        except PoolClosed as exc:
            self.on_borrow_error(exc)
            return
        if conn is not None:
            self.on_connection(conn)

    # asyncio flow control: while the client cannot keep up, stop reading from its server.
    def pause_writing(self) -> None:
        _pause_reading(self.server)

    def resume_writing(self) -> None:
        _resume_reading(self.server)


class ServerSide:
    __slots__ = ()

    discarded = False   # the pool has taken back its budget slot (Pool.discard)

    # asyncio flow control: while the server cannot keep up, stop reading from its client.
    def pause_writing(self) -> None:
        _pause_reading(self.client)

    def resume_writing(self) -> None:
        _resume_reading(self.client)
