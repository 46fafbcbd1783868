"""The client-leg login (ClientLogin) driven in memory, with the sans-IO ServerLogin and
ChangeUserLogin as the client: each one's output is wired into the other's input, and the
packets that cross are recorded with their sequence ids."""
from __future__ import annotations

import dataclasses

import pytest

from rdsproxy.auth import mysql as auth
from rdsproxy.auth.iam import TokenError
from rdsproxy.engines.mysql import protocol as p
from rdsproxy.engines.mysql.client_login import ClientLogin
from rdsproxy.engines.mysql.engine import Account
from rdsproxy.engines.mysql.protocol import ProtocolViolation, ServerError
from rdsproxy.engines.mysql.server_login import ChangeUserLogin, ServerLogin
from rdsproxy.secrets import Credentials

HOST = "10.1.2.3"
NATIVE, SHA2 = "MYSQL_NATIVE_PASSWORD", "MYSQL_CACHING_SHA2_PASSWORD"
ACCOUNTS = {
    "app": Account(Credentials("app", "app-secret"), NATIVE),
    "sha": Account(Credentials("sha", "sha-secret"), SHA2),
    "iam": Account(Credentials("iam", "unused"), NATIVE, iam_auth="REQUIRED"),
}


@pytest.fixture(scope="module")
def keypair():
    return auth.RsaKeyPair.generate()


def frames(data: bytes) -> list[tuple[int, bytes]]:
    return p.PacketReader().feed(data)


class Link:
    """A ClientLogin (the proxy) and a ServerLogin (the client) joined back to back.
    `wire` records every packet as (direction, sequence id, first payload byte)."""

    def __init__(self, client: ServerLogin, proxy: ClientLogin, *, rewrite=None):
        self.client = client
        self.proxy = proxy
        self.rewrite = rewrite      # changes what the client sends, as a packet payload
        self.wire: list[tuple[str, int, int]] = []

    def _record(self, direction: str, data: bytes) -> None:
        self.wire += [(direction, seq, payload[0]) for seq, payload in frames(data)]

    def to_client(self, data: bytes) -> None:
        """Proxy -> client; the client's answers go back until one side stops."""
        while data:
            self._record(">", data)
            answer = self.client.receive_data(data)
            if self.client.need_tls:
                self.to_proxy(answer)
                assert self.proxy.need_tls
                self.proxy.tls_started()
                answer = self.client.tls_started()
            data = self.to_proxy(answer)

    def to_proxy(self, data: bytes) -> bytes:
        if self.rewrite is not None:
            data = b"".join(p.packet(seq, self.rewrite(payload)) for seq, payload in frames(data))
        self._record("<", data)
        return self.proxy.receive_data(data)

    def run(self, connection_id: int = 7) -> "Link":
        self.to_client(self.proxy.greeting(connection_id))
        if self.proxy.done:
            ok = p.OkPacket(status_flags=p.SERVER_STATUS_AUTOCOMMIT).build(self.proxy.capabilities)
            self.to_client(self.proxy.send(ok))
        return self

    def deliver_failure(self) -> ServerError:
        """The proxy's ERR, as the client reads it."""
        failure = self.proxy.failure
        assert failure is not None and not self.proxy.done
        self._record(">", failure.packet)
        with pytest.raises(ServerError) as info:
            self.client.receive_data(failure.packet)
        return info.value


def proxy(default=auth.MYSQL_NATIVE_PASSWORD, **options) -> ClientLogin:
    options.setdefault("server_version", "8.0.36-test")
    return ClientLogin(account=ACCOUNTS.get, default_plugin=default, client_host=HOST,
                       **options)


def kinds(wire):
    return [(d, seq) for d, seq, _head in wire]


# --- successful logins -------------------------------------------------------------------------

