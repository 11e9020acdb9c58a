"""Two ways to shard a LoRA adapter on a column-parallel module (q_proj, gate_proj: the base
weight split by output rows over N tensor-parallel ranks), timed on CPU with torch.distributed
over gloo, N processes on 127.0.0.1, one thread each:

  (a) A whole, B sliced (what the engine uses): each rank holds all of A [r, hidden] and its rows
      of B [out/N, r]; delta = (x @ A.T) @ B_local.T, no collective.
  (b) fully sharded: each rank holds A's rows [r/N, hidden] too; the [T, r/N] shrink is
      all-gathered to [T, r] before @ B_local.T, one all-gather per module.

Both are checked against an unsharded delta on rank 0; times are rank 0's medians, every
iteration started on all ranks together (a barrier before each).

    python -m benchmarks.tp_lora_sharding --out benchmarks/results/tp-lora-sharding-COMMIT.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import run_record, write_result

# Differently blocked matmuls sum in a different order; float32 noise, not a sharding error.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


@dataclass(frozen=True)
class Sweep:
    hidden: int
    out_features: int
    ranks: tuple[int, ...]
    tokens: tuple[int, ...]
    iterations: int
    warmup: int


def full_tensors(hidden: int, out_features: int, rank: int, tokens: int) -> tuple[torch.Tensor, ...]:
    """x, A, B from a fixed seed, so every process builds the same ones without sending them."""
    gen = torch.Generator().manual_seed(hidden * 1_000_003 + rank * 1009 + tokens)
    x = torch.randn(tokens, hidden, generator=gen)
    a = torch.randn(rank, hidden, generator=gen) / hidden ** 0.5  # scaled so the delta stays O(1)
    b = torch.randn(out_features, rank, generator=gen) / rank ** 0.5
    return x, a, b


def a_whole_b_sliced(x: torch.Tensor, a: torch.Tensor, b_local: torch.Tensor) -> torch.Tensor:
    return (x @ a.T) @ b_local.T


def fully_sharded(x: torch.Tensor, a_local: torch.Tensor, b_local: torch.Tensor,
                  world_size: int) -> torch.Tensor:
    shrink = x @ a_local.T
    parts = [torch.empty_like(shrink) for _ in range(world_size)]
    dist.all_gather(parts, shrink)  # rank order matches A's row order, so cat rebuilds [T, r]
    return torch.cat(parts, dim=1) @ b_local.T


def gathered_columns(local: torch.Tensor, world_size: int) -> torch.Tensor:
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local)
    return torch.cat(parts, dim=1)


def timed_in_step(call: Callable[[], object]) -> float:
    dist.barrier()  # all ranks start together, so a rank's time includes waiting on the slowest
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1e3


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_one(sweep: Sweep, rank_id: int, world_size: int, r: int, tokens: int) -> dict:
    x, a, b = full_tensors(sweep.hidden, sweep.out_features, r, tokens)
    a_local = a.chunk(world_size, dim=0)[rank_id].contiguous()
    b_local = b.chunk(world_size, dim=0)[rank_id].contiguous()
    run_a = partial(a_whole_b_sliced, x, a, b_local)
    run_b = partial(fully_sharded, x, a_local, b_local, world_size)
    full_a, full_b = gathered_columns(run_a(), world_size), gathered_columns(run_b(), world_size)
    if rank_id == 0:
        reference = (x @ a.T) @ b.T
        torch.testing.assert_close(full_a, reference, **TOLERANCE)
        torch.testing.assert_close(full_b, reference, **TOLERANCE)
    times_a, times_b = [], []
    for i in range(sweep.warmup + sweep.iterations):
        # interleaved, so drift from the other jobs on the machine hits both alike
        ta, tb = timed_in_step(run_a), timed_in_step(run_b)
        if i >= sweep.warmup:
            times_a.append(ta)
            times_b.append(tb)
    a_ms, b_ms = statistics.median(times_a), statistics.median(times_b)
    return {"N": world_size, "r": r, "T": tokens, "a_ms": a_ms, "b_ms": b_ms, "b_over_a": b_ms / a_ms,
            "verified": True,
            "bytes_per_rank": {"a": {"A": nbytes(a), "B": nbytes(b_local)},
                               "b": {"A": nbytes(a_local), "B": nbytes(b_local)}}}


def worker(rank_id: int, world_size: int, sweep: Sweep, rendezvous: str, result_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank_id,
                            world_size=world_size)
    try:
        rows = [measure_one(sweep, rank_id, world_size, r, t) for r in sweep.ranks for t in sweep.tokens]
        if rank_id == 0:
            Path(result_path).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def measure(world_size: int, sweep: Sweep) -> list[dict]:
    """One spawn of `world_size` gloo processes for the whole sweep; rank 0's rows."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only; inherited by the children
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "rows.json")
        mp.spawn(worker, args=(world_size, sweep, os.path.join(tmp, "rendezvous"), result_path),
                 nprocs=world_size, join=True)
        return json.loads(Path(result_path).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--out-features", type=int, default=4096)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sweep = Sweep(args.hidden, args.out_features, tuple(args.ranks), tuple(args.tokens),
                  args.iterations, args.warmup)
    rows = [row for n in args.world_sizes for row in measure(n, sweep)]
    cpus = len(os.sched_getaffinity(0))
    for row in rows:
        # more ranks than cores: gloo's all-gather waits on descheduled peers, inflating b_ms
        row["oversubscribed"] = row["N"] > cpus
    print("| N | r | T | a_ms | b_ms | b/a |\n| ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['N']} | {row['r']} | {row['T']} | {row['a_ms']:.3f} | {row['b_ms']:.3f} "
              f"| {row['b_over_a']:.2f} |")
    if any(row["oversubscribed"] for row in rows):
        print(f"(N > {cpus} CPUs here: those rows share cores, so their b_ms includes waiting on peers)")
    print("\n| N | r | a: A+B bytes/rank | b: A+B bytes/rank |\n| ---: | ---: | ---: | ---: |")
    for row in rows:
        if row["T"] == args.tokens[0]:  # memory does not depend on T
            held = {v: sum(row["bytes_per_rank"][v].values()) for v in ("a", "b")}
            print(f"| {row['N']} | {row['r']} | {held['a']:,} | {held['b']:,} |")
    if args.out:
        write_result(args.out, run_record(
            "tp_lora_sharding", hidden=args.hidden, out_features=args.out_features, dtype="float32",
            iterations=args.iterations, warmup=args.warmup, threads_per_rank=1, backend="gloo",
            cpus=cpus, rows=rows))


if __name__ == "__main__":
    main()
