"""Issue 4: TLS on both legs of the proxy, with real psql/psycopg clients and real PostgreSQL."""
from __future__ import annotations

import os
import shutil
import socket
import ssl
import struct
import subprocess
import warnings

import psycopg
import pytest

from harness import APP_DB, APP_PASSWORD, APP_USER, postgres_tls_settings, raw_startup
from proxyproc import ProxyProcess
from rdsproxy.engines.postgres import protocol as pg
from rdsproxy.tls import make_test_ca
from utils import wait_until


def tls_section(ca) -> dict:
    return {"cert_file": ca.server_cert, "key_file": ca.server_key}


def psql(proxy, sql, **conn):
    """Run psql through the proxy; returns (returncode, stdout, stderr)."""
    params = {"host": "127.0.0.1", "port": proxy.port, "user": APP_USER, "dbname": APP_DB,
              "connect_timeout": 10, **conn}
    dsn = " ".join(f"{k}={v}" for k, v in params.items())
    bin_dir = "/usr/lib/postgresql/15/bin"
    exe = os.path.join(bin_dir, "psql") if os.path.exists(os.path.join(bin_dir, "psql")) else shutil.which("psql")
    env = {**os.environ, "PGPASSWORD": APP_PASSWORD}
    for key in ("PGSSLMODE", "PGSSLROOTCERT", "PGHOST", "PGPORT"):
        env.pop(key, None)
    out = subprocess.run([exe, dsn, "-XAtqc", sql], capture_output=True, text=True, env=env, timeout=30)
    return out.returncode, out.stdout.strip(), out.stderr.strip()


def test_psql_verify_full_through_proxy(proxy_factory, test_ca):
    proxy = proxy_factory(tls=tls_section(test_ca))
    for host in ("127.0.0.1", "localhost"):
        code, out, err = psql(proxy, "select ssl, version from pg_stat_ssl where pid = pg_backend_pid()",
                              host=host, sslmode="verify-full", sslrootcert=test_ca.ca_cert)
        # The proxy's own database connection is plaintext here; the client leg is TLS.
        assert code == 0, err
        assert out == "f|"
    with psycopg.connect(host="127.0.0.1", port=proxy.port, user=APP_USER, password=APP_PASSWORD,
                         dbname=APP_DB, sslmode="verify-full", sslrootcert=test_ca.ca_cert) as conn:
        assert conn.pgconn.ssl_in_use
        # The session works over TLS through the relay: a result larger than one TLS record.
        rows = conn.execute("select repeat('x', 100000) from generate_series(1, 20)").fetchall()
        assert len(rows) == 20 and len(rows[0][0]) == 100000
        stats = proxy.stats()
        assert (stats["ClientConnectionsTLS"], stats["ClientConnectionsNoTLS"]) == (1, 0), stats
    # Plaintext still allowed without require_tls; both are counted.
    with psycopg.connect(proxy.dsn()) as conn:
        assert not conn.pgconn.ssl_in_use
        conn.execute("select 1")
        stats = proxy.stats()
        assert (stats["ClientConnectionsTLS"], stats["ClientConnectionsNoTLS"]) == (0, 1), stats


def test_verify_full_fails_against_another_ca(proxy_factory, test_ca, tmp_path):
    proxy = proxy_factory(tls=tls_section(test_ca))
    other = make_test_ca(tmp_path / "other")
    code, out, err = psql(proxy, "select 1", sslmode="verify-full", sslrootcert=other.ca_cert)
    assert code != 0 and "certificate verify failed" in err
    # The proxy survives the failed handshake and forgets the client.
    code, out, err = psql(proxy, "select 1", sslmode="verify-full", sslrootcert=test_ca.ca_cert)
    assert code == 0 and out == "1", err
    wait_until(lambda: proxy.stats()["ClientConnections"] == 0, timeout=5)


def test_require_tls_refuses_plaintext(proxy_factory, test_ca):
    proxy = proxy_factory(tls=tls_section(test_ca), top={"require_tls": True})
    fields = raw_startup(proxy.port)
    assert fields["S"] == "FATAL" and fields["C"] == "28000"
    assert fields["M"] == "this proxy requires TLS"
    code, out, err = psql(proxy, "select 1", sslmode="disable")
    assert code != 0 and "this proxy requires TLS" in err
    # sslmode=prefer (psql's default) and require are served.
    code, out, err = psql(proxy, "select 1")
    assert code == 0 and out == "1", err
    with psycopg.connect(proxy.dsn(sslmode="require")) as conn:
        assert conn.execute("select 2").fetchone() == (2,)
        # The plaintext clients refused are gone: the gauges count those connected.
        stats = proxy.stats()
        assert stats["ClientConnectionsNoTLS"] == 0 and stats["ClientConnectionsTLS"] == 1


