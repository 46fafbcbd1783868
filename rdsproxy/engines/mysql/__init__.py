"""The MySQL / MariaDB engine family.

- `protocol`: the client/server wire protocol, sans-IO (framing, handshake, OK/ERR/EOF,
  prepared-statement ids, and a response tracker that finds where a response ends).
- `login`: the proxy's login to a database server (handshake, TLS, auth plugins), sans-IO.
- `devserver`: throwaway MariaDB servers for tests and benchmarks.

Password scrambles and the RSA exchange live in `rdsproxy.auth.mysql`.
"""
