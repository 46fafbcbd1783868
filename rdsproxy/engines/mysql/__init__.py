"""The MySQL / MariaDB engine family.

- `engine`: MysqlEngine, the BaseEngine subclass (accounts, server connections, health
  checks, proxy-issued connection ids and KILL).
- `client`: client connections (the asyncio side of the login, TLS, commands relayed
  over borrowed connections, pinning), composed of `commands` (dispatch and the COM_*
  handlers), `statements` (prepared-statement id mapping) and `sync` (bringing a borrowed
  connection to the client's session state, and resetting it); `clientstate` holds what
  they share (states, the proxy's own errors).
- `client_login`: a client's login to the proxy (handshake, TLS request, auth plugins,
  IAM tokens, COM_CHANGE_USER), sans-IO.
- `backend`: server connections (login, one command at a time, the proxy's own commands).
- `pinning`: RDS Proxy's MySQL pinning rules and the tracked variables.
- `health`: the health probe (@@read_only / @@innodb_read_only / @@max_connections).
- `protocol`: the client/server wire protocol, sans-IO, a package by concern (constants,
  codec and framing, responses, login packets, commands, and a response tracker that finds
  where a response ends); callers use the names its `__init__` re-exports.
- `server_login`: the proxy's login to a database server (handshake, TLS, auth plugins), sans-IO.

Password scrambles and the RSA exchange live in `rdsproxy.auth.mysql`; the relay's answer
scanner in `rdsproxy._fastpath.mysql_framing_py` (compiled as `mysql_framing_c`). Throwaway
MariaDB servers for tests and benchmarks are `rdsproxy.devservers.mariadb`.
"""
