"""A reference point, not a pooler: the least work a uvloop + Python proxy can do per pgbench
transaction and per connection, so the report can show how much of rdsproxy's gap to
PgBouncer is rdsproxy's own and how much is Python and uvloop.

It logs clients in with md5 (a fresh salt, a real check), answers them with the greeting the
server gave its first connection, and hands each request to one of `--pool` pre-opened
server connections, returned when a chunk from the server ends in ReadyForQuery 'I'.
There is no framing, pinning, parameter tracking, error handling or failover, so it is only
correct for pgbench's own workloads; never point anything else at it.

    python3 -m bench.floor --listen 127.0.0.1:6500 --server 127.0.0.1:5432 \
        --user bench --password secret --dbname bench --pool 20
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import os
import struct
from collections import deque

import uvloop

from rdsproxy._fastpath import split_messages
from rdsproxy.auth.md5 import md5_response
from rdsproxy.engines.postgres.protocol import message

AUTH_OK = b"\0\0\0\0"
AUTH_MD5 = b"\0\0\0\x05"
READY_IDLE_TAIL = b"Z\x00\x00\x00\x05I"
TERMINATE = b"X\x00\x00\x00\x04"


class Floor:
    def __init__(self, user: str, password: str):
        self.user = user
        self.password = password
        self.greeting = b""
        self.idle: deque = deque()
        self.waiters: deque = deque()

    def release(self, server) -> None:
        if self.waiters:
            self.waiters.popleft().attach(server)
        else:
            self.idle.append(server)


class ServerSide(asyncio.Protocol):
    def __init__(self, floor: Floor, dbname: str, ready: asyncio.Future):
        self.floor = floor
        self.dbname = dbname
        self.ready = ready
        self.client = None
        self.buf = b""

    def connection_made(self, transport):
        self.transport = transport
        params = b"user\0" + self.floor.user.encode() + b"\0database\0" + self.dbname.encode() + b"\0\0"
        transport.write(struct.pack("!ii", 8 + len(params), 196608) + params)

    def data_received(self, data):
        if self.ready.done():
            client = self.client
            client.transport.write(data)
            if data.endswith(READY_IDLE_TAIL):
                self.client = client.server = None
                self.floor.release(self)
            return
        self.buf += data
        self._login()

    def _login(self):
        messages, used = split_messages(self.buf)
        self.buf = self.buf[used:]
        for mtype, payload in messages:
            if mtype == ord("E"):
                self.ready.set_exception(ConnectionError(payload.replace(b"\0", b" ").decode()))
                return
            if mtype == ord("R") and payload[:4] == AUTH_MD5:
                answer = md5_response(self.floor.password, self.floor.user, payload[4:8]) + b"\0"
                self.transport.write(message(b"p", answer))
            elif mtype == ord("R") and payload[:4] != AUTH_OK:
                self.ready.set_exception(ConnectionError("the floor speaks md5 or trust only"))
                return
            elif mtype == ord("Z"):
                if not self.floor.greeting:
                    statuses = b"".join(message(b"S", p) for t, p in messages if t == ord("S"))
                    self.floor.greeting = (message(b"R", AUTH_OK) + statuses
                                           + message(b"K", os.urandom(8)) + message(b"Z", payload))
                self.ready.set_result(None)


class ClientSide(asyncio.Protocol):
    def __init__(self, floor: Floor):
        self.floor = floor
        self.server = None
        self.pending: list = []
        self.salt = b""
        self.logged_in = False

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if not self.logged_in:
            if not self.salt:  # the startup packet
                self.salt = os.urandom(4)
                self.transport.write(message(b"R", AUTH_MD5 + self.salt))
                return
            expected = md5_response(self.floor.password, self.floor.user, self.salt) + b"\0"
            if not hmac.compare_digest(data[5:], expected):
                self.transport.close()
                return
            self.logged_in = True
            self.transport.write(self.floor.greeting)
            return
        if data.endswith(TERMINATE):
            data = data[:-5]
            self.transport.close()
        if not data:
            return
        if self.server is not None:
            self.server.transport.write(data)
            return
        self.pending.append(data)
        if self.floor.idle:
            self.attach(self.floor.idle.popleft())
        elif len(self.pending) == 1:
            self.floor.waiters.append(self)

    def attach(self, server):
        self.server = server
        server.client = self
        server.transport.write(b"".join(self.pending))
        self.pending = []


async def serve(args) -> None:
    loop = asyncio.get_running_loop()
    floor = Floor(args.user, args.password)
    server_host, server_port = args.server.rsplit(":", 1)
    for _ in range(args.pool):
        ready = loop.create_future()
        _, server = await loop.create_connection(lambda: ServerSide(floor, args.dbname, ready),
                                                 server_host, int(server_port))
        await ready
        floor.idle.append(server)
    host, port = args.listen.rsplit(":", 1)
    await loop.create_server(lambda: ClientSide(floor), host, int(port), backlog=4096)
    print(f"floor listening on {args.listen}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True)
    p.add_argument("--server", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--dbname", required=True)
    p.add_argument("--pool", type=int, default=20)
    uvloop.run(serve(p.parse_args()))


if __name__ == "__main__":
    main()
