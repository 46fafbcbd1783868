"""The Proxy object: owns the engine, its pool and the endpoints' listeners; start, drain, stop."""
from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from . import _fastpath
from ._fastpath import reactor_py
from .config import ProxyConfig, config_from_dict, load_config
from .core import cloudwatch
from .core.console import Console
from .core.metrics import Metrics

log = logging.getLogger("rdsproxy")


def _as_config(config) -> ProxyConfig:
    if isinstance(config, ProxyConfig):
        return config
    if isinstance(config, dict):
        return config_from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return load_config(Path(config))
    raise TypeError(f"config must be a ProxyConfig, a dict or a path, not {type(config).__name__}")


def engine_class(config: ProxyConfig):
    """The engine that speaks `config.engine_family`'s protocol (imported on demand)."""
    if config.engine_family == "MYSQL":
        from .engines.mysql.engine import MysqlEngine
        return MysqlEngine
    from .engines.postgres.engine import PostgresEngine
    return PostgresEngine


class ListenError(OSError):
    """A listener could not bind its address: one line naming it, for the operator."""

    def __init__(self, what: str, address: str, cause: OSError):
        super().__init__(cause.errno, f"{what} cannot listen on {address}: "
                                      f"{cause.strerror or cause}")

    def __str__(self) -> str:
        return self.strerror


class Proxy:
    """`async with Proxy(config) as proxy:` serves until the block ends.

    `proxy.addresses` maps endpoint names to the (host, port) they listen on (a port of 0
    in the config means any free port); `proxy.address` is the first endpoint's.
    """

    def __init__(self, config):
        self.config = _as_config(config)
        self.metrics = Metrics()
        self.addresses: dict[str, tuple[str, int]] = {}
        self.admin_address: tuple[str, int] | None = None
        self._admin = None
        self.engine = None
        self._servers: list[asyncio.AbstractServer] = []
        self._stopped: asyncio.Event | None = None

    @property
    def address(self) -> tuple[str, int]:
        return next(iter(self.addresses.values()))

    async def start(self) -> "Proxy":
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self.engine = engine_class(self.config)(self.config, self.metrics, loop)
        if self.config.admin_users:
            self.engine.console = Console(self.engine, self.reload)
        try:
            await self.engine.start()
            engine = self.engine
            missing = [user for user in self.config.admin_users if user not in engine.accounts]
            if missing:
                log.warning("admin_users %s have no [[auth]] secret: they cannot log in to the "
                            "admin console", ", ".join(missing))
            for endpoint in self.config.endpoints:
                try:
                    sockets = reactor_py.listening_sockets(
                        endpoint.host, endpoint.port, client_speaks_first=engine.client_speaks_first)
                except OSError as exc:
                    raise ListenError(f"endpoint {endpoint.name}", endpoint.listen, exc) from None
                server = await engine.client_reactor.serve(
                    loop, engine.client_factory(endpoint), sockets,
                    client_speaks_first=engine.client_speaks_first)
                self._servers.append(server)
                sock = server.sockets[0]
                self.addresses[endpoint.name] = sock.getsockname()[:2]
                log.info("endpoint %s listening on %s:%d (%s)", endpoint.name,
                         *self.addresses[endpoint.name], endpoint.target_role.value)
            if self.config.admin is not None and self.config.admin.listen:
                from .admin import AdminServer
                self._admin = AdminServer(
                    {"/targets": self.describe_targets, "/stats": self.stats}, ready=self.ready,
                    texts={"/metrics": (cloudwatch.PROMETHEUS_TEXT, self.prometheus_metrics)})
                host, port = self.config.admin.listen.rsplit(":", 1)
                try:
                    self.admin_address = await self._admin.start(host.strip("[]"), int(port))
                except OSError as exc:
                    raise ListenError("the admin endpoint", self.config.admin.listen, exc) from None
                log.info("admin endpoint on http://%s:%d/ "
                         "(/targets, /stats, /metrics, /health, /ready)",
                         *self.admin_address)
        except BaseException:
            await self.stop(drain=False)
            raise
        log.info("proxy %s started (fast path: %s; client sockets: %s)", self.config.name,
                 _fastpath.IMPLEMENTATION, getattr(self.engine.client_reactor, "IMPLEMENTATION",
                                                   "event loop transports"))
        return self

    async def stop(self, drain: bool = True) -> None:
        """Stop accepting, let running transactions finish (bounded), then close everything."""
        for server in self._servers:
            server.close()
        if self._admin is not None:
            await self._admin.close()
            self._admin = None
        if self.engine is not None:
            if drain:
                await self.engine.drain(self.config.shutdown_timeout)
            await self.engine.close()
        for server in self._servers:
            try:
                await asyncio.wait_for(server.wait_closed(), 1.0)
            except asyncio.TimeoutError:
                pass
        self._servers = []
        if self._stopped is not None:
            self._stopped.set()

    async def reload(self, config=None) -> None:
        """What SIGHUP does: re-read secrets (and rebuild accounts), reload TLS certificates,
        apply the config file's [[targets]] list (added ones register, removed ones
        deregister) and the settings that can change while running (engine.apply_settings).
        `config` (a ProxyConfig, dict or path) replaces re-reading the file."""
        if self.engine is None:
            return
        await self.engine.reload()
        fresh = None
        try:
            if config is not None:
                fresh = _as_config(config)
            elif self.config.source not in ("<dict>", "<test>") and os.path.isfile(self.config.source):
                fresh = load_config(self.config.source)
        except Exception as exc:  # noqa: BLE001 - a bad edit must not stop the proxy
            log.error("config not reloaded (keeping the running one): %s", exc)
        if fresh is not None:
            await self.engine.failover.apply_targets(fresh.targets)
            self.config.targets = fresh.targets
            self.engine.apply_settings(fresh)

    def describe_targets(self) -> dict:
        """Like `aws rds describe-db-proxy-targets`, plus each target's pool figures."""
        return {"Targets": self.engine.failover.describe_targets() if self.engine is not None else []}

    def ready(self) -> tuple[bool, dict]:
        """Whether every endpoint has a target it can route to now (its writer, or for a
        READ_ONLY endpoint a reader), and which one, by endpoint."""
        routes = {}
        for endpoint in self.config.endpoints:
            target = (self.engine.router.target_for(endpoint.target_role)
                      if self.engine is not None else None)
            routes[endpoint.name] = target.name if target is not None else None
        return all(routes.values()), {"Ready": all(routes.values()), "Endpoints": routes}

    async def serve_forever(self) -> None:
        await self._stopped.wait()

    def cloudwatch_figures(self) -> list[cloudwatch.Figure]:
        """RDS Proxy's CloudWatch metrics, as /metrics and /stats show them."""
        return cloudwatch.figures(self.metrics, self.engine)

    def prometheus_metrics(self) -> str:
        """/metrics: the CloudWatch figures in Prometheus's text format."""
        return cloudwatch.prometheus_text(
            self.cloudwatch_figures(),
            {"proxy": self.config.name, "engine": self.config.engine_family.lower()})

    def stats(self) -> dict:
        out = self.metrics.snapshot()
        if self.engine is not None:
            out.update(self.engine.stats())
        out.update(cloudwatch.as_json(self.cloudwatch_figures()))
        out["fastpath"] = _fastpath.IMPLEMENTATION
        return out

    async def __aenter__(self) -> "Proxy":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()
