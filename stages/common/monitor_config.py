"""``params.yaml``'s ``monitor`` section (``make monitor``, ``flows/monitor.py``): which model is
watched, where its prediction log and ground truth are, and the thresholds that trigger retraining.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from stages.common.config_base import StrictModel


class MonitorParams(StrictModel):
    alias: str = "champion"  # the watched version: register.model_name@<alias>
    log_dir: str = "data/predictions"  # the service's prediction log (serve.log_dir)
    # ground truth keyed by request id: a CSV/Parquet file or folder (columns request_id, label),
    # or an http(s) URL answering that table as CSV; missing: performance estimated from confidence
    labels: str = "data/labels"
    # the service's Prometheus /metrics (requests, errors, latency); null: not read
    metrics_url: str | None = "http://127.0.0.1:8000/metrics"
    reference_rows: int = Field(5000, gt=0)  # rows of the training split sampled as reference
    # fewer logged rows of the watched version since the last check: nothing is decided, and
    # the next check looks at the grown window
    min_rows: int = Field(200, gt=0)
    # retraining is triggered when ANY threshold is crossed:
    drift_share: float = Field(0.3, gt=0, le=1)  # share of features Evidently finds drifted
    psi_threshold: float = Field(0.2, gt=0)  # PSI of the predicted class probabilities
    psi_bins: int = Field(10, ge=2)  # quantile bins of the reference's probabilities
    max_bad_row_share: float = Field(0.05, ge=0, le=1)  # live rows with a null, out-of-suite
    # value or unseen category
    max_accuracy_drop: float = Field(0.05, ge=0, le=1)  # live accuracy (labels, else the
    # confidence-based estimate) below the model's test accuracy by more than this
    cron: str = "0 * * * *"  # `make schedule` and `make up` run the monitor on this cron
    state_dir: str = "data/monitor"  # the last check's watermark and the history of checks

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        from stages.common.config import ScheduleParams

        ScheduleParams(cron=value)  # the same check as schedule.cron
        return value
