"""RDS-Proxy-style session pinning rules for PostgreSQL: which SQL creates session state."""
import re

from ..._fastpath import KeywordScanner
from ...core.sql import split_statements

SET_VARIABLE = "set_variable"
SET_ROLE = "set_role"          # SET ROLE / SESSION AUTHORIZATION: never crosses clients
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
UNKNOWN_STATE = "unknown_state"   # the server's answer to the state check could not be had

# Not a pin: the text may change session state in ways it does not show (a function the
# proxy does not know, DO, CALL, a FunctionCall message). The server is asked what the
# session holds before its connection serves anyone else (sessionstate.STATE_CHECK_SQL).
UNVERIFIED = "unverified"

EXCLUDE_VARIABLE_SETS = "EXCLUDE_VARIABLE_SETS"

LONG_STATEMENT_BYTES = 16384

# The hot-path pre-filter (a C loop in the compiled fast path). It must flag every text the
# careful analysis could pin, so it errs wide: a statement opening with a trigger keyword
# or a comment that could hide one, and anywhere: "temp" (TEMP, TEMPORARY, pg_temp), "tval"
# (nextval, setval), "_config" (set_config), "y_lock" (the four session-level
# pg_*advisory_lock* functions, not the _xact_ ones). Mid-statement SET (UPDATE ... SET)
# is not flagged: that is the common OLTP case. DROP / ALTER / CREATE lead too, for the
# database DDL the frontend prepares for (database_in_ddl). And "(": any function call,
# which may run code the text does not show (repeated texts hit the rules' cache), and
# "u&": a U&"..." name can spell pg_temp or anything else without its letters.
PREFILTER = KeywordScanner(
    leading=[b"/*", b"--", b"set", b"reset", b"prepare", b"declare", b"discard", b"do",
             b"listen", b"load", b"drop", b"alter", b"create", b"call", b"deallocate"],
    anywhere=[b"temp", b"tval", b"_config", b"y_lock", b"(", b"u&"])

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
_UNICODE_ESCAPES = re.compile(r"[uU]&[\"']")

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
# What SET / RESET name when they change who the session acts as.
_ROLE_WORDS = frozenset(("role", "authorization", "session", "session_authorization"))
_ROLE_SETTINGS = frozenset(("role", "session_authorization"))

