"""The features stage: `python -m stages.features` (entry and core in stage.py)."""
