"""What a prompt's LoRA would cost folded into cuBLAS GEMMs (the 8B shape, bf16, CUDA graphs):
the base GEMM over [W; A] (the shrink as extra output columns) against the base GEMM alone, and
the expand as one GEMM accumulating into the prompt's rows of the output (the group's modules' B
stacked block-diagonally: one [G * rank, outputs] matrix, timed dense).

    python -m benchmarks.fused_shrink_gemm --tokens 512 --prompt 400 --ranks 16 64 256
Prints microseconds a call per module group, from replays of a graph that calls it once per
layer over distinct weights (so weights come from memory, not L2).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from benchmarks.common import graph_microseconds, run_record, write_result

HIDDEN, KV, INTERMEDIATE, LAYERS = 4096, 1024, 14336, 32
GROUPS = {  # name: (input width, output widths of its modules)
    "qkv": (HIDDEN, (HIDDEN, KV, KV)),
    "o": (HIDDEN, (HIDDEN,)),
    "gate_up": (HIDDEN, (INTERMEDIATE, INTERMEDIATE)),
    "down": (INTERMEDIATE, (HIDDEN,)),
}


def per_layer_us(call: Callable[[torch.Tensor], object], weights: list[torch.Tensor], repeats: int) -> float:
    """Microseconds a call of `call` when one graph calls it once per weight."""
    return graph_microseconds(lambda: [call(w) for w in weights], repeats) / len(weights)


def measure(group: str, rank: int, tokens: int, prompt: int, layers: int, repeats: int) -> dict[str, float]:
    width, outputs = GROUPS[group]
    n, shrunk = sum(outputs), rank * len(outputs)
    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
    extended = [torch.randn(n + shrunk, width, device="cuda", dtype=torch.bfloat16) * 0.01 for _ in range(layers)]
    b_side_by_side = [torch.randn(shrunk, n, device="cuda", dtype=torch.bfloat16) * 0.01 for _ in range(layers)]
    out = torch.empty(tokens, n + shrunk, device="cuda", dtype=torch.bfloat16)
    base_out = torch.empty(tokens, n, device="cuda", dtype=torch.bfloat16)
    s = torch.randn(prompt, shrunk, device="cuda", dtype=torch.bfloat16)
    rows = slice(tokens - prompt, tokens)
    base = per_layer_us(lambda w: torch.matmul(x, w[:n].t(), out=base_out), extended, repeats)
    fused = per_layer_us(lambda w: torch.matmul(x, w.t(), out=out), extended, repeats)
    expand = per_layer_us(lambda b: base_out[rows].addmm_(s, b), b_side_by_side, repeats)
    return {"base_us": base, "with_shrink_us": fused, "shrink_us": fused - base, "expand_us": expand}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512, help="the step's padded tokens")
    parser.add_argument("--prompt", type=int, default=400, help="the prompt's tokens (one adapter)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--layers", type=int, default=8, help="distinct weights a graph cycles through")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", help="the result file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: it times cuBLAS GEMMs replayed from CUDA graphs")
    results: dict[str, dict[str, dict[str, float]]] = {}
    for rank in args.ranks:
        results[str(rank)] = {}
        for group in GROUPS:
            figures = measure(group, rank, args.tokens, args.prompt, args.layers, args.repeats)
            results[str(rank)][group] = figures
            print(f"rank {rank:3d} {group:8s} base {figures['base_us']:7.1f} us, with shrink columns "
                  f"{figures['with_shrink_us']:7.1f} (+{figures['shrink_us']:5.1f}), expand {figures['expand_us']:6.1f}")
        total = {key: LAYERS * sum(g[key] for g in results[str(rank)].values()) / 1e3
                 for key in ("base_us", "shrink_us", "expand_us")}
        print(f"rank {rank:3d} per step ({LAYERS} layers): base {total['base_us']:.3f} ms, shrink columns "
              f"+{total['shrink_us']:.3f} ms, expand {total['expand_us']:.3f} ms")
    if args.out:
        write_result(args.out, run_record("fused_shrink_gemm", tokens=args.tokens, prompt=args.prompt,
                                          groups_us=results))


if __name__ == "__main__":
    main()