# Built-in functions (pg_catalog) that change nothing of the session, so a call to one
# needs no look at the server afterwards; type names used as casts are here too. Any
# other call may be a user's function, which can do anything a session can.
_HARMLESS_FUNCTIONS = frozenset("""
    count sum avg min max array_agg string_agg bool_and bool_or every json_agg jsonb_agg
    json_object_agg jsonb_object_agg stddev stddev_pop stddev_samp variance var_pop var_samp
    percentile_cont percentile_disc mode bit_and bit_or row_number rank dense_rank
    percent_rank cume_dist ntile lag lead first_value last_value nth_value
    length char_length character_length octet_length bit_length lower upper initcap substr
    left right lpad rpad ltrim rtrim btrim replace translate strpos split_part concat
    concat_ws format repeat reverse regexp_replace regexp_match regexp_matches regexp_like
    regexp_split_to_array regexp_split_to_table starts_with md5 sha224 sha256 sha384 sha512
    encode decode to_hex ascii chr quote_ident quote_literal quote_nullable string_to_array
    array_to_string abs ceil ceiling floor round trunc mod power pow sqrt cbrt exp ln log
    log10 sign random div pi degrees radians sin cos tan width_bucket gcd lcm now
    statement_timestamp transaction_timestamp clock_timestamp timeofday date_trunc date_part
    age to_char to_date to_timestamp to_number make_date make_time make_timestamp
    make_timestamptz make_interval justify_days justify_hours justify_interval isfinite
    date_bin timezone to_json to_jsonb row_to_json array_to_json json_build_object
    jsonb_build_object json_build_array jsonb_build_array json_object jsonb_object jsonb_set
    jsonb_insert jsonb_strip_nulls jsonb_pretty json_extract_path jsonb_extract_path
    json_extract_path_text jsonb_extract_path_text json_array_length jsonb_array_length
    json_array_elements jsonb_array_elements json_array_elements_text
    jsonb_array_elements_text json_each jsonb_each json_each_text jsonb_each_text
    json_object_keys jsonb_object_keys json_typeof jsonb_typeof json_populate_record
    jsonb_populate_record json_to_record jsonb_to_record jsonb_path_query jsonb_path_exists
    jsonb_path_match array_length array_upper array_lower array_dims array_ndims cardinality
    array_append array_prepend array_cat array_remove array_replace array_position
    array_positions unnest generate_series generate_subscripts gen_random_uuid version
    pg_backend_pid current_database current_schema current_schemas current_setting
    pg_postmaster_start_time inet_server_addr inet_server_port txid_current
    txid_current_if_assigned pg_current_xact_id pg_is_in_recovery pg_sleep pg_typeof
    pg_column_size pg_size_pretty pg_database_size pg_relation_size pg_total_relation_size
    pg_table_size pg_indexes_size has_table_privilege has_schema_privilege
    has_database_privilege has_column_privilege has_function_privilege pg_has_role
    obj_description col_description format_type pg_get_expr pg_get_indexdef
    pg_get_constraintdef pg_get_viewdef pg_get_functiondef pg_get_userbyid
    pg_table_is_visible to_regclass to_regtype to_regproc pg_get_serial_sequence
    pg_encoding_to_char pg_client_encoding pg_notify pg_advisory_xact_lock
    pg_advisory_xact_lock_shared pg_try_advisory_xact_lock pg_try_advisory_xact_lock_shared
    pg_advisory_unlock pg_advisory_unlock_shared pg_advisory_unlock_all
    pg_listening_channels pg_my_temp_schema currval lastval to_tsvector to_tsquery
    plainto_tsquery phraseto_tsquery websearch_to_tsquery ts_rank ts_rank_cd ts_headline
    setweight int int2 int4 int8 integer smallint bigint numeric decimal float float4 float8
    real text varchar char character bool boolean date time timetz timestamp timestamptz
    interval bytea uuid json jsonb bit varbit inet cidr macaddr money oid regclass regtype
    name
""".split())
# Words followed by "(" that are syntax, not a call.
_NOT_CALLS = frozenset("""
    all and any array as at between by case cast check coalesce collate conflict cube
    default distinct do else escape except exists extract filter for from greatest group
    grouping groups having ilike in include intersect is join key lateral least like limit
    materialized not nullif of offset on or over overlay partition position primary range
    recursive references returning returns rollup row rows select set sets similar some
    substring table tablesample then to trim union unique using values when where window
    with within zone
""".split())
# After these words a name followed by "(" is a relation or a definition, not a call:
# INSERT INTO t (a), CREATE TABLE [IF NOT EXISTS] t (...), REFERENCES t (a), COPY t (a),
# CREATE FUNCTION f (...), CREATE VIEW v (a), EXECUTE statement (args), and an alias's
# column list (FROM generate_series(1, 3) AS g (i)) or a type's modifiers (AS varchar (9)).
_RELATION_CONTEXT = frozenset((
    "into", "table", "exists", "references", "copy", "function", "procedure", "view",
    "aggregate", "analyze", "analyse", "tablesample", "execute", "as"))

# Spellings of boolean true PostgreSQL accepts (unique prefixes of true/yes/on, and 1).
_TRUE_TEXT = frozenset(("t", "tr", "tru", "true", "y", "ye", "yes", "on", "1"))
# In a PL/pgSQL body a SQL statement may follow these block words, not only ';'.
_PLPGSQL_STATEMENT_STARTERS = frozenset(("begin", "then", "else", "loop", "declare", "exception"))
_MAX_NESTING = 3
# SET forms that spell their setting in other words, and the setting's name.
_SET_SPELLINGS = (
    (("time", "zone"), "timezone"), (("xml", "option"), "xmloption"),
    (("names",), "client_encoding"), (("schema",), "search_path"))
# SET / RESET targets that are not one named setting of the session.
_NOT_ONE_SETTING = frozenset((
    "role", "session", "authorization", "session_authorization", "all", "seed", "local",
    "transaction", "constraints", "characteristics"))


def _tokenize(text, backslash_quotes=False, starts=None):
    """Tokens of `text` with comments dropped; never raises, unterminated constructs run to
    the end. `backslash_quotes`: plain '' strings take backslash escapes, as they do while
    standard_conforming_strings is off. `starts`, if given, receives each token's offset."""
    plain_string = _STRING_ESC if backslash_quotes else _STRING_STD
    tokens = []
    append = tokens.append
    pos = 0
    n = len(text)
    token_start = 0
    while pos < n:
        if starts is not None:
            while len(starts) < len(tokens):
                starts.append(token_start)
            token_start = pos
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
            m = plain_string.match(text, pos)
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
                    pattern = _STRING_ESC if word in ("e", "E") else plain_string
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
    if starts is not None:
        while len(starts) < len(tokens):
            starts.append(token_start)
    return tokens


