"""What a lost server connection said before it went away: its held-back answer, read."""
from __future__ import annotations

from ..._fastpath import split_messages
from ..._fastpath.pgwire import (
    MSG_COMMAND_COMPLETE,
    MSG_ERROR,
    MSG_NOTICE,
    MSG_SYNC,
    UNSYNCED_MASK,
)
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


def request_did_not_run(request, held) -> bool:
    """Whether the server went away, its answer `held`, before it had run anything of
    `request` (the chunks sent on a connection taken idle).

    Proven only for the extended protocol, whose messages the server answers one by one
    (ParseComplete, BindComplete, ... or an error), the answers it has buffered going out
    ahead of a FATAL. Execute, the message that runs a statement, runs a portal, and a
    connection taken idle holds none but those a Bind of the request makes. So an answer
    that is the server's FATAL and nothing else means that no message of the request was
    done, and no Execute began; the FATAL must be the server's own doing (class 57,
    operator intervention: an administrator's terminate, a shutdown, an idle timeout), not
    a refusal of what it read. A simple Query (or FunctionCall) is answered only as it
    runs: never proven."""
    answer = _held_messages(held)
    if len(answer) != 1 or answer[0][0] != MSG_ERROR:
        return False
    fields = pg.parse_error_fields(answer[0][1])
    if fields.get("S") != "FATAL" or not fields.get("C", "").startswith("57"):
        return False
    data = bytearray(b"".join(request))
    try:
        messages, used = split_messages(data)
    except Exception:  # noqa: BLE001 - FramingError: not a request we can reason about
        return False
    types = [mtype for mtype, _ in messages]
    if used < len(data):
        types.append(data[used])   # a message the request ends in the middle of
    return bool(types) and all(UNSYNCED_MASK[mtype] or mtype == MSG_SYNC for mtype in types)
