"""TLS contexts and certificate helpers, exercised with real loopback handshakes."""
from __future__ import annotations

import asyncio
import os
import ssl
import stat
import warnings

import pytest

from rdsproxy.tls import client_context, generate_self_signed, make_test_ca, server_context


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return make_test_ca(tmp_path_factory.mktemp("ca"))


async def _handshake(server_ctx, client_ctx, server_hostname):
    """Start a TLS echo server on loopback, connect, exchange a line.

    Returns (client result, server-side outcome): each "ok" or the exception raised.
    """
    server_outcome: asyncio.Future = asyncio.get_running_loop().create_future()

    async def handle(reader, writer):
        try:
            line = await reader.readline()
            writer.write(line)
            await writer.drain()
            if not server_outcome.done():
                server_outcome.set_result("ok")
        except Exception as exc:  # noqa: BLE001 - reported to the test
            if not server_outcome.done():
                server_outcome.set_result(exc)
        finally:
            writer.close()

    # The server's handshake error is reported by asyncio's exception handler, not handle().
    loop = asyncio.get_running_loop()
    old_handler = loop.get_exception_handler()

    def on_error(loop, context):
        if not server_outcome.done():
            server_outcome.set_result(context.get("exception") or RuntimeError(context["message"]))

    loop.set_exception_handler(on_error)
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx,
                                        ssl_handshake_timeout=5)
    port = server.sockets[0].getsockname()[1]
    try:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname=server_hostname), 5)
            writer.write(b"hello\n")
            await writer.drain()
            echoed = await asyncio.wait_for(reader.readline(), 5)
            version = writer.get_extra_info("ssl_object").version()
            writer.close()
            client = ("ok", echoed, version)
        except (ssl.SSLError, ConnectionError, OSError) as exc:
            client = exc
        try:
            server_side = await asyncio.wait_for(asyncio.shield(server_outcome),
                                                 2 if isinstance(client, tuple) and client[1] else 0.3)
        except asyncio.TimeoutError:
            server_side = None
        return client, server_side
    finally:
        server.close()
        await server.wait_closed()
        loop.set_exception_handler(old_handler)


def run(coro):
    return asyncio.run(coro)


def test_contexts_build(ca):
    s = server_context(ca.server_cert, ca.server_key)
    assert s.minimum_version == ssl.TLSVersion.TLSv1_2
    assert s.verify_mode == ssl.CERT_NONE
    assert server_context(ca.server_cert, ca.server_key, ca.ca_cert).verify_mode == ssl.CERT_OPTIONAL
    assert server_context(ca.server_cert, ca.server_key, ca.ca_cert,
                          require_client_cert=True).verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ValueError):
        server_context(ca.server_cert, ca.server_key, require_client_cert=True)

    assert client_context("disable") is None
    req = client_context("require")
    assert req.verify_mode == ssl.CERT_NONE and not req.check_hostname
    assert req.minimum_version == ssl.TLSVersion.TLSv1_2
    vca = client_context("verify-ca", ca.ca_cert)
    assert vca.verify_mode == ssl.CERT_REQUIRED and not vca.check_hostname
    full = client_context("verify-full", ca.ca_cert)
    assert full.verify_mode == ssl.CERT_REQUIRED and full.check_hostname
    assert client_context("verify-full").check_hostname  # system trust store
    with pytest.raises(ValueError):
        client_context("prefer")


def test_verify_full_handshake(ca):
    client, server = run(_handshake(server_context(ca.server_cert, ca.server_key),
                                    client_context("verify-full", ca.ca_cert), "localhost"))
    assert client[0] == "ok" and client[1] == b"hello\n"
    assert client[2] in ("TLSv1.2", "TLSv1.3")
    assert server == "ok"


def test_verify_full_by_ip_address(ca):
    client, _ = run(_handshake(server_context(ca.server_cert, ca.server_key),
                               client_context("verify-full", ca.ca_cert), "127.0.0.1"))
    assert client[0] == "ok"


def test_verify_full_wrong_host_name_fails(ca):
    client, _ = run(_handshake(server_context(ca.server_cert, ca.server_key),
                               client_context("verify-full", ca.ca_cert), "db.example.com"))
    assert isinstance(client, ssl.SSLCertVerificationError)
    assert "hostname" in str(client).lower() or "match" in str(client).lower()


