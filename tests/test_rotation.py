"""Issue 4: Secrets Manager secrets (local moto server) rotated under load through the proxy."""
from __future__ import annotations

import json
import logging
import threading
import time

import psycopg
import pytest

from utils import wait_until

USER, DB = "rot", "rotdb"
OLD, NEW = "old-password-1", "new-password-2"


def secret_doc(password):
    return json.dumps({"username": USER, "password": password, "engine": "postgres"})


def rotated_setup(pg_factory, secretsmanager, name):
    cluster = pg_factory(max_connections=100)
    cluster.create_user(USER, OLD)
    cluster.create_database(DB, owner=USER)
    secretsmanager.create_secret(Name=name, SecretString=secret_doc(OLD))
    return cluster


def dsn(proxy, password):
    return (f"host=127.0.0.1 port={proxy.port} user={USER} dbname={DB} password={password} "
            f"sslmode=disable connect_timeout=10")


def backends(cluster):
    out = cluster.psql(f"select count(*) from pg_stat_activity where usename = '{USER}' "
                         "and application_name <> 'rdsproxy-health'")  # checks: outside the budget
    return int(out.strip())


def test_rotation_under_load(pg_factory, secretsmanager, proxy_factory):
    cluster = rotated_setup(pg_factory, secretsmanager, "rdsproxy/rot")
    proxy = proxy_factory(cluster, users=[(USER, OLD)],
                                 secrets={USER: "aws-secretsmanager:rdsproxy/rot"},
                                 top={"secrets_refresh_interval": 1})
    errors, queries = [], [0] * 50
    stop = threading.Event()
    ready = threading.Barrier(51)

    def client(i):
        try:
            # prepare_threshold=None: psycopg's automatic named prepared statements would pin
            # each session to a connection (RDS Proxy's rule) and starve 30 of the 50 clients.
            conn = psycopg.connect(dsn(proxy, OLD), autocommit=True, prepare_threshold=None)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
            ready.wait()
            return
        ready.wait()
        with conn:
            while not stop.is_set():
                try:
                    assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
                    queries[i] += 1
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)
                    return
    threads = [threading.Thread(target=client, args=(i,)) for i in range(50)]
    for th in threads:
        th.start()
    ready.wait(30)
    time.sleep(1.0)
    # Rotate as Secrets Manager's rotation lambda would: the secret, then the database.
    secretsmanager.put_secret_value(SecretId="rdsproxy/rot", SecretString=secret_doc(NEW))
    cluster.psql(f"ALTER ROLE {USER} PASSWORD '{NEW}'")
    rotated_at = time.time()

    def new_password_works():
        try:
            with psycopg.connect(dsn(proxy, NEW)) as conn:
                return conn.execute("select 1").fetchone() == (1,)
        except psycopg.OperationalError:
            return False
    wait_until(new_password_works, timeout=10)
    time.sleep(max(0.0, 5.0 - (time.time() - rotated_at)))
    stop.set()
    for th in threads:
        th.join(30)
    assert errors == [], errors[:3]
    assert all(q > 0 for q in queries)
    # The old password is no longer accepted by the proxy.
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn(proxy, OLD))
    # New database connections log in with the new password: close the pooled ones.
    cluster.psql(f"select pg_terminate_backend(pid) from pg_stat_activity where usename = '{USER}'")
    wait_until(lambda: backends(cluster) == 0, timeout=10)
    with psycopg.connect(dsn(proxy, NEW)) as conn:
        assert conn.execute("select current_user").fetchone() == (USER,)
    assert backends(cluster) >= 1


def test_failed_database_login_rereads_the_secret(pg_factory, secretsmanager, proxy_factory, caplog):
    """No periodic refresh: a database login refused after a rotation makes the proxy re-read
    the secret and retry once, so an open session keeps working."""
    caplog.set_level(logging.INFO, logger="rdsproxy")
    cluster = rotated_setup(pg_factory, secretsmanager, "rdsproxy/rot2")
    proxy = proxy_factory(cluster, users=[(USER, OLD)],
                                 secrets={USER: "aws-secretsmanager:rdsproxy/rot2"},
                                 top={"secrets_refresh_interval": 0})
    with psycopg.connect(dsn(proxy, OLD), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        secretsmanager.put_secret_value(SecretId="rdsproxy/rot2", SecretString=secret_doc(NEW))
        cluster.psql(f"ALTER ROLE {USER} PASSWORD '{NEW}'")
        cluster.psql(f"select pg_terminate_backend(pid) from pg_stat_activity where usename = '{USER}'")
        wait_until(lambda: backends(cluster) == 0, timeout=10)
        # The pool learns of the dead connection on use; the statement after that succeeds on
        # a new connection made with the re-read password.
        for _ in range(3):
            try:
                conn.execute("select 2")
                break
            except psycopg.OperationalError as exc:
                assert "lost" in str(exc)
        assert conn.execute("select 3").fetchone() == (3,)
    assert "retrying with the refreshed secret" in caplog.text
    with psycopg.connect(dsn(proxy, NEW)) as conn:
        conn.execute("select 1")


def test_health_checks_follow_a_rotated_password(pg_factory, secretsmanager, proxy_factory):
    """Health checks log in with the first account's secret: after a rotation a refused check
    re-reads the secret instead of declaring the target UNAVAILABLE for everyone."""
    cluster = rotated_setup(pg_factory, secretsmanager, "rdsproxy/rot3")
    proxy = proxy_factory(cluster, users=[(USER, OLD)],
                                 secrets={USER: "aws-secretsmanager:rdsproxy/rot3"},
                                 top={"secrets_refresh_interval": 0},
                                 health_check_interval=0.2, health_check_failures=2)
    target = lambda: proxy.stats()["targets"][0]["TargetHealth"]  # noqa: E731
    wait_until(lambda: target()["State"] == "AVAILABLE", timeout=10, message="AVAILABLE")
    secretsmanager.put_secret_value(SecretId="rdsproxy/rot3", SecretString=secret_doc(NEW))
    cluster.psql(f"ALTER ROLE {USER} PASSWORD '{NEW}'")
    changes = proxy.stats()["TargetStateChanges"]
    time.sleep(1.5)                       # several checks with the old password's salt gone
    assert target()["State"] == "AVAILABLE", target()
    assert proxy.stats()["TargetStateChanges"] == changes
    with psycopg.connect(dsn(proxy, NEW)) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
