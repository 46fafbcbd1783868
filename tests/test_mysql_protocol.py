"""Unit tests of rdsproxy.engines.mysql.protocol: framing, primitives, packets, tracker.

Packets captured from MariaDB 10.11 (the byte strings marked "captured") pin the parsers to
what a real server sends; everything else is checked by round trips and hypothesis.
"""
from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rdsproxy.engines.mysql import protocol as p
from rdsproxy.engines.mysql.protocol import ProtocolViolation

MAX = p.MAX_PACKET_LENGTH
HYP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Captured from MariaDB 10.11.19 (first packet of a connection, header stripped).
MARIADB_HANDSHAKE = (
    b"\n5.5.5-10.11.19-MariaDB-0+deb12u1\x00\x04\x00\x00\x00y})Q<xj+\x00\xfe\xf7\x08\x02\x00"
    b"\xff\x81\x15\x00\x00\x00\x00\x00\x00\x1d\x00\x00\x003][2&dK(${bW\x00"
    b"mysql_native_password\x00")


def _mysql8_handshake(nonce: bytes = b"abcdefghijklmnopqrst") -> bytes:
    """A MySQL 8.0 HandshakeV10 written out field by field from the protocol description
    (not with our builder): CLIENT_MYSQL set, so the last reserved bytes are not
    extended capabilities even if nonzero."""
    caps = 0xDFFFFFFF
    return (b"\x0a" + b"8.0.36\x00" + struct.pack("<I", 12) + nonce[:8] + b"\x00"
            + struct.pack("<H", caps & 0xFFFF) + bytes((255,)) + struct.pack("<H", 2)
            + struct.pack("<H", caps >> 16) + bytes((21,)) + b"\x00" * 6 + b"\xaa\xbb\xcc\xdd"
            + nonce[8:] + b"\x00" + b"caching_sha2_password\x00")


# --- length-encoded values ------------------------------------------------------------

@pytest.mark.parametrize("value,size", [
    (0, 1), (250, 1), (251, 3), (0xFFFF, 3), (0x10000, 4), (0xFFFFFF, 4), (0x1000000, 9),
    ((1 << 64) - 1, 9)])
def test_lenenc_int_boundaries(value, size):
    raw = p.lenenc_int(value)
    assert len(raw) == size
    assert p.read_lenenc_int(raw + b"tail", 0) == (value, size)


def test_lenenc_int_null_and_errors():
    assert p.read_lenenc_int(b"\xfb") == (None, 1)
    assert p.read_lenenc_str(b"\xfb") == (None, 1)
    with pytest.raises(ProtocolViolation, match="0xFF"):
        p.read_lenenc_int(b"\xff")
    for truncated in (b"", b"\xfc\x01", b"\xfd\x01\x02", b"\xfe" + b"\x00" * 7):
        with pytest.raises(ProtocolViolation, match="past the end"):
            p.read_lenenc_int(truncated)
    with pytest.raises(ProtocolViolation):
        p.read_lenenc_str(b"\x05abc")
    with pytest.raises(ValueError):
        p.lenenc_int(-1)
    with pytest.raises(ValueError):
        p.lenenc_int(1 << 64)


@HYP
@given(st.integers(0, (1 << 64) - 1), st.binary(max_size=70000))
def test_lenenc_round_trips(value, data):
    raw = p.lenenc_int(value) + p.lenenc_str(data)
    v, pos = p.read_lenenc_int(raw)
    s, end = p.read_lenenc_str(raw, pos)
    assert (v, s, end) == (value, data, len(raw))


@HYP
@given(st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))),
       st.binary(max_size=20))
def test_nul_string_round_trip(text, tail):
    raw = p.nul_str(text) + tail
    value, pos = p.read_nul_str(raw)
    assert value.decode("utf-8") == text and raw[pos:] == tail


def test_nul_string_errors():
    with pytest.raises(ValueError):
        p.nul_str("a\x00b")
    with pytest.raises(ProtocolViolation):
        p.read_nul_str(b"no terminator")


# --- framing ------------------------------------------------------------------------------

def _stream(payloads, seq=0):
    out = []
    for payload in payloads:
        out.append(p.packet(seq, payload))
        seq = p.seq_after(seq, len(payload))
    return b"".join(out)


def _expected(payloads, seq=0):
    out = []
    for payload in payloads:
        out.append((seq, payload))
        seq = p.seq_after(seq, len(payload))
    return out


def test_packet_header():
    assert p.packet(3, b"\x0e") == b"\x01\x00\x00\x03\x0e"
    assert p.packet(256 + 7, b"") == b"\x00\x00\x00\x07"


SMALL = [b"\x03SELECT 1", b"", b"\x00" * 300, bytes(range(256)), b"\xfe\x00\x00\x02\x00", b"x"]


def test_reader_split_at_every_byte_boundary():
    stream = _stream(SMALL, seq=1)
    want = _expected(SMALL, seq=1)
    for cut in range(len(stream) + 1):
        reader = p.PacketReader()
        got = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        assert got == want, cut
        assert reader.buffered == 0
        assert reader.next_seq == p.seq_after(want[-1][0], len(want[-1][1]))


def test_reader_one_byte_at_a_time():
    stream = _stream(SMALL)
    reader = p.PacketReader()
    got = []
    for i in range(len(stream)):
        got += reader.feed(stream[i:i + 1])
    assert got == _expected(SMALL)


@HYP
@given(st.lists(st.binary(max_size=600), max_size=12), st.integers(0, 255), st.data())
def test_reader_random_splits(payloads, seq, data):
    stream = _stream(payloads, seq)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    reader = p.PacketReader()
    got = []
    last = 0
    for cut in cuts + [len(stream)]:
        got += reader.feed(memoryview(stream)[last:cut])
        last = cut
    assert got == _expected(payloads, seq)


