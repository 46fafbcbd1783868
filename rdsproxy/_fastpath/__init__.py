"""Chooses, once at import, the Cython fast path or its pure-Python twins.

RDSPROXY_PURE_PYTHON=1 forces the twins; so does a missing or broken build.
"""
import importlib
import os

from . import contract

PURE_PYTHON_FORCED = os.environ.get("RDSPROXY_PURE_PYTHON", "") not in ("", "0")
# Every module built twice from one source (setup.py's FASTPATH_MODULES): `<name>_py` is the
# source, `<name>_c` its compiled twin. pg_* serve the PostgreSQL engine, mysql_* MySQL's;
# relay is the base of both engines' relay halves.
TWINNED = ("relay", "pg_framing", "pg_keywords", "pg_relay", "pg_statements", "mysql_framing",
           "mysql_relay", "pool", "ledger")


def _twins(suffix: str) -> dict:
    return {name: importlib.import_module(f"{__name__}.{name}_{suffix}") for name in TWINNED}


_chosen = None
if not PURE_PYTHON_FORCED:
    try:
        _chosen = _twins("c")
        IMPLEMENTATION = "cython"
    except ImportError:
        pass
if _chosen is None:
    _chosen = _twins("py")
    IMPLEMENTATION = "python"
pg_framing = _chosen["pg_framing"]
pg_keywords = _chosen["pg_keywords"]
pg_relay = _chosen["pg_relay"]
pg_statements = _chosen["pg_statements"]
mysql_framing = _chosen["mysql_framing"]
pool = _chosen["pool"]
ledger = _chosen["ledger"]
relay = _chosen["relay"]
mysql_relay = _chosen["mysql_relay"]

# The client-socket reactor compiles only where epoll exists: elsewhere (and in pure mode)
# the loop's own transports serve clients, whatever the other modules are.
reactor = None
if IMPLEMENTATION == "cython":
    try:
        from . import reactor_c as reactor
    except ImportError:
        pass
if reactor is None:
    from . import reactor_py as reactor

MessageScanner = pg_framing.MessageScanner
FramingError = pg_framing.FramingError  # the same class in both twins (errors.py)
split_messages = pg_framing.split_messages
type_mask = pg_framing.type_mask
ResponseScanner = mysql_framing.ResponseScanner
PoolCore = pool.PoolCore
LatencyHistogram = pool.LatencyHistogram
LATENCY_BOUNDS = contract.LATENCY_BOUNDS
KeywordScanner = pg_keywords.KeywordScanner
RelayHalf = relay.RelayHalf
ClientRelay = pg_relay.ClientRelay
ServerRelay = pg_relay.ServerRelay
MysqlClientRelay = mysql_relay.ClientRelay
MysqlServerRelay = mysql_relay.ServerRelay
Entropy = ledger.Entropy
StartupPlan = pg_relay.StartupPlan
LoginDesk = pg_relay.LoginDesk
SessionFactory = pg_relay.SessionFactory
ClientLedger = ledger.ClientLedger
MetricCounters = ledger.MetricCounters
Phase = contract.Phase
drops_statements = pg_statements.drops_statements
AnswerQueue = pg_statements.AnswerQueue
BookCore = pg_statements.BookCore

__all__ = ["IMPLEMENTATION", "reactor", "MessageScanner", "FramingError", "split_messages",
           "type_mask", "ResponseScanner",
           "PoolCore", "LatencyHistogram", "LATENCY_BOUNDS", "KeywordScanner", "RelayHalf",
           "ClientRelay", "ServerRelay", "MysqlClientRelay", "MysqlServerRelay", "Entropy",
           "StartupPlan",
           "LoginDesk", "SessionFactory", "ClientLedger", "MetricCounters", "Phase",
           "drops_statements", "AnswerQueue", "BookCore"]
