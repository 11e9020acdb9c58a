"""What LoRA would cost folded into cuBLAS GEMMs (the 8B shape, bf16, CUDA graphs), each against
the base GEMM alone:
- the prompt's shrink as extra output columns, a GEMM over [W; A] (one adapter);
- every slot's shrink as extra output columns, [W; A_1; ...; A_slots];
- the expand as one GEMM accumulating into the prompt's rows of the output (the group's modules'
  B stacked block-diagonally: one [G * rank, outputs] matrix, timed dense);
- the expand as extra input columns of the base GEMM, [x | h] @ [W | B_1 | ... | B_slots]^T,
  where h holds each token's shrunk rows in its slot's columns and zeros in the others (so
  every token pays for every slot's columns, and a group's modules' B sit block-diagonally);
- the expand folded into the kernel that reads the module's output, against that reader alone
  (a stand-in that reads and writes the output back: `benchmarks._reader_expand_triton`) over
  `--decodes` tokens, one per slot in turn, and the prompt's on slot 0 (the rest is padding).

    python -m benchmarks.fused_shrink_gemm --tokens 512 --prompt 400 --decodes 8 --ranks 16 64 256
    python -m benchmarks.fused_shrink_gemm --tokens 16 --prompt 0 --decodes 16   # a decode step
Prints microseconds a call per module group, from replays of a graph that calls it once per
layer over distinct weights (so weights come from memory, not L2).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from benchmarks.common import graph_microseconds, run_record, write_result

HIDDEN, KV, INTERMEDIATE, LAYERS = 4096, 1024, 14336, 32
DEVICE = "cuda"
GROUPS = {  # name: (input width, output widths of its modules)
    "qkv": (HIDDEN, (HIDDEN, KV, KV)),
    "o": (HIDDEN, (HIDDEN,)),
    "gate_up": (HIDDEN, (INTERMEDIATE, INTERMEDIATE)),
    "down": (INTERMEDIATE, (HIDDEN,)),
}


def per_layer_us(call: Callable[[torch.Tensor], object], weights: list[torch.Tensor], repeats: int) -> float:
    """Microseconds a call of `call` when one graph calls it once per weight."""
    return graph_microseconds(lambda: [call(w) for w in weights], repeats) / len(weights)


def per_layer_weights(layers: int, *shape: int) -> list[torch.Tensor]:
    """Distinct small random bf16 weights of `shape` for each of `layers` layers."""
    return [torch.randn(*shape, device=DEVICE, dtype=torch.bfloat16) * 0.01 for _ in range(layers)]


def measure(group: str, rank: int, tokens: int, prompt: int, decodes: int, slots: int, layers: int,
            repeats: int) -> dict[str, float]:
    width, outputs = GROUPS[group]
    n, shrunk = sum(outputs), rank * len(outputs)
    every_slot = slots * shrunk

    def gemm_us(inputs: torch.Tensor, rows: int, stacked: list[torch.Tensor]) -> float:
        out = torch.empty(tokens, rows, device=DEVICE, dtype=torch.bfloat16)
        return per_layer_us(lambda w: torch.matmul(inputs, w[:rows].t(), out=out), stacked, repeats)

    x = torch.randn(tokens, width + every_slot, device=DEVICE, dtype=torch.bfloat16)
    extended_rows = per_layer_weights(layers, n + every_slot, width)
    base = gemm_us(x[:, :width], n, extended_rows)
    prompt_shrink = gemm_us(x[:, :width], n + shrunk, extended_rows)
    slots_shrink = gemm_us(x[:, :width], n + every_slot, extended_rows)
    del extended_rows
    expand_in_gemm = gemm_us(x, n, per_layer_weights(layers, n, width + every_slot))
    base_out = torch.empty(tokens, n, device=DEVICE, dtype=torch.bfloat16)
    s = torch.randn(prompt, shrunk, device=DEVICE, dtype=torch.bfloat16)
    rows = slice(decodes, decodes + prompt)
    expand = per_layer_us(lambda b: base_out[rows].addmm_(s, b), per_layer_weights(layers, shrunk, n), repeats)
    reader, reader_with_expand = reader_us(base_out, rank, decodes, prompt, slots, layers, repeats)
    return {"base_us": base, "with_shrink_us": prompt_shrink, "shrink_us": prompt_shrink - base,
            "slots_shrink_us": slots_shrink - base, "expand_us": expand,
            "expand_in_gemm_us": expand_in_gemm - base, "reader_us": reader,
            "expand_in_reader_us": reader_with_expand - reader}


def reader_us(y: torch.Tensor, rank: int, decodes: int, prompt: int, slots: int, layers: int,
              repeats: int) -> tuple[float, float]:
    """A reader of the module output `y` (read and written back) without and with the expand folded
    in (`benchmarks._reader_expand_triton`): each slot's B per layer, h in the GEMM's extra columns."""
    from benchmarks._reader_expand_triton import read_back, row_blocks

    tokens, outputs = y.shape
    h = torch.randn(tokens, slots * rank, device=DEVICE, dtype=y.dtype)
    blocks = row_blocks(decodes, prompt, slots, rank).to(DEVICE)
    b_per_layer = per_layer_weights(layers, slots, rank, outputs)
    plain = per_layer_us(lambda b: read_back(y, h, b, blocks, expand=False), b_per_layer, repeats)
    folded = per_layer_us(lambda b: read_back(y, h, b, blocks, expand=True), b_per_layer, repeats)
    return plain, folded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512, help="the step's padded tokens")
    parser.add_argument("--prompt", type=int, default=400, help="the prompt's tokens (one adapter)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--decodes", type=int, default=8, help="decode tokens before the prompt's")
    parser.add_argument("--slots", type=int, default=8, help="adapter slots whose columns every token pays for")
    parser.add_argument("--layers", type=int, default=8, help="distinct weights a graph cycles through")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", help="the result file")
    args = parser.parse_args()
    if args.decodes + args.prompt > args.tokens:
        parser.error("--decodes plus --prompt exceed --tokens")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: it times cuBLAS GEMMs replayed from CUDA graphs")
    results: dict[str, dict[str, dict[str, float]]] = {}
    for rank in args.ranks:
        results[str(rank)] = {}
        for group in GROUPS:
            figures = measure(group, rank, args.tokens, args.prompt, args.decodes, args.slots, args.layers,
                              args.repeats)
            results[str(rank)][group] = figures
            print(f"rank {rank:3d} {group:8s} base {figures['base_us']:7.1f} us, with shrink columns "
                  f"{figures['with_shrink_us']:7.1f} (+{figures['shrink_us']:5.1f}; every slot's "
                  f"+{figures['slots_shrink_us']:5.1f}), expand {figures['expand_us']:6.1f}, expand as input "
                  f"columns +{figures['expand_in_gemm_us']:5.1f}, in the reader +{figures['expand_in_reader_us']:5.1f} "
                  f"(reader {figures['reader_us']:5.1f})")
        keys = ("base_us", "shrink_us", "slots_shrink_us", "expand_us", "expand_in_gemm_us", "expand_in_reader_us")
        total = {key: LAYERS * sum(g[key] for g in results[str(rank)].values()) / 1e3 for key in keys}
        print(f"rank {rank:3d} per step ({LAYERS} layers): base {total['base_us']:.3f} ms, shrink columns "
              f"+{total['shrink_us']:.3f} ms (every slot's +{total['slots_shrink_us']:.3f}), expand "
              f"{total['expand_us']:.3f} ms, expand as input columns +{total['expand_in_gemm_us']:.3f} ms, in the "
              f"reader +{total['expand_in_reader_us']:.3f} ms")
    if args.out:
        write_result(args.out, run_record("fused_shrink_gemm", tokens=args.tokens, prompt=args.prompt,
                                          decodes=args.decodes, slots=args.slots, groups_us=results))


if __name__ == "__main__":
    main()
