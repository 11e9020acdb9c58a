"""The worker's order of launches and answers when the scheduler sends the next forward early."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from protos.loraserve.v1 import internal_pb2 as pb
from settings.config import EngineConfig
from worker.batch import ForwardOutput
from worker.engine import LoadReport
from worker.service import WorkerConfig, WorkerService


@dataclass
class Launched:
    number: int
    done: bool

    def is_done(self) -> bool:
        return self.done


@dataclass
class RecordingEngine:
    """Stands in for the engine: records launches and finishes; forwards end at once (CPU) or not (GPU)."""

    ends_at_once: bool
    events: list[str] = field(default_factory=list)
    graph_runner: None = None
    pending: dict = field(default_factory=dict)
    busy_loading: bool = False

    def launch(self, inputs) -> Launched:
        number = sum(event.startswith("launch") for event in self.events) + 1
        self.events.append(f"launch {number}")
        return Launched(number, self.ends_at_once)

    def finish(self, launched: Launched) -> ForwardOutput:
        self.events.append(f"finish {launched.number}")
        return ForwardOutput(tokens=[])

    def poll(self) -> LoadReport:
        return LoadReport()

    def load_adapter(self, name: str, slot: int, *, blocking: bool = False) -> None:
        self.events.append(f"load {name}{' blocking' if blocking else ''}")

    def evict_slot(self, slot: int) -> None:
        self.events.append(f"evict {slot}")

    def stage_adapter(self, name: str) -> None:
        self.events.append(f"stage {name}")


@pytest.mark.parametrize(("ends_at_once", "expected"), [
    (True, ["launch 1", "finish 1", "answer 1", "launch 2"]),  # CPU: tokens leave before the next forward runs
    (False, ["launch 1", "launch 2", "finish 1", "answer 1"]),  # GPU: the next forward is queued first
])
def test_a_forward_already_ended_is_answered_before_the_next_is_launched(ends_at_once, expected):
    engine = RecordingEngine(ends_at_once)
    service = WorkerService(WorkerConfig("ipc:///unused", EngineConfig(model_path="/unused")), engine)
    service._send = lambda event: engine.events.append(f"answer {event.result.command_id}")
    try:
        for command_id in (1, 2):
            service._on_command(pb.WorkerCommand(command_id=command_id, forward=pb.Forward()))
    finally:
        service.socket.close(linger=0)
    assert engine.events == expected


@pytest.mark.parametrize(("command", "expected"), [
    # An overlapped load and the eviction before it run while the forward runs (the copier
    # orders the copy on the GPU).
    (pb.WorkerCommand(command_id=2, load_slot=pb.LoadSlot(name="a", slot=0)),
     ["launch 1", "load a", "answer 2", "finish 1", "answer 1"]),
    (pb.WorkerCommand(command_id=2, evict_slot=pb.EvictSlot(slot=0)),
     ["launch 1", "evict 0", "answer 2", "finish 1", "answer 1"]),
    # A blocking load and other commands wait for the forward's tokens first.
    (pb.WorkerCommand(command_id=2, load_slot=pb.LoadSlot(name="a", slot=0, blocking=True)),
     ["launch 1", "finish 1", "answer 1", "load a blocking", "answer 2"]),
    (pb.WorkerCommand(command_id=2, stage_adapter=pb.StageAdapter(name="a")),
     ["launch 1", "finish 1", "answer 1", "stage a", "answer 2"]),
])
def test_only_an_overlapped_load_and_an_eviction_run_beside_a_running_forward(command, expected):
    engine = RecordingEngine(ends_at_once=False)
    service = WorkerService(WorkerConfig("ipc:///unused", EngineConfig(model_path="/unused")), engine)
    service._send = lambda event: engine.events.append(f"answer {event.result.command_id}")
    try:
        service._on_command(pb.WorkerCommand(command_id=1, forward=pb.Forward()))
        service._on_command(command)
        service._answer_in_flight()
    finally:
        service.socket.close(linger=0)
    assert engine.events == expected
