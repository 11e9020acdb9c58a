"""Steps queued one ahead on the GPU: the next forward is launched before the previous one's
tokens are read, fed them on the device, through CUDA graphs and the eager path.

Run on a GPU machine: `python -m pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import pytest
import torch

from tests.driver import make_engine
from tests.gpu.test_gpu_kernels import sleep_on_current_stream
from tests.worker.test_pipelined_steps import generated_both_ways
from worker.batch import SequenceInput

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


def test_reading_a_forwards_tokens_does_not_wait_for_the_forward_queued_after_it(model_dirs):
    engine = make_engine(model_dirs["llama"], device="cuda")
    first = engine.launch([SequenceInput("r0", [5, 6, 7], 0, [0])])
    sleep_on_current_stream(500)  # the GPU is busy for half a second before the next forward
    second = engine.launch([SequenceInput("r0", [0], 3, [0], previous_token=True)])
    assert len(engine.finish(first).tokens) == 1
    assert not second.is_done(), "reading the first forward's tokens waited for the second forward"
    assert len(engine.finish(second).tokens) == 1
    engine.close()
