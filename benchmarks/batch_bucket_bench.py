"""What a decode step pays for the rows its batch bucket pads.

    python benchmarks/batch_bucket_bench.py --buckets 1,2,4,8,9,10,11,12,16

The 8B shape (dummy weights) with 8 rank-256 adapters: decode steps of 7 to 12 sequences over 8
adapters (the seed workload's usual batches), each step's CUDA graph captured with the engine's
batch buckets and then with `--buckets`, its replays timed with CUDA events (median of 5 runs of
10 replays). Prints microseconds per step; asserts nothing.
"""

from __future__ import annotations

import argparse

from profile_decode import build_engine, step_batch  # siblings: benchmarks/ is on sys.path as a script
from step_tile_sweep import Choice, StepTimer
from worker import graph_step as decode_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--buckets", required=True, help="comma-separated batch buckets to compare")
    parser.add_argument("--batches", default="7,8,9,10,11,12")
    args = parser.parse_args()
    engine = build_engine(rank=256, adapters=8)
    candidates = {"engine": decode_step.BATCH_BUCKETS,
                  "given": tuple(sorted({*map(int, args.buckets.split(",")), decode_step.BATCH_BUCKETS[-1]}))}
    for batch in map(int, args.batches.split(",")):
        row = []
        for label, buckets in candidates.items():
            decode_step.BATCH_BUCKETS = buckets
            bucket = decode_step.decode_shape(batch, 1).seqs
            us = StepTimer(engine, step_batch(batch, 8, 512, 0), Choice())()
            row.append(f"{label} bucket {bucket:3}: {us:8.1f} us")
        print(f"batch {batch:3}  " + "   ".join(row), flush=True)


if __name__ == "__main__":
    main()
