"""PostgreSQL health probe for rdsproxy.core.targets: is the target up, and is it the writer?

Charter: one probe = one fresh login + `SELECT pg_is_in_recovery(),
current_setting('max_connections')` + close. A standby (in recovery) is a READER, anything
else the WRITER. Failures are raised as ProbeError with RDS Proxy's reason codes:
refused / reset / closed -> CONNECTION_FAILED, timeout / unresolvable / no route ->
UNREACHABLE, SQLSTATE class 28 (bad password, no pg_hba entry) -> AUTH_FAILURE.

Why a fresh connection each time rather than a persistent one: the probe must follow
the target's host name. After a DNS-based failover a kept connection would still be
talking to the old server (and report its old role); a new connection re-resolves
the name. It also proves that logins work, which is what clients need.
"""
from __future__ import annotations

import asyncio
import struct
from typing import Awaitable, Callable

from ...core.targets import (AUTH_FAILURE, CONNECTION_FAILED, ProbeError, ProbeResult, Role,
                             Target, probe_failure, run_probe)
from .backend import open_server_connection
from .protocol import ServerError, parse_datarow

__all__ = ["probe", "make_probe", "PROBE_SQL"]

PROBE_SQL = "SELECT pg_is_in_recovery(), current_setting('max_connections')"
# The probe's rows are two tiny columns; anything bigger is a broken server.
_MAX_MESSAGE = 64 * 1024


async def probe(target: Target, *, user: str, password: str, database: str, timeout: float,
                loop=None, application_name: str = "rdsproxy-health", ssl_context=None,
                tls_mode: str = "disable") -> ProbeResult:
    """Log in to `target` (by host name, resolved now), ask its role and max_connections."""
    loop = loop or asyncio.get_running_loop()
    where = f"{target.host}:{target.port}"

    def connect():
        return open_server_connection(
            loop, target.name, target.host, target.port, user=user, password=password,
            database=database, params={"application_name": application_name},
            timeout=timeout, max_message_size=_MAX_MESSAGE, ssl_context=ssl_context,
            tls_mode=tls_mode)

    async def ask(conn) -> ProbeResult:
        rows: list = []
        await conn.query_internal(PROBE_SQL, rows)
        if len(rows) != 1:
            raise ProbeError(CONNECTION_FAILED, f"{where}: health query returned {len(rows)} rows")
        try:
            in_recovery, max_conn = parse_datarow(rows[0])
            role = Role.READER if in_recovery == b"t" else Role.WRITER
            return ProbeResult(role=role, max_connections=int(max_conn))
        except (ValueError, TypeError, struct.error) as exc:
            raise ProbeError(CONNECTION_FAILED,
                             f"{where}: unexpected health query answer: {exc}") from None

    def classify(exc: BaseException, stage: str) -> ProbeError:
        if isinstance(exc, ServerError):
            state = exc.sqlstate
            reason = AUTH_FAILURE if state.startswith("28") else CONNECTION_FAILED
            return ProbeError(reason, f"{where}: {exc.fields.get('M', str(exc))} (SQLSTATE {state})")
        return probe_failure(exc, where, timeout, stage)

    return await run_probe(connect, ask, classify, timeout, loop)


def make_probe(*, user: str, password: str, database: str = "postgres", timeout: float,
               loop=None) -> Callable[[Target], Awaitable[ProbeResult]]:
    """The `probe` argument of TargetGroup, bound to one login."""
    async def bound(target: Target) -> ProbeResult:
        return await probe(target, user=user, password=password, database=database,
                           timeout=timeout, loop=loop)
    return bound
