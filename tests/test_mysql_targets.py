"""MySQL targets through the proxy: roles from @@read_only, the READ_ONLY endpoint, and a
writer that goes away while clients keep working.

Two independent MariaDB servers stand in for a writer and a replica: the "replica" runs with
read_only=ON, and "promoting" it is SET GLOBAL read_only=OFF, which is what the proxy sees
after a real failover (it only follows what @@read_only says). The data is not replicated,
so each server gets the table the clients use.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pymysql
import pytest
from conftest import RunningProxy
from utils import wait_until

from rdsproxy import config_from_dict
from rdsproxy.devservers.mariadb import MariaDBServer

APP, APP_PW, APP_DB = "app", "app-secret", "appdb"


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
def start_proxy(tmp_path):
    running = []

    def start(writer, reader, **target_group) -> RunningProxy:
        secret = tmp_path / "secret.json"
        secret.write_text(json.dumps({"username": APP, "password": APP_PW, "dbname": APP_DB}))
        tg = {"max_connections_percent": 25, "connection_borrow_timeout": 20,
              "health_check_interval": 0.2, "health_check_timeout": 1.0, "health_check_failures": 2,
              **target_group}
        config = config_from_dict({
            "name": "mysql-targets", "engine_family": "MYSQL",
            "auth": [{"secret": f"file:{secret}", "client_password_auth_type": "MYSQL_NATIVE_PASSWORD"}],
            "target_group": tg,
            "targets": [{"name": "writer", "host": writer.host, "port": writer.port},
                        {"name": "reader", "host": reader.host, "port": reader.port}],
            "endpoints": [{"name": "rw", "listen": "127.0.0.1:0"},
                          {"name": "ro", "listen": "127.0.0.1:0", "target_role": "READ_ONLY"}],
        }, source="<test>", base_dir=tmp_path)
        proxy = RunningProxy(config)
        running.append(proxy)
        return proxy

    yield start
    for proxy in running:
        proxy.stop()


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
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"username": APP, "password": APP_PW, "dbname": APP_DB}))
    config = tmp_path / "mysql.toml"
    config.write_text(f"""
name = "cli-mysql"
engine_family = "MYSQL"
[[auth]]
secret = "file:{secret}"
client_password_auth_type = "MYSQL_NATIVE_PASSWORD"
[[targets]]
name = "writer"
host = "{writer.host}"
port = {writer.port}
[[targets]]
name = "reader"
host = "{reader.host}"
port = {reader.port}
[[endpoints]]
name = "rw"
listen = "127.0.0.1:0"
""")
    out = subprocess.run([sys.executable, "-m", "rdsproxy", "describe-targets", "--config", str(config),
                          "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    roles = {t["RdsResourceId"]: (t["Role"], t["TargetHealth"]["State"])
             for t in json.loads(out.stdout)["Targets"]}
    assert roles == {"writer": ("READ_WRITE", "AVAILABLE"), "reader": ("READ_ONLY", "AVAILABLE")}
