"""Prefect orchestration of the DVC stage graph: ``pipeline`` (one run) and ``schedule``.

Flows only orchestrate: order, retries, logs, the summary artifact and the schedule. The
work lives in ``stages/``; the graph lives in ``dvc.yaml``.
"""
