"""A minimal stand-in for the scheduler, for worker tests: pages, chunked prefill, decode."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from settings.config import EngineConfig
from worker.batch import NO_ADAPTER, SamplingParams, SequenceInput
from worker.engine import Engine
from worker.lora.shared_host_memory import SharedLayout


def make_engine(model_dir, **overrides) -> Engine:
    settings = dict(dtype="float32", device="cpu", page_size=4, num_kv_pages=256,
                    max_loras_per_batch=4, max_lora_rank=32, host_cache_bytes=16 << 20)
    settings.update(overrides)
    return Engine(EngineConfig(model_path=str(model_dir), **settings))


def shared_host_memory_file(path: Path, config: EngineConfig, ranks: int) -> str:
    """What a worker group's rank 0 creates for its ranks' shared host cache, as a file (a test's
    ranks are spawned, and inherit no descriptors)."""
    with open(path, "wb") as file:
        os.ftruncate(file.fileno(), SharedLayout.of(config, ranks).nbytes)
    return str(path)


def serve_alone(model_dir, name: str, path: Path, tokens: list[int], **settings) -> list[Request]:
    """One request of adapter `name` (registered from `path`, resident in slot 0) on a fresh engine."""
    engine = make_engine(model_dir, **settings)
    engine.register_adapter(name, path)
    make_resident(engine, name, 0)
    requests = [Request(name, tokens, adapter_slot=0, max_new_tokens=3)]
    Driver(engine).run(requests)
    engine.close()
    return requests


def make_resident(engine: Engine, name: str, slot: int) -> None:
    """Stages and loads an adapter synchronously (the blocking baseline)."""
    engine.stage_adapter(name)
    engine.wait_staged(name)
    engine.load_adapter(name, slot, blocking=True)
    report = engine.poll()
    assert (name, slot) in report.loaded, report


def forward_paths(engine: Engine) -> list[str]:
    """The path of each forward the engine's timeline recorded, in launch order."""
    return [event["args"]["path"] for event in engine.timeline.chrome_trace() if event.get("name") == "forward"]


@dataclass
class Request:
    request_id: str
    prompt: list[int]
    adapter_slot: int = NO_ADAPTER
    max_new_tokens: int = 4
    sampling: SamplingParams = field(default_factory=SamplingParams)
    pages: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # rows for every fed token
    fed: int = 0  # tokens already in the KV cache

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def finished(self) -> bool:
        return len(self.generated) >= self.max_new_tokens

    def all_logits(self) -> torch.Tensor:
        return torch.cat(self.logits)


class Driver:
    """Feeds requests through an engine: prompts in chunks of `chunk`, then one token a step."""

    def __init__(self, engine: Engine, chunk: int = 5) -> None:
        self.engine = engine
        self.chunk = chunk
        self._next_page = 0

    def step(self, requests: list[Request]) -> None:
        inputs = [self._input(r) for r in requests if not r.finished]
        if not inputs:
            return
        output = self.engine.forward(inputs, return_logits=True)
        by_id = {r.request_id: r for r in requests}
        for seq in inputs:
            request = by_id[seq.request_id]
            request.fed += len(seq.token_ids)
            request.logits.append(output.logits[seq.request_id])
        for token in output.tokens:
            by_id[token.request_id].generated.append(token.token_id)

    def run(self, requests: list[Request]) -> None:
        while not all(r.finished for r in requests):
            self.step(requests)

    def _input(self, request: Request) -> SequenceInput:
        tokens = request.tokens
        new = tokens[request.fed:request.fed + self.chunk]
        total = request.fed + len(new)
        self._grow_pages(request, total)
        return SequenceInput(
            request_id=request.request_id,
            token_ids=new,
            context_len=request.fed,
            page_table=list(request.pages),
            adapter_slot=request.adapter_slot,
            sample=total == len(tokens),
            sampling=request.sampling,
        )

    def _grow_pages(self, request: Request, total: int) -> None:
        page_size = self.engine.config.page_size
        while len(request.pages) * page_size < total:
            request.pages.append(self._next_page)
            self._next_page += 1
