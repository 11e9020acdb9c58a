"""A script of the `benchmarks` package as a module, for its unit tests."""

from __future__ import annotations

import importlib
from types import ModuleType


def load_benchmark(name: str) -> ModuleType:
    return importlib.import_module(f"benchmarks.{name}")
