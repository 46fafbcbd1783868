"""The micro-benchmarks, by component: each builds its inputs for one implementation of the
fast path, checks its body's result and returns the body (see bench/micro/__init__.py).

The objects are built as the engines build them (scanner settings, the pinning prefilter's
keywords, a pool core with idle connections, the relay halves of a SessionFactory, the MySQL
lane's halves with the fields the engine's connections give them), so a body runs the code
a proxy runs per chunk, with in-memory transports instead of sockets.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict, deque
from types import SimpleNamespace

from rdsproxy._fastpath import contract
from rdsproxy.engines.mysql import pinning, protocol as my
from rdsproxy.engines.mysql.statements import ClientStatement
from rdsproxy.engines.postgres.engine import RULES_CAPTURE_LIMIT
from rdsproxy.engines.postgres.pinning import PREFILTER
from rdsproxy.engines.postgres.statements import SERVER_NAME_PREFIX

from . import case, traffic as t

POOL_KEY = ("app", "bench")
POOL_SIZE = 20


def checked(body, expected):
    """`body`, after three runs that each returned `expected` (a body must leave its objects
    as it found them, or a benchmark would time something else from its second round)."""
    for _ in range(3):
        got = body()
        assert got == expected, (got, expected)
    return body


def client_scanner(fp):
    """A client's scanner as the PostgreSQL engine configures it (engine.client_scanner)."""
    return fp.pg_framing.MessageScanner(counted=b"QSF", captured=b"QPXFBDC",
                                        capture_limit=RULES_CAPTURE_LIMIT, tallied=b"QE")


def server_scanner(fp):
    """A server connection's scanner (backend.ServerConnection)."""
    return fp.pg_framing.MessageScanner(counted=b"Z", captured=b"SA")


# -- pg_framing: MessageScanner.feed -----------------------------------------------------------

def _feed(scanner, data):
    n = scanner.feed(data)
    del scanner.captured[:]   # the relay's screen() drains what was captured
    return n, scanner.status


@case("pg_framing", "-S answer, simple protocol (server scanner)")
def framing_simple_answer(fp):
    scanner = server_scanner(fp)
    return checked(lambda: _feed(scanner, t.SIMPLE_ANSWER), (1, ord("I")))


@case("pg_framing", "-S request, simple protocol (client scanner)")
def framing_simple_request(fp):
    scanner = client_scanner(fp)
    return checked(lambda: _feed(scanner, t.SIMPLE_REQUEST), (1, ord("I")))


@case("pg_framing", "-M extended request + answer")
def framing_extended(fp):
    client, server = client_scanner(fp), server_scanner(fp)

    def body():
        return _feed(client, t.EXTENDED_REQUEST)[0], _feed(server, t.EXTENDED_ANSWER)[0]
    return checked(body, (1, 1))


@case("pg_framing", f"{t.LARGE_ROWS:,}-row result (1.1 MB) in 256 KiB reads")
def framing_large_result(fp):
    scanner = server_scanner(fp)
    chunks = t.reads(t.large_result())

    def body():
        n = 0
        for chunk in chunks:
            n += scanner.feed(chunk)
        return n, scanner.at_boundary()
    return checked(body, (1, True))


# -- mysql_framing: ResponseScanner.scan -------------------------------------------------------

def _scan_answer(fp, chunks):
    """A new ResponseTracker per answer, as the MySQL backend makes one per command."""
    scanner = fp.mysql_framing.ResponseScanner()
    command = t.POINT_SELECT[:6]

    def body():
        tracker = my.ResponseTracker(command, t.MYSQL_CAPABILITIES)
        for chunk in chunks:
            end = scanner.scan(chunk, tracker)
            if end >= 0:
                return end == len(chunk), tracker.rows
        return False, tracker.rows
    return body


@case("mysql_framing", "point select answer (tracker + scan)")
def mysql_point_select(fp):
    return checked(_scan_answer(fp, [t.POINT_SELECT_ANSWER]), (True, 1))


@case("mysql_framing", f"{t.MANY_ROWS:,}-row result (2.1 MB) in 256 KiB reads")
def mysql_many_rows(fp):
    return checked(_scan_answer(fp, t.reads(t.many_rows())), (True, t.MANY_ROWS))


# -- pool: PoolCore and LatencyHistogram -------------------------------------------------------

def idle_pool(fp, make_conn=object):
    """A PoolCore of POOL_SIZE connections, all idle under POOL_KEY; and the connections."""
    core = fp.pool.PoolCore(POOL_SIZE)
    conns = [make_conn() for _ in range(POOL_SIZE)]
    for conn in conns:
        assert core.reserve_new()
        assert core.give_back(POOL_KEY, conn) is None
    return core, conns


