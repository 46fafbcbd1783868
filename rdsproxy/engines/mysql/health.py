"""MySQL / MariaDB health probe for rdsproxy.core.targets: is the target up, is it the writer?

One probe = a fresh login + `SELECT @@read_only, @@innodb_read_only, @@max_connections`
+ COM_QUIT. Either read-only flag makes the target a READER. Failures become ProbeError with
RDS Proxy's reasons, as the PostgreSQL probe classifies them: refused / reset / closed ->
CONNECTION_FAILED, timeout / unresolvable / no route -> UNREACHABLE, access denied (1045,
1044, 1698) -> AUTH_FAILURE. A fresh connection each time follows DNS changes.

The probe's query carries the comment `rdsproxy-health` and its connection the attribute
program_name=rdsproxy-health, so it can be told apart from the pool's connections (in SHOW
PROCESSLIST, while it runs its query): like RDS Proxy's monitoring connections it is
outside the connection budget.
"""
from __future__ import annotations

import asyncio

from ...core.targets import (AUTH_FAILURE, CONNECTION_FAILED, ProbeError, ProbeResult, Role,
                             Target, probe_failure, run_probe)
from . import protocol as p
from .backend import first_row, open_server_connection
from .server_login import LoginError
from .protocol import ServerError

PROBE_MARK = "rdsproxy-health"
PROBE_SQL = f"SELECT /* {PROBE_MARK} */ @@read_only, @@innodb_read_only, @@max_connections"
_MAX_PAYLOAD = 64 * 1024
_AUTH_CODES = {1045, 1044, 1698, 1251}


async def probe(target: Target, *, user: str, password: str, database: str | None,
                timeout: float, loop=None, ssl_context=None, on_server=None) -> ProbeResult:
    """Log in to `target`, ask its role and max_connections. `on_server(conn)` sees the
    logged-in connection (the engine learns the server's version and capabilities)."""
    loop = loop or asyncio.get_running_loop()
    where = f"{target.host}:{target.port}"

    def connect():
        return open_server_connection(
            loop, target.name, target.host, target.port, user=user, password=password,
            database=database, capabilities=p.CLIENT_DEPRECATE_EOF, charset=p.CHARSET_UTF8MB4,
            timeout=timeout, max_payload=_MAX_PAYLOAD, ssl_context=ssl_context,
            program=PROBE_MARK)

    async def ask(conn) -> ProbeResult:
        if on_server is not None:
            on_server(conn)
        packets: list = []
        await conn.query(p.com_query(PROBE_SQL), packets)
        try:
            read_only, innodb_read_only, max_conn = first_row(packets, conn.capabilities)
            reader = read_only not in (b"0", None) or innodb_read_only not in (b"0", None)
            return ProbeResult(role=Role.READER if reader else Role.WRITER,
                               max_connections=int(max_conn))
        except (ValueError, TypeError, p.ProtocolViolation) as exc:
            raise ProbeError(CONNECTION_FAILED,
                             f"{where}: unexpected health query answer: {exc}") from None

    def classify(exc: BaseException, stage: str) -> ProbeError:
        if isinstance(exc, ServerError):
            reason = AUTH_FAILURE if exc.code in _AUTH_CODES else CONNECTION_FAILED
            return ProbeError(reason, f"{where}: {exc.message} (error {exc.code}, "
                                      f"SQLSTATE {exc.sqlstate})")
        if isinstance(exc, LoginError):
            return ProbeError(CONNECTION_FAILED, f"{where}: {exc}")
        return probe_failure(exc, where, timeout, stage)

    return await run_probe(connect, ask, classify, timeout, loop)