def test_verify_ca_ignores_host_name(ca):
    client, _ = run(_handshake(server_context(ca.server_cert, ca.server_key),
                               client_context("verify-ca", ca.ca_cert), "db.example.com"))
    assert client[0] == "ok"


def test_verify_full_against_other_ca_fails(ca, tmp_path):
    other = make_test_ca(tmp_path / "other")
    client, _ = run(_handshake(server_context(ca.server_cert, ca.server_key),
                               client_context("verify-full", other.ca_cert), "localhost"))
    assert isinstance(client, ssl.SSLCertVerificationError)


def test_require_accepts_self_signed_without_verification(tmp_path):
    cert, key = generate_self_signed(tmp_path / "c.pem", tmp_path / "k.pem")
    client, _ = run(_handshake(server_context(cert, key), client_context("require"), "anything"))
    assert client[0] == "ok"
    # ... while verify-full with the system store refuses it.
    client, _ = run(_handshake(server_context(cert, key), client_context("verify-full"), "localhost"))
    assert isinstance(client, ssl.SSLCertVerificationError)


def _memory_handshake(server_ctx, client_ctx):
    """Handshake two SSLObjects through memory BIOs; returns (client error, server error)."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False, server_hostname="localhost")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    errors = {"client": None, "server": None}
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, obj in (("client", client), ("server", server)):
            if done[name] or errors[name]:
                continue
            try:
                obj.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                errors[name] = exc
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()) or any(errors.values()):
            break
    return errors["client"], errors["server"], done


def _tls11_client():
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    # Let this client really offer TLS 1.1 (OpenSSL 3 hides it at the default security level),
    # so that the refusal is the server's doing.
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1_1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    return old


def test_tls11_client_refused_by_server(ca):
    server_ctx = server_context(ca.server_cert, ca.server_key)
    client_err, server_err, _ = _memory_handshake(server_ctx, _tls11_client())
    assert server_err is not None and "unsupported protocol" in str(server_err).lower()
    # The same server does complete a handshake with a modern client.
    client_err, server_err, done = _memory_handshake(server_ctx, client_context("require"))
    assert client_err is None and server_err is None and all(done.values())


def test_tls11_client_refused_over_loopback(ca):
    client, server = run(_handshake(server_context(ca.server_cert, ca.server_key),
                                    _tls11_client(), "localhost"))
    assert isinstance(client, (ssl.SSLError, ConnectionError))
    assert server != "ok"


def test_client_certificates(ca):
    required = server_context(ca.server_cert, ca.server_key, ca.ca_cert, require_client_cert=True)
    with_cert = client_context("verify-full", ca.ca_cert, cert_file=ca.client_cert,
                               key_file=ca.client_key)
    client, server = run(_handshake(required, with_cert, "localhost"))
    assert client[0] == "ok" and server == "ok"

    # Without a certificate: TLS 1.3 reports the refusal after the handshake, so the client may
    # fail on connect or on its first read; either way no echo comes back.
    client, server = run(_handshake(required, client_context("verify-full", ca.ca_cert), "localhost"))
    assert not (isinstance(client, tuple) and client[1] == b"hello\n")
    assert server != "ok"

    optional = server_context(ca.server_cert, ca.server_key, ca.ca_cert)
    client, server = run(_handshake(optional, client_context("verify-full", ca.ca_cert), "localhost"))
    assert client[0] == "ok" and server == "ok"


def test_self_signed_loads(tmp_path):
    cert, key = generate_self_signed(tmp_path / "c.pem", tmp_path / "k.pem",
                                     hostnames=("db.local", "127.0.0.1", "::1"), days=10)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    info = ssl._ssl._test_decode_cert(cert)  # the stdlib's own PEM parser
    assert ("DNS", "db.local") in info["subjectAltName"]
    assert ("IP Address", "127.0.0.1") in info["subjectAltName"]
    assert any(kind == "IP Address" and value in ("::1", "0:0:0:0:0:0:0:1")
               for kind, value in info["subjectAltName"])
    # A client trusting exactly this certificate verifies it by host name.
    client, _ = run(_handshake(server_context(cert, key), client_context("verify-full", cert),
                               "db.local"))
    assert client[0] == "ok"
