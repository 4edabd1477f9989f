"""The pre-promotion check: can the service load this version and answer with it, fast enough?

The register stage calls :func:`check_servable` before it moves the alias. It loads the
candidate exactly as the service does (:func:`serving.model.load_model`), sends the model's
own input example through the service's request path (JSON payload -> signature check ->
model -> JSON answer), checks the answer's rows and columns against the output signature, and
times single-row requests against ``register.max_latency_ms``.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

from model.artifacts import DEFAULT_KEY_ENV
from model.servable import PROBA_PREFIX
from serving.batcher import score_rows
from serving.model import LoadedModel, load_model
from serving.payloads import PayloadError, encode_predictions, encode_split_payload, parse_payload

LATENCY_REPEATS = 20  # single-row requests timed; the median is compared (robust to a hiccup)


@dataclass(frozen=True)
class ServingCheck:
    """What the check found: no problems = passed. ``latency_ms``: median single-row time."""

    problems: tuple[str, ...]
    latency_ms: float | None = None

    @property
    def passed(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        """One line for the promotion reason."""
        if self.passed:
            return (
                f"the service loads it and answers its input example "
                f"(median {self.latency_ms:.1f} ms per single-row request)"
            )
        return "serving check failed: " + "; ".join(self.problems)


def check_answer(
    records: list[dict[str, Any]], n_rows: int, output_columns: tuple[str, ...]
) -> list[str]:
    """Problems with an answer: row count, columns vs the output signature, probabilities."""
    problems = []
    if len(records) != n_rows:
        problems.append(f"answered {len(records)} rows for {n_rows}")
    columns = tuple(records[0]) if records else ()
    if output_columns and columns != tuple(output_columns):
        problems.append(
            f"answered columns {list(columns)}, the signature says {list(output_columns)}"
        )
    bad = sorted(
        {
            name
            for rec in records
            for name, value in rec.items()
            if name.startswith(PROBA_PREFIX)
            and not (isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0)
        }
    )
    if bad:
        problems.append(f"probabilities outside [0, 1] or not finite in {bad}")
    return problems


def answer(model: LoadedModel, body: bytes) -> tuple[list[dict[str, Any]], bytes]:
    """One request through the service's path, minus HTTP: records and the response body."""
    records = score_rows(model, parse_payload(body, model.spec))
    return records, encode_predictions(records, model.version)


def median_latency_ms(model: LoadedModel, body: bytes, repeats: int) -> float:
    """Median wall time of ``repeats`` requests with ``body`` (after one untimed call)."""
    answer(model, body)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        answer(model, body)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def check_servable(
    model_uri: str,
    max_latency_ms: float,
    variant: str = "pyfunc",
    repeats: int = LATENCY_REPEATS,
    key_env: str | None = DEFAULT_KEY_ENV,
) -> ServingCheck:
    """Load ``model_uri`` the way the service does and answer its input example.

    ``key_env`` names the env var of the signing key (params ``register.signing_key_env``),
    as the service is given it.

    Returns:
        The problems found (none = it may be promoted) and the median single-row latency.
        Never raises for a bad model: every failure is a problem in the result.
    """
    try:
        model = load_model(model_uri, variant, key_env)
    except Exception as exc:  # noqa: BLE001 - any load failure blocks promotion
        return ServingCheck((f"the service cannot load it: {exc}",))
    example = model.input_example
    if example is None or example.empty:
        return ServingCheck(("it has no input example to send",))
    example = example.reset_index(drop=True)
    try:
        records, _ = answer(model, encode_split_payload(example))
        problems = check_answer(records, len(example), model.output_columns)
        latency = median_latency_ms(model, encode_split_payload(example.head(1)), repeats)
    except PayloadError as exc:
        return ServingCheck((f"its own input example is refused: {exc.message}",))
    except Exception as exc:  # noqa: BLE001 - the model's own code failed
        return ServingCheck((f"scoring its input example failed: {type(exc).__name__}: {exc}",))
    if not latency <= max_latency_ms:
        problems.append(
            f"median latency {latency:.1f} ms over {repeats} single-row requests "
            f"is above register.max_latency_ms {max_latency_ms:g}"
        )
    return ServingCheck(tuple(problems), latency)
