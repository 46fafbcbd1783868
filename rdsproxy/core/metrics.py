"""Counters and gauges named as RDS Proxy names them in CloudWatch, plus pinning reasons."""
from __future__ import annotations

from collections import Counter

from rdsproxy._fastpath import LatencyHistogram, MetricCounters


class Metrics(MetricCounters):
    """Attribute counters (those of every connection are C integers in the fast path's
    MetricCounters); `snapshot()` gives them as a dict."""

    COUNTERS = (
        "ClientConnectionsReceived",
        "ClientConnectionsSetupSucceeded",
        "ClientConnectionsSetupFailedAuth",
        "ClientConnectionsClosed",
        "ClientConnectionsRefused",      # over max_client_connections
        "DatabaseConnectionRequests",
        "DatabaseConnectionRequestsWithTLS",
        "DatabaseConnectionsSetupSucceeded",
        "DatabaseConnectionsSetupFailed",
        "DatabaseConnectionsBorrowTimeouts",
        "QueryRequests",
        "CancelRequests",
        "ProtocolErrors",
        # Failover (rdsproxy's own): requests sent again after their connection died
        # unanswered, statements answered 08007 (caught committing), and target changes.
        "RequestsReplayed",
        "TransactionsInDoubt",
        "TargetStateChanges",
        # Sessions whose state was asked of the server after a transaction the pinning
        # rules could not vouch for (a user's function, DO, CALL, FunctionCall).
        "SessionStateChecks",
        # ... and the lighter reads after a transaction whose only such statements were
        # plain SETs and RESETs: the values of the settings they named.
        "SettingsChecks",
        # Clients whose named prepared statements the proxy keeps (not pinned for them),
        # and statements it prepared on database connections for them.
        "StatementClients",
        "StatementsPrepared",
        # Transactions after which a client's own settings (SET, set_config) were taken
        # on to carry to the connections it borrows, instead of pinning it.
        "SettingsAdopted",
        # ... and after which the SQL prepared statements it made were taken on alike.
        "SQLStatementsAdopted",
    )

    def __init__(self):
        super().__init__()   # the per-connection counters, ClientConnections among them
        for name in self.COUNTERS:
            setattr(self, name, 0)
        self.pin_reasons = Counter()
        # QueryResponseLatency by endpoint name: request in to the answer's last byte out.
        self.response_latencies: dict[str, LatencyHistogram] = {}

    def response_latency(self, endpoint: str) -> LatencyHistogram:
        """The QueryResponseLatency histogram of the endpoint named `endpoint`."""
        latency = self.response_latencies.get(endpoint)
        if latency is None:
            latency = self.response_latencies[endpoint] = LatencyHistogram()
        return latency

    def pinned(self, reason: str) -> None:
        self.pin_reasons[reason] += 1

    def snapshot(self) -> dict:
        out = {name: getattr(self, name) for name in self.COUNTERS}
        out["ClientConnections"] = self.ClientConnections
        out["SessionPinReasons"] = dict(self.pin_reasons)
        return out
