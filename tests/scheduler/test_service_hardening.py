"""The scheduler process's sockets: malformed peers are dropped, wildcard binds refused, registry kept."""

from __future__ import annotations

import pytest

from protos.loraserve.v1 import internal_pb2 as pb
from scheduler.service import SchedulerService, SchedulerServiceConfig, _parse, _read_registry
from settings.config import SchedulerConfig


@pytest.mark.parametrize("frames", [
    [b"peer"],  # no payload
    [b"peer", b"x", b"y"],  # one frame too many
    [b"peer", b"\xff\xff\xff"],  # not protobuf
    [b"peer", b""],  # a message that says nothing
    [b"peer", pb.WorkerEvent(hello=pb.WorkerHello(model="m")).SerializeToString()[:-1]],  # truncated
])
def test_malformed_frames_are_not_messages(frames):
    assert _parse(frames, pb.FrontendMessage) is None


def test_a_well_formed_message_parses():
    payload = pb.FrontendMessage(abort=pb.AbortRequest(request_id="r")).SerializeToString()
    assert _parse([b"peer", payload], pb.FrontendMessage).abort.request_id == "r"


@pytest.mark.parametrize("address", ["tcp://*:5555", "tcp://0.0.0.0:5555", "tcp://[::]:5555"])
def test_binding_every_interface_is_refused(tmp_path, address):
    config = SchedulerServiceConfig(frontend_address=address, worker_address=f"ipc://{tmp_path}/w.sock")
    with pytest.raises(ValueError, match="named interface"):
        SchedulerService(config)


def test_the_registry_survives_a_restart_and_wins_over_the_flags(tmp_path):
    registry = tmp_path / "adapters.json"
    assert _read_registry(str(registry)) is None
    registry.write_text("not json")
    assert _read_registry(str(registry)) is None
    config = SchedulerConfig(initial_adapters={"a": "/x/a"}, registry_file=str(registry))
    service = SchedulerService(SchedulerServiceConfig(f"ipc://{tmp_path}/f.sock", f"ipc://{tmp_path}/w.sock", config))
    try:
        assert service.registered_paths == {"a": "/x/a"}
        service.registered_paths["late"] = "/x/late"
        service._save_registry()
    finally:
        service.close()
    restarted = SchedulerService(SchedulerServiceConfig(f"ipc://{tmp_path}/f2.sock", f"ipc://{tmp_path}/w2.sock",
                                                        config))
    try:
        assert restarted.registered_paths == {"a": "/x/a", "late": "/x/late"}
    finally:
        restarted.close()
