"""A bounded soak: many concurrent streams over more adapters than slots, cancellations and
LoadAdapter/UnloadAdapter churn. Every request that was not cancelled must give its reference's
output; afterwards KV pages, slot references and host-cache bytes are back to idle and no
process's memory has grown beyond RSS_GROWTH_BOUND_MIB.

CI runs SOAK_REQUESTS requests (default 600). The longer setting (docs/performance.md):
    LORASERVE_SOAK_REQUESTS=5000 LORASERVE_SOAK_CONCURRENCY=32 pytest -q -s tests/integration/test_soak.py
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest

from loraserve.client import LoraServeClient
from tests.driver import Driver, Request, make_engine, make_resident
from tests.integration.conftest import running_server
from tests.integration.test_service import prompt, wait_for
from tests.model_factory import AdapterSpec, build_adapter
from tests.oracle import PeftOracle

SOAK_REQUESTS = int(os.environ.get("LORASERVE_SOAK_REQUESTS", "600"))
CONCURRENCY = int(os.environ.get("LORASERVE_SOAK_CONCURRENCY", "16"))
CANCEL_FRACTION = 0.15
RSS_GROWTH_BOUND_MIB = 64  # per process, from after the warm-up to the end
# Only a guard against a hang: on a loaded 2-core machine the soak ran at about 1 request/s, and
# some requests (16 at a time over two slots) took over a minute.
REQUEST_TIMEOUT_S = 600.0
NEAR_TIE = 1e-3  # as in test_service: tokens may differ only after a top-two gap this small
TEACHER_FORCED_ATOL = 1e-4
# Six served adapters and one churned, all the same shape (so the host cache's idle bytes do not
# depend on which four it holds), through two GPU slots.
SERVED = [f"s{i}" for i in range(6)]
CHURN = "churn"
SHAPE = dict(rank=8, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])


@dataclass(frozen=True)
class Case:
    adapter: str
    ids: list[int]
    new_tokens: int


POOL = [Case(([""] + SERVED)[i % 7], prompt(900 + i, 4 + i % 9), 6 + i % 7) for i in range(28)]
CHURN_CASES = [Case(CHURN, prompt(950 + i, 5 + i), 8) for i in range(2)]


@pytest.fixture(scope="module")
def soak_adapters(artifacts, service_model):
    return {name: build_adapter(service_model, artifacts / f"soak-{name}", AdapterSpec(seed=60 + i, **SHAPE))
            for i, name in enumerate(SERVED + [CHURN])}


@pytest.fixture(scope="module")
def references(service_model, soak_adapters):
    """Each case alone on the in-process engine (greedy), and the positions where a near-tie allows a difference."""
    engine = make_engine(service_model, max_loras_per_batch=len(soak_adapters))
    slots = {}
    for slot, (name, path) in enumerate(soak_adapters.items()):
        engine.register_adapter(name, path)
        make_resident(engine, name, slot)
        slots[name] = slot
    oracle = PeftOracle(service_model, soak_adapters)
    tokens, first_tie = {}, {}
    for case in POOL + CHURN_CASES:
        request = Request("ref", case.ids, slots.get(case.adapter, -1), max_new_tokens=case.new_tokens)
        Driver(engine).run([request])
        key = (case.adapter, tuple(case.ids))
        tokens[key] = request.generated
        logits = oracle.logits(case.ids + request.generated, case.adapter or None)[len(case.ids) - 1:]
        gaps = [float(row.topk(2).values[0] - row.topk(2).values[1]) for row in logits[:case.new_tokens]]
        first_tie[key] = next((p for p, gap in enumerate(gaps) if gap < NEAR_TIE), case.new_tokens)
    engine.close()
    return tokens, first_tie, oracle


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.tokens = 0
        self.failures: list[str] = []

    def add(self, outcome: str, tokens: int = 0, failure: str | None = None) -> None:
        with self.lock:
            self.counts[outcome] += 1
            self.tokens += tokens
            if failure:
                self.failures.append(failure)


def check(references, case: Case, generated: list[int], complete: bool) -> str | None:
    """None if `generated` is what the case's reference gives (a prefix, if not complete)."""
    tokens, first_tie, oracle = references
    key = (case.adapter, tuple(case.ids))
    expected = tokens[key]
    if complete and len(generated) != case.new_tokens:
        return f"{case.adapter or 'base'}: {len(generated)} tokens, expected {case.new_tokens}"
    agree = next((p for p, (a, b) in enumerate(zip(generated, expected)) if a != b), len(generated))
    if agree == len(generated):
        return None
    if agree < first_tie[key]:
        return f"{case.adapter or 'base'} {case.ids}: token {agree} is {generated[agree]}, reference {expected[agree]}"
    oracle.assert_teacher_forced(case.ids, generated, case.adapter or None, atol=TEACHER_FORCED_ATOL)
    return None