@case("pool", "PoolCore try_borrow + give_back")
def pool_borrow_return(fp):
    core, conns = idle_pool(fp)

    def body():
        conn = core.try_borrow(POOL_KEY)
        core.give_back(POOL_KEY, conn)
        return conn is conns[-1], core.idle_count
    return checked(body, (True, POOL_SIZE))


@case("pool", "4 x LatencyHistogram.observe (record)")
def pool_histogram(fp):
    # record() is a C call from the relay, not reachable from Python in the compiled twin;
    # observe() is the Python door to it.
    histogram = fp.pool.LatencyHistogram()
    # A transaction's readings: a borrow from idle, the database's answer, the client's round
    # trip, and one slow query.
    samples = (0.0, 0.00031, 0.00047, 0.0123)

    def body():
        observe = histogram.observe
        for seconds in samples:
            observe(seconds)
        return len(samples)
    body = checked(body, 4)
    assert sum(histogram.buckets()) == 12
    return body


# -- pg_keywords: KeywordScanner.may_match -----------------------------------------------------

STATEMENTS = [
    t.SIMPLE_REQUEST[5:-1],                                              # pgbench -S
    b"UPDATE pgbench_accounts SET abalance = abalance + -2471 WHERE aid = 48213;",
    b"SELECT abalance FROM pgbench_accounts WHERE aid = 48213;",
    b"INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
    b"VALUES (7, 1, 48213, -2471, CURRENT_TIMESTAMP);",
    b"BEGIN;",
    b"SELECT users.id, users.email, users.name, users.created_at FROM users "
    b"WHERE users.email = $1 ORDER BY users.id LIMIT $2",
]


@case("pg_keywords", "may_match on 6 OLTP statements")
def keywords_statements(fp):
    prefilter = fp.pg_keywords.KeywordScanner(PREFILTER.leading, PREFILTER.anywhere)
    may_match = prefilter.may_match
    return checked(lambda: [may_match(sql) for sql in STATEMENTS],
                   [False, False, False, True, False, False])


# -- pg_statements: AnswerQueue / BookCore -----------------------------------------------------

@case("pg_statements", "-M prepared request: attached + forward (Bind renamed)")
def statements_prepared(fp):
    server = SimpleNamespace(tracking=False)
    transport = SimpleNamespace()
    queue = fp.pg_statements.AnswerQueue(server, 100)
    server_name = SERVER_NAME_PREFIX + b"1"
    queue.cache = OrderedDict([(t.PREPARED_KEY, server_name)])
    book = fp.pg_statements.BookCore()
    book.names = {t.PREPARED_NAME: t.PREPARED_KEY}
    renamed = t.bind(server_name, t.AID) + t.PREPARED_REQUEST[len(t.bind(t.PREPARED_NAME, t.AID)):]

    def body():
        book.attached(server, queue, False, transport)   # a borrow starts
        return book.forward(t.PREPARED_REQUEST, server, queue, transport, 0)
    return checked(body, renamed)


# -- ledger: ClientLedger, MetricCounters, Entropy ---------------------------------------------

def _ledger(fp):
    return fp.ledger.ClientLedger(set(), fp.ledger.MetricCounters(), 1000)


@case("ledger", "a transaction's moves: free -> active -> free")
def ledger_moves(fp):
    ledger = _ledger(fp)
    free, active = contract.Phase.FREE, contract.Phase.ACTIVE

    def body():
        ledger.move(free, active)
        return ledger.move(active, free), ledger.active
    return checked(body, (free, 0))


class _PlainClient:
    tls = False   # release() splits a client's queries by TLS


@case("ledger", "a connection: admit + 4-byte salt + release")
def ledger_connection(fp):
    ledger = _ledger(fp)
    entropy = fp.ledger.Entropy(os.urandom)
    client = _PlainClient()

    def body():
        admitted = ledger.admit(client)
        salt = entropy.take(4)
        ledger.release(client, 1)
        return admitted, len(salt), ledger.metrics.ClientConnections
    return checked(body, (True, 4, 0))


# -- pg_relay: ClientRelay / ServerRelay per chunk ---------------------------------------------

class Sink:
    """An in-memory transport: counts what the relay writes and keeps the last write."""

    def __init__(self):
        self.writes = 0
        self.written = 0
        self.last = None

    def write(self, data):
        self.writes += 1
        self.written += len(data)
        self.last = data


