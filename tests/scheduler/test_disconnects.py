"""Clients that leave at any moment (cancel, deadline, dropped connection: all reach the core as an
abort) over thousands of requests: nothing leaks, and everyone else gets exactly their tokens."""

from __future__ import annotations

import random
from collections import defaultdict

from tests.scheduler.fake_worker import FakeWorker, token_for
from tests.scheduler.test_core import SETTLED_STATES, make, submit

REQUESTS = 3000
ADAPTERS = ("a", "b", "c", "d", "e")  # five adapters through two slots


class Outputs:
    """Every output the core emitted, by request (taken as they come: no rescans)."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = defaultdict(list)
        self.finish: dict[str, str] = {}
        self.errors: dict[str, int] = {}

    def take(self, worker: FakeWorker) -> None:
        for _, message in worker.core.take_outputs():
            output = message.output
            self.tokens[output.request_id].extend(output.token_ids)
            if output.HasField("error"):
                self.errors[output.request_id] = output.error.code
            if output.finished:
                assert output.request_id not in self.finish, f"{output.request_id} finished twice"
                self.finish[output.request_id] = output.finish_reason


def test_thousands_of_abandoned_requests_leak_nothing():
    rng = random.Random(6)
    worker = make(adapters=ADAPTERS, max_queued_requests=REQUESTS)
    for name in ADAPTERS:
        worker.load_steps[name] = 2  # loads land two forwards later: requests leave mid-load too
    outputs = Outputs()
    submitted: dict[str, tuple[int, int]] = {}  # request id -> (prompt length, max new tokens)
    abandoned: set[str] = set()
    for i in range(REQUESTS):
        request_id = f"r{i}"
        prompt_len, new_tokens = rng.randint(1, 12), rng.randint(1, 8)
        submit(worker, request_id, rng.choice(("",) + ADAPTERS), prompt_len=prompt_len, max_new_tokens=new_tokens)
        submitted[request_id] = (prompt_len, new_tokens)
        for _ in range(rng.randint(0, 3)):
            worker.step()
        live = list(worker.core.requests)
        if live and rng.random() < 0.5:  # a client in the queue, mid-load or mid-generation leaves
            leaving = rng.choice(live)
            worker.core.abort(leaving)
            abandoned.add(leaving)
        if rng.random() < 0.02:  # a late abort: harmless to a finished request, a leave for a live one
            late = f"r{rng.randrange(i + 1)}"
            if late in worker.core.requests:  # whether it still runs depends on the clock (landing admission)
                abandoned.add(late)
            worker.core.abort(late)
        outputs.take(worker)
    worker.run_until_idle(max_steps=5000)
    outputs.take(worker)

    stats = worker.core.stats()
    assert (stats.kv_pages_used, stats.slot_references, stats.running_requests, stats.waiting_requests) == (0,) * 4
    assert not worker.core.requests
    assert all(info.active_requests == 0 for info in worker.core.adapter_infos())
    assert all(info.state in SETTLED_STATES for info in worker.core.adapter_infos())
    assert not worker.core.has_forward_in_flight()

    assert set(outputs.finish) == set(submitted) and not outputs.errors, "every request ends once, none refused"
    for request_id, (prompt_len, new_tokens) in submitted.items():
        tokens = outputs.tokens[request_id]
        expected = [token_for(request_id, p) for p in range(prompt_len, prompt_len + new_tokens)]
        if request_id in abandoned and outputs.finish[request_id] == "abort":
            assert tokens == expected[:len(tokens)] and len(tokens) < new_tokens
        else:
            assert outputs.finish[request_id] == "length" and tokens == expected
    assert sum(outputs.finish[r] == "abort" for r in abandoned) > REQUESTS // 4
