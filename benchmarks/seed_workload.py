"""The seed's H200 workload in one invocation: overlap off, overlap on and all-resident.

Llama-3.1-8B shape with dummy bf16 weights; large adapters (one rank-256 all-module file,
~1.3 GB, under 16 names) and small adapters (8 files, ranks 8-64, each under 2 names);
100 random prompts (input and output uniform over [1, 512]) at 4 requests/s, adapters
`distinct`; small adapters also at 16 requests/s for throughput; `rank64` (one rank-64
all-module file under 16 names) for the larger shapes; `zipf1000` (the 8 small files under
1,000 names, requested Zipf(1.1)-skewed; `--rate` sets its load). On machines of several GPUs:
`--replicas N --scale-with-replicas` (16*N adapter names at N times the rate, as the replica
runs want), `--routing-policy round-robin` for the adapter-blind baseline, `--tp N` per
replica, `--shape llama-70b`; `--workload-seed N` draws another request list. Writes every
run's raw JSON, comparison tables and timeline PNGs under --out-dir, and the run's result file
`seed-<sets>-<commit>.json` (command, commit, GPU, each mode's summary, per-request TTFTs, and
with overlap off and on the timeline figures and each request's phases): the file to copy into
benchmarks/results/.

    python -m benchmarks.seed_workload --out-dir $OUT --sets large small
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.common import run_record, write_result
from benchmarks.request_phases import as_figures, each_request, groups, request_phases
from loraserve.bench import TTFT_PERCENTILES, add_bench_parser, format_comparison, nearest_rank, run_benchmark
from loraserve.client import Connection, LoraServeClient
from loraserve.command_line import connection_from_args
from loraserve.launcher import Launcher
from loraserve.synthetic import LLAMA31_8B, LLAMA31_70B, write_model_config, write_random_adapter
from loraserve.timeline import decode_step_gaps, draw, fetch_trace, load_start_stalls
from protos.loraserve.v1 import serving_pb2
from settings.config import ROUTING_POLICIES, TARGET_MODULES, ServeConfig
from worker.model.config import load_model_config

SMALL_SPECS = [(8, ("q_proj", "v_proj")), (16, ("q_proj", "k_proj", "v_proj", "o_proj")), (32, TARGET_MODULES),
               (64, ("q_proj", "v_proj")), (8, TARGET_MODULES), (16, ("gate_proj", "up_proj", "down_proj")),
               (32, ("q_proj", "k_proj", "v_proj")), (64, ("o_proj", "down_proj"))]
# "on" admits a request into the forward predicted to meet its adapter's copy (the default);
# "on-reported" makes it wait for the load's report, as the server did before landing admission.
MODES = {"off": dict(overlap_loading=False), "on": dict(overlap_loading=True),
         "resident": dict(overlap_loading=True, max_loras_per_batch=16),
         "on-reported": dict(overlap_loading=True, admit_landing_loads=False)}
DEFAULT_MODES = ("off", "on", "resident")
SHAPES = {"llama-8b": LLAMA31_8B, "llama-70b": LLAMA31_70B}
SET_RATES = {"large": 4.0, "small": 4.0, "small16": 16.0, "rank64": 2.0, "zipf1000": 4.0}  # requests/s, one replica
ZIPF_NAMES, ZIPF_ALPHA = 1000, 1.1
ALL_RESIDENT_SETS = ("large", "small", "rank64")  # 16 names: what 16 slots hold
NAMES_PER_REPLICA = 16


def pinned_bandwidth_gbps() -> dict[str, float]:
    size = 1 << 30
    pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(size, dtype=torch.uint8)
    device = torch.empty(size, dtype=torch.uint8, device="cuda")
    result = {}
    for name, source in (("pinned", pinned), ("pageable", pageable)):
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            device.copy_(source, non_blocking=True)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        result[f"{name}_h2d_gbps"] = size / sorted(times)[2] / 1e9
    del pinned, pageable, device
    torch.cuda.empty_cache()
    return result


def write_assets(root: Path, sets: list[str], shape: str, names: int) -> dict:
    """The model's config and the adapter files the sets need, each set's files under `names` names."""
    model_dir = write_model_config(root / "model", SHAPES[shape])
    config = load_model_config(model_dir)
    assets: dict = {"model": model_dir}
    if "large" in sets:
        large = write_random_adapter(root / "large", config, rank=256, alpha=512, modules=TARGET_MODULES, seed=1)
        assets["large"] = {f"adapter{i}": large for i in range(names)}
        assets["large_bytes"] = (large / "adapter_model.safetensors").stat().st_size
    if {"small", "small16", "zipf1000"} & set(sets):
        small = [write_random_adapter(root / f"small{i}", config, rank=r, alpha=2 * r, modules=m, seed=10 + i)
                 for i, (r, m) in enumerate(SMALL_SPECS)]
        assets["small"] = {f"adapter{i}": small[i % len(small)] for i in range(names)}
    if "zipf1000" in sets:
        assets["zipf1000"] = {f"adapter{i}": small[i % len(small)] for i in range(ZIPF_NAMES)}
    if "rank64" in sets:
        rank64 = write_random_adapter(root / "rank64", config, rank=64, alpha=128, modules=TARGET_MODULES, seed=2)
        assets["rank64"] = {f"adapter{i}": rank64 for i in range(names)}
    return assets


def wait_for_adapters(client: LoraServeClient, resident: bool, timeout: float = 600) -> None:
    """As the seed's server before the clock starts: adapters in host memory (or all on the GPU)."""
    wanted = {serving_pb2.ADAPTER_STATE_RESIDENT} if resident else {
        serving_pb2.ADAPTER_STATE_HOST, serving_pb2.ADAPTER_STATE_RESIDENT}
    room = client.server_info().max_loaded_loras
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        adapters = client.list_adapters().adapters
        if sum(a.state in wanted for a in adapters) >= min(len(adapters), room):
            return
        time.sleep(0.5)
    raise TimeoutError("adapters were not staged in time")