@pytest.mark.parametrize("size", [MAX - 1, MAX, MAX + 1, 2 * MAX, 2 * MAX + 5])
def test_large_payloads_split_and_join(size):
    payload = bytes((i * 7) & 0xFF for i in range(256)) * (size // 256) + b"z" * (size % 256)
    assert len(payload) == size
    wire = p.packet(250, payload)
    fragments = p.fragment_count(size)
    assert len(wire) == size + 4 * fragments
    # Walk the headers: full fragments of MAX bytes, consecutive sequence ids (wrapping),
    # and a last one shorter than MAX (empty when size is a multiple of MAX).
    pos, seqs, lengths = 0, [], []
    while pos < len(wire):
        length = int.from_bytes(wire[pos:pos + 3], "little")
        lengths.append(length)
        seqs.append(wire[pos + 3])
        pos += 4 + length
    assert seqs == [(250 + i) & 0xFF for i in range(fragments)]
    assert all(n == MAX for n in lengths[:-1]) and lengths[-1] < MAX
    # Feed with cuts on and around every fragment header, plus the odd sizes in between.
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + 4 + n)
    for start in starts:
        for delta in (0, 1, 3, 4, 5):
            cut = start + delta
            reader = p.PacketReader(max_payload=3 * MAX)
            got = reader.feed(wire[:cut]) + reader.feed(wire[cut:] + p.packet(7, b"next"))
            assert [(s, len(b)) for s, b in got] == [(250, size), (7, 4)]
            assert got[0][1] == payload
    reader = p.PacketReader(max_payload=3 * MAX)
    got = []
    for i in range(0, len(wire), 1 << 20):
        got += reader.feed(wire[i:i + (1 << 20)])
    assert got == [(250, payload)]
    assert reader.next_seq == p.seq_after(250, size) == (250 + fragments) & 0xFF


def test_max_payload_raises_before_buffering():
    reader = p.PacketReader(max_payload=1000)
    assert reader.feed(p.packet(0, b"a" * 1000)) == [(0, b"a" * 1000)]
    with pytest.raises(ProtocolViolation, match="exceeds the limit of 1000 bytes") as info:
        reader.feed((1001).to_bytes(3, "little") + b"\x00")     # the header alone
    assert info.value.code == p.ER_NET_PACKET_TOO_LARGE and info.value.sqlstate == "08S01"
    # Split payloads count as a whole.
    reader = p.PacketReader(max_payload=MAX + 10)
    with pytest.raises(ProtocolViolation, match="exceeds"):
        reader.feed(b"\xff\xff\xff\x00" + b"\x00" * MAX + b"\x0b\x00\x00\x01")


def test_fragments_out_of_order():
    reader = p.PacketReader(max_payload=2 * MAX)
    with pytest.raises(ProtocolViolation, match="out of order") as info:
        reader.feed(b"\xff\xff\xff\x05" + b"\x00" * MAX + b"\x01\x00\x00\x09x")
    assert info.value.code == p.ER_NET_PACKETS_OUT_OF_ORDER


# --- handshake ------------------------------------------------------------------------------

def test_parse_captured_mariadb_handshake():
    hs = p.Handshake.parse(MARIADB_HANDSHAKE)
    assert hs.server_version == "5.5.5-10.11.19-MariaDB-0+deb12u1"
    assert hs.version == "10.11.19-MariaDB-0+deb12u1" and hs.is_mariadb
    assert hs.connection_id == 4
    assert hs.auth_plugin_data == b"y})Q<xj+3][2&dK(${bW" and len(hs.auth_plugin_data) == 20
    assert hs.charset == 8 and hs.status_flags == p.SERVER_STATUS_AUTOCOMMIT
    assert hs.auth_plugin_name == "mysql_native_password"
    caps = hs.capabilities
    assert not caps & p.CLIENT_MYSQL            # MariaDB announces its extended capabilities
    assert not caps & p.CLIENT_SSL              # have_ssl was DISABLED on that server
    for flag in (p.CLIENT_PROTOCOL_41, p.CLIENT_SECURE_CONNECTION, p.CLIENT_PLUGIN_AUTH,
                 p.CLIENT_DEPRECATE_EOF, p.CLIENT_SESSION_TRACK, p.CLIENT_MULTI_STATEMENTS,
                 p.CLIENT_CONNECT_ATTRS, p.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA,
                 p.MARIADB_CLIENT_PROGRESS, p.MARIADB_CLIENT_STMT_BULK_OPERATIONS,
                 p.MARIADB_CLIENT_EXTENDED_METADATA, p.MARIADB_CLIENT_CACHE_METADATA):
        assert caps & flag, hex(flag)
    assert caps >> 32 == 0x1D
    assert p.Handshake.parse(hs.build()) == hs


def test_parse_mysql8_handshake():
    hs = p.Handshake.parse(_mysql8_handshake())
    assert hs.server_version == hs.version == "8.0.36" and not hs.is_mariadb
    assert hs.connection_id == 12 and hs.charset == 255
    assert hs.auth_plugin_data == b"abcdefghijklmnopqrst"
    assert hs.auth_plugin_name == "caching_sha2_password"
    assert hs.capabilities == 0xDFFFFFFF        # reserved bytes ignored: CLIENT_MYSQL is set


