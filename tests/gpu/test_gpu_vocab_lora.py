"""LoRA on embed_tokens and lm_head on CUDA: copies with layers 0 and last on the load stream, the
eager and CUDA-graph paths (the embedding inside the graph, the LM head after it), against PEFT.

Run on a GPU machine: `python -m pytest -m gpu tests/gpu/test_gpu_vocab_lora.py`.
"""

from __future__ import annotations

import pytest
import torch

from tests.driver import Driver, Request, forward_paths, make_engine, make_resident
from tests.conftest import VOCAB_MODELS
from tests.oracle import assert_batch_matches_peft
from tests.worker.test_equivalence import prompt
from tests.worker.test_vocab_lora import run_mixed_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("static", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("model", sorted(VOCAB_MODELS))
def test_vocab_lora_batch_on_cuda_matches_peft(model, dtype, static, vocab_models, vocab_adapters):
    """Every kind of adapter and the base model in one batch, one adapter landing as it starts."""
    adapters = vocab_adapters[model]
    engine, requests = run_mixed_batch(vocab_models[model], adapters, static=static, device="cuda", dtype=dtype)
    paths = set(forward_paths(engine))
    if static:
        runner = engine.graph_runner
        assert "eager" not in paths and runner.layered_graphs_captured > 0
        assert any(variant.embedding for _, variant in runner._graphs), runner._graphs.keys()
    else:
        assert paths == {"eager"}
    engine.close()
    assert_batch_matches_peft(vocab_models[model], adapters, requests, dtype)


def test_steps_without_vocab_adapters_replay_the_plain_graphs(vocab_models, vocab_adapters):
    """The embedding's variant is captured only when a step meets an embedding adapter."""
    model_dir, adapters = vocab_models["llama"], vocab_adapters["llama"]
    engine = make_engine(model_dir, device="cuda", static_decode=True)
    engine.register_adapter("plain", adapters["plain"])
    engine.register_adapter("head", adapters["head"])
    make_resident(engine, "plain", 0)
    make_resident(engine, "head", 1)  # the LM head's LoRA runs after the graph
    requests = [Request("base", prompt(80, 7), max_new_tokens=4),
                Request("plain", prompt(81, 5), adapter_slot=0, max_new_tokens=4),
                Request("head", prompt(82, 6), adapter_slot=1, max_new_tokens=4)]
    Driver(engine).run(requests)
    runner = engine.graph_runner
    assert runner.graphs_captured > 0
    assert not any(variant.embedding for _, variant in (*runner._graphs, *runner._layered))
    engine.close()
    assert_batch_matches_peft(model_dir, {name: adapters[name] for name in ("plain", "head")}, requests, "float32")
