"""The LoRA of a step carrying a prompt, by method and launch shape.

    python benchmarks/mixed_lora_bench.py --compare --out compare.json    # methods
    python benchmarks/mixed_lora_bench.py --sweep --out sweep.json        # two-table shapes
    python benchmarks/mixed_lora_bench.py --carveouts 0,16,32             # SMs kept from the base GEMM

A step of the seed workload carries one prompt of a few hundred tokens beside about eight
decodes over eight rank-256 adapters (8B sizes). Per LoRA group, 32 layers of distinct weights
(nothing served from L2), captured in a CUDA graph, microseconds per layer of:

- `triton`: `lora_shrink` + `lora_expand` (staged deltas) over the step's one block table,
  with the shapes of a step carrying a prompt;
- `grouped`: `torch._grouped_mm` (CUTLASS on Hopper) over per-slot token groups for the shrink
  and the expand of each module, base-model and padding rows masked between them;
- `gathered`: `triton` without the prompt's tokens (their rows store zeros), then the prompt's
  adapter's A and B copied (`index_select` of its slot: the slot is a device value, so a graph
  replays it for any adapter) into fixed buffers and applied to the prompt with cuBLAS `mm`;
- `dense`: the prompt's tokens alone through plain `mm` with its adapter (a floor, not a method);
- `two_table` (`--sweep`): the decode tokens' blocks with the decode steps' shapes, then the
  prompt tokens' blocks with candidate prompt shapes, each its own launch (coordinate descent
  over the prompt's block size, shrink shape, then expand shape);

each beside the group's base GEMM on a second stream (as in a step), with the base GEMM alone
for reference. `--carveouts`: `triton` beside the base GEMM that cuBLAS runs on all SMs but
that many (`torch._C._set_sm_carveout_experimental`, read when the graph is captured), so the
LoRA kernels keep SMs of their own. Prints the outputs' largest difference from `triton` and every
time; asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from gpu_timing import graph_microseconds  # siblings: benchmarks/ is on sys.path when run as a script
from lora_kernel_sweep import GROUPS, INTERMEDIATE, LAYERS, RANK, SLOTS
from step_tile_sweep import plain_shape
from worker.kernels.lora_blocks import BLOCK_M, PROMPT_BLOCK_M, lora_blocks, max_blocks
from worker.kernels.multi_lora import (DECODE_SHRINK_NARROW, DECODE_SHRINK_WIDE, WIDE_INPUT, ExpandTiles, LoraScratch,
                                       ShrinkTiles, expand_tiles, lora_expand, lora_shrink, shrink_tiles)

SCENARIOS = {"p400+8": (400, 8, 512), "p200+8": (200, 8, 256), "p100+8": (100, 8, 128)}  # prompt, decodes, bucket
SWEEP_BLOCK_M = (64, 128)
SWEEP_SHRINK = [ShrinkTiles(rank=r, k=k, k_per_split=s, warps=w, stages=st)
                for r, k, s, (w, st) in itertools.product((64, 128), (64, 128), (0, 1024, 2048),
                                                          ((4, 3), (8, 3), (8, 4)))
                if s % k == 0]
SWEEP_SHRINK_WIDE = [ShrinkTiles(rank=r, k=k, k_per_split=s, warps=w, stages=st)
                     for r, k, s, (w, st) in itertools.product((64, 128), (64, 128), (0, 2048, 3584, 7168),
                                                               ((4, 3), (8, 3), (8, 4)))
                     if s % k == 0]
SWEEP_EXPAND = [ExpandTiles(n=n, rank=r, warps=w, stages=st)
                for n, r, (w, st) in itertools.product((128, 256), (32, 64), ((4, 2), (4, 3), (8, 2), (8, 3)))]


def block_rows(token_slots: list[int], in_table: list[bool], block_m: int) -> np.ndarray:
    """The block table of the tokens `in_table` marks (runs of one slot among them)."""
    marked = [slot if keep else None for slot, keep in zip(token_slots, in_table)]
    rows, position = [], 0
    for value, run in itertools.groupby(marked):
        length = sum(1 for _ in run)
        if value is not None:
            slot, rank = (0, 0) if value < 0 else (value, RANK)
            rows.extend((slot, s, min(s + block_m, position + length), rank)
                        for s in range(position, position + length, block_m))
        position += length
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


class MixedGroup:
    def __init__(self, name: str, prompt: int, decodes: int, bucket: int) -> None:
        self.in_features, self.outs = GROUPS[name]
        self.wide = self.in_features > WIDE_INPUT
        gen = torch.Generator(device="cuda").manual_seed(0)

        def weights(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.02

        self.a = [[weights(SLOTS, RANK, self.in_features) for _ in self.outs] for _ in range(LAYERS)]
        self.b_t = [[weights(SLOTS, RANK, out) for out in self.outs] for _ in range(LAYERS)]
        self.base = [weights(sum(self.outs), self.in_features) for _ in range(LAYERS)]
        self.x = weights(bucket, self.in_features)
        # Sorted by slot: slot 0's decode, the prompt (slot 0), the other decodes, padding.
        token_slots = [0] + [0] * prompt + [i % SLOTS for i in range(1, decodes)]
        is_prompt = [False] + [True] * prompt + [False] * (decodes - 1)
        token_slots += [-1] * (bucket - len(token_slots))
        is_prompt += [False] * (bucket - len(is_prompt))
        self.token_slots, self.is_prompt, self.prompt = token_slots, is_prompt, prompt
        table = lora_blocks(token_slots, [RANK] * SLOTS, max_blocks(bucket, SLOTS, PROMPT_BLOCK_M), PROMPT_BLOCK_M)
        self.blocks = torch.from_numpy(table).cuda()
        self.decode_blocks = torch.from_numpy(block_rows(token_slots, [not p for p in is_prompt], BLOCK_M)).cuda()
        self.prompt_blocks = {m: torch.from_numpy(block_rows(token_slots, is_prompt, m)).cuda() for m in SWEEP_BLOCK_M}
        split_tiles = [replace(t, tokens=m) for t in SWEEP_SHRINK + SWEEP_SHRINK_WIDE if t.k_per_split
                       for m in SWEEP_BLOCK_M] + [DECODE_SHRINK_NARROW, DECODE_SHRINK_WIDE]
        self.scratch = LoraScratch.allocate(bucket, INTERMEDIATE, RANK, SLOTS, torch.bfloat16, torch.device("cuda"),
                                            split_tiles=split_tiles, delta_columns=2 * INTERMEDIATE)
        counts = [token_slots.count(slot) for slot in range(SLOTS)]
        ends = torch.tensor(counts, dtype=torch.int64).cumsum(0)
        ends[-1] = bucket  # padding rows join the last group, then are masked
        self.offsets = ends.to(torch.int32).cuda()
        self.adapted = torch.tensor([s >= 0 for s in token_slots], device="cuda")[:, None]
        self.staged = self.scratch.deltas.view(-1)[:bucket * sum(self.outs)].view(bucket, -1)
        # `gathered`: the prompt's tokens leave the Triton table (rank-0 rows store zeros) and
        # go through cuBLAS with their adapter's weights gathered into fixed buffers.
        outside = [-1 if p else s for s, p in zip(token_slots, is_prompt)]
        self.blocks_without_prompt = torch.from_numpy(
            lora_blocks(outside, [RANK] * SLOTS, max_blocks(bucket, SLOTS, PROMPT_BLOCK_M), PROMPT_BLOCK_M)).cuda()
        self.prompt_slot = torch.zeros(1, dtype=torch.int64, device="cuda")
        self.prompt_rows = torch.tensor(is_prompt, device="cuda", dtype=torch.bfloat16)[:, None]
        self.a_gathered = torch.empty(len(self.outs), 1, RANK, self.in_features, device="cuda", dtype=torch.bfloat16)
        self.b_gathered = [torch.empty(1, RANK, out, device="cuda", dtype=torch.bfloat16) for out in self.outs]

    def _parts(self) -> list[torch.Tensor]:
        return list(self.staged.split(list(self.outs), dim=1))

    def triton(self, layer: int) -> list[torch.Tensor]:
        lora_shrink(self.x, self.a[layer], self.blocks, self.scratch, block_m=PROMPT_BLOCK_M)
        parts = self._parts()
        lora_expand(self.b_t[layer], parts, self.blocks, self.scratch, accumulate=False, block_m=PROMPT_BLOCK_M)
        return parts

    def gathered(self, layer: int) -> list[torch.Tensor]:
        lora_shrink(self.x, self.a[layer], self.blocks_without_prompt, self.scratch, block_m=PROMPT_BLOCK_M)
        parts = self._parts()
        lora_expand(self.b_t[layer], parts, self.blocks_without_prompt, self.scratch, accumulate=False,
                    block_m=PROMPT_BLOCK_M)
        for module, (a, b_t) in enumerate(zip(self.a[layer], self.b_t[layer])):
            torch.index_select(a, 0, self.prompt_slot, out=self.a_gathered[module])
            torch.index_select(b_t, 0, self.prompt_slot, out=self.b_gathered[module])
        shrunk = self.x @ self.a_gathered.view(-1, self.in_features).T
        shrunk.mul_(self.prompt_rows)
        for module, (part, b_t) in enumerate(zip(parts, self.b_gathered)):
            part.addmm_(shrunk[:, module * RANK:(module + 1) * RANK], b_t[0])
        return parts

    def two_table(self, block_m: int, shrink: ShrinkTiles, expand: ExpandTiles) -> Callable[[int], list]:
        decode_shrink = DECODE_SHRINK_WIDE if self.wide else DECODE_SHRINK_NARROW
        decode_expand = expand_tiles(0, RANK)
        prompt_blocks = self.prompt_blocks[block_m]
        shrink, expand = replace(shrink, tokens=block_m), replace(expand, tokens=block_m)

        def call(layer: int) -> list[torch.Tensor]:
            parts = self._parts()
            lora_shrink(self.x, self.a[layer], self.decode_blocks, self.scratch, tiles=decode_shrink)
            lora_shrink(self.x, self.a[layer], prompt_blocks, self.scratch, tiles=shrink, block_m=block_m)
            lora_expand(self.b_t[layer], parts, self.decode_blocks, self.scratch, tiles=decode_expand,
                        accumulate=False)
            lora_expand(self.b_t[layer], parts, prompt_blocks, self.scratch, tiles=expand, accumulate=False,
                        block_m=block_m)
            return parts
        return call

    def grouped(self, layer: int) -> list[torch.Tensor]:
        results = []
        for a, b_t in zip(self.a[layer], self.b_t[layer]):
            shrunk = torch._grouped_mm(self.x, a.transpose(1, 2), offs=self.offsets)
            shrunk = torch.where(self.adapted, shrunk, 0)
            results.append(torch._grouped_mm(shrunk, b_t, offs=self.offsets))
        return results

    def dense(self, layer: int) -> list[torch.Tensor]:
        x = self.x[:self.prompt]
        return [(x @ a[0].T) @ b_t[0] for a, b_t in zip(self.a[layer], self.b_t[layer])]

    def base_gemm(self, layer: int) -> torch.Tensor:
        return F.linear(self.x, self.base[layer])


def per_layer(method: Callable[[int], object]) -> float:
    def call() -> None:
        for layer in range(LAYERS):
            method(layer)
    return statistics.median(graph_microseconds(call, repeats=5) for _ in range(3)) / LAYERS


def beside_base(group: MixedGroup, method: Callable[[int], object]) -> Callable[[int], None]:
    side = torch.cuda.Stream()

    def call(layer: int) -> None:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            method(layer)
        group.base_gemm(layer)
        torch.cuda.current_stream().wait_stream(side)
    return call


def largest_difference(expected: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    return max((e.float() - g.float()).abs().max().item() for e, g in zip(expected, got))


def compare(group: MixedGroup) -> dict:
    expected = [t.clone() for t in group.triton(0)]
    row = {"grouped_max_abs_difference": largest_difference(expected, group.grouped(0)),
           "gathered_max_abs_difference": largest_difference(expected, group.gathered(0)),
           "base": per_layer(group.base_gemm)}
    for method in ("triton", "gathered", "grouped", "dense"):
        row[method] = per_layer(getattr(group, method))
        row[f"{method}+base"] = per_layer(beside_base(group, getattr(group, method)))
    return row


def carveouts(group: MixedGroup, counts: list[int]) -> dict:
    row = {}
    for count in counts:
        torch._C._set_sm_carveout_experimental(count)
        try:
            row[f"base@{count}"] = per_layer(group.base_gemm)
            row[f"triton+base@{count}"] = per_layer(beside_base(group, group.triton))
        finally:
            torch._C._set_sm_carveout_experimental(0)
    return row


def sweep(group: MixedGroup, label: str) -> dict:
    """Coordinate descent over the prompt part's block size, shrink shape, then expand shape,
    each timed beside the base GEMM."""
    expected = [t.clone() for t in group.triton(0)]
    start_shrink = shrink_tiles(len(group.token_slots), RANK, group.in_features, PROMPT_BLOCK_M)
    choice = {"block_m": PROMPT_BLOCK_M, "shrink": replace(start_shrink, tokens=BLOCK_M),
              "expand": replace(expand_tiles(0, RANK, PROMPT_BLOCK_M), tokens=BLOCK_M)}
    row = {"base": per_layer(group.base_gemm), "triton+base": per_layer(beside_base(group, group.triton))}
    print(f"{label} base {row['base']:.1f} triton+base {row['triton+base']:.1f}", flush=True)
    knobs = {"block_m": SWEEP_BLOCK_M, "shrink": SWEEP_SHRINK_WIDE if group.wide else SWEEP_SHRINK,
             "expand": SWEEP_EXPAND}
    tried = []
    for knob, values in knobs.items():
        results = []
        for value in values:
            candidate = {**choice, knob: value}
            call = group.two_table(candidate["block_m"], candidate["shrink"], candidate["expand"])
            try:
                difference = largest_difference(expected, call(0))
                us = per_layer(beside_base(group, call))
            except Exception as error:  # a shape the compiler or the GPU refuses
                torch.cuda.synchronize()
                print(f"{label} {knob} {value}: failed ({type(error).__name__})", flush=True)
                continue
            results.append((us, value))
            tried.append({"knob": knob, "value": plain_shape(value), "us": us, "max_abs_difference": difference})
            print(f"{label} {knob} {value}: {us:.1f} us (difference {difference:.3g})", flush=True)
        if results:
            choice[knob] = min(results, key=lambda r: r[0])[1]
    best = min((t for t in tried if t["knob"] == "expand"), key=lambda t: t["us"], default=None)
    row.update({"best": {k: plain_shape(v) for k, v in choice.items()}, "best_us": best and best["us"], "tried": tried})
    print(f"{label} best {choice}: {row['best_us']} us beside base (one table: {row['triton+base']:.1f})", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--compare", action="store_true", help="triton, grouped GEMM and dense, every scenario")
    parser.add_argument("--sweep", action="store_true", help="two-table launch shapes (the p400+8 scenario)")
    parser.add_argument("--carveouts", help="comma-separated SM counts (the p400+8 and p200+8 scenarios)")
    parser.add_argument("--groups", default=",".join(GROUPS))
    args = parser.parse_args()
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "compare": {}, "sweep": {},
              "carveouts": {}}
    runs = [("compare", label) for label in SCENARIOS] if args.compare else []
    runs += [("sweep", "p400+8")] if args.sweep else []
    runs += [("carveouts", label) for label in ("p400+8", "p200+8")] if args.carveouts else []
    for kind, label in runs:
        for name in args.groups.split(","):
            group = MixedGroup(name, *SCENARIOS[label])
            if kind in ("compare", "carveouts"):
                row = (compare(group) if kind == "compare"
                       else carveouts(group, [int(count) for count in args.carveouts.split(",")]))
                print(f"{label:7} {name:8} " + " ".join(f"{k} {v:8.4g}" for k, v in row.items()), flush=True)
            else:
                row = sweep(group, f"{label} {name}")
            report[kind][f"{label} {name}"] = row
            del group
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
