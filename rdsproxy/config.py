"""Proxy configuration: TOML in RDS Proxy's own terms, checked strictly before anything starts."""
from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .core.targets import Role

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib


class ConfigError(ValueError):
    """A config problem, phrased as `file: key: what is wrong`."""

    def __init__(self, source: str, key: str, problem: str):
        self.source, self.key, self.problem = source, key, problem
        # A problem of the whole file (missing, not TOML) names no key.
        super().__init__(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")


ENGINE_FAMILIES = ("POSTGRESQL", "MYSQL")
CLIENT_AUTH_TYPES = {
    "POSTGRESQL": ("POSTGRES_SCRAM_SHA_256", "POSTGRES_MD5"),
    "MYSQL": ("MYSQL_NATIVE_PASSWORD", "MYSQL_CACHING_SHA2_PASSWORD"),
}
PINNING_FILTERS = ("EXCLUDE_VARIABLE_SETS",)
TARGET_ROLES = (Role.WRITER.value, Role.READER.value)
TARGET_TLS_MODES = ("disable", "require", "verify-ca", "verify-full")
SECRET_PROVIDERS = ("file:", "env:", "aws-secretsmanager:")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


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
    # Clients' named prepared statements kept per database connection (PostgreSQL), least
    # recently used closed first; 0 pins a client that names one, as RDS Proxy does.
    max_prepared_statements: int = 200
    connect_timeout: float = 10.0
    # Health checks and failover.
    health_check_interval: float = 1.0        # seconds between checks of one target
    health_check_timeout: float = 2.0         # a check slower than this fails
    health_check_failures: int = 2            # consecutive failures before UNAVAILABLE
    read_only_fallback_to_writer: bool = False
    # A shell command run once when the writer has been UNAVAILABLE for a whole check and a
    # reader is AVAILABLE; RDSPROXY_PROMOTE_HOST/PORT/NAME name the reader. Off by default:
    # the proxy follows the database's own topology.
    failover_promote_command: str = ""


@dataclass
class TargetConfig:
    host: str
    port: int = 5432
    name: str = ""              # as RdsResourceId in describe-targets; default host:port
    # Database-leg TLS, with libpq's sslmode meanings.
    tls: str = "disable"
    tls_ca_file: str = ""


@dataclass
class TlsConfig:
    """Client-leg TLS: the proxy's certificate; with ca_file, client certificates are checked."""
    cert_file: str
    key_file: str
    ca_file: str = ""
    require_client_cert: bool = False


@dataclass
class IamPrincipalConfig:
    # A secret reference to JSON {"AccessKeyId", "SecretAccessKey"}; access_key_id, when
    # given, must name the same key (it documents which key this entry is).
    secret_access_key: str
    access_key_id: str = ""
    resources: list[str] = field(default_factory=list)


@dataclass
class IamConfig:
    region: str = ""
    # Names/addresses clients use to reach the endpoints (what they sign tokens for).
    host_names: list[str] = field(default_factory=list)
    principals: list[IamPrincipalConfig] = field(default_factory=list)


@dataclass
class AdminConfig:
    """A small HTTP endpoint: GET /targets (describe-targets as JSON) and GET /stats."""
    listen: str = ""


@dataclass
class EndpointConfig:
    name: str
    listen: str
    target_role: Role = Role.WRITER

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
    # Seconds a client may take from connecting to being logged in (PostgreSQL's
    # authentication_timeout): half-open logins must not hold a client slot for long.
    login_timeout: float = 60.0
    # Clients of one address still logging in, at most (0: no cap): one address must not
    # fill max_client_connections with half-open logins.
    max_logins_per_address: int = 100
    debug_logging: bool = False
    # Seconds between the log's stats lines (clients, pool, queries); 0: none.
    stats_log_interval: float = 60.0
    # Seconds of the trailing window AvailabilityPercentage is the share of.
    availability_window: float = 60.0
    # A log line per client login and per close (PgBouncer's log_connections and
    # log_disconnections). Off by default: for a client per transaction they cost about as
    # much CPU as the rest of the connection (bench.instructions --workload C).
    log_connections: bool = False
    auth: list[AuthConfig] = field(default_factory=list)
    target_group: TargetGroupConfig = field(default_factory=TargetGroupConfig)
    targets: list[TargetConfig] = field(default_factory=list)
    endpoints: list[EndpointConfig] = field(default_factory=list)
    # Extensions.
    shutdown_timeout: float = 30.0
    max_client_connections: int = 100000
    max_message_size: int = 1 << 30
    secrets_refresh_interval: float = 300.0   # 0 = only on SIGHUP
    tls: TlsConfig | None = None
    iam: IamConfig | None = None
    admin: AdminConfig | None = None
    # Users whose login to the virtual database `rdsproxy` opens the admin console
    # (core/console.py); empty: no console.
    admin_users: list[str] = field(default_factory=list)
    source: str = "<dict>"
    base_dir: str = "."

    def resolve_path(self, path: str) -> str:
        """Paths in the config are relative to the config file."""
        return path if os.path.isabs(path) else os.path.join(self.base_dir, path)

    def iam_host_names(self, endpoint: "EndpointConfig") -> list[str]:
        """Host names an IAM token may name for `endpoint`."""
        if self.iam is not None and self.iam.host_names:
            return list(self.iam.host_names)
        names = [endpoint.host]
        if endpoint.host in LOOPBACK_NAMES:
            names += [n for n in LOOPBACK_NAMES if n not in names]
        return names


# --- validation -----------------------------------------------------------------------

_SECTIONS = {
    "auth": AuthConfig,
    "target_group": TargetGroupConfig,
    "targets": TargetConfig,
    "endpoints": EndpointConfig,
    "tls": TlsConfig,
    "iam": IamConfig,
    "admin": AdminConfig,
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


class ConfigErrors(ConfigError):
    """Several config problems, one `file: key: problem` line each; `.problems` lists them
    (the attributes of the first are this error's own)."""

    def __init__(self, problems: list[ConfigError]):
        first = problems[0]
        super().__init__(first.source, first.key, first.problem)
        self.problems = problems
        self.args = ("\n".join(str(p) for p in problems),)


class _Problems:
    """Collects the problems of a config so that all are reported at once: each check runs
    in `with problems:`, and a ConfigError in one is kept and the next check runs."""

    def __init__(self):
        self.found: list[ConfigError] = []

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if isinstance(exc, ConfigErrors):
            self.found += exc.problems
            return True
        if isinstance(exc, ConfigError):
            self.found.append(exc)
            return True
        return False

    def raise_any(self) -> None:
        if len(self.found) == 1:
            raise self.found[0]
        if self.found:
            raise ConfigErrors(self.found)


def config_from_dict(data: dict, *, source: str = "<dict>", base_dir: str | os.PathLike = ".") -> ProxyConfig:
    """Build and validate a ProxyConfig from a parsed TOML document (or an equal dict).
    Every problem found is reported: one ConfigError, or ConfigErrors listing them all."""
    problems = _Problems()
    top = {}
    top_fields = {f.name for f in dataclasses.fields(ProxyConfig)}
    for key in data:
        if key not in _SECTIONS and (key not in top_fields or key in ("source", "base_dir")):
            with problems:
                raise ConfigError(source, key, "unknown key")
    for f in dataclasses.fields(ProxyConfig):
        if f.name in data and f.name not in _SECTIONS and f.name not in ("source", "base_dir"):
            with problems:
                top[f.name] = _coerce(f, data[f.name], source, f.name)
    cfg = ProxyConfig(**top, source=source, base_dir=str(base_dir))
    with problems:
        _one_of(cfg.engine_family, ENGINE_FAMILIES, source, "engine_family")
    with problems:
        if cfg.idle_client_timeout < 0:
            raise ConfigError(source, "idle_client_timeout", "must be 0 (never) or a positive number of seconds")
    with problems:
        if not 1 <= cfg.login_timeout <= 600:
            raise ConfigError(source, "login_timeout", "must be between 1 and 600 seconds")
    with problems:
        if cfg.max_logins_per_address < 0:
            raise ConfigError(source, "max_logins_per_address", "must be 0 (no cap) or a positive number")
    with problems:
        if cfg.secrets_refresh_interval < 0:
            raise ConfigError(source, "secrets_refresh_interval", "must be 0 (only on SIGHUP) or a "
                                                                  "positive number of seconds")
    with problems:
        if cfg.stats_log_interval < 0:
            raise ConfigError(source, "stats_log_interval", "must be 0 (no stats lines) or a "
                                                            "positive number of seconds")
    with problems:
        if cfg.availability_window <= 0:
            raise ConfigError(source, "availability_window", "must be a positive number of seconds")
    with problems:
        _auth_entries(cfg, data.get("auth", []), source, problems)
    with problems:
        _admin_users(cfg, source)
    with problems:
        if "tls" in data:
            cfg.tls = _tls_section(cfg, data["tls"], source)
    with problems:
        if cfg.require_tls and cfg.tls is None and "tls" not in data:
            raise ConfigError(source, "require_tls", "needs a [tls] section with cert_file and key_file "
                                                     "(or `serve --generate-self-signed DIR`)")
    with problems:
        if "iam" in data:
            cfg.iam = _iam_section(data["iam"], source, problems)
    with problems:
        iam_users = [a for a in cfg.auth if a.iam_auth != "DISABLED"]
        if iam_users:
            key = f"auth[{cfg.auth.index(iam_users[0])}].iam_auth"
            if cfg.iam is None and "iam" in data:
                pass   # the [iam] section's own problems are reported
            elif cfg.iam is None or not cfg.iam.principals:
                raise ConfigError(source, key, "needs at least one [[iam.principals]] entry to "
                                               "verify tokens with")
            elif cfg.tls is None and "tls" not in data:
                raise ConfigError(source, key, "IAM tokens are only accepted over TLS: add a [tls] "
                                               "section (or `serve --generate-self-signed DIR`)")
    with problems:
        cfg.target_group = _target_group(data.get("target_group", {}), source, problems)
    with problems:
        _targets(cfg, data.get("targets", []), source, problems)
    with problems:
        if "admin" in data:
            admin = AdminConfig(**_check_fields(AdminConfig, data["admin"], source, "admin."))
            try:
                _range(int(admin.listen.rsplit(":", 1)[1]), 0, 65535, source, "admin.listen")
            except (ValueError, IndexError):
                raise ConfigError(source, "admin.listen", f"must be HOST:PORT, not {admin.listen!r}") from None
            cfg.admin = admin
    with problems:
        _endpoints(cfg, data.get("endpoints", [{"name": "default", "listen": "127.0.0.1:6432"}]),
                   source, problems)
    _check_listen_addresses(cfg, source, problems)
    problems.raise_any()
    return cfg


_WILDCARDS = ("", "0.0.0.0", "::")


def _check_listen_addresses(cfg: ProxyConfig, source: str, problems: _Problems) -> None:
    """Every listen address resolves, and no two listeners (endpoints, the admin endpoint)
    would bind the same port on overlapping addresses (a wildcard overlaps every address)."""
    listeners = [(f"endpoints[{i}].listen", e.host, e.port) for i, e in enumerate(cfg.endpoints)]
    if cfg.admin is not None and cfg.admin.listen:
        host, port = cfg.admin.listen.rsplit(":", 1)
        listeners.append(("admin.listen", host.strip("[]"), int(port)))
    taken: list[tuple[str, str, int]] = []
    for key, host, port in listeners:
        with problems:
            if host not in _WILDCARDS:
                try:
                    socket.getaddrinfo(host, None)
                except (socket.gaierror, UnicodeError) as exc:
                    raise ConfigError(source, key, f"cannot resolve host {host!r}: {exc}") from None
            for other_key, other_host, other_port in taken:
                if port and port == other_port and (host == other_host or host in _WILDCARDS
                                                    or other_host in _WILDCARDS):
                    raise ConfigError(source, key, f"{host}:{port} is also {other_key}'s address")
            taken.append((key, host, port))


def _auth_entries(cfg: ProxyConfig, auth_list, source: str, problems: _Problems) -> None:
    if not isinstance(auth_list, list) or not auth_list:
        raise ConfigError(source, "auth", "at least one [[auth]] entry is required")
    # With an unknown engine_family (reported already) the auth types cannot be checked.
    types = CLIENT_AUTH_TYPES.get(cfg.engine_family)
    for i, entry in enumerate(auth_list):
        prefix = f"auth[{i}]."
        with problems:
            if isinstance(entry, dict) and "client_password_auth_type" not in entry and types:
                entry = dict(entry, client_password_auth_type=types[0])
            a = AuthConfig(**_check_fields(AuthConfig, entry, source, prefix))
            _one_of(a.auth_scheme, ("SECRETS",), source, prefix + "auth_scheme")
            _one_of(a.iam_auth, ("DISABLED", "REQUIRED", "OPTIONAL"), source, prefix + "iam_auth")
            if types:
                _one_of(a.client_password_auth_type, types, source, prefix + "client_password_auth_type")
            _check_reference(a.secret, source, prefix + "secret")
            cfg.auth.append(a)


def _admin_users(cfg: ProxyConfig, source: str) -> None:
    """admin_users names users, each once; which users exist is known only once their
    secrets are read (the engine logs the names that have none)."""
    if not cfg.admin_users:
        return
    for i, user in enumerate(cfg.admin_users):
        if not user.strip():
            raise ConfigError(source, f"admin_users[{i}]", "must be a user name, not empty")
        if user in cfg.admin_users[:i]:
            raise ConfigError(source, f"admin_users[{i}]", f"duplicate user {user!r}")


def _tls_section(cfg: ProxyConfig, raw, source: str) -> TlsConfig:
    t = TlsConfig(**_check_fields(TlsConfig, raw, source, "tls."))
    for key in ("cert_file", "key_file", "ca_file"):
        path = getattr(t, key)
        if path:
            path = cfg.resolve_path(path)
            setattr(t, key, path)   # absolute from here on: reloads do not depend on cwd
            if not os.path.isfile(path):
                raise ConfigError(source, f"tls.{key}", f"file not found: {path}")
    if t.require_client_cert and not t.ca_file:
        raise ConfigError(source, "tls.require_client_cert", "needs tls.ca_file to verify "
                                                             "client certificates against")
    return t


def _iam_section(raw, source: str, problems: _Problems) -> IamConfig:
    if not isinstance(raw, dict):
        raise ConfigError(source, "iam", f"must be a table, not {type(raw).__name__}")
    principals = raw.get("principals", [])
    iam = IamConfig(**_check_fields(IamConfig, {k: v for k, v in raw.items() if k != "principals"},
                                    source, "iam."))
    if not isinstance(principals, list):
        raise ConfigError(source, "iam.principals", "must be a list of [[iam.principals]] tables")
    for i, entry in enumerate(principals):
        prefix = f"iam.principals[{i}]."
        with problems:
            p = IamPrincipalConfig(**_check_fields(IamPrincipalConfig, entry, source, prefix))
            _check_reference(p.secret_access_key, source, prefix + "secret_access_key")
            if not p.resources:
                raise ConfigError(source, prefix + "resources", "at least one rds-db:connect resource "
                                  "pattern is required (e.g. \"arn:aws:rds-db:*:*:dbuser:*/app\" or \"*\")")
            iam.principals.append(p)
    return iam


def _target_group(raw, source: str, problems: _Problems) -> TargetGroupConfig:
    tg = TargetGroupConfig(**_check_fields(TargetGroupConfig, raw, source, "target_group."))
    if tg.max_idle_connections_percent == -1:
        tg.max_idle_connections_percent = tg.max_connections_percent // 2
    checks = [
        lambda: _range(tg.max_connections_percent, 1, 100, source,
                       "target_group.max_connections_percent"),
        lambda: _range(tg.max_idle_connections_percent, 0, tg.max_connections_percent, source,
                       "target_group.max_idle_connections_percent"),
        lambda: _range(tg.connection_borrow_timeout, 0, 300, source,
                       "target_group.connection_borrow_timeout"),
        lambda: _positive(tg.health_check_interval, source, "target_group.health_check_interval"),
        lambda: _positive(tg.health_check_timeout, source, "target_group.health_check_timeout"),
        lambda: _range(tg.health_check_failures, 1, 100, source, "target_group.health_check_failures"),
        lambda: _range(tg.max_prepared_statements, 0, 100000, source,
                       "target_group.max_prepared_statements"),
    ] + [lambda flt=flt: _one_of(flt, PINNING_FILTERS, source, "target_group.session_pinning_filters")
         for flt in tg.session_pinning_filters]
    for check in checks:
        with problems:
            check()
    return tg


def _positive(value, source: str, key: str) -> None:
    if value <= 0:
        raise ConfigError(source, key, "must be a positive number of seconds")


def _targets(cfg: ProxyConfig, targets, source: str, problems: _Problems) -> None:
    if not isinstance(targets, list) or not targets:
        raise ConfigError(source, "targets", "at least one [[targets]] entry is required")
    seen = set()
    for i, entry in enumerate(targets):
        with problems:
            t = TargetConfig(**_check_fields(TargetConfig, entry, source, f"targets[{i}]."))
            if cfg.engine_family == "MYSQL" and "port" not in entry:
                t.port = 3306
            _range(t.port, 1, 65535, source, f"targets[{i}].port")
            _one_of(t.tls, TARGET_TLS_MODES, source, f"targets[{i}].tls")
            if t.tls_ca_file:
                t.tls_ca_file = cfg.resolve_path(t.tls_ca_file)
                if not os.path.isfile(t.tls_ca_file):
                    raise ConfigError(source, f"targets[{i}].tls_ca_file",
                                      f"file not found: {t.tls_ca_file}")
            t.name = t.name or f"{t.host}:{t.port}"
            if t.name in seen:
                raise ConfigError(source, f"targets[{i}]", f"duplicate target {t.name!r} (give each a "
                                                           "distinct host:port or name)")
            seen.add(t.name)
            cfg.targets.append(t)


def _endpoints(cfg: ProxyConfig, endpoints, source: str, problems: _Problems) -> None:
    if not isinstance(endpoints, list) or not endpoints:
        raise ConfigError(source, "endpoints", "at least one [[endpoints]] entry is required")
    names = set()
    for i, entry in enumerate(endpoints):
        prefix = f"endpoints[{i}]."
        with problems:
            e = EndpointConfig(**_check_fields(EndpointConfig, entry, source, prefix))
            _one_of(e.target_role, TARGET_ROLES, source, prefix + "target_role")
            e.target_role = Role(e.target_role)
            try:
                _range(e.port, 0, 65535, source, prefix + "listen")
            except (ValueError, IndexError):
                raise ConfigError(source, prefix + "listen", f"must be HOST:PORT, not {e.listen!r}") from None
            if e.name in names:
                raise ConfigError(source, prefix + "name", f"duplicate endpoint name {e.name!r}")
            names.add(e.name)
            cfg.endpoints.append(e)


def _check_reference(reference: str, source: str, key: str) -> None:
    if not reference.startswith(SECRET_PROVIDERS):
        raise ConfigError(source, key, f"must start with {' or '.join(repr(p) for p in SECRET_PROVIDERS)}, "
                                       f"not {reference!r}")


def load_config(path: str | os.PathLike, overrides: dict | None = None) -> ProxyConfig:
    """Read and validate a TOML file; `overrides` (top-level keys/sections) win over the file's."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(str(path), "", "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "", f"not valid TOML: {exc}") from None
    if overrides:
        data.update(overrides)
    return config_from_dict(data, source=str(path), base_dir=path.resolve().parent)
