"""The FastAPI service: ``create_app(config)`` builds it; ``python -m flows.serve`` runs it.

Endpoints:

* ``POST /predict`` (and ``/invocations``, MLflow's path): MLflow scoring payloads in
  (:mod:`serving.payloads`), ``{"predictions": [...], "model_version": "3"}`` out, with the
  headers ``X-Model-Version`` and ``X-Request-Id``. Bad input gets a 4xx JSON body
  ``{"error_code", "message", "columns"}``; 401 without the bearer token when one is set;
  413 over ``max_body_bytes``; 415 for a non-JSON body; 503 while no model is loaded, and
  503 with ``Retry-After`` when ``max_queue_rows`` rows already wait for the model. A failure
  inside the model is a 500 whose body names only the request id; the log has the error.
  Rows are checked against the served model's input contract (:mod:`serving.rowcheck`): per
  ``row_policy`` a row that breaks it gets 422 (``reject``) or is scored and listed under
  ``flagged`` (``flag``, a text date it cannot parse scored as missing); either way it is
  counted in ``/metrics`` and marked in the log.
* ``GET /health`` (and ``/ping``): the process is up. ``GET /ready``: 200 while the version the
  alias names is served; 503 with the reason before, and while that version was refused or
  cannot be loaded (``/predict`` keeps answering with the version it has). A registry that
  cannot be read keeps it 200 on the alias's last known version.
  ``GET /version``: the served version, its run and lineage tags, and the follower's state
  (a version refused for another input contract shows there; ``registry_error``: "registry
  unreachable since ..."); it needs the bearer token too
  when one is set.
  ``GET /metrics``: Prometheus.
* ``GET /docs`` (Swagger UI) and ``/redoc``: the OpenAPI document, rendered with no network;
  /predict's body example is a synthetic row from the served model's input contract, never a
  real one (:mod:`serving.docs`).

The model reference is read once per request from a :class:`serving.model.ModelHolder`, which a
:class:`serving.model.RegistryFollower` swaps when the alias moves; the model itself runs in a
worker thread through :class:`serving.batcher.MicroBatcher`.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi_offline import FastAPIOffline

from model.contract import Violation
from model.errors import PipelineError
from serving.batcher import MicroBatcher, QueueFull
from serving.docs import RESPONSES, install_openapi, scoring_openapi, synthetic_payload
from serving.metrics import ServiceMetrics
from serving.model import LoadedModel, ModelHolder, RegistryFollower, load_model, warm_up
from serving.payloads import PayloadError, encode_predictions, parse_payload
from serving.predlog import PredictionLog
from serving.rowcheck import describe, find_violations, rejection, row_marks, scorable

logger = logging.getLogger(__name__)

JSON = "application/json"


@dataclass(frozen=True)
class ServiceConfig:
    """Everything the service needs; ``flows.serve`` fills it from params.yaml + flags."""

    model_name: str = "classifier"  # registered model to follow
    alias: str = "champion"  # ...through this alias
    model_uri: str | None = None  # serve exactly this URI instead (no registry following)
    variant: str = "pyfunc"  # how the model runs (serving.model.VARIANT_LOADERS)
    poll_interval_s: float = 10.0  # seconds between alias checks
    tracking_uri: str | None = None  # MLflow store; None = MLflow's own default / env
    token: str | None = None  # bearer token /predict requires; None = no auth
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_batch_rows: int = 256  # rows one model call may take (micro-batching)
    max_queue_rows: int = 4096  # rows waiting for the model; beyond: 503 + Retry-After
    sample_rate: float = 0.0  # share of requests written to the prediction log
    log_dir: str = "data/predictions"  # prediction log folder
    log_flush_rows: int = 1000  # flush the prediction log at this many buffered rows
    log_flush_interval_s: float = 30.0  # ...or at least this often
    sample_seed: int | None = None  # seeds sampling (tests)
    row_policy: str = "reject"  # a row breaking the contract: reject (422) | flag (score, mark)
    allow_contract_change: bool = False  # follow the alias to another input contract
    signing_key_env: str = "MODEL_SIGNING_KEY"  # env var of the artifact signing key (register's)


class _Service:
    """The app's state: holder, follower, batcher, log, metrics. One per app."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.holder = ModelHolder()
        self.metrics = ServiceMetrics()
        self.batcher = MicroBatcher(
            config.max_batch_rows, on_batch=self._on_batch, max_queue_rows=config.max_queue_rows
        )
        self.log = PredictionLog(
            config.log_dir,
            config.sample_rate,
            config.log_flush_rows,
            config.log_flush_interval_s,
            seed=config.sample_seed,
        )
        self.follower: RegistryFollower | None = None
        self.load_error: str | None = None

    def _on_batch(self, model: LoadedModel, n_rows: int) -> None:
        self.metrics.batch_rows.observe(n_rows)
        self.metrics.rows.labels(model.label).inc(n_rows)

    def _on_swap(self, model: LoadedModel, previous: LoadedModel | None) -> None:
        self.load_error = None
        self.metrics.observe_model(model)
        # Everything alive now (libraries, the model) lives as long as the process: freeze it
        # out of the collector's full passes, each a ~140 ms pause over ~350k objects that set
        # p99 under load. Unfreeze + collect first, so earlier models' reference cycles still go.
        gc.unfreeze()
        gc.collect()
        gc.freeze()

    def _on_error(self, message: str) -> None:
        self.load_error = message
        self.metrics.model_loads.labels("error").inc()

    def start_loading(self) -> None:
        """Follow the registry alias, or load the fixed URI once, in a background thread."""
        cfg = self.config
        if cfg.model_uri is None:
            self.follower = RegistryFollower(
                self.holder,
                cfg.model_name,
                cfg.alias,
                cfg.variant,
                cfg.poll_interval_s,
                on_swap=self._on_swap,
                on_error=self._on_error,
                allow_contract_change=cfg.allow_contract_change,
                key_env=cfg.signing_key_env,
            )
            self.follower.start()
            return
        threading.Thread(target=self._load_fixed, name="model-loader", daemon=True).start()

    def _load_fixed(self) -> None:
        try:
            model = load_model(
                self.config.model_uri, self.config.variant, self.config.signing_key_env
            )
            warm_up(model)
        except Exception as exc:  # noqa: BLE001 - /ready reports it; the process stays up
            logger.error("cannot load %s: %s", self.config.model_uri, exc)
            self._on_error(f"{type(exc).__name__}: {exc}")
            return
        self._on_swap(model, self.holder.swap(model))

    def check_rows(
        self, model: LoadedModel, request_id: str, rows: list[list[Any]]
    ) -> list[Violation]:
        """Apply the row policy: count and log the violations, then raise (reject) or return
        them for the response (flag; [] when every row keeps the contract)."""
        violations = find_violations(model, rows)
        if not violations:
            return []
        reject = self.config.row_policy == "reject"
        self.metrics.observe_violations(violations, "rejected" if reject else "flagged")
        if reject:
            self.log.maybe_add(
                model,
                request_id,
                rows,
                [],
                time.time(),
                row_marks(violations, len(rows)),
                rejected=True,
            )
            raise rejection(violations)
        return violations

    def following(self) -> dict[str, Any]:
        """The follower's state for /version: its last error, the versions it refused."""
        follower = self.follower
        return {
            "last_error": follower.last_error if follower else self.load_error,
            "registry_error": follower.registry_error if follower else None,
            "refused_versions": dict(follower.refused) if follower else {},
            "allow_contract_change": self.config.allow_contract_change,
        }

    def example_payload(self) -> dict[str, Any] | None:
        """A made-up row from the served model's input contract as a /predict body (the
        OpenAPI example; /openapi.json is public, so never the model's real input example)."""
        model = self.holder.current
        if model is None:
            return None
        return synthetic_payload(model.spec, model.contract)

    def check_token(self, request: Request) -> None:
        token = self.config.token
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
            raise PayloadError(
                "missing or wrong bearer token (send 'Authorization: Bearer <token>')", status=401
            )


