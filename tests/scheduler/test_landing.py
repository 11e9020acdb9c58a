"""Admission before a load is reported: the copy's predicted end against the next forward's start."""

from __future__ import annotations

import pytest

from protos.loraserve.v1 import serving_pb2
from scheduler.core import SchedulerCore
from scheduler.landing import LoadClock, StepClock, WeightedLine
from settings.config import SchedulerConfig
from tests.scheduler.fake_worker import FakeWorker, hello
from tests.scheduler.test_core import adapter_info, assert_idle, clock, submit  # noqa: F401 - fixture

STEP_S = 0.005
COPY_REPORTED_AFTER_STEPS = 3


def test_copies_queue_on_the_load_stream_and_the_bandwidth_follows_finished_ones():
    loads = LoadClock(bytes_per_s=1e9)
    loads.started("a", 10_000_000, now=1.0)
    loads.started("b", 20_000_000, now=1.001)
    assert loads.predicted("a").end == pytest.approx(1.010)
    assert loads.predicted("b").end == pytest.approx(1.030), "b's copy waits for a's"
    loads.finished("a", now=1.020)  # took 20 ms: half the guessed bandwidth
    assert loads.bytes_per_s == pytest.approx(1e9 + 0.3 * (0.5e9 - 1e9))
    assert loads.predicted("a") is None


def test_the_bandwidth_follows_the_copys_own_time_where_the_worker_timed_it():
    """A report comes with the next forward's result, up to a step after the copy: timed by its
    arrival, a 26 ms copy heard 9 ms late would put the next copies' ends a third too late."""
    loads = LoadClock(bytes_per_s=50e9)
    loads.started("a", 1_300_000_000, now=1.0)
    loads.finished("a", now=1.035, copy_s=0.026)
    assert loads.bytes_per_s == pytest.approx(50e9 + 0.3 * (1.3e9 / 0.026 - 50e9))


def test_a_report_plans_the_copies_queued_behind_it_again_from_its_time():
    """The first guess errs long (1 GB/s for copies that run at 50): without planning again, eight
    prefetched 1.3 GB loads would put every later prediction ten seconds out."""
    loads = LoadClock(bytes_per_s=1e9)
    for index in range(8):
        loads.started(f"p{index}", 1_300_000_000, now=0.0)
    assert loads.predicted("p7").end == pytest.approx(10.4)
    loads.finished("p0", now=0.03)
    bandwidth = loads.bytes_per_s
    assert loads.predicted("p1").end == pytest.approx(0.03 + 1.3e9 / bandwidth)
    assert loads.predicted("p7").end == pytest.approx(0.03 + 7 * 1.3e9 / bandwidth)
    for index in range(1, 8):
        loads.finished(f"p{index}", now=0.03 * (index + 1))
    loads.started("late", 1_300_000_000, now=1.0)  # the stream is idle: the copy starts now
    assert loads.predicted("late").end == pytest.approx(1.0 + 1.3e9 / loads.bytes_per_s)


def test_step_times_are_learned_from_busy_spells_only():
    steps = StepClock()
    steps.result(1.000, still_in_flight=1, extra_tokens=0)
    steps.result(1.010, still_in_flight=0, extra_tokens=0)
    steps.result(5.000, still_in_flight=1, extra_tokens=0)  # idle before: not a step
    assert steps.step_s == pytest.approx(0.010)
    assert steps.next_start(now=5.001, in_flight=[0]) == pytest.approx(5.010)
    assert steps.next_start(now=5.001, in_flight=[]) == 5.001


def step_clock(**fields) -> StepClock:
    """A 10 ms step, and a forward carrying a prompt 10 ms plus 50 us a token beyond one a sequence."""
    steps = StepClock(step_s=0.010, **fields)
    for extra_tokens in (100, 300):
        steps.prompt_forwards.add(extra_tokens, 0.010 + 50e-6 * extra_tokens)
    return steps


def test_a_forward_carrying_a_prompt_is_predicted_by_a_line_over_its_tokens():
    """Its fixed part (prompt forwards cost more than a step besides their tokens) and its slope."""
    steps = StepClock(step_s=0.010)
    steps.result(1.000, still_in_flight=1, extra_tokens=0)
    steps.result(1.022, still_in_flight=1, extra_tokens=100)  # 12 ms over a step for 100 tokens
    assert steps.duration(100) == pytest.approx(0.022), "one point: its time"
    steps.result(1.054, still_in_flight=1, extra_tokens=300)  # 32 ms: 10 ms more for 200 more tokens
    assert steps.duration(200) == pytest.approx(0.027)
    assert steps.duration(0) == pytest.approx(0.010), "a decode step keeps its own time"
    assert steps.next_start(now=1.055, in_flight=[200, 0]) == pytest.approx(1.054 + 0.027 + 0.010)


def test_the_line_follows_the_newer_forwards():
    line = WeightedLine()
    for _ in range(20):
        line.add(100, 0.020)
        line.add(300, 0.040)
    for _ in range(20):
        line.add(100, 0.030)
        line.add(300, 0.050)
    assert line.at(200) == pytest.approx(0.040, abs=0.001)


@pytest.mark.parametrize(("copy_end", "copy_s", "prompt_tokens", "in_time"), [
    (1.020, 0.030, 1, True),  # lands as the forward starts
    (1.027, 0.030, 1, True),  # lands 7 ms into a 10 ms step: the step's last layers still meet it
    (1.029, 0.030, 1, False),  # would stall the step's last layers
    (1.034, 0.030, 201, True),  # a 20 ms forward (a prompt) may start 15 ms before a 30 ms copy ends
    (1.036, 0.030, 201, False),
    (1.025, 0.001, 201, True),  # a 1 ms copy: the forward's first layer waits for it, half a step at most
    (1.028, 0.004, 201, False),  # a 4 ms copy: the forward's first layer would wait for most of it
])
def test_a_forward_may_start_before_a_copy_ends_by_a_share_of_the_shorter_of_the_two(copy_end, copy_s,
                                                                                    prompt_tokens, in_time):
    steps = step_clock(last_result_at=1.010)
    assert steps.lands_in_time(copy_end, copy_s, now=1.011, in_flight=[0], extra_tokens=prompt_tokens - 1) == in_time


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


