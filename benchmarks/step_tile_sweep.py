"""Launch shapes of the multi-LoRA kernels chosen by the time of a whole step.

    python benchmarks/step_tile_sweep.py --out step_tile_sweep.json

`lora_kernel_sweep.py` times the kernels alone; in a step they run beside the base GEMMs on
a side stream, both reading memory, and a mixed step waits on them. Here the 8B shape
(dummy weights) with 8 rank-256 adapters runs each scenario (a decode step of 9 sequences
over 8 adapters, the seed workload's usual batch; a mixed step of 8 decodes and a 400-token
prompt) with the launch-shape choice of `worker.kernels.multi_lora` replaced by each
candidate in turn: the step's CUDA graph is recaptured and its replays timed with CUDA
events (median of 5 runs of 10 replays). Coordinate descent: one knob at a time, tilings
first, then warps and stages of the best, keeping the best before the next knob. Prints
every measurement and the best per knob; asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, replace

import torch

from profile_decode import build_engine, step_batch  # a sibling: benchmarks/ is on sys.path as a script
from worker import graph_step as decode_step
from worker.kernels import multi_lora
from worker.kernels.multi_lora import BLOCK_M, WIDE_INPUT, ExpandTiles, LoraScratch, ShrinkTiles

WARPS_STAGES = [(2, 3), (4, 2), (4, 4), (8, 3), (8, 4)]


def shrink_grid(ranks, ks, splits) -> list[ShrinkTiles]:
    return [ShrinkTiles(rank=r, k=k, k_per_split=s) for r, k, s in itertools.product(ranks, ks, splits) if s % k == 0]


def expand_grid(ns, ranks) -> list[ExpandTiles]:
    return [ExpandTiles(n=n, rank=r) for n, r in itertools.product(ns, ranks)]


DECODE_KNOBS = {
    "shrink_narrow": shrink_grid((16, 32, 64), (128, 256), (1024, 2048, 4096)),
    "shrink_wide": shrink_grid((32, 64), (64, 128, 256), (1024, 2048, 3584, 7168)),
    "expand": expand_grid((64, 128, 256), (32, 64, 128)),
}
MIXED_KNOBS = {
    "block_m": [32, 64, 128],
    "prompt_shrink_narrow": [replace(t, stages=2) for t in shrink_grid((32, 64), (64, 128), (1024, 2048, 4096))]
    + [ShrinkTiles(rank=r, k=64, k_per_split=0) for r in (32, 64, 128)],
    "prompt_shrink_wide": [replace(t, stages=2) for t in shrink_grid((32, 64), (64, 128), (2048, 3584, 7168))]
    + [ShrinkTiles(rank=r, k=64, k_per_split=0) for r in (32, 64, 128)],
    "prompt_expand": [replace(t, stages=2) for t in expand_grid((64, 128, 256), (32, 64))],
}


class Choice:
    """The launch shapes in force, standing in for `shrink_tiles` and `expand_tiles`."""

    def __init__(self) -> None:
        self.shapes: dict = {
            "shrink_narrow": multi_lora.DECODE_SHRINK_NARROW, "shrink_wide": multi_lora.DECODE_SHRINK_WIDE,
            "expand": multi_lora.expand_tiles(16, 256),
            "block_m": multi_lora.PROMPT_BLOCK_M,
            "prompt_shrink_narrow": multi_lora.PROMPT_SHRINK_NARROW,
            "prompt_shrink_wide": multi_lora.PROMPT_SHRINK_WIDE,
            "prompt_expand": multi_lora.PROMPT_EXPAND,
        }

    def shrink_tiles(self, num_tokens: int, max_rank: int, in_features: int, block_m: int = BLOCK_M) -> ShrinkTiles:
        width = "wide" if in_features > WIDE_INPUT else "narrow"
        if block_m > BLOCK_M:
            return replace(self.shapes[f"prompt_shrink_{width}"], tokens=block_m)
        return self.shapes[f"shrink_{width}"]

    def expand_tiles(self, num_tokens: int, max_rank: int, block_m: int = BLOCK_M) -> ExpandTiles:
        return replace(self.shapes["prompt_expand"], tokens=block_m) if block_m > BLOCK_M else self.shapes["expand"]


def every_split_shape() -> list[ShrinkTiles]:
    shapes = [t for knob in ("shrink_narrow", "shrink_wide") for t in DECODE_KNOBS[knob]]
    shapes += [replace(t, tokens=m) for knob in ("prompt_shrink_narrow", "prompt_shrink_wide") for t in MIXED_KNOBS[knob]
               for m in MIXED_KNOBS["block_m"]]
    return [t for t in shapes if t.k_per_split]


class StepTimer:
    def __init__(self, engine, sequences, choice: Choice) -> None:
        self.engine, self.sequences, self.choice = engine, sequences, choice
        self.runner = engine.decode_runner

    def __call__(self) -> float:
        """Microseconds per replay of the step's freshly captured graph."""
        decode_step.PROMPT_BLOCK_M = self.choice.shapes["block_m"]  # read when a shape's inputs are made
        self.runner._inputs.clear()
        self.runner._graphs.clear()
        self.runner._layered.clear()
        self.runner._pool = torch.cuda.graph_pool_handle()  # a dropped graph's pool cannot take a new capture
        self.engine.forward(self.sequences)  # warms up and captures with the shapes in force
        self.engine.forward(self.sequences)
        (graph, _), = self.runner._graphs.values()
        runs = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            runs.append(start.elapsed_time(end) * 100)  # ms per 10 replays -> us per replay
        return statistics.median(runs)


