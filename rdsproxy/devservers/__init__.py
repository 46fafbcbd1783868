"""Throwaway local database servers for tests, benchmarks and the quick start.

- `base`: what they share (free ports, private directories, the OS user they run as, a
  per-process install template, orphan reaping, stop at exit, log tails, quoting).
- `postgres`: PostgresCluster, PostgreSQL clusters (and streaming replicas).
- `mariadb`: MariaDBServer, MariaDB servers for the MySQL engine family.
"""
