"""Launch shapes of the folded readers (`--lora-fold`) in the 8B model's mixed step.

    python -m benchmarks.folded_reader_sweep --out folded-sweep.json

The step of `step_times`: 8 decodes, one per slot, and a 400-token prompt on slot 0, every slot of
rank 16, in PROMPT_BLOCK_M blocks. Each reader (`act_mul` with the gate/up expand, `add_rms_norm`
with the o or down expand, `rope_and_cache_kv` with the q/k/v expand) reads a GEMM output whose
extra columns are the shrunk inputs, as in a step. 32 layers' calls with distinct operands (so
that nothing is served from L2) are captured in a CUDA graph and replayed, for each launch shape
(`FoldedTiles`); the same reader without LoRA (the row kernel, the base model's step) is the
floor. `add_rms_norm` is timed three times: as the server runs it (two kernels) and as the two
one-kernel candidates of `benchmarks._fused_norm_triton`. Each reader gets an equal share of
`--budget-s`, its default shape timed first. Prints microseconds per layer and the GB/s of the
reader's own bytes (its input and output, not B), the default and the best shape per reader;
asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from benchmarks.common import graph_microseconds, run_record, write_result
from worker.kernels import elementwise
from worker.kernels.lora_blocks import PROMPT_BLOCK_M, lora_blocks, max_blocks
from worker.kernels.staged_deltas import ACT_TILES, NORM_TILES, ROPE_TILES, FoldedDeltas, FoldedTiles

if TYPE_CHECKING:
    from benchmarks._fused_norm_triton import RowTiles

LAYERS, SLOTS, RANK = 32, 8, 16
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 4096, 14336, 32, 8, 128
ROWS, COLUMNS, WARPS = (64, 32, 16), (64, 128, 256, 512), (2, 4, 8)  # wide parts first: B read fewer times
WALKING_ROWS, WALKING_COLUMNS, WALKING_WARPS = (1, 2, 4, 8), (1024, 2048, 4096), (4, 8)
DTYPE = torch.bfloat16
DEVICE = "cuda"


@dataclass(frozen=True)
class Reader:
    name: str
    default: FoldedTiles | RowTiles
    tilings: list[FoldedTiles | RowTiles]
    nbytes: int  # its input and output
    folded: Callable[[int, FoldedTiles | RowTiles], object]  # layer, tiles
    floor: Callable[[int], object]  # layer: the row kernel without LoRA


def step_slots(prompt: int) -> list[int]:
    """The token slots of 8 decodes and a prompt on slot 0, sorted by slot as a step's batch."""
    return sorted([*range(SLOTS), *[0] * prompt])


class Operands:
    """Per layer: GEMM outputs with the shrunk columns beside them, every slot's B^T."""

    def __init__(self, token_slots: list[int]) -> None:
        self.tokens = len(token_slots)
        self._gen = torch.Generator(device=DEVICE).manual_seed(0)
        table = lora_blocks(token_slots, [RANK] * SLOTS, max_blocks(self.tokens, SLOTS, PROMPT_BLOCK_M),
                            PROMPT_BLOCK_M)
        self.blocks = torch.from_numpy(table).to(DEVICE)
        self.token_slots = torch.tensor(token_slots, device=DEVICE)

    def randn(self, *shape: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=self._gen, device=DEVICE, dtype=DTYPE) * scale

    def gemm_output(self, outputs: list[int]) -> tuple[torch.Tensor, FoldedDeltas]:
        """A group's GEMM output [T, sum(outputs)] and its folded LoRA, the shrunk columns a view of it."""
        width = sum(outputs)
        gemm = self.randn(self.tokens, width + len(outputs) * SLOTS * RANK, scale=1.0)
        b_t = tuple(self.randn(SLOTS, RANK, n, scale=0.01) for n in outputs)
        return gemm[:, :width], FoldedDeltas(gemm[:, width:], b_t, self.blocks, PROMPT_BLOCK_M, self.token_slots)


