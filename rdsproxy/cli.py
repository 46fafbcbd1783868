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
from .config import ConfigError, ConfigErrors, config_from_dict, load_config
from .logs import FORMATS, LEVELS, setup_logging
from .proxy import ListenError, Proxy, engine_class
from .secrets import SecretError

log = logging.getLogger("rdsproxy")


def _run(coro):
    """Run `coro` to completion on uvloop (asyncio's loop without it); its result."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


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
        # Secrets (maybe from AWS) are re-read in worker threads, certificates reloaded.
        log.info("SIGHUP: reloading secrets, TLS certificates and the [[targets]] list")
        loop.create_task(proxy.reload())

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_term)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    for name, (host, port) in proxy.addresses.items():
        log.info("rdsproxy %s (%s fast path): endpoint %s on %s:%s", __version__,
                 _fastpath.IMPLEMENTATION, name, host, port,
                 extra={"event": "listening", "endpoint": name, "listen": f"{host}:{port}"})
    await proxy.serve_forever()


@click.group()
@click.version_option(__version__, message=f"rdsproxy %(version)s (fast path: {_fastpath.IMPLEMENTATION})")
def main():
    """A connection-pooling proxy for PostgreSQL and MySQL/MariaDB, in the spirit of AWS RDS Proxy."""


def _self_signed(directory: str, config_path: str) -> dict:
    """Write a self-signed certificate into `directory`; return the [tls] section using it."""
    from .config import tomllib   # tomli on Python 3.10
    from .tls import generate_self_signed

    with open(config_path, "rb") as fh:
        try:
            data = tomllib.load(fh)
        except tomllib.TOMLDecodeError:
            data = {}   # load_config reports it properly
    if "tls" in data:
        raise click.ClickException(f"{config_path}: tls: the config has a [tls] section; "
                                   f"--generate-self-signed would replace it, use one or the other")
    hostnames = ["localhost", "127.0.0.1"]
    for entry in data.get("endpoints", []) if isinstance(data.get("endpoints"), list) else []:
        host = str(entry.get("listen", "")).rsplit(":", 1)[0].strip("[]")
        if host and host not in ("0.0.0.0", "::") and host not in hostnames:
            hostnames.insert(0, host)
    iam = data.get("iam")
    if isinstance(iam, dict):
        hostnames += [h for h in iam.get("host_names", []) if isinstance(h, str) and h not in hostnames]
    os.makedirs(directory, exist_ok=True)
    cert = os.path.abspath(os.path.join(directory, "rdsproxy-self-signed.pem"))
    key = os.path.abspath(os.path.join(directory, "rdsproxy-self-signed.key"))
    generate_self_signed(cert, key, hostnames=hostnames)
    banner = "!" * 78
    click.echo(f"{banner}\nWARNING: client TLS uses a SELF-SIGNED certificate generated just now:\n"
               f"    {cert}\n    {key} (names: {', '.join(hostnames)})\n"
               f"Clients can encrypt (sslmode=require) but cannot verify the proxy unless they\n"
               f"trust this file (sslmode=verify-full sslrootcert={cert}).\n"
               f"Use a real certificate in [tls] for anything but testing.\n{banner}", err=True)
    return {"cert_file": cert, "key_file": key}


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="proxy.toml; without it, a throwaway local PostgreSQL is started and proxied")
@click.option("--listen", default="127.0.0.1:6432", show_default=True,
              help="where the quick start listens (only without --config)")
@click.option("--generate-self-signed", "self_signed_dir", type=click.Path(file_okay=False),
              help="write a self-signed certificate into this directory and serve client TLS "
                   "with it (instead of a [tls] section; for testing)")
@click.option("--log-level", type=click.Choice(LEVELS), default=None,
              help="the least severe log lines written  [default: debug with debug_logging, "
                   "else info]")
@click.option("--log-format", type=click.Choice(FORMATS), default="text", show_default=True,
              help="log lines on stderr as text, or as one JSON object each")
def serve(config_path, listen, self_signed_dir, log_level, log_format):
    """Run the proxy."""
    if self_signed_dir and not config_path:
        raise click.ClickException("--generate-self-signed needs --config")
    if config_path:
        try:
            overrides = {"tls": _self_signed(self_signed_dir, config_path)} if self_signed_dir else None
            config = load_config(config_path, overrides)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            raise click.ClickException(f"cannot read or write: {exc}") from None
        setup_logging(log_level or ("debug" if config.debug_logging else "info"), log_format)
        try:
            _run(_serve(config))
        except (SecretError, ListenError) as exc:
            raise click.ClickException(str(exc)) from None
        return
    setup_logging(log_level or "info", log_format)
    _quickstart(listen)


@main.command("describe-targets")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True), required=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON (as the admin endpoint serves it)")
def describe_targets(config_path, as_json):
    """Show each target's role, health and pool figures; exit status 1 when a target is not
    AVAILABLE.

    Asks the running proxy's admin endpoint ([admin] listen). Without one, checks each target
    once from here (role and health only: pool figures live in the running proxy)."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if config.admin is not None and config.admin.listen:
        import urllib.request
        host, port = config.admin.listen.rsplit(":", 1)
        host = host.strip("[]")
        host = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
        url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/targets"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                data = orjson.loads(response.read())
        except OSError as exc:
            raise click.ClickException(f"cannot reach the admin endpoint {url}: {exc} "
                                       f"(is the proxy running?)") from None
    else:
        data = {"Targets": _run(_probe_targets(config))}
    if as_json:
        click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    else:
        _print_targets(data["Targets"])
    if any(t["TargetHealth"]["State"] != "AVAILABLE" for t in data["Targets"]):
        sys.exit(1)


