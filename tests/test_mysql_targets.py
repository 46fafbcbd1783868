"""MySQL targets through the proxy: roles from @@read_only, the READ_ONLY endpoint, and a
writer that goes away while clients keep working.

Two independent MariaDB servers stand in for a writer and a replica: the "replica" runs with
read_only=ON, and "promoting" it is SET GLOBAL read_only=OFF, which is what the proxy sees
after a real failover (it only follows what @@read_only says). The data is not replicated,
so each server gets the table the clients use.
"""
from __future__ import annotations

import threading
import time

import pymysql
import pytest
from harness import (APP_DB, APP_PASSWORD as APP_PW, APP_USER as APP, FAST_CHECKS,
                     READ_WRITE_AND_READ_ONLY, describe_targets_cli, proxy_config)
from proxyproc import dump_toml
from utils import wait_until

from rdsproxy.devservers.mariadb import MariaDBServer


def _server(read_only: bool) -> MariaDBServer:
    server = MariaDBServer(max_connections=40, settings={"read_only": "ON" if read_only else "OFF"})
    server.start()
    server.create_user(APP, APP_PW, grant=None)   # no global privileges: read_only applies
    server.create_database(APP_DB, owner=APP)
    server.sql("CREATE TABLE hits (id BIGINT AUTO_INCREMENT PRIMARY KEY, worker INT)", database=APP_DB)
    return server


@pytest.fixture
def writer_and_reader():
    servers = []
    try:
        servers.append(_server(read_only=False))
        servers.append(_server(read_only=True))
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def start_proxy(proxy_factory):
    """start(writer, reader, **target_group): a proxy of app in front of both, with rw and
    ro endpoints and fast health checks."""
    def start(writer, reader, **target_group):
        return proxy_factory(
            engine="mysql", targets=[("writer", writer), ("reader", reader)],
            users=[(APP, APP_PW)], secret_fields={"dbname": APP_DB},
            endpoints=READ_WRITE_AND_READ_ONLY,
            **{"max_connections_percent": 25, "connection_borrow_timeout": 20, **FAST_CHECKS,
               **target_group})
    return start


def connect(proxy, endpoint="rw"):
    host, port = proxy.proxy.addresses[endpoint]
    return pymysql.connect(host=host, port=port, user=APP, password=APP_PW, database=APP_DB,
                           autocommit=True, connect_timeout=20, read_timeout=30)


def scalar(conn, sql, args=None):
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchone()[0]


def states(proxy) -> dict:
    return {t["RdsResourceId"]: (t["Role"], t["TargetHealth"]["State"])
            for t in proxy.call(proxy.proxy.describe_targets)["Targets"]}


def test_roles_and_the_read_only_endpoint(writer_and_reader, start_proxy):
    writer, reader = writer_and_reader
    proxy = start_proxy(writer, reader)
    wait_until(lambda: states(proxy) == {"writer": ("READ_WRITE", "AVAILABLE"),
                                         "reader": ("READ_ONLY", "AVAILABLE")},
               timeout=10, message="roles from @@read_only")
    with connect(proxy) as rw, connect(proxy, "ro") as ro:
        assert scalar(rw, "SELECT @@port") == writer.port
        assert scalar(ro, "SELECT @@port") == reader.port
        scalar(rw, "INSERT INTO hits (worker) VALUES (1) RETURNING id")
        with pytest.raises(pymysql.err.MySQLError) as info:
            scalar(ro, "INSERT INTO hits (worker) VALUES (2) RETURNING id")
        assert info.value.args[0] == 1290          # --read-only: the reader refused it


def test_writer_goes_away_clients_wait_for_the_new_one(writer_and_reader, start_proxy):
    writer, reader = writer_and_reader
    proxy = start_proxy(writer, reader)
    wait_until(lambda: states(proxy).get("writer") == ("READ_WRITE", "AVAILABLE"), timeout=10,
               message="writer AVAILABLE")
    stop = threading.Event()
    results = {"ok": 0, "on_new": 0, "errors": []}

    def client(i):
        conn = connect(proxy)
        while not stop.is_set():
            try:
                port = scalar(conn, "SELECT @@port")
                scalar(conn, "INSERT INTO hits (worker) VALUES (%s) RETURNING id", (i,))
                results["ok"] += 1
                results["on_new"] += port == reader.port
            except pymysql.err.Error as exc:
                results["errors"].append((i, repr(exc)))
                conn = connect(proxy)
            time.sleep(0.005)
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        writer.kill()
        time.sleep(0.5)
        reader.sql("SET GLOBAL read_only = OFF")   # the "promotion" the proxy must notice
        wait_until(lambda: results["on_new"] > 50, timeout=20, message="writes on the new writer")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert states(proxy)["reader"] == ("READ_WRITE", "AVAILABLE")
    assert states(proxy)["writer"][1] == "UNAVAILABLE"
    # Autocommit clients: at most a statement caught in flight may fail (its connection died
    # after the server had it); the rest only waited.
    print("mysql failover:", results["ok"], "ok,", len(results["errors"]), "errors", results["errors"][:3])
    assert len(results["errors"]) <= 8, results["errors"][:5]


def test_describe_targets_cli_checks_mysql_targets_as_mysql(writer_and_reader, tmp_path):
    """Without an admin endpoint the CLI checks each target itself, with the engine the
    config names (it used to speak PostgreSQL to MySQL targets)."""
    writer, reader = writer_and_reader
    config = tmp_path / "mysql.toml"
    config.write_text(dump_toml(proxy_config(
        tmp_path, engine="mysql", targets=[("writer", writer), ("reader", reader)],
        users=[(APP, APP_PW)], secret_fields={"dbname": APP_DB})))
    assert describe_targets_cli(config) == {"writer": ("READ_WRITE", "AVAILABLE"),
                                            "reader": ("READ_ONLY", "AVAILABLE")}
