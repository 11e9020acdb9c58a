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
    for _ in range(3):  # steady state: the pinned host allocator holds blocks for two forwards' tokens
        _read_first_of_two_forwards(engine, busy_ms=0)
    launch_waited, read_waited = _read_first_of_two_forwards(engine, busy_ms=500)
    assert not launch_waited, "launching the second forward waited for the GPU"
    assert not read_waited, "reading the first forward's tokens waited for the second forward"
    engine.close()


def _read_first_of_two_forwards(engine, busy_ms: float) -> tuple[bool, bool]:
    """Queues a prefill, keeps the GPU busy for `busy_ms`, queues a decode fed the prefill's
    token on the device and reads the prefill's token: (whether the decode's launch waited for
    the GPU, whether reading the first token waited for the decode)."""
    first = engine.launch([SequenceInput("r0", [5, 6, 7], 0, [0])])
    sleep_on_current_stream(busy_ms)
    second = engine.launch([SequenceInput("r0", [0], 3, [0], previous_token=True)])
    launch_waited = second.is_done()
    assert len(engine.finish(first).tokens) == 1
    read_waited = second.is_done()
    assert len(engine.finish(second).tokens) == 1
    return launch_waited, read_waited
