"""The sans-IO PostgreSQL logins: ClientLogin and ServerLogin against each other in memory
(one's output bytes are the other's input, as h11's ConnectionPair), and ServerLogin
against a real PostgreSQL over a plain socket."""
from __future__ import annotations

import os
import socket
import struct

import pytest

from harness import APP_DB, APP_PASSWORD, APP_USER
from rdsproxy.auth.iam import Principal, generate_token, verify_token
from rdsproxy.auth.md5 import md5_response
from rdsproxy.auth.scram import make_server_key_material
from rdsproxy.engines.postgres import protocol as wire
from rdsproxy.engines.postgres.accounts import (
    MD5,
    SCRAM,
    Account,
    decoy_account,
    default_method,
    login_method,
)
from rdsproxy.engines.postgres.login import (
    LOGIN,
    READY,
    TLS_DECLINED,
    AuthFailed,
    CancelRequested,
    ClientLogin,
    PasswordReceived,
    Reply,
    ServerLogin,
    StartupReceived,
    TlsRequested,
)
from rdsproxy.engines.postgres.protocol import ProtocolViolation, ServerError
from rdsproxy.secrets import Credentials
from utils import drive_login, recv_message

DECOY_KEY = os.urandom(32)
STATUSES = wire.parameter_status("server_version", "16.0") + wire.parameter_status("TimeZone", "UTC")
PID, SECRET = 4242, 0xDEADBEEF
AKID, AWS_SECRET, REGION = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "us-east-1"


def account(user, password, method, iam_auth="DISABLED"):
    return Account(Credentials(user, password), method, make_server_key_material(password), iam_auth)


def accounts_for(accounts: dict):
    """The engine's login_account: the account, or a decoy with the accounts' usual method."""
    def account_for(user, tls):
        found = accounts.get(user)
        if found is not None and login_method(found, tls) is not None:
            return found
        return decoy_account(DECOY_KEY, user, default_method(accounts.values(), tls))
    return account_for


def check_token(text, user):
    return verify_token(text, host="proxy.example", port=5432, user=user, region=REGION,
                        principals={AKID: Principal(AKID, AWS_SECRET, (f"arn:aws:rds-db:{REGION}:1:dbuser:*/*",))})


class LoginPair:
    """A ClientLogin (the proxy facing a client) and a ServerLogin (standing for the client)
    linked by an in-memory wire; drive() plays the I/O class's part for both."""

    def __init__(self, accounts, user, password, *, tls=False, params=None):
        self.proxy = ClientLogin(accounts_for(accounts), os.urandom, tls_offered=False, tls=tls,
                                 check_token=check_token)
        self.client = ServerLogin(user, password, APP_DB, params or {})
        self.events = []      # the kinds of event the proxy side saw, in order
        self.failure = None   # the AuthFailed the proxy side raised

    def drive(self, first=None, extra=b""):
        """Run the login to its end; `extra`: bytes the client pipelines after each of its sends."""
        to_proxy = (first if first is not None else self.client.start()) + extra
        while to_proxy:
            to_client = self._proxy_receives(to_proxy)
            to_proxy = self.client.receive_data(to_client) if to_client else b""
            if self.client.done:
                break

    def _proxy_receives(self, data) -> bytes:
        proxy = self.proxy
        proxy.receive_data(data)
        out = []
        while (event := proxy.next_event()) is not None:
            self.events.append(type(event))
            if isinstance(event, Reply):
                out.append(event.data)
            elif isinstance(event, StartupReceived):
                out.append(proxy.begin(event.session[0]))
            elif isinstance(event, PasswordReceived):
                try:
                    out.append(proxy.check(event.payload))
                except AuthFailed as exc:
                    self.failure = exc
                    out.append(wire.error_response("28P01", f'password authentication failed for user '
                                                          f'"{proxy.user}"', severity="FATAL"))
                    break
                if proxy.state == LOGIN:
                    out.append(proxy.finish(STATUSES, PID, SECRET, wire.AUTH_OK_MESSAGE))
        return b"".join(out)


