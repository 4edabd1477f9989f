"""The register stage: `python -m stages.register` (entry and core in stage.py)."""
