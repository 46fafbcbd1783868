"""Failover drill: clients keep working through rdsproxy while the primary dies.

A primary and its streaming replica (rdsproxy.devservers.postgres), rdsproxy as a subprocess with
both as targets, then `clients` psycopg sessions in threads: half run autocommit
statements (an INSERT ... RETURNING the server's port, then a SELECT), half run short
explicit transactions (BEGIN; two INSERTs; COMMIT). After a warm-up the primary is
stopped with `pg_ctl stop -m immediate`; `promote_after` seconds later the replica is
promoted. The drill reports what the issue asks to be measured:

* errors seen by the autocommit clients (they are outside a transaction: must be 0),
  except 08007 (transaction resolution unknown): the proxy's answer for a statement that
  had completed and was committing when the server died. That statement was inside its
  own transaction; it is reported as `autocommit_in_doubt` and counted with the
  transaction clients (at most one error each),
* errors per transaction client (at most one each: the transaction open at the crash),
* the pause: primary stopped -> first successful write on the new writer, minus
  `promote_after` (the time the drill itself waits before promoting).

Run: `python3 -m bench.failover [--clients 50] [--promote-after 0.5]` (JSON on stdout).
tests/test_failover.py runs the same drill and asserts on its result.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rdsproxy.devservers.base import free_port  # noqa: E402
from rdsproxy.devservers.postgres import PostgresCluster  # noqa: E402

USER, PASSWORD, DB = "drill", "drill-secret", "drilldb"
# transaction_resolution_unknown: an autocommit statement whose implicit transaction was
# committing when the primary died. It was inside a transaction (its own), so it is
# counted with the transaction clients, not as an error outside a transaction.
IN_DOUBT = "08007"


def _write_config(directory: Path, primary, replica, *, rw_port: int, ro_port: int,
                  admin_port: int, interval: float, failures: int, borrow_timeout: float) -> Path:
    secret = directory / "secret.json"
    secret.write_text(json.dumps({"username": USER, "password": PASSWORD, "dbname": DB}))
    config = directory / "proxy.toml"
    config.write_text(f"""\
name = "failover-drill"
engine_family = "POSTGRESQL"
idle_client_timeout = 0

[[auth]]
secret = "file:secret.json"
client_password_auth_type = "POSTGRES_MD5"

[target_group]
max_connections_percent = 20
connection_borrow_timeout = {borrow_timeout}
health_check_interval = {interval}
health_check_timeout = 1.0
health_check_failures = {failures}

[[targets]]
name = "primary"
host = "127.0.0.1"
port = {primary.port}

[[targets]]
name = "replica"
host = "127.0.0.1"
port = {replica.port}

[[endpoints]]
name = "rw"
listen = "127.0.0.1:{rw_port}"

[[endpoints]]
name = "ro"
listen = "127.0.0.1:{ro_port}"
target_role = "READ_ONLY"

