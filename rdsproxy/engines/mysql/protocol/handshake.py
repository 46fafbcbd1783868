"""Login packets: handshake, handshake response, auth exchange and COM_CHANGE_USER."""
from __future__ import annotations

from dataclasses import dataclass, field

from .codec import (
    ProtocolViolation, _U16, _U32, _dec, _truncated, _u16, _u32, lenenc_int, lenenc_str,
    nul_str, read_lenenc_int, read_lenenc_str, read_nul_str,
)
from .constants import (
    AUTH_MORE_DATA_HEADER, AUTH_SWITCH_HEADER, CHARSET_UTF8MB4, CLIENT_CONNECT_ATTRS,
    CLIENT_CONNECT_WITH_DB, CLIENT_MYSQL, CLIENT_PLUGIN_AUTH,
    CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA, CLIENT_PROTOCOL_41, CLIENT_SECURE_CONNECTION,
    CLIENT_SSL, CLIENT_ZSTD_COMPRESSION_ALGORITHM, COM_CHANGE_USER, ERR_HEADER,
    ER_HANDSHAKE_ERROR, ER_NOT_SUPPORTED_AUTH_MODE, SERVER_STATUS_AUTOCOMMIT,
)
from .responses import ErrPacket, ServerError


# --- handshake --------------------------------------------------------------------------------

def _split_version(version: str) -> str:
    # MariaDB prefixes its version with "5.5.5-" so that old replication clients that
    # compare versions do not take 10.x for 1.0.
    if version.startswith("5.5.5-") and "MariaDB" in version:
        return version[6:]
    return version


@dataclass(slots=True)
class Handshake:
    """HandshakeV10, the server's first packet. `capabilities` includes MariaDB's extended
    capabilities in bits 32..63 (read only when the server cleared CLIENT_MYSQL, as MariaDB
    does). `auth_plugin_data` is the nonce (20 bytes from MySQL and MariaDB)."""

    server_version: str
    connection_id: int
    auth_plugin_data: bytes
    capabilities: int
    charset: int = CHARSET_UTF8MB4
    status_flags: int = SERVER_STATUS_AUTOCOMMIT
    auth_plugin_name: str = "mysql_native_password"
    protocol_version: int = 10

    @property
    def version(self) -> str:
        """The server version without MariaDB's "5.5.5-" compatibility prefix."""
        return _split_version(self.server_version)

    @property
    def is_mariadb(self) -> bool:
        return "mariadb" in self.server_version.lower()

    @classmethod
    def parse(cls, payload: bytes) -> "Handshake":
        if not payload:
            raise ProtocolViolation("empty handshake packet", ER_HANDSHAKE_ERROR, "08S01")
        if payload[0] == ERR_HEADER:
            # Servers refuse early (too many connections, host blocked) with an ERR packet.
            raise ServerError(ErrPacket.parse(payload, CLIENT_PROTOCOL_41),
                              "server refused the connection")
        if payload[0] != 10:
            raise ProtocolViolation(f"unsupported handshake protocol version {payload[0]} "
                                    "(only HandshakeV10 is supported)", ER_HANDSHAKE_ERROR, "08S01")
        version, pos = read_nul_str(payload, 1)
        connection_id = _u32(payload, pos, "the connection id")
        pos += 4
        if pos + 9 > len(payload):
            raise _truncated("the handshake's first nonce part")
        nonce = bytes(payload[pos:pos + 8])
        pos += 9                                  # 8 bytes + a filler NUL
        caps = _u16(payload, pos, "the capability flags")
        pos += 2
        charset, status, data_len = CHARSET_UTF8MB4, 0, 0
        if pos < len(payload):
            if pos + 16 > len(payload):
                raise _truncated("the handshake's extended fields")
            charset = payload[pos]
            status = _U16.unpack_from(payload, pos + 1)[0]
            caps |= _U16.unpack_from(payload, pos + 3)[0] << 16
            data_len = payload[pos + 5]
            if not caps & CLIENT_MYSQL:
                caps |= _U32.unpack_from(payload, pos + 12)[0] << 32
            pos += 16                             # 1 + 2 + 2 + 1 + 10 reserved
            if caps & CLIENT_SECURE_CONNECTION:
                n = max(13, data_len - 8)
                part2 = bytes(payload[pos:pos + n])
                if len(part2) < n:
                    raise _truncated("the handshake's second nonce part")
                pos += n
                # The second part ends with a NUL that is not part of the nonce.
                nonce += part2[:-1] if part2.endswith(b"\x00") else part2
        plugin = ""
        if caps & CLIENT_PLUGIN_AUTH and pos < len(payload):
            # Some old servers omit the final NUL.
            end = payload.find(b"\x00", pos)
            plugin = _dec(bytes(payload[pos:end if end >= 0 else len(payload)]))
        return cls(server_version=_dec(version), connection_id=connection_id,
                   auth_plugin_data=nonce, capabilities=caps, charset=charset,
                   status_flags=status, auth_plugin_name=plugin or "mysql_native_password",
                   protocol_version=10)

    def build(self) -> bytes:
        caps = self.capabilities
        nonce = bytes(self.auth_plugin_data)
        if len(nonce) < 8:
            raise ValueError("auth_plugin_data needs at least 8 bytes")
        ext = (caps >> 32) & 0xFFFFFFFF
        if ext:
            caps &= ~CLIENT_MYSQL                # announces the extended field (MariaDB)
        part2 = nonce[8:] + b"\x00"
        out = [
            b"\x0a", nul_str(self.server_version), _U32.pack(self.connection_id & 0xFFFFFFFF),
            nonce[:8], b"\x00", _U16.pack(caps & 0xFFFF), bytes((self.charset & 0xFF,)),
            _U16.pack(self.status_flags & 0xFFFF), _U16.pack((caps >> 16) & 0xFFFF),
            bytes((len(nonce) + 1 if caps & CLIENT_PLUGIN_AUTH else 0,)),
            b"\x00" * 6, _U32.pack(ext),
        ]
        if caps & CLIENT_SECURE_CONNECTION:
            out.append(part2.ljust(13, b"\x00"))
        if caps & CLIENT_PLUGIN_AUTH:
            out.append(nul_str(self.auth_plugin_name))
        return b"".join(out)


