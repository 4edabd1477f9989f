"""The evaluate stage: `python -m stages.evaluate` (entry and core in stage.py)."""
