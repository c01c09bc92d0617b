"""Prometheus metrics with bounded labels (STYLE 8)."""

from __future__ import annotations

from prometheus_client import Counter

EVENTS_RECEIVED = Counter(
    "b24scribe_events_received_total",
    "Hook requests stored or recognised, by source and outcome",
    ["source", "provider", "outcome"],
)
REJECTIONS = Counter(
    "b24scribe_rejections_total",
    "Hook requests refused before storing, by source and reason",
    ["source", "provider", "reason"],
)


class Metrics:
    """The counters the views and the worker touch."""

    def received(self, source: str, provider: str, outcome: str) -> None:
        """Count a stored, duplicate or rejected event."""
        EVENTS_RECEIVED.labels(source, provider, outcome).inc()

    def rejected(self, source: str, provider: str, reason: str) -> None:
        """Count a request refused before storing (authentication, size)."""
        REJECTIONS.labels(source, provider, reason).inc()
