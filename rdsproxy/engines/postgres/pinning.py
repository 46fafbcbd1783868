"""RDS-Proxy-style session pinning rules for PostgreSQL: which SQL creates session state."""
import re

from ..._fastpath import KeywordScanner
from ...core.sql import split_statements

SET_VARIABLE = "set_variable"
PREPARED_STATEMENT = "prepared_statement"
TEMPORARY_OBJECT = "temporary_object"
CURSOR = "declare_cursor"
DISCARD = "discard"
LISTEN = "listen"
LOAD = "load"
SEQUENCE_FUNCTION = "sequence_function"
ADVISORY_LOCK = "advisory_lock"
LONG_STATEMENT = "statement_over_16kb"
STARTUP_OPTIONS = "startup_options"

EXCLUDE_VARIABLE_SETS = "EXCLUDE_VARIABLE_SETS"

LONG_STATEMENT_BYTES = 16384

# The hot-path pre-filter (a C loop in the compiled fast path). It must flag every text the
# careful analysis could pin, so it errs wide: a statement opening with a trigger keyword
# or a comment that could hide one, and anywhere: "temp" (TEMP, TEMPORARY, pg_temp), "tval"
# (nextval, setval), "_config" (set_config), "y_lock" (the four session-level
# pg_*advisory_lock* functions, not the _xact_ ones). Mid-statement SET (UPDATE ... SET)
# is not flagged: that is the common OLTP case. DROP / ALTER / CREATE lead too, for the
# database DDL the frontend prepares for (database_in_ddl).
PREFILTER = KeywordScanner(
    leading=[b"/*", b"--", b"set", b"reset", b"prepare", b"declare", b"discard", b"do",
             b"listen", b"load", b"drop", b"alter", b"create"],
    anywhere=[b"temp", b"tval", b"_config", b"y_lock"])

# Lexer pieces (PostgreSQL scan.l, simplified to what classification needs).
_SPACE = re.compile(r"[ \t\n\r\f\v\x00]+")
_IDENT = re.compile(r"[A-Za-z_\x80-\xff][A-Za-z0-9_$\x80-\xff]*")
_NUMBER = re.compile(r"[0-9][0-9A-Za-z_.]*")
_PARAM = re.compile(r"\$[0-9]+")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*)?\$")
_STRING_STD = re.compile(r"'((?:[^']+|'')*)'?")
_STRING_ESC = re.compile(r"'((?:[^'\\]+|''|\\.)*)'?", re.DOTALL)
_QUOTED_IDENT = re.compile(r'"((?:[^"]+|"")*)"?')
_BLOCK_COMMENT_TOKEN = re.compile(r"/\*|\*/")
_LINE_COMMENT = re.compile(r"--[^\n\r]*")

# Token kinds.
_WORD = 0      # unquoted identifier or keyword, lower-cased
_QIDENT = 1    # "quoted identifier", exact
_STRING = 2    # any string literal; value is its (roughly) unescaped content
_PUNCT = 3     # one character of punctuation/operator
_OTHER = 4     # numbers, $n parameters

_SEQUENCE_FUNCTIONS = frozenset(("nextval", "setval"))
_ADVISORY_FUNCTIONS = frozenset((
    "pg_advisory_lock", "pg_advisory_lock_shared",
    "pg_try_advisory_lock", "pg_try_advisory_lock_shared",
))
# Spellings of boolean true PostgreSQL accepts (unique prefixes of true/yes/on, and 1).
_TRUE_TEXT = frozenset(("t", "tr", "tru", "true", "y", "ye", "yes", "on", "1"))
# In a PL/pgSQL body a SQL statement may follow these block words, not only ';'.
_PLPGSQL_STATEMENT_STARTERS = frozenset(("begin", "then", "else", "loop", "declare", "exception"))
_MAX_NESTING = 3


