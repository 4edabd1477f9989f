"""The train stage: `python -m stages.train` (entry and core in stage.py)."""
