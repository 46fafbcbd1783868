"""The bytes the micro-benchmarks feed the fast path, built with the engines' protocol modules.

PostgreSQL: what pgbench sends and gets back for its select-only transaction (`-S`) in each
query mode (simple, `-M extended`, `-M prepared` as libpq words them), and a large result
(`SELECT * FROM pgbench_accounts`, 10,000 rows) cut into the reads a socket gives.
MySQL: sysbench's point select (`SELECT c FROM sbtest1 WHERE id=?`) and a many-row result of
the sbtest1 table, as MariaDB answers a proxy connection (its capabilities); and, for the
relay's quick lane, the point select prepared and as text and sysbench's index update, with
the answers a real MariaDB gave them.
"""
from __future__ import annotations

import struct

from rdsproxy.engines.mysql import protocol as my
from rdsproxy.engines.mysql.server_login import DEFAULT_CAPABILITIES
from rdsproxy.engines.postgres import protocol as pg

# One socket read: the C reactor's buffer (reactor_c.pyx RECV_SIZE) and libuv's.
READ_SIZE = 262144

# -- PostgreSQL --------------------------------------------------------------------------------

PGBENCH_SELECT = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
AID = b"48213"
# pgbench_accounts' oid on a fresh `pgbench -i` database; any oid frames alike.
ACCOUNTS_OID = 16397
INT4_OID, BPCHAR_OID = 23, 1042


def _int16(n: int) -> bytes:
    return struct.pack("!h", n)


def _int32(n: int) -> bytes:
    return struct.pack("!i", n)


def parse(statement: bytes, sql: bytes) -> bytes:
    return pg.message(b"P", statement + b"\x00" + sql + b"\x00" + _int16(0))


def bind(statement: bytes, *params: bytes) -> bytes:
    """Bind to the unnamed portal, text parameters and results (libpq's PQsendQueryParams)."""
    body = b"\x00" + statement + b"\x00" + _int16(0) + _int16(len(params))
    body += b"".join(_int32(len(p)) + p for p in params)
    return pg.message(b"B", body + _int16(0))


DESCRIBE_PORTAL = pg.message(b"D", b"P\x00")
EXECUTE = pg.message(b"E", b"\x00" + _int32(0))
SYNC = pg.message(b"S")
PARSE_COMPLETE = pg.message(b"1")
BIND_COMPLETE = pg.message(b"2")


def row_description(*columns: tuple[bytes, int, int, int, int]) -> bytes:
    """(name, table oid, attnum, type oid, type size) per column, text format."""
    body = _int16(len(columns))
    for name, table, attnum, type_oid, size in columns:
        body += name + b"\x00" + struct.pack("!ihihih", table, attnum, type_oid, size, -1, 0)
    return pg.message(b"T", body)


def data_row(*values: bytes) -> bytes:
    return pg.message(b"D", _int16(len(values)) + b"".join(_int32(len(v)) + v for v in values))


def command_complete(tag: bytes) -> bytes:
    return pg.message(b"C", tag + b"\x00")


ABALANCE = row_description((b"abalance", ACCOUNTS_OID, 3, INT4_OID, 4))
SELECT_ONE = (ABALANCE + data_row(b"-2471") + command_complete(b"SELECT 1")
              + pg.ready_for_query(b"I"))

# What the client sends and the server answers per -S transaction, by query mode.
SIMPLE_REQUEST = pg.query(PGBENCH_SELECT.replace(b"$1", AID).decode())
SIMPLE_ANSWER = SELECT_ONE
EXTENDED_REQUEST = parse(b"", PGBENCH_SELECT) + bind(b"", AID) + DESCRIBE_PORTAL + EXECUTE + SYNC
EXTENDED_ANSWER = PARSE_COMPLETE + BIND_COMPLETE + SELECT_ONE
PREPARED_NAME = b"P_0"   # pgbench's name for the first statement of a script
PREPARED_REQUEST = bind(PREPARED_NAME, AID) + DESCRIBE_PORTAL + EXECUTE + SYNC
PREPARED_ANSWER = BIND_COMPLETE + SELECT_ONE
# The key the engine's StatementBook files a statement under: the Parse after its name.
PREPARED_KEY = parse(b"", PGBENCH_SELECT)[6:]

LARGE_ROWS = 10000


