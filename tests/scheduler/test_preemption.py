"""Slot preemption: a short request pauses a long one alone on its slot; the paused request
keeps its KV pages and resumes with the tokens it would have produced."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import pytest

from protos.loraserve.v1 import internal_pb2 as pb
from scheduler.core import SchedulerCore
from scheduler.requests import Phase, Request
from settings.config import SchedulerConfig
from tests.scheduler.fake_worker import FakeWorker, hello, token_for
from tests.scheduler.test_core import assert_idle, finished, submit, tokens_of

PROMPT_LEN = 5


def make(adapters: str = "abc", slots: int = 2, **config) -> FakeWorker:
    """Steps sent one ahead, as the server sends them."""
    settings = dict(prefetch=False, drain_after_s=60.0, pause_tokens_ratio=4.0) | config
    core = SchedulerCore(SchedulerConfig(**settings), hello(num_kv_pages=256, max_loras_per_batch=slots))
    worker = FakeWorker(core, one_ahead=True)
    for name in adapters:
        worker.register(name)
    return worker


def expected_tokens(request_id: str, count: int) -> list[int]:
    return [token_for(request_id, p) for p in range(PROMPT_LEN, PROMPT_LEN + count)]


def sequences_of(batch: pb.Forward, request: Request) -> list[pb.ForwardSequence]:
    return [s for s in batch.sequences if s.request_id == request.request_id]


def paused(worker: FakeWorker) -> list[Request]:
    return [r for r in worker.core.waiting if r.phase is Phase.PAUSED]


def assert_pauses_are_out_of_flight(worker: FakeWorker) -> None:
    """A paused request is in no forward in flight and has its last sampled token still to feed."""
    in_flight = {s.request_id for batch in worker.in_flight for s in batch.sequences}
    for request in paused(worker):
        assert request.request_id not in in_flight
        assert request.tokens_in_flight == 0 and request.fed == request.num_tokens - 1


def step_until(worker: FakeWorker, condition: Callable[[], bool], max_steps: int = 200) -> None:
    """Steps, checking after each that paused requests are out of flight, until `condition()`."""
    for _ in range(max_steps):
        if condition():
            return
        worker.step()
        assert_pauses_are_out_of_flight(worker)
    raise AssertionError("the condition never held")


def start_long_requests_then_a_short_one(worker: FakeWorker, long_tokens: int = 40,
                                         short_tokens: int = 2) -> None:
    """a0 and b0 hold both slots; c0 arrives and finds every slot referenced."""
    submit(worker, "a0", "a", prompt_len=PROMPT_LEN, max_new_tokens=long_tokens)
    submit(worker, "b0", "b", prompt_len=PROMPT_LEN, max_new_tokens=long_tokens + 5)
    for _ in range(3):
        worker.step()
    submit(worker, "c0", "c", prompt_len=PROMPT_LEN, max_new_tokens=short_tokens)


def test_a_short_request_pauses_the_longest_and_it_resumes_on_its_kept_pages():
    worker = make()
    start_long_requests_then_a_short_one(worker)
    b0 = worker.core.requests["b0"]  # the most tokens left
    pages = list(b0.pages)
    step_until(worker, lambda: bool(paused(worker)))
    assert paused(worker) == [b0] and b0.pages == pages
    pages_used = worker.core.stats().kv_pages_used
    last_token, fed = b0.generated[-1], b0.fed
    for _ in range(200):
        sent_while_paused = len(worker.batches)
        worker.step()
        assert_pauses_are_out_of_flight(worker)
        if b0.phase is not Phase.PAUSED:
            break
        assert b0.pages == pages
    assert "c0" in finished(worker), "c0 ran on b0's slot while b0 was paused"
    assert worker.core.stats().kv_pages_used <= pages_used
    worker.run_until_idle()
    first = next(seq for batch in worker.batches[sent_while_paused:] for seq in sequences_of(batch, b0))
    assert not first.previous_token and list(first.token_ids) == [last_token]
    assert first.context_len == fed and list(first.page_table) == pages
    assert tokens_of(worker, "b0") == expected_tokens("b0", 45)
    assert tokens_of(worker, "a0") == expected_tokens("a0", 40)
    assert tokens_of(worker, "c0") == expected_tokens("c0", 2)
    assert worker.core.stats().requests_paused == 1
    assert_idle(worker)


def test_the_paused_request_leaves_the_batches_at_once_but_pauses_only_out_of_flight():
    worker = make()
    start_long_requests_then_a_short_one(worker)
    b0 = worker.core.requests["b0"]
    step_until(worker, lambda: bool(worker.core.requests_to_pause()))
    built_after_the_mark = len(worker.batches) - 1  # the mark came in the pass that built it
    assert sequences_of(worker.batches[built_after_the_mark - 1], b0), "b0 was in a forward in flight"
    assert b0.phase is Phase.RUNNING, "not paused while a forward held it"
    step_until(worker, lambda: b0.phase is Phase.PAUSED)
    assert not any(sequences_of(batch, b0) for batch in worker.batches[built_after_the_mark:])
    worker.run_until_idle()
    assert tokens_of(worker, "b0") == expected_tokens("b0", 45)


def test_an_admission_pass_while_the_victim_is_in_flight_does_not_pause_it():
    """One slot: once a0 is marked the next batch is empty, so the server may run another
    admission pass (a new arrival) before the forward holding a0 is answered."""
    worker = make(slots=1)
    submit(worker, "a0", "a", prompt_len=PROMPT_LEN, max_new_tokens=40)
    for _ in range(3):
        worker.step()
    a0 = worker.core.requests["a0"]
    submit(worker, "c0", "c", prompt_len=PROMPT_LEN, max_new_tokens=2)
    assert worker.core.schedule() is None, "a0 is marked and leaves the batch"
    assert worker.core.requests_to_pause() == ["a0"] and "a0" in worker.core.request_ids_in_flight()
    assert worker.core.schedule() is None
    assert a0.phase is Phase.RUNNING, "paused while a forward in flight held it"
    step_until(worker, lambda: a0.phase is Phase.PAUSED)
    worker.run_until_idle()
    assert tokens_of(worker, "a0") == expected_tokens("a0", 40)
    assert tokens_of(worker, "c0") == expected_tokens("c0", 2)
    assert worker.core.stats().requests_paused == 1
    assert_idle(worker)


def test_every_request_gets_the_tokens_it_gets_without_preemption():
    outputs = {}
    for ratio in (math.inf, 1.5):
        worker = make(adapters="abcde", pause_tokens_ratio=ratio)
        for i, (adapter, tokens) in enumerate(zip("abcdeabcde", (30, 25, 3, 2, 20, 4, 28, 2, 3, 6))):
            submit(worker, f"r{i}", adapter, prompt_len=PROMPT_LEN, max_new_tokens=tokens)
            worker.step()
            assert_pauses_are_out_of_flight(worker)
        worker.run_until_idle()
        outputs[ratio] = {f"r{i}": tokens_of(worker, f"r{i}") for i in range(10)}
        assert_idle(worker)
        assert (worker.core.stats().requests_paused > 0) == (ratio == 1.5)
    assert outputs[1.5] == outputs[math.inf]


def test_no_pause_when_the_long_request_is_not_ratio_times_longer():
    worker = make(pause_tokens_ratio=4.0)
    start_long_requests_then_a_short_one(worker, long_tokens=40, short_tokens=15)
    worker.run_until_idle()
    assert worker.core.stats().requests_paused == 0
    assert_idle(worker)


def test_no_pause_of_a_request_that_shares_its_slot():
    worker = make()
    for name in ("a0", "a1"):
        submit(worker, name, "a", prompt_len=PROMPT_LEN, max_new_tokens=40)
    for name in ("b0", "b1"):
        submit(worker, name, "b", prompt_len=PROMPT_LEN, max_new_tokens=40)
    worker.step()
    submit(worker, "c0", "c", prompt_len=PROMPT_LEN, max_new_tokens=2)
    worker.run_until_idle()
    assert worker.core.stats().requests_paused == 0


def test_a_reclaim_ends_if_the_short_request_goes_away_before_the_pause():
    worker = make()
    start_long_requests_then_a_short_one(worker)
    step_until(worker, lambda: bool(worker.core.requests_to_pause()))
    worker.core.abort("c0")
    worker.run_until_idle()
    assert worker.core.stats().requests_paused == 0 and not worker.core.requests_to_pause()
    assert tokens_of(worker, "b0") == expected_tokens("b0", 45)
    assert_idle(worker)


def test_aborting_a_paused_request_frees_its_pages():
    worker = make()
    start_long_requests_then_a_short_one(worker, short_tokens=8)
    step_until(worker, lambda: bool(paused(worker)))
    worker.core.abort("b0")
    worker.run_until_idle()
    assert finished(worker)["b0"].finish_reason == "abort"
    assert_idle(worker)


def test_a_paused_request_is_not_starved_by_a_stream_of_short_ones():
    """Short requests for c, d and e keep coming, each able to pause a long one: a0 and b0 are
    paused once at most, and a paused one goes before shorter requests once it has waited
    drain_after_s (before admission and while paused), so it resumes."""
    worker = make(adapters="abcde", drain_after_s=0.05, max_pauses_per_request=1)
    start_long_requests_then_a_short_one(worker)
    for i in range(1, 300):
        for adapter in "cde":
            submit(worker, f"{adapter}{i}", adapter, prompt_len=PROMPT_LEN, max_new_tokens=2)
        worker.step()
        assert_pauses_are_out_of_flight(worker)
        time.sleep(0.002)
        if {"a0", "b0"} <= finished(worker).keys():
            break
    assert {"a0", "b0"} <= finished(worker).keys(), "a paused request starved"
    assert 1 <= worker.core.stats().requests_paused <= 2
    assert tokens_of(worker, "a0") == expected_tokens("a0", 40)
    assert tokens_of(worker, "b0") == expected_tokens("b0", 45)
    worker.run_until_idle()
    assert_idle(worker)


@pytest.mark.parametrize("settings, message", [
    (dict(pause_tokens_ratio=1.0), "pause_tokens_ratio must exceed 1"),
    (dict(pause_tokens_ratio=0.5), "pause_tokens_ratio must exceed 1"),
    (dict(pause_tokens_ratio=math.nan), "pause_tokens_ratio must exceed 1"),
    (dict(max_pauses_per_request=-1), "max_pauses_per_request must be 0 or more"),
])
def test_bad_preemption_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        SchedulerConfig(**settings)
