"""The admin console's commands, whatever the wire: SHOW's rows, PAUSE, RESUME, KILL, RELOAD.

Engine-agnostic. An admin reaches it by logging in to the virtual database `rdsproxy`
(PgBouncer's console, under the proxy's name); the engine's wire module turns its Answers
into protocol messages (engines/postgres/console.py), and ConsoleSession carries one
admin's connection from the engine's login to its end.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from .._fastpath import Phase
from .sessions import CloseReason

log = logging.getLogger("rdsproxy.console")

CONSOLE_DATABASE = "rdsproxy"
POOL_MODE = "transaction"
# Phases in which a client holds a database connection (lent by a pool).
_HOLDING = (Phase.SYNCING, Phase.ACTIVE, Phase.PINNED)
_PAUSE_POLL = 0.05


class ConsoleError(Exception):
    """A command the console cannot run; its text is the admin's error message."""


@dataclass
class Answer:
    """What a command answers: rows of text values (None for NULL) under `columns`, the
    command tag, and a notice to show first (empty: none)."""
    tag: str
    columns: tuple = ()
    rows: tuple = ()
    notice: str = ""


def parse_command(text: str) -> tuple[str, str | None]:
    """(verb, argument or None) of one console command: "SHOW POOLS" -> ("SHOW POOLS",
    None), "pause appdb;" -> ("PAUSE", "appdb")."""
    statements = [s for s in text.split(";") if s.strip()]
    if len(statements) > 1:
        raise ConsoleError("the admin console runs one command at a time")
    words = statements[0].split() if statements else []
    if not words:
        raise ConsoleError("empty command")
    verb = words[0].upper()
    if verb == "SHOW":
        if len(words) != 2:
            raise ConsoleError("SHOW needs one of: " + ", ".join(_SHOW))
        return f"SHOW {words[1].upper()}", None
    if verb not in ("PAUSE", "RESUME", "KILL", "RELOAD"):
        raise ConsoleError(f"unknown command {words[0]!r}; the console knows SHOW "
                           f"{'|'.join(_SHOW)}, PAUSE [db], RESUME [db], KILL <client id|db>, RELOAD")
    if len(words) > 2 or (verb == "RELOAD" and len(words) > 1):
        raise ConsoleError(f"too many arguments for {verb}")
    if verb == "KILL" and len(words) < 2:
        raise ConsoleError("KILL needs a client id (SHOW CLIENTS) or a database name")
    return verb, _unquote(words[1]) if len(words) > 1 else None


def _unquote(word: str) -> str:
    return word[1:-1] if len(word) > 1 and word[0] == word[-1] == '"' else word


def _text(value) -> str | None:
    return None if value is None else str(value)


