"""The ingest stage: `python -m stages.ingest` (entry and core in stage.py)."""
