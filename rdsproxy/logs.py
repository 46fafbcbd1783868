"""The proxy's log output: text or JSON lines on stderr, and the fields session lines carry."""
from __future__ import annotations

import logging
import re
import sys
import time

import orjson

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")

# Client logins and closes, and the periodic stats line.
session_log = logging.getLogger("rdsproxy.sessions")
stats_log = logging.getLogger("rdsproxy.stats")

# The record attributes every LogRecord has: anything else came in `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

# Quoted literals and dollar-quoted strings: what a statement may carry a password in.
_LITERALS = re.compile(rb"'(?:[^']|'')*'?|\$([A-Za-z_]\w*)?\$.*?(?:\$\1\$|$)", re.S)


def redact_statement(sql, limit: int = 200) -> str:
    """A statement's text for a log line: literals replaced by '?', cut at `limit`."""
    if isinstance(sql, str):
        sql = sql.encode("utf-8", "replace")
    text = _LITERALS.sub(b"'?'", bytes(sql)).decode("utf-8", "replace").strip()
    return text if len(text) <= limit else text[:limit] + "..."


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts (ISO-8601 UTC), level, logger, message, then the
    structured fields the call passed in `extra=`."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name,
               "message": record.getMessage()}
        for name, value in vars(record).items():
            if name not in _STANDARD and name not in out:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Send every logger's records at `level` or above to stderr, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # The logging module's documented savings: no caller lookup, thread or process names
    # (a client's login and close lines are written on every connection).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