def prepare_statement_text(source: bytes, name: bytes) -> bytes | None:
    """The one statement `PREPARE name ... AS ...` of `source`, the query text in which a
    session made the SQL prepared statement `name` (pg_prepared_statements.statement, the
    whole text even when it held other statements), to make it again on another
    connection. None unless the text shows exactly one, read the same whichever way
    backslashes quote, and without a backslash (it could mean two things)."""
    text = source.decode("latin-1")   # one character per byte: slices are the bytes
    wanted = name.decode("latin-1")
    found = _find_prepare(text, wanted, False)
    if "\\" in text:
        if found is None or "\\" in found or found != _find_prepare(text, wanted, True):
            return None
    return None if found is None else found.encode("latin-1")


def _find_prepare(text: str, name: str, backslash_quotes: bool) -> str | None:
    starts = []
    tokens = _tokenize(text, backslash_quotes, starts)
    found = None
    first = 0   # the index of the current statement's first token
    for i in range(len(tokens) + 1):
        if i < len(tokens) and tokens[i] != (_PUNCT, ";"):
            continue
        # PREPARE name AS ... or PREPARE name (types) AS ...
        if i > first + 2 and _word(tokens, first) == "prepare" and (
                _word(tokens, first + 2) == "as" or tokens[first + 2] == (_PUNCT, "(")):
            kind, value = tokens[first + 1]
            if (kind == _QIDENT and value == name) or (kind == _WORD and value == name.lower() == name):
                if found is not None:
                    return None   # made, dropped and made again: which one is left?
                end = starts[i] if i < len(tokens) else len(text)
                found = text[starts[first]:end].rstrip()
        first = i + 1
    return found


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
        if second == "session":   # SET SESSION x is SET x (CHARACTERISTICS aside)
            second = _word(tokens, i + 2)
        return SET_ROLE if second in _ROLE_WORDS else SET_VARIABLE
    if first == "reset":
        second = _word(tokens, i + 1)
        return SET_ROLE if second in _ROLE_WORDS else SET_VARIABLE
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


def _first_argument(tokens, open_paren):
    """The first argument of a call when it is a plain string literal, else None."""
    if open_paren + 2 < len(tokens) and tokens[open_paren + 1][0] == _STRING and tokens[open_paren + 2] in (
            (_PUNCT, ","), (_PUNCT, ")")):
        return tokens[open_paren + 1][1]
    return None


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


def _settings_named(text: str) -> tuple | None:
    if "\\" in text or _UNICODE_ESCAPES.search(text):
        return None
    names = []
    for stmt in split_statements(_tokenize(text), (_PUNCT, ";")):
        first = _word(stmt, 0)
        if first not in ("set", "reset"):
            return None
        i = 2 if first == "set" and _word(stmt, 1) == "session" else 1
        for words, spelled in _SET_SPELLINGS:
            if all(_word(stmt, i + k) == word for k, word in enumerate(words)):
                name = spelled
                i += len(words)
                break
        else:
            name, i = _setting_name(stmt, i)
            if name is None or name in _NOT_ONE_SETTING:
                return None
            if first == "set":
                if i >= len(stmt) or not (_word(stmt, i) == "to" or stmt[i] == (_PUNCT, "=")):
                    return None
                i += 1
        if first == "reset":
            if i != len(stmt):
                return None
        else:
            value = stmt[i:]
            # Literals, names, numbers, commas and signs; never a call or a subquery.
            if not value or any(kind == _PUNCT and tok not in ",-+." for kind, tok in value):
                return None
        names.append(name)
    return tuple(names) if names else None


def _setting_name(stmt, i):
    """(the lower-cased, possibly dotted, setting name at stmt[i], the index after it),
    or (None, i)."""
    parts = []
    while i < len(stmt) and stmt[i][0] in (_WORD, _QIDENT):
        parts.append(stmt[i][1].lower())
        i += 1
        if i + 1 < len(stmt) and stmt[i] == (_PUNCT, ".") and stmt[i + 1][0] in (_WORD, _QIDENT):
            i += 1
            continue
        break
    return (".".join(parts), i) if parts else (None, i)