ACCOUNTS = {"alice": account("alice", "alice-pw", MD5), "bob": account("bob", "bob-pw", SCRAM),
            "carol": account("carol", "carol-pw", SCRAM, iam_auth="OPTIONAL")}


@pytest.mark.parametrize("user,tls", [("alice", False), ("bob", False), ("carol", True)],
                         ids=["md5", "scram-sha-256", "cleartext"])
def test_right_password_logs_in(user, tls):
    pair = LoginPair(ACCOUNTS, user, f"{user}-pw", tls=tls, params={"application_name": "t"})
    pair.drive()
    assert pair.failure is None
    assert pair.client.done and pair.proxy.state == READY
    assert pair.client.parameters == {"server_version": "16.0", "TimeZone": "UTC"}
    assert (pair.client.backend_pid, pair.client.backend_secret) == (PID, SECRET)
    assert pair.events[0] is StartupReceived


def test_each_method_sends_its_own_request():
    requests = {}
    for user, tls in (("alice", False), ("bob", False), ("carol", True)):
        login = ClientLogin(accounts_for(ACCOUNTS), os.urandom, tls_offered=False, tls=tls)
        login.receive_data(wire.startup_message({"user": user}))
        event = login.next_event()
        assert event.session[:3] == (user, user, "")
        requests[user] = struct.unpack_from("!i", login.begin(user), 5)[0]
    assert requests == {"alice": wire.AUTH_MD5, "bob": wire.AUTH_SASL, "carol": wire.AUTH_CLEARTEXT}


@pytest.mark.parametrize("user,tls,reason", [("alice", False, "wrong password"),
                                             ("bob", False, "password authentication failed"),
                                             ("carol", True, "wrong password")],
                         ids=["md5", "scram-sha-256", "cleartext"])
def test_wrong_password_fails_with_28P01(user, tls, reason):
    pair = LoginPair(ACCOUNTS, user, "not-the-password", tls=tls)
    with pytest.raises(ServerError) as exc_info:
        pair.drive()
    assert exc_info.value.sqlstate == "28P01"
    assert not pair.failure.decoy and reason in pair.failure.reason
    assert not pair.client.done


@pytest.mark.parametrize("accounts,method", [(ACCOUNTS, SCRAM),
                                             ({"alice": ACCOUNTS["alice"]}, MD5)],
                         ids=["scram-decoy", "md5-decoy"])
def test_unknown_user_goes_through_a_decoy_exchange(accounts, method):
    # An unknown user gets the exchange most accounts use, not an early "no such user".
    known = LoginPair(accounts, "alice" if method == MD5 else "bob", "wrong")
    unknown = LoginPair(accounts, "mallory", "wrong")
    for pair in (known, unknown):
        with pytest.raises(ServerError) as exc_info:
            pair.drive()
        assert exc_info.value.sqlstate == "28P01"
    assert unknown.events == known.events
    assert unknown.failure.decoy and not known.failure.decoy
    assert unknown.proxy.account.client_auth == method


def test_a_decoy_lets_no_password_through():
    # Even the password of a decoy's stand-in credentials fails, as "no such user" (md5
    # checks the password itself, so only the decoy guard stands in its way).
    accounts = {"alice": ACCOUNTS["alice"]}
    decoy = accounts_for(accounts)("mallory", False)
    assert decoy.client_auth == MD5
    pair = LoginPair(accounts, "mallory", decoy.credentials.password)
    with pytest.raises(ServerError):
        pair.drive()
    assert pair.failure.decoy and pair.failure.reason == "no such user"


def test_iam_token_as_cleartext():
    iam = {"dave": account("dave", "dave-pw", SCRAM, iam_auth="REQUIRED")}
    token = generate_token(host="proxy.example", port=5432, user="dave", region=REGION,
                           access_key_id=AKID, secret_access_key=AWS_SECRET)
    pair = LoginPair(iam, "dave", token, tls=True)
    pair.drive()
    assert pair.client.done and pair.failure is None
    # The account's password is no token: refused by the token check.
    pair = LoginPair(iam, "dave", "dave-pw", tls=True)
    with pytest.raises(ServerError):
        pair.drive()
    assert pair.failure.reason.startswith("IAM token rejected")
    # Over plaintext an IAM-only account cannot log in: a decoy takes it.
    pair = LoginPair(iam, "dave", token)
    with pytest.raises(ServerError):
        pair.drive()
    assert pair.failure.decoy


