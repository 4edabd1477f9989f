"""The ensemble stage: `python -m stages.ensemble` (entry and core in stage.py). Train's model
and extra members (more seeds, other families, the best tuning trials), trained on the train
split by train's own code in one process, fused into one model file on the val split only."""
