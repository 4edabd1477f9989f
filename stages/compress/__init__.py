"""The compress stage: smaller, faster copies of the judged model (train's, or the ensemble), each
scored against it on the test split and judged by the compression gate.

`python -m stages.compress` (entry and core in stage.py). The methods: structured pruning and
fine-tuning (prune.py), int8 ONNX (quantize.py), a distilled student (distill.py), all trained
by one small loop (fit.py) on the splits of data.py; measure.py scores and times a model, and
gate.py judges and chooses.
"""