def _print_targets(targets) -> None:
    rows = [("TARGET", "ENDPOINT", "ROLE", "STATE", "REASON", "IN USE", "IDLE", "WAITING", "PINNED")]
    for t in targets:
        pool = t.get("Pool") or {}
        health = t["TargetHealth"]
        rows.append((t["RdsResourceId"], f"{t['Endpoint']}:{t['Port']}", t["Role"], health["State"],
                     health.get("Reason") or "-", *(str(pool.get(k, "-")) for k in
                                                    ("InUse", "Idle", "Waiting", "Pinned"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    for t in targets:
        if t["TargetHealth"].get("Description"):
            click.echo(f"{t['RdsResourceId']}: {t['TargetHealth']['Description']}")


async def _probe_targets(config) -> list[dict]:
    """One health check of every target, from this process (no proxy running)."""
    from .core.metrics import Metrics

    engine = engine_class(config)(config, Metrics(), asyncio.get_running_loop())
    engine.load_tls()
    await engine.accounts.load()
    if engine.group.loop is None:
        engine.group.loop = asyncio.get_running_loop()
    await engine.group.check_all()
    return engine.group.describe()


def _quickstart(listen: str) -> None:
    """Start a throwaway PostgreSQL, put the proxy in front of it, and say how to connect."""
    from .devservers.postgres import PostgresCluster

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
@click.argument("config_argument", required=False, type=click.Path(dir_okay=False),
                metavar="[CONFIG]")
@click.option("--config", "config_option", type=click.Path(dir_okay=False),
              help="proxy.toml (or give it as the argument)")
def validate_config(config_argument, config_option):
    """Check a config file (and that its secrets can be read) without starting anything;
    every problem is listed, one `file: key: problem` line each."""
    config_path = config_option or config_argument
    if not config_path:
        raise click.UsageError("give the config file: validate-config --config proxy.toml")
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    from .secrets import read_principal_secret, read_secret
    readers = [(f"auth[{i}].secret", entry.secret, read_secret)
               for i, entry in enumerate(config.auth)]
    readers += [(f"iam.principals[{i}].secret_access_key", entry.secret_access_key,
                 read_principal_secret)
                for i, entry in enumerate(config.iam.principals if config.iam is not None else ())]
    problems = []
    for key, reference, read in readers:
        try:
            read(reference, config.base_dir)
        except SecretError as exc:
            problems.append(ConfigError(config.source, key, str(exc)))
    if problems:
        raise click.ClickException(str(ConfigErrors(problems) if len(problems) > 1 else problems[0]))
    click.echo(f"{config_path}: OK ({config.engine_family}, {len(config.auth)} auth entries, "
               f"{len(config.targets)} targets, {len(config.endpoints)} endpoints)")


@main.command("generate-auth-token")
@click.option("--hostname", required=True, help="the proxy endpoint's host name or address, as clients use it")
@click.option("--port", required=True, type=int, help="the proxy endpoint's port")
@click.option("--username", required=True, help="the database user")
@click.option("--region", required=True, help="AWS region named in the token")
@click.option("--access-key-id", envvar="AWS_ACCESS_KEY_ID", help="default: $AWS_ACCESS_KEY_ID")
@click.option("--secret-access-key", envvar="AWS_SECRET_ACCESS_KEY", help="default: $AWS_SECRET_ACCESS_KEY")
@click.option("--session-token", envvar="AWS_SESSION_TOKEN", default=None, help="default: $AWS_SESSION_TOKEN")
@click.option("--expires", type=int, default=900, show_default=True, help="lifetime in seconds (at most 900)")
def generate_auth_token(hostname, port, username, region, access_key_id, secret_access_key,
                        session_token, expires):
    """Print an IAM auth token (as `aws rds generate-db-auth-token`) to use as the password."""
    from .auth.iam import MAX_EXPIRES, generate_token

    if not access_key_id or not secret_access_key:
        raise click.ClickException("credentials needed: --access-key-id/--secret-access-key or "
                                   "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    if not 0 < expires <= MAX_EXPIRES:
        raise click.ClickException(f"--expires must be between 1 and {MAX_EXPIRES}")
    click.echo(generate_token(host=hostname, port=port, user=username, region=region,
                              access_key_id=access_key_id, secret_access_key=secret_access_key,
                              session_token=session_token or None, expires=expires))


if __name__ == "__main__":
    main()
