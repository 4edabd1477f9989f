"""Prometheus metrics of the service, in a registry of its own (one per app instance)."""

from __future__ import annotations

from typing import Any

# Seconds; dense below 50 ms, where single-row latency lives.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServiceMetrics:
    """Request counts and latency by endpoint/status/version, batches, the model version."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "serving_requests_total",
            "Scoring requests answered",
            ["endpoint", "status", "model_version"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "serving_request_duration_seconds",
            "Time from request received to response ready",
            ["endpoint", "status", "model_version"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rows = Counter(
            "serving_predicted_rows_total", "Rows scored", ["model_version"], registry=self.registry
        )
        self.batch_rows = Histogram(
            "serving_batch_rows",
            "Rows per model call (micro-batch)",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.model_version = Gauge(
            "serving_model_version",
            "Registry version being served",
            ["model_name", "alias"],
            registry=self.registry,
        )
        self.model_loaded_at = Gauge(
            "serving_model_loaded_timestamp_seconds",
            "When the served version was loaded",
            registry=self.registry,
        )
        self.model_loads = Counter(
            "serving_model_loads_total",
            "Model loads by outcome (ok, error)",
            ["outcome"],
            registry=self.registry,
        )
        self.queue_full = Counter(
            "serving_queue_full_total",
            "Requests refused with 503 because the micro-batcher's queue "
            "held serve.max_queue_rows rows",
            registry=self.registry,
        )
        self.row_violations = Counter(
            "serving_row_violations_total",
            "Rows breaking the model's input contract, by column "
            "and rule; action: rejected or flagged (serve.row_policy)",
            ["column", "rule", "action"],
            registry=self.registry,
        )

    def observe_request(self, endpoint: str, status: int, version: str, seconds: float) -> None:
        """Count one scoring request and its latency."""
        labels = (endpoint, str(status), version)
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(seconds)

    def observe_violations(self, violations: list[Any], action: str) -> None:
        """Count each row violation by its column and rule."""
        for violation in violations:
            self.row_violations.labels(violation.column, violation.rule, action).inc()

    def observe_model(self, model: Any) -> None:
        """A new model is being served: set the version gauge, count the load."""
        self.model_loads.labels("ok").inc()
        if model.version is not None:
            self.model_version.labels(model.name or "", model.alias or "").set(float(model.version))
        self.model_loaded_at.set(model.loaded_at)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
