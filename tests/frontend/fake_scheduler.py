"""A scripted stand-in for the scheduler: a ZeroMQ ROUTER on its own thread.

Every submitted request generates `script` (one token per output, every
`token_interval_s`), cut at the request's max_new_tokens. Admin requests are answered
from a small adapter table. Submits and aborts are recorded for the tests to inspect.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import zmq

from protos.loraserve.v1 import internal_pb2 as pb
from protos.loraserve.v1 import serving_pb2

POLL_MS = 2
LOGPROB = -0.25


def default_server_info() -> serving_pb2.ServerInfo:
    return serving_pb2.ServerInfo(model="/models/fake-llama", architecture="LlamaForCausalLM", dtype="float32",
                                  device="cpu", max_context_length=64, vocab_size=256, max_loras_per_batch=2,
                                  max_loaded_loras=4, max_lora_rank=16, version="test")


@dataclass
class _Generation:
    client: bytes
    request_id: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: bool
    next_at: float
    arrival: float = field(default_factory=time.monotonic)

    def timing(self) -> serving_pb2.Timing:
        return serving_pb2.Timing(queued_ms=1.0, adapter_wait_ms=0.5, time_to_first_token_ms=2.0,
                                  e2e_ms=(time.monotonic() - self.arrival) * 1e3)


class FakeScheduler:
    def __init__(self, address: str) -> None:
        self.address = address
        self.info = default_server_info()
        self.script: list[int] = [10, 11, 12]
        self.token_interval_s = 0.0
        self.ready = True  # False: answers like a scheduler still waiting for its worker
        self.silent = False  # True: receives everything, answers nothing (a hung scheduler)
        self.queue_full = False
        self.refused_loads = False  # True: LoadAdapter is refused (INVALID_ARGUMENT), as a worker that cannot serve it
        self.adapters: dict[str, serving_pb2.AdapterInfo] = {}
        self.trace_events: list[dict] = []  # GetTimeline's Chrome trace
        self.submits: list[pb.SubmitRequest] = []
        self.aborts: list[str] = []
        self._generations: dict[str, _Generation] = {}
        self._context: zmq.Context | None = None
        self._socket: zmq.Socket | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-scheduler", daemon=True)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> FakeScheduler:
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(self.address)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Closes the socket, as a scheduler that exits does (connected frontends see a disconnect)."""
        self._stopping.set()
        self._thread.join(timeout=5)
        self._context.term()

    def reset(self) -> None:
        """Back to the defaults between tests that share one fake."""
        self.info = default_server_info()
        self.script = [10, 11, 12]
        self.token_interval_s = 0.0
        self.ready, self.silent, self.queue_full = True, False, False
        self.adapters.clear()
        self.trace_events.clear()
        self.submits.clear()
        self.aborts.clear()

    def __enter__(self) -> FakeScheduler:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # The thread -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                if self._socket.poll(POLL_MS):
                    self._drain()
                if not self.silent:
                    self._emit_due_tokens()
        finally:
            self._socket.close(linger=0)

    def _drain(self) -> None:
        while True:
            try:
                client, payload = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            message = pb.FrontendMessage.FromString(payload)
            kind = message.WhichOneof("kind")
            if kind == "submit":
                self.submits.append(message.submit)
            elif kind == "abort":
                self.aborts.append(message.abort.request_id)
            if self.silent:
                continue
            if kind == "submit":
                self._on_submit(client, message.submit)
            elif kind == "abort":
                self._on_abort(message.abort.request_id)
            elif kind == "admin":
                self._send(client, pb.SchedulerMessage(admin=self._answer(message.admin)))

    def _on_submit(self, client: bytes, submit: pb.SubmitRequest) -> None:
        error = self._refusal(submit)
        if error is not None:
            self._send(client, pb.SchedulerMessage(output=pb.RequestOutput(
                request_id=submit.request_id, finished=True, error=error)))
            return
        limit = submit.sampling.max_new_tokens
        self._generations[submit.request_id] = _Generation(
            client=client, request_id=submit.request_id, tokens=self.script[:limit],
            finish_reason="length" if len(self.script) >= limit else "stop", prompt_tokens=len(submit.input_ids),
            logprobs=submit.sampling.logprobs, next_at=time.monotonic())

    def _refusal(self, submit: pb.SubmitRequest) -> pb.Error | None:
        if not self.ready:
            return pb.Error(code=pb.UNAVAILABLE, message="the server is starting; retry shortly")
        if self.queue_full:
            return pb.Error(code=pb.RESOURCE_EXHAUSTED, message="the queue is full (0 requests waiting)")
        if submit.adapter and submit.adapter not in self.adapters:
            return pb.Error(code=pb.NOT_FOUND, message=f"adapter {submit.adapter!r} is not loaded")
        if submit.request_id in self._generations:
            return pb.Error(code=pb.ALREADY_EXISTS, message=f"request id {submit.request_id!r} is already in use")
        return None

    def _on_abort(self, request_id: str) -> None:
        generation = self._generations.pop(request_id, None)
        if generation is not None:
            self._send(generation.client, pb.SchedulerMessage(output=pb.RequestOutput(
                request_id=request_id, finished=True, finish_reason="abort", prompt_tokens=generation.prompt_tokens,
                timing=generation.timing())))

    def _emit_due_tokens(self) -> None:
        now = time.monotonic()
        for generation in [g for g in self._generations.values() if g.next_at <= now]:
            output = pb.RequestOutput(request_id=generation.request_id)
            if generation.tokens:
                output.token_ids.append(generation.tokens.pop(0))
                if generation.logprobs:
                    output.logprobs.append(LOGPROB)
            if not generation.tokens:
                output.finished = True
                output.finish_reason = generation.finish_reason
                output.prompt_tokens = generation.prompt_tokens
                output.timing.CopyFrom(generation.timing())
                del self._generations[generation.request_id]
            generation.next_at = now + self.token_interval_s
            self._send(generation.client, pb.SchedulerMessage(output=output))

    def _answer(self, admin: pb.AdminRequest) -> pb.AdminResponse:
        response = pb.AdminResponse(correlation_id=admin.correlation_id)
        command = admin.WhichOneof("command")
        if not self.ready:
            response.error.CopyFrom(pb.Error(code=pb.UNAVAILABLE, message="the server is starting; retry shortly"))
        elif command == "server_info":
            response.server_info.CopyFrom(self.info)
        elif command == "stats":
            response.stats.CopyFrom(serving_pb2.ServerStats(running_requests=len(self._generations),
                                                            requests_aborted=len(self.aborts)))
        elif command == "replica_state":
            on_gpu = [name for name, info in self.adapters.items() if info.state == serving_pb2.ADAPTER_STATE_RESIDENT]
            response.replica_state.CopyFrom(pb.ReplicaState(gpu_adapters=on_gpu, requests=len(self._generations)))
        elif command == "timeline":
            response.timeline.chrome_trace_json = json.dumps({"traceEvents": self.trace_events})
        elif command == "list_adapters":
            response.list_adapters.adapters.extend(self.adapters[name] for name in sorted(self.adapters))
        elif command == "load_adapter":
            self._load(admin.load_adapter, response)
        elif command == "unload_adapter":
            if self.adapters.pop(admin.unload_adapter.name, None) is None:
                response.error.CopyFrom(pb.Error(code=pb.NOT_FOUND,
                                                 message=f"adapter {admin.unload_adapter.name!r} is not loaded"))
            else:
                response.unload_adapter.SetInParent()
        return response

    def _load(self, request: serving_pb2.LoadAdapterRequest, response: pb.AdminResponse) -> None:
        if self.refused_loads:
            response.error.CopyFrom(pb.Error(code=pb.INVALID_ARGUMENT, message="this replica refuses every adapter"))
        elif request.name in self.adapters:
            response.error.CopyFrom(pb.Error(code=pb.ALREADY_EXISTS, message=f"adapter {request.name!r} is already loaded"))
        elif not request.path.startswith("/adapters/"):
            response.error.CopyFrom(pb.Error(code=pb.NOT_FOUND, message=f"no adapter at {request.path}"))
        else:
            info = serving_pb2.AdapterInfo(name=request.name, path=request.path, rank=8,
                                           state=serving_pb2.ADAPTER_STATE_ON_DISK, slot=-1)
            self.adapters[request.name] = info
            response.load_adapter.adapter.CopyFrom(info)

    def _send(self, client: bytes, message: pb.SchedulerMessage) -> None:
        self._socket.send_multipart([client, message.SerializeToString()])