def relay_pair(fp):
    """A client half from a SessionFactory (as the engine makes them) and a server half idle
    in a real PoolCore, both on Sinks, the client logged in and free."""
    relay = fp.pg_relay
    ledger = _ledger(fp)
    engine = SimpleNamespace(ledger=ledger, clock=0.0)
    core = fp.pool.PoolCore(POOL_SIZE)
    server = relay.ServerRelay()
    server.mode = contract.PG_SERVER_RELAY
    server.scanner = server_scanner(fp)
    server.transport = Sink()
    server.key = POOL_KEY
    server.pool_core = core
    assert core.reserve_new() and core.give_back(POOL_KEY, server) is None
    prefilter = fp.pg_keywords.KeywordScanner(PREFILTER.leading, PREFILTER.anywhere)
    factory = relay.SessionFactory(relay.ClientRelay, engine, SimpleNamespace(target_role=None),
                                   core, prefilter, None, client_scanner(fp),
                                   fp.pool.LatencyHistogram())
    client = factory.make()
    client.connection_made(Sink())
    client.state = contract.PG_CLIENT_READY
    client.key = POOL_KEY
    server.applied = client.desired
    server.sql_prepared = client.sql_prepared
    return client, server, core


def round_trip(client, server, core, request, answer, sent=None):
    """The body of one command and its answer through a relay pair (either engine's): the
    client's chunk borrows the idle connection and goes to the server as `sent` (the
    request unchanged by default), the server's answer goes back and returns the
    connection."""
    # data_received: what the loop's transports call; from C it calls the same received()
    # the C reactor calls directly.
    client_chunk, server_chunk = client.data_received, server.data_received

    def body():
        client_chunk(request)      # borrows the idle connection, forwards the request
        server_chunk(answer)       # forwards the answer, gives the connection back
        return core.idle_count, client.phase, client.server is None
    body = checked(body, (1, contract.Phase.FREE, True))
    sent = request if sent is None else sent
    got = (server.transport.written, client.transport.written,
           server.transport.last, client.transport.last)
    assert got == (3 * len(sent), 3 * len(answer), sent, answer), got
    return body


def _transaction(fp, request, answer):
    return round_trip(*relay_pair(fp), request, answer)


@case("pg_relay", "-S transaction, simple protocol")
def relay_simple(fp):
    return _transaction(fp, t.SIMPLE_REQUEST, t.SIMPLE_ANSWER)


@case("pg_relay", "-S transaction, -M extended")
def relay_extended(fp):
    return _transaction(fp, t.EXTENDED_REQUEST, t.EXTENDED_ANSWER)


# -- mysql_relay: the quick lane's ClientRelay / ServerRelay per command -----------------------

CLIENT_STATEMENT_ID = 1    # the id the proxy gives a client's first prepared statement
# The connection's own id for that statement: another, as on a connection that served
# other clients before, so that the body shows the lane renumbering it.
SERVER_STATEMENT_ID = 12


def _off_the_lane(name):
    """A stand-in for the engine method `name`, which the lane calls when a command or an
    answer is not its own: a case that reaches it measures the slow path, so it fails."""
    def unreachable(self, *args):
        raise AssertionError(f"the quick lane called {name}(): the command left it")
    return unreachable


class _NoPool:
    """A server half's `pool` (core.pool.Pool): the lane reaches it only for a connection
    to close or a waiting client to hand over to, neither of which a case has."""

    def __getattr__(self, name):
        raise AssertionError(f"the quick lane reached the pool's {name}")


