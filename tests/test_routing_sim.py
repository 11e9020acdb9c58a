"""benchmarks/routing_sim.py at a tiny size: the real scheduler cores behind each routing policy."""

from __future__ import annotations

from collections import defaultdict

from benchmarks.slot_policy_sim import LARGE
from tests.benchmark_scripts import load_benchmark

routing_sim = load_benchmark("routing_sim")
SHAPE = routing_sim.Shape(input_len=128, output_len=32)


def run(policy: str, replicas: int = 4, rate: float = 240.0, count: int = 600):
    items = routing_sim.workload("zipf", count, rate, SHAPE, seed=3)
    return routing_sim.simulate(replicas, policy, LARGE, items, measure_from=count // 4)


def test_residency_aware_routing_finds_adapters_on_the_gpu_more_often_than_round_robin():
    residency = routing_sim.summarize(run(routing_sim.RESIDENCY_AWARE), slo_ms=1000.0)
    round_robin = routing_sim.summarize(run("round-robin"), slo_ms=1000.0)
    assert residency["gpu_hit_rate"] > round_robin["gpu_hit_rate"] + 0.1
    assert residency["loads_per_request"] < round_robin["loads_per_request"]


def test_every_request_finishes_and_the_all_resident_reference_never_copies():
    reference = run(routing_sim.ALL_RESIDENT)
    assert len(reference.outcomes) == 450 and reference.loads == 0
    assert all(o.gpu_hit and o.finished_ms >= o.first_token_ms > o.arrival_ms for o in reference.outcomes)


def test_consistent_hashing_keeps_each_adapter_on_one_replica():
    items = routing_sim.workload("uniform", 200, 240.0, SHAPE, seed=3)
    run_ = routing_sim.simulate(4, "consistent-hash", LARGE, items)
    replicas_of = defaultdict(set)
    for item, outcome in zip(items, run_.outcomes):
        replicas_of[item.adapter].add(outcome.replica)
    assert all(len(replicas) == 1 for replicas in replicas_of.values())
    assert len({outcome.replica for outcome in run_.outcomes}) == 4