# --- fields shared by HandshakeResponse41 and COM_CHANGE_USER ----------------------------------

def _read_auth_response(payload: bytes, pos: int, capabilities: int) -> tuple[bytes, int]:
    """(auth response, position after it) in its short forms: one length byte under
    CLIENT_SECURE_CONNECTION, NUL-terminated otherwise. (COM_CHANGE_USER has no
    length-encoded form; HandshakeResponse41 also has one.)"""
    if capabilities & CLIENT_SECURE_CONNECTION:
        if pos >= len(payload):
            raise _truncated("the auth response length")
        n = payload[pos]
        auth = bytes(payload[pos + 1:pos + 1 + n])
        if len(auth) < n:
            raise _truncated("the auth response")
        return auth, pos + 1 + n
    return read_nul_str(payload, pos)


def _auth_response_field(auth: bytes, capabilities: int) -> bytes:
    """The short forms of an auth response, as `_read_auth_response` reads them."""
    if capabilities & CLIENT_SECURE_CONNECTION:
        if len(auth) > 255:
            raise ValueError("an auth response over 255 bytes needs "
                             "CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA (in a HandshakeResponse41)")
        return bytes((len(auth),)) + auth
    return nul_str(auth)


def _read_connect_attrs(payload: bytes, pos: int) -> tuple[dict[str, str], int]:
    """(connection attributes, position after them): a length-encoded total, then
    length-encoded key and value strings."""
    total, pos = read_lenenc_int(payload, pos)
    end = pos + (total or 0)
    if end > len(payload):
        raise _truncated("the connection attributes")
    attrs: dict[str, str] = {}
    while pos < end:
        key, pos = read_lenenc_str(payload, pos)
        value, pos = read_lenenc_str(payload, pos)
        if pos > end:
            raise _truncated("a connection attribute")
        attrs[_dec(key or b"")] = _dec(value or b"")
    return attrs, pos


def _connect_attrs_field(attrs: dict[str, str]) -> bytes:
    body = b"".join(lenenc_str(k) + lenenc_str(v) for k, v in attrs.items())
    return lenenc_int(len(body)) + body


SSL_REQUEST_LENGTH = 32


