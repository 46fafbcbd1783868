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
import re

from ..._fastpath import ClientRelay, Phase, split_messages
from ..._fastpath.pgwire import (
    MSG_BIND,
    MSG_CLOSE,
    MSG_COMMAND_COMPLETE,
    MSG_DESCRIBE,
    MSG_ERROR,
    MSG_FUNCTION_CALL,
    MSG_NOTICE,
    MSG_PARSE,
    MSG_PASSWORD,
    MSG_QUERY,
    MSG_TERMINATE,
    STATUS_IDLE,
    UNSYNCED_MASK,
)
from ..._fastpath.contract import (   # the session's states
    PG_CLIENT_AUTH_CLEARTEXT as AUTH_CLEARTEXT,
    PG_CLIENT_AUTH_MD5 as AUTH_MD5,
    PG_CLIENT_AUTH_SASL_FINAL as AUTH_SASL_FINAL,
    PG_CLIENT_AUTH_SASL_FIRST as AUTH_SASL_FIRST,
    PG_CLIENT_CLOSED as CLOSED,
    PG_CLIENT_LOGIN as LOGIN,
    PG_CLIENT_READY as READY,
    PG_CLIENT_STARTUP as STARTUP,
)
from ...auth.iam import TokenError, verify_token
from ...auth.md5 import md5_verify
from ...auth.scram import ScramError, ScramServer
from ...core.pool import BorrowTimeout
from ...core.router import UNROUTED
from ...core.sessions import ClientSide, describe_peer
from . import protocol as pg
from .backend import ServerError
from .accounts import CLEARTEXT, SCRAM, login_method
from .statements import SERVER_NAME_PREFIX, StatementBook
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

# Startup parameters the proxy carries from client to whichever connection it borrows.
TRACKED_PARAMETERS = {
    "application_name": "application_name", "client_encoding": "client_encoding",
    "datestyle": "DateStyle", "timezone": "TimeZone", "intervalstyle": "IntervalStyle",
    "extra_float_digits": "extra_float_digits", "search_path": "search_path",
    "standard_conforming_strings": "standard_conforming_strings",
}
# Startup keys that are not server settings.
STARTUP_KEYWORDS = {"user", "database", "options", "replication"}


# What PostgreSQL accepts as a setting name in a startup packet: a simple identifier for
# its own settings, two or more of them joined by dots for a custom one.
_SETTING_NAME_PART = re.compile(r"[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_$\x80-\U0010ffff]*")


def check_setting_name(name: str) -> None:
    """Refuse a startup parameter name as PostgreSQL would: it only ever reaches the server
    quoted, but a name PostgreSQL refuses must not start a session here either."""
    parts = name.split(".")
    if len(parts) == 1:
        if not _SETTING_NAME_PART.fullmatch(name):
            raise pg.ProtocolViolation(f'unrecognized configuration parameter "{name}"', "42704")
    elif not all(_SETTING_NAME_PART.fullmatch(part) for part in parts):
        raise pg.ProtocolViolation(
            f'invalid configuration parameter name "{name}"', "42602",
            detail="Custom parameter names must be two or more simple identifiers separated by dots.")


def _held_messages(held):
    if not held:
        return []
    try:
        messages, _ = split_messages(bytearray(b"".join(held)))
    except Exception:  # noqa: BLE001 - FramingError: a broken stream completed nothing we know of
        return []
    return messages


def answer_completed_a_statement(held) -> bool:
    """Whether the held-back part of an answer reports a finished statement."""
    return any(mtype == MSG_COMMAND_COMPLETE for mtype, _ in _held_messages(held))


def server_fatal_error(held) -> bytes | None:
    """The server's own FATAL ErrorResponse among the held-back answer, as sent."""
    for mtype, payload in reversed(_held_messages(held)):
        if mtype == MSG_ERROR and pg.parse_error_fields(payload).get("S") in ("FATAL", "PANIC"):
            return pg.message(b"E", payload)
    return None


def server_last_words(held) -> str:
    """The message of the last error or notice the server sent before it went away."""
    for mtype, payload in reversed(_held_messages(held)):
        if mtype in (MSG_ERROR, MSG_NOTICE):
            return pg.parse_error_fields(payload).get("M", "")
    return ""


_NAMING = (MSG_PARSE, MSG_BIND, MSG_DESCRIBE, MSG_CLOSE)


def reserved_statement_name(mtype: int, payload: bytes) -> bool:
    """Whether a Parse, Bind, Describe or Close names a statement as the proxy names its own."""
    if mtype == MSG_BIND:
        start = payload.find(b"\x00") + 1
    elif mtype == MSG_PARSE:
        start = 0
    else:
        start = 1 if payload[:1] == b"S" else len(payload)
    return payload.startswith(SERVER_NAME_PREFIX, start)


def _give_back(conn, clean: bool) -> None:
    """A connection whose client left during the proxy's own exchange on it: back to the
    pool when its session is known clean, closed otherwise."""
    if clean:
        conn.pool.release(conn)
    else:
        conn.pool.discard(conn)


