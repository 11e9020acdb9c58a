"""Step inputs reach the GPU through a kernel that reads pinned memory (worker.host_upload),
so a forward launched after an adapter load never queues behind its copies on the copy engine.

Run on a GPU machine: `python -m pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.driver import make_engine, make_resident
from worker.batch import SequenceInput
from worker.host_upload import mapped_bytes, upload

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
BALLAST_BYTES = 512 << 20  # ~10 ms more of the copy engine after each layer's copies


@pytest.mark.parametrize("dtype,values", [
    (torch.long, list(range(-7, 1000)) + [2**62]),
    (torch.int32, [3, -1, 0, 2**31 - 1]),
    (torch.bool, [True, False, True]),
    (torch.long, [[0, 5], [9, -2]]),
    (torch.long, []),
    (torch.long, np.array([[0, 5], [9, -2]])),  # numpy, as `worker.step_inputs` builds them
    (torch.long, np.arange(9)[::2]),
    (torch.bool, np.array([True, False, True])),
    (torch.long, np.zeros(0, dtype=np.int64)),
])
def test_upload_gives_the_host_values(dtype, values):
    out = upload(values, dtype, torch.device("cuda"))
    assert out.is_cuda and out.dtype == dtype
    assert torch.equal(out.cpu(), torch.tensor(values, dtype=dtype))


def test_only_pinned_memory_can_be_read_by_a_kernel():
    with pytest.raises(ValueError, match="pinned"):
        mapped_bytes(torch.zeros(4))


@pytest.mark.parametrize("static", [True, False], ids=["graphs", "eager"])
def test_a_forward_launched_after_a_load_does_not_wait_for_its_copies(model_dirs, mixed_adapter_dirs, static):
    engine = make_engine(model_dirs["llama"], device="cuda", static_decode=static)
    (resident, resident_path), (late, late_path) = mixed_adapter_dirs["llama"].items()
    engine.register_adapter(resident, resident_path)
    make_resident(engine, resident, 2)
    engine.register_adapter(late, late_path)
    engine.stage_adapter(late)
    engine.wait_staged(late)
    if static:
        engine.graph_runner.capture_all()
    request = SequenceInput("r", list(range(3, 12)), 0, [0, 1, 2], adapter_slot=2)
    engine.forward([request])  # warm-up: compiles and first pinned allocations
    ballast = torch.empty(BALLAST_BYTES, dtype=torch.uint8, pin_memory=True)
    sink = torch.empty_like(ballast, device="cuda")
    engine.copier.hook = lambda name, slot, layer: sink.copy_(ballast, non_blocking=True)
    engine.load_adapter(late, 0)
    job = engine.pending[0]
    engine.finish(engine.launch([request]))  # reads slot 2 only
    assert job.layer_queued[-1].wait(timeout=30), "the copier queued the load"
    assert not engine.copier.layer_copied(job, -1), "the forward finished only after the load's copies"
    engine.copier.wait(job)
    engine.close()