def act_mul_reader(ops: Operands) -> Reader:
    from worker.kernels import _folded_readers_triton as folded  # Triton: on use, so that --help runs anywhere

    layers = [ops.gemm_output([INTERMEDIATE, INTERMEDIATE]) for _ in range(LAYERS)]
    tilings = [FoldedTiles(r, c, w) for r, c, w in itertools.product(ROWS, COLUMNS, WARPS) if r * c <= 64 * 256]
    return Reader("act_mul", ACT_TILES, tilings, 3 * ops.tokens * INTERMEDIATE * DTYPE.itemsize,
                  lambda layer, tiles: folded.act_mul(*layers[layer], "silu", tiles),
                  lambda layer: elementwise.act_mul(layers[layer][0]))


def norm_operands(ops: Operands) -> tuple[list, torch.Tensor, list[FoldedTiles], int]:
    """Per layer (hidden, the o or down output, its folded LoRA); the norm weight; the tilings; the bytes."""
    layers = [(ops.randn(ops.tokens, HIDDEN), *ops.gemm_output([HIDDEN])) for _ in range(LAYERS)]
    tilings = [FoldedTiles(r, c, w) for r, c, w in itertools.product(ROWS, COLUMNS, WARPS) if r * c <= 64 * 512]
    return layers, ops.randn(HIDDEN) + 1, tilings, 4 * ops.tokens * HIDDEN * DTYPE.itemsize


def add_rms_norm_reader(ops: Operands) -> Reader:
    from worker.kernels import _folded_readers_triton as folded

    layers, weight, tilings, nbytes = norm_operands(ops)
    return Reader("add_rms_norm", NORM_TILES, tilings, nbytes,
                  lambda layer, tiles: folded.add_rms_norm(*layers[layer][:2], weight, 1e-5, layers[layer][2], tiles),
                  lambda layer: elementwise.add_rms_norm(*layers[layer][:2], weight, 1e-5))


def sum_and_norm_reader(ops: Operands) -> Reader:
    """The one-kernel candidate for `add_rms_norm` (`benchmarks._fused_norm_triton`), on its operands."""
    from benchmarks._fused_norm_triton import SumAndNorm

    layers, weight, tilings, nbytes = norm_operands(ops)
    candidates: dict[FoldedTiles, Callable] = {}

    def call(layer: int, tiles: FoldedTiles):
        if tiles not in candidates:
            candidates[tiles] = SumAndNorm(ops.tokens, HIDDEN, ops.blocks.shape[0], PROMPT_BLOCK_M, tiles, DEVICE)
        return candidates[tiles](*layers[layer][:2], weight, 1e-5, layers[layer][2])

    return Reader("add_rms_norm 1 kernel", NORM_TILES, tilings, nbytes, call,
                  lambda layer: elementwise.add_rms_norm(*layers[layer][:2], weight, 1e-5))


def sum_and_norm_rows_reader(ops: Operands) -> Reader:
    """The row-walking one-kernel candidate for `add_rms_norm` (`benchmarks._fused_norm_triton`)."""
    from benchmarks._fused_norm_triton import RowTiles, sum_and_norm_rows

    layers, weight, _, nbytes = norm_operands(ops)
    tilings = [RowTiles(r, c, w) for r, c, w in itertools.product(WALKING_ROWS, WALKING_COLUMNS, WALKING_WARPS)
               if r * c <= 8192]
    return Reader("add_rms_norm rows", RowTiles(), tilings, nbytes,
                  lambda layer, tiles: sum_and_norm_rows(*layers[layer][:2], weight, 1e-5, layers[layer][2], tiles),
                  lambda layer: elementwise.add_rms_norm(*layers[layer][:2], weight, 1e-5))


