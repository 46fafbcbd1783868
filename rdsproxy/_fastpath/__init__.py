"""Chooses, once at import, the Cython fast path or its pure-Python twins.

RDSPROXY_PURE_PYTHON=1 forces the twins; so does a missing or broken build.
"""
import os

from . import contract

PURE_PYTHON_FORCED = os.environ.get("RDSPROXY_PURE_PYTHON", "") not in ("", "0")

if not PURE_PYTHON_FORCED:
    try:
        from . import framing_c as framing
        from . import pool_c as pool
        from . import keywords_c as keywords
        from . import ledger_c as ledger
        from . import relay_c as relay
        from . import statements_c as statements
        from . import mysql_framing_c as mysql_framing
        IMPLEMENTATION = "cython"
    except ImportError:
        from . import framing_py as framing
        from . import pool_py as pool
        from . import keywords_py as keywords
        from . import ledger_py as ledger
        from . import relay_py as relay
        from . import statements_py as statements
        from . import mysql_framing_py as mysql_framing
        IMPLEMENTATION = "python"
else:
    from . import framing_py as framing
    from . import pool_py as pool
    from . import keywords_py as keywords
    from . import ledger_py as ledger
    from . import relay_py as relay
    from . import statements_py as statements
    from . import mysql_framing_py as mysql_framing
    IMPLEMENTATION = "python"

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

MessageScanner = framing.MessageScanner
FramingError = framing.FramingError  # the same class in both twins (errors.py)
split_messages = framing.split_messages
type_mask = framing.type_mask
ResponseScanner = mysql_framing.ResponseScanner
PoolCore = pool.PoolCore
KeywordScanner = keywords.KeywordScanner
ClientRelay = relay.ClientRelay
ServerRelay = relay.ServerRelay
Entropy = ledger.Entropy
StartupPlan = relay.StartupPlan
LoginDesk = relay.LoginDesk
SessionFactory = relay.SessionFactory
ClientLedger = ledger.ClientLedger
MetricCounters = ledger.MetricCounters
Phase = contract.Phase
drops_statements = statements.drops_statements
AnswerQueue = statements.AnswerQueue
BookCore = statements.BookCore

__all__ = ["IMPLEMENTATION", "reactor", "MessageScanner", "FramingError", "split_messages",
           "type_mask", "ResponseScanner",
           "PoolCore", "KeywordScanner", "ClientRelay", "ServerRelay", "Entropy", "StartupPlan",
           "LoginDesk", "SessionFactory", "ClientLedger", "MetricCounters", "Phase",
           "drops_statements", "AnswerQueue", "BookCore"]
