"""The validate stage: `python -m stages.validate` (entry and core in stage.py)."""
