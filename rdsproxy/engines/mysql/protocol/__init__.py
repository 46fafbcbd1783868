"""MySQL / MariaDB client-server protocol, sans-IO: bytes in, objects or bytes out; no sockets.

Callers import the package (`from . import protocol as p`) and use the public names of
its modules, which it gathers (each module depends only on those before it):

- `constants`: capability flags (MariaDB's extended ones in bits 32..63 of one int, as
  MariaDB's connectors do), server status flags, command bytes, cursor flags, column
  types, session-tracking types, charsets and the error numbers the proxy itself answers with;
- `codec`: little-endian fixed ints, length-encoded ints and strings, NUL-terminated
  strings; framing (`packet()` builds, splitting payloads of 16 MiB and more;
  `PacketReader` decodes a byte stream arriving in arbitrary chunks and joins split
  payloads); `ProtocolViolation` (a peer broke the protocol; carries the MySQL error
  number and SQLSTATE to answer with);
- `responses`: the server's answers, each a dataclass with `parse(payload, ...)` and
  `build(...)`: `OkPacket`, `ErrPacket` (and `ServerError`, raised for one),
  `EofPacket`, `LocalInfileRequest`, `ColumnDefinition`, `PrepareOk`; `response_kind()`
  tells OK / ERR / EOF / LOCAL INFILE / result-set header / row apart; `text_row` and
  `result_set` write the proxy's own results;
- `handshake`: the login packets `Handshake` (HandshakeV10), `HandshakeResponse`
  (HandshakeResponse41, and the short SSLRequest), `AuthSwitchRequest`, `AuthMoreData`,
  and `ChangeUser` (COM_CHANGE_USER, a login on an open connection);
- `commands`: command builders (`com_query`, `com_stmt_prepare`, ...), `StmtExecute` and
  the statement-id helpers for the commands that name a prepared statement;
- `tracker`: `ResponseTracker`, fed the server's packets one by one after a command, says
  when the whole response has arrived and what the final server status flags are.

Payloads are the packet bodies without the 4-byte header. Names (users, databases, plugin
names, messages) are `str` decoded as UTF-8 with surrogateescape, so any bytes a client
sends survive a parse/build round trip unchanged.

Not supported (a pooler should not offer these capabilities to clients or servers):
CLIENT_COMPRESS (the compressed framing), CLIENT_OPTIONAL_RESULTSET_METADATA (MySQL 8's
optional metadata; its byte layout could not be checked here against a MySQL 8 server),
CLIENT_QUERY_ATTRIBUTES (changes the COM_QUERY / COM_STMT_EXECUTE layouts), the pre-4.1
protocol. MariaDB's MARIADB_CLIENT_CACHE_METADATA is understood by the tracker.
"""
# The package's names are its modules' public ones (the modules list no __all__).
from .codec import *  # noqa: F401,F403
from .commands import *  # noqa: F401,F403
from .constants import *  # noqa: F401,F403
from .handshake import *  # noqa: F401,F403
from .responses import *  # noqa: F401,F403
from .tracker import *  # noqa: F401,F403
