"""pgbench benchmark suite: rdsproxy against PgBouncer and a direct PostgreSQL connection.

Charter: stand up a throwaway PostgreSQL, PgBouncer and two rdsproxy processes (Cython
fast path and RDSPROXY_PURE_PYTHON=1), drive them with the same pgbench workloads
interleaved in rounds so machine noise hits every target alike, probe the memory cost of
idle client connections, and write JSON / Markdown / PNG reports. `bench.gate` turns a
result file into a CI pass/fail against `ci/bench_baseline.json`.

Run it with `python3 -m bench --help` (or `bench/run`, which installs missing packages).
The suite only ever talks to loopback addresses and every process it starts is stopped
before it exits, also on Ctrl-C.
"""
