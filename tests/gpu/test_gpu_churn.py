"""Overlap on, on CUDA: more adapters than slots, loads landing while batches run, every
generated token consistent with an all-resident reference (teacher-forced), fp32 and bf16.

Run on a GPU machine: `python -m pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.driver import Driver, Request, make_engine, make_resident
from tests.model_factory import AdapterSpec, build_adapter
from worker.batch import SequenceInput

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPECS = [AdapterSpec(rank=r, alpha=2 * r, target_modules=m, seed=40 + i) for i, (r, m) in enumerate(
    [(4, ["q_proj", "v_proj"]), (16, ALL_MODULES), (8, ["o_proj", "down_proj"]), (32, ["gate_proj", "up_proj"]),
     (2, ALL_MODULES), (12, ["q_proj", "k_proj"])])]
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.08}


@pytest.fixture(scope="module")
def adapters(artifacts, model_dirs):
    return {f"g{i}": build_adapter(model_dirs["llama3"], artifacts / f"gpu-churn-{i}", spec)
            for i, spec in enumerate(SPECS)}


def reference_logits(engine, slots: dict[str, int], request: Request, adapter: str) -> torch.Tensor:
    """All-resident engine, the whole fed sequence in one forward (teacher-forced)."""
    fed = request.tokens[:-1]
    pages = list(range(-(-len(fed) // engine.config.page_size)))
    output = engine.forward([SequenceInput("ref", fed, 0, pages, adapter_slot=slots[adapter])],
                            return_logits=True)
    return output.logits["ref"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_churn_on_cuda_is_consistent_with_all_resident(dtype, model_dirs, adapters):
    model_dir = model_dirs["llama3"]
    rng = random.Random(5)
    names = list(adapters)
    work = [(f"r{i}", rng.choice(names), torch.randint(3, 200, (rng.randint(3, 20),),
                                                        generator=torch.Generator().manual_seed(i)).tolist(),
             rng.randint(2, 8)) for i in range(24)]

    engine = make_engine(model_dir, device="cuda", dtype=dtype, max_loras_per_batch=2, max_loaded_loras=6)
    engine.copier.hook = lambda name, slot, layer: torch.cuda._sleep(2_000_000)  # ~1 ms per layer
    for name, path in adapters.items():
        engine.register_adapter(name, path)
        engine.stage_adapter(name)
        engine.wait_staged(name)
    driver = Driver(engine, chunk=6)
    waiting = [Request(rid, p, max_new_tokens=n) for rid, _, p, n in work]
    adapter_of = {rid: a for rid, a, _, _ in work}
    running: list[Request] = []
    finished: list[Request] = []
    landing_batches = 0
    while waiting or running:
        engine.poll()
        for request in list(waiting):
            slot = engine.slot_of(adapter_of[request.request_id])
            if slot is None:
                busy = {r.adapter_slot for r in running} | set(engine.pending)
                free = [s for s in range(engine.slots.num_slots) if s not in busy]
                if not free:
                    continue
                slot = free[0]
                engine.load_adapter(adapter_of[request.request_id], slot)
            request.adapter_slot = slot
            waiting.remove(request)
            running.append(request)
        landing_batches += any(r.adapter_slot in engine.pending for r in running)
        driver.step(running)
        finished += [r for r in running if r.finished]
        running = [r for r in running if not r.finished]
    assert landing_batches > 0, "some batches should run while their adapter is still being copied"

    reference = make_engine(model_dir, device="cuda", dtype=dtype, max_loras_per_batch=len(adapters))
    slots = {}
    for slot, (name, path) in enumerate(adapters.items()):
        reference.register_adapter(name, path)
        make_resident(reference, name, slot)
        slots[name] = slot
    atol = TOLERANCE[dtype]
    for request in finished:
        expected = reference_logits(reference, slots, request, adapter_of[request.request_id])
        torch.testing.assert_close(request.all_logits(), expected, atol=atol, rtol=0.05 if dtype != "float32" else 0)
        for position, token in enumerate(request.generated):
            row = expected[len(request.prompt) - 1 + position]
            assert row[token] >= row.max() - atol, f"{request.request_id} token {position}"
    engine.close()
    reference.close()