def test_handshake_error_instead_of_handshake():
    err = p.ErrPacket(1040, "Too many connections", "08004").build()
    with pytest.raises(p.ServerError, match="1040") as info:
        p.Handshake.parse(err)
    assert info.value.code == 1040 and info.value.sqlstate == "08004"
    # A pre-4.1-style ERR without the SQLSTATE marker (hosts blocked).
    with pytest.raises(p.ServerError, match="blocked"):
        p.Handshake.parse(b"\xff\x69\x04Host '1.2.3.4' is blocked")
    with pytest.raises(ProtocolViolation, match="protocol version 9"):
        p.Handshake.parse(b"\x09abc\x00")
    with pytest.raises(ProtocolViolation):
        p.Handshake.parse(MARIADB_HANDSHAKE[:30])


@HYP
@given(st.text(st.characters(blacklist_characters="\x00", max_codepoint=0x7FF), max_size=40),
       st.integers(0, 0xFFFFFFFF), st.binary(min_size=20, max_size=20).map(
           lambda b: bytes((x & 0x7F) | 1 for x in b)),
       st.integers(0, 0xFFFFFFFF), st.integers(0, 0x3F), st.integers(0, 255),
       st.integers(0, 0xFFFF), st.sampled_from(["mysql_native_password", "caching_sha2_password"]))
def test_handshake_round_trip(version, conn_id, nonce, caps, ext, charset, status, plugin):
    caps |= p.CLIENT_PROTOCOL_41 | p.CLIENT_SECURE_CONNECTION | p.CLIENT_PLUGIN_AUTH
    if ext:
        caps = (caps & ~p.CLIENT_MYSQL) | (ext << 32)
    hs = p.Handshake(version, conn_id, nonce, caps, charset, status, plugin)
    assert p.Handshake.parse(hs.build()) == hs


# --- handshake response ------------------------------------------------------------------

# Names as clients send them: any text but NUL (and lone surrogates, which no encoder makes).
NAME_CHARS = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))
BASE_CAPS = p.CLIENT_PROTOCOL_41 | p.CLIENT_SECURE_CONNECTION | p.CLIENT_LONG_PASSWORD


@pytest.mark.parametrize("auth_caps", [
    p.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA | p.CLIENT_PLUGIN_AUTH,
    p.CLIENT_PLUGIN_AUTH,                        # 1-byte length (secure connection)
    0,                                           # neither: NUL-terminated
])
def test_handshake_response_auth_encodings(auth_caps):
    caps = BASE_CAPS | auth_caps | p.CLIENT_CONNECT_WITH_DB | p.CLIENT_CONNECT_ATTRS
    if auth_caps == 0:
        caps &= ~p.CLIENT_SECURE_CONNECTION
        auth = b"scrambled-without-nul"
    else:
        auth = bytes(range(1, 21))
    resp = p.HandshakeResponse(capabilities=caps, username="app", auth_response=auth,
                               database="appdb", auth_plugin_name="mysql_native_password"
                               if caps & p.CLIENT_PLUGIN_AUTH else "",
                               charset=45, max_packet_size=1 << 30,
                               connect_attrs={"_client_name": "x", "_pid": "123"})
    raw = resp.build()
    parsed = p.HandshakeResponse.parse(raw)
    assert parsed == resp
    assert not p.HandshakeResponse.is_ssl_request(raw)


def test_handshake_response_long_auth_needs_lenenc():
    resp = p.HandshakeResponse(capabilities=BASE_CAPS | p.CLIENT_PLUGIN_AUTH,
                               username="u", auth_response=b"x" * 300)
    with pytest.raises(ValueError, match="LENENC"):
        resp.build()
    resp.capabilities |= p.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
    assert p.HandshakeResponse.parse(resp.build()).auth_response == b"x" * 300


def test_ssl_request_detection():
    ssl = p.HandshakeResponse(capabilities=BASE_CAPS | p.CLIENT_SSL, charset=33,
                              ssl_request=True).build()
    assert len(ssl) == 32 and p.HandshakeResponse.is_ssl_request(ssl)
    parsed = p.HandshakeResponse.parse(ssl)
    assert parsed.ssl_request and parsed.charset == 33 and parsed.capabilities & p.CLIENT_SSL
    # The full response that follows it is not an SSLRequest, though CLIENT_SSL is set.
    full = p.HandshakeResponse(capabilities=BASE_CAPS | p.CLIENT_SSL | p.CLIENT_PLUGIN_AUTH,
                               username="app", auth_response=b"x" * 20,
                               auth_plugin_name="mysql_native_password").build()
    assert not p.HandshakeResponse.is_ssl_request(full)
    assert not p.HandshakeResponse.parse(full).ssl_request
    # 32 bytes without CLIENT_SSL is a truncated login, not an SSLRequest.
    caps = struct.unpack_from("<I", ssl)[0] & ~p.CLIENT_SSL
    assert not p.HandshakeResponse.is_ssl_request(struct.pack("<I", caps) + ssl[4:])


def test_handshake_response_mariadb_extended_caps_and_errors():
    caps = BASE_CAPS | p.CLIENT_PLUGIN_AUTH | p.MARIADB_CLIENT_CACHE_METADATA
    resp = p.HandshakeResponse(capabilities=caps, username="u", auth_response=b"a" * 20,
                               auth_plugin_name="mysql_native_password")
    raw = resp.build()
    assert not struct.unpack_from("<I", raw)[0] & p.CLIENT_MYSQL
    assert struct.unpack_from("<I", raw, 28)[0] == p.MARIADB_CLIENT_CACHE_METADATA >> 32
    assert p.HandshakeResponse.parse(raw).capabilities == caps & ~p.CLIENT_MYSQL
    with pytest.raises(ProtocolViolation, match="pre-4.1"):
        p.HandshakeResponse.parse(struct.pack("<I", p.CLIENT_LONG_PASSWORD) + b"\x00" * 40)
    with pytest.raises(ProtocolViolation):
        p.HandshakeResponse.parse(raw[:40])       # user name without its NUL


