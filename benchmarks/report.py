"""The README's results section, generated from the result files in benchmarks/results/.

    python -m benchmarks.report            # prints the markdown
tests/test_report.py checks that README.md carries exactly this output. Each file is one run:
its command, commit, GPU and figures (see docs/performance.md for the format).
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# Per set: the run of all three modes, and the latest overlap-on run (the figure compared with SGLang).
ALL_MODES = {"large": "seed-large-a6a4a22.json", "small": "seed-small-779a7e2.json"}
OVERLAP_ON = {"large": "seed-large-13ce2af.json", "small": "seed-small-13ce2af.json"}
# Earlier overlap-on runs of the large set, newest first; the last two without slot preemption (their
# median TTFT sat on the jump).
LARGE_EARLIER = ("seed-large-aa59c98.json", "seed-large-ede5758.json", "seed-large-3689fcd.json",
                 "seed-large-a140306.json", "seed-large-dde4cbb.json", "seed-large-e9d0037.json")
# The run before the copier queued each load's copies from a thread of its own.
LOAD_STALLS_BEFORE = "seed-large-ede5758.json"
SMALL16 = "seed-small-ea7af66.json"  # the 16 requests/s run
PEER = "peft-peer-5e47ac0.json"
COLD = "cold-start-13ce2af.json"
# The mixed step with the LoRA kernels and with `--lora-fold`: two step_times runs on one machine.
STEP_TIMES = {"kernels": "step-times-kernels-588474d-h100.json", "folded": "step-times-folded-588474d-h100.json"}
# The overlap modes at one commit on one GPU: the files of that run, and each mode's column head.
MODE_RUNS = ("seed-large-e4f03b8-h100.json", "seed-small-e4f03b8-h100.json")
MODE_COLUMNS = {"off": "overlap off", "on": "overlap on", "resident": "all-resident"}
LANDING_MODE = "on"  # the run's mode with landing admission (the default)
MODE_NOTE = ("Overlap on admits a request into the forward predicted to meet its adapter's copy (landing "
             "admission, the default). The small set's all-resident mode did not run (device time). Two more "
             "small runs on that machine (`seed-small-e4f03b8-h100-run2.json`, `-run3.json`) gave median "
             "ratios 0.864 and 1.006, and in all three overlap on started P90 and P99 later.")
MODE_METRICS = {"median TTFT": ("ttft_ms", "median"), "P99 TTFT": ("ttft_ms", "p99"), "mean TTFT": ("ttft_ms", "mean"),
                "median TPOT": ("tpot_ms", "median"), "mean E2E": ("e2e_ms", "mean")}
# SGLang on one H200, overlapped loading, the seed's workload (../shared/BENCHMARK.md).
SGLANG = {"large": {"median TPOT": 7.76, "median TTFT": 164, "mean E2E": 4530},
          "small": {"median TPOT": 9.29, "median TTFT": 126, "mean E2E": 3408}}
METRICS = {"median TPOT": ("tpot_ms", "median"), "median TTFT": ("ttft_ms", "median"), "mean E2E": ("e2e_ms", "mean")}


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def run(name: str, label: str) -> dict:
    """One benchmark run of a seed_workload file: its summary, per-request TTFTs and timeline figures."""
    return load(name)["runs"][label]


def seed_rows() -> list[str]:
    rows = ["| adapters | metric (ms) | loraserve overlap off | loraserve overlap on | loraserve all-resident "
            "| SGLang overlap on |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for adapter_set in ("large", "small"):
        runs = {mode: run(ALL_MODES[adapter_set], f"{adapter_set}-{mode}")["summary"] for mode in ("off", "resident")}
        runs["on"] = run(OVERLAP_ON[adapter_set], f"{adapter_set}-on")["summary"]
        for metric, (key, stat) in METRICS.items():
            ours = " | ".join(f"{runs[mode][key][stat]:.2f}" if "TPOT" in metric else f"{runs[mode][key][stat]:.0f}"
                              for mode in ("off", "on", "resident"))
            rows.append(f"| {adapter_set} | {metric} | {ours} | {SGLANG[adapter_set][metric]} |")
    return rows


def mode_runs() -> dict[str, dict[str, dict]]:
    """Per adapter set, each mode's summary in the MODE_RUNS files."""
    sets: dict[str, dict[str, dict]] = {}
    for name in MODE_RUNS:
        for label, value in load(name)["runs"].items():
            adapter_set, _, mode = label.partition("-")
            sets.setdefault(adapter_set, {})[mode] = value["summary"]
    return sets