def large_result(rows: int = LARGE_ROWS) -> bytes:
    """`SELECT * FROM pgbench_accounts LIMIT rows` answered in the simple protocol."""
    head = row_description((b"aid", ACCOUNTS_OID, 1, INT4_OID, 4),
                           (b"bid", ACCOUNTS_OID, 2, INT4_OID, 4),
                           (b"abalance", ACCOUNTS_OID, 3, INT4_OID, 4),
                           (b"filler", ACCOUNTS_OID, 4, BPCHAR_OID, -1))
    filler = b" " * 84   # char(84), blank as `pgbench -i` leaves it
    body = b"".join(data_row(str(aid).encode(), str(1 + aid // 100000).encode(), b"0", filler)
                    for aid in range(1, rows + 1))
    return head + body + command_complete(b"SELECT %d" % rows) + pg.ready_for_query(b"I")


def reads(data: bytes, size: int = READ_SIZE) -> list[bytes]:
    """`data` as a socket hands it over: reads of `size` bytes, messages cut anywhere."""
    return [data[i:i + size] for i in range(0, len(data), size)]


# -- MySQL -------------------------------------------------------------------------------------

# What a proxy connection to MariaDB negotiates (it asks for these and the server has them).
MYSQL_CAPABILITIES = DEFAULT_CAPABILITIES
SBTEST_COLUMNS = [
    my.ColumnDefinition("id", type=my.MYSQL_TYPE_LONG, length=11, schema="sbtest",
                        table="sbtest1", org_table="sbtest1", org_name="id", charset=63),
    my.ColumnDefinition("k", type=my.MYSQL_TYPE_LONG, length=11, schema="sbtest",
                        table="sbtest1", org_table="sbtest1", org_name="k", charset=63),
    my.ColumnDefinition("c", type=my.MYSQL_TYPE_STRING, length=480, schema="sbtest",
                        table="sbtest1", org_table="sbtest1", org_name="c"),
    my.ColumnDefinition("pad", type=my.MYSQL_TYPE_STRING, length=240, schema="sbtest",
                        table="sbtest1", org_table="sbtest1", org_name="pad"),
]
MANY_ROWS = 10000


def _sbtest_c(i: int) -> str:
    """sysbench's c column: ten dash-separated groups of 11 digits (119 characters)."""
    return "-".join(str(10 ** 10 + i * 7919 + g * 104729)[-11:] for g in range(10))


def _sbtest_pad(i: int) -> str:
    return "-".join(str(10 ** 10 + i * 15485863 + g)[-11:] for g in range(5))


POINT_SELECT = my.com_query(b"SELECT c FROM sbtest1 WHERE id=5021")
POINT_SELECT_ANSWER = my.result_set([SBTEST_COLUMNS[2]], [[_sbtest_c(5021)]], MYSQL_CAPABILITIES)


def many_rows(rows: int = MANY_ROWS) -> bytes:
    """`SELECT * FROM sbtest1 LIMIT rows`: the whole answer."""
    return my.result_set(SBTEST_COLUMNS,
                         ([i, 5000 + i % 4999, _sbtest_c(i), _sbtest_pad(i)]
                          for i in range(1, rows + 1)),
                         MYSQL_CAPABILITIES)


# -- MySQL, through the relay's quick lane -----------------------------------------------------
# Captured once from MariaDB 10.11.19 (127.0.0.1:3306, database `test`, an sbtest1 created
# as sysbench creates it and row 5021 filled as _sbtest_c and _sbtest_pad fill it), over a
# connection negotiated with the proxy's capabilities less CLIENT_DEPRECATE_EOF, so that a
# result set ends in EOF packets: MariaDB's answers, byte for byte.
LANE_CAPABILITIES = (MYSQL_CAPABILITIES & ~my.CLIENT_DEPRECATE_EOF) | my.CLIENT_CONNECT_WITH_DB
LANE_DATABASE = "test"
SBTEST_ID = 5021

POINT_SELECT_SQL = b"SELECT c FROM sbtest1 WHERE id=?"   # sysbench's point_selects
# Its one parameter as sysbench binds it (an INT: MYSQL_TYPE_LONG).
POINT_SELECT_TYPES = struct.pack("<H", my.MYSQL_TYPE_LONG)


def point_execute(statement_id: int, types_bound: bool) -> bytes:
    """The COM_STMT_EXECUTE packet of the point select for SBTEST_ID. A client binds the
    types on its first execute of a statement and not again (types_bound=False)."""
    return my.packet(0, my.StmtExecute(
        statement_id, null_bitmap=b"\x00", new_params_bound=types_bound,
        param_types=POINT_SELECT_TYPES if types_bound else b"",
        values=struct.pack("<i", SBTEST_ID)).build())


# The c value of row 5021, as the server sent it.
_C_5021 = (b"10039761299-10039866028-10039970757-10040075486-10040180215-10040284944-"
           b"10040389673-10040494402-10040599131-10040703860")
_C_COLUMN = (
    b"\x01\x00\x00\x01\x01"                                         # column count: 1
    b"*\x00\x00\x02\x03def\x04test\x07sbtest1\x07sbtest1\x01c\x01c"  # c CHAR(120) NOT NULL,
    b"\x0c-\x00\xe0\x01\x00\x00\xfe\x01\x00\x00\x00\x00"             # utf8mb4_general_ci
    b"\x05\x00\x00\x03\xfe\x00\x00\x02\x00"                          # EOF: autocommit
)
_LAST_EOF = b"\x05\x00\x00\x05\xfe\x00\x00\x02\x00"                 # EOF: autocommit
# The answer to the point select's execute: its one row in the binary protocol.
POINT_EXECUTE_ANSWER = _C_COLUMN + b"z\x00\x00\x04\x00\x00w" + _C_5021 + _LAST_EOF
# The same statement as text (COM_QUERY), and its answer: the row in the text protocol.
POINT_QUERY = my.packet(0, my.com_query(b"SELECT c FROM sbtest1 WHERE id=5021"))
POINT_QUERY_ANSWER = _C_COLUMN + b"x\x00\x00\x04w" + _C_5021 + _LAST_EOF
# sysbench's index update, and MariaDB's OK: one row affected, autocommit.
UPDATE_QUERY = my.packet(0, my.com_query(b"UPDATE sbtest1 SET k=k+1 WHERE id=5021"))
UPDATE_ANSWER = (b"0\x00\x00\x01\x00\x01\x00\x02\x00\x00\x00"
                 b"(Rows matched: 1  Changed: 1  Warnings: 0")
