"""``python -m flows.serve``: run the service (``serving/``) with uvicorn; ``make serve`` calls it.

Settings come from ``params.yaml`` (``serve`` section; the model from ``register.model_name``
and ``register.alias``; the env var holding the artifact signing key from
``register.signing_key_env``, as register signs with it; the MLflow store from
``mlflow.tracking_uri`` or ``MLFLOW_TRACKING_URI``); any flag overrides its setting for this run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from model.errors import PipelineError
from stages.common.config import Params, load_params

if TYPE_CHECKING:
    from serving.app import ServiceConfig

logger = logging.getLogger(__name__)

# flag -> (params section, field); None means "take it from params.yaml"
_FROM_PARAMS = {
    "host": ("serve", "host"),
    "port": ("serve", "port"),
    "model_name": ("register", "model_name"),
    "alias": ("register", "alias"),
    "poll_interval": ("serve", "poll_interval_s"),
    "token_env": ("serve", "token_env"),
    "max_body_bytes": ("serve", "max_body_bytes"),
    "max_batch_rows": ("serve", "max_batch_rows"),
    "sample_rate": ("serve", "sample_rate"),
    "log_dir": ("serve", "log_dir"),
    "row_policy": ("serve", "row_policy"),
    "allow_contract_change": ("serve", "allow_contract_change"),
}


def build_parser() -> argparse.ArgumentParser:
    """The service's options (defaults: params.yaml)."""
    serve = argparse.ArgumentParser(
        prog="python -m flows.serve",
        description="Serve models:/<model-name>@<alias> over HTTP, following the alias. "
        "Unset options come from params.yaml.",
    )
    serve.add_argument("--params", default="params.yaml", help="pipeline parameters file")
    serve.add_argument("--host", help="bind address (params serve.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (params serve.port)")
    serve.add_argument("--model-name", help="registered model (params register.model_name)")
    serve.add_argument("--alias", help="alias to follow (params register.alias)")
    serve.add_argument(
        "--model-uri",
        help="serve exactly this model URI instead of following "
        "the alias (e.g. models:/classifier/3, runs:/ID/model)",
    )
    serve.add_argument(
        "--variant",
        default="pyfunc",
        help="how the model runs: pyfunc, a variant name known to "
        "serving.model.VARIANT_LOADERS, or module:function",
    )
    serve.add_argument(
        "--poll-interval",
        type=float,
        help="seconds between alias checks (params serve.poll_interval_s)",
    )
    serve.add_argument(
        "--token-env",
        help="env var holding the bearer token /predict needs "
        "(params serve.token_env, SERVE_TOKEN); unset = open",
    )
    serve.add_argument("--max-body-bytes", type=int, help="413 above this many bytes")
    serve.add_argument("--max-batch-rows", type=int, help="rows per model call (micro-batch)")
    serve.add_argument(
        "--sample-rate", type=float, help="share of requests written to the prediction log (0..1)"
    )
    serve.add_argument("--log-dir", help="prediction log folder (params serve.log_dir)")
    serve.add_argument(
        "--row-policy",
        choices=("reject", "flag"),
        help="a row breaking the model's input contract: reject (422) or flag "
        "(score it and mark it) (params serve.row_policy)",
    )
    serve.add_argument(
        "--allow-contract-change",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="follow the alias to a version whose input contract differs "
        "(params serve.allow_contract_change)",
    )
    serve.add_argument("--log-level", default="info", help="debug, info, warning, error")
    return serve


def resolve_settings(args: argparse.Namespace, params: Params) -> dict:
    """Flags over params.yaml: one flat dict of the service's settings."""
    settings = {}
    for flag, (section, name) in _FROM_PARAMS.items():
        value = getattr(args, flag)
        settings[flag] = value if value is not None else getattr(getattr(params, section), name)
    if not 0 <= settings["sample_rate"] <= 1:
        raise PipelineError(f"--sample-rate must be between 0 and 1, got {settings['sample_rate']}")
    return settings


def build_config(args: argparse.Namespace, params: Params) -> tuple[ServiceConfig, str, int]:
    """The ServiceConfig for these flags + params, and the host and port to bind."""
    from serving.app import ServiceConfig
    from stages.common.tracking import apply_http_limits, tracking_uri

    s = resolve_settings(args, params)
    # MLflow's HTTP limits from params (mlflow.request_timeout_s, max_retries, backoff_s): a
    # tracking server that is down fails startup, and each follower poll, in seconds.
    apply_http_limits(params.mlflow)
    token = os.environ.get(s["token_env"]) or None
    if token is None:
        logger.warning(
            "%s is not set: /predict is open to anyone who can reach %s", s["token_env"], s["host"]
        )
    config = ServiceConfig(
        model_name=s["model_name"],
        alias=s["alias"],
        model_uri=args.model_uri,
        variant=args.variant,
        poll_interval_s=s["poll_interval"],
        tracking_uri=tracking_uri(params.mlflow),
        token=token,
        max_body_bytes=s["max_body_bytes"],
        max_batch_rows=s["max_batch_rows"],
        sample_rate=s["sample_rate"],
        log_dir=s["log_dir"],
        row_policy=s["row_policy"],
        allow_contract_change=s["allow_contract_change"],
        signing_key_env=params.register.signing_key_env,
        log_flush_rows=params.serve.log_flush_rows,
        max_queue_rows=params.serve.max_queue_rows,
        log_flush_interval_s=params.serve.log_flush_interval_s,
    )
    return config, s["host"], s["port"]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the service until it is stopped (Ctrl-C)."""
    import uvicorn

    from serving.app import create_app

    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in logs
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config, host, port = build_config(args, load_params(args.params))
    except PipelineError as exc:
        logger.error("serve failed: %s", exc)
        return 1
    target = config.model_uri or f"models:/{config.model_name}@{config.alias}"
    logger.info("serving %s (%s) on http://%s:%d", target, config.variant, host, port)
    # access_log off: one log line per request costs more than scoring a row
    uvicorn.run(
        create_app(config), host=host, port=port, log_level=args.log_level, access_log=False
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
