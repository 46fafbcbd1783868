"""Client sessions: startup, authentication, then relaying transactions over borrowed connections.

The relay forwards each chunk unchanged; the framing scanner only counts requests that
expect a ReadyForQuery (Query, Sync, FunctionCall) and copies Query/Parse texts for the
pinning rules. A borrowed connection goes back to the pool at ReadyForQuery 'I' once every
request is answered, unless the session is pinned.
"""
from __future__ import annotations

import asyncio
import hmac
import logging

from ..._fastpath import ClientRelay, Phase
from ..._fastpath.pgwire import (
    MSG_BIND,
    MSG_CLOSE,
    MSG_DESCRIBE,
    MSG_FUNCTION_CALL,
    MSG_PARSE,
    MSG_QUERY,
    MSG_TERMINATE,
    STATUS_IDLE,
    UNSYNCED_MASK,
)
from ..._fastpath.contract import (   # the session's states
    PG_CLIENT_AUTH_MD5 as AUTH_MD5,
    PG_CLIENT_CLOSED as CLOSED,
    PG_CLIENT_LOGIN as LOGIN,
    PG_CLIENT_READY as READY,
)
from ...core.console import CONSOLE_DATABASE
from ...core.pool import BorrowTimeout
from ...core.router import UNROUTED
from ...core.sessions import ClientSide, describe_peer
from ...logs import redact_statement
from . import protocol as pg
from .login import (
    TLS_ACCEPTED,
    AuthFailed,
    ClientLogin,
    PasswordReceived,
    Reply,
    StartupReceived,
    TlsRequested,
)
from .held import (
    answer_completed_a_statement,
    request_did_not_run,
    server_fatal_error,
    server_last_words,
)
from .protocol import ServerError
from .statements import (SERVER_NAME_PREFIX, StatementBook, deallocates_proxy_statement,
                         reserved_statement_name)
from .pinning import (
    LOAD,
    PREPARED_STATEMENT,
    SET_VARIABLE,
    STARTUP_OPTIONS,
    UNKNOWN_STATE,
    UNVERIFIED,
    database_in_ddl,
)
from .sessionstate import (
    SETTINGS_SQL,
    STATE_CHECK_SQL,
    SessionSync,
    carried_settings,
    carried_statements,
    current_settings_sql,
    proxy_statement_names,
    read_settings,
    read_sql_statements,
    settings_after,
    verdict,
)

log = logging.getLogger("rdsproxy.client")

_NAMING = (MSG_PARSE, MSG_BIND, MSG_DESCRIBE, MSG_CLOSE)


def _give_back(conn, clean: bool) -> None:
    """A connection whose client left during the proxy's own exchange on it: back to the
    pool when its session is known clean, closed otherwise."""
    if clean:
        conn.pool.release(conn)
    else:
        conn.pool.discard(conn)