def _tokenize(text):
    """Tokens of `text` with comments dropped; never raises, unterminated constructs run to the end."""
    tokens = []
    append = tokens.append
    pos = 0
    n = len(text)
    while pos < n:
        ch = text[pos]
        m = _SPACE.match(text, pos)
        if m:
            pos = m.end()
            continue
        if ch == "-" and text.startswith("--", pos):
            pos = _LINE_COMMENT.match(text, pos).end()
            continue
        if ch == "/" and text.startswith("/*", pos):
            # Block comments nest in PostgreSQL.
            depth = 1
            pos += 2
            while depth:
                m = _BLOCK_COMMENT_TOKEN.search(text, pos)
                if m is None:
                    pos = n
                    break
                depth += 1 if m.group() == "/*" else -1
                pos = m.end()
            continue
        if ch == "'":
            m = _STRING_STD.match(text, pos)
            append((_STRING, m.group(1).replace("''", "'")))
            pos = m.end()
            continue
        if ch == '"':
            m = _QUOTED_IDENT.match(text, pos)
            append((_QIDENT, m.group(1).replace('""', '"')))
            pos = m.end()
            continue
        if ch == "$":
            m = _DOLLAR_TAG.match(text, pos)
            if m:
                tag = m.group()
                body_start = m.end()
                end = text.find(tag, body_start)
                if end < 0:
                    append((_STRING, text[body_start:]))
                    pos = n
                else:
                    append((_STRING, text[body_start:end]))
                    pos = end + len(tag)
                continue
            m = _PARAM.match(text, pos)
            if m:
                append((_OTHER, m.group()))
                pos = m.end()
                continue
            append((_PUNCT, ch))
            pos += 1
            continue
        m = _IDENT.match(text, pos)
        if m:
            word = m.group()
            pos = m.end()
            if pos < n:
                nxt = text[pos]
                if nxt == "'":
                    # E'..' takes backslash escapes; B'..', X'..', N'..' and a type name
                    # followed by a literal all use standard quoting.
                    pattern = _STRING_ESC if word in ("e", "E") else _STRING_STD
                    m = pattern.match(text, pos)
                    if word not in ("e", "E", "b", "B", "x", "X", "n", "N"):
                        append((_WORD, word.lower()))
                    append((_STRING, m.group(1).replace("''", "'")))
                    pos = m.end()
                    continue
                if nxt == "&" and word in ("u", "U") and text.startswith(("&'", '&"'), pos):
                    pos += 1  # U&'...' / U&"...": plain quoting after the prefix
                    continue
            append((_WORD, word.lower()))
            continue
        m = _NUMBER.match(text, pos)
        if m:
            append((_OTHER, m.group()))
            pos = m.end()
            continue
        append((_PUNCT, ch))
        pos += 1
    return tokens


def _word(tokens, i):
    """The lower-cased keyword at index i, or None."""
    if i < len(tokens) and tokens[i][0] == _WORD:
        return tokens[i][1]
    return None


def _skip_explain(tokens, i):
    """Index of the statement EXPLAIN wraps (EXPLAIN ANALYZE CREATE TEMP TABLE ... AS is legal)."""
    while _word(tokens, i) == "explain":
        i += 1
        if i < len(tokens) and tokens[i] == (_PUNCT, "("):
            depth = 0
            while i < len(tokens):
                if tokens[i] == (_PUNCT, "("):
                    depth += 1
                elif tokens[i] == (_PUNCT, ")"):
                    depth -= 1
                    if depth == 0:
                        i += 1
                        break
                i += 1
        while _word(tokens, i) in ("analyze", "analyse", "verbose"):
            i += 1
    return i


def _is_pg_temp(tok):
    name = tok[1]
    if tok[0] not in (_WORD, _QIDENT):
        return False
    return name == "pg_temp" or (name.startswith("pg_temp_") and name[8:].isdigit())


def _creates_in_pg_temp(tokens, start):
    """CREATE ... pg_temp.name makes a temporary object without saying TEMP."""
    for i in range(start, len(tokens) - 1):
        if tokens[i + 1] == (_PUNCT, ".") and _is_pg_temp(tokens[i]):
            return True
    return False