def test_require_tls_needs_certificate():
    from rdsproxy.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError) as info:
        config_from_dict({"require_tls": True, "auth": [{"secret": "env:X"}],
                          "targets": [{"host": "127.0.0.1"}]}, source="proxy.toml")
    assert info.value.key == "require_tls" and "[tls]" in info.value.problem


def test_gssenc_request_answered_n(proxy_factory, test_ca):
    proxy = proxy_factory(tls=tls_section(test_ca))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(struct.pack("!ii", 8, pg.GSSENC_REQUEST_CODE))
        assert sock.recv(1) == b"N"


def test_plaintext_after_ssl_request_refused(proxy_factory, test_ca):
    """Bytes pipelined behind the SSLRequest (before our 'S') are refused, as PostgreSQL does."""
    proxy = proxy_factory(tls=tls_section(test_ca))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(struct.pack("!ii", 8, pg.SSL_REQUEST_CODE)
                     + pg.startup_message({"user": APP_USER, "database": APP_DB}))
        data = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    assert b"unencrypted data after SSL request" in data


def _tls11_client():
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.set_ciphers("DEFAULT:@SECLEVEL=0")   # let OpenSSL 3 really offer TLS 1.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1_1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    return old


def test_tls11_client_refused(proxy_factory, test_ca):
    proxy = proxy_factory(tls=tls_section(test_ca))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        raw_startup(proxy.port, context=_tls11_client())
    # A TLS 1.2 client is fine, and the refused one left nothing behind.
    modern = ssl.create_default_context(cafile=test_ca.ca_cert)
    modern.minimum_version = modern.maximum_version = ssl.TLSVersion.TLSv1_2
    assert raw_startup(proxy.port, context=modern) == {"type": "R"}   # asks for SCRAM
    with psycopg.connect(proxy.dsn(sslmode="require")) as conn:
        conn.execute("select 1")
    wait_until(lambda: proxy.stats()["ClientConnections"] == 0, timeout=5)


def test_database_leg_tls_verified_by_pg_stat_ssl(proxy_factory, pg_factory, test_ca):
    cluster = pg_factory(settings=postgres_tls_settings(test_ca), max_connections=30)
    cluster.create_user(APP_USER, APP_PASSWORD)
    cluster.create_database(APP_DB, owner=APP_USER)
    for mode in ("verify-full", "verify-ca", "require"):
        proxy = proxy_factory(cluster, tls=tls_section(test_ca),
                                     target={"tls": mode, "tls_ca_file": test_ca.ca_cert})
        with psycopg.connect(proxy.dsn(sslmode="verify-full", sslrootcert=test_ca.ca_cert)) as conn:
            ssl_on, version = conn.execute(
                "select ssl, version from pg_stat_ssl where pid = pg_backend_pid()").fetchone()
            assert ssl_on is True and version in ("TLSv1.2", "TLSv1.3"), mode
            # And plenty of traffic through both TLS legs.
            rows = conn.execute("select g, repeat('y', 5000) from generate_series(1, 500) g").fetchall()
            assert len(rows) == 500
        proxy.stop()
    # Without TLS to the database the same query says so.
    proxy = proxy_factory(cluster)
    with psycopg.connect(proxy.dsn()) as conn:
        assert conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()").fetchone() == (False,)


def test_database_leg_tls_errors_are_clear(proxy_factory, pg, pg_factory, test_ca, tmp_path):
    # The session cluster has ssl off: it answers 'N'.
    proxy = proxy_factory(target={"tls": "require"})
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(proxy.dsn())
    assert "does not accept TLS" in str(info.value)
    # A cluster whose certificate another CA signed fails verification, with a clear reason.
    cluster = pg_factory(settings=postgres_tls_settings(test_ca), max_connections=20)
    cluster.create_user(APP_USER, APP_PASSWORD)
    cluster.create_database(APP_DB, owner=APP_USER)
    other = make_test_ca(tmp_path / "other")
    proxy = proxy_factory(cluster, target={"tls": "verify-full", "tls_ca_file": other.ca_cert})
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(proxy.dsn())
    assert "certificate verify failed" in str(info.value)


