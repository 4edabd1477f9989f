"""Benchmarks: each one a ratio against a baseline measured side by side in the same run.

``python -m bench.<name> --help``; results land in ``bench/results/<name>.json``.
"""