@HYP
@given(st.text(NAME_CHARS, max_size=30), st.binary(max_size=300),
       st.one_of(st.none(), st.text(NAME_CHARS, max_size=20)),
       st.dictionaries(st.text(NAME_CHARS, max_size=10), st.text(NAME_CHARS, max_size=30),
                       max_size=4))
def test_handshake_response_round_trip(user, auth, database, attrs):
    caps = (BASE_CAPS | p.CLIENT_PLUGIN_AUTH | p.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
            | p.CLIENT_CONNECT_ATTRS | (p.CLIENT_CONNECT_WITH_DB if database is not None else 0))
    resp = p.HandshakeResponse(capabilities=caps, username=user, auth_response=auth,
                               database=database, auth_plugin_name="caching_sha2_password",
                               connect_attrs=attrs)
    assert p.HandshakeResponse.parse(resp.build()) == resp


# --- auth exchange packets -------------------------------------------------------------------

def test_auth_switch_and_more_data():
    # Captured: MariaDB's answer to COM_CHANGE_USER.
    raw = b"\xfemysql_native_password\x00&#y\\?ghUOnZY2+~\\4+yB\x00"
    switch = p.AuthSwitchRequest.parse(raw)
    assert switch.plugin_name == "mysql_native_password"
    assert switch.nonce == b"&#y\\?ghUOnZY2+~\\4+yB" and len(switch.nonce) == 20
    assert switch.build() == raw
    with pytest.raises(ProtocolViolation, match="mysql_old_password"):
        p.AuthSwitchRequest.parse(b"\xfe")
    more = p.AuthMoreData(b"\x04")
    assert more.build() == b"\x01\x04" and p.AuthMoreData.parse(b"\x01\x04") == more


# --- OK / ERR / EOF ------------------------------------------------------------------------

SESSION_CAPS = p.CLIENT_PROTOCOL_41 | p.CLIENT_SESSION_TRACK | p.CLIENT_TRANSACTIONS
PLAIN_CAPS = p.CLIENT_PROTOCOL_41 | p.CLIENT_TRANSACTIONS


def test_parse_captured_ok_packets():
    # SET autocommit=0 with CLIENT_SESSION_TRACK: a system variable change.
    ok = p.OkPacket.parse(b"\x00\x00\x00\x00@\x00\x00\x00\x11\x00\x0f\nautocommit\x03OFF",
                          SESSION_CAPS)
    assert ok.status_flags == p.SERVER_SESSION_STATE_CHANGED
    assert ok.system_variables() == {"autocommit": "OFF"} and ok.schema() is None
    # USE mysql: a schema change.
    ok = p.OkPacket.parse(b"\x00\x00\x00\x00@\x00\x00\x00\x08\x01\x06\x05mysql", SESSION_CAPS)
    assert ok.schema() == "mysql"
    # An INSERT's info string, length-encoded.
    info = b"\x00\x02\x00\x02\x00\x00\x00&Records: 2  Duplicates: 0  Warnings: 0"
    ok = p.OkPacket.parse(info, SESSION_CAPS)
    assert (ok.affected_rows, ok.info) == (2, "Records: 2  Duplicates: 0  Warnings: 0")
    ok = p.OkPacket.parse(info, PLAIN_CAPS)
    assert ok.info == "Records: 2  Duplicates: 0  Warnings: 0"
    # The OK that ends a result set under CLIENT_DEPRECATE_EOF.
    ok = p.OkPacket.parse(b"\xfe\x00\x00\x03 \x00\x00", SESSION_CAPS)
    assert ok.header == 0xFE and ok.status_flags == (
        p.SERVER_STATUS_IN_TRANS | p.SERVER_STATUS_AUTOCOMMIT | p.SERVER_STATUS_IN_TRANS_READONLY)


@HYP
@given(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1), st.integers(0, 0xFFFF),
       st.integers(0, 0xFFFF), st.text(max_size=100),
       st.lists(st.tuples(st.integers(0, 5), st.binary(max_size=40)), max_size=4),
       st.booleans())
def test_ok_round_trip(affected, insert_id, status, warnings, info, changes, session):
    caps = SESSION_CAPS if session else PLAIN_CAPS
    if not session:
        changes = []
        status &= ~p.SERVER_SESSION_STATE_CHANGED
    ok = p.OkPacket(affected, insert_id, status, warnings, info, changes)
    parsed = p.OkPacket.parse(ok.build(caps), caps)
    if changes:
        ok.status_flags |= p.SERVER_SESSION_STATE_CHANGED
    assert parsed == ok


def test_err_packets():
    # Captured.
    err = p.ErrPacket.parse(b"\xff\x1e\x04#42S22Unknown column 'nosuch' in 'SELECT'")
    assert (err.code, err.sqlstate, err.message) == (1054, "42S22",
                                                     "Unknown column 'nosuch' in 'SELECT'")
    assert err.build() == b"\xff\x1e\x04#42S22Unknown column 'nosuch' in 'SELECT'"
    assert not err.is_progress
    no_state = p.ErrPacket.parse(b"\xff\x15\x04Access denied")
    assert (no_state.code, no_state.sqlstate, no_state.message) == (1045, "HY000", "Access denied")
    assert p.ErrPacket(1045, "x", "28000").build(0) == b"\xff\x15\x04x"
    progress = p.ErrPacket.parse(b"\xff\xff\xff\x01\x02\x00\x10\x00\x05stage")
    assert progress.is_progress
    with pytest.raises(ValueError):
        p.ErrPacket(1, "x", "toolong").build()
    error = p.ServerError(err)
    assert str(error) == "ERROR 1054 (42S22): Unknown column 'nosuch' in 'SELECT'"