@dataclass(slots=True)
class HandshakeResponse:
    """HandshakeResponse41 (the client's login packet) or, when `ssl_request` is set, the
    32-byte SSLRequest a client sends before starting TLS (same first fields, nothing else).

    `capabilities` includes MariaDB's extended capabilities in bits 32..63 (sent only when
    the client clears CLIENT_MYSQL). `auth_response` is the raw scramble; `auth_plugin_name`
    is "" when the client sent none.
    """

    capabilities: int
    username: str = ""
    auth_response: bytes = b""
    database: str | None = None
    auth_plugin_name: str = ""
    charset: int = CHARSET_UTF8MB4
    max_packet_size: int = 1 << 24
    connect_attrs: dict[str, str] = field(default_factory=dict)
    ssl_request: bool = False
    zstd_level: int | None = None

    @staticmethod
    def is_ssl_request(payload: bytes) -> bool:
        """True for the short SSLRequest packet (CLIENT_SSL set, nothing after the filler)."""
        return (len(payload) == SSL_REQUEST_LENGTH
                and bool(_U32.unpack_from(payload, 0)[0] & CLIENT_SSL))

    @classmethod
    def parse(cls, payload: bytes) -> "HandshakeResponse":
        if len(payload) < 4:
            raise ProtocolViolation("handshake response too short", ER_HANDSHAKE_ERROR, "08S01")
        caps = _U32.unpack_from(payload, 0)[0]
        if not caps & CLIENT_PROTOCOL_41:
            raise ProtocolViolation("pre-4.1 clients (HandshakeResponse320) are not supported",
                                    ER_NOT_SUPPORTED_AUTH_MODE, "08004")
        if len(payload) < SSL_REQUEST_LENGTH:
            raise ProtocolViolation("handshake response too short", ER_HANDSHAKE_ERROR, "08S01")
        max_packet = _U32.unpack_from(payload, 4)[0]
        charset = payload[8]
        if not caps & CLIENT_MYSQL:
            caps |= _U32.unpack_from(payload, 28)[0] << 32
        if len(payload) == SSL_REQUEST_LENGTH and caps & CLIENT_SSL:
            return cls(capabilities=caps, charset=charset, max_packet_size=max_packet,
                       ssl_request=True)
        pos = SSL_REQUEST_LENGTH
        user, pos = read_nul_str(payload, pos)
        if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
            auth, pos = read_lenenc_str(payload, pos)
            auth = auth or b""
        else:
            auth, pos = _read_auth_response(payload, pos, caps)
        database = None
        if caps & CLIENT_CONNECT_WITH_DB and pos < len(payload):
            raw, pos = read_nul_str(payload, pos)
            database = _dec(raw)
        plugin = ""
        if caps & CLIENT_PLUGIN_AUTH and pos < len(payload):
            raw, pos = read_nul_str(payload, pos)
            plugin = _dec(raw)
        attrs: dict[str, str] = {}
        if caps & CLIENT_CONNECT_ATTRS and pos < len(payload):
            attrs, pos = _read_connect_attrs(payload, pos)
        zstd = None
        if caps & CLIENT_ZSTD_COMPRESSION_ALGORITHM and pos < len(payload):
            zstd = payload[pos]
        return cls(capabilities=caps, username=_dec(user), auth_response=auth,
                   database=database, auth_plugin_name=plugin, charset=charset,
                   max_packet_size=max_packet, connect_attrs=attrs, zstd_level=zstd)

    def build(self) -> bytes:
        caps = self.capabilities
        ext = (caps >> 32) & 0xFFFFFFFF
        if ext:
            caps &= ~CLIENT_MYSQL
        head = (_U32.pack(caps & 0xFFFFFFFF) + _U32.pack(self.max_packet_size & 0xFFFFFFFF)
                + bytes((self.charset & 0xFF,)) + b"\x00" * 19 + _U32.pack(ext))
        if self.ssl_request:
            return head
        out = [head, nul_str(self.username)]
        auth = bytes(self.auth_response)
        if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
            out.append(lenenc_str(auth))
        else:
            out.append(_auth_response_field(auth, caps))
        if caps & CLIENT_CONNECT_WITH_DB:
            out.append(nul_str(self.database or ""))
        if caps & CLIENT_PLUGIN_AUTH:
            out.append(nul_str(self.auth_plugin_name))
        if caps & CLIENT_CONNECT_ATTRS:
            out.append(_connect_attrs_field(self.connect_attrs))
        if caps & CLIENT_ZSTD_COMPRESSION_ALGORITHM:
            out.append(bytes(((self.zstd_level or 3) & 0xFF,)))
        return b"".join(out)