@pytest.mark.parametrize("packet,sqlstate,text", [
    (struct.pack("!ii", 4, 196608), "08P01", "invalid length of startup packet"),
    (struct.pack("!ii", 20000, 196608), "08P01", "invalid length of startup packet"),
    (struct.pack("!ii", 9, 0x00020000) + b"\x00", "0A000", "unsupported frontend protocol 2.0"),
    (struct.pack("!ii", 12, 196608) + b"user", "08P01", "expected terminator"),
    (wire.startup_message({"database": "x"}), "28000", "no PostgreSQL user name"),
    (wire.startup_message({"user": "u", "replication": "true"}), "0A000", "replication"),
    (wire.startup_message({"user": "u", "bad name": "1"}), "42704", "unrecognized configuration"),
    (wire.startup_message({"user": "u", "a..b": "1"}), "42602", "invalid configuration parameter"),
], ids=["short", "long", "v2", "unterminated", "no-user", "replication", "bad-name", "bad-custom"])
def test_malformed_startup_packet(packet, sqlstate, text):
    login = ClientLogin(accounts_for(ACCOUNTS), os.urandom, tls_offered=False)
    login.receive_data(packet)
    with pytest.raises(ProtocolViolation) as exc_info:
        login.next_event()
    assert exc_info.value.sqlstate == sqlstate
    assert text in str(exc_info.value)


def test_malformed_password_message():
    login = ClientLogin(accounts_for(ACCOUNTS), os.urandom, tls_offered=False)
    login.receive_data(wire.startup_message({"user": "alice"}))
    login.begin(login.next_event().session[0])
    login.receive_data(b"Q\x00\x00\x00\x05x")
    with pytest.raises(ProtocolViolation, match="expected password response"):
        login.next_event()


def test_tls_and_gssenc_requests():
    ssl_request = struct.pack("!ii", 8, wire.SSL_REQUEST_CODE)
    gssenc_request = struct.pack("!ii", 8, wire.GSSENC_REQUEST_CODE)
    # Without TLS to offer both are declined, and the startup packet follows in the clear.
    pair = LoginPair(ACCOUNTS, "alice", "alice-pw")
    login = pair.proxy
    for request in (gssenc_request, ssl_request):
        login.receive_data(request)
        event = login.next_event()
        assert isinstance(event, Reply) and event.data == TLS_DECLINED
    pair.drive()
    assert pair.client.done
    # With TLS offered, the request is taken once; bytes sent behind it are refused.
    login = ClientLogin(accounts_for(ACCOUNTS), os.urandom, tls_offered=True)
    login.receive_data(ssl_request)
    assert isinstance(login.next_event(), TlsRequested)
    login.tls_started()
    login.receive_data(ssl_request)
    assert login.next_event().data == TLS_DECLINED
    login = ClientLogin(accounts_for(ACCOUNTS), os.urandom, tls_offered=True)
    login.receive_data(ssl_request + wire.startup_message({"user": "alice"}))
    with pytest.raises(ProtocolViolation, match="unencrypted data after SSL request"):
        login.next_event()


def test_cancel_request_ends_the_login():
    login = ClientLogin(accounts_for(ACCOUNTS), os.urandom, tls_offered=False)
    login.receive_data(wire.cancel_request(77, 0xFFFFFFF0) + b"junk")
    event = login.next_event()
    assert isinstance(event, CancelRequested) and (event.pid, event.secret) == (77, 0xFFFFFFF0)
    assert login.next_event() is None


