"""The README's results table, generated from the committed H200 result files.

    python benchmarks/report.py            # prints the markdown
tests/test_report.py checks that README.md carries exactly this output.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from loraserve.timeline import decode_step_gaps, load_start_stalls

RESULTS = Path(__file__).parent / "results"
# Per set: the latest run of all three modes, and the latest overlap-on run (the figure
# compared with SGLang), which may be newer.
ALL_MODES = {"large": RESULTS / "h200-seed-large-a6a4a22", "small": RESULTS / "h200-seed-small-pipelined"}
OVERLAP_ON = {"large": RESULTS / "h200-seed-large-13ce2af", "small": RESULTS / "h200-seed-small-13ce2af"}
# Earlier overlap-on runs of the large set, newest first; the last two without slot preemption (their
# median TTFT sat on the jump).
LARGE_EARLIER = (RESULTS / "h200-seed-large-aa59c98", RESULTS / "h200-seed-large-ede5758",
                 RESULTS / "h200-seed-large-3689fcd",
                 RESULTS / "h200-seed-large-a140306",
                 RESULTS / "h200-seed-large-dde4cbb", RESULTS / "h200-seed-large-e9d0037")
SMALL16 = RESULTS / "h200-seed-small-graphs"  # the 16 requests/s run, not repeated since
# SGLang on one H200, overlapped loading, the seed's workload (../shared/BENCHMARK.md).
SGLANG = {"large": {"median TPOT": 7.76, "median TTFT": 164, "mean E2E": 4530},
          "small": {"median TPOT": 9.29, "median TTFT": 126, "mean E2E": 3408}}
METRICS = {"median TPOT": ("tpot_ms", "median"), "median TTFT": ("ttft_ms", "median"), "mean E2E": ("e2e_ms", "mean")}


def summary(path: Path) -> dict:
    return json.loads(path.read_text())["summary"]


def seed_rows() -> list[str]:
    rows = ["| adapters | metric (ms) | loraserve overlap off | loraserve overlap on | loraserve all-resident "
            "| SGLang overlap on |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for adapter_set in ("large", "small"):
        runs = {mode: summary(ALL_MODES[adapter_set] / f"{adapter_set}-{mode}.json") for mode in ("off", "resident")}
        runs["on"] = summary(OVERLAP_ON[adapter_set] / f"{adapter_set}-on.json")
        for metric, (key, stat) in METRICS.items():
            ours = " | ".join(f"{runs[mode][key][stat]:.2f}" if "TPOT" in metric else f"{runs[mode][key][stat]:.0f}"
                              for mode in ("off", "on", "resident"))
            rows.append(f"| {adapter_set} | {metric} | {ours} | {SGLANG[adapter_set][metric]} |")
    return rows


def commit(directory: Path) -> str:
    """From the run's summary.json, or run.json where the summary did not come back from the device."""
    metadata = directory / "summary.json"
    if not metadata.exists():
        metadata = directory / "run.json"
    return json.loads(metadata.read_text())["commit"][:7]


def decode_idle() -> str:
    trace = json.loads(gzip.decompress((OVERLAP_ON["large"] / "large-on.trace.json.gz").read_bytes()))
    gaps, stalls = decode_step_gaps(trace), load_start_stalls(trace)
    return (f"- GPU idle between decode steps (large, overlap on, from the timeline): {gaps.idle_fraction:.1%} "
            f"(median step {gaps.median_step_ms:.1f} ms, median gap {gaps.median_gap_ms:.2f} ms). Gaps in which "
            f"an adapter load began: {stalls.gaps} ({stalls.total_ms:.0f} ms, {stalls.idle_fraction:.1%} of the "
            "forwards' span; 93 gaps and 2.8% at ede5758, before the copier queued each load's copies from a "
            "thread of its own).")


def large_ttft_starts() -> str:
    """The large set's TTFT is bimodal (a slot free at arrival, or a wait for one), and its
    median falls on the jump: the share of requests that start within SGLang's median says more."""
    bound = SGLANG["large"]["median TTFT"]

    def starts(directory: Path) -> str:
        ttfts = [r["ttft_ms"] for r in json.loads((directory / "large-on.json").read_text())["records"]]
        median = summary(directory / "large-on.json")["ttft_ms"]["median"]
        return (f"{sum(t <= bound for t in ttfts)} of {len(ttfts)} requests (median {median:.0f} ms) at "
                f"{commit(directory)}")

    runs = "; ".join(starts(d) for d in (OVERLAP_ON["large"], *LARGE_EARLIER))
    return (f"- Large adapters, overlap on: first token within SGLang's median TTFT ({bound} ms) for {runs}. "
            "Requests either find a slot (tens of ms) or wait for one (hundreds); without slot preemption "
            "(the last two runs) the median sat on that jump and moved with a few requests.")


def report() -> str:
    peer = json.loads((RESULTS / "peft_peer_h200.json").read_text())
    cold = json.loads((RESULTS / "cold_start_h200.json").read_text())
    small16 = {mode: summary(SMALL16 / f"small16-{mode}.json")["output_token_throughput"] for mode in ("off", "on")}
    median = cold["median_ms"]
    on, full = OVERLAP_ON, ALL_MODES
    lines = [
        "One NVIDIA H200, Llama-3.1-8B shape with dummy bf16 weights, "
        "`python benchmarks/seed_workload.py --out-dir OUT --sets large` and `--sets small`. "
        f"Overlap on (run with `--modes on`): large at {commit(on['large'])} "
        f"(`benchmarks/results/{on['large'].name}/`), small at {commit(on['small'])} (`{on['small'].name}/`); "
        "overlap off and all-resident: large at "
        f"{commit(full['large'])} (`{full['large'].name}/`), small at {commit(full['small'])} "
        f"(`{full['small'].name}/`).",
        "",
        *seed_rows(),
        "",
        decode_idle(),
        large_ttft_starts(),
        f"- Small adapters at 16 requests/s (commit {commit(SMALL16)}): overlap on gives "
        f"{small16['on'] / small16['off']:.1%} of overlap off's output throughput "
        f"({small16['on']:.0f} vs {small16['off']:.0f} tokens/s).",
        f"- PEFT peer (`benchmarks/peft_peer.py`, commit {peer['commit'][:7]}): transformers + PEFT "
        f"{peer['peft']['tokens_per_s']:.1f} output tokens/s (16 rank-256 adapters, batch {peer['peft']['batch']}), "
        f"loraserve's engine {peer['loraserve']['tokens_per_s']:.0f} tokens/s (batch {peer['loraserve']['batch']}): "
        f"{peer['ratio']:.1f}x.",
        f"- One cold request (`benchmarks/cold_start.py`, commit {cold['commit'][:7]}; 1.34 GB adapter in the host "
        f"cache, 512-token prompt, idle): copy {median['copy']:.1f} ms, warm TTFT {median['warm']:.1f} ms, copy then "
        f"prefill {median['sequential']:.1f} ms, pipelined per layer {median['pipelined']:.1f} ms "
        f"({cold['pipelined_vs_max_copy_warm']:.3f} x max(copy, warm)); only on disk, streamed layer by layer: "
        f"{median['from_disk']:.0f} ms, against the read alone {median['disk_read']:.0f} ms of a "
        f"{cold['file_bytes'] / 1e9:.2f} GB file ({cold['file_bytes'] / median['disk_read'] / 1e6:.2f} GB/s) and "
        f"read + copy + warm {cold['from_disk_sequential_estimate_ms']:.0f} ms.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