def bench_args(address: str, names: list[str], rate: float, num_prompts: int, output: Path,
               zipf: bool = False, workload_seed: int = 1) -> argparse.Namespace:
    """`loraserve bench`'s own parsed flags for the seed's client: prompts and outputs uniform over
    [1, 512], Poisson arrivals at `rate`, adapters in turn (or Zipf-skewed)."""
    distribution = ["skewed", "--lora-zipf-alpha", str(ZIPF_ALPHA)] if zipf else ["distinct"]
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers())
    return parser.parse_args([
        "bench", "--address", address, "--dataset", "random", "--random-input-len", "512",
        "--random-output-len", "512", "--random-range-ratio", "0.0", "--num-prompts", str(num_prompts),
        "--request-rate", str(rate), "--seed", str(workload_seed), "--lora-name", *names, "--lora-request-distribution", *distribution,
        "--output-file", str(output), "--disable-progress"])


def run_mode(base: ServeConfig, adapters: dict[str, Path], mode: str, rate: float, num_prompts: int,
             out_dir: Path, label: str, draw_timeline: bool, workload_seed: int = 1) -> dict:
    config = base.replace(initial_adapters={n: str(p) for n, p in adapters.items()}, **MODES[mode])
    launcher = Launcher(config)
    launcher.start()
    try:
        launcher.wait_until_serving()
        with LoraServeClient(launcher.address, timeout=600) as client:
            wait_for_adapters(client, resident=mode == "resident")
            output = out_dir / f"{label}.json"
            args = bench_args(launcher.address, list(adapters), rate, num_prompts, output,
                              zipf=label.startswith("zipf"), workload_seed=workload_seed)
            result = asyncio.run(run_benchmark(args, connection_from_args(args.parser, args)))
            result["stats"] = json_stats(client.stats())
            if draw_timeline:
                trace = fetch_trace(Connection(launcher.address))
                (out_dir / f"{label}.trace.json").write_text(json.dumps(trace))
                draw(trace, out_dir / f"{label}.png", title=f"{label}: forwards, adapter loads, requests")
                result["copy_gbps"] = copy_bandwidth(trace)
                gaps = decode_step_gaps(trace)
                result["decode_step_gaps"] = asdict(gaps) if gaps else None
                stalls = load_start_stalls(trace)
                result["load_start_stalls"] = asdict(stalls) if stalls else None
                phases = request_phases(trace)
                result["request_phases"] = as_figures(groups(phases))
                result["requests"] = each_request(phases)
            output.write_text(json.dumps(result, indent=1))
    finally:
        launcher.stop()
    gaps = result.get("decode_step_gaps")
    idle = f", GPU idle between decode steps {gaps['idle_fraction']:.1%}" if gaps else ""
    print(f"{label}: median TTFT {result['summary']['ttft_ms']['median']:.1f} ms, median TPOT "
          f"{result['summary']['tpot_ms']['median']:.2f} ms, mean E2E {result['summary']['e2e_ms']['mean']:.0f} ms, "
          f"failed {result['summary']['failed']}{idle}", flush=True)
    return result