def startup_session(params: dict) -> tuple:
    """What a startup packet's parameters mean for the session:
    (user, database, options, pool key, tracked parameters as sorted (name, value) pairs)."""
    user = params.get("user", "")
    if not user:
        raise pg.ProtocolViolation("no PostgreSQL user name specified in startup packet", "28000")
    if params.get("replication", "false").lower() not in ("false", "off", "no", "0"):
        raise pg.ProtocolViolation("replication connections are not supported by the proxy", "0A000")
    database = params.get("database") or user
    options = params.get("options", "").strip()
    desired = {}
    for name, value in params.items():
        canonical = TRACKED_PARAMETERS.get(name.lower())
        if canonical is not None:
            desired[canonical] = value
        elif name not in STARTUP_KEYWORDS and not name.startswith("_pq_."):
            # Any other setting is a session parameter the server would apply: carry it too.
            check_setting_name(name)
            desired[name] = value
    return user, database, options, (user, database, options), tuple(sorted(desired.items()))


class ClientConnection(ClientRelay, ClientSide, asyncio.Protocol):
    """One client of the proxy, from its first byte to its last."""

    _syncing = None
    tls = False               # the session runs over TLS
    _tls_pending = False      # 'S' sent, handshake under way
    refused = False           # over max_client_connections: answered after its startup packet
    # Defaults of what a session sets later (class attributes: a new client costs less).
    # Never one of ClientRelay's C fields: a class attribute would hide the field.
    waiting_for_route = False
    borrow_deadline = None
    seen_activity = 0
    _buf = None               # bytes of the login the engine's path has not used yet
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
        if self._buf is None:
            self._buf = bytearray()
        self._buf += data
        if self._tls_pending:
            # Decrypted bytes can arrive (plain asyncio) before start_tls has handed us the
            # TLS transport to answer on: keep them for _handshake.
            return
        try:
            self._startup_phase()
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
                self.pin(reason)
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

    def pin(self, reason: str) -> None:
        self.pin_reason = reason
        self.engine.metrics.pinned(reason)
        if self.phase == Phase.ACTIVE:
            self.enter(Phase.PINNED)
        log.debug("client %s (user %s) pinned: %s", self.peer, self.user, reason)

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
            # the error. The next health check, started from now, tells which.
            self.pending = self.replay + self.pending
            self.pending_size = sum(len(chunk) for chunk in self.pending)
            self.replay = None
            if self.statements is not None:
                self.statements.rewind()
            self.enter(Phase.WAITING)
            self.engine.failover.hold_for_health_check(self, server)
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

    # -- startup and authentication ----------------------------------------------------
    def _startup_phase(self):
        while self._buf and self.state not in (CLOSED, LOGIN, READY):
            if self.state == STARTUP:
                # Short-lived clients send the same startup packet again and again: reuse
                # what the last identical one parsed to (also sharing its key and parameter
                # tuples, so the relay's comparisons of them are identity checks).
                plan = self.engine.startup_plans.get(bytes(self._buf))
                if plan is not None:
                    self._buf.clear()
                    self.plan = plan
                    self._on_startup(plan.session)
                    continue
                packet, used = pg.read_startup_packet(self._buf)
                if packet is None:
                    return
                raw = bytes(self._buf[:used])
                del self._buf[:used]
                self._on_startup_packet(packet, raw)
            else:
                # One message at a time: once the login is done, what follows it (a query
                # sent right after the password) stays in _buf for _finish_login.
                buf = self._buf
                if len(buf) < 5:
                    return
                length = int.from_bytes(buf[1:5], "big")
                if length > 65536:
                    raise pg.ProtocolViolation("authentication message too long")
                if length < 4:
                    raise pg.ProtocolViolation(f"invalid message length {length}")
                if len(buf) <= length:
                    return
                if buf[0] != MSG_PASSWORD:
                    raise pg.ProtocolViolation(
                        f"expected password response, got message type {chr(buf[0])!r}")
                payload = bytes(buf[5:length + 1])
                del buf[:length + 1]
                self._on_password_message(payload)

    def _on_startup_packet(self, packet, raw):
        if packet.kind == "ssl" and self.engine.server_ssl is not None and not self.tls:
            self._start_tls()
        elif packet.kind in ("ssl", "gssenc"):
            self.transport.write(b"N")
        elif packet.kind == "cancel":
            # Closed once the cancel has reached the database: clients take the close to
            # mean "done" and send their next statement.
            self.state = CLOSED
            self.engine.cancel(packet.cancel_pid, packet.cancel_secret, self.peer, self.close)
        else:
            self.plan = self.engine.remember_startup(raw, startup_session(packet.params))
            self._on_startup(self.plan.session)

    def _start_tls(self):
        if self._buf:
            # As PostgreSQL: bytes sent before our 'S' were not protected by TLS and could
            # have been injected by a man in the middle (CVE-2021-23214).
            raise pg.ProtocolViolation("received unencrypted data after SSL request")
        raw = self.transport
        # Stop reading first so the ClientHello cannot reach us instead of the TLS layer;
        # start_tls resumes reading once its protocol is in place.
        raw.pause_reading()
        raw.write(b"S")
        self._tls_pending = True
        self.engine.loop.create_task(self._handshake(raw, self.engine.server_ssl))

    async def _handshake(self, raw, context):
        if await self.engine.upgrade_client_tls(self, raw) and self._buf and self.state != CLOSED:
            self.startup_data(b"")

    def _on_startup(self, session):
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
        # Whether the user exists or not, the client goes through the same exchange (a
        # decoy account's, for users who cannot log in) and fails the same way.
        account = self._account = engine.login_account(user, self.tls)
        method = login_method(account, self.tls)
        if method == CLEARTEXT:
            # The token (or, with OPTIONAL, the password) arrives as a cleartext password,
            # protected by TLS.
            self.state = AUTH_CLEARTEXT
            self.transport.write(pg.authentication(pg.AUTH_CLEARTEXT))
        elif method == SCRAM:
            self._auth = ScramServer(account.scram_secret)
            self.state = AUTH_SASL_FIRST
            self.transport.write(pg.auth_sasl())
        else:
            self._auth = self.engine.random_bytes(4)   # the md5 salt
            self.state = AUTH_MD5
            self.transport.write(pg.authentication(pg.AUTH_MD5, self._auth))

    def _on_password_message(self, payload):
        account = self._account
        if self.state != AUTH_SASL_FIRST and not self.engine.throttle.may_check(
                self.peer_host, self.engine.loop.time()):
            self._auth_failed("too many failed logins from this address: not checked")
            return
        try:
            if self.state == AUTH_SASL_FIRST:
                mechanism, data = pg.parse_sasl_initial_response(payload)
                if mechanism != "SCRAM-SHA-256":
                    raise pg.ProtocolViolation(f"unsupported SASL mechanism {mechanism!r}", "28000")
                self.transport.write(pg.authentication(pg.AUTH_SASL_CONTINUE,
                                                       self._auth.handle_client_first(data)))
                self.state = AUTH_SASL_FINAL
                return
            if self.state == AUTH_SASL_FINAL:
                final = self._auth.handle_client_final(payload)
            elif self.state == AUTH_MD5:
                response = pg.parse_password_message(payload)
                if not md5_verify(account.credentials.password, self.user, self._auth, response):
                    raise ScramError("wrong password")
            elif self.state == AUTH_CLEARTEXT:
                self._check_cleartext(account, pg.parse_password_message(payload))
            if account.decoy:   # nothing passes one; never let anything through it either
                raise ScramError("no such user")
            if self.state == AUTH_SASL_FINAL:
                self.transport.write(pg.authentication(pg.AUTH_SASL_FINAL, final))
        except (ScramError, pg.ProtocolViolation, TokenError) as exc:
            self._auth_failed(self._decoy_reason() if account.decoy else str(exc))
            return
        self._auth = None
        self._login()

    def _decoy_reason(self) -> str:
        """Why a login through a decoy account failed, for the log."""
        if self.user in self.engine.accounts:
            return "IAM authentication requires TLS (answered as for an unknown user)"
        return "no such user"

    def _check_cleartext(self, account, response: bytes) -> None:
        """An IAM token (or, with OPTIONAL, the password) sent in the clear over TLS."""
        text = response.decode("utf-8", "replace")
        looks_like_token = "/?" in text and "X-Amz-" in text
        if account.iam_auth == "REQUIRED" or looks_like_token:
            try:
                # The configured names, plus the address the client really reached (so an
                # endpoint listening on 0.0.0.0 accepts tokens for its own addresses).
                names = self.engine.config.iam_host_names(self.endpoint)
                local_host, local_port = self.local_address()
                if local_host:
                    names.append(local_host)
                principal = verify_token(text, host=names,
                                         port=local_port, user=self.user,
                                         principals=self.engine.accounts.principals,
                                         region=self.engine.accounts.iam_region)
            except TokenError as exc:
                raise TokenError(f"IAM token rejected: {exc}") from None
            log.info("client %s (user %s): IAM token of %s accepted", self.peer, self.user,
                     principal.access_key_id)
        elif not hmac.compare_digest(response, account.credentials.password.encode("utf-8")):
            raise ScramError("wrong password")

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
        self._buf = bytearray()
        self.transport.pause_reading()
        engine.loop.call_later(delay, self.fatal, "28P01", text)

    def _login(self):
        """Authenticated: learn the server's parameters for this user and database once."""
        self.state = LOGIN
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
        self.transport.write(b"".join((prefix, statuses, pg.backend_key_data(self.pid, self.secret),
                                       pg.READY_FOR_QUERY_IDLE)))
        if self._buf:  # pipelined right after the password (libpq does not, others may)
            data, self._buf = bytes(self._buf), bytearray()
            self.data_received(data)

    # -- closing -----------------------------------------------------------------------
    def fatal(self, code: str, text: str, detail: str = "") -> None:
        """Tell the client why, then close its connection."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(pg.error_response(code, text, severity="FATAL", detail=detail))
        self.close()

    def check_secret(self, secret: int) -> bool:
        return hmac.compare_digest(self.secret.to_bytes(4, "big"), secret.to_bytes(4, "big"))
