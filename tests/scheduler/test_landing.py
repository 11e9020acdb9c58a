"""Admission before a load is reported: the copy's predicted end against the next forward's start."""

from __future__ import annotations

import pytest

from protos.loraserve.v1 import serving_pb2
from scheduler.core import SchedulerCore
from scheduler.landing import LoadClock, StepClock
from settings.config import SchedulerConfig
from tests.scheduler.fake_worker import FakeWorker, hello
from tests.scheduler.test_core import adapter_info, assert_idle, clock, submit  # noqa: F401 - fixture

STEP_S = 0.005
COPY_REPORTED_AFTER_STEPS = 3


def test_copies_queue_on_the_load_stream_and_the_bandwidth_follows_finished_ones():
    loads = LoadClock(bytes_per_s=1e9)
    loads.started("a", 10_000_000, now=1.0)
    loads.started("b", 20_000_000, now=1.001)
    assert loads.predicted_end("a") == pytest.approx(1.010)
    assert loads.predicted_end("b") == pytest.approx(1.030), "b's copy waits for a's"
    loads.finished("a", now=1.020)  # took 20 ms: half the guessed bandwidth
    assert loads.bytes_per_s == pytest.approx(1e9 + 0.3 * (0.5e9 - 1e9))
    assert loads.predicted_end("a") is None


def test_a_report_plans_the_copies_queued_behind_it_again_from_its_time():
    """The first guess errs long (1 GB/s for copies that run at 50): without planning again, eight
    prefetched 1.3 GB loads would put every later prediction ten seconds out."""
    loads = LoadClock(bytes_per_s=1e9)
    for index in range(8):
        loads.started(f"p{index}", 1_300_000_000, now=0.0)
    assert loads.predicted_end("p7") == pytest.approx(10.4)
    loads.finished("p0", now=0.03)
    bandwidth = loads.bytes_per_s
    assert loads.predicted_end("p1") == pytest.approx(0.03 + 1.3e9 / bandwidth)
    assert loads.predicted_end("p7") == pytest.approx(0.03 + 7 * 1.3e9 / bandwidth)
    for index in range(1, 8):
        loads.finished(f"p{index}", now=0.03 * (index + 1))
    loads.started("late", 1_300_000_000, now=1.0)  # the stream is idle: the copy starts now
    assert loads.predicted_end("late") == pytest.approx(1.0 + 1.3e9 / loads.bytes_per_s)


def test_the_step_period_is_learned_from_busy_spells_only():
    steps = StepClock()
    steps.result(1.000, still_in_flight=1)
    steps.result(1.010, still_in_flight=0)
    steps.result(5.000, still_in_flight=1)  # idle before: not a period
    assert steps.period_s == pytest.approx(0.010)
    assert steps.next_start(now=5.001, in_flight=1) == pytest.approx(5.010)
    assert steps.next_start(now=5.001, in_flight=0) == 5.001


def busy_server(clock, **config) -> FakeWorker:  # noqa: F811
    """A long base request decoding one step ahead, and adapter c in host memory, not in a slot."""
    core = SchedulerCore(SchedulerConfig(**config), hello(max_loras_per_batch=2, host_cache_bytes=16 << 20))
    worker = FakeWorker(core, one_ahead=True)
    for name in ("a", "b", "c"):
        worker.register(name, size=1_000_000)
        worker.load_steps[name] = COPY_REPORTED_AFTER_STEPS
    submit(worker, "base", "", max_new_tokens=60)
    for _ in range(2 * COPY_REPORTED_AFTER_STEPS):  # prefetching stages all three, loads a and b
        worker.step()
        clock.advance(STEP_S)
    assert adapter_info(worker, "c").state == serving_pb2.ADAPTER_STATE_HOST and not worker.loading
    return worker


@pytest.mark.parametrize(("bytes_per_s", "admit", "joins_before_the_report"), [
    (1e12, True, True),  # a 1 µs copy lands before the next forward starts
    (1e6, True, False),  # a 1 s copy would stall that forward: the request waits for the report
    (1e12, False, False),  # the default: the request waits for the report
])
def test_a_request_joins_the_first_forward_predicted_to_start_after_its_copy(clock, bytes_per_s, admit,  # noqa: F811
                                                                             joins_before_the_report):
    worker = busy_server(clock, admit_landing_loads=admit)
    worker.core._tier.load_clock.bytes_per_s = bytes_per_s
    submit(worker, "x", "c", max_new_tokens=2)
    sent_before = len(worker.batches)
    worker.step()
    assert "c" in worker.loading, "the copy is issued and not reported yet"
    joined = any(seq.request_id == "x" for batch in worker.batches[sent_before:] for seq in batch.sequences)
    assert joined == joins_before_the_report
    worker.run_until_idle()
    assert_idle(worker)
