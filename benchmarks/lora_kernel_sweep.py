"""Launch shapes of the multi-LoRA kernels on the 8B model's LoRA groups.

    python -m benchmarks.lora_kernel_sweep --out lora_sweep.json                  # decode steps
    python -m benchmarks.lora_kernel_sweep --prompt 400 --rank 16 --out mixed.json  # a mixed step
    python -m benchmarks.lora_kernel_sweep --prompt 400 --base-prompt              # its base-model twin

Eight adapters of `--rank` in eight slots of that rank. Decode batches of 16 and 64 tokens
spread evenly over them; with `--prompt N`, one batch of 8 decodes (one per slot) and an N-token
prompt on slot 0 (`--base-prompt`: on no adapter), cut into PROMPT_BLOCK_M-token blocks, the
expand storing into a staging buffer as a mixed step's side stream does. Each measurement is
32 layers' shrink (or expand) of one group, with distinct weights per layer so that nothing is
served from L2 (as in a real step), captured in a CUDA graph and replayed; it reports
microseconds per layer and the adapter bytes read per second.
The sweep is coordinate descent: tile sizes first at 4 warps and 3 stages, then warps and
stages for the best two tilings, batch by batch (the budget may cut the rest). Prints a table
and the best shape per group; asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

import torch

from benchmarks.common import graph_microseconds, run_record, write_result
from worker.batch import NO_ADAPTER
from worker.kernels.lora_blocks import BLOCK_M, PROMPT_BLOCK_M, lora_blocks, max_blocks
from worker.kernels.multi_lora import (ExpandTiles, LoraScratch, ShrinkTiles, expand_tiles, lora_expand, lora_shrink,
                                       shrink_tiles)

LAYERS, SLOTS, HIDDEN, INTERMEDIATE = 32, 8, 4096, 14336
GROUPS = {  # name: (in_features, out_features of each module)
    "qkv": (HIDDEN, (4096, 1024, 1024)),
    "o": (HIDDEN, (4096,)),
    "gate_up": (HIDDEN, (INTERMEDIATE, INTERMEDIATE)),
    "down": (INTERMEDIATE, (4096,)),
}
DECODE_BATCHES = (16, 64)
WARPS_STAGES = [(2, 3), *itertools.product((4, 8), (2, 3, 4))]


def shrink_tilings(rank: int, tokens: int) -> list[ShrinkTiles]:
    rank_tiles = sorted({min(r, max(16, rank)) for r in (16, 32, 64, 128)})
    return [ShrinkTiles(rank=r, k=k, k_per_split=s, tokens=tokens)
            for r, k, s in itertools.product(rank_tiles, (64, 128, 256), (512, 1024, 2048, 0))
            if (not s or s % k == 0) and r * k * tokens <= 128 * 64 * 64]


def expand_tilings(rank: int, tokens: int) -> list[ExpandTiles]:
    rank_tiles = sorted({min(r, max(16, rank)) for r in (16, 32, 64, 128)})
    return [ExpandTiles(n=n, rank=r, tokens=tokens) for n, r in itertools.product((32, 64, 128, 256), rank_tiles)
            if n * tokens <= 256 * 64]


class GroupBench:
    """One group's per-layer weights, a batch's block table and outputs."""

    def __init__(self, name: str, token_slots: Sequence[int], rank: int, block_m: int, staged: bool) -> None:
        self.in_features, outs = GROUPS[name]
        self.staged = staged  # expand stores (=) its deltas, as a step's side stream does, rather than adds
        gen = torch.Generator(device="cuda").manual_seed(0)

        def weights(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.01

        batch = len(token_slots)
        self.a = [[weights(SLOTS, rank, self.in_features) for _ in outs] for _ in range(LAYERS)]
        self.b_t = [[weights(SLOTS, rank, out) for out in outs] for _ in range(LAYERS)]
        self.x = weights(batch, self.in_features)
        self.outs = torch.zeros(batch, sum(outs), device="cuda", dtype=torch.bfloat16).split(list(outs), dim=1)
        table = lora_blocks(token_slots, [rank] * SLOTS, max_blocks(batch, SLOTS, block_m), block_m)
        self.blocks = torch.from_numpy(table).cuda()
        self.block_m = block_m
        smallest = ShrinkTiles(rank=16, k=64, k_per_split=512, tokens=block_m)  # most split-K partials and counters
        self.scratch = LoraScratch.allocate(batch, INTERMEDIATE, rank, SLOTS, torch.bfloat16, torch.device("cuda"),
                                            split_tiles=[smallest])
        self.shrink_bytes = sum(a.numel() for a in self.a[0]) * 2
        self.expand_bytes = sum(b.numel() for b in self.b_t[0]) * 2

    def shrink(self, tiles: ShrinkTiles) -> float:
        def call() -> None:
            for layer in range(LAYERS):
                lora_shrink(self.x, self.a[layer], self.blocks, self.scratch, tiles, self.block_m)
        return graph_microseconds(call, repeats=5) / LAYERS

    def expand(self, tiles: ExpandTiles) -> float:
        def call() -> None:
            for layer in range(LAYERS):
                lora_expand(self.b_t[layer], self.outs, self.blocks, self.scratch, tiles,
                            accumulate=not self.staged, block_m=self.block_m)
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


def batches(args: argparse.Namespace) -> list[tuple[str, list[int], int]]:
    """(label, token slots sorted by slot, block_m) of each batch to sweep."""
    if not args.prompt:
        return [(f"b{batch}", [slot for slot in range(SLOTS) for _ in range(batch // SLOTS)], BLOCK_M)
                for batch in DECODE_BATCHES]
    prompt_slot = NO_ADAPTER if args.base_prompt else 0
    slots = sorted([*range(SLOTS), *[prompt_slot] * args.prompt])
    return [(f"b8+p{args.prompt}{' base' if args.base_prompt else ''}", slots, PROMPT_BLOCK_M)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop sweeping after this long")
    parser.add_argument("--rank", type=int, default=256, help="the adapters' rank and the slots'")
    parser.add_argument("--prompt", type=int, default=0, help="sweep a mixed step: 8 decodes and a prompt this long")
    parser.add_argument("--base-prompt", action="store_true", help="the prompt uses no adapter")
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget_s
    report = run_record("lora_kernel_sweep", rank=args.rank, prompt=args.prompt, base_prompt=args.base_prompt,
                        results={})
    for (batch_label, token_slots, block_m), name in itertools.product(batches(args), GROUPS):
        bench = GroupBench(name, token_slots, args.rank, block_m, staged=bool(args.prompt))
        batch = len(token_slots)
        shrink_default = shrink_tiles(batch, args.rank, bench.in_features, block_m)
        expand_default = expand_tiles(batch, args.rank, block_m)
        label = f"{name} {batch_label}"
        shrinks = sweep(bench.shrink, [shrink_default, *shrink_tilings(args.rank, block_m)], bench.shrink_bytes,
                        label + " shrink", deadline)
        expands = sweep(bench.expand, [expand_default, *expand_tilings(args.rank, block_m)], bench.expand_bytes,
                        label + " expand", deadline)
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