def test_eof_packets():
    eof = p.EofPacket.parse(b"\xfe\x00\x00\x02\x00")
    assert eof == p.EofPacket(0, p.SERVER_STATUS_AUTOCOMMIT) and eof.build() == b"\xfe\x00\x00\x02\x00"
    with pytest.raises(ProtocolViolation):
        p.EofPacket.parse(b"\xfe" + b"\x00" * 8)
    assert p.eof_or_ok(2, PLAIN_CAPS) == b"\xfe\x00\x00\x02\x00"
    assert p.eof_or_ok(2, PLAIN_CAPS | p.CLIENT_DEPRECATE_EOF) == b"\xfe\x00\x00\x02\x00\x00\x00"


def test_response_kind():
    caps = PLAIN_CAPS
    dep = PLAIN_CAPS | p.CLIENT_DEPRECATE_EOF
    assert p.response_kind(b"\x00\x00\x00\x02\x00\x00\x00", caps) == p.RESPONSE_OK
    assert p.response_kind(b"\xff\x15\x04#28000x", caps) == p.RESPONSE_ERR
    assert p.response_kind(b"\xfb/tmp/file", caps) == p.RESPONSE_LOCAL_INFILE
    assert p.response_kind(b"\x02", caps) == p.RESPONSE_RESULT_SET
    assert p.response_kind(b"\xfc\x00\x01", caps) == p.RESPONSE_RESULT_SET
    assert p.response_kind(b"\xfe\x00\x00\x02\x00", caps, in_rows=True) == p.RESPONSE_EOF
    assert p.response_kind(b"\xfe\x00\x00\x02\x00\x00\x00", dep, in_rows=True) == p.RESPONSE_OK
    assert p.response_kind(b"\x011", caps, in_rows=True) == p.RESPONSE_ROW
    assert p.response_kind(b"\xfb\x011", caps, in_rows=True) == p.RESPONSE_ROW   # NULL first
    assert p.response_kind(b"\xff\x15\x04#28000x", dep, in_rows=True) == p.RESPONSE_ERR
    # A text row whose first value is 16 MiB or longer starts with 0xFE too.
    big_row = p.text_row([b"x" * (1 << 24)])
    assert big_row[0] == 0xFE
    assert p.response_kind(big_row, caps, in_rows=True) == p.RESPONSE_ROW
    assert p.response_kind(big_row, dep, in_rows=True) == p.RESPONSE_ROW
    with pytest.raises(ProtocolViolation):
        p.response_kind(b"", caps)


# --- result sets and prepared statements --------------------------------------------------

def test_column_definition_captured_and_round_trip():
    raw = (b"\x03def\x05appdb\x01t\x01t\x02id\x02id\x0c?\x00\x0b\x00\x00\x00\x03\x03P\x00\x00"
           b"\x00")
    col = p.ColumnDefinition.parse(raw)
    assert (col.schema, col.table, col.name, col.type, col.charset, col.length) == (
        "appdb", "t", "id", p.MYSQL_TYPE_LONG, p.CHARSET_BINARY, 11)
    assert col.flags & p.NOT_NULL_FLAG and col.flags & p.PRI_KEY_FLAG
    assert col.build() == raw
    ext = p.ColumnDefinition("j", p.MYSQL_TYPE_BLOB, org_name="j", extended_info=b"\x00\x04json")
    caps = p.MARIADB_CLIENT_EXTENDED_METADATA
    assert p.ColumnDefinition.parse(ext.build(caps), caps) == ext
    listed = p.ColumnDefinition("v", default=b"dflt")
    assert p.ColumnDefinition.parse(listed.build()).default == b"dflt"


def test_text_rows():
    row = p.text_row([1, "é", None, b"\x00\xff", 2.5])
    assert p.parse_text_row(row, 5) == [b"1", "é".encode(), None, b"\x00\xff", b"2.5"]


def test_prepare_ok():
    raw = b"\x00\x01\x00\x00\x00\x02\x00\x01\x00\x00\x00\x00"       # captured
    ok = p.PrepareOk.parse(raw)
    assert ok == p.PrepareOk(1, 2, 1, 0) and ok.build() == raw
    with pytest.raises(ProtocolViolation):
        p.PrepareOk.parse(raw[:8])


@pytest.mark.parametrize("payload", [
    p.com_stmt_execute(7, [1, "x"]), p.com_stmt_send_long_data(7, 0, b"blob"),
    p.com_stmt_close(7), p.com_stmt_reset(7), p.com_stmt_fetch(7, 100)])
def test_statement_id_rewrite(payload):
    assert p.statement_id(payload) == 7
    moved = p.with_statement_id(payload, 0xDEADBEEF)
    assert p.statement_id(moved) == 0xDEADBEEF
    assert moved[0] == payload[0] and moved[5:] == payload[5:] and len(moved) == len(payload)
    buf = bytearray(b"xx" + payload)
    p.rewrite_statement_id(buf, 3, offset=2)
    assert p.statement_id(bytes(buf[2:])) == 3


def test_statement_id_errors():
    with pytest.raises(ProtocolViolation):
        p.statement_id(p.com_query("SELECT 1"))
    with pytest.raises(ProtocolViolation):
        p.statement_id(b"\x17\x01\x00")