[admin]
listen = "127.0.0.1:{admin_port}"
""")
    return config


class Worker(threading.Thread):
    """One client session, looping until told to stop; reconnects after an error."""

    def __init__(self, index: int, dsn: str, in_transaction: bool, stop: threading.Event,
                 first_write: dict, first_write_lock: threading.Lock, new_writer_port: int):
        super().__init__(daemon=True, name=f"drill-{index}")
        self.index = index
        self.dsn = dsn
        self.in_transaction = in_transaction
        self.stop = stop
        self.first_write = first_write
        self.lock = first_write_lock
        self.new_writer_port = new_writer_port
        self.ok = 0
        self.errors: list[str] = []
        self.in_doubt: list[str] = []    # 08007: the statement was committing at the crash
        self.on_new_writer = 0

    def _connect(self):
        # psycopg's defaults: after five runs its statements are prepared by name, which
        # the proxy keeps for it (no pin), so the session can move to the new writer.
        return psycopg.connect(self.dsn, autocommit=True, connect_timeout=30)

    def run(self) -> None:
        conn = None
        n = 0
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = self._connect()
                n += 1
                if self.in_transaction:
                    with conn.transaction():
                        port = conn.execute("INSERT INTO drill (client, n) VALUES (%s, %s) "
                                            "RETURNING inet_server_port()", (self.index, n)).fetchone()[0]
                        conn.execute("INSERT INTO drill (client, n) VALUES (%s, %s)", (self.index, -n))
                else:
                    port = conn.execute("INSERT INTO drill (client, n) VALUES (%s, %s) "
                                        "RETURNING inet_server_port()", (self.index, n)).fetchone()[0]
                    conn.execute("SELECT count(*) FROM drill WHERE client = %s", (self.index,)).fetchone()
                self.ok += 1
                if port == self.new_writer_port:
                    self.on_new_writer += 1
                    with self.lock:
                        if "at" not in self.first_write:
                            self.first_write["at"] = time.monotonic()
            except psycopg.Error as exc:
                text = f"{time.monotonic():.3f} {exc.sqlstate or ''} {type(exc).__name__}: {exc}".strip()
                if exc.sqlstate == IN_DOUBT:
                    self.in_doubt.append(text)
                else:
                    self.errors.append(text)
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:  # noqa: BLE001
                        pass
                    conn = None
                time.sleep(0.01)
            time.sleep(0.002)
        if conn is not None:
            conn.close()


def drill(*, clients: int = 50, promote_after: float = 0.5, warmup: float = 1.5,
          after: float = 2.0, interval: float = 0.2, failures: int = 2,
          borrow_timeout: float = 30.0, workdir: str | None = None, log=print) -> dict:
    own_dir = workdir is None
    directory = Path(workdir or tempfile.mkdtemp(prefix="rdsproxy-failover-"))
    primary = PostgresCluster(max_connections=100).start()
    replica = None
    proxy = None
    try:
        primary.psql(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
        primary.psql(f"CREATE DATABASE {DB} OWNER {USER}")
        primary.psql("CREATE TABLE drill (id bigserial PRIMARY KEY, client int, n int)", dbname=DB)
        primary.psql(f"ALTER TABLE drill OWNER TO {USER}", dbname=DB)
        replica = primary.make_replica()
        rw_port, ro_port, admin_port = free_port(), free_port(), free_port()
        config = _write_config(directory, primary, replica, rw_port=rw_port, ro_port=ro_port,
                               admin_port=admin_port, interval=interval, failures=failures,
                               borrow_timeout=borrow_timeout)
        proxy_log = open(directory / "proxy.log", "wb")
        proxy = subprocess.Popen([sys.executable, "-m", "rdsproxy", "serve", "--config", str(config)],
                                 stdout=proxy_log, stderr=subprocess.STDOUT, cwd=str(REPO))
        dsn = (f"host=127.0.0.1 port={rw_port} user={USER} password={PASSWORD} dbname={DB} "
               "sslmode=disable")
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
                    conn.execute("SELECT 1")
                break
            except psycopg.Error:
                if time.monotonic() > deadline or proxy.poll() is not None:
                    raise RuntimeError("the proxy did not come up:\n"
                                       + (directory / "proxy.log").read_text()[-3000:])
                time.sleep(0.1)

        stop = threading.Event()
        first_write: dict = {}
        lock = threading.Lock()
        workers = [Worker(i, dsn, i % 2 == 1, stop, first_write, lock, replica.port)
                   for i in range(clients)]
        for w in workers:
            w.start()
        time.sleep(warmup)
        before = sum(w.ok for w in workers)
        log(f"failover drill: {clients} clients, {before} operations in {warmup:g} s warm-up; "
            "stopping the primary (immediate)")
        t_kill = time.monotonic()
        primary.kill()
        t_killed = time.monotonic()
        time.sleep(promote_after)
        t_promote = time.monotonic()
        replica.promote()
        t_promoted = time.monotonic()
        log(f"failover drill: replica promoted {t_promoted - t_kill:.2f} s after the stop")
        give_up = time.monotonic() + borrow_timeout + 5
        while "at" not in first_write and time.monotonic() < give_up:
            time.sleep(0.01)
        time.sleep(after)
        stop.set()
        for w in workers:
            w.join(30)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats", timeout=5) as response:
                proxy_stats = json.loads(response.read())
        except OSError as exc:
            proxy_stats = {"error": str(exc)}
        autocommit = [w for w in workers if not w.in_transaction]
        transactional = [w for w in workers if w.in_transaction]
        first = first_write.get("at")
        result = {
            "clients": clients,
            "operations": sum(w.ok for w in workers),
            "operations_on_new_writer": sum(w.on_new_writer for w in workers),
            "workers_on_new_writer": sum(1 for w in workers if w.on_new_writer),
            "errors_outside_transaction": sum(len(w.errors) for w in autocommit),
            "autocommit_in_doubt": sum(len(w.in_doubt) for w in autocommit),
            "errors_inside_transaction_max": max((len(w.errors) + len(w.in_doubt) for w in workers
                                                  if w.in_transaction or w.in_doubt), default=0),
            "errors_inside_transaction_total": sum(len(w.errors) for w in transactional),
            "kill_seconds": round(t_killed - t_kill, 3),
            "promote_after": promote_after,
            "promote_seconds": round(t_promoted - t_promote, 3),
            "first_write_on_new_writer_after_stop": round(first - t_kill, 3) if first else None,
            "pause_seconds": round(first - t_kill - (t_promote - t_kill), 3) if first else None,
            "proxy_requests_replayed": proxy_stats.get("RequestsReplayed"),
            "proxy_transactions_in_doubt": proxy_stats.get("TransactionsInDoubt"),
            # Clients whose named statements the proxy kept, and the sessions it pinned.
            "proxy_statement_clients": proxy_stats.get("StatementClients"),
            "proxy_pin_reasons": proxy_stats.get("SessionPinReasons"),
            "error_samples": ([e for w in autocommit for e in w.errors + w.in_doubt]
                              + [e for w in transactional for e in w.errors])[:10],
            "proxy_log": str(directory / "proxy.log"),
        }
        return result
    finally:
        if proxy is not None:
            proxy.terminate()
            try:
                proxy.wait(15)
            except subprocess.TimeoutExpired:
                proxy.kill()
        if replica is not None:
            replica.stop("immediate")
        primary.stop("immediate")
        if own_dir and os.environ.get("RDSPROXY_KEEP_DRILL") is None:
            import shutil
            shutil.rmtree(directory, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--promote-after", type=float, default=0.5)
    parser.add_argument("--interval", type=float, default=0.2, help="health_check_interval")
    parser.add_argument("--failures", type=int, default=2, help="health_check_failures")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)
    results = []
    for _ in range(args.rounds):
        result = drill(clients=args.clients, promote_after=args.promote_after,
                       interval=args.interval, failures=args.failures,
                       log=lambda m: print(m, file=sys.stderr))
        result.pop("proxy_log", None)
        results.append(result)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