def json_stats(stats: serving_pb2.ServerStats) -> dict:
    """GetStats' figures; with several replicas, each one's too."""
    figures = {field.name: getattr(stats, field.name) for field in stats.DESCRIPTOR.fields if field.name != "replicas"}
    if len(stats.replicas) > 1:
        figures["replicas"] = {replica.replica: json_stats(replica.stats) for replica in stats.replicas}
    return figures


def copy_bandwidth(trace: dict) -> float | None:
    loads = [e for e in trace["traceEvents"] if e.get("tid") == "pcie" and e["dur"] > 0 and "bytes" in e["args"]]
    if not loads:
        return None
    return sorted(e["args"]["bytes"] / e["dur"] * 1e6 / 1e9 for e in loads)[len(loads) // 2]


def targets(results: dict, bandwidth: dict, large_bytes: int | None) -> dict:
    checks = {}
    if {"large-off", "large-on", "large-resident"} <= results.keys():
        on, res = results["large-on"]["summary"], results["large-resident"]["summary"]
        copy_ms = large_bytes / (bandwidth["pinned_h2d_gbps"] * 1e9) * 1e3
        checks["median_tpot_on_vs_resident"] = on["tpot_ms"]["median"] / res["tpot_ms"]["median"]
        checks["median_ttft_on_minus_resident_ms"] = on["ttft_ms"]["median"] - res["ttft_ms"]["median"]
        checks["median_ttft_allowed_ms (1.2 x copy)"] = 1.2 * copy_ms
        checks["mean_e2e_on_vs_resident"] = on["e2e_ms"]["mean"] / res["e2e_ms"]["mean"]
        copy = results["large-on"].get("copy_gbps")
        checks["copy_bandwidth_vs_pinned"] = copy / bandwidth["pinned_h2d_gbps"] if copy else None
    if {"small16-off", "small16-on"} <= results.keys():
        checks["small16_throughput_on_vs_off"] = (results["small16-on"]["summary"]["output_token_throughput"]
                                                  / results["small16-off"]["summary"]["output_token_throughput"])
    return checks | overlap_against_off(results)


def overlap_against_off(results: dict) -> dict:
    """Per set and overlap mode run beside "off": the median TTFT ratio (issue 23's target: at most
    0.9) and the TTFT percentiles at which overlap started requests later than off (target: none)."""
    checks = {}
    for label, result in results.items():
        adapter_set, _, mode = label.partition("-")
        off = results.get(f"{adapter_set}-off")
        if off is None or mode in ("off", "resident"):
            continue
        ttft, ttft_off = ttft_percentiles(result), ttft_percentiles(off)
        checks[f"{adapter_set}_median_ttft_{mode}_vs_off"] = (result["summary"]["ttft_ms"]["median"]
                                                              / off["summary"]["ttft_ms"]["median"])
        checks[f"{adapter_set}_ttft_percentiles_{mode}_later_than_off"] = [p for p in TTFT_PERCENTILES
                                                                          if ttft[p] > ttft_off[p]]
    return checks


def ttft_percentiles(result: dict) -> dict[int, float]:
    ttft = sorted(record["ttft_ms"] for record in result["records"])
    return {p: nearest_rank(ttft, p / 100) for p in TTFT_PERCENTILES}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--sets", nargs="+", default=["large", "small"], choices=list(SET_RATES))
    parser.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=list(MODES))
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--workload-seed", type=int, default=1,
                        help="the request list's seed (1: the seed runs' list; others check that a comparison "
                             "between modes holds beyond one list)")
    parser.add_argument("--no-mixed-graphs", action="store_true", help="serve with --disable-mixed-graphs")
    parser.add_argument("--replicas", type=int, default=1, help="scheduler+worker pairs (on one GPU: all share it)")
    parser.add_argument("--num-kv-pages", type=int, default=16384, help="per replica")
    parser.add_argument("--scale-with-replicas", action="store_true",
                        help=f"{NAMES_PER_REPLICA} adapter names and each set's request rate per replica")
    parser.add_argument("--routing-policy", default="residency", choices=ROUTING_POLICIES)
    parser.add_argument("--tp", type=int, default=1, help="GPUs per replica (tensor parallelism)")
    parser.add_argument("--rate", type=float, help="requests/s of every set (default: each set's own)")
    parser.add_argument("--shape", default="llama-8b", choices=list(SHAPES), help="the dummy model's configuration")
    return parser.parse_args(argv)


