"""benchmarks/step_times.py's rounds, on a tiny CPU engine standing in for the 8B one."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.benchmark_scripts import load_benchmark
from tests.driver import make_engine, make_resident
from worker.batch import NO_ADAPTER


@pytest.mark.parametrize("fold", [False, True])
def test_every_step_is_timed_in_every_round(fold, model_dirs, mixed_adapter_dirs, tmp_path, monkeypatch):
    step_times = load_benchmark("step_times")
    adapter = next(iter(mixed_adapter_dirs["llama"].values()))

    def tiny_engine(rank: int, adapters: int, lora_fold: bool):
        engine = make_engine(model_dirs["llama"], page_size=16, num_kv_pages=64, max_loras_per_batch=8,
                             lora_fold=lora_fold, max_lora_rank=16 if lora_fold else 32)
        for slot in range(adapters):
            engine.register_adapter(f"a{slot}", adapter)
            make_resident(engine, f"a{slot}", slot)
        return engine

    out = tmp_path / "step-times.json"
    monkeypatch.setattr(step_times, "build_engine", tiny_engine)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(sys, "argv", ["step_times", "--prefill", "12", "--context", "20", "--rounds", "3",
                                      "--steps-per-round", "2", "--out", str(out)] + ["--lora-fold"] * fold)
    step_times.main()
    record = json.loads(out.read_text())
    assert record["lora_fold"] is fold
    assert set(record["median_ms"]) == {"mixed, 8 adapters", "mixed, no adapters", "mixed, the decodes' adapters only",
                                        "mixed, the prompt's adapter only", "decode, batch 9 over 8 adapters"}
    assert all(len(rounds) == 3 and min(rounds) > 0 for rounds in record["rounds_ms"].values())
    medians = record["median_ms"]
    assert record["mixed_lora_overhead"] == medians["mixed, 8 adapters"] / medians["mixed, no adapters"] - 1


def slots(step) -> list[int]:
    return [seq.adapter_slot for seq in step]


def test_a_breakdown_step_gives_only_the_decodes_or_only_the_prompt_an_adapter():
    step_batch = load_benchmark("profile_decode").step_batch
    assert slots(step_batch(3, 8, 20, 12)) == [0, 1, 2, 0]
    assert slots(step_batch(3, 8, 20, 12, adapted_prompt=False)) == [0, 1, 2, NO_ADAPTER]
    assert slots(step_batch(3, 8, 20, 12, adapted_decodes=False)) == [NO_ADAPTER] * 3 + [0]
    assert slots(step_batch(3, 0, 20, 12)) == [NO_ADAPTER] * 4
