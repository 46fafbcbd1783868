"""TLS contexts for the client side (proxy as server) and the database side, plus certificate helpers."""
from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import ssl
from typing import NamedTuple

__all__ = ["server_context", "client_context", "generate_self_signed", "make_test_ca", "CAPaths",
           "CLIENT_MODES"]

CLIENT_MODES = ("disable", "require", "verify-ca", "verify-full")


def server_context(cert_file: str, key_file: str, ca_file: str | None = None, *,
                   require_client_cert: bool = False) -> ssl.SSLContext:
    """Context for accepting client connections: TLS 1.2+, the ssl module's server defaults.

    With `ca_file`, client certificates are verified against it: optional (a client without
    one is still accepted, one with a bad one is refused) unless `require_client_cert`.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Renegotiation only helps attackers on a database protocol; OpenSSL >= 1.1.0h has this flag.
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.load_cert_chain(cert_file, key_file)
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    elif require_client_cert:
        raise ValueError("require_client_cert needs a ca_file to verify client certificates against")
    return ctx


def client_context(mode: str, ca_file: str | None = None, *, cert_file: str | None = None,
                   key_file: str | None = None) -> ssl.SSLContext | None:
    """Context for connecting to a database, with libpq's sslmode meanings.

    disable: None (plain TCP). require: encrypt but verify nothing (as libpq's require without
    a root certificate). verify-ca: verify the chain, not the host name. verify-full: verify the
    chain and that the certificate names the host passed as server_hostname. Without `ca_file`
    the system trust store is used. `cert_file`/`key_file` present a client certificate.
    """
    if mode not in CLIENT_MODES:
        raise ValueError(f"TLS mode must be one of {', '.join(CLIENT_MODES)}, not {mode!r}")
    if mode == "disable":
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if mode == "require":
        # Order matters: check_hostname must be off before verification can be turned off.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif mode == "verify-ca":
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


# -- certificates (cryptography is imported lazily: only these helpers need it) -------------

def _san(hostnames):
    from cryptography import x509

    names = []
    for name in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(names)


def _new_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())  # small, fast and universally supported


def _write_key(path, key) -> None:
    from cryptography.hazmat.primitives import serialization

    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    # Private keys are created owner-only from the start, never world-readable for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _write_cert(path, cert) -> None:
    from cryptography.hazmat.primitives import serialization

    with open(path, "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))


def _build_cert(subject_cn, key, issuer_name, issuer_key, days, *, ca=False, hostnames=(),
                client=False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = _dt.datetime.now(_dt.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(issuer_name or subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - _dt.timedelta(minutes=5))   # tolerate small clock skew
               .not_valid_after(now + _dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None),
                              critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False))
    if issuer_key is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False)
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if hostnames:
        builder = builder.add_extension(_san(hostnames), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def generate_self_signed(cert_path: str | os.PathLike, key_path: str | os.PathLike,
                         hostnames=("localhost", "127.0.0.1"), days: int = 365) -> tuple[str, str]:
    """Write a self-signed server certificate (ECDSA P-256) and its key (mode 0600) as PEM.

    `hostnames` go into the SubjectAltName as DNS names or, when they parse as such, IP
    addresses; the first is also the common name. Returns (cert_path, key_path).
    """
    hostnames = tuple(hostnames)
    if not hostnames:
        raise ValueError("at least one host name is needed")
    key = _new_key()
    cert = _build_cert(hostnames[0], key, None, None, days, hostnames=hostnames)
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return os.fspath(cert_path), os.fspath(key_path)


class CAPaths(NamedTuple):
    ca_cert: str
    ca_key: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def make_test_ca(directory: str | os.PathLike, hostnames=("localhost", "127.0.0.1"),
                 days: int = 30, client_name: str = "rdsproxy-client") -> CAPaths:
    """Make a private CA in `directory` plus a server and a client certificate signed by it.

    For tests and for trying verify-full / client certificates without a real PKI: give
    server_context() the server pair (and ca_cert to check clients), give client_context()
    ca_cert. The server certificate names `hostnames`; the client certificate's CN is
    `client_name`. Files: ca.pem, ca.key, server.pem, server.key, client.pem, client.key.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    p = CAPaths(*(os.path.join(directory, n) for n in (
        "ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key")))
    ca_key = _new_key()
    ca_cert = _build_cert("rdsproxy test CA", ca_key, None, None, days, ca=True)
    ca_name = ca_cert.subject
    server_key = _new_key()
    server_cert = _build_cert(tuple(hostnames)[0], server_key, ca_name, ca_key, days,
                              hostnames=tuple(hostnames))
    client_key = _new_key()
    client_cert = _build_cert(client_name, client_key, ca_name, ca_key, days, client=True)
    for path, key in ((p.ca_key, ca_key), (p.server_key, server_key), (p.client_key, client_key)):
        _write_key(path, key)
    for path, cert in ((p.ca_cert, ca_cert), (p.server_cert, server_cert), (p.client_cert, client_cert)):
        _write_cert(path, cert)
    return p
