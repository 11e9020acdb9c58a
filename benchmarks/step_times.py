"""Wall-clock time of the steps issue 23 compares, all in one engine on the 8B shape (dummy weights):
the mixed step (8 decodes and a prompt) with 8 adapters, with none, with the decodes' adapters only
and with the prompt's only, and the decode step (batch 9 over 8 adapters). Each round times every
step in turn, so a shared machine's drift hits them alike; prints each step's median over the
rounds and writes them with every round to --out.

    python -m benchmarks.step_times --rank 16 --out step-times.json
    python -m benchmarks.step_times --rank 16 --lora-fold --out step-times-folded.json
One engine serves every step (profile_decode builds one per step, and profiles kernels).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import run_record, write_result
from benchmarks.profile_decode import build_engine, step_batch
from settings.config import FOLD_RANK
from worker.batch import SequenceInput
from worker.engine import Engine


def step_ms(engine: Engine, step: list[SequenceInput], steps: int) -> float:
    """Mean ms a step over `steps` forwards, each waiting for its tokens."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.forward(step)
    return (time.perf_counter() - start) * 1e3 / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prefill", type=int, default=400, help="the mixed step's prompt tokens")
    parser.add_argument("--context", type=int, default=512, help="tokens each decode has seen")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps-per-round", type=int, default=20)
    parser.add_argument("--lora-fold", action="store_true",
                        help="LoRA folded into the base GEMMs and their readers (rank up to 16)")
    parser.add_argument("--out", type=Path, help="the result file")
    args = parser.parse_args()
    if args.lora_fold and args.rank > FOLD_RANK:
        parser.error(f"--lora-fold serves ranks up to {FOLD_RANK}, not --rank {args.rank}")
    engine = build_engine(args.rank, adapters=8, lora_fold=args.lora_fold)
    steps = {"mixed, 8 adapters": step_batch(8, 8, args.context, args.prefill),
             "mixed, no adapters": step_batch(8, 0, args.context, args.prefill),
             "mixed, the decodes' adapters only": step_batch(8, 8, args.context, args.prefill, adapted_prompt=False),
             "mixed, the prompt's adapter only": step_batch(8, 8, args.context, args.prefill, adapted_decodes=False),
             "decode, batch 9 over 8 adapters": step_batch(9, 8, args.context, 0)}
    for step in steps.values():
        step_ms(engine, step, 3)
    rounds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            rounds[name].append(step_ms(engine, step, args.steps_per_round))
    medians = {name: statistics.median(times) for name, times in rounds.items()}
    for name, median in medians.items():
        print(f"{name}: {median:.3f} ms (median of {args.rounds} rounds of {args.steps_per_round} steps)")
    overhead = medians["mixed, 8 adapters"] / medians["mixed, no adapters"] - 1
    print(f"mixed step, 8 adapters against none: {overhead:+.1%}")
    if args.out:
        write_result(args.out, run_record("step_times", rank=args.rank, prefill=args.prefill,
                                          lora_fold=args.lora_fold, median_ms=medians,
                                          rounds_ms=rounds, mixed_lora_overhead=overhead))


if __name__ == "__main__":
    main()
