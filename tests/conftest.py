"""Session-wide tiny models and adapters, built once as real files (no hub access)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.model_factory import ARCHITECTURES, AdapterSpec, build_adapter, build_tiny_model  # noqa: E402

MIXED_ADAPTERS = {
    "a0": AdapterSpec(rank=8, alpha=16, target_modules=["q_proj", "v_proj"], seed=1),
    "a1": AdapterSpec(rank=16, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"], seed=2),
}


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def model_dirs(artifacts) -> dict[str, Path]:
    """One tiny float32 model per supported architecture."""
    return {arch: build_tiny_model(artifacts / arch, arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def mixed_adapter_dirs(artifacts, model_dirs) -> dict[str, dict[str, Path]]:
    """arch -> adapter name -> directory, for the two adapters of the mixed-batch tests."""
    return {
        arch: {name: build_adapter(model_dir, artifacts / f"{arch}-{name}", spec)
               for name, spec in MIXED_ADAPTERS.items()}
        for arch, model_dir in model_dirs.items()
    }
