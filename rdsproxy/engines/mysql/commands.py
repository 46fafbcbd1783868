"""The commands of a MySQL client connection: the dispatch table, the COM_* handlers the
proxy answers or adapts, KILL, and what an answer relayed from the server changes."""
from __future__ import annotations

import logging
from time import monotonic

from . import pinning
from . import protocol as p
from .backend import BUSY
from .clientstate import (ER_CONNECTION_KILLED, ER_MALFORMED, ER_NOT_OWNER, ER_UNKNOWN_COM,
                          ER_UNKNOWN_THREAD, READY)
from .protocol import ProtocolViolation
from .statements import StatementMapping

log = logging.getLogger("rdsproxy.mysql.client")

MAX_QUEUED = 256
_FORWARDED = {p.COM_QUERY, p.COM_INIT_DB, p.COM_FIELD_LIST, p.COM_STATISTICS, p.COM_PING,
              p.COM_PROCESS_INFO, p.COM_REFRESH, p.COM_SET_OPTION}


class CommandDispatch:
    """ClientConnection's commands (a mixin: the connection is `self`)."""

    def _on_packet(self, seq: int, payload: bytes, raw: bytes | None = None) -> None:
        if self.busy:
            server = self.server
            if server is not None and server.tracker is not None and server.tracker.awaiting_client:
                server.forward_client_packet(seq, payload)   # LOCAL INFILE data
                return
            self.queue.append((seq, payload))
            if len(self.queue) > MAX_QUEUED and not self.reading_paused:
                self.reading_paused = True
                self.transport.pause_reading()
            return
        self._dispatch(seq, payload, raw)

    def _next(self) -> None:
        while self.queue and not self.busy and self.state == READY:
            seq, payload = self.queue.popleft()
            self._dispatch(seq, payload)
        if self.reading_paused and len(self.queue) < MAX_QUEUED // 2 and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()

    def _dispatch(self, seq: int, payload: bytes, raw: bytes | None = None) -> None:
        self.cmd_raw = raw
        self.busy = True
        self.outstanding = 1
        self.queries += 1
        self.request_at = self.forwarded_at = monotonic()
        self.cmd = payload
        self.cmd_seq = seq
        self.verdict = None
        self.stmt = None
        if seq != 0:
            self.fatal((1156, "08S01"), "Got packets out of order")
            return
        if not payload:
            self._refuse(ER_MALFORMED, "Malformed communication packet (empty command)")
            return
        cmd = payload[0]
        try:
            handler = _HANDLERS.get(cmd)
            if handler is None:
                if cmd in _FORWARDED:
                    self._send_to_server()
                else:
                    self._refuse(ER_UNKNOWN_COM, "Unknown command")
                return
            handler(self, payload)
        except ProtocolViolation as exc:
            self._refuse((exc.code, exc.sqlstate), str(exc))

    def _refuse(self, code_state, message: str) -> None:
        """Answer the current command with an error; the session goes on."""
        self.engine.metrics.ProtocolErrors += code_state in (ER_MALFORMED, ER_UNKNOWN_COM)
        log.info("client %s (user %s): %s", self.peer, self.user, message)
        self._reply_err(code_state, message)
        self._command_done()

    def _command_done(self) -> None:
        self.busy = False
        self.outstanding = 0
        self.cmd = None
        server = self.server
        if server is not None and not self._must_keep(server):
            self.detach(server)
            server.pool.release(server)
        self._next()

    def _must_keep(self, server) -> bool:
        return bool(self.queue) or self.holds_state(server)

    def _com_quit(self, payload):
        self.busy = False
        self.close()

    def _com_ping(self, payload):
        if self.server is not None:
            self._send_to_server()
        else:
            self._reply_ok()
            self._command_done()

    def _com_query(self, payload):
        verdict = self.engine.rules.classify(payload[1:])
        self.verdict = verdict
        if verdict.plain:
            # None of the checks below applies. The exact packet of one such statement is
            # the relay's quick lane's from now on (classify is a function of the text).
            if verdict.statements == 1 and type(self.cmd_raw) is bytes:
                self.engine.rules.remember_plain(self.cmd_raw, verdict)
            self._send_to_server()
            return
        if verdict.kill is not None:
            if verdict.kill[1] is None or verdict.statements > 1:
                self._refuse((1064, "42000"), "KILL through the proxy takes one connection id, "
                                              "as a number, in a statement of its own")
                return
            self._kill(*verdict.kill)
            return
        if verdict.simple_row_count and (self.server is None or self.server is not self.last_server):
            self._answer_value("ROW_COUNT()", self.row_count)
            self.row_count = -1
            return
        if verdict.simple_connection_id:
            # The client's id is the proxy's, never the id of the server connection it borrows.
            self._answer_value("CONNECTION_ID()", self.connection_id)
            return
        if verdict.connection_id and verdict.pin != pinning.UNKNOWN_STATE:
            # One id wherever the client sees it: the proxy's, in any statement.
            self.cmd_payload_override = p.com_query(
                pinning.with_connection_id(payload[1:], self.connection_id))
        if verdict.pin is not None:
            self.pin(verdict.pin, payload[1:])
        self._send_to_server()

    def _com_process_kill(self, payload):
        if len(payload) < 5:
            raise ProtocolViolation("COM_PROCESS_KILL too short")
        self._kill(False, int.from_bytes(payload[1:5], "little"))

    def _com_set_option(self, payload):
        self.pin(pinning.SET_OPTION)
        self._send_to_server()

    def _com_reset_connection(self, payload):
        self._unpin()
        self._reset_state()
        self.cmd, self.cmd_seq = payload, 0
        server = self.server
        if server is None:
            self._reply_ok()
            self._command_done()
            return
        self.detach(server)

        def reset_done(ok):
            if self.state == READY:
                self._reply_ok()
                self._command_done()
        self._reset_and_release(server, reset_done)

    def _com_change_user(self, payload):
        self._start_change_user(payload)


    # -- KILL ------------------------------------------------------------------------
    def _kill(self, query_only: bool, connection_id: int) -> None:
        victim = self.engine.by_id.get(connection_id)
        if victim is None:
            self._refuse(ER_UNKNOWN_THREAD, f"Unknown thread id: {connection_id}")
            return
        if victim.user != self.user:
            self._refuse(ER_NOT_OWNER, f"You are not owner of thread {connection_id}")
            return
        if victim is self and not query_only:
            self.fatal(ER_CONNECTION_KILLED, "Connection was killed")
            return
        server = victim.server
        running = server is not None and victim.busy and server.mode == BUSY and victim is not self
        if not query_only:
            victim.fatal(ER_CONNECTION_KILLED, "Connection was killed")
        if not running:
            self._reply_ok()
            self._command_done()
            return
        self.engine.loop.create_task(self._kill_query(server))

    async def _kill_query(self, server) -> None:
        try:
            await self.engine.kill_query(server)
        except Exception as exc:  # noqa: BLE001 - tell the client
            if self.state == READY:
                self._reply_err((1158, "08S01"), f"KILL could not reach the database: {exc}")
                self._command_done()
            return
        if self.state == READY:
            self._reply_ok()
            self._command_done()

    def _answer_value(self, name: str, value: int) -> None:
        """A one-row, one-column result the proxy knows better than the server."""
        column = p.ColumnDefinition(name, type=p.MYSQL_TYPE_LONGLONG,
                                    charset=p.CHARSET_BINARY, length=21,
                                    flags=p.BINARY_FLAG | p.NOT_NULL_FLAG)
        status = self._status() | (self.server.status & p.SERVER_STATUS_IN_TRANS
                                   if self.server is not None else 0)
        self.transport.write(p.result_set([column], [[value]], self.capabilities,
                                          status_flags=status, seq=1))
        self._command_done()


    # -- after the answer --------------------------------------------------------------
    def response_done(self, conn, tracker) -> None:
        """The server finished answering the command the client sent (relayed raw)."""
        if self.state != READY:
            return
        answered = monotonic()   # the answer is relayed as it comes: its last byte is out
        conn.pool_core.database_latency.observe(answered - self.forwarded_at)
        self.response_latency.observe(answered - self.request_at)
        cmd = self.cmd[0] if self.cmd else None
        ok = tracker.last_ok
        if cmd in (p.COM_QUERY, p.COM_STMT_EXECUTE):
            verdict = self.verdict
            if tracker.error is None:
                if verdict is not None:
                    self._apply(verdict, conn)
            elif verdict is not None and (verdict.sets or verdict.use_db) and verdict.statements > 1:
                self.pin(pinning.UNKNOWN_STATE)
            if ok is not None and ok.last_insert_id:
                self.last_insert_id = ok.last_insert_id
                self.lid_version += 1
                conn.lid_owner = (self.connection_id, self.lid_version)
            self.row_count = ok.affected_rows if ok is not None and ok.header == p.OK_HEADER else -1
            self.last_server = conn
            # autocommit=0: the transaction the server opens implicitly shows in the status
            # flags (SERVER_STATUS_IN_TRANS) like an explicit one, and keeps the connection
            # until COMMIT / ROLLBACK; a statement that opened none (SELECT 1) does not.
            if cmd == p.COM_STMT_EXECUTE and not tracker.status_flags & p.SERVER_STATUS_CURSOR_EXISTS:
                self.cursor_stmt = None
        elif cmd == p.COM_INIT_DB and tracker.error is None:
            self.schema = conn.schema = self.cmd[1:].decode("utf-8", "surrogateescape")
        elif cmd == p.COM_STMT_FETCH and not tracker.status_flags & p.SERVER_STATUS_CURSOR_EXISTS:
            self.cursor_stmt = None
        self._command_done()

    def _apply(self, verdict, conn) -> None:
        if verdict.use_db is not None:
            self.schema = conn.schema = verdict.use_db
        for key, replay in verdict.sets:
            if key == "names":
                for k in pinning.CHARSET_KEYS:
                    self.vars.pop(k, None)
                    conn.vars.pop(k, None)
            if replay is None:
                self.vars.pop(key, None)
                conn.vars.pop(key, None)
            else:
                self.vars[key] = replay
                conn.vars[key] = replay
            if key == "autocommit":
                self.autocommit = pinning.autocommit_value(replay)
        if verdict.sets and self.vars != conn.vars:
            conn.vars = dict(self.vars)


_HANDLERS = {
    p.COM_QUIT: CommandDispatch._com_quit,
    p.COM_PING: CommandDispatch._com_ping,
    p.COM_QUERY: CommandDispatch._com_query,
    p.COM_PROCESS_KILL: CommandDispatch._com_process_kill,
    p.COM_SET_OPTION: CommandDispatch._com_set_option,
    p.COM_RESET_CONNECTION: CommandDispatch._com_reset_connection,
    p.COM_CHANGE_USER: CommandDispatch._com_change_user,
    p.COM_STMT_PREPARE: StatementMapping._com_stmt_prepare,
    p.COM_STMT_EXECUTE: StatementMapping._com_stmt_execute,
    p.COM_STMT_SEND_LONG_DATA: StatementMapping._com_stmt_long_data,
    p.COM_STMT_RESET: StatementMapping._com_stmt_reset,
    p.COM_STMT_FETCH: StatementMapping._com_stmt_fetch,
    p.COM_STMT_CLOSE: StatementMapping._com_stmt_close,
}
