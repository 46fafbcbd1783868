"""The `rdsproxy` command line: serve, validate-config, and a throwaway-database quick start."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import tempfile

import click
import orjson

from . import __version__, _fastpath
from .config import ConfigError, config_from_dict, load_config
from .proxy import Proxy
from .secrets import SecretError

log = logging.getLogger("rdsproxy")


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _run(coro) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


async def _serve(config) -> None:
    proxy = Proxy(config)
    await proxy.start()
    loop = asyncio.get_running_loop()
    stopping = []

    def on_term():
        if not stopping:
            log.info("shutting down: no new clients; waiting up to %gs for transactions to finish",
                     proxy.config.shutdown_timeout)
            stopping.append(loop.create_task(proxy.stop()))

    def on_hup():
        try:
            proxy.engine.load_accounts()
            log.info("secrets reloaded")
        except SecretError as exc:
            log.error("secrets not reloaded: %s", exc)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_term)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    for name, (host, port) in proxy.addresses.items():
        click.echo(f"rdsproxy {__version__} ({_fastpath.IMPLEMENTATION} fast path): endpoint "
                   f"{name} on {host}:{port}", err=True)
    await proxy.serve_forever()


@click.group()
@click.version_option(__version__, message=f"rdsproxy %(version)s (fast path: {_fastpath.IMPLEMENTATION})")
def main():
    """A connection-pooling proxy for PostgreSQL, in the spirit of AWS RDS Proxy."""


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="proxy.toml; without it, a throwaway local PostgreSQL is started and proxied")
@click.option("--listen", default="127.0.0.1:6432", show_default=True,
              help="where the quick start listens (only without --config)")
def serve(config_path, listen):
    """Run the proxy."""
    if config_path:
        try:
            config = load_config(config_path)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        _setup_logging(config.debug_logging)
        try:
            _run(_serve(config))
        except SecretError as exc:
            raise click.ClickException(str(exc)) from None
        return
    _setup_logging(False)
    _quickstart(listen)


def _quickstart(listen: str) -> None:
    """Start a throwaway PostgreSQL, put the proxy in front of it, and say how to connect."""
    from .devcluster import PostgresCluster

    password = "rdsproxy-demo"
    with tempfile.TemporaryDirectory(prefix="rdsproxy-demo-") as tmp:
        cluster = PostgresCluster(auth="scram-sha-256", max_connections=100)
        cluster.start()
        try:
            cluster.create_user("app", password)
            cluster.create_database("app", owner="app")
            secret = os.path.join(tmp, "app.json")
            with open(secret, "wb") as fh:
                fh.write(orjson.dumps({"username": "app", "password": password, "engine": "postgres",
                                       "host": cluster.host, "port": cluster.port, "dbname": "app"}))
            config = config_from_dict({
                "name": "quickstart",
                "engine_family": "POSTGRESQL",
                "auth": [{"secret": f"file:{secret}"}],
                "target_group": {"max_connections_percent": 40, "max_idle_connections_percent": 20},
                "targets": [{"host": cluster.host, "port": cluster.port}],
                "endpoints": [{"name": "default", "listen": listen}],
            }, source="<quickstart>")
            host, port = listen.rsplit(":", 1)
            click.echo(
                f"\nThrowaway PostgreSQL on {cluster.host}:{cluster.port} (max_connections=100); "
                f"the proxy lends at most 40 connections of it.\n"
                f"Connect through the proxy:\n"
                f"    PGPASSWORD={password} psql -h {host} -p {port} -U app app\n"
                f"    PGPASSWORD={password} pgbench -h {host} -p {port} -U app -i app   # then -S -c 200\n"
                f"Ctrl-C stops the proxy and removes the database.\n", err=True)
            _run(_serve(config))
        finally:
            cluster.stop()


@main.command("validate-config")
@click.argument("config_path", type=click.Path(dir_okay=False))
def validate_config(config_path):
    """Check a config file (and that its secrets can be read) without starting anything."""
    try:
        config = load_config(config_path)
        from .secrets import read_secret
        for entry in config.auth:
            read_secret(entry.secret, config.base_dir)
    except (ConfigError, SecretError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{config_path}: OK ({config.engine_family}, {len(config.auth)} auth entries, "
               f"{len(config.targets)} targets, {len(config.endpoints)} endpoints)")


if __name__ == "__main__":
    main()