def mode_rows() -> list[str]:
    sets = mode_runs()
    modes = [mode for mode in MODE_COLUMNS if any(mode in runs for runs in sets.values())]
    rows = ["| adapters | metric (ms) | " + " | ".join(MODE_COLUMNS[mode] for mode in modes) + " |",
            "| --- | --- |" + " ---: |" * len(modes)]
    for adapter_set, runs in sets.items():
        for metric, (key, stat) in MODE_METRICS.items():
            digits = 2 if "TPOT" in metric else 1 if "median TTFT" in metric else 0
            figures = " | ".join(f"{runs[mode][key][stat]:.{digits}f}" if mode in runs else "-" for mode in modes)
            rows.append(f"| {adapter_set} | {metric} | {figures} |")
    return rows


def modes_run() -> str:
    targets = {key: value for name in MODE_RUNS for key, value in load(name)["targets"].items()}
    sets = mode_runs()
    ratios = ", ".join(f"{adapter_set} {targets[f'{adapter_set}_median_ttft_{LANDING_MODE}_vs_off']:.3f}"
                       for adapter_set in sets)
    later = "; ".join(f"{adapter_set} {later_percentiles(targets, adapter_set)}" for adapter_set in sets)
    first = load(MODE_RUNS[0])
    return (f"Overlap modes at one commit ({commit(MODE_RUNS[0])}) on one {first['gpu']}: the same workload "
            f"(`{'`, `'.join(MODE_RUNS)}`). Median TTFT with landing admission against off: {ratios}. TTFT "
            f"percentiles (P10 to P99) at which it is later than off: {later}. {MODE_NOTE}").strip()


def later_percentiles(targets: dict, adapter_set: str) -> str:
    """The TTFT percentiles at which the landing mode started later than off, or "none"."""
    percentiles = targets[f"{adapter_set}_ttft_percentiles_{LANDING_MODE}_later_than_off"]
    return ", ".join(f"P{p}" for p in percentiles) or "none"


def commit(name: str) -> str:
    return load(name)["commit"][:7]


def decode_idle() -> str:
    on = run(OVERLAP_ON["large"], "large-on")
    gaps, stalls = on["decode_step_gaps"], on["load_start_stalls"]
    before = run(LOAD_STALLS_BEFORE, "large-on")["load_start_stalls"]
    return (f"- GPU idle between decode steps (large, overlap on, from the timeline): {gaps['idle_fraction']:.1%} "
            f"(median step {gaps['median_step_ms']:.1f} ms, median gap {gaps['median_gap_ms']:.2f} ms). Gaps in "
            f"which an adapter load began: {stalls['gaps']} ({stalls['total_ms']:.0f} ms, "
            f"{stalls['idle_fraction']:.1%} of the forwards' span; {before['gaps']} gaps and "
            f"{before['idle_fraction']:.1%} at {commit(LOAD_STALLS_BEFORE)}, before the copier queued each load's "
            "copies from a thread of its own).")


def large_ttft_starts() -> str:
    """The large set's TTFT is bimodal (a slot free at arrival, or a wait for one), and its
    median falls on the jump: the share of requests that start within SGLang's median says more."""
    bound = SGLANG["large"]["median TTFT"]

    def starts(name: str) -> str:
        large_on = run(name, "large-on")
        ttfts, median = large_on["ttft_ms"], large_on["summary"]["ttft_ms"]["median"]
        return f"{sum(t <= bound for t in ttfts)} of {len(ttfts)} requests (median {median:.0f} ms) at {commit(name)}"

    runs = "; ".join(starts(name) for name in (OVERLAP_ON["large"], *LARGE_EARLIER))
    return (f"- Large adapters, overlap on: first token within SGLang's median TTFT ({bound} ms) for {runs}. "
            "Requests either find a slot (tens of ms) or wait for one (hundreds); without slot preemption "
            "(the last two runs) the median sat on that jump and moved with a few requests.")


