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


def _utc_stamp(created: float) -> str:
    """ISO-8601 UTC to the millisecond: 2026-01-31T12:00:00.000Z."""
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
            + f".{int(created * 1000) % 1000:03d}Z")


def _json_line(created: float, level: str, logger: str, message: str, fields) -> str:
    out = {"ts": _utc_stamp(created), "level": level, "logger": logger, "message": message}
    for name, value in fields:
        if name not in out:
            out[name] = value
    return orjson.dumps(out, default=str).decode()


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts (ISO-8601 UTC), level, logger, message, then the
    structured fields the call passed in `extra=`."""

    def format(self, record: logging.LogRecord) -> str:
        fields = [(name, value) for name, value in vars(record).items() if name not in _STANDARD]
        if record.exc_info:
            fields.append(("exception", self.formatException(record.exc_info)))
        return _json_line(record.created, record.levelname.lower(), record.name,
                          record.getMessage(), fields)


class TextFormatter(logging.Formatter):
    """time LEVEL logger: message, the time's text made once a second."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._second = -1
        self._stamp = ""

    def stamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._second = second
        return f"{self._stamp},{int(created * 1000) % 1000:03d}"

    def formatTime(self, record, datefmt=None) -> str:
        return self.stamp(record.created)


class SessionLines:
    """The login and close lines, written on every client connection: straight to the
    stream setup_logging installed, in its format (the logging module's own path costs
    several times more per line), or through session_log when setup_logging did not run.
    The stream is flushed by every other record and once a second (the housekeeper calls
    flush), not after each of these lines. Text lines are made without a dict of fields."""

    def __init__(self):
        self.stream = None       # the stream of the direct path, when it is open
        self.text = None         # its TextFormatter; None: JSON lines (or no direct path)

    def open(self, handler: logging.Handler) -> None:
        self.stream = handler.stream
        formatter = handler.formatter
        self.text = formatter if isinstance(formatter, TextFormatter) else None

    def login(self, engine: str, peer: str, user: str, database: str, tls: bool,
              auth: str) -> None:
        message = (f"client {peer} logged in: user {user}, database {database}, "
                   f"{'TLS' if tls else 'no TLS'}, auth {auth}")
        if self.text is not None:
            self._write_text(message)
        else:
            self._write(message, {"event": "login", "engine": engine, "client": peer,
                                  "user": user, "database": database, "tls": tls,
                                  "auth": auth})

    def close(self, engine: str, peer: str, user: str, database: str, duration: int,
              reason: str) -> None:
        message = f"client {peer} closed: user {user or '-'}, {duration}s connected, {reason}"
        if self.text is not None:
            self._write_text(message)
        else:
            self._write(message, {"event": "close", "engine": engine, "client": peer,
                                  "user": user, "database": database, "duration_s": duration,
                                  "reason": reason})

    def _write_text(self, message: str) -> None:
        self.stream.write(f"{self.text.stamp(time.time())} INFO rdsproxy.sessions: {message}\n")

    def _write(self, message: str, fields: dict) -> None:
        if self.stream is None:
            session_log.info("%s", message, extra=fields)
        else:
            self.stream.write(_json_line(time.time(), "info", "rdsproxy.sessions", message,
                                         fields.items()) + "\n")

    def flush(self) -> None:
        if self.stream is not None:
            self.stream.flush()


session_lines = SessionLines()


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Send every logger's records at `level` or above to stderr, as text or JSON lines."""
    try:
        # stderr is line-buffered, which would flush each session line: the same file,
        # buffered (the handler flushes after each record it writes itself).
        stream = open(sys.stderr.fileno(), "w", encoding="utf-8", errors="backslashreplace",
                      closefd=False)
    except (AttributeError, OSError, ValueError):   # no file behind stderr (a test runner's)
        stream = sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    session_lines.open(handler)
    # The logging module's documented savings: no caller lookup, thread or process names.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
