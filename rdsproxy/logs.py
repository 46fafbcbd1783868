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
    stream setup_logging installed, in its format, when nothing else would see the record
    (the logging module's own path costs several times more per line); through
    session_log otherwise. The stream is flushed by every other record and once a second
    (the housekeeper calls flush), not after each of these lines: a write to the file per
    connection would cost more than the line."""

    def __init__(self):
        self.stream = None       # the direct path's stream and format, when it is open
        self.json = False
        self.text = None

    def open(self, handler: logging.Handler, json_format: bool) -> None:
        self.stream = handler.stream
        self.json = json_format
        self.text = handler.formatter if not json_format else None

    def close(self) -> None:
        self.stream = None

    def info(self, message: str, fields: dict) -> None:
        stream = self.stream
        if stream is None or session_log.handlers or session_log.filters:
            session_log.info("%s", message, extra=fields)
            return
        now = time.time()
        if self.json:
            line = _json_line(now, "info", "rdsproxy.sessions", message, fields.items())
        else:
            line = f"{self.text.stamp(now)} INFO rdsproxy.sessions: {message}"
        stream.write(line + "\n")

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
    session_lines.open(handler, fmt == "json")
    # The logging module's documented savings: no caller lookup, thread or process names.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
