"""ResponseTracker: follows the server's answer to one command to its end, packet by packet."""
from __future__ import annotations

from .codec import ProtocolViolation, _truncated, read_lenenc_int
from .constants import (
    AUTH_MORE_DATA_HEADER, AUTH_SWITCH_HEADER, CLIENT_COMPRESS, CLIENT_DEPRECATE_EOF,
    CLIENT_OPTIONAL_RESULTSET_METADATA, COMMAND_NAMES, COM_BINLOG_DUMP, COM_BINLOG_DUMP_GTID,
    COM_CHANGE_USER, COM_CONNECT, COM_CONNECT_OUT, COM_CREATE_DB, COM_DAEMON, COM_DEBUG,
    COM_DELAYED_INSERT, COM_DROP_DB, COM_FIELD_LIST, COM_INIT_DB, COM_PING, COM_PROCESS_INFO,
    COM_PROCESS_KILL, COM_QUERY, COM_QUIT, COM_REFRESH, COM_REGISTER_SLAVE,
    COM_RESET_CONNECTION, COM_SET_OPTION, COM_SHUTDOWN, COM_SLEEP, COM_STATISTICS,
    COM_STMT_BULK_EXECUTE, COM_STMT_CLOSE, COM_STMT_EXECUTE, COM_STMT_FETCH, COM_STMT_PREPARE,
    COM_STMT_RESET, COM_STMT_SEND_LONG_DATA, COM_TABLE_DUMP, COM_TIME, CURSOR_TYPE_MASK,
    EOF_HEADER, ERR_HEADER, LOCAL_INFILE_HEADER, MARIADB_CLIENT_CACHE_METADATA,
    MARIADB_CLIENT_PROGRESS, MAX_PACKET_LENGTH, OK_HEADER, SERVER_MORE_RESULTS_EXISTS,
    SERVER_STATUS_CURSOR_EXISTS, SERVER_STATUS_IN_TRANS,
)
from .responses import EofPacket, ErrPacket, LocalInfileRequest, OkPacket, PrepareOk


# Tracker states
_DONE = 0
_FIRST = 1            # first packet of a (next) result: OK / ERR / INFILE / column count
_COLUMNS = 2          # column definitions
_COLUMNS_EOF = 3      # the EOF after column definitions (no CLIENT_DEPRECATE_EOF)
_ROWS = 4             # rows until EOF / OK(0xFE) / ERR
_INFILE_CLIENT = 5    # LOCAL INFILE: waiting for the client's file packets
_INFILE_RESULT = 6    # LOCAL INFILE: waiting for the server's OK / ERR
_SINGLE = 7           # exactly one packet: OK / EOF / ERR (or anything, for COM_STATISTICS)
_PREPARE_FIRST = 8    # COM_STMT_PREPARE_OK or ERR
_PREP_PARAMS = 9
_PREP_PARAMS_EOF = 10
_PREP_COLUMNS = 11
_PREP_COLUMNS_EOF = 12
_FIELD_LIST = 13      # column definitions until EOF / ERR
_AUTH = 14            # COM_CHANGE_USER: OK / ERR / auth switch / more data
_AUTH_CLIENT = 15     # COM_CHANGE_USER: waiting for the client's auth data

_STATE_NAMES = {
    _DONE: "done", _FIRST: "first", _COLUMNS: "columns", _COLUMNS_EOF: "columns_eof",
    _ROWS: "rows", _INFILE_CLIENT: "infile_client", _INFILE_RESULT: "infile_result",
    _SINGLE: "single", _PREPARE_FIRST: "prepare", _PREP_PARAMS: "prepare_params",
    _PREP_PARAMS_EOF: "prepare_params_eof", _PREP_COLUMNS: "prepare_columns",
    _PREP_COLUMNS_EOF: "prepare_columns_eof", _FIELD_LIST: "field_list", _AUTH: "auth",
    _AUTH_CLIENT: "auth_client",
}