def rope_reader(ops: Operands) -> Reader:
    from worker.kernels import _folded_readers_triton as folded

    outputs = [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM]
    layers = [ops.gemm_output(outputs) for _ in range(LAYERS)]
    cos, sin = (ops.randn(ops.tokens, 1, HEAD_DIM, scale=1.0) for _ in range(2))
    keys, values = (torch.zeros(ops.tokens, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE) for _ in range(2))
    write_index = torch.arange(ops.tokens, device=DEVICE)

    def call(layer: int, lora: FoldedDeltas | None, tiles: FoldedTiles | None):
        qkv = layers[layer][0]
        args = (HEADS, KV_HEADS, HEAD_DIM, cos, sin, None, None, 1e-5)
        caches = {"keys": keys, "values": values, "write_index": write_index}
        if tiles is None:
            return elementwise.rope_and_cache_kv(qkv, None, *args, **caches)
        return folded.rope_and_cache_kv(qkv, lora, *args, **caches, tiles=tiles)

    tilings = [FoldedTiles(rows=r, warps=w) for r, w in itertools.product(ROWS, WARPS)]
    return Reader("rope_and_cache_kv", ROPE_TILES, tilings, 2 * ops.tokens * sum(outputs) * DTYPE.itemsize,
                  lambda layer, tiles: call(layer, layers[layer][1], tiles), lambda layer: call(layer, None, None))


def layers_microseconds(call: Callable[[int], object]) -> float:
    def all_layers() -> None:
        for layer in range(LAYERS):
            call(layer)
    return graph_microseconds(all_layers, repeats=5) / LAYERS


def sweep(reader: Reader, deadline: float) -> dict:
    floor = layers_microseconds(reader.floor)
    print(f"{reader.name:22} without LoRA: {floor:7.2f} us/layer {reader.nbytes / floor / 1e3:6.0f} GB/s", flush=True)
    measured: dict[FoldedTiles, float] = {}
    for tiles in dict.fromkeys([reader.default, *reader.tilings]):
        if time.monotonic() > deadline:
            break
        try:
            measured[tiles] = layers_microseconds(lambda layer: reader.folded(layer, tiles))
        except Exception as error:  # a shape the compiler or the GPU refuses (registers, shared memory)
            print(f"{reader.name:22} {tiles}: failed ({type(error).__name__})", flush=True)
            continue
        print(f"{reader.name:22} {tiles}: {measured[tiles]:7.2f} us/layer "
              f"{reader.nbytes / measured[tiles] / 1e3:6.0f} GB/s", flush=True)
    best = min(measured, key=measured.__getitem__, default=None)
    return {"without_lora_us": floor, "bytes": reader.nbytes, "default": asdict(reader.default),
            "default_us": measured.get(reader.default), "best": best and {**asdict(best), "us": measured[best]},
            "all": [{**asdict(tiles), "us": us} for tiles, us in measured.items()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--prompt", type=int, default=400, help="the prompt's tokens beside the 8 decodes")
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop sweeping after this long")
    args = parser.parse_args()
    if DEVICE == "cuda" and not torch.cuda.is_available():
        parser.error("times the folded readers on a CUDA GPU: this machine has none")
    ops = Operands(step_slots(args.prompt))
    report = run_record("folded_reader_sweep", prompt=args.prompt, rank=RANK, slots=SLOTS, results={})
    builders = (act_mul_reader, add_rms_norm_reader, sum_and_norm_reader, sum_and_norm_rows_reader, rope_reader)
    for build in builders:
        reader = build(ops)
        report["results"][reader.name] = sweep(reader, time.monotonic() + args.budget_s / len(builders))
        del reader
        torch.cuda.empty_cache()
    for name, result in report["results"].items():
        best = result["best"]
        if best is not None:
            default = result["default_us"] or float("nan")  # the budget ran out before the default was timed
            print(f"{name:22} without LoRA {result['without_lora_us']:.2f} us, default {default:.2f} us, best "
                  f"{best['us']:.2f} us (rows {best['rows']}, columns {best['columns']}, warps {best['warps']})")
    if args.out:
        write_result(args.out, report)


if __name__ == "__main__":
    main()
