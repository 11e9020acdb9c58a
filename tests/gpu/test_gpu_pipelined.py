"""Steps queued one ahead on the GPU: the next forward is launched before the previous one's
tokens are read, fed them on the device, through CUDA graphs and the eager path.

Run on a GPU machine: `python -m pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import pytest
import torch

from tests.worker.test_pipelined_steps import generated_both_ways

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("static", [True, False], ids=["cuda-graphs", "eager"])
def test_steps_queued_one_ahead_on_the_gpu_generate_what_sequential_steps_do(model_dirs, mixed_adapter_dirs,
                                                                            static):
    outputs = generated_both_ways(model_dirs["llama"], mixed_adapter_dirs["llama"], device="cuda",
                                  static_decode=static)
    assert outputs[True] == outputs[False]