def run_one(client: LoraServeClient, references, tally: Tally, case: Case, rng: random.Random) -> None:
    params = dict(input_ids=case.ids, adapter=case.adapter, max_new_tokens=case.new_tokens, ignore_eos=True)
    cancel_after = rng.randint(1, 3) if rng.random() < CANCEL_FRACTION else None
    try:
        if cancel_after is None and rng.random() < 0.5:
            generated = list(client.generate(**params).token_ids)
        else:
            stream = client.generate_stream(**params)
            generated = []
            for count, message in enumerate(stream, start=1):
                generated.extend(message.token_ids)
                if count == cancel_after and not message.finished:
                    stream.cancel()
                    tally.add("cancelled", len(generated), check(references, case, generated, complete=False))
                    return
    except grpc.RpcError as error:
        tally.add("failed", failure=f"{case.adapter or 'base'}: {error.code()} {error.details()}")
        return
    tally.add("served", len(generated), check(references, case, generated, complete=True))


def churn(client: LoraServeClient, path: str, references, tally: Tally, stop: threading.Event) -> int:
    """Loads, uses and unloads an adapter again and again; returns the number of cycles."""
    cycles = 0
    rng = random.Random(7)
    while not stop.is_set():
        client.load_adapter(CHURN, path)
        for case in CHURN_CASES:
            run_one(client, references, tally, case, rng)
        client.unload_adapter(CHURN)
        cycles += 1
    return cycles


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def idle(client: LoraServeClient) -> tuple[int, ...]:
    s = client.stats()
    return s.kv_pages_used, s.slot_references, s.running_requests, s.waiting_requests


def test_soak(base_config, soak_adapters, references):
    config = base_config.replace(initial_adapters={name: str(soak_adapters[name]) for name in SERVED},
                     max_queued_requests=4 * CONCURRENCY)
    with (running_server(config) as (launcher, _),
          LoraServeClient(launcher.address, timeout=REQUEST_TIMEOUT_S) as client):
        size = next(a.size_bytes for a in client.list_adapters().adapters)
        host_idle = -(-size // 256) * 256 * config.engine.max_loaded_loras  # four of the six, all one shape
        wait_for(lambda: client.stats().host_cache_bytes == host_idle, "the prefetch to fill the host cache")
        rng = random.Random(6)
        cases = [rng.choice(POOL) for _ in range(SOAK_REQUESTS)]
        warmup = max(CONCURRENCY, SOAK_REQUESTS // 10)
        tally = Tally()
        with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
            for future in [pool.submit(run_one, client, references, tally, case, random.Random(i))
                           for i, case in enumerate(cases[:warmup])]:
                future.result()
            rss_before = {name: rss_mib(p.pid) for name, p in launcher.processes.items()}
            stop = threading.Event()
            started = time.monotonic()
            churner = pool.submit(churn, client, str(soak_adapters[CHURN]), references, tally, stop)
            for future in [pool.submit(run_one, client, references, tally, case, random.Random(warmup + i))
                           for i, case in enumerate(cases[warmup:])]:
                future.result()
            stop.set()
            cycles = churner.result()
            elapsed = time.monotonic() - started
        wait_for(lambda: idle(client) == (0, 0, 0, 0), "KV pages, slot references and queues back to idle")
        wait_for(lambda: client.stats().host_cache_bytes == host_idle, "the host cache back to its idle bytes")
        rss_after = {name: rss_mib(p.pid) for name, p in launcher.processes.items()}
        assert {a.name for a in client.list_adapters().adapters} == set(SERVED)
        counts = tally.counts
        print(f"\nsoak: {SOAK_REQUESTS} requests (the first {warmup} a warm-up), concurrency {CONCURRENCY}, "
              f"{cycles} load/unload cycles: served {counts['served']}, cancelled {counts['cancelled']}, "
              f"failed {counts['failed']}; {counts['served'] / elapsed:.1f} req/s, {tally.tokens / elapsed:.0f} "
              f"tok/s over {elapsed:.1f} s; RSS MiB before/after: "
              + ", ".join(f"{n} {rss_before[n]:.0f}/{rss_after[n]:.0f}" for n in rss_before))
        assert tally.failures == [] and counts["failed"] == 0, tally.failures[:5]
        assert counts["cancelled"] > 0 and cycles > 0
        assert counts["served"] + counts["cancelled"] == SOAK_REQUESTS + 2 * cycles
        for name in rss_before:
            assert rss_after[name] - rss_before[name] <= RSS_GROWTH_BOUND_MIB, name
