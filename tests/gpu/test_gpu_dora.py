"""DoRA on CUDA: scales computed on the load stream, the eager and CUDA-graph paths, against PEFT.

Run on a GPU machine: `python -m pytest -m gpu tests/gpu/test_gpu_dora.py`.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import DORA_ARCHS
from tests.driver import forward_paths
from tests.oracle import assert_batch_matches_peft
from tests.worker.test_dora import run_mixed_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("static", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", DORA_ARCHS)
def test_dora_and_lora_batch_on_cuda_matches_peft(arch, dtype, static, model_dirs, dora_adapter_dirs):
    adapters = dora_adapter_dirs[arch]
    engine, requests = run_mixed_batch(model_dirs[arch], adapters, static=static, device="cuda", dtype=dtype)
    paths = set(forward_paths(engine))
    assert ("eager" not in paths and engine.graph_runner.graphs_captured > 0) if static else paths == {"eager"}
    engine.close()
    assert_batch_matches_peft(model_dirs[arch], adapters, requests, dtype)