# Commands answered by exactly one OK / EOF / ERR packet.
_SINGLE_PACKET_COMMANDS = frozenset((
    COM_INIT_DB, COM_PING, COM_RESET_CONNECTION, COM_SET_OPTION, COM_STMT_RESET,
    COM_PROCESS_KILL, COM_REFRESH, COM_SHUTDOWN, COM_DEBUG, COM_CREATE_DB, COM_DROP_DB,
    COM_SLEEP, COM_TIME, COM_CONNECT, COM_DELAYED_INSERT, COM_STATISTICS,
))
# Commands the server never answers.
_NO_RESPONSE_COMMANDS = frozenset((COM_QUIT, COM_STMT_CLOSE, COM_STMT_SEND_LONG_DATA))
# Commands whose answer is a replication stream or otherwise not a request/response.
_UNTRACKABLE_COMMANDS = frozenset((COM_BINLOG_DUMP, COM_BINLOG_DUMP_GTID, COM_TABLE_DUMP,
                                   COM_REGISTER_SLAVE, COM_CONNECT_OUT, COM_DAEMON))
UNTRACKED_CAPABILITIES = CLIENT_OPTIONAL_RESULTSET_METADATA | CLIENT_COMPRESS


class ResponseTracker:
    """Follows the server's answer to one command and says when it is complete.

    Create one per command sent, with the command's payload (only its first bytes are
    read: the command byte, and the cursor flags of a COM_STMT_EXECUTE) and the negotiated
    capabilities; then feed() it each server packet payload in order. feed() returns True
    once the response is complete (after that, `done` is True and feed() raises).

    Handled: OK / ERR for the simple commands; result sets with and without
    CLIENT_DEPRECATE_EOF; multi-statements and multi-results (SERVER_MORE_RESULTS_EXISTS
    in an OK or in the packet ending a result set); LOCAL INFILE (after the 0xFB request
    `awaiting_client` is True: pass the client's packets to feed_client() until its empty
    packet, then the server's OK/ERR follows); COM_STMT_PREPARE (parameter and column
    definitions); COM_STMT_EXECUTE with a cursor (when the server opens one the response
    is the metadata and its end: an EOF, or an OK with a 0xFE header under
    CLIENT_DEPRECATE_EOF, carrying SERVER_STATUS_CURSOR_EXISTS) and COM_STMT_FETCH (rows,
    then an EOF/OK whose status has SERVER_STATUS_LAST_ROW_SENT and no CURSOR_EXISTS once
    the cursor is exhausted and closed);
    COM_FIELD_LIST; COM_STATISTICS (one plain-text packet); MariaDB's cached metadata
    and progress reports; COM_CHANGE_USER's auth exchange (`awaiting_client` while the
    server waits for the client's auth data). COM_QUIT, COM_STMT_CLOSE and
    COM_STMT_SEND_LONG_DATA have no response: `expects_response` is False and the tracker
    is done from the start.

    Results: `status_flags` is the last server status seen (the initial value passed in
    until one arrives). An ERR packet carries no status: after an error `status_flags`
    still holds the last known value and `error` holds the ERR; the server's transaction
    state may have changed (a deadlock, 1213, rolls the transaction back), so a pooler
    should keep such a connection until a later OK says SERVER_STATUS_IN_TRANS is off.
    `last_ok` is the last OK packet parsed (it carries affected rows, insert id and
    session state changes), `session_state_changes` collects those of every OK,
    `prepare_ok` is the COM_STMT_PREPARE_OK (a prepare response has no status flags),
    `results` counts the results (OKs and result sets), `rows` the rows, `packets` the
    server packets fed, `warnings` the last warning count.
    """

    __slots__ = ("command", "capabilities", "status_flags", "error", "last_ok", "prepare_ok",
                 "results", "rows", "warnings", "infile_filename", "session_state_changes",
                 "_state", "_remaining", "_cursor", "_deprecate_eof", "_cache_meta",
                 "_progress", "packets")

    def __init__(self, command: bytes | int, capabilities: int, *,
                 status_flags: int = 0):
        if isinstance(command, int):
            payload = bytes((command,))
        else:
            payload = bytes(command[:6])
        if not payload:
            raise ValueError("empty command payload")
        if capabilities & UNTRACKED_CAPABILITIES:
            raise ValueError("the response tracker does not support CLIENT_COMPRESS or "
                             "CLIENT_OPTIONAL_RESULTSET_METADATA; do not negotiate them")
        cmd = payload[0]
        if cmd in _UNTRACKABLE_COMMANDS:
            raise ValueError(f"{COMMAND_NAMES.get(cmd, hex(cmd))} does not have a "
                             "request/response answer")
        self.command = cmd
        self.capabilities = capabilities
        self.status_flags = status_flags
        self.error: ErrPacket | None = None
        self.last_ok: OkPacket | None = None
        self.prepare_ok: PrepareOk | None = None
        self.results = 0
        self.rows = 0
        self.packets = 0
        self.warnings = 0
        self.infile_filename: str | None = None
        self.session_state_changes: list[tuple[int, bytes]] = []
        self._remaining = 0
        self._deprecate_eof = bool(capabilities & CLIENT_DEPRECATE_EOF)
        self._cache_meta = bool(capabilities & MARIADB_CLIENT_CACHE_METADATA)
        self._progress = bool(capabilities & MARIADB_CLIENT_PROGRESS)
        self._cursor = (cmd == COM_STMT_EXECUTE and len(payload) >= 6
                        and bool(payload[5] & CURSOR_TYPE_MASK))
        if cmd in _NO_RESPONSE_COMMANDS:
            self._state = _DONE
        elif cmd in (COM_QUERY, COM_STMT_EXECUTE, COM_PROCESS_INFO, COM_STMT_BULK_EXECUTE):
            self._state = _FIRST
        elif cmd == COM_STMT_FETCH:
            self._state = _ROWS
        elif cmd == COM_STMT_PREPARE:
            self._state = _PREPARE_FIRST
        elif cmd == COM_FIELD_LIST:
            self._state = _FIELD_LIST
        elif cmd == COM_CHANGE_USER:
            self._state = _AUTH
        elif cmd in _SINGLE_PACKET_COMMANDS:
            self._state = _SINGLE
        else:
            raise ValueError(f"unknown command byte 0x{cmd:02x}")

    # -- state --------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._state == _DONE

    @property
    def expects_response(self) -> bool:
        """False for commands the server never answers (COM_QUIT, COM_STMT_CLOSE,
        COM_STMT_SEND_LONG_DATA)."""
        return self.command not in _NO_RESPONSE_COMMANDS

    @property
    def awaiting_client(self) -> bool:
        """True while the server waits for the client (LOCAL INFILE data, change-user auth)."""
        return self._state in (_INFILE_CLIENT, _AUTH_CLIENT)

    @property
    def state(self) -> str:
        return _STATE_NAMES[self._state]

    @property
    def in_transaction(self) -> bool:
        return bool(self.status_flags & SERVER_STATUS_IN_TRANS)

    @property
    def in_rows(self) -> bool:
        """True while rows are expected (a relay may count plain rows itself)."""
        return self._state == _ROWS

    @property
    def cursor_open(self) -> bool:
        return bool(self.status_flags & SERVER_STATUS_CURSOR_EXISTS)

    # -- feeding ------------------------------------------------------------------------

    def feed(self, payload: bytes) -> bool:
        """One server packet payload; True when the response is complete."""
        state = self._state
        self.packets += 1
        if state == _ROWS:
            # The hot path: most packets of a big response are rows.
            first = payload[0] if payload else -1
            if first == EOF_HEADER:
                if self._deprecate_eof:
                    if len(payload) < MAX_PACKET_LENGTH:
                        self._end_of_result(self._ok(payload).status_flags)
                        return self._state == _DONE
                elif len(payload) < 9:
                    eof = EofPacket.parse(payload, self.capabilities)
                    self.warnings = eof.warnings
                    self._end_of_result(eof.status_flags)
                    return self._state == _DONE
            elif first == ERR_HEADER:
                return self._err(payload)
            elif first < 0:
                raise ProtocolViolation("empty packet in a result set")
            self.rows += 1
            return False
        if state == _COLUMNS or state == _PREP_PARAMS or state == _PREP_COLUMNS \
                or state == _FIELD_LIST:
            return self._column_packet(payload)
        if not payload:
            raise ProtocolViolation("empty packet from the server")
        if state == _FIRST or state == _INFILE_RESULT:
            return self._first(payload)
        if state == _COLUMNS_EOF or state == _PREP_PARAMS_EOF or state == _PREP_COLUMNS_EOF:
            return self._metadata_eof(payload)
        if state == _SINGLE:
            return self._single(payload)
        if state == _PREPARE_FIRST:
            return self._prepare_first(payload)
        if state == _AUTH:
            return self._auth(payload)
        if state == _DONE:
            raise ProtocolViolation(
                f"server sent a packet after the complete response to "
                f"{COMMAND_NAMES.get(self.command, hex(self.command))}")
        raise ProtocolViolation(f"server sent a packet while waiting for the client "
                                f"(state {_STATE_NAMES[state]})")

    def feed_client(self, payload: bytes) -> None:
        """A client packet sent while `awaiting_client` (LOCAL INFILE data; the empty
        packet ends the file. Or change-user auth data)."""
        if self._state == _INFILE_CLIENT:
            if not payload:
                self._state = _INFILE_RESULT
        elif self._state == _AUTH_CLIENT:
            self._state = _AUTH
        else:
            raise ProtocolViolation("client sent a packet while the server was answering")

    # -- helpers ------------------------------------------------------------------------

    def _ok(self, payload: bytes) -> OkPacket:
        ok = OkPacket.parse(payload, self.capabilities)
        self.last_ok = ok
        self.status_flags = ok.status_flags
        self.warnings = ok.warnings
        if ok.session_state_changes:
            self.session_state_changes.extend(ok.session_state_changes)
        return ok

    def _err(self, payload: bytes) -> bool:
        err = ErrPacket.parse(payload, self.capabilities)
        if err.is_progress and self._progress:
            return False              # a progress report, not the end
        self.error = err
        self._state = _DONE
        return True

    def _end_of_result(self, status: int) -> None:
        self.status_flags = status
        self.results += 1
        self._state = _FIRST if status & SERVER_MORE_RESULTS_EXISTS else _DONE

    def _first(self, payload: bytes) -> bool:
        first = payload[0]
        if first == OK_HEADER or (first == EOF_HEADER and len(payload) < 9):
            if first == EOF_HEADER and not self._deprecate_eof:
                eof = EofPacket.parse(payload, self.capabilities)
                self._end_of_result(eof.status_flags)
            else:
                self._end_of_result(self._ok(payload).status_flags)
            return self._state == _DONE
        if first == ERR_HEADER:
            return self._err(payload)
        if self._state == _INFILE_RESULT:
            raise ProtocolViolation("expected OK or ERR after the LOCAL INFILE data")
        if first == LOCAL_INFILE_HEADER:
            self.infile_filename = LocalInfileRequest.parse(payload).filename
            self._state = _INFILE_CLIENT
            return False
        count, pos = read_lenenc_int(payload, 0)
        if not count:
            raise ProtocolViolation("result set with no columns")
        follows = True
        if self._cache_meta:
            if pos >= len(payload):
                raise _truncated("the metadata-follows byte")
            follows = payload[pos] != 0
        if follows:
            self._remaining = count
            self._state = _COLUMNS
        else:
            self._after_columns()
        return False

    def _after_columns(self) -> None:
        if self._state in (_COLUMNS, _FIRST):
            # With CLIENT_DEPRECATE_EOF no EOF follows the metadata: rows (or, when a
            # cursor was opened, nothing) come, then an OK with a 0xFE header.
            self._state = _ROWS if self._deprecate_eof else _COLUMNS_EOF
        elif self._state == _PREP_PARAMS:
            if not self._deprecate_eof:
                self._state = _PREP_PARAMS_EOF
            else:
                self._prepare_columns()
        elif self._state == _PREP_COLUMNS:
            if not self._deprecate_eof:
                self._state = _PREP_COLUMNS_EOF
            else:
                self._state = _DONE

    def _column_packet(self, payload: bytes) -> bool:
        if not payload:
            raise ProtocolViolation("empty column definition")
        if self._state == _FIELD_LIST:
            first = payload[0]
            if first == ERR_HEADER:
                return self._err(payload)
            if first == EOF_HEADER and len(payload) < (
                    MAX_PACKET_LENGTH if self._deprecate_eof else 9):
                if self._deprecate_eof:
                    self.status_flags = self._ok(payload).status_flags
                else:
                    self.status_flags = EofPacket.parse(payload, self.capabilities).status_flags
                self.results += 1
                self._state = _DONE
                return True
            return False
        if payload[0] == ERR_HEADER:
            return self._err(payload)
        self._remaining -= 1
        if self._remaining <= 0:
            self._after_columns()
            return self._state == _DONE
        return False

    def _metadata_eof(self, payload: bytes) -> bool:
        if payload[0] == ERR_HEADER:
            return self._err(payload)
        if payload[0] != EOF_HEADER or len(payload) >= 9:
            raise ProtocolViolation("expected the EOF packet after column definitions")
        eof = EofPacket.parse(payload, self.capabilities)
        self.status_flags = eof.status_flags
        state = self._state
        if state == _COLUMNS_EOF:
            if self._cursor and eof.status_flags & SERVER_STATUS_CURSOR_EXISTS:
                # A cursor was opened: rows come later, through COM_STMT_FETCH.
                self.results += 1
                self._state = _DONE
                return True
            self._state = _ROWS
            return False
        if state == _PREP_PARAMS_EOF:
            self._prepare_columns()
            return self._state == _DONE
        self._state = _DONE
        return True

    def _single(self, payload: bytes) -> bool:
        first = payload[0]
        if first == ERR_HEADER:
            return self._err(payload)
        if self.command == COM_STATISTICS:
            pass                          # a plain string, no status
        elif first == OK_HEADER or (first == EOF_HEADER and self._deprecate_eof):
            self._ok(payload)
        elif first == EOF_HEADER and len(payload) < 9:
            eof = EofPacket.parse(payload, self.capabilities)
            self.status_flags = eof.status_flags
            self.warnings = eof.warnings
        else:
            raise ProtocolViolation(
                f"unexpected packet 0x{first:02x} in answer to "
                f"{COMMAND_NAMES.get(self.command, hex(self.command))}")
        self.results += 1
        self._state = _DONE
        return True

    def _prepare_first(self, payload: bytes) -> bool:
        if payload[0] == ERR_HEADER:
            return self._err(payload)
        self.prepare_ok = ok = PrepareOk.parse(payload)
        self.warnings = ok.warnings
        self.results += 1
        if ok.num_params:
            self._remaining = ok.num_params
            self._state = _PREP_PARAMS
        else:
            self._prepare_columns()
        return self._state == _DONE

    def _prepare_columns(self) -> None:
        n = self.prepare_ok.num_columns if self.prepare_ok else 0
        if n:
            self._remaining = n
            self._state = _PREP_COLUMNS
        else:
            self._state = _DONE

    def _auth(self, payload: bytes) -> bool:
        first = payload[0]
        if first == OK_HEADER:
            self._ok(payload)
            self.results += 1
            self._state = _DONE
            return True
        if first == ERR_HEADER:
            return self._err(payload)
        if first == AUTH_SWITCH_HEADER:
            self._state = _AUTH_CLIENT
            return False
        if first == AUTH_MORE_DATA_HEADER:
            # caching_sha2_password's "fast auth succeeded" (0x03) is followed by the OK
            # without a client reply; anything else wants one.
            if payload[1:] != b"\x03":
                self._state = _AUTH_CLIENT
            return False
        raise ProtocolViolation(f"unexpected packet 0x{first:02x} during COM_CHANGE_USER")
