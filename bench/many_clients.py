"""The 'too many connections' demonstration: 500 pgbench clients, a database that takes 50.

Charter: start a throwaway PostgreSQL with max_connections=50, put rdsproxy in front with
max_connections_percent=40 (20 connections), run `pgbench -S -c 500 -j 2 -T 20` through
the proxy while sampling pg_stat_activity, then the same pgbench directly. Prints the
figures the README quotes. Run: `python3 -m bench.many_clients [--duration 20]`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

from rdsproxy.devservers.base import free_port
from rdsproxy.devservers.postgres import PostgresCluster

USER, PASSWORD, DB = "app", "app-secret", "bench"


def pgbench(port: int, *args: str) -> tuple[int, str]:
    proc = subprocess.run(["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", USER, "-n", *args, DB],
                          env={**os.environ, "PGPASSWORD": PASSWORD}, capture_output=True, text=True,
                          timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=20)
    parser.add_argument("--clients", type=int, default=500)
    args = parser.parse_args(argv)

    cluster = PostgresCluster(auth="scram-sha-256", max_connections=50).start()
    proxy = None
    try:
        cluster.create_user(USER, PASSWORD)
        cluster.create_database(DB, owner=USER)
        rc, out = pgbench(cluster.port, "-i", "-s", "1", "-q")
        assert rc == 0, out
        workdir = tempfile.mkdtemp(prefix="rdsproxy-many-")
        with open(os.path.join(workdir, "secret.json"), "w") as fh:
            json.dump({"username": USER, "password": PASSWORD}, fh)
        port = free_port()
        with open(os.path.join(workdir, "proxy.toml"), "w") as fh:
            fh.write(f'''name = "many-clients"
engine_family = "POSTGRESQL"
[[auth]]
secret = "file:secret.json"
client_password_auth_type = "POSTGRES_MD5"
[target_group]
max_connections_percent = 40
connection_borrow_timeout = 120
[[targets]]
host = "{cluster.host}"
port = {cluster.port}
[[endpoints]]
name = "default"
listen = "127.0.0.1:{port}"
''')
        proxy = subprocess.Popen([sys.executable, "-m", "rdsproxy", "serve", "--config",
                                  os.path.join(workdir, "proxy.toml")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", str(port)],
                             capture_output=True).returncode not in (0, 1):
            if time.monotonic() > deadline:
                raise SystemExit("rdsproxy did not start")
            time.sleep(0.2)

        peak = [0]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                n = int(cluster.psql(f"select count(*) from pg_stat_activity where usename = '{USER}' "
                                     "and backend_type = 'client backend' "
                                     "and application_name <> 'rdsproxy-health'"))
                peak[0] = max(peak[0], n)
                stop.wait(0.1)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        cmd = ["-S", "-c", str(args.clients), "-j", "2", "-T", str(args.duration)]
        rc, out = pgbench(port, *cmd)
        stop.set()
        sampler.join()
        tps = re.search(r"tps = ([\d.]+)", out)
        failed = re.search(r"number of failed transactions: (\d+)", out)
        processed = re.search(r"actually processed: (\d+)", out)
        print(f"through rdsproxy: pgbench {' '.join(cmd)} -> exit {rc}, "
              f"{processed.group(1) if processed else '?'} transactions, "
              f"{failed.group(1) if failed else '?'} failed, tps {tps.group(1) if tps else '?'}, "
              f"at most {peak[0]} proxy backends in pg_stat_activity (max_connections=50)")
        rc_direct, out_direct = pgbench(cluster.port, "-S", "-c", str(args.clients), "-j", "2", "-T", "5")
        reason = next((line for line in out_direct.splitlines() if "too many" in line
                       or "remaining connection slots" in line), out_direct.strip().splitlines()[-1:])
        print(f"directly: pgbench -S -c {args.clients} -j 2 -T 5 -> exit {rc_direct}: {reason}")
        return 0 if rc == 0 and failed and failed.group(1) == "0" and peak[0] <= 20 else 1
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(30)
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
