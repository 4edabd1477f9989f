"""The service's own figures from its Prometheus ``/metrics`` (``serving/metrics.py``): scoring
requests, server errors (5xx), client errors (4xx) and latency quantiles from the request
histogram, all since the service started. An unreachable endpoint is recorded as unavailable:
the monitor goes on without these figures.
"""

from __future__ import annotations

import urllib.request
from dataclasses import asdict, dataclass
from typing import Any

REQUESTS = "serving_requests"  # counter serving_requests_total (the parser drops _total)
LATENCY = "serving_request_duration_seconds"


@dataclass(frozen=True)
class ServiceFigures:
    """Requests, errors and latency of the scoring endpoints; ``available`` False with
    ``error`` when ``/metrics`` could not be read."""

    available: bool
    url: str | None = None
    requests: float | None = None
    errors: float | None = None  # 5xx answers
    client_errors: float | None = None  # 4xx answers
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    latency_p99_s: float | None = None
    error: str | None = None

    @property
    def error_share(self) -> float | None:
        """Server errors per request (None without requests)."""
        if not self.requests or self.errors is None:
            return None
        return self.errors / self.requests

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with ``error_share``."""
        return {**asdict(self), "error_share": self.error_share}


def read_service(url: str | None, timeout_s: float = 5.0) -> ServiceFigures:
    """Fetch and parse ``url`` (None: not read)."""
    if not url:
        return ServiceFigures(False, error="no metrics URL (params monitor.metrics_url: null)")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (params)
            text = response.read().decode("utf-8")
    except Exception as exc:
        return ServiceFigures(False, url, error=f"{type(exc).__name__}: {exc}")
    return parse_metrics(text, url)


def parse_metrics(text: str, url: str | None = None) -> ServiceFigures:
    """The figures in a Prometheus exposition text."""
    from prometheus_client.parser import text_string_to_metric_families

    total = server = client = 0.0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.name == REQUESTS and sample.name.endswith("_total"):
                status = sample.labels.get("status", "")
                total += sample.value
                server += sample.value if status.startswith("5") else 0.0
                client += sample.value if status.startswith("4") else 0.0
            elif family.name == LATENCY and sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    ordered = sorted(buckets.items())
    return ServiceFigures(
        True,
        url,
        requests=total,
        errors=server,
        client_errors=client,
        latency_p50_s=histogram_quantile(0.5, ordered),
        latency_p95_s=histogram_quantile(0.95, ordered),
        latency_p99_s=histogram_quantile(0.99, ordered),
    )


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile``: linear inside the bucket holding the q-th
    observation; ``buckets`` are (upper bound, cumulative count) ascending, ``+Inf`` last. In
    the +Inf bucket the answer is the largest finite bound."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            width = count - lower_count
            share = (rank - lower_count) / width if width else 0.0
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return lower_bound