def test_stmt_execute_parse_build():
    params = [None, 5, -3, 2.5, "text", b"\x00bin", True, 1 << 63]
    raw = p.com_stmt_execute(9, params, flags=p.CURSOR_TYPE_READ_ONLY)
    ex = p.StmtExecute.parse(raw, len(params))
    assert ex.statement_id == 9 and ex.cursor_type == p.CURSOR_TYPE_READ_ONLY
    assert ex.new_params_bound and ex.null_bitmap == b"\x01"
    assert struct.unpack("<8H", ex.param_types)[0] == p.MYSQL_TYPE_NULL
    assert struct.unpack("<8H", ex.param_types)[-1] == p.MYSQL_TYPE_LONGLONG | 0x8000
    assert ex.build() == raw
    # A later execute reusing bound types: the proxy can bind them explicitly again.
    reuse = p.StmtExecute(9, 0, 1, ex.null_bitmap, False, b"", ex.values).build()
    parsed = p.StmtExecute.parse(reuse, len(params))
    assert not parsed.new_params_bound and parsed.values == ex.values
    rebound = parsed.with_types(ex.param_types)
    assert p.StmtExecute.parse(rebound.build(), len(params)).param_types == ex.param_types
    assert p.StmtExecute.parse(p.com_stmt_execute(4), 0) == p.StmtExecute(4)
    with pytest.raises(ProtocolViolation):
        p.StmtExecute.parse(raw[:12], len(params))
    with pytest.raises(TypeError):
        p.com_stmt_execute(1, [object()])


def test_change_user_round_trip():
    caps = (BASE_CAPS | p.CLIENT_PLUGIN_AUTH | p.CLIENT_CONNECT_ATTRS)
    cu = p.ChangeUser("other", b"s" * 20, "appdb", 45, "mysql_native_password", {"a": "b"})
    assert p.ChangeUser.parse(cu.build(caps), caps) == cu
    old = p.ChangeUser("u", b"", "", 33, "")
    assert p.ChangeUser.parse(old.build(BASE_CAPS), BASE_CAPS) == old
    # An attribute running past the attributes' declared length is refused, as at login.
    packet = cu.build(caps)
    assert packet.endswith(b"\x04\x01a\x01b")
    for parse, short in ((lambda raw: p.ChangeUser.parse(raw, caps), packet[:-5]),
                         (p.HandshakeResponse.parse,
                          p.HandshakeResponse(caps, "u", connect_attrs={"a": "b"}).build()[:-5])):
        with pytest.raises(ProtocolViolation):
            parse(short + b"\x02\x01a\x01b")


def test_command_builders():
    assert p.com_query("SELECT 1") == b"\x03SELECT 1"
    assert p.com_init_db("db") == b"\x02db"
    assert p.com_ping() == b"\x0e" and p.com_quit() == b"\x01"
    assert p.com_reset_connection() == b"\x1f" and p.com_statistics() == b"\x09"
    assert p.com_field_list("t", "%") == b"\x04t\x00%"
    assert p.com_set_option(p.MYSQL_OPTION_MULTI_STATEMENTS_OFF) == b"\x1b\x01\x00"
    assert p.com_process_kill(5) == b"\x0c\x05\x00\x00\x00"
    assert p.com_stmt_prepare("SELECT ?") == b"\x16SELECT ?"
    assert p.COMMAND_NAMES[p.COM_STMT_FETCH] == "COM_STMT_FETCH"


# --- response tracker ------------------------------------------------------------------------

DEP = PLAIN_CAPS | p.CLIENT_DEPRECATE_EOF | p.CLIENT_SESSION_TRACK | p.CLIENT_MULTI_RESULTS
NODEP = PLAIN_CAPS | p.CLIENT_MULTI_RESULTS


def _run(tracker, packets):
    done_at = []
    for i, payload in enumerate(packets):
        if tracker.feed(payload):
            done_at.append(i)
    return done_at


def _result_set(ncols, nrows, caps, status=p.SERVER_STATUS_AUTOCOMMIT, binary=False):
    out = [p.column_count(ncols, caps)]
    out += [p.ColumnDefinition(f"c{i}").build() for i in range(ncols)]
    if not caps & p.CLIENT_DEPRECATE_EOF:
        out.append(p.EofPacket(0, status).build())
    for r in range(nrows):
        out.append(b"\x00\x00" + struct.pack("<q", r) if binary else p.text_row([r, None]))
    out.append(p.eof_or_ok(status, caps))
    return out


@pytest.mark.parametrize("caps", [DEP, NODEP])
def test_tracker_simple_result_set(caps):
    t = p.ResponseTracker(p.com_query("SELECT 1"), caps)
    packets = _result_set(2, 3, caps)
    assert _run(t, packets) == [len(packets) - 1]
    assert t.done and t.rows == 3 and t.results == 1 and t.error is None
    assert t.status_flags == p.SERVER_STATUS_AUTOCOMMIT
    with pytest.raises(ProtocolViolation, match="after the complete response"):
        t.feed(b"\x00\x00\x00\x02\x00\x00\x00")


@pytest.mark.parametrize("caps", [DEP, NODEP])
def test_tracker_multi_results(caps):
    more = p.SERVER_STATUS_AUTOCOMMIT | p.SERVER_MORE_RESULTS_EXISTS | p.SERVER_STATUS_IN_TRANS
    packets = (_result_set(1, 2, caps, more)
               + [p.OkPacket(1, 0, more).build(caps)]
               + _result_set(3, 0, caps, more)
               + [p.OkPacket(0, 0, p.SERVER_STATUS_AUTOCOMMIT).build(caps)])
    t = p.ResponseTracker(p.com_query("a; b; c; d"), caps)
    assert _run(t, packets) == [len(packets) - 1]
    assert t.results == 4 and t.rows == 2 and not t.in_transaction