def polls_left_when_x_joins(worker: FakeWorker, clock) -> int | None:  # noqa: F811
    """Runs request x on adapter c to its end; c's copy's polls before its report when the first
    batch carrying x was sent, None if that was after the report."""
    polls_left_when_sent = []
    worker.sent = lambda batch: polls_left_when_sent.extend(
        worker.loading["c"][1] + 1 if "c" in worker.loading else None
        for seq in batch.sequences if seq.request_id == "x")
    submit(worker, "x", "c", max_new_tokens=2)
    while "x" in worker.core.requests:
        worker.step()
        clock.advance(STEP_S)
    return polls_left_when_sent[0]


PLANNED_AT_FAKE_PACE = 1_000_000 / (COPY_REPORTED_AFTER_STEPS * STEP_S)  # bytes/s: the fake copy's pace


@pytest.mark.parametrize(("copy_polls", "bytes_per_s", "admit", "joins_polls_before_the_report"), [
    (COPY_REPORTED_AFTER_STEPS, PLANNED_AT_FAKE_PACE, True, range(1, COPY_REPORTED_AFTER_STEPS + 1)),
    (20, PLANNED_AT_FAKE_PACE, True, range(1, 3)),  # far slower than planned: joins near its end, as its pace shows
    (20, 1e12, True, range(1, 3)),  # planned at 1 us: the same
    (COPY_REPORTED_AFTER_STEPS, PLANNED_AT_FAKE_PACE, False, [None]),  # the default: after the report
])
def test_a_request_joins_a_forward_near_its_copys_end_at_the_pace_the_worker_reports(  # noqa: F811
        clock, copy_polls, bytes_per_s, admit, joins_polls_before_the_report):
    worker = busy_server(clock, admit_landing_loads=admit)
    worker.load_steps["c"] = copy_polls
    worker.core._tier.load_clock.bytes_per_s = bytes_per_s
    assert polls_left_when_x_joins(worker, clock) in joins_polls_before_the_report
    worker.run_until_idle()
    assert_idle(worker)


def test_a_copys_end_is_projected_from_the_pace_a_report_since_its_start_shows():
    loads = LoadClock(bytes_per_s=1e9)
    loads.started("a", 30_000_000, now=1.0)  # planned 1.000 to 1.030
    copy = loads.predicted("a")
    assert copy.projected_end() is None, "no report yet"
    loads.progress("a", landed=0.5, now=1.0)
    assert copy.projected_end() is None, "a report from before the copy's start says nothing of its pace"
    loads.progress("a", landed=0.0, now=1.010)
    assert copy.projected_end() is None, "nothing landed: no pace"
    loads.progress("a", landed=0.25, now=1.020)  # a quarter in 20 ms: 80 ms in all
    assert copy.projected_end() == pytest.approx(1.080)


def test_before_a_report_only_an_adapter_whose_last_copy_kept_the_pace_is_trusted_to_its_plan():
    loads = LoadClock(bytes_per_s=1e9)
    loads.started("a", 2_000_000, now=1.0)
    assert loads.landing("a", forward_start=1.0) is None, "never timed: nothing says it is not far slower"
    loads.finished("a", now=1.004, copy_s=0.002)  # at the learned pace
    loads.started("a", 2_000_000, now=2.0)
    assert loads.landing("a", forward_start=1.9) == pytest.approx((2.002, 0.002))
    assert loads.landing("a", forward_start=2.005) == pytest.approx((2.007, 0.002)), \
        "a copy into a slot still read waits for the forwards in flight"
    loads.progress("a", landed=0.25, now=2.004)  # a report since its start: its pace rules
    assert loads.landing("a", forward_start=2.005) == pytest.approx((2.016, 0.016))
    loads.finished("a", now=2.017, copy_s=0.016)  # an eighth of the learned pace
    loads.started("a", 2_000_000, now=3.0)
    assert loads.landing("a", forward_start=3.0) is None
    loads.finished("a", now=3.003, copy_s=0.002)
    loads.started("a", 2_000_000, now=4.0)
    loads.forget("a")  # failed
    loads.started("a", 2_000_000, now=5.0)
    assert loads.landing("a", forward_start=5.0) is None


@pytest.mark.parametrize(("previous_copy_s", "trusted"), [(0.001, True), (0.010, False)])
def test_an_adapter_whose_last_copy_kept_the_pace_joins_the_first_forward_a_short_copy_meets(  # noqa: F811
        clock, previous_copy_s, trusted):
    """A short copy into a slot that the forward in flight reads starts as the next forward does, and
    no report of its pace can come before that forward is sent: waiting for one costs a step."""
    worker = busy_server(clock, admit_landing_loads=True)
    loads = worker.core._tier.load_clock
    loads.started("c", 1_000_000, now=0.0)  # c's last copy, 1 MB in previous_copy_s
    loads.finished("c", now=previous_copy_s, copy_s=previous_copy_s)
    loads.bytes_per_s = 1e9  # plans c's copy at 1 ms: a fifth of a step
    first_forward = COPY_REPORTED_AFTER_STEPS + 1  # sent before any poll of the copy
    assert (polls_left_when_x_joins(worker, clock) == first_forward) == trusted
    worker.run_until_idle()
    assert_idle(worker)