class Console:
    """The commands, run against one engine; `reload` is what SIGHUP does (Proxy.reload)."""

    def __init__(self, engine, reload):
        self.engine = engine
        self.reload = reload
        self._shows = {f"SHOW {name}": getattr(self, f"show_{name.lower()}") for name in _SHOW}

    def is_admin(self, user: str) -> bool:
        return user in self.engine.config.admin_users

    async def run(self, text: str) -> Answer:
        verb, argument = parse_command(text)
        if verb.startswith("SHOW "):
            show = self._shows.get(verb)
            if show is None:
                raise ConsoleError(f"unknown {verb!r}; SHOW takes one of: {', '.join(_SHOW)}")
            columns, rows = show()
            return Answer("SHOW", columns, tuple(tuple(map(_text, row)) for row in rows))
        if verb == "PAUSE":
            return await self.pause(argument)
        if verb == "RESUME":
            return self.resume(argument)
        if verb == "KILL":
            return self.kill(argument)
        await self.reload()
        log.info("reloaded by the admin console")
        return Answer("RELOAD")

    # -- what SHOW answers -------------------------------------------------------------
    def _wall(self, loop_time: float) -> str:
        """A loop timestamp as a wall-clock UTC time."""
        stamp = time.time() - (self.engine.loop.time() - loop_time)
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp))

    def _waited(self, client, now: float) -> float:
        """Seconds `client` has waited for a connection (0 when it is not waiting)."""
        deadline = client.borrow_deadline
        if client.phase != Phase.WAITING or deadline is None:
            return 0.0
        return max(0.0, now - (deadline - self.engine.router.borrow_timeout))

    def _idle_connections(self):
        for pool in self.engine.router.pools.values():
            for key, conn in pool.core.idle_items():
                yield key, conn

    def _paused(self, database) -> bool:
        router = self.engine.router
        return router.pausing and router.is_paused((None, database))

    def show_pools(self):
        engine, now = self.engine, self.engine.loop.time()
        pools: dict = {}
        empty = {"cl_active": 0, "cl_waiting": 0, "sv_active": 0, "sv_idle": 0, "maxwait": 0.0}

        def entry(user, database):
            return pools.setdefault((database, user), dict(empty))

        for client in engine.clients:
            if client.state != engine.ready_state or client.database == CONSOLE_DATABASE:
                continue
            row = entry(client.user, client.database)
            if client.phase == Phase.WAITING:
                row["cl_waiting"] += 1
                row["maxwait"] = max(row["maxwait"], self._waited(client, now))
            else:
                row["cl_active"] += 1
            if client.phase in _HOLDING:
                row["sv_active"] += 1
        for key, _conn in self._idle_connections():
            entry(key[0], key[1])["sv_idle"] += 1
        columns = ("database", "user", "cl_active", "cl_waiting", "sv_active", "sv_idle",
                   "sv_used", "sv_login", "maxwait", "maxwait_us", "pool_mode", "paused")
        rows = []
        for (database, user), row in sorted(pools.items()):
            maxwait = row["maxwait"]
            rows.append((database, user, row["cl_active"], row["cl_waiting"], row["sv_active"],
                         row["sv_idle"], 0, 0, int(maxwait), int(maxwait % 1 * 1e6), POOL_MODE,
                         int(self._paused(database))))
        return columns, rows

    def show_clients(self):
        engine, now = self.engine, self.engine.loop.time()
        columns = ("type", "id", "user", "database", "state", "phase", "addr", "port",
                   "connect_time", "wait", "link", "pin_reason", "tls")
        rows = []
        for client in sorted(engine.clients, key=lambda c: c.connected_at):
            if client.state == engine.closed_state:
                continue
            if client.state != engine.ready_state:
                state = "login"
            else:
                state = "waiting" if client.phase == Phase.WAITING else "active"
            host, _, port = client.peer.rpartition(":")
            server = client.server
            rows.append(("C", engine.client_id(client), client.user, client.database, state,
                         Phase.NAMES[client.phase], host, port, self._wall(client.connected_at),
                         round(self._waited(client, now), 3),
                         engine.server_id(server) if server is not None else None,
                         client.pin_reason, int(bool(client.tls))))
        return columns, rows

    def show_servers(self):
        columns = ("type", "user", "database", "state", "target", "addr", "port",
                   "connect_time", "pid", "link")
        engine = self.engine
        servers = [(conn, "active", engine.client_id(client)) for client in engine.clients
                   if (conn := client.server) is not None]
        servers += [(conn, "idle", None) for _key, conn in self._idle_connections()]
        rows = []
        for conn, state, link in sorted(servers, key=lambda s: s[0].created_at):
            host, port = conn.address[:2]
            rows.append(("S", conn.key[0], conn.key[1], state, conn.target_name, host, port,
                         self._wall(conn.created_at), engine.server_id(conn), link))
        return columns, rows

    def show_stats(self):
        """The proxy's figures (what the admin endpoint's /stats gives), one per row."""
        engine = self.engine
        figures = dict(engine.metrics.snapshot())
        figures.update(engine.stats())
        rows = []
        for name, value in figures.items():
            if isinstance(value, dict):
                rows += [(f"{name}.{sub}", v) for sub, v in value.items()
                         if isinstance(v, (int, float))]
            elif isinstance(value, (int, float)):
                rows.append((name, value))
        return ("name", "value"), rows

    def show_targets(self):
        """describe-targets, one row per target."""
        columns = ("target", "endpoint", "port", "role", "state", "reason", "description",
                   "in_use", "idle", "open", "max", "waiting", "pinned")
        rows = []
        for t in self.engine.failover.describe_targets():
            health, pool = t["TargetHealth"], t.get("Pool", {})
            rows.append((t["RdsResourceId"], t["Endpoint"], t["Port"], t["Role"],
                         health["State"], health["Reason"] or None,
                         health["Description"] or None,
                         *(pool.get(k) for k in ("InUse", "Idle", "Open", "Max", "Waiting",
                                                 "Pinned"))))
        return columns, rows

    # -- commands ----------------------------------------------------------------------
    def _holding(self, database) -> int:
        """Clients of `database` (None: any) holding a database connection."""
        return sum(1 for c in self.engine.clients if c.phase in _HOLDING
                   and (database is None or c.database == database))

    async def pause(self, database: str | None) -> Answer:
        """New transactions wait; returns once no connection is lent for `database`, or
        after shutdown_timeout (a notice then says how many still are)."""
        engine = self.engine
        engine.router.pause(database)
        what = "every database" if database is None else f"database {database!r}"
        log.info("admin console: %s paused", what)
        deadline = engine.loop.time() + engine.config.shutdown_timeout
        while self._holding(database) and engine.loop.time() < deadline:
            await asyncio.sleep(_PAUSE_POLL)
        holding = self._holding(database)
        notice = ""
        if holding:
            notice = (f"{what} is paused, but {holding} client(s) still hold a connection "
                      f"after {engine.config.shutdown_timeout:g} s (shutdown_timeout)")
        return Answer("PAUSE", notice=notice)

    def resume(self, database: str | None) -> Answer:
        router = self.engine.router
        if database is not None and router.pausing and router.paused_databases is None:
            raise ConsoleError("every database is paused: RESUME without a name ends that")
        if not router.pausing or (database is not None and not self._paused(database)):
            raise ConsoleError("not paused" if database is None
                               else f"database {database!r} is not paused")
        router.resume(database)
        log.info("admin console: %s resumed", "every database" if database is None
                 else f"database {database!r}")
        return Answer("RESUME")

    def kill(self, target: str) -> Answer:
        """Close one client (by its id, SHOW CLIENTS') or every client of a database."""
        engine = self.engine
        if target.isdigit():
            victims = [c for c in engine.clients if engine.client_id(c) == int(target)
                       and c.state != engine.closed_state]
            if not victims:
                raise ConsoleError(f"no client with id {target}")
        else:
            if target == CONSOLE_DATABASE:
                raise ConsoleError("KILL does not close console sessions")
            victims = [c for c in engine.clients if c.database == target
                       and c.state != engine.closed_state]
            closed = sum(pool.close_idle(lambda key: key[1] == target)
                         for pool in engine.router.pools.values())
            log.info("admin console: closed %d idle connection(s) to database %r", closed, target)
        for client in victims:
            log.info("admin console: closing client %s (user %s, database %s)", client.peer,
                     client.user, client.database)
            engine.close_client(client, CloseReason.ADMIN_KILL)
        return Answer("KILL")