def server_config(args: argparse.Namespace, model_dir: Path) -> ServeConfig:
    return ServeConfig.of(model_path=str(model_dir), tokenizer_path=None, port=50123, device="cuda",
                          dtype="bfloat16", load_format="dummy", max_loras_per_batch=8, max_loaded_loras=16,
                          max_lora_rank=256, num_kv_pages=args.num_kv_pages, page_size=16, replicas=args.replicas,
                          tensor_parallel_size=args.tp, routing_policy=args.routing_policy,
                          host_cache_bytes=24 << 30, max_batch_tokens=4096, startup_timeout_s=600,
                          log_level="warning", static_mixed=not args.no_mixed_graphs)


def main() -> None:
    args = parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    bandwidth = pinned_bandwidth_gbps()
    print(f"bandwidth: {bandwidth}", flush=True)
    scale = args.replicas if args.scale_with_replicas else 1
    assets = write_assets(Path(tempfile.mkdtemp()), args.sets, args.shape, NAMES_PER_REPLICA * scale)
    base = server_config(args, assets["model"])
    results = {}
    for adapter_set in args.sets:
        adapters = assets["small" if adapter_set.startswith("small") else adapter_set]
        rate = args.rate or SET_RATES[adapter_set] * scale
        modes = [m for m in args.modes if m != "resident" or adapter_set in ALL_RESIDENT_SETS]
        for mode in modes:
            label = f"{adapter_set}-{mode}"
            results[label] = run_mode(base, adapters, mode, rate, args.num_prompts, args.out_dir, label,
                                      draw_timeline=mode != "resident", workload_seed=args.workload_seed)
            record = write_record(args, bandwidth, assets.get("large_bytes"), results)
        names = [f"{adapter_set}-{m}" for m in modes]
        table = format_comparison(names, [results[n]["summary"] for n in names])
        (args.out_dir / f"{adapter_set}-table.txt").write_text(table + "\n")
        print(table, flush=True)
    print(json.dumps(record["targets"], indent=2))


def write_record(args: argparse.Namespace, bandwidth: dict, large_bytes: int | None, results: dict) -> dict:
    """The result file as it stands after each mode, so that a run cut short keeps the modes it finished."""
    record = run_record("seed_workload", workload_seed=args.workload_seed, replicas=args.replicas, tp=args.tp, shape=args.shape,
                        routing_policy=args.routing_policy, scaled_with_replicas=args.scale_with_replicas,
                        num_kv_pages=args.num_kv_pages, bandwidth=bandwidth, large_adapter_bytes=large_bytes,
                        targets=targets(results, bandwidth, large_bytes),
                        runs={label: result_figures(r) for label, r in results.items()})
    write_result(args.out_dir / f"seed-{'-'.join(args.sets)}{run_suffix(args)}-{record['commit']}.json", record)
    return record


def run_suffix(args: argparse.Namespace) -> str:
    """What sets a run apart from the seed's one-GPU, 8B, residency-routed run of request list 1, for its
    file name."""
    parts = [f"replicas{args.replicas}" if args.replicas > 1 else "", f"tp{args.tp}" if args.tp > 1 else "",
             "scaled" if args.scale_with_replicas and args.replicas > 1 else "",
             args.routing_policy if args.routing_policy != "residency" else "",
             args.shape if args.shape != "llama-8b" else "",
             f"workload{args.workload_seed}" if args.workload_seed != 1 else ""]
    return "".join(f"-{part}" for part in parts if part)


def result_figures(result: dict) -> dict:
    """What the result file keeps of one mode's run: not every token's latency, as the raw JSON does."""
    figures = {"summary": result["summary"], "ttft_ms": [round(r["ttft_ms"], 2) for r in result["records"]]}
    for key in ("stats", "copy_gbps", "decode_step_gaps", "load_start_stalls", "request_phases", "requests"):
        if result.get(key) is not None:
            figures[key] = result[key]
    return figures


if __name__ == "__main__":
    main()
