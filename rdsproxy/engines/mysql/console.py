"""The admin console's MySQL wire, sans-IO: COM_QUERY in, result sets, OK and ERR packets out.

A console command (core/console.py) comes as COM_QUERY; SHOW's rows go back as a text
result set, other commands as OK (a PAUSE's warning in its info), errors as ERR. Client
libraries' own housekeeping (`SET ...` at connect, COM_PING, COM_INIT_DB rdsproxy) is
answered with OK.
"""
from __future__ import annotations

from collections import deque

from ...core.console import CONSOLE_DATABASE
from . import protocol as p
from .clientstate import ER_UNKNOWN_COM, OK_STATUS, err
from .client_login import MAX_AUTH_PACKET

ER_BAD_DB = (1049, "42000")
ER_SYNTAX = (1064, "42000")


def unknown_database(database: str) -> tuple:
    """MySQL's (code, sqlstate) and text for a database it does not have."""
    return ER_BAD_DB, f"Unknown database '{database}'"


class ConsoleWire:
    """One console connection's packets. receive_data(bytes), then next_request() until
    None: ("query", text) for the console to run, ("reply", bytes) to send as they are,
    or ("close", None) at COM_QUIT or a stream that cannot be framed."""

    def __init__(self, capabilities: int):
        self.capabilities = capabilities
        self.reader = p.PacketReader(MAX_AUTH_PACKET)
        self._packets: deque = deque()

    def receive_data(self, data: bytes) -> None:
        try:
            self._packets += self.reader.feed(data)
        except p.ProtocolViolation:
            self._packets.append(None)   # framing is lost: the session ends

    def next_request(self):
        if not self._packets:
            return None
        packet = self._packets.popleft()
        if packet is None or not packet[1] or packet[1][0] == p.COM_QUIT:
            return "close", None
        payload = packet[1]
        command = payload[0]
        if command == p.COM_QUERY:
            text = payload[1:].decode("utf-8", "replace")
            if text.lstrip()[:4].upper() == "SET ":
                return "reply", self._ok()   # a client library's session settings
            return "query", text
        if command == p.COM_PING or (command == p.COM_INIT_DB
                                     and payload[1:].decode("utf-8", "replace") == CONSOLE_DATABASE):
            return "reply", self._ok()
        if command == p.COM_INIT_DB:
            return "reply", self._err(*unknown_database(payload[1:].decode("utf-8", "replace")))
        return "reply", self._err(ER_UNKNOWN_COM, "the admin console takes queries only")

    def _ok(self, info: str = "") -> bytes:
        ok = p.OkPacket(status_flags=OK_STATUS, info=info).build(self.capabilities)
        return p.packet(1, ok)

    def _err(self, code_state, text: str) -> bytes:
        return p.packet(1, err(code_state, text, self.capabilities))

    def answer(self, answer) -> bytes:
        if not answer.columns:
            return self._ok(answer.notice)
        columns = [p.ColumnDefinition(name) for name in answer.columns]
        return p.result_set(columns, answer.rows, self.capabilities, status_flags=OK_STATUS)

    def error(self, text: str) -> bytes:
        return self._err(ER_SYNTAX, text)