def mixed_step() -> str:
    runs = {variant: load(name) for variant, name in STEP_TIMES.items()}
    kernels, folded = (runs[v]["median_ms"] for v in ("kernels", "folded"))
    return (f"- The mixed step (8 decodes and a 400-token prompt, 8 rank-16 adapters; `python -m benchmarks.step_times "
            f"--rank 16`, then with `--lora-fold`; commit {runs['kernels']['commit'][:7]}, one "
            f"{runs['kernels']['gpu']}): {kernels['mixed, 8 adapters']:.2f} ms with the LoRA kernels "
            f"({runs['kernels']['mixed_lora_overhead']:+.1%} over the base model's "
            f"{kernels['mixed, no adapters']:.2f}), "
            f"{folded['mixed, 8 adapters']:.2f} ms folded into the base GEMMs "
            f"({runs['folded']['mixed_lora_overhead']:+.1%} over {folded['mixed, no adapters']:.2f}); the decode step "
            f"(batch 9 over 8 adapters) {kernels['decode, batch 9 over 8 adapters']:.2f} ms with the kernels, which "
            f"`--lora-fold` keeps for decode steps.")


def report() -> str:
    peer, cold = load(PEER), load(COLD)
    small16 = {mode: run(SMALL16, f"small16-{mode}")["summary"]["output_token_throughput"] for mode in ("off", "on")}
    median = cold["median_ms"]
    on, full = OVERLAP_ON, ALL_MODES
    lines = [
        "One NVIDIA H200, Llama-3.1-8B shape with dummy bf16 weights, "
        "`python -m benchmarks.seed_workload --out-dir OUT --sets large` and `--sets small`; one file per run "
        "under `benchmarks/results/`, with its command, commit and GPU. "
        f"Overlap on (run with `--modes on`): large at {commit(on['large'])} (`{on['large']}`), small at "
        f"{commit(on['small'])} (`{on['small']}`); overlap off and all-resident: large at "
        f"{commit(full['large'])} (`{full['large']}`), small at {commit(full['small'])} (`{full['small']}`).",
        "",
        *seed_rows(),
        "",
        decode_idle(),
        large_ttft_starts(),
        f"- Small adapters at 16 requests/s (commit {commit(SMALL16)}): overlap on gives "
        f"{small16['on'] / small16['off']:.1%} of overlap off's output throughput "
        f"({small16['on']:.0f} vs {small16['off']:.0f} tokens/s).",
        f"- PEFT peer (`python -m benchmarks.peft_peer`, commit {peer['commit'][:7]}): transformers + PEFT "
        f"{peer['peft']['tokens_per_s']:.1f} output tokens/s (16 rank-256 adapters, batch {peer['peft']['batch']}), "
        f"loraserve's engine {peer['loraserve']['tokens_per_s']:.0f} tokens/s (batch {peer['loraserve']['batch']}): "
        f"{peer['ratio']:.1f}x.",
        f"- One cold request (`python -m benchmarks.cold_start`, commit {cold['commit'][:7]}; 1.34 GB adapter in the "
        f"host cache, 512-token prompt, idle): copy {median['copy']:.1f} ms, warm TTFT {median['warm']:.1f} ms, copy "
        f"then prefill {median['sequential']:.1f} ms, pipelined per layer {median['pipelined']:.1f} ms "
        f"({cold['pipelined_vs_max_copy_warm']:.3f} x max(copy, warm)); only on disk, streamed layer by layer: "
        f"{median['from_disk']:.0f} ms, against the read alone {median['disk_read']:.0f} ms of a "
        f"{cold['file_bytes'] / 1e9:.2f} GB file ({cold['file_bytes'] / median['disk_read'] / 1e6:.2f} GB/s) and "
        f"read + copy + warm {cold['from_disk_sequential_estimate_ms']:.0f} ms.",
        mixed_step(),
        "",
        modes_run(),
        "",
        *mode_rows(),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