def _check_content_type(request: Request) -> None:
    mime, _, params = request.headers.get("content-type", JSON).partition(";")
    if mime.strip().lower() != JSON:
        raise PayloadError(
            f"send the payload as JSON (Content-Type: {JSON}), got {mime.strip()!r}", status=415
        )
    charset = params.strip().lower().removeprefix("charset=")
    if params.strip() and charset not in ("utf-8", "utf8"):
        raise PayloadError(f"only UTF-8 JSON is accepted, got {params.strip()!r}", status=415)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) more than ``limit`` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise PayloadError(f"invalid Content-Length {declared!r}")
        if int(declared) > limit:
            raise PayloadError(f"body of {declared} bytes is over the limit of {limit}", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadError(f"body is over the limit of {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=JSON, headers=headers)


async def _score(service: _Service, request: Request, endpoint: str) -> Response:
    started = time.perf_counter()
    model = service.holder.current  # this request's model, whatever swaps meanwhile
    version = model.label if model is not None else "none"
    request_id = uuid.uuid4().hex
    headers = {"X-Model-Version": version, "X-Request-Id": request_id}
    try:
        service.check_token(request)
        if model is None:
            raise PayloadError(
                f"no model loaded yet ({service.load_error or 'loading'})", status=503
            )
        _check_content_type(request)
        rows = parse_payload(await read_body(request, service.config.max_body_bytes), model.spec)
        flagged = service.check_rows(model, request_id, rows)
        records = await service.batcher.score(model, scorable(model, rows, flagged))
        service.log.maybe_add(
            model,
            request_id,
            rows,
            records,
            time.time(),
            row_marks(flagged, len(rows)) if flagged else None,
        )
        response = Response(
            encode_predictions(records, model.version, describe(flagged)),
            media_type=JSON,
            headers=headers,
        )
    except PayloadError as exc:
        response = _json(exc.to_json(), exc.status, headers)
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
    except QueueFull as exc:  # more load than the model takes: shed it, the client retries
        service.metrics.queue_full.inc()
        response = _json(
            PayloadError(str(exc), status=503).to_json(),
            503,
            {**headers, "Retry-After": str(exc.retry_after_s)},
        )
    except PipelineError as exc:  # the model refused a value (e.g. DataError naming it)
        column = getattr(exc, "column", None)
        response = _json(
            PayloadError(str(exc), columns=[column] if column else []).to_json(), 400, headers
        )
    except Exception:
        # the exception's text stays in the server log: it may quote data, paths or internals
        logger.exception("request %s failed on model v%s", request_id, version)
        response = _json(
            {
                "error_code": "INTERNAL_ERROR",
                "message": f"internal error, request id {request_id} (the service "
                "log has the details)",
            },
            500,
            headers,
        )
    service.metrics.observe_request(
        endpoint, response.status_code, version, time.perf_counter() - started
    )
    return response


def create_app(config: ServiceConfig) -> FastAPI:
    """The service as a FastAPI app; loading starts when the app starts (its lifespan)."""
    service = _Service(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if config.tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(config.tracking_uri)
        await service.batcher.start()
        service.log.start()
        service.start_loading()
        yield
        if service.follower is not None:
            await asyncio.to_thread(service.follower.stop)
        await service.batcher.stop()
        await asyncio.to_thread(service.log.stop)

    # /docs and /redoc from the pinned fastapi-offline files, not a CDN (serving/docs.py)
    app = FastAPIOffline(
        title="model service",
        lifespan=lifespan,
        description="Serves the registry alias it follows; MLflow scoring payloads.",
        swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from swagger.io
    )
    app.state.service = service
    install_openapi(app, service.example_payload)
    scoring = {"responses": RESPONSES, "openapi_extra": scoring_openapi()}

    @app.post("/predict", summary="Score rows (MLflow scoring-server payloads)", **scoring)
    async def predict(request: Request) -> Response:
        return await _score(service, request, "predict")

    @app.post(
        "/invocations",
        summary="Same as /predict (the path `mlflow models serve` uses)",
        **scoring,
    )
    async def invocations(request: Request) -> Response:
        return await _score(service, request, "invocations")

    @app.get("/health", summary="The process is up")
    @app.get("/ping", include_in_schema=False)
    async def health() -> Response:
        return _json({"status": "ok"})

    @app.get("/ready", summary="200 while the alias's version is served; 503 with the reason")
    async def ready() -> Response:
        model = service.holder.current
        if model is None:
            return _json({"ready": False, "reason": service.load_error or "loading"}, 503)
        # The alias names a version this service refused or failed to load: unready (with why)
        # until it can; /predict keeps answering with the version it has. A registry that
        # cannot be read is not a reason: every replica would drop out at once while each can
        # serve the alias's last known version (/version says "registry unreachable since").
        behind = service.follower.unready if service.follower is not None else None
        if behind:
            return _json(
                {
                    "ready": False,
                    "model_version": model.version,
                    "reason": f"cannot serve models:/{config.model_name}@{config.alias} "
                    f"(serving v{model.version}): {behind}",
                },
                503,
            )
        return _json({"ready": True, "model_version": model.version})

    @app.get(
        "/version",
        summary="The served model: name, version, alias, run, lineage",
        openapi_extra={"security": scoring_openapi()["security"]},
    )
    async def version(request: Request) -> Response:
        try:  # run ids, lineage tags and refused versions: as private as /predict
            service.check_token(request)
        except PayloadError as exc:
            return _json(exc.to_json(), 401, {"WWW-Authenticate": "Bearer"})
        model = service.holder.current
        if model is None:
            return _json(
                {
                    "error_code": "TEMPORARILY_UNAVAILABLE",
                    "message": f"no model loaded yet ({service.load_error or 'loading'})",
                },
                503,
            )
        return _json({**model.describe(), "follower": service.following()})

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    return app
