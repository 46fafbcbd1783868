"""What a lost server connection said before it went away: its held-back answer, read."""
from __future__ import annotations

from ..._fastpath import split_messages
from ..._fastpath.pgwire import MSG_COMMAND_COMPLETE, MSG_ERROR, MSG_NOTICE
from . import protocol as pg


def _held_messages(held):
    if not held:
        return []
    try:
        messages, _ = split_messages(bytearray(b"".join(held)))
    except Exception:  # noqa: BLE001 - FramingError: a broken stream completed nothing we know of
        return []
    return messages


def answer_completed_a_statement(held) -> bool:
    """Whether the held-back part of an answer reports a finished statement."""
    return any(mtype == MSG_COMMAND_COMPLETE for mtype, _ in _held_messages(held))


def server_fatal_error(held) -> bytes | None:
    """The server's own FATAL ErrorResponse among the held-back answer, as sent."""
    for mtype, payload in reversed(_held_messages(held)):
        if mtype == MSG_ERROR and pg.parse_error_fields(payload).get("S") in ("FATAL", "PANIC"):
            return pg.message(b"E", payload)
    return None


def server_last_words(held) -> str:
    """The message of the last error or notice the server sent before it went away."""
    for mtype, payload in reversed(_held_messages(held)):
        if mtype in (MSG_ERROR, MSG_NOTICE):
            return pg.parse_error_fields(payload).get("M", "")
    return ""
