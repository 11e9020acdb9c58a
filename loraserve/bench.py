"""`loraserve bench`: the seed's serving benchmark (SGLang's bench_serving) for our gRPC API.

Random prompts of token ids, Poisson arrivals, streaming requests, adapters picked per
request by a distribution; prints mean/median/P99 of E2E, TTFT, TPOT and ITL and writes
the per-request records and the summary as JSON. `loraserve bench compare` puts several
result files side by side with % changes against the first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from tqdm import tqdm

from loraserve.client import Connection
from loraserve.command_line import CommandError, add_connection_arguments, connection_from_args, existing_file
from protos.loraserve.v1 import serving_pb2, serving_pb2_grpc

SERVER_INFO_TIMEOUT_S = 30.0
CONNECTION_FILES = ("token_file", "tls_ca", "tls_cert", "tls_key")


@dataclass(frozen=True)
class WorkItem:
    index: int
    input_ids: list[int]
    output_len: int
    adapter: str
    send_at: float  # seconds after the start


@dataclass
class Record:
    index: int
    adapter: str
    input_len: int
    output_len: int
    success: bool = False
    error: str = ""
    output_tokens: int = 0
    ttft_ms: float = 0.0
    e2e_ms: float = 0.0
    itl_ms: list[float] = field(default_factory=list)
    server_timing: dict[str, float] = field(default_factory=dict)

    @property
    def tpot_ms(self) -> float | None:
        if self.output_tokens <= 1:
            return None
        return (self.e2e_ms - self.ttft_ms) / (self.output_tokens - 1)


def lengths(rng: random.Random, target: int, range_ratio: float, count: int) -> list[int]:
    """As SGLang's random dataset: uniform over [max(1, target * ratio), target]."""
    low = max(int(target * range_ratio), 1)
    return [rng.randint(low, target) for _ in range(count)]


def pick_adapters(rng: random.Random, names: list[str], distribution: str, count: int,
                  zipf_alpha: float) -> list[str]:
    if not names:
        return [""] * count
    if distribution == "distinct":
        return [names[i % len(names)] for i in range(count)]
    if distribution == "uniform":
        return [rng.choice(names) for _ in range(count)]
    weights = [1.0 / (rank ** zipf_alpha) for rank in range(1, len(names) + 1)]
    return rng.choices(names, weights=weights, k=count)


def arrival_times(rng: random.Random, rate: float, count: int) -> list[float]:
    """Poisson arrivals at `rate` per second; all at 0 when the rate is infinite."""
    if math.isinf(rate):
        return [0.0] * count
    now, times = 0.0, []
    for _ in range(count):
        times.append(now)
        now += rng.expovariate(rate)
    return times


def build_workload(args: argparse.Namespace, vocab_size: int) -> list[WorkItem]:
    rng = random.Random(args.seed)
    inputs = lengths(rng, args.random_input_len, args.random_range_ratio, args.num_prompts)
    outputs = lengths(rng, args.random_output_len, args.random_range_ratio, args.num_prompts)
    adapters = pick_adapters(rng, args.lora_name or [], args.lora_request_distribution, args.num_prompts,
                             args.lora_zipf_alpha)
    times = arrival_times(rng, args.request_rate, args.num_prompts)
    token_limit = min(vocab_size, 32000)  # ids of ordinary tokens in any real vocabulary
    return [
        WorkItem(i, [rng.randrange(10, token_limit) for _ in range(inputs[i])], outputs[i], adapters[i], times[i])
        for i in range(args.num_prompts)
    ]


async def send(stub, item: WorkItem, start: float, semaphore: asyncio.Semaphore | None, bar: tqdm,
               metadata: tuple[tuple[str, str], ...]) -> Record:
    await asyncio.sleep(max(0.0, start + item.send_at - time.perf_counter()))
    record = Record(item.index, item.adapter, len(item.input_ids), item.output_len)
    if semaphore is not None:
        await semaphore.acquire()
    try:
        await _stream(stub, item, record, metadata)
    finally:
        if semaphore is not None:
            semaphore.release()
        bar.update(1)
    return record


