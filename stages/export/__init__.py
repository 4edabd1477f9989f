"""The export stage: `python -m stages.export` (entry and core in stage.py; ONNX export and
int8 quantization in onnx.py, the comparison with the float network in compare.py)."""