def mysql_lane_pair(fp, verdicts=None, statements=()):
    """A client half and a server half of the MySQL relay on Sinks, with the fields the
    engine's ClientConnection and ServerConnection give them: the client logged in to
    LANE_DATABASE, READY and free, with the plain COM_QUERY packets `verdicts` filed in
    its Rules.plain_packets and the `statements` (SQL text, the parameter types its first
    execute bound) prepared from CLIENT_STATEMENT_ID on; the server idle in a real
    PoolCore, those statements prepared on it from SERVER_STATEMENT_ID on. The engine
    methods the lane calls by name raise (_off_the_lane)."""
    relay = fp.mysql_relay

    class Client(relay.ClientRelay):
        slow_data = _off_the_lane("slow_data")
        on_connection = _off_the_lane("on_connection")
        _next = _off_the_lane("_next")

    class Server(relay.ServerRelay):
        slow_data = _off_the_lane("slow_data")
        lane_handoff = _off_the_lane("lane_handoff")
        _broken = _off_the_lane("_broken")
        excess = _off_the_lane("excess")
        close = _off_the_lane("close")

    rules = pinning.Rules()
    core = fp.pool.PoolCore(POOL_SIZE)
    server = Server()
    server.transport = Sink()
    server.key = POOL_KEY
    server.pool = _NoPool()
    server.pool_core = core
    server.client = None
    server.closed = False
    server.retire_at = math.inf
    server.idle_since = 0.0
    server.mode = contract.MYSQL_SERVER_IDLE
    server.capabilities = t.LANE_CAPABILITIES
    server.status = my.SERVER_STATUS_AUTOCOMMIT
    server.schema = t.LANE_DATABASE
    server.vars = {}
    server.prepared = {}
    server.lid_owner = None
    server.tracker = None
    server.forwarded = False
    assert core.reserve_new() and core.give_back(POOL_KEY, server) is None

    client = Client()
    client.transport = Sink()
    client.engine = SimpleNamespace(clock=0.0)
    client.ledger = _ledger(fp)
    client.response_latency = fp.pool.LatencyHistogram()
    client.pool_core = core
    client.key = POOL_KEY
    client.state = contract.MYSQL_CLIENT_READY
    client.phase = contract.Phase.FREE
    client.connection_id = 1
    client.server = None
    client.pin_reason = None
    client.busy = False
    client.queue = deque()
    client.reader = my.PacketReader()
    client.activity = client.queries = client.outstanding = 0
    client.request_at = client.forwarded_at = 0.0
    # ClientConnection._reset_state, after a login to LANE_DATABASE.
    client.schema = t.LANE_DATABASE
    client.vars = {}
    client.stmts = {}
    client.last_stmt_id = 0
    client.long_data = False
    client.cursor_stmt = None
    client.last_insert_id = client.lid_version = 0
    client.row_count = -1
    client.last_server = None
    client.cmd = client.verdict = client.stmt = None
    client.cmd_seq = 0
    client.cmd_payload_override = client.cmd_raw = None
    client.verdicts = rules.plain_packets
    for packet in verdicts or ():
        # What CommandDispatch._com_query files for a plain statement the slow path sent.
        verdict = rules.classify(packet[5:])
        assert verdict.plain and verdict.statements == 1
        rules.remember_plain(packet, verdict)
    for n, (sql, types) in enumerate(statements):
        # What StatementMapping._answer_prepare and _remember_prepared keep, and
        # _com_stmt_execute once the client has bound its types.
        verdict = rules.classify(sql)
        assert verdict.plain
        client.stmts[CLIENT_STATEMENT_ID + n] = ClientStatement(
            sql, len(types) // 2, 1, verdict, param_types=types, plain=True)
        client.last_stmt_id = CLIENT_STATEMENT_ID + n
        server.prepared[(server.schema, sql)] = (
            my.PrepareOk(SERVER_STATEMENT_ID + n, 1, len(types) // 2), [])
    return client, server, core


def _lane_command(pair, request, answer, sent=None):
    client, server, core = pair
    body = round_trip(client, server, core, request, answer, sent)
    assert client.quick_commands == 3   # every round in the lane (its stand-ins say so too)
    return body


@case("mysql_relay", "point select: COM_STMT_EXECUTE + binary row")
def mysql_lane_execute(fp):
    # The client executes again without binding types; the lane binds those of its first
    # execute (the connection's statement may be shared) under the connection's own id.
    pair = mysql_lane_pair(fp, statements=[(t.POINT_SELECT_SQL, t.POINT_SELECT_TYPES)])
    return _lane_command(pair, t.point_execute(CLIENT_STATEMENT_ID, types_bound=False),
                         t.POINT_EXECUTE_ANSWER,
                         sent=t.point_execute(SERVER_STATEMENT_ID, types_bound=True))


@case("mysql_relay", "point select: COM_QUERY + text row")
def mysql_lane_query(fp):
    pair = mysql_lane_pair(fp, verdicts=[t.POINT_QUERY])
    return _lane_command(pair, t.POINT_QUERY, t.POINT_QUERY_ANSWER)


@case("mysql_relay", "COM_QUERY text, OK answer (index update)")
def mysql_lane_update(fp):
    pair = mysql_lane_pair(fp, verdicts=[t.UPDATE_QUERY])
    body = _lane_command(pair, t.UPDATE_QUERY, t.UPDATE_ANSWER)
    assert pair[0].row_count == 1    # the OK's affected rows, for a later ROW_COUNT()
    return body
