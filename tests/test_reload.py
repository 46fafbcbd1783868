"""SIGHUP with an edited config: the settings that can change while running take effect,
the log names those that need a restart, and a new init_query reaches every connection."""
from __future__ import annotations

import logging
import time

import psycopg
import pytest

from harness import proxy_config
from utils import wait_until


def _reload(proxy, pg, tmp_path, **options):
    proxy.call(proxy.proxy.reload, proxy_config(tmp_path, pg, **options))


def _budget(proxy) -> int:
    return proxy.stats()["pool"]["max"]


def test_pool_percentages_and_timeouts_apply_and_the_rest_is_named(proxy_factory, pg, tmp_path,
                                                                   caplog):
    caplog.set_level(logging.INFO, logger="rdsproxy")
    proxy = proxy_factory(max_connections_percent=20, top={"idle_client_timeout": 600})
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("select 1")
    wait_until(lambda: _budget(proxy) == 12, message="budget of 20% of 60")
    _reload(proxy, pg, tmp_path, max_connections_percent=10,
            top={"idle_client_timeout": 1, "max_client_connections": 5})
    assert _budget(proxy) == 6
    assert "target_group.max_connections_percent 20 -> 10" in caplog.text
    assert "max_client_connections changed in the file but take effect only after a restart" \
        in caplog.text
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        time.sleep(3)    # the new idle_client_timeout (1 s) closes this client meanwhile
        with pytest.raises(psycopg.OperationalError, match="idle_client_timeout"):
            conn.execute("select 1")


def test_a_new_init_query_reaches_every_connection(proxy_factory, pg, tmp_path):
    proxy = proxy_factory(init_query="SET statement_timeout = '11s'")
    show = "SHOW statement_timeout"
    with psycopg.connect(proxy.dsn(), autocommit=True) as idle:
        assert idle.execute(show).fetchone()[0] == "11s"     # its connection goes back idle
    in_transaction = psycopg.connect(proxy.dsn())
    try:
        assert in_transaction.execute(show).fetchone()[0] == "11s"   # holds a connection
        _reload(proxy, pg, tmp_path, init_query="SET statement_timeout = '22s'")
        with psycopg.connect(proxy.dsn(), autocommit=True) as fresh:
            assert fresh.execute(show).fetchone()[0] == "22s"
        in_transaction.commit()          # its connection comes back and is retired
        assert in_transaction.execute(show).fetchone()[0] == "22s"
        in_transaction.commit()
    finally:
        in_transaction.close()
