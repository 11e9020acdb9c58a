"""A stand-in for the worker that executes the scheduler core's commands in memory.

Loads complete after `load_steps` forwards (per adapter, default 0: at the next poll),
and a forward samples a token derived from the request id and position, so tests can
predict every output without a model. With `one_ahead`, each step sends every batch the
core lets out (the next before the current's tokens) and answers the oldest, as the real
worker does with steps queued on the GPU.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from protos.loraserve.v1 import internal_pb2 as pb
from scheduler.core import SchedulerCore

EOS = 2


def hello(**overrides) -> pb.WorkerHello:
    fields = dict(model="fake", architecture="LlamaForCausalLM", dtype="float32", device="cpu",
                  vocab_size=1000, max_context_length=512, num_kv_pages=64, page_size=4,
                  max_loras_per_batch=2, max_loaded_loras=4, max_lora_rank=64,
                  host_cache_bytes=1 << 20, eos_token_ids=[EOS])
    fields.update(overrides)
    return pb.WorkerHello(**fields)


def token_for(request_id: str, position: int) -> int:
    return 100 + (sum(map(ord, request_id)) * 31 + position * 7) % 800


@dataclass
class FakeWorker:
    core: SchedulerCore
    load_steps: dict[str, int] = field(default_factory=dict)
    slots: dict[int, str] = field(default_factory=dict)
    host: set[str] = field(default_factory=set)
    loading: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (slot, steps left)
    staged: list[str] = field(default_factory=list)  # reported at the next tick
    log: list[pb.WorkerCommand] = field(default_factory=list)
    batches: list[pb.Forward] = field(default_factory=list)
    one_ahead: bool = False
    in_flight: deque[pb.Forward] = field(default_factory=deque)
    last_sampled: set[str] = field(default_factory=set)  # requests the last batch sent samples

    def register(self, name: str, size: int = 1000, rank: int = 8) -> None:
        self.core.register(pb.RegisteredAdapter(name=name, rank=rank, size_bytes=size,
                                                target_modules=["q_proj"]), f"/adapters/{name}")

    def step(self) -> bool:
        """One scheduler step: run the commands, the forward, and report finished loads."""
        if self.one_ahead:
            return self._step_one_ahead()
        batch = self.core.schedule()
        self._execute(self.core.take_commands())
        if batch is not None:
            self.batches.append(batch)
            self._check_batch(batch)
            self.core.on_forward_result(self.forward(batch))
        self.core.on_load_events(self.tick_loads())
        self._execute(self.core.take_commands())
        return batch is not None

    def _step_one_ahead(self) -> bool:
        self.send_batches()
        answered = bool(self.in_flight)
        if answered:
            self.core.on_forward_result(self.forward(self.in_flight.popleft()))
        self.core.on_load_events(self.tick_loads())
        self._execute(self.core.take_commands())
        return answered

    def send_batches(self) -> None:
        """Queues every batch the core lets out, each after the commands that came with it."""
        while (batch := self.core.schedule()) is not None:
            self._execute(self.core.take_commands())
            self.batches.append(batch)
            self._check_batch(batch)
            self.sent(batch)
            self.in_flight.append(batch)
        self._execute(self.core.take_commands())

    def sent(self, batch: pb.Forward) -> None:
        """A batch queued behind those in flight; a subclass may time it."""

    def run_until_idle(self, max_steps: int = 500) -> None:
        for _ in range(max_steps):
            if not self.core.has_requests():
                return
            self.step()
        raise AssertionError("the scheduler did not finish its requests")

    def _execute(self, commands: list[pb.WorkerCommand]) -> None:
        for command in commands:
            self.log.append(command)
            kind = command.WhichOneof("kind")
            if kind == "stage_adapter":
                self.host.add(command.stage_adapter.name)
                self.staged.append(command.stage_adapter.name)
            elif kind == "evict_host":
                assert command.evict_host.name not in self.loading
                self.host.discard(command.evict_host.name)
            elif kind == "load_slot":
                load = command.load_slot
                assert load.slot not in [s for s, _ in self.loading.values()], "slot already loading"
                self.host.add(load.name)
                steps = 0 if load.blocking else self.load_steps.get(load.name, 0)
                self.loading[load.name] = (load.slot, steps)
                self.slots[load.slot] = load.name
                if load.blocking:
                    self.core.on_load_events(self.tick_loads())
            elif kind == "evict_slot":
                self.slots.pop(command.evict_slot.slot, None)
            elif kind == "unregister_adapter":
                self.host.discard(command.unregister_adapter.name)

    def _check_batch(self, batch: pb.Forward) -> None:
        """What the real engine would refuse: a slot that is empty or still loading, or a
        previous-token input whose request the batch sent before did not sample."""
        for seq in batch.sequences:
            assert not seq.previous_token or seq.request_id in self.last_sampled, seq.request_id
            assert seq.previous_token != bool(seq.token_ids), seq.request_id
            if seq.adapter_slot >= 0:
                assert seq.adapter_slot in self.slots, f"{seq.request_id} uses an empty slot"
                name = self.slots[seq.adapter_slot]
                request = self.core.requests.get(seq.request_id)
                assert request is None or request.adapter == name, "request runs with another adapter's slot"
        self.last_sampled = {seq.request_id for seq in batch.sequences if seq.sample}

    def forward(self, batch: pb.Forward) -> pb.ForwardResult:
        """One forward's tokens; a subclass may time it (benchmarks/slot_policy_sim.py)."""
        result = pb.ForwardResult()
        for seq in batch.sequences:
            if seq.sample:
                position = seq.context_len + (1 if seq.previous_token else len(seq.token_ids))
                result.tokens.add(request_id=seq.request_id, token_id=token_for(seq.request_id, position))
        return result

    def tick_loads(self) -> pb.LoadEvents:
        """The load events since the last call; a subclass may time the copies."""
        events = pb.LoadEvents(staged=self.staged)
        self.staged = []
        for name, (slot, steps) in list(self.loading.items()):
            if steps <= 0:
                del self.loading[name]
                events.loaded.add(name=name, slot=slot)
            else:
                total = self.load_steps[name] + 1  # polls until reported: each lands an equal share
                events.copying.add(name=name, landed=(total - steps) / total)
                self.loading[name] = (slot, steps - 1)
        return events
