"""benchmarks/slot_policy_sim.py's timed worker: when a copy starts, and a forward that waits for one."""

from __future__ import annotations

import pytest

from benchmarks.slot_policy_sim import (LAYERS, TTFT_PERCENTILES, SimulatedClock, StepModel, TimedWorker, against_off,
                                        worker_hello)
from protos.loraserve.v1 import internal_pb2 as pb
from scheduler.core import SchedulerCore
from settings.config import SchedulerConfig

STEPS = StepModel(decode_ms=10.0, decode_ms_per_adapter=0.0, mixed_ms=10.0, mixed_ms_per_token=0.0)


def worker_copying_into_slot_0(loads_wait_for_forward: bool) -> TimedWorker:
    """At 20 ms: the forward in flight ends at 50 ms, the last forward reading slot 0 at 30 ms,
    and adapter a is told to load into slot 0 (a 15 ms copy)."""
    clock = SimulatedClock(ms=20.0)
    worker = TimedWorker(SchedulerCore(SchedulerConfig(), worker_hello()), clock=clock, steps=STEPS, copy_ms=15.0,
                         loads_wait_for_forward=loads_wait_for_forward)
    worker.ends.append(50.0)
    worker.last_end, worker.slot_read_until = 50.0, {0: 30.0}
    worker._execute([pb.WorkerCommand(load_slot=pb.LoadSlot(name="a", slot=0))])
    return worker


@pytest.mark.parametrize(("loads_wait_for_forward", "copy_done"), [(True, 65.0), (False, 45.0)])
def test_a_copy_waits_for_the_forward_in_flight_or_only_for_its_slots_readers(loads_wait_for_forward, copy_done):
    worker = worker_copying_into_slot_0(loads_wait_for_forward)
    assert worker.copy_done_at["a"] == copy_done
    assert worker.tick_loads().loaded == []  # not landed at 20 ms
    worker.clock.ms = copy_done
    assert [event.name for event in worker.tick_loads().loaded] == ["a"]


def test_a_forward_carrying_a_landing_adapter_ends_a_layer_after_its_copy():
    worker = worker_copying_into_slot_0(loads_wait_for_forward=True)
    batch = pb.Forward(sequences=[pb.SequenceInput(request_id="r", token_ids=[1], adapter_slot=0, sample=True)])
    worker.sent(batch)
    assert worker.ends[-1] == pytest.approx(65.0 + 10.0 / LAYERS)  # not 50 + 10: the copy ends later
    assert worker.slot_read_until[0] == worker.ends[-1]


def test_a_forward_sent_after_a_blocking_load_starts_after_its_copy():
    worker = worker_copying_into_slot_0(loads_wait_for_forward=False)
    worker._execute([pb.WorkerCommand(load_slot=pb.LoadSlot(name="b", slot=1, blocking=True))])
    assert "b" not in worker.loading  # reported done at once, as the scheduler counts a blocking load
    worker.sent(pb.Forward(sequences=[pb.SequenceInput(request_id="r", token_ids=[1], adapter_slot=1, sample=True)]))
    assert worker.ends[-1] == 50.0 + 15.0 + 10.0  # after the forward in flight, then the copy


def test_overlap_is_compared_with_off_seed_by_seed_at_each_percentile():
    def runs(*ttfts_by_seed):
        return [{"ttft_percentiles_ms": dict.fromkeys(TTFT_PERCENTILES, ttft)} for ttft in ttfts_by_seed]

    same = ("large", "shortest-first", 3.0, 1.5, 1, "loads-beside", 0.9)
    compared = against_off({(*same, "off", "off"): runs(50.0, 60.0, 70.0),
                            (*same, "on", "on"): runs(40.0, 65.0, 80.0),
                            (*same[:-2], "answers-first", 0.9, "on", "on"): runs(1.0, 1.0, 1.0),
                            (*same[:-1], 1.0, "on", "on"): runs(1.0, 1.0, 1.0)})
    assert list(compared) == ["large shortest-first drain_after_s=3 pause_tokens_ratio=1.5 max_pauses_per_request=1"
                              " landing_admission=on worker=loads-beside step_scale=0.9"]
    (percentiles,) = compared.values()
    assert percentiles[50] == {"later_in_seeds": 2, "median_difference_ms": 5.0}
    assert set(percentiles) == set(TTFT_PERCENTILES)
