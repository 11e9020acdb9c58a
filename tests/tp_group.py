"""Tensor-parallel engines on CPU (gloo) for tests: each rank a spawned process that runs the same
workload on its engine, as a worker group's ranks run the same commands; rank 0 saves what it saw."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing
from safetensors.torch import load_file, save_file

from settings.config import EngineConfig
from tests.driver import Request, shared_host_memory_file
from worker.engine import Engine
from worker.group import GroupSpec, join
from worker.tensor_parallel import TensorParallel

# What every rank runs on its engine; returns the requests it ran. A module-level function: the
# spawned ranks import it by name.
Workload = Callable[[Engine, dict[str, Path]], list[Request]]


def run_group(size: int, model_dir: Path, adapters: dict[str, Path], directory: Path, settings: dict,
              workload: Workload) -> dict[str, Request]:
    """The workload's requests as rank 0 of a group of `size` saw them (size 1: no group)."""
    out = directory / f"tp{size}.safetensors"
    config = EngineConfig(model_path=str(model_dir), **settings)
    host_memory = shared_host_memory_file(directory / f"host-memory-{size}", config, size)
    args = (size, str(directory / f"rendezvous-{size}"), host_memory, config, adapters, workload, str(out))
    if size == 1:
        _run_rank(0, *args)
    else:
        torch.multiprocessing.spawn(_run_rank, args=args, nprocs=size)
    return _load_requests(out)


def _run_rank(rank: int, size: int, rendezvous: str, host_memory: str, config: EngineConfig,
              adapters: dict[str, Path], workload: Workload, out: str) -> None:
    torch.set_num_threads(1)  # 2-4 ranks share this machine's cores
    tp = join(GroupSpec(size, rank, rendezvous, 120, host_memory), "cpu") if size > 1 else TensorParallel()
    engine = Engine(config, tp=tp)
    requests = workload(engine, adapters)
    if rank == 0:
        _save_requests(requests, out)
    engine.close()
    if size > 1:
        dist.destroy_process_group()


def _save_requests(requests: list[Request], out: str) -> None:
    tensors = {}
    for r in requests:
        tensors[f"{r.request_id}.logits"] = r.all_logits().contiguous()
        tensors[f"{r.request_id}.prompt"] = torch.tensor(r.prompt)
        tensors[f"{r.request_id}.generated"] = torch.tensor(r.generated)
    save_file(tensors, out)


def _load_requests(path: Path) -> dict[str, Request]:
    tensors = load_file(path)
    requests = {}
    for key in tensors:
        request_id = key.rsplit(".", 1)[0]
        request = Request(request_id, tensors[f"{request_id}.prompt"].tolist(),
                          generated=tensors[f"{request_id}.generated"].tolist())
        request.logits = [tensors[f"{request_id}.logits"]]
        requests[request_id] = request
    return requests
