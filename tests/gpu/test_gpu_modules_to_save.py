"""modules_to_save of embed_tokens and lm_head on CUDA: the tables copied with layers 0 and last on
the load stream (one adapter landing as the batch starts), their steps eager beside CUDA-graph steps
of the other adapters, against PEFT.

Run on a GPU machine: `python -m pytest -m gpu tests/gpu/test_gpu_modules_to_save.py`.
"""

from __future__ import annotations

import pytest
import torch

from tests.driver import Driver, Request, forward_paths, make_engine, make_resident
from tests.oracle import assert_batch_matches_peft
from tests.worker.test_equivalence import prompt
from tests.worker.test_modules_to_save import MODELS, run_mixed_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("static", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_saved_modules_batch_on_cuda_matches_peft(model, dtype, static, mts_models, mts_adapters):
    """Every kind of adapter and the base model in one batch; steps with a table run eager."""
    adapters = mts_adapters[model]
    engine, requests = run_mixed_batch(mts_models[model], adapters, static=static, device="cuda", dtype=dtype)
    forwards = [event["args"] for event in engine.timeline.chrome_trace() if event.get("name") == "forward"]
    assert all(f["path"] == "eager" for f in forwards if set(f["adapters"]) - {"plain"}), forwards
    engine.close()
    assert_batch_matches_peft(mts_models[model], adapters, requests, dtype)


def test_steps_without_tables_replay_graphs_beside_a_resident_table(mts_models, mts_adapters):
    model_dir, adapters = mts_models["llama"], mts_adapters["llama"]
    engine = make_engine(model_dir, device="cuda", static_decode=True, saved_module_slots=1)
    engine.register_adapter("save-both", adapters["save-both"])
    engine.register_adapter("plain", adapters["plain"])
    make_resident(engine, "save-both", 0)
    make_resident(engine, "plain", 1)
    requests = [Request("base", prompt(80, 7), max_new_tokens=4),
                Request("plain", prompt(81, 5), adapter_slot=1, max_new_tokens=4)]
    Driver(engine).run(requests)
    assert "eager" not in forward_paths(engine) and engine.graph_runner.graphs_captured > 0
    engine.close()
    assert_batch_matches_peft(model_dir, {"plain": adapters["plain"]}, requests, "float32")
