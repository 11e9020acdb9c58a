"""Scheduler settings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SchedulerConfig:
    overlap_loading: bool = True  # False: the seed's blocking baseline
    max_running_requests: int = 256
    max_queued_requests: int = 1024  # beyond it, RESOURCE_EXHAUSTED at once
    max_batch_tokens: int = 2048  # tokens per forward: decodes first, then prefill chunks
    initial_adapters: dict[str, str] = field(default_factory=dict)  # name -> path, registered at start
    max_draining_slots: int = 1  # slots drained at once for adapters waiting for one (benchmarks/slot_policy_sim.py)
    # A slot is drained for an adapter only once its oldest request has waited this long:
    # before that, slots usually free on their own, and a drain holds back resident requests.
    # Until then waiting requests take freed slots shortest first; after it, oldest first.
    drain_after_s: float = 3.0
    # Overlap mode, idle server: start a request once its adapter's copy runs, its forward
    # waiting per layer on the copy. Off by default: a request arriving during the copy waits
    # behind that forward, which costs little only when copies are short (GPU, pinned cache).
    pipelined_loads: bool = False
    # Slot preemption: a request that finds every slot referenced pauses the running request
    # with the most tokens left whose adapter runs nothing else, if it has at least this many
    # times the tokens the waiting one asks for (shortest remaining first). The paused request
    # keeps its KV pages and resumes once its adapter holds a slot again. inf: never pause.
    pause_tokens_ratio: float = 1.5  # benchmarks/slot_policy_sim.py; docs/slot-policy.md "Slot preemption"
    max_pauses_per_request: int = 1  # bounds the delay one request takes from preemption
    prefetch: bool = True  # stage idle adapters into host memory and free slots ahead of demand
    # 2: the next step is sent while the worker runs the current one (the GPU never waits for
    # the scheduler); 1: the scheduler waits for each step's tokens (--disable-overlap-schedule).
    max_forwards_in_flight: int = 2
    adapter_root: str | None = None  # set: LoadAdapter accepts only paths inside this directory
    registry_file: str | None = None  # set: adapters loaded at run time, kept across scheduler restarts

    def __post_init__(self) -> None:
        if math.isnan(self.pause_tokens_ratio) or self.pause_tokens_ratio <= 1:
            raise ValueError(f"pause_tokens_ratio must exceed 1 (inf: never pause), not {self.pause_tokens_ratio}: "
                             "at 1 or less two requests could pause each other in turn")
        if self.max_pauses_per_request < 0:
            raise ValueError(f"max_pauses_per_request must be 0 or more, not {self.max_pauses_per_request}")