def test_tracker_error_in_multi_statement_keeps_last_status():
    caps = DEP
    in_trans = p.SERVER_STATUS_AUTOCOMMIT | p.SERVER_STATUS_IN_TRANS
    packets = [p.OkPacket(0, 0, in_trans | p.SERVER_MORE_RESULTS_EXISTS).build(caps),
               p.ErrPacket(1054, "Unknown column", "42S22").build()]
    t = p.ResponseTracker(p.com_query("BEGIN; SELECT nosuch"), caps, status_flags=2)
    assert _run(t, packets) == [1]
    assert t.error.code == 1054 and t.in_transaction and t.results == 1


def test_tracker_error_mid_rows():
    t = p.ResponseTracker(p.com_query("SELECT slow"), NODEP)
    packets = _result_set(1, 2, NODEP)[:-1] + [p.ErrPacket(1317, "interrupted", "70100").build()]
    assert _run(t, packets) == [len(packets) - 1] and t.error.code == 1317 and t.rows == 2


def test_tracker_big_text_row_starting_with_fe():
    caps = DEP
    packets = _result_set(1, 0, caps)
    big = p.text_row([b"x" * (1 << 24)])
    packets.insert(-1, big)
    t = p.ResponseTracker(p.com_query("SELECT REPEAT('x', 16777215)"), caps)
    assert _run(t, packets) == [len(packets) - 1] and t.rows == 1
    caps = NODEP
    packets = _result_set(1, 0, caps)
    packets.insert(-1, big)
    t = p.ResponseTracker(p.com_query("SELECT big"), caps)
    assert _run(t, packets) == [len(packets) - 1] and t.rows == 1


@pytest.mark.parametrize("caps", [DEP, NODEP])
def test_tracker_prepare(caps):
    packets = [p.PrepareOk(5, 2, 1).build(), p.ColumnDefinition("?").build()]
    if not caps & p.CLIENT_DEPRECATE_EOF:
        packets.append(p.EofPacket().build())
    packets += [p.ColumnDefinition("a").build(), p.ColumnDefinition("b").build()]
    if not caps & p.CLIENT_DEPRECATE_EOF:
        packets.append(p.EofPacket().build())
    t = p.ResponseTracker(p.com_stmt_prepare("SELECT a, b FROM t WHERE c = ?"), caps)
    assert _run(t, packets) == [len(packets) - 1]
    assert t.prepare_ok == p.PrepareOk(5, 2, 1)
    for ok in (p.PrepareOk(6, 0, 0), p.PrepareOk(7, 0, 2), p.PrepareOk(8, 1, 0)):
        t = p.ResponseTracker(p.com_stmt_prepare("x"), caps)
        packets = [ok.build()]
        for n in (ok.num_params, ok.num_columns):
            if n:
                packets += [p.ColumnDefinition("x").build()] * n
                if not caps & p.CLIENT_DEPRECATE_EOF:
                    packets.append(p.EofPacket().build())
        assert _run(t, packets) == [len(packets) - 1], ok
    t = p.ResponseTracker(p.com_stmt_prepare("bad"), caps)
    assert t.feed(p.ErrPacket(1064, "syntax", "42000").build()) and t.error.code == 1064


def test_tracker_cursor_captured():
    # Captured from MariaDB 10.11: COM_STMT_EXECUTE with CURSOR_TYPE_READ_ONLY, then fetches.
    cols = [b"\x02",
            b"\x03def\x05appdb\x01t\x01t\x02id\x02id\x0c?\x00\x0b\x00\x00\x00\x03\x01\x10\x00\x00\x00",
            b"\x03def\x05appdb\x01t\x01t\x01v\x01v\x0c-\x00P\x00\x00\x00\xfd\x00\x00\x00\x00\x00"]
    execute = p.com_stmt_execute(1, [0], flags=p.CURSOR_TYPE_READ_ONLY)
    for caps, end in ((DEP, b"\xfe\x00\x00B\x00\x00\x00"), (NODEP, b"\xfe\x00\x00B\x00")):
        t = p.ResponseTracker(execute, caps)
        assert _run(t, cols + [end]) == [3]
        assert t.cursor_open and t.rows == 0
        fetch = p.com_stmt_fetch(1, 2)
        t = p.ResponseTracker(fetch, caps)
        assert _run(t, [b"\x00\x00\x01\x00\x00\x00\x01x", b"\x00\x00\x02\x00\x00\x00\x01b",
                        end]) == [2]
        assert t.cursor_open and t.rows == 2
        t = p.ResponseTracker(fetch, caps)
        last = end.replace(b"B", b"\x82")
        assert _run(t, [b"\x00\x00\x03\x00\x00\x00\x01c", last]) == [1]
        assert not t.cursor_open and t.status_flags & p.SERVER_STATUS_LAST_ROW_SENT
    # No cursor opened (the EOF lacks CURSOR_EXISTS): rows follow as usual.
    t = p.ResponseTracker(execute, NODEP)
    packets = cols + [b"\xfe\x00\x00\x02\x00", b"\x00\x00\x01\x00\x00\x00\x01x",
                      b"\xfe\x00\x00\x02\x00"]
    assert _run(t, packets) == [5] and t.rows == 1 and not t.cursor_open


