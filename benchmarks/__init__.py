"""Benchmarks of loraserve; run each from the repository root as `python -m benchmarks.<name>`.

`benchmarks.common` holds what they share; `benchmarks/results/` one JSON per recorded run
(docs/performance.md).
"""
