"""benchmarks/tp_lora_sharding.py at a tiny size: two gloo ranks, both shardings match the unsharded delta."""

from __future__ import annotations

from tests.benchmark_scripts import load_benchmark

tp_lora_sharding = load_benchmark("tp_lora_sharding")


def test_both_shardings_agree_with_the_reference_and_are_timed():
    sweep = tp_lora_sharding.Sweep(hidden=64, out_features=64, ranks=(4,), tokens=(2,),
                                   iterations=2, warmup=0)
    [row] = tp_lora_sharding.measure(2, sweep)  # measure raises if rank 0's assert_close fails
    assert row["verified"] and (row["N"], row["r"], row["T"]) == (2, 4, 2)
    assert row["a_ms"] > 0 and row["b_ms"] > 0
    assert row["bytes_per_rank"]["a"] == {"A": 4 * 64 * 4, "B": 32 * 4 * 4}
    assert row["bytes_per_rank"]["b"] == {"A": 2 * 64 * 4, "B": 32 * 4 * 4}