def measure(timer: StepTimer, label: str, knob: str, value) -> float | None:
    try:
        us = timer()
    except Exception as error:  # a shape the compiler or the GPU refuses (shared memory)
        torch.cuda.synchronize()
        print(f"{label:8} {knob:22} {value}: failed ({type(error).__name__}: {str(error)[:80]})", flush=True)
        return None
    print(f"{label:8} {knob:22} {value}: {us:8.1f} us", flush=True)
    return us


def descend(timer: StepTimer, choice: Choice, label: str, knobs: dict, deadline: float) -> dict:
    results: dict = {}
    for knob, candidates in knobs.items():
        start_value = choice.shapes[knob]
        tried = [(start_value, measure(timer, label, knob, start_value))]
        for value in candidates:
            if time.monotonic() > deadline:
                break
            choice.shapes[knob] = value
            tried.append((value, measure(timer, label, knob, value)))
        if knob != "block_m":
            best_two = sorted((t for t in tried if t[1] is not None), key=lambda t: t[1])[:2]
            for (base, _), (warps, stages) in itertools.product(best_two, WARPS_STAGES):
                if time.monotonic() > deadline:
                    break
                choice.shapes[knob] = value = replace(base, warps=warps, stages=stages)
                tried.append((value, measure(timer, label, knob, value)))
        measured = [t for t in tried if t[1] is not None]
        if not measured:
            raise RuntimeError(f"no {knob} shape ran")
        best = min(measured, key=lambda t: t[1])
        choice.shapes[knob] = best[0]
        results[knob] = {"start": plain_shape(start_value), "start_us": tried[0][1], "best": plain_shape(best[0]),
                         "best_us": best[1], "all": [{"shape": plain_shape(v), "us": us} for v, us in measured]}
        print(f"{label:8} {knob:22} best {best[0]}: {best[1]:.1f} us (start {tried[0][1]})", flush=True)
    return results


def plain_shape(value):
    """A knob's value as JSON: a block size as is, a launch shape as its fields."""
    return value if isinstance(value, int) else asdict(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop sweeping after this long")
    parser.add_argument("--scenarios", default="decode,mixed")
    parser.add_argument("--knobs", help="sweep only these knobs (comma-separated; default: all of a scenario's)")
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget_s
    engine = build_engine(rank=256, adapters=8)
    runner, choice = engine.decode_runner, Choice()
    old = runner._lora_scratch
    runner._lora_scratch = LoraScratch.allocate(old.shrunk.shape[0], 14336, 256, engine.slots.num_slots,
                                                old.shrunk.dtype, old.shrunk.device,
                                                split_tiles=every_split_shape(), delta_columns=old.deltas.shape[1])
    patch: dict[str, Callable] = {"shrink_tiles": choice.shrink_tiles, "expand_tiles": choice.expand_tiles}
    for name, function in patch.items():
        setattr(multi_lora, name, function)
    report = {"gpu": torch.cuda.get_device_name(), "results": {}}
    scenarios = {"decode": (step_batch(9, 8, 512, 0), DECODE_KNOBS), "mixed": (step_batch(8, 8, 512, 400), MIXED_KNOBS)}
    for label in args.scenarios.split(","):
        sequences, knobs = scenarios[label]
        if args.knobs:
            knobs = {knob: values for knob, values in knobs.items() if knob in args.knobs.split(",")}
        report["results"][label] = descend(StepTimer(engine, sequences, choice), choice, label, knobs, deadline)
    print(json.dumps({label: {knob: (r["best"], round(r["best_us"], 1), r["start_us"]) for knob, r in res.items()}
                      for label, res in report["results"].items()}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
