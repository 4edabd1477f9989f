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
    max_bad_row_share: float = Field(0.05, ge=0, le=1)  # sampled live rows with a null where the
    # contract allows none, a value outside the suite or an unseen category
    max_accuracy_drop: float = Field(0.05, ge=0, le=1)  # live accuracy (labels, else the
    # confidence-based estimate) below the model's test accuracy by more than this
    # after a retraining event, no other for the same watched version for this long (a run on
    # unchanged data retrains nothing: the drift stays until new rows or a new version come)
    cooldown_h: float = Field(24.0, ge=0)
    labels_days: int = Field(7, gt=0)  # labels are joined with this many days of logged rows
    keep_reports: int = Field(48, gt=0)  # newest decided checks whose report folders are kept
    cron: str = "0 * * * *"  # `make schedule` and `make up` run the monitor on this cron
    state_dir: str = "data/monitor"  # the watermark of the last check (history: reports/monitor/)

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        from stages.common.config import ScheduleParams

        ScheduleParams(cron=value)  # the same check as schedule.cron
        return value
