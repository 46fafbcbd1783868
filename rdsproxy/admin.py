"""The admin endpoint: a small read-only HTTP server for operators and scripts.

GET /targets  describe-db-proxy-targets as JSON ({"Targets": [...]}, with pool figures)
GET /stats    the proxy's counters and gauges
GET /metrics  RDS Proxy's CloudWatch metrics in Prometheus's text format (for scrapers)
GET /health   200 "ok" while the proxy runs (liveness: for load balancers and orchestrators)
GET /ready    200 when every endpoint has a target to route to, 503 otherwise (readiness),
              with which target serves each endpoint as JSON

HTTP/1.1 with one request per connection; no dependency beyond orjson. It listens where
`[admin] listen` says: keep it on a private address, it is not authenticated.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

import orjson

log = logging.getLogger("rdsproxy.admin")

MAX_REQUEST_HEAD = 8192
READ_TIMEOUT = 5.0


def _response(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode("ascii") + body


def _json(obj) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)


class AdminServer:
    """`routes`: path -> the object it serves as JSON; `ready`: () -> (ready, object) for
    /ready; `texts`: path -> (content type, () -> the text it serves)."""

    def __init__(self, routes: dict[str, Callable[[], object]],
                 ready: Callable[[], tuple[bool, object]] | None = None,
                 texts: dict[str, tuple[str, Callable[[], str]]] | None = None):
        self.routes = routes
        self.ready = ready
        self.texts = texts or {}
        self.server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._serve, host, port)
        return self.server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            try:
                await asyncio.wait_for(self.server.wait_closed(), 1.0)
            except asyncio.TimeoutError:
                pass
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            writer.write(self._answer(head))
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        except Exception:  # noqa: BLE001 - one bad request must not stop the endpoint
            log.exception("admin request failed")
        finally:
            writer.close()

    def _answer(self, head: bytes) -> bytes:
        if len(head) > MAX_REQUEST_HEAD:
            return _response("431 Request Header Fields Too Large", b"")
        try:
            method, target, _version = head.split(b"\r\n", 1)[0].decode("ascii").split(" ", 2)
        except (UnicodeDecodeError, ValueError):
            return _response("400 Bad Request", b'{"error": "malformed request line"}')
        path = target.split("?", 1)[0]
        if method != "GET":
            return _response("405 Method Not Allowed", b'{"error": "only GET"}')
        if path == "/health":
            return _response("200 OK", b"ok\n", "text/plain")
        if path == "/ready" and self.ready is not None:
            ready, body = self.ready()
            return _response("200 OK" if ready else "503 Service Unavailable", _json(body))
        if path in self.texts:
            content_type, text = self.texts[path]
            return _response("200 OK", text().encode("utf-8"), content_type)
        route = self.routes.get(path)
        if route is None:
            known = ", ".join(sorted([*self.routes, *self.texts, "/health"])
                              + (["/ready"] if self.ready else []))
            return _response("404 Not Found", orjson.dumps({"error": f"unknown path; try {known}"}))
        return _response("200 OK", _json(route()))
