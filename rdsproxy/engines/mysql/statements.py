"""Prepared statements of a MySQL client connection: the ids the client sees, mapped to
each server connection's own, and prepared again, unseen, where a connection lacks one."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from . import pinning
from . import protocol as p
from .clientstate import ER_NO_CURSOR, ER_UNKNOWN_STMT, ER_WRONG_ARGUMENTS
from .protocol import ProtocolViolation

log = logging.getLogger("rdsproxy.mysql")

MAX_PREPARED_PER_CONNECTION = 512
# The server's words for a command given a statement id it does not know (ER_UNKNOWN_STMT).
_SERVER_FUNCTION = {p.COM_STMT_EXECUTE: "mysqld_stmt_execute",
                    p.COM_STMT_RESET: "mysqld_stmt_reset", p.COM_STMT_FETCH: "mysqld_stmt_fetch"}


@dataclass(slots=True)     # slots: the quick lane reads its fields per execute
class ClientStatement:
    sql: bytes
    num_params: int
    num_columns: int
    verdict: object
    param_types: bytes = b""
    plain: bool = False           # verdict.plain (read per execute by the relay's quick lane)
    # Long data for a parameter it does not have: kept from the shared server statement
    # (where it would fail every client's executes); this one's fail until a reset.
    bad_long_data: bool = False


class StatementMapping:
    """ClientConnection's prepared statements (a mixin: the connection is `self`)."""

    def _com_stmt_prepare(self, payload):
        # Preparing creates no session state; what the text does is judged at execute.
        self.verdict = self.engine.rules.classify(payload[1:])
        self._send_to_server()

    def _statement_id(self, payload, length: int = 5):
        """The statement id a command names (MariaDB's "the last one" resolved), or None
        when the command is shorter than `length`."""
        if len(payload) < length:
            return None
        stmt_id = int.from_bytes(payload[1:5], "little")
        return self.last_stmt_id if stmt_id == p.MARIADB_LAST_STATEMENT_ID else stmt_id

    def _statement(self, payload) -> ClientStatement:
        stmt_id = self._statement_id(payload)
        if stmt_id is None:
            raise ProtocolViolation("statement command too short")
        stmt = self.stmts.get(stmt_id)
        if stmt is None:
            function = _SERVER_FUNCTION.get(payload[0], "command")
            raise ProtocolViolation(f"Unknown prepared statement handler ({stmt_id}) given to "
                                    f"{function}", *ER_UNKNOWN_STMT)
        self.stmt = stmt
        return stmt

    def _com_stmt_execute(self, payload):
        stmt = self._statement(payload)
        if stmt.bad_long_data:
            raise ProtocolViolation("Incorrect arguments to mysqld_stmt_send_long_data",
                                    *ER_WRONG_ARGUMENTS)
        if stmt.verdict.pin is not None:
            self.pin(stmt.verdict.pin)
        self.verdict = stmt.verdict
        n = stmt.num_params
        if n:
            if payload[5:6] and payload[5] & p.PARAMETER_COUNT_AVAILABLE:
                raise ProtocolViolation("COM_STMT_EXECUTE with a parameter count is not supported")
            pos = 10 + (n + 7) // 8           # command, id, flags, iterations, null bitmap
            if len(payload) <= pos:
                raise ProtocolViolation("COM_STMT_EXECUTE too short for its parameters")
            if payload[pos] == 1:
                stmt.param_types = payload[pos + 1:pos + 1 + 2 * n]
            elif stmt.param_types:
                # The server statement may be shared (or new): always bind the types.
                self.cmd_payload_override = (payload[:pos] + b"\x01" + stmt.param_types
                                             + payload[pos + 1:])
        self._send_to_server()

    def _com_stmt_long_data(self, payload):
        stmt = self.stmts.get(self._statement_id(payload, 7))   # and a parameter number
        if stmt is None:
            # No answer, not even an error: the client reads none (nor does the server send
            # one for a statement it does not know).
            log.info("client %s (user %s): long data for an unknown statement ignored",
                     self.peer, self.user)
            self._command_done()
            return
        self.stmt = stmt
        if int.from_bytes(payload[5:7], "little") >= stmt.num_params:
            stmt.bad_long_data = True
            stmt.plain = False       # its executes take the slow path, which refuses them
            self._command_done()
            return
        if not self._has_long_data(stmt):
            self.long_data_stmts.append(stmt)
        self.long_data = True
        self._send_to_server()

    def _long_data_used(self, stmt) -> None:
        """An execute or reset of `stmt` used or dropped the data sent ahead for it; the
        connection stays while another statement's is still there."""
        self.long_data_stmts = [s for s in self.long_data_stmts if s is not stmt]
        self.long_data = bool(self.long_data_stmts)

    def _has_long_data(self, stmt) -> bool:
        return any(s is stmt for s in self.long_data_stmts)

    def _com_stmt_reset(self, payload):
        stmt = self._statement(payload)
        if stmt.bad_long_data:
            stmt.bad_long_data = False
            stmt.plain = stmt.verdict.plain
        self._long_data_used(stmt)
        if self.server is None:
            self._reply_ok()
            self._command_done()
            return
        self._send_to_server()

    def _com_stmt_fetch(self, payload):
        stmt = self._statement(payload)
        if self.server is None or self.cursor_stmt is not stmt:
            self._refuse(ER_NO_CURSOR, f"The statement ({int.from_bytes(payload[1:5], 'little')}) "
                                       "has no open cursor")
            return
        self._send_to_server()

    def _com_stmt_close(self, payload):
        stmt = self.stmts.pop(self._statement_id(payload), None)
        # No answer (not even for a malformed one). The server statement stays prepared for
        # whoever prepares that text next: its open cursor, or data sent ahead for it, is
        # cleared first, so that neither reaches them and the connection can be returned.
        server = self.server
        pending = stmt is not None and self._has_long_data(stmt)
        if pending:
            self._long_data_used(stmt)
        if stmt is not None and (stmt is self.cursor_stmt or pending) and server is not None:
            if stmt is self.cursor_stmt:
                self.cursor_stmt = None
            sid = server.prepared.get((server.schema, stmt.sql))
            if sid is not None:
                self.busy = True
                server.run(p.com_stmt_reset(sid[0].statement_id), lambda t: self._closed_cursor(server, t))
                return
        self.busy = False
        self.outstanding = 0
        self._command_done()

    def _closed_cursor(self, server, tracker):
        if tracker is None:
            self.on_server_lost(server)
            return
        server.status &= ~p.SERVER_STATUS_CURSOR_EXISTS
        self._command_done()


    def _reprepared(self, conn, stmt):
        def record(tracker, collect):
            self._remember_prepared(conn, stmt.sql, tracker.prepare_ok, collect)
        return record

    def _remember_prepared(self, conn, sql, ok, packets) -> None:
        prepared = conn.prepared
        if len(prepared) >= MAX_PREPARED_PER_CONNECTION:
            old_key = next(iter(prepared))
            old = prepared.pop(old_key)
            conn.transport.write(p.packet(0, p.com_stmt_close(old[0].statement_id)))
        prepared[(conn.schema, sql)] = (ok, [payload for _seq, payload in packets])


    def _prepared(self, conn, tracker, packets) -> None:
        if tracker is None:
            self.on_server_lost(conn)
            return
        if tracker.error is not None:
            self.last_stmt_id = 0      # a pipelined execute of "the last statement" fails too
            for seq, payload in packets:
                self.transport.write(p.packet(seq, payload))
            self._command_done()
            return
        self._remember_prepared(conn, self.cmd[1:], tracker.prepare_ok, packets)
        self._answer_prepare(conn, tracker.prepare_ok, [pl for _s, pl in packets])

    def _answer_prepare(self, conn, ok, payloads) -> None:
        stmt_id = self.next_stmt_id
        self.next_stmt_id += 1
        self.last_stmt_id = stmt_id
        verdict = self.verdict or pinning.PLAIN
        self.stmts[stmt_id] = ClientStatement(self.cmd[1:], ok.num_params, ok.num_columns,
                                              verdict, plain=verdict.plain)
        out = []
        seq = 1
        for i, payload in enumerate(payloads):
            if i == 0:
                payload = b"\x00" + stmt_id.to_bytes(4, "little") + payload[5:]
            out.append(p.packet(seq, payload))
            seq = p.seq_after(seq, len(payload))
        self.transport.write(b"".join(out))
        self._command_done()