def test_native_password():
    link = Link(ServerLogin("app", "app-secret", "appdb"), proxy()).run(connection_id=42)
    assert link.client.done and link.proxy.done and link.proxy.failure is None
    # Greeting, HandshakeResponse, OK: no method switch when the client already answered
    # with the account's method.
    assert kinds(link.wire) == [(">", 0), ("<", 1), (">", 2)]
    result = link.client.result
    assert result.connection_id == 42 and result.server_version == "8.0.36-test"
    assert result.auth_plugin == auth.MYSQL_NATIVE_PASSWORD and not result.tls
    assert (link.proxy.user, link.proxy.database) == ("app", "appdb")
    # What the proxy negotiated is what the client asked for, within what it offered.
    assert link.proxy.capabilities == result.capabilities & link.proxy.offered
    assert link.proxy.capabilities & p.CLIENT_CONNECT_WITH_DB


def test_switch_to_the_accounts_method_with_a_fresh_nonce():
    nonces = iter([b"a" * 20, b"b" * 20])
    link = Link(ServerLogin("sha", "sha-secret"), proxy(nonce=lambda: next(nonces))).run()
    assert link.client.done and link.proxy.plugin == auth.CACHING_SHA2_PASSWORD
    # Greeting, native answer, AuthSwitchRequest, sha2 answer, fast-auth success, OK.
    assert kinds(link.wire) == [(">", 0), ("<", 1), (">", 2), ("<", 3), (">", 4), (">", 5)]
    assert [head for _d, _s, head in link.wire[2::2]] == [p.AUTH_SWITCH_HEADER,
                                                           p.AUTH_MORE_DATA_HEADER]
    assert link.proxy.nonce == b"b" * 20


def test_caching_sha2_fast_auth():
    link = Link(ServerLogin("sha", "sha-secret"), proxy(auth.CACHING_SHA2_PASSWORD)).run()
    assert link.client.done and link.client.result.auth_plugin == auth.CACHING_SHA2_PASSWORD
    assert kinds(link.wire) == [(">", 0), ("<", 1), (">", 2), (">", 3)]
    assert link.wire[2][2] == p.AUTH_MORE_DATA_HEADER


def no_scramble():
    """A rewrite for a client that sends no scramble in its HandshakeResponse: the proxy
    then asks for full authentication."""
    sent = []

    def rewrite(payload: bytes) -> bytes:
        if sent or p.HandshakeResponse.is_ssl_request(payload):
            return payload
        sent.append(payload)
        return dataclasses.replace(p.HandshakeResponse.parse(payload), auth_response=b"").build()
    return rewrite


def test_caching_sha2_full_auth_over_tls():
    link = Link(ServerLogin("sha", "sha-secret", tls="require"),
                proxy(auth.CACHING_SHA2_PASSWORD, tls_available=True), rewrite=no_scramble())
    link.run()
    assert link.client.done and link.proxy.done and link.client.result.tls
    # Greeting, SSLRequest, HandshakeResponse (over TLS), full-auth request, the password
    # in clear, OK.
    assert kinds(link.wire) == [(">", 0), ("<", 1), ("<", 2), (">", 3), ("<", 4), (">", 5)]


def test_caching_sha2_full_auth_by_rsa_without_tls(keypair):
    link = Link(ServerLogin("sha", "sha-secret"),
                proxy(auth.CACHING_SHA2_PASSWORD, rsa=lambda: keypair), rewrite=no_scramble())
    link.run()
    assert link.client.done and link.proxy.done
    # ... full-auth request, public key request, the key, the encrypted password, OK.
    assert kinds(link.wire) == [(">", 0), ("<", 1), (">", 2), ("<", 3), (">", 4), ("<", 5),
                                (">", 6)]


def test_full_auth_with_a_wrong_password_over_tls():
    link = Link(ServerLogin("sha", "not-it", tls="require"),
                proxy(auth.CACHING_SHA2_PASSWORD, tls_available=True), rewrite=no_scramble())
    link.run()
    assert link.proxy.failure.denied
    assert "full authentication" in link.proxy.failure.reason
    assert link.deliver_failure().code == 1045


def test_iam_token_in_clear_over_tls():
    seen = []
    link = Link(ServerLogin("iam", "the-token", tls="require", allow_cleartext=False),
                proxy(tls_available=True,
                      check_token=lambda token, user: seen.append((token, user))))
    link.run()
    assert link.client.done and link.client.result.auth_plugin == auth.MYSQL_CLEAR_PASSWORD
    assert seen == [("the-token", "iam")]


