"""The export stage: `python -m stages.export` (entry and core in stage.py; the variants built in
onnx.py with the ONNX export and int8 quantization of stages/common/onnx_export.py, the
comparison with the float network in compare.py)."""
