"""Proxy configuration: TOML in RDS Proxy's own terms, checked strictly before anything starts."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib


class ConfigError(ValueError):
    """A config problem, phrased as `file: key: what is wrong`."""

    def __init__(self, source: str, key: str, problem: str):
        self.source, self.key, self.problem = source, key, problem
        super().__init__(f"{source}: {key}: {problem}")


ENGINE_FAMILIES = ("POSTGRESQL", "MYSQL")
CLIENT_AUTH_TYPES = {
    "POSTGRESQL": ("POSTGRES_SCRAM_SHA_256", "POSTGRES_MD5"),
    "MYSQL": ("MYSQL_NATIVE_PASSWORD", "MYSQL_CACHING_SHA2_PASSWORD"),
}
PINNING_FILTERS = ("EXCLUDE_VARIABLE_SETS",)
TARGET_ROLES = ("READ_WRITE", "READ_ONLY")


@dataclass
class AuthConfig:
    secret: str
    auth_scheme: str = "SECRETS"
    iam_auth: str = "DISABLED"
    client_password_auth_type: str = "POSTGRES_SCRAM_SHA_256"
    description: str = ""


@dataclass
class TargetGroupConfig:
    max_connections_percent: int = 100
    max_idle_connections_percent: int = -1   # default: half of max_connections_percent, as RDS
    connection_borrow_timeout: float = 120.0
    session_pinning_filters: list[str] = field(default_factory=list)
    init_query: str = ""
    # Extensions beyond RDS Proxy's knobs.
    idle_connection_grace: float = 60.0      # seconds an excess idle connection lingers
    max_connection_lifetime: float = 86400.0  # RDS Proxy recycles after about 24 h
    connect_timeout: float = 10.0


@dataclass
class TargetConfig:
    host: str
    port: int = 5432


@dataclass
class EndpointConfig:
    name: str
    listen: str
    target_role: str = "READ_WRITE"

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


@dataclass
class ProxyConfig:
    name: str = "rdsproxy"
    engine_family: str = "POSTGRESQL"
    require_tls: bool = False
    idle_client_timeout: float = 1800.0
    debug_logging: bool = False
    auth: list[AuthConfig] = field(default_factory=list)
    target_group: TargetGroupConfig = field(default_factory=TargetGroupConfig)
    targets: list[TargetConfig] = field(default_factory=list)
    endpoints: list[EndpointConfig] = field(default_factory=list)
    # Extensions.
    shutdown_timeout: float = 30.0
    max_client_connections: int = 100000
    max_message_size: int = 1 << 30
    source: str = "<dict>"
    base_dir: str = "."

    def resolve_path(self, path: str) -> str:
        """Paths in the config are relative to the config file."""
        return path if os.path.isabs(path) else os.path.join(self.base_dir, path)


# --- validation -----------------------------------------------------------------------

_SECTIONS = {
    "auth": AuthConfig,
    "target_group": TargetGroupConfig,
    "targets": TargetConfig,
    "endpoints": EndpointConfig,
}


def _check_fields(cls, data: dict, source: str, prefix: str) -> dict:
    if not isinstance(data, dict):
        raise ConfigError(source, prefix, f"must be a table, not {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        if key not in known or key in ("source", "base_dir"):
            raise ConfigError(source, f"{prefix}{key}", "unknown key")
        values[key] = _coerce(known[key], value, source, f"{prefix}{key}")
    missing = [f.name for f in known.values()
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in values]
    if missing:
        raise ConfigError(source, f"{prefix}{missing[0]}", "is required")
    return values


def _coerce(f: dataclasses.Field, value: Any, source: str, key: str) -> Any:
    expected = f.type
    if expected in ("str",):
        ok = isinstance(value, str)
    elif expected in ("bool",):
        ok = isinstance(value, bool)
    elif expected in ("int",):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected in ("float",):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif expected.startswith("list[str]"):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        return value
    if not ok:
        raise ConfigError(source, key, f"must be {expected.replace('list[str]', 'a list of strings')}, "
                                       f"not {type(value).__name__} {value!r}")
    return value


def _one_of(value: str, allowed, source: str, key: str):
    if value not in allowed:
        raise ConfigError(source, key, f"must be one of {', '.join(allowed)}, not {value!r}")


def _range(value, low, high, source: str, key: str):
    if not (low <= value <= high):
        raise ConfigError(source, key, f"must be between {low} and {high}, not {value!r}")


def config_from_dict(data: dict, *, source: str = "<dict>", base_dir: str | os.PathLike = ".") -> ProxyConfig:
    """Build and validate a ProxyConfig from a parsed TOML document (or an equal dict)."""
    top = {}
    top_fields = {f.name for f in dataclasses.fields(ProxyConfig)}
    for key, value in data.items():
        if key in _SECTIONS:
            continue
        if key not in top_fields or key in ("source", "base_dir"):
            raise ConfigError(source, key, "unknown key")
    for f in dataclasses.fields(ProxyConfig):
        if f.name in data and f.name not in _SECTIONS:
            top[f.name] = _coerce(f, data[f.name], source, f.name)
    cfg = ProxyConfig(**top, source=source, base_dir=str(base_dir))
    _one_of(cfg.engine_family, ENGINE_FAMILIES, source, "engine_family")
    if cfg.require_tls:
        raise ConfigError(source, "require_tls", "TLS is not supported by this version yet, so it "
                                                 "cannot be required; set it to false")
    if cfg.idle_client_timeout < 0:
        raise ConfigError(source, "idle_client_timeout", "must be 0 (never) or a positive number of seconds")

    auth_list = data.get("auth", [])
    if not isinstance(auth_list, list) or not auth_list:
        raise ConfigError(source, "auth", "at least one [[auth]] entry is required")
    for i, entry in enumerate(auth_list):
        prefix = f"auth[{i}]."
        if isinstance(entry, dict) and "client_password_auth_type" not in entry:
            entry = dict(entry, client_password_auth_type=CLIENT_AUTH_TYPES[cfg.engine_family][0])
        a = AuthConfig(**_check_fields(AuthConfig, entry, source, prefix))
        _one_of(a.auth_scheme, ("SECRETS",), source, prefix + "auth_scheme")
        _one_of(a.iam_auth, ("DISABLED", "REQUIRED", "OPTIONAL"), source, prefix + "iam_auth")
        if a.iam_auth != "DISABLED":
            raise ConfigError(source, prefix + "iam_auth", "IAM token authentication is not "
                                                           "supported by this version yet; use DISABLED")
        _one_of(a.client_password_auth_type, CLIENT_AUTH_TYPES[cfg.engine_family], source,
                prefix + "client_password_auth_type")
        if not (a.secret.startswith("file:") or a.secret.startswith("env:")):
            raise ConfigError(source, prefix + "secret", f"must start with 'file:' or 'env:', not {a.secret!r}")
        cfg.auth.append(a)

    tg = TargetGroupConfig(**_check_fields(TargetGroupConfig, data.get("target_group", {}), source, "target_group."))
    if tg.max_idle_connections_percent == -1:
        tg.max_idle_connections_percent = tg.max_connections_percent // 2
    _range(tg.max_connections_percent, 1, 100, source, "target_group.max_connections_percent")
    _range(tg.max_idle_connections_percent, 0, tg.max_connections_percent, source,
           "target_group.max_idle_connections_percent")
    _range(tg.connection_borrow_timeout, 0, 300, source, "target_group.connection_borrow_timeout")
    for flt in tg.session_pinning_filters:
        _one_of(flt, PINNING_FILTERS, source, "target_group.session_pinning_filters")
    cfg.target_group = tg

    targets = data.get("targets", [])
    if not isinstance(targets, list) or not targets:
        raise ConfigError(source, "targets", "at least one [[targets]] entry is required")
    for i, entry in enumerate(targets):
        t = TargetConfig(**_check_fields(TargetConfig, entry, source, f"targets[{i}]."))
        _range(t.port, 1, 65535, source, f"targets[{i}].port")
        cfg.targets.append(t)

    endpoints = data.get("endpoints", [{"name": "default", "listen": "127.0.0.1:6432"}])
    if not isinstance(endpoints, list) or not endpoints:
        raise ConfigError(source, "endpoints", "at least one [[endpoints]] entry is required")
    names = set()
    for i, entry in enumerate(endpoints):
        prefix = f"endpoints[{i}]."
        e = EndpointConfig(**_check_fields(EndpointConfig, entry, source, prefix))
        _one_of(e.target_role, TARGET_ROLES, source, prefix + "target_role")
        if e.target_role != "READ_WRITE":
            raise ConfigError(source, prefix + "target_role", "READ_ONLY endpoints are not supported yet")
        try:
            _range(e.port, 0, 65535, source, prefix + "listen")
        except (ValueError, IndexError):
            raise ConfigError(source, prefix + "listen", f"must be HOST:PORT, not {e.listen!r}") from None
        if e.name in names:
            raise ConfigError(source, prefix + "name", f"duplicate endpoint name {e.name!r}")
        names.add(e.name)
        cfg.endpoints.append(e)
    return cfg


def load_config(path: str | os.PathLike) -> ProxyConfig:
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(str(path), "-", "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "-", f"not valid TOML: {exc}") from None
    return config_from_dict(data, source=str(path), base_dir=path.resolve().parent)