def test_change_user():
    change = ChangeUserLogin("sha", "sha-secret", "otherdb", nonce=b"n" * 20,
                             capabilities=p.CLIENT_PROTOCOL_41 | p.CLIENT_PLUGIN_AUTH
                             | p.CLIENT_SECURE_CONNECTION | p.CLIENT_CONNECT_WITH_DB)
    login = proxy()
    (seq, payload), = frames(change.start())
    out = login.change_user(payload, change.capabilities, seq + 1, p.CHARSET_UTF8MB4)
    # Always a switch, to the account's method, even when the first answer would do.
    assert frames(out)[0][0] == 1 and frames(out)[0][1][0] == p.AUTH_SWITCH_HEADER
    while not login.done:
        out = login.receive_data(change.receive_data(out))
    change.receive_data(login.send(p.OkPacket().build(change.capabilities)))
    assert change.done and (login.user, login.database) == ("sha", "otherdb")


# --- failures ----------------------------------------------------------------------------------

def test_wrong_password():
    link = Link(ServerLogin("app", "wrong"), proxy()).run()
    failure = link.proxy.failure
    assert failure.denied and failure.with_password and failure.reason == "wrong password"
    error = link.deliver_failure()
    assert (error.code, error.sqlstate) == (1045, "28000")
    assert error.err.message == f"Access denied for user 'app'@'{HOST}' (using password: YES)"
    assert kinds(link.wire) == [(">", 0), ("<", 1), (">", 2)]


@pytest.mark.parametrize("default", [auth.MYSQL_NATIVE_PASSWORD, auth.CACHING_SHA2_PASSWORD])
def test_unknown_user_answers_like_a_wrong_password(default):
    known = "app" if default == auth.MYSQL_NATIVE_PASSWORD else "sha"
    wrong = Link(ServerLogin(known, "wrong"), proxy(default)).run()
    unknown = Link(ServerLogin("nobody", "wrong"), proxy(default)).run()
    assert unknown.proxy.failure.reason == "no such user"
    assert [(d, s, h) for d, s, h in unknown.wire] == [(d, s, h) for d, s, h in wrong.wire]
    wrong_error, unknown_error = wrong.deliver_failure(), unknown.deliver_failure()
    assert unknown_error.err.message == wrong_error.err.message.replace(known, "nobody")
    assert unknown_error.code == wrong_error.code == 1045


def test_throttled_login_is_not_checked():
    link = Link(ServerLogin("app", "app-secret"), proxy(may_check=lambda: False)).run()
    assert link.proxy.failure.denied and "not checked" in link.proxy.failure.reason
    assert link.deliver_failure().code == 1045


def test_plaintext_refused_where_tls_is_required():
    link = Link(ServerLogin("app", "app-secret"), proxy(admit=lambda: False)).run()
    failure = link.proxy.failure
    assert not failure.denied and link.proxy.user is None
    error = link.deliver_failure()
    assert (error.code, error.sqlstate) == (3159, "HY000")
    assert frames(failure.packet)[0][0] == 2


def test_iam_user_without_tls_is_refused():
    link = Link(ServerLogin("iam", "token"), proxy()).run()
    assert not link.proxy.failure.denied
    assert "requires TLS" in link.deliver_failure().err.message


def test_rejected_iam_token():
    def reject(token, user):
        raise TokenError("expired")
    link = Link(ServerLogin("iam", "token", tls="require"),
                proxy(tls_available=True, check_token=reject)).run()
    assert link.proxy.failure.denied and link.proxy.failure.reason == "IAM token rejected: expired"


def test_malformed_handshake_response():
    login = proxy()
    login.greeting(1)
    with pytest.raises(ProtocolViolation):
        login.receive_data(p.packet(1, b"\x0f\x82\x00"))     # cut short after 3 bytes
    assert login.failure is None and not login.done


def test_error_sequence_answers_the_clients_next_packet():
    login = proxy()
    login.greeting(1)
    # Waiting for the client's answer to the greeting (seq 0): its packet will be seq 1,
    # so an ERR sent now must be seq 2.
    assert login.error_seq == 2