def test_tracker_mariadb_cache_metadata_captured():
    # Captured: with MARIADB_CLIENT_CACHE_METADATA an execute may skip the column
    # definitions (metadata-follows byte 0); without CLIENT_DEPRECATE_EOF the EOF stays.
    caps = NODEP | p.MARIADB_CLIENT_CACHE_METADATA
    packets = [b"\x02\x00", b"\xfe\x00\x00\x02\x00", b"\x00\x00\x02\x00\x00\x00\x01b",
               b"\x00\x00\x03\x00\x00\x00\x01c", b"\xfe\x00\x00\x02\x00"]
    t = p.ResponseTracker(p.com_stmt_execute(1, [1]), caps)
    assert _run(t, packets) == [4] and t.rows == 2
    caps = DEP | p.MARIADB_CLIENT_CACHE_METADATA
    packets = [b"\x02\x00", b"\x00\x00\x02\x00\x00\x00\x01b", b"\xfe\x00\x00\x02\x00\x00\x00"]
    t = p.ResponseTracker(p.com_stmt_execute(1, [1]), caps)
    assert _run(t, packets) == [2] and t.rows == 1
    # COM_QUERY result sets carry the byte too (always 1).
    t = p.ResponseTracker(p.com_query("SELECT 1"), caps)
    assert _run(t, [b"\x01\x01", p.ColumnDefinition("1").build(), b"\x011",
                    b"\xfe\x00\x00\x02\x00\x00\x00"]) == [3]


def test_tracker_progress_reports():
    caps = DEP | p.MARIADB_CLIENT_PROGRESS
    progress = b"\xff\xff\xff\x01\x01\x00\x10\x00\x00"
    t = p.ResponseTracker(p.com_query("ALTER TABLE t ..."), caps)
    assert _run(t, [progress, progress, p.OkPacket().build(caps)]) == [2] and t.error is None
    t = p.ResponseTracker(p.com_query("x"), DEP)          # not negotiated: it is an error
    assert t.feed(progress) and t.error.is_progress


@pytest.mark.parametrize("caps", [DEP, NODEP])
def test_tracker_local_infile(caps):
    t = p.ResponseTracker(p.com_query("LOAD DATA LOCAL INFILE '/f' INTO TABLE t; SELECT 1"),
                          caps)
    assert not t.feed(b"\xfb/f")
    assert t.awaiting_client and t.infile_filename == "/f"
    with pytest.raises(ProtocolViolation, match="waiting for the client"):
        t.feed(b"\x00\x00\x00\x02\x00\x00\x00")
    t.feed_client(b"1\ta\n")
    assert t.awaiting_client
    t.feed_client(b"")
    assert not t.awaiting_client
    more = p.SERVER_STATUS_AUTOCOMMIT | p.SERVER_MORE_RESULTS_EXISTS
    assert not t.feed(p.OkPacket(1, 0, more, 0, "Records: 1").build(caps))
    assert t.last_ok.affected_rows == 1 and t.last_ok.info == "Records: 1"
    assert _run(t, _result_set(1, 1, caps)) == [len(_result_set(1, 1, caps)) - 1]
    assert t.results == 2 and t.rows == 1
    with pytest.raises(ProtocolViolation):
        t.feed_client(b"late")


@pytest.mark.parametrize("caps", [DEP, NODEP])
def test_tracker_single_packet_commands(caps):
    end = p.eof_or_ok(2, caps)
    cases = [(p.com_ping(), p.OkPacket().build(caps)), (p.com_init_db("x"), p.OkPacket().build(caps)),
             (p.com_reset_connection(), p.OkPacket().build(caps)),
             (p.com_set_option(0), end), (p.com_stmt_reset(1), p.OkPacket().build(caps)),
             (p.com_process_kill(3), p.ErrPacket(1094, "Unknown thread id: 3").build()),
             (p.com_statistics(), b"Uptime: 5  Threads: 1  Questions: 2")]
    for command, answer in cases:
        t = p.ResponseTracker(command, caps)
        assert t.expects_response and t.feed(answer) and t.done, command


@pytest.mark.parametrize("caps", [DEP, NODEP])
def test_tracker_field_list(caps):
    t = p.ResponseTracker(p.com_field_list("t"), caps)
    cols = [p.ColumnDefinition("id", default=b"0").build(), p.ColumnDefinition("v").build()]
    assert _run(t, cols + [p.eof_or_ok(2, caps)]) == [2]
    t = p.ResponseTracker(p.com_field_list("nosuch"), caps)
    assert t.feed(p.ErrPacket(1146, "no such table", "42S02").build()) and t.error.code == 1146


def test_tracker_no_response_and_refused_commands():
    for command in (p.com_quit(), p.com_stmt_close(1), p.com_stmt_send_long_data(1, 0, b"x")):
        t = p.ResponseTracker(command, DEP)
        assert t.done and not t.expects_response
    with pytest.raises(ValueError, match="COM_BINLOG_DUMP"):
        p.ResponseTracker(bytes((p.COM_BINLOG_DUMP,)), DEP)
    with pytest.raises(ValueError, match="unknown command"):
        p.ResponseTracker(b"\x99", DEP)
    with pytest.raises(ValueError, match="CLIENT_COMPRESS"):
        p.ResponseTracker(p.com_ping(), DEP | p.CLIENT_COMPRESS)


def test_tracker_change_user():
    t = p.ResponseTracker(b"\x11other\x00", DEP)
    assert not t.feed(b"\xfemysql_native_password\x00" + b"n" * 20 + b"\x00")
    assert t.awaiting_client
    t.feed_client(b"r" * 20)
    assert t.feed(p.OkPacket().build(DEP)) and t.done
    t = p.ResponseTracker(b"\x11other\x00", DEP)
    assert not t.feed(b"\x01\x03") and not t.awaiting_client        # fast auth success
    assert t.feed(p.OkPacket().build(DEP))