async def _stream(stub, item: WorkItem, record: Record, metadata: tuple[tuple[str, str], ...]) -> None:
    request = serving_pb2.GenerateRequest(
        input_ids=item.input_ids, adapter=item.adapter,
        sampling=serving_pb2.SamplingParams(max_new_tokens=item.output_len, temperature=0.0, ignore_eos=True))
    sent = last = time.perf_counter()
    try:
        async for message in stub.GenerateStream(request, metadata=metadata):
            now = time.perf_counter()
            if message.token_ids:
                if record.output_tokens == 0:
                    record.ttft_ms = (now - sent) * 1e3
                else:
                    record.itl_ms.append((now - last) * 1e3)
                record.output_tokens += len(message.token_ids)
                last = now
            if message.finished:
                t = message.timing
                record.server_timing = {"queued_ms": t.queued_ms, "adapter_wait_ms": t.adapter_wait_ms,
                                        "ttft_ms": t.time_to_first_token_ms, "e2e_ms": t.e2e_ms}
        record.e2e_ms = (time.perf_counter() - sent) * 1e3
        record.success = True
    except grpc.aio.AioRpcError as error:
        record.error = f"{error.code().name}: {error.details()}"


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    ordered = sorted(values)
    return {"mean": statistics.fmean(ordered), "median": statistics.median(ordered),
            "p99": nearest_rank(ordered, 0.99)}


# The TTFT percentiles at which overlap is compared with the blocking baseline (issue 23: never later).
TTFT_PERCENTILES = (10, 25, 50, 75, 90, 99)


def nearest_rank(ordered: list[float], fraction: float) -> float:
    """The nearest-rank percentile of sorted values (a value that occurred, as SGLang's P99)."""
    return ordered[min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1)]


def summarize(records: list[Record], duration_s: float) -> dict:
    done = [r for r in records if r.success]
    output_tokens = sum(r.output_tokens for r in done)
    input_tokens = sum(r.input_len for r in done)
    return {
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration_s": duration_s,
        "request_throughput": len(done) / duration_s,
        "input_token_throughput": input_tokens / duration_s,
        "output_token_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "e2e_ms": _stats([r.e2e_ms for r in done]),
        "ttft_ms": _stats([r.ttft_ms for r in done]),
        "tpot_ms": _stats([r.tpot_ms for r in done if r.tpot_ms is not None]),
        "itl_ms": _stats([x for r in done for x in r.itl_ms]),
        "input_len": _spread([r.input_len for r in done]),
        "output_len": _spread([r.output_tokens for r in done]),
    }


def _spread(values: list[int]) -> dict[str, float]:
    """How the lengths were spread (the range ratio draws them from an interval)."""
    if not values:
        return {"min": 0, "median": 0.0, "max": 0}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


async def run_benchmark(args: argparse.Namespace, connection: Connection) -> dict:
    async with connection.aio_channel() as channel:
        stub = serving_pb2_grpc.LoraServingStub(channel)
        info = await stub.GetServerInfo(serving_pb2.GetServerInfoRequest(), metadata=connection.metadata(),
                                        timeout=SERVER_INFO_TIMEOUT_S)
        workload = build_workload(args, info.vocab_size)
        semaphore = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        bar = tqdm(total=len(workload), disable=args.disable_progress, desc="requests")
        start = time.perf_counter()
        records = await asyncio.gather(*(send(stub, item, start, semaphore, bar, connection.metadata()) for item in workload))
        duration = time.perf_counter() - start
        bar.close()
    settings = {k: v for k, v in vars(args).items() if k not in ("run", "parser", *CONNECTION_FILES)}
    settings |= {"request_rate": str(args.request_rate), "output_file": str(args.output_file)}
    return {"args": settings,
            "server": {"model": info.model, "device": info.device, "dtype": info.dtype,
                       "overlap_loading": info.overlap_loading, "max_loras_per_batch": info.max_loras_per_batch},
            "summary": summarize(records, duration), "records": [asdict(r) for r in records]}


TABLE_ROWS = [
    ("Successful requests", lambda s: s["completed"], "{:.0f}"),
    ("Failed requests", lambda s: s["failed"], "{:.0f}"),
    ("Duration (s)", lambda s: s["duration_s"], "{:.2f}"),
    ("Request throughput (req/s)", lambda s: s["request_throughput"], "{:.2f}"),
    ("Output token throughput (tok/s)", lambda s: s["output_token_throughput"], "{:.2f}"),
    ("Total token throughput (tok/s)", lambda s: s["total_token_throughput"], "{:.2f}"),
    *[(f"{stat.capitalize()} {name} (ms)", (lambda key, stat: lambda s: s[key][stat])(key, stat), "{:.2f}")
      for name, key in (("E2E Latency", "e2e_ms"), ("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"))
      for stat in ("mean", "median", "p99")],
]


