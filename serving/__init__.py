"""Serving: the champion model over HTTP, following the registry, and batch scoring.

``serving.model`` loads a model version and swaps it atomically; ``serving.payloads`` reads
MLflow scoring payloads and checks them against the signature; ``serving.app`` is the FastAPI
service (``python -m flows.serve``); ``serving.batch`` scores Parquet files
(``flows/batch_score.py``); ``serving.check`` is the register stage's pre-promotion check.
"""
