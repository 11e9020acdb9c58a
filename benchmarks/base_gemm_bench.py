"""The decode step's base projections: cuBLAS (`F.linear`) against the one-launch split-K kernel.

    python benchmarks/base_gemm_bench.py --out base_gemm_h200.json

For each projection of the 8B shape (q/k/v fused, o, gate/up fused, down) and batch size,
32 layers' distinct weights (so that no layer finds its weight in L2) are multiplied in turn
inside one CUDA graph, as in a decode step; the graph's replays are timed with CUDA events
(median of 5 runs of 10 replays) and reported per projection with the bandwidth its weight
bytes imply. `worker.kernels.skinny_gemm` runs with each candidate launch shape. Prints every
measurement; asserts nothing. Alone, not beside the LoRA kernels: `profile_decode.py` shows the
step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from worker.kernels.skinny_gemm import MAX_TOKENS, GemmScratch, GemmTiles, skinny_linear

LAYERS = 32
PROJECTIONS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
CANDIDATES = [GemmTiles(n=n, k=k, k_per_split=s, warps=w, stages=st)
              for n, k, s, (w, st) in itertools.product((32, 64, 128), (128, 256), (512, 1024, 2048),
                                                        ((4, 3), (4, 4), (8, 4)))
              if s % k == 0]


def time_graph(run: Callable[[], None]) -> float:
    """Median ms of one replay of a graph of `run`."""
    run()  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    runs = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        end.synchronize()
        runs.append(start.elapsed_time(end) / 10)
    return statistics.median(runs)


def per_call_us(linear, x: torch.Tensor, weights: list[torch.Tensor]) -> float:
    def run() -> None:
        for weight in weights:
            linear(x, weight, None)
    return time_graph(run) * 1e3 / len(weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,9,16")
    parser.add_argument("--projections", default=",".join(PROJECTIONS))
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    device = torch.device("cuda")
    results = []
    for name in args.projections.split(","):
        out_features, in_features = PROJECTIONS[name]
        weights = [torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16) * 0.02
                   for _ in range(LAYERS)]
        gb = out_features * in_features * 2 / 1e9
        scratch = GemmScratch.allocate(out_features, in_features, device, GemmTiles(n=32, k=128, k_per_split=512))
        for tokens in map(int, args.tokens.split(",")):
            x = torch.randn(tokens, in_features, device=device, dtype=torch.bfloat16)
            cublas = per_call_us(F.linear, x, weights)
            row = {"projection": name, "tokens": tokens, "cublas_us": cublas, "cublas_tbps": gb / cublas * 1e3,
                   "skinny": []}
            print(f"{name} [{out_features}x{in_features}] tokens {tokens}: cuBLAS {cublas:.1f} us "
                  f"({row['cublas_tbps']:.2f} TB/s)", flush=True)
            if tokens <= MAX_TOKENS:
                torch.testing.assert_close(skinny_linear(scratch)(x, weights[0], None), F.linear(x, weights[0]),
                                           atol=2e-2, rtol=2e-2)
                for tiles in CANDIDATES:
                    us = per_call_us(skinny_linear(scratch, tiles), x, weights)
                    row["skinny"].append({"tiles": tiles.__dict__, "us": us})
                best = min(row["skinny"], key=lambda r: r["us"])
                print(f"    best skinny {best['us']:.1f} us ({gb / best['us'] * 1e3:.2f} TB/s) {best['tiles']}; "
                      f"top 5: {[(round(r['us'], 1), tuple(r['tiles'].values())) for r in sorted(row['skinny'], key=lambda r: r['us'])[:5]]}",
                      flush=True)
            results.append(row)
        del weights
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
