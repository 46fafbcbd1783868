"""Bringing a borrowed MySQL connection to its client's session state before a command
(default database, tracked variables, LAST_INSERT_ID, the statement), sending the command,
and resetting a connection before anyone else uses it."""
from __future__ import annotations

import logging

from . import pinning
from . import protocol as p
from .backend import COLLATIONS
from .clientstate import OK_STATUS

log = logging.getLogger("rdsproxy.mysql.client")


class Unresettable(Exception):
    """The connection's character set cannot be restored after a reset."""


class StateSync:
    """ClientConnection's state sync and reset steps (a mixin: the connection is `self`)."""

    # -- state sync before a command ---------------------------------------------------
    def _sync_steps(self, conn) -> list:
        steps = []
        want, have = self.vars, conn.vars
        reset = any(k not in want and k in pinning.RESET_ONLY_KEYS for k in have)
        if conn.schema and not self.schema:
            raise Unresettable()   # a database cannot be deselected: use a fresh connection
        if reset:
            steps += self._reset_steps(conn)
            have = {}
        if self.schema and self.schema != conn.schema:
            schema = self.schema
            steps.append((p.com_init_db(schema), lambda t, c: setattr(conn, "schema", schema)))
        if want != have:
            assignments = [f"@@SESSION.{k} = DEFAULT" for k in have if k not in want]
            statements = []
            for k, v in want.items():
                if have.get(k) != v:
                    (statements if k == "transaction" else assignments).append(v)
            if assignments:
                statements.insert(0, "SET " + ", ".join(assignments))
            for sql in statements:
                steps.append((p.com_query(sql), None))
            wanted = dict(want)
            steps.append((None, lambda t, c: setattr(conn, "vars", wanted)))
        return steps

    def _reset_steps(self, conn) -> list:
        # MariaDB's reset keeps the current role (SET ROLE): drop it too, or the next
        # client would hold privileges that only this one asked for.
        steps = [(p.com_reset_connection(), None), (p.com_query("SET ROLE NONE"), None)]
        names = COLLATIONS.get(conn.charset)
        if names is None:
            raise Unresettable()
        steps.append((p.com_query(f"SET NAMES {names}"), None))
        if self.engine.config.target_group.init_query:
            steps.append((p.com_query(self.engine.config.target_group.init_query), None))

        def after(t, c):
            conn.vars = {}
            conn.prepared = {}
            conn.lid_owner = None
            conn.status = OK_STATUS
        steps.append((None, after))
        return steps

    def _sync_and_send(self, conn) -> None:
        try:
            if conn.vars == self.vars and conn.schema == self.schema:
                steps = []                      # the common case: nothing to bring over
            else:
                steps = self._sync_steps(conn)
                if self.engine.log_debug:
                    log.debug("client %s (user %s): syncing %r to the session (%d variables, "
                              "schema %s)", self.peer, self.user, conn, len(self.vars), self.schema)
        except Unresettable:
            self.detach(conn)
            conn.pool.discard(conn)
            self.borrow()
            return
        cmd = self.cmd[0]
        if cmd in (p.COM_QUERY, p.COM_STMT_EXECUTE) and self.verdict is not None \
                and self.verdict.last_insert_id \
                and conn.lid_owner != (self.connection_id, self.lid_version):
            # LAST_INSERT_ID() must answer for this client's own last insert.
            steps.append((p.com_query(f"SELECT LAST_INSERT_ID({self.last_insert_id})"),
                          lambda t, c: setattr(conn, "lid_owner", (self.connection_id, self.lid_version))))
        if self.stmt is not None and (conn.schema, self.stmt.sql) not in conn.prepared:
            stmt = self.stmt
            collect = []
            steps.append((p.com_stmt_prepare(stmt.sql), self._reprepared(conn, stmt), collect))
        self._run_steps(conn, steps)


    def _run_steps(self, conn, steps) -> None:
        while steps and steps[0][0] is None:
            steps.pop(0)[1](None, None)
        if not steps:
            self._send_command(conn)
            return
        step = steps.pop(0)
        payload, check = step[0], step[1]
        collect = step[2] if len(step) > 2 else []

        def done(tracker):
            if self.server is not conn:     # the client left meanwhile
                if tracker is None or conn.closed:
                    conn.pool.discard(conn)
                return
            if tracker is None:
                self.on_server_lost(conn)
                return
            if tracker.error is not None:
                self._step_failed(conn, payload, tracker.error)
                return
            if check is not None:
                check(tracker, collect)
            self._run_steps(conn, steps)
        conn.run(payload, done, collect)

    def _step_failed(self, conn, payload, error) -> None:
        if payload[0] == p.COM_STMT_PREPARE:
            # The statement cannot be prepared here any more (a table was dropped...):
            # that is the answer to the client's command.
            self._reply_err((error.code, error.sqlstate), error.message)
            self._command_done()
            return
        log.warning("client %s (user %s): restoring session state on %r failed: %s",
                    self.peer, self.user, conn, error.message)
        self.detach(conn)
        conn.pool.discard(conn)
        self._reply_err((error.code, error.sqlstate),
                        f"cannot restore the session state: {error.message}")
        self._command_done()

    def _send_command(self, conn) -> None:
        payload = self.cmd
        cmd = payload[0]
        override = self.cmd_payload_override
        if override is not None:
            self.cmd_payload_override = None
            payload = override
        if cmd == p.COM_STMT_PREPARE:
            cached = conn.prepared.get((conn.schema, payload[1:]))
            if cached is not None:
                self._answer_prepare(conn, cached[0], cached[1])
                return
            packets = []
            conn.send(payload, sink=packets.extend, on_done=lambda t: self._prepared(conn, t, packets))
            return
        if self.stmt is not None:
            ok = conn.prepared[(conn.schema, self.stmt.sql)][0]
            payload = p.with_statement_id(payload, ok.statement_id)
            if cmd == p.COM_STMT_EXECUTE and payload[5] & p.CURSOR_TYPE_MASK:
                self.cursor_stmt = self.stmt
            if cmd == p.COM_STMT_EXECUTE:
                self._long_data_used(self.stmt)
        raw = None
        if payload is self.cmd:
            raw = self.cmd_raw if self.cmd_raw is not None else p.packet(self.cmd_seq, payload)
        tracker = conn.send(payload, raw=raw)
        if not tracker.expects_response:   # SEND_LONG_DATA
            self._command_done()


    def _reset_and_release(self, server, then=None) -> None:
        """COM_RESET_CONNECTION (and the character set again) before anyone else uses it."""
        try:
            steps = self._reset_steps(server)
        except Unresettable:
            server.pool.discard(server)
            if then:
                then(False)
            return

        def step(tracker=True):
            if tracker is None or (tracker is not True and tracker.error is not None):
                log.info("reset of %r failed; closing it", server)
                server.pool.discard(server)
                if then:
                    then(False)
                return
            while steps and steps[0][0] is None:
                steps.pop(0)[1](None, None)
            if not steps:
                if self.engine.log_debug:
                    log.debug("client %s (user %s): %r reset and returned", self.peer, self.user,
                              server)
                server.pool.release(server)
                if then:
                    then(True)
                return
            server.run(steps.pop(0)[0], step)
        step()