# A proxy's certificate files in tmp_path/live, relative to its configuration.
LIVE_TLS = {"cert_file": "live/server.pem", "key_file": "live/server.key"}


def install_certificate(live, ca) -> None:
    shutil.copyfile(ca.server_cert, live / "server.pem")
    shutil.copyfile(ca.server_key, live / "server.key")


def live_certificate(tmp_path):
    """Two test CAs, and tmp_path/live holding the first one's server pair."""
    first = make_test_ca(tmp_path / "first")
    second = make_test_ca(tmp_path / "second")
    live = tmp_path / "live"
    live.mkdir()
    install_certificate(live, first)
    return first, second, live


def test_certificate_reload(proxy_factory, tmp_path):
    """What SIGHUP runs (Proxy.reload): new handshakes use the new certificate."""
    first, second, live = live_certificate(tmp_path)
    proxy = proxy_factory(tls=LIVE_TLS)
    code, _, err = psql(proxy, "select 1", sslmode="verify-full", sslrootcert=first.ca_cert)
    assert code == 0, err
    # A session open across the reload keeps working.
    keep = psycopg.connect(proxy.dsn(sslmode="verify-full", sslrootcert=first.ca_cert))
    install_certificate(live, second)
    proxy.call(proxy.proxy.reload)
    code, _, err = psql(proxy, "select 1", sslmode="verify-full", sslrootcert=second.ca_cert)
    assert code == 0, err
    code, _, err = psql(proxy, "select 1", sslmode="verify-full", sslrootcert=first.ca_cert)
    assert code != 0 and "certificate verify failed" in err
    assert keep.execute("select 3").fetchone() == (3,)
    keep.close()
    # A broken file is reported and the current certificate stays.
    (live / "server.pem").write_text("not a certificate")
    proxy.call(proxy.proxy.reload)
    code, _, err = psql(proxy, "select 1", sslmode="verify-full", sslrootcert=second.ca_cert)
    assert code == 0, err


def test_sighup_reloads_certificate_subprocess(pg, tmp_path):
    """`rdsproxy serve` as a process: SIGHUP makes new handshakes use the new certificate."""
    import signal

    first, second, live = live_certificate(tmp_path)
    # The certificate paths are relative to the config file's directory.
    proxy = ProxyProcess(tmp_path, pg, None, top={"require_tls": True}, max_connections_percent=10,
                         tls=LIVE_TLS)
    try:
        code, out, err = psql(proxy, "select 1", sslmode="verify-full", sslrootcert=first.ca_cert)
        assert code == 0 and out == "1", err
        install_certificate(live, second)
        mark = len(proxy.log_text())
        proxy.signal(signal.SIGHUP)
        proxy.wait_for_log("TLS certificate reloaded", timeout=10, start=mark)
        code, out, err = psql(proxy, "select 1", sslmode="verify-full", sslrootcert=second.ca_cert)
        assert code == 0 and out == "1", err
        code, out, err = psql(proxy, "select 1", sslmode="verify-full", sslrootcert=first.ca_cert)
        assert code != 0 and "certificate verify failed" in err
        assert proxy.proc.poll() is None
    finally:
        proxy.stop()


def test_client_certificates_checked_with_ca_file(proxy_factory, test_ca, tmp_path):
    proxy = proxy_factory(tls={**tls_section(test_ca), "ca_file": test_ca.ca_cert,
                                      "require_client_cert": True})
    code, out, err = psql(proxy, "select 1", sslmode="verify-full", sslrootcert=test_ca.ca_cert,
                          sslcert=test_ca.client_cert, sslkey=test_ca.client_key)
    assert code == 0 and out == "1", err
    # Without a client certificate, or with one from another CA: no session.
    code, out, err = psql(proxy, "select 1", sslmode="verify-full", sslrootcert=test_ca.ca_cert,
                          sslcert=str(tmp_path / "none.pem"), sslkey=str(tmp_path / "none.key"))
    assert code != 0
    other = make_test_ca(tmp_path / "other")
    code, out, err = psql(proxy, "select 1", sslmode="verify-full", sslrootcert=test_ca.ca_cert,
                          sslcert=other.client_cert, sslkey=other.client_key)
    assert code != 0