_SHOW = ("POOLS", "CLIENTS", "SERVERS", "STATS", "TARGETS")


class ConsoleSession(asyncio.Protocol):
    """One admin's console connection, once logged in: it takes the transport over from
    the client session, which stays registered (counted, timed out and closed as any
    client). `wire` is the engine's sans-IO console protocol; commands run one at a time."""

    def __init__(self, console: Console, client, wire):
        self.console = console
        self.client = client
        self.wire = wire
        self._busy = False

    def data_received(self, data) -> None:
        self.client.activity += 1   # for idle_client_timeout
        self.wire.receive_data(bytes(data))
        self._next()

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        self.client.connection_lost(exc)

    def _next(self) -> None:
        while not self._busy:
            request = self.wire.next_request()
            if request is None:
                return
            kind, payload = request
            if kind == "close":
                self.client.close()
                return
            if kind == "reply":   # the wire answers this one itself
                self._write(payload)
                continue
            self._busy = True
            self.console.engine.loop.create_task(self._run(payload))

    async def _run(self, text: str) -> None:
        try:
            out = self.wire.answer(await self.console.run(text))
        except ConsoleError as exc:
            out = self.wire.error(str(exc))
        except Exception as exc:  # noqa: BLE001 - a failed RELOAD must not end the proxy
            log.exception("admin console: %r failed", text)
            out = self.wire.error(f"{text.strip()} failed: {exc}")
        self._busy = False
        self._write(out)
        self._next()

    def _write(self, data: bytes) -> None:
        transport = self.client.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)