class PinningRules:
    """Decides whether a statement pins a client to its server connection, and why; or
    whether the server must be asked about the session afterwards (UNVERIFIED)."""

    __slots__ = ("_excluded", "_cache", "_set_cache")

    CACHE_SIZE = 4096   # texts whose answer is kept (drivers and ORMs repeat theirs)

    def __init__(self, filters=()):
        unknown = [f for f in filters if f != EXCLUDE_VARIABLE_SETS]
        if unknown:
            raise ValueError(f"unknown pinning filter(s): {', '.join(map(str, unknown))}")
        self._excluded = frozenset((SET_VARIABLE,)) if EXCLUDE_VARIABLE_SETS in filters else frozenset()
        self._cache = {}
        self._set_cache = {}

    @property
    def variable_sets_excluded(self) -> bool:
        return SET_VARIABLE in self._excluded

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
        cache = self._cache
        try:
            return cache[sql]
        except KeyError:
            pass
        # latin-1 keeps every byte as one character, so any input decodes and keywords
        # (ASCII) match whatever the client encoding.
        reason = self._analyze(sql.decode("latin-1"), 0)
        if len(cache) >= self.CACHE_SIZE:
            cache.clear()
        cache[sql] = reason
        return reason

    def settings_named(self, sql) -> tuple | None:
        """The settings a text changes when it holds nothing but SET and RESET statements
        of named settings (lower-cased names, which the server can be asked for one by
        one); None when it holds anything else, or could be read two ways. A SET runs no
        code: its value is a literal, a name or a number."""
        if type(sql) is not bytes:
            sql = bytes(sql)
        cache = self._set_cache
        try:
            return cache[sql]
        except KeyError:
            pass
        names = _settings_named(sql.rstrip(b"\x00").decode("latin-1"))
        if len(cache) >= self.CACHE_SIZE:
            cache.clear()
        cache[sql] = names
        return names

    def _analyze(self, text, nesting, plpgsql=False):
        """The text's pin reason, else UNVERIFIED, else None. Where backslashes could be
        quoting (standard_conforming_strings off), both ways of reading it count."""
        found = self._analyze_tokens(_tokenize(text), nesting, plpgsql)
        if "\\" in text:
            other = self._analyze_tokens(_tokenize(text, backslash_quotes=True), nesting, plpgsql)
            if found is None or (found == UNVERIFIED and other is not None):
                found = other
        if found is None and _UNICODE_ESCAPES.search(text):
            # U&"..." can spell any name (U&"set\005fconfig"): the names read here need
            # not be the ones the server reads.
            found = UNVERIFIED
        return found

    def _analyze_tokens(self, tokens, nesting, plpgsql):
        excluded = self._excluded
        unverified = False
        for stmt in split_statements(tokens, (_PUNCT, ";")):
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
            first = _word(stmt, 0)
            # DEALLOCATE may drop the proxy's own statements: the check recounts them.
            if first in ("do", "call", "deallocate") or (plpgsql and "execute" in (t[1] for t in stmt if t[0] == _WORD)):
                unverified = True   # code the text does not show, or text built at run time
            reason = self._calls(stmt)
            if reason == UNVERIFIED:
                unverified = True
            elif reason is not None:
                return reason
            if nesting < _MAX_NESTING:
                reason = self._nested(stmt, nesting, plpgsql)
                if reason == UNVERIFIED:
                    unverified = True
                elif reason is not None:
                    return reason
        return UNVERIFIED if unverified else None

    def _calls(self, stmt):
        """The pin reason of a function call in the statement, else UNVERIFIED when it
        calls something not known to be harmless, else None."""
        excluded = self._excluded
        unverified = False
        for i in range(len(stmt) - 1):
            name = _call_name(stmt, i)
            if name is None:
                continue
            quoted = stmt[i][0] == _QIDENT
            # Walk back over a qualified name (schema.name, db.schema.name).
            first = i
            while first >= 2 and stmt[first - 1] == (_PUNCT, ".") and stmt[first - 2][0] in (_WORD, _QIDENT):
                first -= 2
            before = _word(stmt, first - 1) if first > 0 else None
            if before in _RELATION_CONTEXT:
                continue
            if first == i and not quoted and name in _NOT_CALLS:
                continue
            qualified_elsewhere = first != i and not (first == i - 2 and stmt[first][1] == "pg_catalog")
            if qualified_elsewhere:
                unverified = True
                continue
            if name in _SEQUENCE_FUNCTIONS:
                return SEQUENCE_FUNCTION
            if name in _ADVISORY_FUNCTIONS:
                return ADVISORY_LOCK
            if name == "set_config":
                if _set_config_is_local(stmt, i + 1):
                    continue
                setting = _first_argument(stmt, i + 1)
                if setting is None or setting.strip().lower() in _ROLE_SETTINGS:
                    return SET_ROLE   # a name we cannot read may be the role
                if SET_VARIABLE not in excluded:
                    return SET_VARIABLE
                continue
            if name not in _HARMLESS_FUNCTIONS:
                unverified = True
        return UNVERIFIED if unverified else None

    def _nested(self, stmt, nesting, plpgsql):
        """Look inside DO bodies, and inside EXECUTE'd strings within them (best effort:
        a DO is UNVERIFIED whatever its body shows)."""
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