# --- authentication exchange ------------------------------------------------------------------

@dataclass(slots=True)
class AuthSwitchRequest:
    """0xFE + plugin name + plugin data: the server asks for another auth method (and gives
    a new nonce). `plugin_data` is raw (usually the nonce plus a NUL); `nonce` strips the NUL."""

    plugin_name: str
    plugin_data: bytes = b""

    @property
    def nonce(self) -> bytes:
        data = self.plugin_data
        return data[:-1] if data.endswith(b"\x00") else data

    @classmethod
    def parse(cls, payload: bytes) -> "AuthSwitchRequest":
        if not payload or payload[0] != AUTH_SWITCH_HEADER:
            raise ProtocolViolation("not an AuthSwitchRequest packet")
        if len(payload) == 1:
            # The pre-4.1 "old password" switch request.
            raise ProtocolViolation("the server asked for the pre-4.1 mysql_old_password method",
                                    ER_NOT_SUPPORTED_AUTH_MODE, "08004")
        name, pos = read_nul_str(payload, 1)
        return cls(_dec(name), bytes(payload[pos:]))

    def build(self) -> bytes:
        return b"\xfe" + nul_str(self.plugin_name) + bytes(self.plugin_data)


@dataclass(slots=True)
class AuthMoreData:
    """0x01 + data: plugin-specific data from the server during authentication
    (caching_sha2_password's fast-auth result byte, or a PEM public key)."""

    data: bytes

    @classmethod
    def parse(cls, payload: bytes) -> "AuthMoreData":
        if not payload or payload[0] != AUTH_MORE_DATA_HEADER:
            raise ProtocolViolation("not an AuthMoreData packet")
        return cls(bytes(payload[1:]))

    def build(self) -> bytes:
        return b"\x01" + bytes(self.data)


# --- re-authentication -----------------------------------------------------------------------

@dataclass(slots=True)
class ChangeUser:
    """COM_CHANGE_USER: log in again as another user on the same connection. The auth
    response is computed with the nonce of the connection's handshake; the server may
    answer with an AuthSwitchRequest carrying a new one."""

    username: str
    auth_response: bytes = b""
    database: str = ""
    charset: int = CHARSET_UTF8MB4
    auth_plugin_name: str = "mysql_native_password"
    connect_attrs: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, payload: bytes, capabilities: int) -> "ChangeUser":
        if not payload or payload[0] != COM_CHANGE_USER:
            raise ProtocolViolation("not a COM_CHANGE_USER packet")
        user, pos = read_nul_str(payload, 1)
        auth, pos = _read_auth_response(payload, pos, capabilities)
        database, pos = read_nul_str(payload, pos)
        charset, plugin, attrs = CHARSET_UTF8MB4, "", {}
        if pos + 2 <= len(payload):
            charset = _U16.unpack_from(payload, pos)[0]
            pos += 2
            if capabilities & CLIENT_PLUGIN_AUTH and pos < len(payload):
                raw, pos = read_nul_str(payload, pos)
                plugin = _dec(raw)
            if capabilities & CLIENT_CONNECT_ATTRS and pos < len(payload):
                attrs, pos = _read_connect_attrs(payload, pos)
        return cls(_dec(user), auth, _dec(database), charset, plugin, attrs)

    def build(self, capabilities: int) -> bytes:
        auth = bytes(self.auth_response)
        out = [b"\x11", nul_str(self.username), _auth_response_field(auth, capabilities),
               nul_str(self.database)]
        out.append(_U16.pack(self.charset))
        if capabilities & CLIENT_PLUGIN_AUTH:
            out.append(nul_str(self.auth_plugin_name))
        if capabilities & CLIENT_CONNECT_ATTRS:
            out.append(_connect_attrs_field(self.connect_attrs))
        return b"".join(out)
