"""The monitor -> retraining contract: the Prefect event ``flows/monitor.py`` emits when a
threshold is crossed, and the trigger the pipeline's deployments carry (``make schedule``'s and
the stack's), which starts a pipeline run with the event's reason as its ``reason`` parameter.
"""

from __future__ import annotations

from typing import Any

RETRAIN_EVENT = "pipeline.monitor.retrain"


def model_resource(model_name: str) -> dict[str, str]:
    """The event's resource: the registered model the monitor watched."""
    return {
        "prefect.resource.id": f"pipeline.model.{model_name}",
        "prefect.resource.name": model_name,
    }


def emit_retrain(model_name: str, reason: str, payload: dict[str, Any]) -> Any:
    """Emit the retraining event (``payload`` plus ``reason``); returns Prefect's Event, or None
    when no events client is configured."""
    from prefect.events import emit_event

    return emit_event(
        event=RETRAIN_EVENT,
        resource=model_resource(model_name),
        payload={**payload, "reason": reason},
    )


def retrain_trigger(model_name: str) -> Any:
    """The trigger for a pipeline deployment: one run per retraining event of ``model_name``."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name=f"retrain {model_name} when the monitor asks",
        expect={RETRAIN_EVENT},
        match={"prefect.resource.id": f"pipeline.model.{model_name}"},
        parameters={"reason": "{{ event.payload.reason }}"},
    )
