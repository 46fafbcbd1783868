"""RDS Proxy's CloudWatch metrics as this proxy measures them: one set of figures that
/metrics shows as Prometheus text (exposition format 0.0.4) and /stats as JSON, by name.

CloudWatch's dimensions become labels: `target` for a figure of one target's connection
budget, `endpoint` for one endpoint's, besides the `proxy` and `engine` of every sample.
Latencies are histograms in seconds (Prometheus's unit), not CloudWatch's milliseconds.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from rdsproxy._fastpath import LATENCY_BOUNDS
from rdsproxy.core.failover import held_by_pool

COUNTER = "counter"
GAUGE = "gauge"
HISTOGRAM = "histogram"

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"

# Metrics counters shown under their CloudWatch names, and what each counts.
COUNTED = {
    "ClientConnectionsReceived": "Client connections received.",
    "ClientConnectionsSetupSucceeded": "Client connections that logged in.",
    "ClientConnectionsSetupFailedAuth": "Client logins refused for their credentials.",
    "ClientConnectionsClosed": "Client connections closed.",
    "DatabaseConnectionRequests": "Requests to open a database connection.",
    "DatabaseConnectionRequestsWithTLS": "Requests to open a database connection with TLS.",
    "DatabaseConnectionsSetupSucceeded": "Database connections opened.",
    "DatabaseConnectionsSetupFailed": "Database connections that failed to open.",
}


@dataclass
class Figure:
    """One metric: CloudWatch's name, its kind and help, and its samples as (labels,
    value) pairs (a LatencyHistogram's value for a histogram)."""
    name: str
    kind: str
    help: str
    samples: list = field(default_factory=list)


def figures(metrics, engine=None) -> list[Figure]:
    """The figures of `metrics` (core.metrics.Metrics), and with the engine running, of its
    targets and their pools and of its clients."""
    out = [Figure(name, COUNTER, text, [({}, getattr(metrics, name))])
           for name, text in COUNTED.items()]
    if engine is not None:
        tls_clients, queries, tls_queries = engine.tls_figures()
    else:
        tls_clients, queries, tls_queries = 0, metrics.QueryRequests, metrics.QueryRequestsTLS
    clients = metrics.ClientConnections

    def single(name, kind, text, value):
        out.append(Figure(name, kind, text, [({}, value)]))

    single("QueryRequests", COUNTER, "Queries received from clients.", queries)
    single("QueryRequestsTLS", COUNTER, "Queries received from clients over TLS.", tls_queries)
    single("QueryRequestsNoTLS", COUNTER, "Queries received from clients without TLS.",
           queries - tls_queries)
    single("ClientConnections", GAUGE, "Client connections open now.", clients)
    single("ClientConnectionsTLS", GAUGE, "Client connections open now over TLS.", tls_clients)
    single("ClientConnectionsNoTLS", GAUGE,
           "Client connections open now without TLS (or not yet past their TLS handshake).",
           clients - tls_clients)
    out.append(Figure("SessionPinReasons", COUNTER, "Client sessions pinned, by reason.",
                      [({"reason": reason}, count)
                       for reason, count in sorted(metrics.pin_reasons.items())]))
    response = Figure("QueryResponseLatency", HISTOGRAM,
                      "From a request received from a client to the last byte of its answer "
                      "sent back, by endpoint.",
                      [({"endpoint": name}, latency)
                       for name, latency in sorted(metrics.response_latencies.items())])
    out.append(response)
    if engine is not None:
        out.extend(_pool_figures(engine))
    return out


def _pool_figures(engine) -> list[Figure]:
    pools = sorted(engine.router.pools.items(), key=lambda item: item[0].name)
    in_transaction, pinned = held_by_pool(engine.clients, [pool for _, pool in pools])
    window = engine.config.availability_window

    def per_target(name, kind, text, value):
        return Figure(name, kind, text,
                      [({"target": target.name}, value(pool)) for target, pool in pools])

    # A target gets its sample once its first health check has given a verdict.
    availability = [(target.name, target.availability.percentage(window))
                    for target, _ in pools]
    return [
        Figure("AvailabilityPercentage", GAUGE,
               f"Share of the last {window:g} s (availability_window) in which the target "
               "was AVAILABLE in its role, by its health checks.",
               [({"target": name}, share) for name, share in availability
                if share is not None]),
        per_target("DatabaseConnections", GAUGE, "Database connections open or opening.",
                   lambda pool: pool.core.total),
        # A target's tls is one of require / verify-ca / verify-full or disable: either
        # all its connections use TLS or none does.
        per_target("DatabaseConnectionsWithTLS", GAUGE,
                   "Database connections open or opening with TLS.",
                   lambda pool: pool.core.total if pool.tls else 0),
        per_target("DatabaseConnectionsCurrentlyBorrowed", GAUGE,
                   "Database connections lent to clients (or being opened for them).",
                   lambda pool: pool.core.borrowed),
        per_target("DatabaseConnectionsCurrentlyInTransaction", GAUGE,
                   "Database connections held by an unpinned client's transaction.",
                   in_transaction.get),
        per_target("DatabaseConnectionsCurrentlySessionPinned", GAUGE,
                   "Database connections pinned to one client's session.", pinned.get),
        per_target("MaxDatabaseConnectionsAllowed", GAUGE,
                   "The target's connection budget (max_connections_percent of its "
                   "max_connections).", lambda pool: pool.core.max_size),
        per_target("DatabaseConnectionsBorrowLatency", HISTOGRAM,
                   "From a client asking for a database connection to getting one.",
                   lambda pool: pool.core.borrow_latency),
        per_target("QueryDatabaseResponseLatency", HISTOGRAM,
                   "From a request forwarded to the database to its answer.",
                   lambda pool: pool.core.database_latency),
    ]


def prometheus_name(figure: Figure) -> str:
    """`DatabaseConnectionsCurrentlyBorrowed` -> `rdsproxy_database_connections_currently_borrowed`,
    counters with `_total` and histograms with their unit (`_seconds`)."""
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", figure.name).lower()
    suffix = {COUNTER: "_total", HISTOGRAM: "_seconds"}.get(figure.kind, "")
    return f"rdsproxy_{snake}{suffix}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict) -> str:
    return "{" + ",".join(f'{key}="{_escape(str(value))}"' for key, value in labels.items()) + "}"


def _number(value) -> str:
    if isinstance(value, float):
        return "+Inf" if value == float("inf") else repr(value)
    return str(value)


def _cumulative(histogram) -> list[tuple[str, int]]:
    """(upper bound as Prometheus writes it, count at or below it) for each bucket."""
    out = []
    cumulative = 0
    for bound, count in zip(LATENCY_BOUNDS + (float("inf"),), histogram.buckets()):
        cumulative += count
        out.append((_number(bound), cumulative))
    return out


def prometheus_text(figures: list[Figure], labels: dict) -> str:
    """The exposition of `figures`, every sample with `labels` first."""
    lines = []
    for figure in figures:
        name = prometheus_name(figure)
        lines.append(f"# HELP {name} {figure.help}")
        lines.append(f"# TYPE {name} {figure.kind}")
        for own, value in figure.samples:
            sample = {**labels, **own}
            if figure.kind != HISTOGRAM:
                lines.append(f"{name}{_labels(sample)} {_number(value)}")
                continue
            buckets = _cumulative(value)
            for bound, count in buckets:
                lines.append(f"{name}_bucket{_labels({**sample, 'le': bound})} {count}")
            lines.append(f"{name}_sum{_labels(sample)} {_number(value.sum)}")
            lines.append(f"{name}_count{_labels(sample)} {buckets[-1][1]}")
    return "\n".join(lines) + "\n"


def _json_value(kind: str, value):
    if kind != HISTOGRAM:
        return value
    buckets = _cumulative(value)
    return {"count": buckets[-1][1], "sum": value.sum, "buckets": dict(buckets)}


def as_json(figures: list[Figure]) -> dict:
    """CloudWatch name -> value; a labelled figure's values by its label's value (target,
    endpoint or reason), a histogram's as count, sum and cumulative buckets."""
    out = {}
    for figure in figures:
        if len(figure.samples) == 1 and not figure.samples[0][0]:
            out[figure.name] = _json_value(figure.kind, figure.samples[0][1])
        else:
            out[figure.name] = {next(iter(own.values())): _json_value(figure.kind, value)
                                for own, value in figure.samples}
    return out
