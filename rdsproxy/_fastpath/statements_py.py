"""The common chunk of a client whose named statements the proxy keeps: Binds renamed.

Pure-Python twin of `statements_c`, which setup.py compiles from this very file with
`statements_c.pxd`. The engine's StatementBook (engines/postgres/statements.py) owns the
rules; this is its quick lane for a chunk of whole messages in which nothing but Binds of
statements the connection already holds needs its hand, walked in one C loop.
"""

MSG_BIND = 66             # 'B'
MSG_PARSE = 80            # 'P'
MSG_DESCRIBE = 68         # 'D'
MSG_CLOSE = 67            # 'C'
MSG_QUERY = 81            # 'Q'
MSG_SYNC = 83             # 'S'
MSG_FUNCTION_CALL = 70    # 'F'
MSG_FLUSH = 72            # 'H'
MSG_COPY_DATA = 100       # 'd'
MSG_COPY_DONE = 99        # 'c'
MSG_COPY_FAIL = 102       # 'f'
STATEMENT_TARGET = 83     # 'S': Describe and Close of a statement, not a portal


def drops_statements(sql):
    """Whether SQL text may be DEALLOCATE or DISCARD (which change a client's statements)."""
    head = sql[:24].lstrip().lower()
    return head.startswith(b"deallocate") or head.startswith(b"discard")


def rename_binds(data, names, cache):
    """(the chunk with each named Bind's statement renamed to the connection's name for it,
    the Syncs, Queries and FunctionCalls in it, the types of the answered messages after the
    last of those), or None when a message needs the long way: a partial one, a named Parse,
    Describe or Close, a Bind of a statement the client or the connection lacks, SQL that
    may drop statements. `names`: the client's name -> definition; `cache`: the
    connection's definition -> name (an OrderedDict, most recently used last)."""
    end = len(data)
    buf = data   # compiled: a pointer to the chunk's bytes (statements_c.pxd)
    pos = 0
    start = 0
    pieces = None
    ready = 0
    unsynced = []
    while pos < end:
        if end - pos < 5:
            return None
        mtype = buf[pos]
        size = 1 + ((buf[pos + 1] << 24) | (buf[pos + 2] << 16) | (buf[pos + 3] << 8) | buf[pos + 4])
        if size < 5 or pos + size > end:
            return None
        if mtype == MSG_BIND:
            portal_end = pos + 5
            while portal_end < pos + size and buf[portal_end] != 0:
                portal_end += 1
            name_end = portal_end + 1
            while name_end < pos + size and buf[name_end] != 0:
                name_end += 1
            if name_end >= pos + size:
                return None
            if name_end > portal_end + 1:
                key = names.get(data[portal_end + 1:name_end])
                if key is None:
                    return None
                server_name = cache.get(key)
                if server_name is None:
                    return None
                cache.move_to_end(key)
                if pieces is None:
                    pieces = []
                length = size - 1 + len(server_name) - (name_end - portal_end - 1)
                pieces.append(data[start:pos])
                pieces.append(bytes((MSG_BIND, (length >> 24) & 0xFF, (length >> 16) & 0xFF,
                                     (length >> 8) & 0xFF, length & 0xFF)))
                pieces.append(data[pos + 5:portal_end + 1])
                pieces.append(server_name)
                pieces.append(data[name_end:pos + size])
                start = pos + size
            unsynced.append(mtype)
        elif mtype == MSG_SYNC or mtype == MSG_FUNCTION_CALL:
            ready += 1
            unsynced = []
        elif mtype == MSG_QUERY:
            if drops_statements(data[pos + 5:pos + size]):
                return None
            ready += 1
            unsynced = []
        elif mtype == MSG_PARSE:
            if size < 6 or buf[pos + 5] != 0 or drops_statements(data[pos + 6:pos + size]):
                return None
            unsynced.append(mtype)
        elif mtype == MSG_DESCRIBE or mtype == MSG_CLOSE:
            if size < 7 or (buf[pos + 5] == STATEMENT_TARGET and buf[pos + 6] != 0):
                return None
            unsynced.append(mtype)
        elif (mtype != MSG_FLUSH and mtype != MSG_COPY_DATA and mtype != MSG_COPY_DONE
              and mtype != MSG_COPY_FAIL):
            unsynced.append(mtype)
        pos += size
    if pieces is not None:
        pieces.append(data[start:])
        data = b"".join(pieces)
    return data, ready, unsynced