class ClientConnection(ClientRelay, ClientSide, asyncio.Protocol):
    """One client of the proxy, from its first byte to its last."""

    _syncing = None
    _resent = None            # a request sent again as one that did not run (on_server_lost)
    tls = False               # the session runs over TLS
    _tls_pending = False      # 'S' sent, handshake under way
    refused = False           # over max_client_connections: answered after its startup packet
    cancel_only = False       # a CancelRequest's connection: nothing is ever written back
    # Defaults of what a session sets later (class attributes: a new client costs less).
    # Never one of ClientRelay's C fields: a class attribute would hide the field.
    waiting_for_route = False
    borrow_deadline = None
    seen_activity = 0
    _login = None             # the engine's path of the login (login.ClientLogin)
    # What the check after an unverified transaction must read: the whole session (the
    # state check), or, when every text that marked it was a plain SET or RESET, just the
    # settings it named.
    _check_all = False
    _settings_named = None
    _described = None         # (peer, peer_host), worked out when first asked for

    # Sessions are made by PostgresEngine.client_factory (a relay SessionFactory, which
    # fills the fields: engine, endpoint, pool_core UNROUTED so that the router places it,
    # route_role, the pinning prefilter, the login lane, a scanner). connection_made,
    # data_received, close and connection_lost are the relay's; before READY, data goes to
    # startup_data.

    @property
    def peer(self) -> str:
        """"host:port" of the client, for logs (worked out only when a log line asks)."""
        return self._describe()[0]

    @property
    def peer_host(self) -> str:
        return self._describe()[1]

    def _describe(self):
        described = self._described
        if described is None:
            if self.transport is None:
                return ("?", "?")
            described = self._described = describe_peer(self.transport.get_extra_info("peername"))
        return described

    def refuse(self):
        """Over max_client_connections (from the relay's connection_made)."""
        # As PostgreSQL does at max_connections: the answer waits for the startup packet.
        self.refused = True
        self.login_step = -1   # not the relay's quick lane either
        self.engine.loop.call_later(10.0, self.close)  # if no startup packet comes
        self.engine.housekeeper.limit_logins_per_address()   # one address's half-open logins make room

    def startup_data(self, data):
        if self.state == CLOSED:
            return
        login = self._login
        if login is None:
            login = self._login = self._new_login()
        login.receive_data(data)
        if self._tls_pending:
            # Decrypted bytes can arrive (plain asyncio) before start_tls has handed us the
            # TLS transport to answer on: the login keeps them for _handshake.
            return
        try:
            self._run_login(login)
        except pg.ProtocolViolation as exc:
            self.engine.metrics.ProtocolErrors += 1
            log.warning("client %s: protocol violation during startup: %s", self.peer, exc)
            self.fatal(exc.sqlstate, str(exc), exc.detail)

    # -- the relay's slow paths --------------------------------------------------------
    def framing_error(self, exc):
        self.engine.metrics.ProtocolErrors += 1
        log.warning("client %s (user %s): %s", self.peer, self.user, exc)
        self.fatal("08P01", f"invalid message from client: {exc}")

    def inspect(self, data):
        """Apply the pinning rules to captured Query/Parse texts; notice FunctionCall and
        Terminate."""
        rules = self.engine.rules
        for mtype, payload, length in self.scanner.captured:
            if mtype == MSG_TERMINATE:
                data = self.terminate(data)
                break
            if mtype in _NAMING and self.statements is None:
                # Sent as it is: a name of the proxy's own would reach statements that
                # other clients prepared on this connection.
                if reserved_statement_name(mtype, payload):
                    self.engine.metrics.ProtocolErrors += 1
                    log.warning("client %s (user %s): used a reserved statement name", self.peer, self.user)
                    self.fatal("08P01", "prepared statement names beginning with "
                               f"\"{SERVER_NAME_PREFIX.decode()}\" are reserved by the proxy")
                    data = b""
                    break
                if mtype != MSG_PARSE:
                    continue
            elif mtype in _NAMING and mtype != MSG_PARSE:
                continue
            if self.pin_reason is not None:
                continue
            if self.statements is None and deallocates_proxy_statement(mtype, payload):
                self._name_statements()   # its book answers as for a name never prepared
            if mtype == MSG_FUNCTION_CALL:
                # Any function by OID (set_config is 2078): what it did is asked afterwards.
                self.unverified = True
                self._check_all = True
                continue
            if mtype == MSG_QUERY:
                if b"database" in payload.lower():   # spare the tokenizer every other text
                    database = database_in_ddl(payload)
                    if database is not None:
                        self.engine.release_database(database)
                sql = payload
                reason = rules.classify_query(payload, length - 1)  # without the NUL
            else:
                # Parse: name NUL query NUL then parameter types; the rules want the query.
                nul = payload.find(b"\x00")
                end = payload.find(b"\x00", nul + 1) if len(payload) == length else -1
                sql = payload[nul + 1:end] if end >= 0 else payload[nul + 1:]
                full_length = len(sql) if end >= 0 else length - nul - 1
                if nul > 0 and self.statements is None and not self._name_statements():
                    self.pin(PREPARED_STATEMENT)
                    continue
                reason = rules.classify_query(sql, full_length)
                if nul > 0 and reason is not None and end >= 0:
                    # Run again later by Bind alone: each run is checked like this one.
                    self.statements.watched.add(payload[nul + 1:])
            if reason == UNVERIFIED or reason == SET_VARIABLE or (
                    reason == PREPARED_STATEMENT
                    and self.engine.config.target_group.max_prepared_statements):
                # SET and PREPARE do not pin: what the session holds once the transaction
                # is over is read from the server and carried with the client
                # (_adopt_settings, _adopt_sql_statements).
                self.unverified = True
                if not self._check_all:
                    names = rules.settings_named(sql) if reason == SET_VARIABLE else None
                    if names is None:
                        self._check_all = True
                    elif self._settings_named is None:
                        self._settings_named = set(names)
                    else:
                        self._settings_named.update(names)
            elif reason is not None:
                self.pin(reason, sql)
        self.scanner.captured.clear()
        return data

    def statement_may_change_session(self) -> None:
        """A Bind of a named statement whose text is not known to be harmless: the
        transaction gets the whole state check (the book's long way calls this)."""
        if self.pin_reason is None:
            self.unverified = True
            self._check_all = True

    def _name_statements(self) -> bool:
        """The client names a statement: from now on its statements are the proxy's to keep
        (statements.py). False when it must be pinned instead: named statements are turned
        off, or requests already sent on its connection have answers on the way that the
        proxy did not track."""
        if not self.engine.config.target_group.max_prepared_statements:
            return False
        server = self.server
        if server is not None and (self.outstanding
                                   or UNSYNCED_MASK[self.type_before_chunk]
                                   or not self.chunk_at_boundary):
            return False
        book = StatementBook()
        book.client = self
        if server is not None:
            book.attached(server, server.answers, False, self.transport)
        if self.replay is not None:
            book.snapshot = {}   # a replay of this request starts from an empty book
        self.statements = book
        # Its Binds, Describes and Closes are the book's now: the scanner need not copy them.
        self.scanner.captured_mask = self.engine.statement_client_mask
        self.engine.metrics.StatementClients += 1
        return True

    def verify_session(self, server):
        """The transaction that left `unverified` set is over: before `server` goes back
        to the pool, ask it what the session holds (sessionstate). Meanwhile the client's
        next requests wait in `pending`, as during a parameter sync."""
        self.detach(server, Phase.SYNCING)
        self.unverified = False
        self._syncing = server
        names = None if self._check_all else self._settings_named
        self._check_all = False
        self._settings_named = None
        rows = []
        if self.engine.log_debug:
            log.debug("client %s (user %s): transaction over, reading %s from %r", self.peer,
                      self.user, "settings " + ", ".join(sorted(names)) if names
                      else "the whole session state", server)
        if names:
            # Only plain SETs and RESETs: their settings' values are all there is to read.
            names = sorted(names)
            self.engine.metrics.SettingsChecks += 1
            server.run_internal(current_settings_sql(names, missing_ok=True),
                                lambda error: self._on_settings_read(server, names, rows, error),
                                rows)
            return
        self.engine.metrics.SessionStateChecks += 1
        server.run_internal(STATE_CHECK_SQL, lambda error: self._on_state_checked(server, rows, error),
                            rows)

    def _on_settings_read(self, server, names, rows, error):
        reason = None
        if error is None:
            try:
                settings = settings_after(server.known_settings, names, rows)
                if not self.engine.rules.variable_sets_excluded:
                    reason = self._adopt_settings(server, settings)
            except (ValueError, IndexError) as exc:
                error = exc
        self._after_check(server, reason, error)

    def _on_state_checked(self, server, rows, error):
        reason = None
        if error is None:
            answers = server.answers
            try:
                reason = verdict(rows, server.user, proxy_statements=answers.names())
                answers.keep_only(proxy_statement_names(rows))
                if reason is None:
                    reason = self._adopt_sql_statements(server, read_sql_statements(rows))
                if reason is None and not self.engine.rules.variable_sets_excluded:
                    reason = self._adopt_settings(server, read_settings(rows[1:]))
            except (ValueError, IndexError) as exc:
                error = exc
        self._after_check(server, reason, error)

    def _after_check(self, server, reason, error):
        """The check after the client's transaction is answered: `server` goes back to
        the pool, or stays with the client (`reason`)."""
        self._syncing = None
        if error is not None and not server.closed:
            # No answer (a statement_timeout the client set, say): the session's state
            # is unknown, so it stays with its client.
            log.info("client %s (user %s): session state check failed (%s)", self.peer, self.user, error)
            reason = UNKNOWN_STATE
        if self.state != READY:   # the client left meanwhile
            _give_back(server, clean=reason is None)
            return
        if server.closed:
            server.pool.discard(server)
            self.enter(Phase.FREE)
            self.fatal("08006", "the database connection serving this session was lost")
            return
        if reason is not None:
            self.pin(reason)
            self.attach(server)
            return
        if self.engine.log_debug:
            log.debug("client %s (user %s): session state checked, %r returned", self.peer,
                      self.user, server)
        self.enter(Phase.FREE)
        server.pool.release(server)
        if self.pending:
            self.borrow()
        else:
            self._resume_reading()

    def _adopt_settings(self, server, settings: dict) -> str | None:
        """The session's settings after the client's transaction (`settings`, read from the
        server) become the client's own (sessionstate.carried_settings): carried to
        whichever connection it borrows next, as its startup parameters are, and taken off
        this one before another client gets it."""
        if settings == server.known_settings:
            return None
        reason, desired = carried_settings(self.desired, server.known_settings,
                                           server.init_settings, settings)
        if reason is None:
            self.engine.metrics.SettingsAdopted += 1
            self.desired = server.applied = desired
            server.known_settings = settings
        return reason

    def _adopt_sql_statements(self, server, found: list) -> str | None:
        """The statements the session made with SQL PREPARE become the client's
        (sessionstate.carried_statements): made again on whichever connection it borrows
        next, and dropped from this one before another client gets it."""
        if not found and not server.sql_prepared:
            return None
        reason, carried = carried_statements(
            found, bool(self.engine.config.target_group.max_prepared_statements))
        if reason is None:
            if carried != server.sql_prepared:
                self.engine.metrics.SQLStatementsAdopted += 1
            self.sql_prepared = server.sql_prepared = carried
        return reason

    def pin(self, reason: str, statement=None) -> None:
        self.pin_reason = reason
        self.engine.metrics.pinned(reason)
        if self.phase == Phase.ACTIVE:
            self.enter(Phase.PINNED)
        if self.engine.log_debug:
            text = redact_statement(statement) if statement is not None else "-"
            log.debug("client %s (user %s) pinned: %s by %s", self.peer, self.user, reason, text,
                      extra={"client": self.peer, "user": self.user, "pin_reason": reason,
                             "statement": text})

    # borrow() is ClientSide's. While it waits, the client's bytes gather in `pending`; the
    # relay pauses reading only if they pile up (two syscalls saved per wait).

    def on_connection(self, conn):
        """The pool hands over a connection (at once, or after a wait)."""
        if self.state == LOGIN:
            # The first login of its kind: what the server reports for these startup
            # parameters (its spelling of them, or its error) is learnt on this connection.
            if self.desired and conn.applied != self.desired:
                self._sync_parameters(conn, self._on_login_parameters, with_statements=False)
                return
            self.enter(Phase.FREE)
            self.engine.learn_greeting(self.key, self.desired, conn.parameters)
            conn.pool.release(conn)
            self._finish_login()
            self._resume_reading()
            return
        if self.state != READY:
            conn.pool.release(conn)
            return
        if conn.closed:  # died while idle, before the pool heard of it
            conn.pool.discard(conn)
            self.borrow()
            return
        if self.engine.log_debug:
            log.debug("client %s (user %s): borrowed %r", self.peer, self.user, conn)
        if conn.applied != self.desired or conn.sql_prepared != self.sql_prepared:
            # Bring the connection's session parameters and SQL prepared statements to this
            # client's first; its bytes keep waiting in `pending` until that is done.
            self._sync_parameters(conn, self._on_parameters_synced)
            return
        self.attach(conn)

    def _sync_parameters(self, conn, done, with_statements=True) -> None:
        """Bring `conn`'s session parameters (and, with `with_statements`, its SQL prepared
        statements) to this client's (sessionstate.SessionSync), then `done(error)`."""
        sync = SessionSync(self.desired, conn.applied, self.sql_prepared, conn.sql_prepared,
                           with_statements)
        if self.engine.log_debug:
            log.debug("client %s (user %s): syncing %r to the session's %d parameters and %d "
                      "SQL prepared statements", self.peer, self.user, conn, len(self.desired),
                      len(self.sql_prepared) if with_statements else 0)
        rows = []
        errors = []

        def synced(error):
            failed = sync.failed_statements(errors)
            if failed:
                log.info("client %s (user %s): statements %s could not be prepared again",
                         self.peer, self.user, b", ".join(sorted(failed)).decode("latin-1"))
                self.sql_prepared = tuple(pair for pair in self.sql_prepared if pair[0] not in failed)
                if not sync.settings_failed(errors):
                    error = None
            if error is None:
                sync.learn(conn.known_settings, rows)
                if with_statements:
                    conn.sql_prepared = self.sql_prepared
            done(error)
        self.enter(Phase.SYNCING)
        self._syncing = conn
        conn.run_internal(sync.requests, synced, rows, errors)

    def _on_login_parameters(self, error):
        conn, self._syncing = self._syncing, None
        self.enter(Phase.FREE)
        if error is None:
            conn.applied = self.desired
            self.engine.learn_greeting(self.key, self.desired, conn.parameters)
        conn.pool.release(conn)
        if self.state != LOGIN:   # the client left meanwhile
            return
        if error is not None:
            # Refused as PostgreSQL refuses a bad startup parameter: at login, in its words.
            fields = getattr(error, "fields", {})
            self.fatal(fields.get("C", "08006"), fields.get("M", str(error)), fields.get("D", ""))
            return
        self._finish_login()
        self._resume_reading()

    def _on_parameters_synced(self, error):
        conn, self._syncing = self._syncing, None
        if error is None:
            conn.applied = self.desired
        if self.state != READY:  # the client left meanwhile
            _give_back(conn, clean=error is None)
            return
        if error is not None:
            self.enter(Phase.FREE)
            conn.pool.discard(conn)
            fields = getattr(error, "fields", {})
            self.fatal(fields.get("C", "08006"), f"cannot apply session parameters: {fields.get('M', error)}")
            return
        self.attach(conn)

    def _resume_reading(self):
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()

    def on_borrow_error(self, exc):
        self.enter(Phase.FREE)
        if isinstance(exc, BorrowTimeout):
            code, text = "53300", str(exc)
        elif isinstance(exc, ServerError):
            code, text = exc.sqlstate, exc.fields.get("M", str(exc))
        else:
            code, text = "08006", f"cannot connect to the database: {exc}"
        if self.state == LOGIN:
            self.fatal(code, text)
            return
        if self.state != READY:
            return
        log.warning("client %s (user %s): %s", self.peer, self.user, text)
        self.pending = []
        self.pending_size = 0
        if (self.outstanding <= 0 or not self.scanner.at_boundary()
                or UNSYNCED_MASK[self.scanner.last_type]):
            # The client is mid-message or mid-pipeline: we cannot resynchronise it.
            self.fatal(code, text)
            return
        self._fail_outstanding(code, text)
        self._resume_reading()

    def _fail_outstanding(self, code: str, text: str) -> None:
        """Answer the unanswered requests ourselves: one error, then a ReadyForQuery each."""
        out = [pg.error_response(code, text)]
        out += [pg.READY_FOR_QUERY_IDLE] * self.outstanding
        self.outstanding = 0
        self.transport.write(b"".join(out))

    def on_server_lost(self, server):
        """The database connection serving this client died."""
        self.detach(server)
        server.pool.discard(server)
        self.engine.failover.server_connection_died(server.pool)
        if self.state != READY:
            return
        if self.replay is not None and self.statements is not None and self.statements.spoke:
            self.replay = None   # the proxy answered part of it already: not sent again
        if self.replay is not None and answer_completed_a_statement(server.held):
            # A statement finished but its transaction's end (ReadyForQuery) never came: it
            # was committing when the server went away, and may or may not have committed.
            # Sending it again could run it twice, so say so (08007) and let the client decide.
            self.replay = None
            self.report_server_lost(server, in_doubt=True)
            return
        if self.replay is not None:
            # The client has seen nothing of the answer and no statement finished, so none
            # can have committed (PostgreSQL commits an implicit transaction only after the
            # statement's CommandComplete, and a dying backend flushes what it buffered).
            # If the target is going away (failover) the request is sent again through the
            # router; if the target is fine (one backend was terminated), the client gets
            # the error, unless nothing of the request ran: then it was the connection that
            # died idle, found so only now, and the request is sent again. The next health
            # check, started from now, tells where to.
            resend = (self.replay is not self._resent
                      and request_did_not_run(self.replay, server.held))
            self.pending = self.replay + self.pending
            self.pending_size = sum(len(chunk) for chunk in self.pending)
            self.replay = None
            # The list goes on as the next connection's `replay`: a request sent again this
            # way once is not sent a third time.
            self._resent = self.pending if resend else None
            if self.statements is not None:
                self.statements.rewind()
            self.enter(Phase.WAITING)
            self.engine.failover.hold_for_health_check(self, server, resend)
            return
        log.debug("client %s: connection lost with no replayable request (outstanding %d, "
                  "server at boundary %s, status %r)", self.peer, self.outstanding,
                  server.scanner.at_boundary(), chr(server.scanner.status or 32))
        self.report_server_lost(server)

    def replay_request(self):
        """Send the held-back request again, through whatever target is routed now."""
        if self.state == READY:
            self.engine.metrics.RequestsReplayed += 1
            log.info("client %s (user %s): database connection lost before answering; "
                     "sending the request again", self.peer, self.user)
            self.borrow()

    def report_server_lost(self, server, in_doubt=False):
        if self.state != READY:
            return
        if self.phase == Phase.WAITING:  # held for a health check: not to be sent again
            self.enter(Phase.FREE)
            self.pending = []
            self.pending_size = 0
        clean_cut = (server.scanner.at_boundary() and server.scanner.status == STATUS_IDLE
                     and self.pin_reason is None)
        fatal = server_fatal_error(server.held)
        if fatal is not None and not (clean_cut and in_doubt):
            # The server said why it ended the session (an administrator, a shutdown, a
            # timeout): the client hears it in the server's own words, as it would directly.
            server.held = None
            server.held_size = 0
            log.warning("client %s (user %s): the database ended the session it was "
                        "served by (pid %d)", self.peer, self.user, server.backend_pid)
            if not clean_cut:
                if self.transport is not None and not self.transport.is_closing():
                    self.transport.write(fatal)
                self.close()
            elif self.outstanding:
                # Outside a transaction nothing of the client's session was lost with it:
                # the same error, as an ERROR, and the session goes on.
                fields = pg.parse_error_fields(fatal[5:])
                self._fail_outstanding(fields.get("C", "08006"), fields.get("M", ""))
            return
        text = "the database connection serving this session was lost"
        last_words = server_last_words(server.held)
        if last_words:
            text += f" ({last_words})"
        server.held = None
        server.held_size = 0
        log.warning("client %s (user %s): %s (pid %d)", self.peer, self.user, text, server.backend_pid)
        if not clean_cut:
            self.fatal("08006", text + "; the open transaction or session state is gone")
            return
        if in_doubt:
            self.engine.metrics.TransactionsInDoubt += 1
            self._fail_outstanding("08007", text + " while its transaction was committing; it may "
                                   "or may not have committed (transaction resolution unknown)")
        elif self.outstanding:
            self._fail_outstanding("08006", text + "; the statement may or may not have completed")

    def _return_after_exit(self, server):
        """The client left while holding `server`: return it clean or close it."""
        pool = server.pool
        scanner = self.scanner
        if server.closed or not scanner.at_boundary():
            # Dead, or waiting for the rest of a message it will now never get: closing
            # ends the backend (it was reading, so nothing of the client's runs).
            pool.discard(server)
            return
        # Reading from it may have been paused while the client fell behind: whatever
        # comes next (a backend blocked writing an answer, our own reset) must be read.
        server.transport.resume_reading()
        running = self.outstanding > 0 or not server.scanner.at_boundary()
        unsynced = UNSYNCED_MASK[scanner.last_type]
        if running or unsynced or self.pin_reason in (LOAD, STARTUP_OPTIONS):
            # A request still running or unanswered, an extended-protocol transaction
            # never synced (a Sync from us would commit it), or state nothing can undo:
            # cancel, and let PostgreSQL roll back as it ends the connection.
            server.retire(cancel=running or unsynced)
            return
        steps = []
        if server.scanner.status != STATUS_IDLE:
            steps.append("ROLLBACK")
        # Unverified: it may hold anything a pinned session can, so it is reset alike.
        full_reset = self.pin_reason is not None or self.unverified
        init_query = self.engine.config.target_group.init_query
        if full_reset:
            steps.append("DISCARD ALL")
            if init_query:  # DISCARD ALL undid it
                steps += [init_query, SETTINGS_SQL]
        if self.engine.log_debug:
            log.debug("client %s (user %s) left holding %r: %s", self.peer, self.user, server,
                      ", ".join(redact_statement(step) for step in steps) or "returned as it is")
        if not steps:
            pool.release(server)
            return
        rows = []

        def next_step(error=None):
            if error is not None:
                log.info("reset of %r failed (%s); closing it", server, error)
                pool.discard(server)
            elif steps:
                sql = steps.pop(0)
                server.run_internal(sql, next_step, rows if sql is SETTINGS_SQL else None)
            else:
                if full_reset:
                    server.applied = ()
                    server.sql_prepared = ()
                    server.learn_proxy_settings(rows)   # none without init_query
                    server.answers.clear()   # DISCARD ALL dropped them
                server.scanner.status = STATUS_IDLE
                pool.release(server)
        next_step()

    # -- startup and authentication (login.ClientLogin's exchange) ----------------------
    def _new_login(self) -> ClientLogin:
        engine = self.engine
        login = ClientLogin(engine.login_account, engine.random_bytes,
                            tls_offered=engine.server_ssl is not None, tls=self.tls,
                            known_packets=engine.startup_plans, check_token=self.check_iam_token)
        if self.state == AUTH_MD5:
            # The relay's quick lane sent this salt and leaves the password to this path.
            login.expect_md5(self.user, self._account, self._auth)
        return login

    def _run_login(self, login: ClientLogin) -> None:
        while self.state not in (CLOSED, LOGIN, READY):
            event = login.next_event()
            if event is None:
                return
            kind = type(event)
            if kind is PasswordReceived:
                self._on_password(login, event)
            elif kind is Reply:
                self.transport.write(event.data)
            elif kind is StartupReceived:
                plan = event.known
                if plan is None:
                    plan = self.engine.remember_startup(event.raw, event.session)
                self.plan = plan
                self._on_startup(login, plan.session)
            elif kind is TlsRequested:
                self._start_tls()
            else:   # CancelRequested
                # Closed once the cancel has reached the database: clients take the close to
                # mean "done" and send their next statement.
                self.state = CLOSED
                self.close_reason = "cancel request"
                self.cancel_only = True
                self.engine.cancel(event.pid, event.secret, self.peer, self.close)

    def _start_tls(self):
        raw = self.transport
        # Stop reading first so the ClientHello cannot reach us instead of the TLS layer;
        # start_tls resumes reading once its protocol is in place.
        raw.pause_reading()
        raw.write(TLS_ACCEPTED)
        self._tls_pending = True
        self.engine.loop.create_task(self._handshake(raw))

    async def _handshake(self, raw):
        if await self.engine.upgrade_client_tls(self, raw) and self.state != CLOSED:
            self._login.tls_started()
            self.startup_data(b"")

    def _on_startup(self, login: ClientLogin, session) -> None:
        engine = self.engine
        if self.refused:
            log.warning("client %s refused: max_client_connections (%d) reached", self.peer,
                        engine.config.max_client_connections)
            self.fatal("53300", "sorry, too many clients already (max_client_connections)")
            return
        if not engine.admit_transport(self):
            self.fatal("28000", "this proxy requires TLS")
            return
        user, self.database, options, self.key, self.desired = session
        self.user = user
        if options:
            self.pin(STARTUP_OPTIONS)
        self.transport.write(login.begin(user))
        self.state = login.state

    def _on_password(self, login: ClientLogin, event: PasswordReceived) -> None:
        engine = self.engine
        if event.checked and not engine.throttle.may_check(self.peer_host, engine.loop.time()):
            self._auth_failed("too many failed logins from this address: not checked")
            return
        try:
            out = login.check(event.payload)
        except AuthFailed as exc:
            self._auth_failed(self._decoy_reason() if exc.decoy else exc.reason)
            return
        if out:
            self.transport.write(out)
        if login.state == LOGIN:
            self._authenticated()
        else:
            self.state = login.state

    def _decoy_reason(self) -> str:
        """Why a login through a decoy account failed, for the log."""
        if self.user in self.engine.accounts:
            return "IAM authentication requires TLS (answered as for an unknown user)"
        return "no such user"

    def _auth_failed(self, reason: str) -> None:
        """28P01 for the client (delayed for an address that keeps failing), the reason in the log."""
        engine = self.engine
        engine.metrics.ClientConnectionsSetupFailedAuth += 1
        log.warning("authentication failed for user %r from %s: %s", self.user, self.peer, reason)
        now = engine.loop.time()
        engine.throttle.record_failure(self.peer_host, now)
        delay = engine.throttle.delay_for(self.peer_host, now)
        text = f'password authentication failed for user "{self.user}"'
        if delay <= 0:
            self.fatal("28P01", text)
            return
        # Answer later without blocking the loop; ignore anything the client sends meanwhile.
        self.state = CLOSED
        self._login = None
        self.transport.pause_reading()
        engine.loop.call_later(delay, self.fatal, "28P01", text)

    def _authenticated(self):
        """Learn the server's parameters for this user and database once."""
        self.state = LOGIN
        if self.database == CONSOLE_DATABASE and self.engine.console is not None:
            login, self._login = self._login, None
            self.engine.open_console(self, login)
            return
        if self.engine.greeting_known(self.key, self.desired):
            self._finish_login(pg.AUTH_OK_MESSAGE)  # one write for the whole greeting
        else:
            self.transport.write(pg.AUTH_OK_MESSAGE)
            self.borrow()  # on_connection / on_borrow_error see state LOGIN

    def _finish_login(self, prefix=b""):
        engine = self.engine
        self.pid, self.secret = engine.register_cancel_key(self)
        self.state = READY
        if self.pool_core is UNROUTED:
            engine.router.route(self)
        engine.metrics.ClientConnectionsSetupSucceeded += 1
        statuses = engine.parameter_statuses(self.key, self.desired)
        plan = self.plan
        if plan is not None and plan.reply is None and plan.key == self.key:
            plan.learn_greeting(statuses)   # the relay can now greet this packet's clients itself
        login, self._login = self._login, None
        self.transport.write(login.finish(statuses, self.pid, self.secret, prefix))
        if engine.log_sessions:
            self.session_opened(login.method)
        data = login.trailing_data()
        if data:  # pipelined right after the password (libpq does not, others may)
            self.data_received(data)

    # -- closing -----------------------------------------------------------------------
    def fatal(self, code: str, text: str, detail: str = "") -> None:
        """Tell the client why, then close its connection."""
        if self.close_reason is None:
            self.close_reason = text
        if (self.transport is not None and not self.transport.is_closing()
                and not self.cancel_only):
            self.transport.write(pg.error_response(code, text, severity="FATAL", detail=detail))
        self.close()

    def check_secret(self, secret: int) -> bool:
        return hmac.compare_digest(self.secret.to_bytes(4, "big"), secret.to_bytes(4, "big"))
