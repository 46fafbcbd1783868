"""What the MySQL client side shares: a client connection's states, the status it reports,
and the errors the proxy sends clients itself."""
from __future__ import annotations

from ..._fastpath import contract
from . import protocol as p

# A client connection's states (the relay reads them too: contract.py).
STARTUP, AUTH, LOGIN, READY, CLOSED = (
    contract.MYSQL_CLIENT_STARTUP, contract.MYSQL_CLIENT_AUTH, contract.MYSQL_CLIENT_LOGIN,
    contract.MYSQL_CLIENT_READY, contract.MYSQL_CLIENT_CLOSED)

OK_STATUS = p.SERVER_STATUS_AUTOCOMMIT

# Errors the proxy sends itself: (code, sqlstate).
ER_ACCESS_DENIED = (1045, "28000")
ER_UNKNOWN_COM = (1047, "08S01")
ER_UNKNOWN_THREAD = (1094, "HY000")
ER_NOT_OWNER = (1095, "HY000")
ER_CONNECTION_KILLED = (1927, "70100")
ER_MALFORMED = (1835, "HY000")
ER_UNKNOWN_STMT = (1243, "HY000")
ER_WRONG_ARGUMENTS = (1210, "HY000")
ER_NO_CURSOR = (1421, "HY000")
ER_CON_COUNT = (1040, "08004")
ER_SERVER_SHUTDOWN = (1053, "08S01")
ER_IDLE = (4031, "HY000")
ER_SECURE_TRANSPORT = (3159, "HY000")
ER_LOST = (1158, "08S01")                 # ER_NET_READ_ERROR: never a client-library code


def err(code_state, message: str, capabilities: int = p.CLIENT_PROTOCOL_41) -> bytes:
    """The payload of an ERR packet with `code_state` = (code, sqlstate)."""
    code, state = code_state
    return p.ErrPacket(code, message, state).build(capabilities)
