"""PostgreSQL's v3 wire constants: message type bytes, request codes, statuses, and the few
fixed messages the proxy writes as they are.

Plain Python and never compiled, so that there is one copy of each value: the engine's
modules import them from here, and the compiled twins copy the ones they read on every
chunk into C ints at import (their `.pxd` declares those names), which costs nothing per
use. A type byte is an int, as indexing bytes gives.
"""

# Frontend (client) messages.
MSG_BIND = 66              # 'B'
MSG_CLOSE = 67             # 'C'
MSG_DESCRIBE = 68          # 'D'
MSG_EXECUTE = 69           # 'E'
MSG_FUNCTION_CALL = 70     # 'F'
MSG_FLUSH = 72             # 'H'
MSG_PARSE = 80             # 'P'
MSG_QUERY = 81             # 'Q'
MSG_SYNC = 83              # 'S'
MSG_TERMINATE = 88         # 'X'
MSG_COPY_DONE = 99         # 'c'
MSG_COPY_DATA = 100        # 'd'
MSG_COPY_FAIL = 102        # 'f'
MSG_PASSWORD = 112         # 'p' (also SASL responses)
# Describe and Close name a statement ('S') or a portal ('P').
TARGET_STATEMENT = 83      # 'S'
# Message types after which a client still expects its server with nothing outstanding:
# extended-protocol messages not yet closed by a Sync.
UNSYNCED_MASK = bytearray(256)
for _t in (MSG_PARSE, MSG_BIND, MSG_DESCRIBE, MSG_EXECUTE, MSG_CLOSE, MSG_FLUSH):
    UNSYNCED_MASK[_t] = 1
del _t

# Backend (server) messages.
MSG_NOTIFICATION = 65      # 'A'
MSG_COMMAND_COMPLETE = 67  # 'C'
MSG_ERROR = 69             # 'E'
MSG_COPY_IN = 71           # 'G' CopyInResponse
MSG_NOTICE = 78            # 'N'
MSG_PARAMETER_STATUS = 83  # 'S'
MSG_COPY_BOTH = 87         # 'W' CopyBothResponse
MSG_READY_FOR_QUERY = 90   # 'Z'

# ReadyForQuery's transaction status.
STATUS_IDLE = 73           # 'I'
STATUS_FAILED = 69         # 'E': in a transaction that failed

# Requests that come instead of a startup packet (length 8 or 16, then the code).
PROTOCOL_V3 = 196608       # 3.0
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
SSL_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
GSSENC_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x30"

# Authentication request codes ('R' messages).
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

# Fixed messages.
AUTH_OK_MESSAGE = b"R\x00\x00\x00\x08\x00\x00\x00\x00"
AUTH_MD5_REQUEST = b"R\x00\x00\x00\x0c\x00\x00\x00\x05"   # AuthenticationMD5Password; the salt follows
MD5_PASSWORD_SIZE = 41     # 'p', length 40, "md5" + 32 hex digits, NUL
BACKEND_KEY_DATA_HEAD = b"K\x00\x00\x00\x0c"             # BackendKeyData; pid and secret follow
READY_FOR_QUERY_IDLE = b"Z\x00\x00\x00\x05I"
PARSE_COMPLETE = b"1\x00\x00\x00\x04"
CLOSE_COMPLETE = b"3\x00\x00\x00\x04"
TERMINATE = b"X\x00\x00\x00\x04"
SYNC = b"S\x00\x00\x00\x04"
FLUSH = b"H\x00\x00\x00\x04"