def _leading_reason(tokens, i):
    """Pinning reason implied by the statement that starts at tokens[i], if any."""
    wrapped = _skip_explain(tokens, i)
    if wrapped != i:
        # Only the statements EXPLAIN ANALYZE can run and that create session state matter.
        if _word(tokens, wrapped) not in ("create", "select", "with") and (
                wrapped >= len(tokens) or tokens[wrapped] != (_PUNCT, "(")):
            return None
        i = wrapped
    if i >= len(tokens):
        return None
    first = _word(tokens, i)
    if first is None:
        # A parenthesised (SELECT ... INTO TEMP t) still creates the table.
        return _select_into_temp(tokens, i) if tokens[i] == (_PUNCT, "(") else None
    if first == "set":
        second = _word(tokens, i + 1)
        # SET LOCAL / SET TRANSACTION / SET CONSTRAINTS last only until the transaction ends.
        # SET SESSION CHARACTERISTICS changes the session default, so it pins.
        if second in ("local", "transaction", "constraints"):
            return None
        return SET_VARIABLE
    if first == "reset":
        return SET_VARIABLE
    if first == "prepare":
        # PREPARE TRANSACTION 'gid' is two-phase commit, not a prepared statement.
        if _word(tokens, i + 1) == "transaction" and i + 2 < len(tokens) and tokens[i + 2][0] == _STRING:
            return None
        return PREPARED_STATEMENT
    if first == "declare":
        return CURSOR
    if first == "discard":
        return DISCARD
    if first == "listen":
        return LISTEN
    if first == "load":
        return LOAD
    if first == "create":
        j = i + 1
        if _word(tokens, j) == "or" and _word(tokens, j + 1) == "replace":
            j += 2
        if _word(tokens, j) in ("global", "local"):
            j += 1
        if _word(tokens, j) in ("temp", "temporary"):
            return TEMPORARY_OBJECT
        if _creates_in_pg_temp(tokens, j):
            return TEMPORARY_OBJECT
        return None
    if first in ("select", "with"):
        return _select_into_temp(tokens, i)
    return None


def _select_into_temp(tokens, i):
    """SELECT ... INTO [LOCAL|GLOBAL] TEMP[ORARY] [TABLE] name creates a temporary table."""
    n = len(tokens)
    for j in range(i, n - 1):
        if tokens[j] != (_WORD, "into"):
            continue
        k = j + 1
        if _word(tokens, k) in ("local", "global"):
            k += 1
        if _word(tokens, k) in ("temp", "temporary"):
            nxt = tokens[k + 1] if k + 1 < n else None
            # "INTO temp FROM" names a plain table called temp.
            if nxt is None or nxt[0] in (_WORD, _QIDENT) and nxt[1] != "from":
                return TEMPORARY_OBJECT
        elif k < n - 1 and tokens[k + 1] == (_PUNCT, ".") and _is_pg_temp(tokens[k]):
            return TEMPORARY_OBJECT
    return None


def _call_name(tokens, i):
    """Function name called at tokens[i] (followed by '('), lower-cased as PostgreSQL folds it."""
    kind, name = tokens[i]
    if kind not in (_WORD, _QIDENT) or i + 1 >= len(tokens) or tokens[i + 1] != (_PUNCT, "("):
        return None
    return name


def _set_config_is_local(tokens, open_paren):
    """True only when set_config's third argument is literally boolean true."""
    depth = 0
    commas = 0
    arg = []
    for tok in tokens[open_paren:]:
        if tok[0] == _PUNCT and tok[1] in "([":
            depth += 1
            if depth == 1:
                continue
        elif tok[0] == _PUNCT and tok[1] in ")]":
            depth -= 1
            if depth == 0:
                break
        if depth == 1 and tok == (_PUNCT, ","):
            commas += 1
            continue
        if commas == 2:
            arg.append(tok)
    else:
        return False  # truncated text: cannot tell
    if commas != 2 or not arg:
        return False
    # Allow a trailing ::bool / ::boolean cast.
    if len(arg) == 4 and arg[1] == arg[2] == (_PUNCT, ":") and arg[3] in ((_WORD, "bool"), (_WORD, "boolean")):
        arg = arg[:1]
    if len(arg) != 1:
        return False
    kind, value = arg[0]
    if kind == _WORD:
        return value == "true"
    if kind == _STRING:
        return value.strip().lower() in _TRUE_TEXT
    return False


def database_in_ddl(sql: bytes) -> str | None:
    """The database a statement needs nobody else connected to: DROP DATABASE x, ALTER
    DATABASE x RENAME, CREATE DATABASE ... TEMPLATE x (PostgreSQL refuses them with 55006
    while other sessions use x); None for anything else."""
    statements = split_statements(_tokenize(bytes(sql).rstrip(b"\x00").decode("latin-1")),
                                  (_PUNCT, ";"))
    if len(statements) != 1:
        return None
    stmt = statements[0]
    verb, noun = _word(stmt, 0), _word(stmt, 1)
    if noun != "database":
        return None
    i = 2
    if verb == "drop":
        if _word(stmt, 2) == "if" and _word(stmt, 3) == "exists":
            i = 4
        return _name(stmt, i)
    if verb == "alter" and _word(stmt, 3) == "rename":
        return _name(stmt, 2)
    if verb == "create":
        for k in range(3, len(stmt)):
            if stmt[k] == (_WORD, "template"):
                k += 1
                if k < len(stmt) and stmt[k] == (_PUNCT, "="):
                    k += 1
                return _name(stmt, k)
    return None