LENGTH_ROWS = [("Input length min/median/max (tokens)", "input_len"),
               ("Output length min/median/max (tokens)", "output_len")]


def format_summary(summary: dict) -> str:
    lines = ["{:=^60}".format(" Serving Benchmark Result ")]
    lines += [f"{label:<44}{fmt.format(get(summary)):>16}" for label, get, fmt in TABLE_ROWS]
    for label, key in LENGTH_ROWS:
        spread = "/".join(f"{summary[key][stat]:g}" for stat in ("min", "median", "max"))
        lines.append(f"{label:<44}{spread:>16}")
    return "\n".join(lines)


def format_comparison(names: list[str], summaries: list[dict]) -> str:
    width = max(12, *(len(n) for n in names)) + 4
    header = f"{'metric':<34}" + "".join(f"{n:>{width}}" for n in names)
    header += "".join(f"{'% ' + n:>{width}}" for n in names[1:])
    lines = [f"(% columns: change against {names[0]})", header]
    for label, get, fmt in TABLE_ROWS:
        values = [get(s) for s in summaries]
        row = f"{label:<34}" + "".join(f"{fmt.format(v):>{width}}" for v in values)
        for value in values[1:]:
            change = f"{(value - values[0]) / values[0] * 100:.1f}%" if values[0] else "-"
            row += f"{change:>{width}}"
        lines.append(row)
    return "\n".join(lines)


def add_bench_parser(commands) -> None:
    parser = commands.add_parser("bench", help="benchmark a running server (or compare result files)",
                                 description=__doc__)
    sub = parser.add_subparsers(dest="bench_command")
    compare = sub.add_parser("compare", help="side-by-side table of result files")
    compare.add_argument("files", nargs="+", type=existing_file, help="JSON files of `bench --output-file`")
    compare.set_defaults(run=run_compare)
    add_connection_arguments(parser)
    parser.add_argument("--dataset", choices=("random",), default="random",
                        help="prompts of random token ids (default: %(default)s)")
    parser.add_argument("--random-input-len", type=int, default=512,
                        help="longest prompt, in tokens (default: %(default)s)")
    parser.add_argument("--random-output-len", type=int, default=512,
                        help="longest output, in tokens; every request runs to its length (default: %(default)s)")
    parser.add_argument("--random-range-ratio", type=float, default=0.0,
                        help="as SGLang's: each length is uniform in [LEN * RATIO, LEN] (at least 1), so 0.0 gives "
                             "1 to LEN and 1.0 exactly LEN (default: %(default)s)")
    parser.add_argument("--num-prompts", type=int, default=100, help="requests to send (default: %(default)s)")
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="requests per second, Poisson arrivals; inf sends all at once (default: %(default)s)")
    parser.add_argument("--max-concurrency", type=int, help="most requests in flight (default: no limit)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the workload (default: %(default)s)")
    parser.add_argument("--lora-name", nargs="*", help="adapters to pick from (default: the base model only)")
    parser.add_argument("--lora-request-distribution", choices=("uniform", "distinct", "skewed"), default="uniform",
                        help="how a request's adapter is picked: at random, in turn, or Zipf-skewed "
                             "(default: %(default)s)")
    parser.add_argument("--lora-zipf-alpha", type=float, default=1.5,
                        help="the skewed distribution's exponent (default: %(default)s)")
    parser.add_argument("--output-file", type=Path,
                        help="JSON with the summary and every request's record (default: none)")
    parser.add_argument("--disable-progress", action="store_true", help="no progress bar (default: shown)")
    parser.set_defaults(run=run_bench, parser=parser)


def run_bench(args: argparse.Namespace) -> int:
    result = asyncio.run(run_benchmark(args, connection_from_args(args.parser, args)))
    print(format_summary(result["summary"]))
    if args.output_file:
        args.output_file.parent.mkdir(parents=True, exist_ok=True)
        args.output_file.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["summary"]["failed"] == 0 else 1


def run_compare(args: argparse.Namespace) -> int:
    summaries = [_summary_of(path) for path in args.files]
    print(format_comparison([path.stem for path in args.files], summaries))
    return 0


def _summary_of(path: Path) -> dict:
    result = json.loads(path.read_text())
    if not isinstance(result, dict) or "summary" not in result:
        raise CommandError(f"{path} has no benchmark summary; pass files written by `loraserve bench --output-file`")
    return result["summary"]
