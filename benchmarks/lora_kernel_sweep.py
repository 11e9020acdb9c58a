"""Launch shapes of the multi-LoRA kernels at decode sizes, on the 8B model's LoRA groups.

    python -m benchmarks.lora_kernel_sweep --out lora_sweep.json

Eight rank-256 adapters in eight slots, batches of 16 and 64 decode tokens spread evenly over
them. Each measurement is 32 layers' shrink (or expand) of one group, with distinct weights per
layer so that nothing is served from L2 (as in a real step), captured in a CUDA graph and
replayed; it reports microseconds per layer and the adapter bytes read per second.
The sweep is coordinate descent: tile sizes first at 4 warps and 3 stages, then warps and
stages for the best two tilings, batch 16 first (the budget may cut the rest). Prints a table and the best shape per group; asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable
from dataclasses import asdict

import torch

from benchmarks.common import graph_microseconds, run_record, write_result
from worker.kernels.lora_blocks import lora_blocks, max_blocks
from worker.kernels.multi_lora import (ExpandTiles, LoraScratch, ShrinkTiles, expand_tiles, lora_expand, lora_shrink,
                                       shrink_tiles)

LAYERS, SLOTS, RANK, HIDDEN, INTERMEDIATE = 32, 8, 256, 4096, 14336
GROUPS = {  # name: (in_features, out_features of each module)
    "qkv": (HIDDEN, (4096, 1024, 1024)),
    "o": (HIDDEN, (4096,)),
    "gate_up": (HIDDEN, (INTERMEDIATE, INTERMEDIATE)),
    "down": (INTERMEDIATE, (4096,)),
}
BATCHES = (16, 64)
SHRINK_TILINGS = [ShrinkTiles(rank=r, k=k, k_per_split=s)
                  for r, k, s in itertools.product((16, 32, 64), (64, 128, 256), (512, 1024, 2048, 0))
                  if not s or s % k == 0]
EXPAND_TILINGS = [ExpandTiles(n=n, rank=r) for n, r in itertools.product((32, 64, 128, 256), (16, 32, 64, 128))]
WARPS_STAGES = [(2, 3), *itertools.product((4, 8), (2, 3, 4))]


class GroupBench:
    """One group's per-layer weights, a batch's block table and outputs."""

    def __init__(self, name: str, batch: int) -> None:
        self.in_features, outs = GROUPS[name]
        gen = torch.Generator(device="cuda").manual_seed(0)

        def weights(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.01

        self.a = [[weights(SLOTS, RANK, self.in_features) for _ in outs] for _ in range(LAYERS)]
        self.b_t = [[weights(SLOTS, RANK, out) for out in outs] for _ in range(LAYERS)]
        self.x = weights(batch, self.in_features)
        self.outs = torch.zeros(batch, sum(outs), device="cuda", dtype=torch.bfloat16).split(list(outs), dim=1)
        token_slots = [slot for slot in range(SLOTS) for _ in range(batch // SLOTS)]
        table = lora_blocks(token_slots, [RANK] * SLOTS, max_blocks(batch, SLOTS))
        self.blocks = torch.from_numpy(table).cuda()
        smallest = ShrinkTiles(rank=16, k=64, k_per_split=512)  # most split-K partials and counters
        self.scratch = LoraScratch.allocate(batch, INTERMEDIATE, RANK, SLOTS, torch.bfloat16, torch.device("cuda"),
                                            split_tiles=[smallest])
        self.shrink_bytes = sum(a.numel() for a in self.a[0]) * 2
        self.expand_bytes = sum(b.numel() for b in self.b_t[0]) * 2

    def shrink(self, tiles: ShrinkTiles) -> float:
        def call() -> None:
            for layer in range(LAYERS):
                lora_shrink(self.x, self.a[layer], self.blocks, self.scratch, tiles)
        return graph_microseconds(call, repeats=5) / LAYERS

    def expand(self, tiles: ExpandTiles) -> float:
        def call() -> None:
            for layer in range(LAYERS):
                lora_expand(self.b_t[layer], self.outs, self.blocks, self.scratch, tiles)
        return graph_microseconds(call, repeats=5) / LAYERS


def sweep(measure: Callable, tilings: list, nbytes: int, label: str, deadline: float) -> list[dict]:
    """Tilings at their default warps/stages, then warps x stages for the best two."""
    results = [_measure(measure, tiles, nbytes, label) for tiles in tilings if time.monotonic() < deadline]
    best = sorted((r for r in results if r["us"] is not None), key=lambda r: r["us"])[:2]
    for base, (warps, stages) in itertools.product(best, WARPS_STAGES):
        if time.monotonic() < deadline:
            tiles = type(base["tiles_obj"])(**{**asdict(base["tiles_obj"]), "warps": warps, "stages": stages})
            results.append(_measure(measure, tiles, nbytes, label))
    return results


def _measure(measure: Callable, tiles, nbytes: int, label: str) -> dict:
    try:
        us = measure(tiles)
    except Exception as error:  # a tiling the compiler or the GPU refuses (shared memory)
        print(f"{label:24} {tiles}: failed ({type(error).__name__})", flush=True)
        return {"tiles_obj": tiles, "us": None}
    print(f"{label:24} {tiles}: {us:8.2f} us/layer {nbytes / us / 1e3:7.0f} GB/s", flush=True)
    return {"tiles_obj": tiles, "us": us, "gbps": nbytes / us / 1e3}


def summarize(results: list[dict], default) -> dict:
    measured = [r for r in results if r["us"] is not None]
    if not measured:
        return {"default": asdict(default), "error": "no tiling ran"}
    best = min(measured, key=lambda r: r["us"])
    default_us = next((r["us"] for r in measured if r["tiles_obj"] == default), None)
    return {"best": asdict(best["tiles_obj"]), "best_us": best["us"], "best_gbps": best["gbps"],
            "default": asdict(default), "default_us": default_us,
            "all": [{**asdict(r["tiles_obj"]), "us": r["us"]} for r in measured]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop sweeping after this long")
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget_s
    report = run_record("lora_kernel_sweep", results={})
    for batch, name in itertools.product(BATCHES, GROUPS):
        bench = GroupBench(name, batch)
        shrink_default = shrink_tiles(batch, RANK, bench.in_features)
        expand_default = expand_tiles(batch, RANK)
        label = f"{name} b{batch}"
        shrinks = sweep(bench.shrink, [shrink_default, *SHRINK_TILINGS], bench.shrink_bytes, label + " shrink",
                        deadline)
        expands = sweep(bench.expand, [expand_default, *EXPAND_TILINGS], bench.expand_bytes, label + " expand",
                        deadline)
        report["results"][label] = {"shrink": summarize(shrinks, shrink_default),
                                    "expand": summarize(expands, expand_default)}
        del bench
        torch.cuda.empty_cache()
    for label, result in report["results"].items():
        for kernel in ("shrink", "expand"):
            r = result[kernel]
            if "best" in r:
                print(f"{label:12} {kernel}: default {r['default_us']:.2f} us, best {r['best_us']:.2f} us "
                      f"({r['best_gbps']:.0f} GB/s) {r['best']}")
    if args.out:
        write_result(args.out, report)


if __name__ == "__main__":
    main()