def test_startup_in_pieces_and_known_packets():
    packet = wire.startup_message({"user": "alice", "application_name": "x"})
    login = ClientLogin(accounts_for(ACCOUNTS), os.urandom, tls_offered=False)
    login.receive_data(packet[:7])
    assert login.next_event() is None
    login.receive_data(packet[7:])
    event = login.next_event()
    assert event.raw == packet and event.known is None
    assert event.session == ("alice", "alice", "", ("alice", "alice", ""), (("application_name", "x"),))
    known = ClientLogin(accounts_for(ACCOUNTS), os.urandom, tls_offered=False,
                        known_packets={packet: "plan"})
    known.receive_data(packet)
    event = known.next_event()
    assert (event.known, event.session) == ("plan", None)


def test_login_resumed_after_the_quick_lane_sent_the_salt():
    login = ClientLogin(accounts_for(ACCOUNTS), os.urandom, tls_offered=False)
    salt = b"\x01\x02\x03\x04"
    assert login.expect_md5("alice", ACCOUNTS["alice"], salt) == wire.authentication(wire.AUTH_MD5, salt)
    query = wire.query("SELECT 1")
    login.receive_data(wire.password_message(md5_response("alice-pw", "alice", salt) + b"\x00") + query)
    event = login.next_event()
    assert event.checked
    assert login.check(event.payload) == b"" and login.state == LOGIN
    assert login.next_event() is None     # what follows the login is not the login's
    login.finish(STATUSES, PID, SECRET)
    assert login.trailing_data() == query


def test_sasl_initial_response_is_not_a_check():
    # Throttling applies to messages checked against a secret: not the first SASL one.
    login = ClientLogin(accounts_for(ACCOUNTS), os.urandom, tls_offered=False)
    login.receive_data(wire.startup_message({"user": "bob"}))
    login.begin(login.next_event().session[0])
    client = ServerLogin("bob", "bob-pw", "bob", {})
    first = client.receive_message(82, struct.pack("!i", wire.AUTH_SASL) + b"SCRAM-SHA-256\x00\x00")
    login.receive_data(first)
    event = login.next_event()
    assert not event.checked
    login.receive_data(client.receive_data(login.check(event.payload)))
    assert login.next_event().checked


# -- ServerLogin against a real PostgreSQL -------------------------------------------------

def server_login(cluster, login: ServerLogin) -> socket.socket:
    sock = socket.create_connection((cluster.host, cluster.port), timeout=10)
    return drive_login(sock, login, first=login.start())


def test_server_login_scram(pg):
    login = ServerLogin(APP_USER, APP_PASSWORD, APP_DB, {"application_name": "login-test"})
    with server_login(pg, login) as sock:
        assert login.parameters["application_name"] == "login-test"
        assert "server_version" in login.parameters and login.backend_pid > 0
        assert login.leftover == []       # PostgreSQL sends nothing unasked after ReadyForQuery
        sock.sendall(wire.query("SELECT current_user, pg_backend_pid()"))
        rows = []
        while (message := recv_message(sock))[0] != b"Z":
            if message[0] == b"D":
                rows.append(wire.parse_datarow(message[1]))
    assert rows == [[APP_USER.encode(), str(login.backend_pid).encode()]]


@pytest.mark.parametrize("password,database,sqlstate", [
    ("wrong", APP_DB, "28P01"), (APP_PASSWORD, "no_such_db", "3D000")], ids=["password", "database"])
def test_server_login_refused(pg, password, database, sqlstate):
    login = ServerLogin(APP_USER, password, database, {})
    with pytest.raises(ServerError) as exc_info:
        server_login(pg, login).close()
    assert exc_info.value.sqlstate == sqlstate
    assert not login.done


def test_server_login_tls_declined(pg):
    # The throwaway cluster runs without ssl: it answers 'N', which a tls target refuses.
    login = ServerLogin(APP_USER, APP_PASSWORD, APP_DB, {}, tls_mode="require", target_name="t1")
    with socket.create_connection((pg.host, pg.port), timeout=10) as sock:
        sock.sendall(login.start())
        answer = sock.recv(1)
    assert answer == b"N"
    with pytest.raises(ServerError, match="database t1 does not accept TLS") as exc_info:
        login.tls_answer(answer)
    assert exc_info.value.sqlstate == "08P01" and not login.need_tls