def _name(tokens, i):
    """An identifier as PostgreSQL reads it: unquoted ones folded to lower case."""
    if i < len(tokens) and tokens[i][0] in (_WORD, _QIDENT):
        return tokens[i][1]
    return None


class PinningRules:
    """Decides whether a statement pins a client to its server connection, and why."""

    __slots__ = ("_excluded",)

    def __init__(self, filters=()):
        unknown = [f for f in filters if f != EXCLUDE_VARIABLE_SETS]
        if unknown:
            raise ValueError(f"unknown pinning filter(s): {', '.join(map(str, unknown))}")
        self._excluded = frozenset((SET_VARIABLE,)) if EXCLUDE_VARIABLE_SETS in filters else frozenset()

    def classify_query(self, sql, full_length=None):
        if type(sql) is not bytes:
            sql = bytes(sql)
        if full_length is not None:
            if full_length > LONG_STATEMENT_BYTES:
                return LONG_STATEMENT
        elif len(sql) > LONG_STATEMENT_BYTES and len(sql.rstrip(b"\x00")) > LONG_STATEMENT_BYTES:
            # (a trailing NUL is the message terminator, not statement text)
            return LONG_STATEMENT
        if not PREFILTER.may_match(sql):
            return None
        # latin-1 keeps every byte as one character, so any input decodes and keywords
        # (ASCII) match whatever the client encoding.
        return self._analyze(sql.decode("latin-1"), 0)

    def classify_parse(self, statement_name, sql, full_length=None):
        if statement_name and bytes(statement_name).rstrip(b"\x00"):
            return PREPARED_STATEMENT
        return self.classify_query(sql, full_length)

    def _analyze(self, text, nesting, plpgsql=False):
        excluded = self._excluded
        for stmt in split_statements(_tokenize(text), (_PUNCT, ";")):
            starts = [0]
            if plpgsql:
                starts += [k + 1 for k, tok in enumerate(stmt)
                           if tok[0] == _WORD and tok[1] in _PLPGSQL_STATEMENT_STARTERS]
            for start in starts:
                # In PL/pgSQL, DECLARE/BEGIN open blocks; the statement follows them.
                if plpgsql and _word(stmt, start) in _PLPGSQL_STATEMENT_STARTERS:
                    continue
                if start < len(stmt):
                    reason = _leading_reason(stmt, start)
                    if reason is not None and reason not in excluded:
                        return reason
            reason = self._calls(stmt)
            if reason is not None:
                return reason
            if nesting < _MAX_NESTING:
                reason = self._nested(stmt, nesting, plpgsql)
                if reason is not None:
                    return reason
        return None

    def _calls(self, stmt):
        excluded = self._excluded
        for i in range(len(stmt) - 1):
            name = _call_name(stmt, i)
            if name is None:
                continue
            if name in _SEQUENCE_FUNCTIONS:
                return SEQUENCE_FUNCTION
            if name in _ADVISORY_FUNCTIONS:
                return ADVISORY_LOCK
            if name == "set_config" and SET_VARIABLE not in excluded:
                if not _set_config_is_local(stmt, i + 1):
                    return SET_VARIABLE
        return None

    def _nested(self, stmt, nesting, plpgsql):
        """Look inside DO bodies, and inside EXECUTE'd strings within them (best effort)."""
        if not plpgsql and stmt[0] == (_WORD, "do"):
            for tok in stmt[1:]:
                if tok[0] == _STRING:
                    return self._analyze(tok[1], nesting + 1, plpgsql=True)
            return None
        if plpgsql:
            for k in range(len(stmt) - 1):
                if stmt[k] == (_WORD, "execute") and stmt[k + 1][0] == _STRING:
                    reason = self._analyze(stmt[k + 1][1], nesting + 1)
                    if reason is not None:
                        return reason
        return None
