"""RDS-Proxy-style rules for MySQL statements: what pins a session, what is tracked instead.

`classify(sql)` reads one COM_QUERY (or COM_STMT_PREPARE) text and returns a `Verdict`:

- `pin`: the reason the session must keep its server connection from now on (RDS Proxy's
  MySQL rules: statements over 16 KB, LOCK TABLES / FLUSH TABLES WITH READ LOCK, GET_LOCK,
  user variables, temporary tables, text-protocol PREPARE, SQL_CALC_FOUND_ROWS /
  FOUND_ROWS(), executable comments, SET of a variable that is not tracked, next-transaction
  characteristics, XA, HANDLER), or None;
- `sets`: tracked session variables this text changes, as (key, replay SQL or None for
  DEFAULT); the proxy replays them on whichever connection the client borrows next;
- `use_db`, `kill`, and flags the relay needs (mentions LAST_INSERT_ID() / ROW_COUNT(),
  ends a transaction, only reads).

The lexer is MySQL's, simplified: quoted strings and identifiers, `-- `, `#` and `/* */`
comments (an executable `/*! */` or `/*M! */` comment pins, as in RDS Proxy).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ...core.sql import split_statements

LONG_STATEMENT = "statement_over_16kb"
LOCK_TABLES = "lock_tables"
GET_LOCK = "get_lock"
USER_VARIABLE = "user_variable"
TEMPORARY_TABLE = "temporary_table"
PREPARED_STATEMENT = "text_prepared_statement"
FOUND_ROWS = "found_rows"
EXECUTABLE_COMMENT = "executable_comment"
SET_VARIABLE = "set_variable"
NEXT_TRANSACTION = "next_transaction_characteristics"
XA_TRANSACTION = "xa_transaction"
HANDLER = "handler_statement"
SET_OPTION = "com_set_option"
UNKNOWN_STATE = "unknown_session_state"
SET_ROLE = "set_role"

EXCLUDE_VARIABLE_SETS = "EXCLUDE_VARIABLE_SETS"
LONG_STATEMENT_BYTES = 16384
PLAIN_PACKETS = 4096          # texts Rules.plain_packets keeps, ...
PLAIN_PACKET_BYTES = 2048     # ... each at most this long (bounds it to 8 MB)

# Session variables replayed rather than pinned (RDS Proxy's tracked list, plus the common
# ones ProxySQL tracks). Charset and transaction settings have their own keys below.
TRACKED_VARIABLES = frozenset("""
autocommit sql_mode time_zone sql_select_limit max_execution_time max_statement_time
innodb_lock_wait_timeout lock_wait_timeout group_concat_max_len foreign_key_checks
unique_checks sql_safe_updates net_write_timeout net_read_timeout wait_timeout
interactive_timeout auto_increment_increment auto_increment_offset sql_auto_is_null
sql_big_selects sql_quote_show_create sql_notes sql_warnings query_cache_type long_query_time
div_precision_increment lc_time_names default_storage_engine optimizer_switch big_tables
max_join_size join_buffer_size sort_buffer_size tmp_table_size max_heap_table_size
explicit_defaults_for_timestamp session_track_schema sql_buffer_result
character_set_client character_set_connection character_set_results collation_connection
tx_isolation transaction_isolation tx_read_only transaction_read_only
""".split())
# Keys that `SET NAMES` / `SET CHARACTER SET` override.
CHARSET_KEYS = ("character_set_client", "character_set_connection", "character_set_results",
                "collation_connection", "names")
# Keys a connection cannot be brought back from with `SET ... = DEFAULT` alone.
RESET_ONLY_KEYS = frozenset(("names", "transaction", "character_set_client",
                             "character_set_connection", "character_set_results",
                             "collation_connection"))

_TOKEN_TEMPLATE = r"""
    (?P<space>\s+)
  | (?P<xcomment>/\*[!Mm]!?)
  | (?P<comment>/\*.*?(?:\*/|\Z)|\#[^\n]*|--(?:[ \t][^\n]*|\n|\Z))
  | (?P<string>SINGLE|DOUBLE)
  | (?P<qident>`(?:[^`]|``)*`?)
  | (?P<sysvar>@@(?:[A-Za-z_][A-Za-z0-9_$]*\.)?[A-Za-z_][A-Za-z0-9_$]*)
  | (?P<uservar>@(?:[A-Za-z0-9_$.]+|'[^']*'|"[^"]*"|`[^`]*`)?)
  | (?P<number>[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?|\.[0-9]+)
  | (?P<word>[A-Za-z_$\x80-\xff][A-Za-z0-9_$\x80-\xff]*)
  | (?P<punct>:=|.)
"""
_SINGLE_ESCAPED, _SINGLE_PLAIN = r"'(?:[^'\\]|\\.|'')*'?", r"'(?:[^']|'')*'?"
_DOUBLE_ESCAPED, _DOUBLE_PLAIN = r'"(?:[^"\\]|\\.|"")*"?', r'"(?:[^"]|"")*"?'


def _token_pattern(single: str, double: str):
    return re.compile(_TOKEN_TEMPLATE.replace("SINGLE", single).replace("DOUBLE", double),
                      re.VERBOSE | re.DOTALL)


# The server's default quoting: backslash escapes in both kinds of quotes.
_TOKEN = _token_pattern(_SINGLE_ESCAPED, _DOUBLE_ESCAPED)
# sql_mode can turn backslash escapes off (NO_BACKSLASH_ESCAPES) and make "..." an
# identifier without them (ANSI_QUOTES); a function or procedure can change it unseen.
# A text with a backslash is read every way the server might read it.
_OTHER_QUOTINGS = (
    _token_pattern(_SINGLE_PLAIN, _DOUBLE_PLAIN),      # NO_BACKSLASH_ESCAPES
    _token_pattern(_SINGLE_ESCAPED, _DOUBLE_PLAIN),    # ANSI_QUOTES
)

WORD, STRING, QIDENT, SYSVAR, USERVAR, NUMBER, PUNCT = range(7)
_KINDS = {"string": STRING, "qident": QIDENT, "sysvar": SYSVAR, "uservar": USERVAR,
          "number": NUMBER, "word": WORD, "punct": PUNCT}

# A statement that starts with none of these words and has none of these characters is
# plain (the common SELECT/INSERT/UPDATE): it skips the lexer.
_QUICK = re.compile(rb"[@;#]|/\*|--|lock|temporary|found_rows|last_insert_id|row_count|"
                    rb"connection_id|handler", re.IGNORECASE)
_FIRST_WORD = re.compile(rb"\s*([A-Za-z]+)")
_PLAIN_FIRST = frozenset((b"select", b"insert", b"update", b"delete", b"replace", b"with",
                          b"call", b"show", b"describe", b"desc", b"explain", b"values",
                          b"table"))
_READ_FIRST = frozenset(("select", "show", "describe", "desc", "explain", "values", "table",
                         "with"))


@dataclass
class Verdict:
    pin: str | None = None
    sets: list = field(default_factory=list)       # (key, replay SQL or None = DEFAULT)
    use_db: str | None = None
    kill: tuple | None = None                      # (query_only, connection id)
    last_insert_id: bool = False                   # mentions LAST_INSERT_ID()
    row_count: bool = False                        # mentions ROW_COUNT()
    simple_row_count: bool = False                 # is exactly SELECT ROW_COUNT()
    simple_connection_id: bool = False             # is exactly SELECT CONNECTION_ID()
    connection_id: bool = False                    # calls CONNECTION_ID() anywhere
    ends_transaction: bool = False                 # COMMIT / ROLLBACK (not TO SAVEPOINT)
    read_only: bool = False                        # only SELECT/SHOW-like statements
    statements: int = 0

    @property
    def plain(self) -> bool:
        """Nothing to do but send it and relay the answer: no pin, no state the proxy
        tracks or rewrites, nothing it answers itself (the relay's quick lane takes only
        such statements)."""
        return (self.pin is None and not self.sets and self.use_db is None and self.kill is None
                and not self.last_insert_id and not self.row_count and not self.connection_id
                and not self.simple_row_count and not self.simple_connection_id)


PLAIN = Verdict(read_only=False, statements=1)


def _tokens(text: str, pattern=_TOKEN):
    out = []
    xcomment = False
    for m in pattern.finditer(text):
        kind = m.lastgroup
        if kind in ("space", "comment"):
            continue
        if kind == "xcomment":
            xcomment = True      # its content is SQL to MySQL: keep lexing inside it
            continue
        value = m.group()
        if kind == "word":
            value = value.lower()
        elif kind == "punct" and value == "*" and text.startswith("*/", m.start()):
            continue
        out.append((_KINDS[kind], value))
    return out, xcomment


def with_connection_id(sql: bytes, connection_id: int) -> bytes:
    """`sql` with every call of CONNECTION_ID() replaced by `connection_id`, the id the
    client knows (the server's own would name the borrowed connection). Calls only: the
    same letters in strings, quoted names and comments stay."""
    text = sql.decode("latin-1")
    out = []
    pos = 0
    tokens = [m for m in _TOKEN.finditer(text) if m.lastgroup not in ("space", "comment")]
    for i, m in enumerate(tokens):
        if m.lastgroup != "word" or m.group().lower() != "connection_id":
            continue
        if [t.group() for t in tokens[i + 1:i + 3]] != ["(", ")"]:
            continue
        end = tokens[i + 2].end()
        value = str(connection_id)
        before = tokens[i - 1].group().lower() if i else ""
        after = tokens[i + 3].group().lower() if i + 3 < len(tokens) else ""
        if before in ("select", ",") and after in ("", ",", ";", "from", "into"):
            # A whole column: named as MySQL names it, after the text of the call.
            value += " AS `" + text[m.start():end].replace("`", "``") + "`"
        out.append(text[pos:m.start()])
        out.append(value)
        pos = end
    out.append(text[pos:])
    return "".join(out).encode("latin-1")


def _word(stmt, i):
    return stmt[i][1] if i < len(stmt) and stmt[i][0] == WORD else None


def _unquote(tok) -> str:
    kind, value = tok
    if kind == QIDENT:
        return value[1:-1].replace("``", "`")
    if kind == STRING:
        return value[1:-1]
    return value


class Rules:
    """The pinning rules with the target group's session_pinning_filters applied."""

    def __init__(self, filters=()):
        unknown = [f for f in filters if f != EXCLUDE_VARIABLE_SETS]
        if unknown:
            raise ValueError(f"unknown pinning filter(s): {', '.join(map(str, unknown))}")
        self.exclude_sets = EXCLUDE_VARIABLE_SETS in filters
        # Raw COM_QUERY packets (header and text) whose one statement is plain -> its
        # Verdict: the relay's quick lane sends them again without a word of Python.
        self.plain_packets: dict[bytes, Verdict] = {}

    def remember_plain(self, packet: bytes, verdict: Verdict) -> None:
        """Keep `verdict` (plain, one statement) for the exact `packet`; the table is
        bounded in entries and in the size of each (a flood of distinct texts empties it)."""
        if len(packet) > PLAIN_PACKET_BYTES:
            return
        if len(self.plain_packets) >= PLAIN_PACKETS:
            self.plain_packets.clear()
        self.plain_packets[packet] = verdict

    def classify(self, sql: bytes) -> Verdict:
        if len(sql) > LONG_STATEMENT_BYTES:
            return Verdict(pin=LONG_STATEMENT, statements=1)
        m = _FIRST_WORD.match(sql)
        if m is not None and m.group(1).lower() in _PLAIN_FIRST and _QUICK.search(sql) is None:
            first = m.group(1).lower().decode()
            return Verdict(read_only=first in _READ_FIRST, statements=1)
        return self._analyze(sql.decode("latin-1"))

    def _analyze(self, text: str) -> Verdict:
        verdict = self._analyze_as(text, _TOKEN)
        if "\\" in text and any(self._analyze_as(text, pattern) != verdict
                                 for pattern in _OTHER_QUOTINGS):
            # The statements differ with the session's quoting rules, which the proxy
            # does not know for sure: keep the connection for this client.
            verdict.pin = UNKNOWN_STATE
        return verdict

    def _analyze_as(self, text: str, pattern) -> Verdict:
        tokens, xcomment = _tokens(text, pattern)
        verdict = Verdict()
        statements = split_statements(tokens, (PUNCT, ";"))
        verdict.statements = len(statements)
        read_only = True
        reasons = []
        if xcomment:
            reasons.append(EXECUTABLE_COMMENT)
        for stmt in statements:
            first = _word(stmt, 0)
            if first not in _READ_FIRST:
                read_only = False
            reason = self._statement(stmt, first, verdict)
            if reason is not None:
                reasons.append(reason)
        verdict.read_only = read_only and bool(statements)
        if reasons:
            verdict.pin = reasons[0]
        if (len(statements) == 1 and len(statements[0]) == 4 and _word(statements[0], 0) == "select"
                and statements[0][2:] == [(PUNCT, "("), (PUNCT, ")")]):
            verdict.simple_row_count = _word(statements[0], 1) == "row_count"
            verdict.simple_connection_id = _word(statements[0], 1) == "connection_id"
        return verdict

    def _statement(self, stmt, first, verdict: Verdict):
        reason = None
        # Calls and variables anywhere in the statement.
        for i, (kind, value) in enumerate(stmt):
            if kind == USERVAR:
                reason = reason or USER_VARIABLE
            elif kind == WORD and i + 1 < len(stmt) and stmt[i + 1] == (PUNCT, "("):
                if value == "get_lock":
                    reason = reason or GET_LOCK
                elif value == "found_rows":
                    reason = reason or FOUND_ROWS
                elif value == "last_insert_id":
                    verdict.last_insert_id = True
                elif value == "row_count":
                    verdict.row_count = True
                elif value == "connection_id":
                    verdict.connection_id = True
            elif kind == WORD and value == "sql_calc_found_rows":
                reason = reason or FOUND_ROWS
        if first == "set":
            return self._set(stmt, verdict) or reason
        if first in ("lock", "unlock"):
            # LOCK TABLES pins; UNLOCK TABLES leaves the session pinned (RDS Proxy does too).
            return LOCK_TABLES if first == "lock" else reason
        if first == "flush" and any(t == (WORD, "lock") for t in stmt):
            return LOCK_TABLES
        if first == "create" and TEMPORARY_TABLE_WORD in (_word(stmt, 1), _word(stmt, 2)):
            return TEMPORARY_TABLE
        if first == "create" and _word(stmt, 1) == "or" and _word(stmt, 3) == "temporary":
            return TEMPORARY_TABLE
        if first in ("prepare", "execute", "deallocate") or (first == "drop" and _word(stmt, 1) == "prepare"):
            return PREPARED_STATEMENT
        if first == "xa":
            return XA_TRANSACTION
        if first == "handler":
            return HANDLER
        if first == "use" and len(stmt) >= 2:
            verdict.use_db = _unquote(stmt[1])
        elif first in ("commit", "rollback"):
            if not any(t == (WORD, "to") for t in stmt):
                verdict.ends_transaction = True
        elif first == "kill":
            # KILL [HARD|SOFT] [CONNECTION|QUERY] <id>: the id is the proxy's (a server
            # thread id must never be reachable this way). KILL ... USER / QUERY ID name
            # the server's own things and go to it; any other form is refused.
            j = 1
            if _word(stmt, j) in ("hard", "soft"):
                j += 1
            query_only = _word(stmt, j) == "query"
            if _word(stmt, j) in ("query", "connection"):
                j += 1
            if _word(stmt, j) in ("user", "id"):
                pass
            elif j == len(stmt) - 1 and stmt[j][0] == NUMBER and stmt[j][1].isdigit():
                verdict.kill = (query_only, int(stmt[j][1]))
            else:
                verdict.kill = (query_only, None)
        return reason

    # -- SET -----------------------------------------------------------------------------
    def _set(self, stmt, verdict: Verdict):
        second = _word(stmt, 1)
        if second == "transaction":
            return NEXT_TRANSACTION             # only the next transaction: pin, as RDS does
        if second in ("global", "persist", "persist_only", "password", "default", "statement"):
            return None                          # nothing session-scoped to keep
        if second == "role":
            return SET_ROLE   # privileges: never replayed, never excluded by a filter
        if second in ("session", "local") and _word(stmt, 2) == "transaction":
            return self._set_transaction(stmt[3:], verdict)
        untracked = False
        for part in _assignments(stmt[1:]):
            key, replay = _assignment(part)
            if key is None:
                if part and part[0][0] == USERVAR:
                    return USER_VARIABLE
                if part and (part[0] == (WORD, "global") or (part[0][0] == SYSVAR and
                                                             part[0][1].lower().startswith("@@global."))):
                    continue
                untracked = True
            elif key is False:
                untracked = True
            else:
                verdict.sets.append((key, replay))
        if untracked:
            verdict.sets = []
            return None if self.exclude_sets else SET_VARIABLE
        return None

    def _set_transaction(self, rest, verdict: Verdict):
        words = [v for k, v in rest if k == WORD]
        text = " ".join(words).upper()
        if not re.fullmatch(r"(ISOLATION LEVEL (READ UNCOMMITTED|READ COMMITTED|REPEATABLE READ|"
                            r"SERIALIZABLE)|READ ONLY|READ WRITE)"
                            r"( (ISOLATION LEVEL (READ UNCOMMITTED|READ COMMITTED|REPEATABLE READ|"
                            r"SERIALIZABLE)|READ ONLY|READ WRITE))?", text.replace(" ,", "")):
            return None if self.exclude_sets else SET_VARIABLE
        verdict.sets.append(("transaction", "SET SESSION TRANSACTION " + ", ".join(
            _split_characteristics(words))))
        return None


TEMPORARY_TABLE_WORD = "temporary"


def _split_characteristics(words):
    parts, current = [], []
    for w in words:
        current.append(w.upper())
        if w.lower() in ("committed", "uncommitted", "read", "serializable", "only", "write") and (
                len(current) >= 2 and current[-2] in ("READ", "REPEATABLE") or w.lower() == "serializable"):
            parts.append(" ".join(current))
            current = []
    if current:
        parts.append(" ".join(current))
    return parts


def _assignments(tokens):
    parts, current, depth = [], [], 0
    for tok in tokens:
        if tok == (PUNCT, "("):
            depth += 1
        elif tok == (PUNCT, ")"):
            depth -= 1
        if tok == (PUNCT, ",") and depth == 0:
            parts.append(current)
            current = []
        else:
            current.append(tok)
    if current:
        parts.append(current)
    return parts


def _simple_value(tokens):
    """The SQL of a value the proxy can replay as is: one literal, number or word, or None."""
    if len(tokens) == 1 and tokens[0][0] in (STRING, NUMBER, WORD, QIDENT):
        return tokens[0][1]
    if len(tokens) == 2 and tokens[0] in ((PUNCT, "-"), (PUNCT, "+")) and tokens[1][0] == NUMBER:
        return tokens[0][1] + tokens[1][1]
    return None


def _assignment(part):
    """(key, replay) for one assignment of a SET list; (None, None) when it is not a
    session variable; (False, None) for a session variable the proxy does not track."""
    if not part:
        return False, None
    head = part[0]
    if head[0] == WORD and head[1] in ("names", "charset") or (
            head[0] == WORD and head[1] == "character" and _word(part, 1) == "set"):
        start = 1 if head[1] != "character" else 2
        rest = part[start:]
        if not rest or any(t[0] not in (WORD, STRING, QIDENT) for t in rest):
            return False, None
        if len(rest) not in (1, 3) or (len(rest) == 3 and rest[1] != (WORD, "collate")):
            return False, None
        verb = "NAMES" if head[1] == "names" else "CHARACTER SET"
        collate = f" COLLATE {rest[2][1]}" if len(rest) == 3 else ""
        return "names", f"{verb} {rest[0][1]}{collate}"
    scope_session = False
    if head[0] == WORD and head[1] in ("session", "local"):
        part = part[1:]
        scope_session = True
    if not part:
        return False, None
    head = part[0]
    if head[0] == USERVAR:
        return None, None
    if head[0] == SYSVAR:
        name = head[1][2:].lower()
        if name.startswith("global."):
            return None, None
        for prefix in ("session.", "local."):
            if name.startswith(prefix):
                name = name[len(prefix):]
    elif head[0] in (WORD, QIDENT):
        if head[1] == "global":
            return None, None
        name = _unquote(head).lower()
    else:
        return False, None
    del scope_session
    if len(part) < 3 or part[1] not in ((PUNCT, "="), (PUNCT, ":=")):
        return False, None
    if name not in TRACKED_VARIABLES:
        return False, None
    value = _simple_value(part[2:])
    if value is None:
        return False, None
    if value.lower() == "default":
        return name, None
    return name, f"@@SESSION.{name} = {value}"


def autocommit_value(replay: str | None) -> bool:
    """Whether a tracked autocommit assignment turns autocommit on."""
    if replay is None:
        return True
    value = replay.split("=", 1)[1].strip().strip("'\"").lower()
    return value not in ("0", "off", "false")
