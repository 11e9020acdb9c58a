"""The scheduler's slot policy on the seed's workload, simulated on CPU (no model, no GPU).

The real SchedulerCore drives an in-memory worker (tests/scheduler/fake_worker.py) on a
simulated clock, event by event and two forwards in flight as the server runs them: a request
is submitted at its arrival (the core may issue its load then), each forward lasts what the
H200 engine measured (`StepModel`) and its result reaches the scheduler as it ends; adapter
copies run one at a time, after the forward in flight (`--worker answers-first`, the worker
the model was fitted to) or after the forwards that read their slot (`loads-beside`, as the
worker runs them now), and cost the GPU a stall (`AdapterSet`); a forward carrying a copy
still landing (`--landing-admission on`) ends a layer after it. With `--overlap off` (the
blocking baseline) a load's copy runs between the forward in flight and the next, the GPU
idle meanwhile, as the H100 trace of seed-large-31e287b.json shows (67 idle gaps of 27 ms, a
copy each). The benchmark's clock starts once the core's prefetch has filled the slots. The
workload is `loraserve bench`'s own (`build_workload`): seed 1 is the request list of the H200
runs, so `--calibrate` compares with one request by request.

    python -m benchmarks.slot_policy_sim --calibrate OUT/large-on.json \
        --sets large small --seeds 20 --drain-after-s 0 0.5 1 2 3 4 inf --out FILE
Prints, per adapter set, policy, drain_after_s, pause_tokens_ratio (slot preemption; inf:
off), overlap, landing admission, worker and step scale, the median over seeds of median TTFT, P99 TTFT,
mean TTFT, median TPOT (as `loraserve bench` computes it), mean E2E (simulated ms), the share
of requests whose TTFT is within SGLang's large-set median (164 ms), loads and pauses.
`arrival-order` is the admission order before shortest-first, for comparison. Each overlap-on
setting swept beside `--overlap off` is then compared with it seed by seed (the same requests):
per TTFT percentile, the seeds in which it started later and the median difference. The result
file also keeps each seed's TTFT percentiles.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from collections import deque
from dataclasses import astuple, dataclass, field, replace
from pathlib import Path
from unittest import mock

from benchmarks.common import run_record, write_result
from loraserve.bench import TTFT_PERCENTILES, WorkItem, build_workload, nearest_rank
from protos.loraserve.v1 import internal_pb2 as pb
from protos.loraserve.v1 import serving_pb2
from scheduler.core import SchedulerCore
from scheduler.requests import Request
from settings.config import SchedulerConfig
from tests.scheduler.fake_worker import FakeWorker, hello

CLIENT = b"bench"
ADAPTERS = [f"adapter{i}" for i in range(16)]
VOCAB_SIZE = 128256
FAST_TTFT_MS = 164.0  # SGLang's median TTFT on the large set: a start at least as fast


@dataclass(frozen=True)
class StepModel:
    """Forward time in ms: a decode-only step by the distinct adapters in it, a step with
    prefill chunks by its tokens."""

    decode_ms: float
    decode_ms_per_adapter: float
    mixed_ms: float
    mixed_ms_per_token: float

    def step_ms(self, batch: pb.Forward) -> float:
        tokens = sum(max(1, len(s.token_ids)) for s in batch.sequences)
        if tokens == len(batch.sequences):
            adapters = len({s.adapter_slot for s in batch.sequences if s.adapter_slot >= 0})
            return self.decode_ms + self.decode_ms_per_adapter * adapters
        return self.mixed_ms + self.mixed_ms_per_token * tokens

    def scaled(self, factor: float) -> StepModel:
        return StepModel(*(factor * value for value in astuple(self)))


@dataclass(frozen=True)
class AdapterSet:
    size_bytes: int
    rank: int
    steps: StepModel
    copy_ms: float  # host-to-slot copy of one adapter
    load_stall_ms: float  # GPU time a load costs the forwards around it


# Least squares over the forwards of an H200 trace (large set, overlap on, arrival-order
# admission: the run of benchmarks/results/seed-large-a6a4a22.json) that overlap no copy: decode
# 6.4 ms + 0.48 ms per adapter (2,505), with prefill 10.7 ms + 0.030 ms a token (82); copies
# 26.2 ms (51 GB/s). Each of the 51 loads slowed the forwards it overlapped by ~7.9 ms in all
# (the copy shares memory bandwidth). It also left the GPU idle ~8.3 ms as its copy started,
# which the copier's own queuing thread has removed since (`load_start_stalls`: none in the
# H100 and H200 runs seed-large-31e287b.json and seed-large-7a3ac05.json).
LARGE = AdapterSet(1_342_177_280, 256, StepModel(6.4, 0.48, 10.7, 0.030), copy_ms=26.2, load_stall_ms=7.9)
# No trace of the small set from that engine: its median TPOT on the engine before (8.64 ms,
# large 11.88 ms) scaled by large's gain between the two (10.83 / 11.88) is ~7.9 ms, which a
# per-adapter cost of 0.15 ms gives in this simulation. Copies of up to 170 MB: 3.3 ms at most;
# the slowdown as large's by bytes (not measured).
SMALL = AdapterSet(100_000_000, 64, StepModel(6.4, 0.15, 10.7, 0.030), copy_ms=2.0, load_stall_ms=0.6)
SETS = {"large": LARGE, "small": SMALL}
LAYERS = 32  # of the 8B model: a forward waiting on a copy layer by layer runs its last layer after it


def workload(seed: int, count: int, rate: float) -> list[WorkItem]:
    args = argparse.Namespace(seed=seed, random_input_len=512, random_output_len=512, random_range_ratio=0.0,
                              num_prompts=count, lora_name=ADAPTERS, lora_request_distribution="distinct",
                              lora_zipf_alpha=1.5, request_rate=rate)
    return build_workload(args, VOCAB_SIZE)


@dataclass(frozen=True)
class RequestResult:
    ttft_ms: float
    e2e_ms: float
    output_tokens: int

    @property
    def tpot_ms(self) -> float | None:
        return None if self.output_tokens <= 1 else (self.e2e_ms - self.ttft_ms) / (self.output_tokens - 1)


@dataclass
class SimulatedClock:
    ms: float = 0.0

    def monotonic(self) -> float:
        return self.ms / 1e3


@dataclass(frozen=True)
class SimulatedRun:
    results: list[RequestResult]
    loads: int
    pauses: int


def simulate(adapters: AdapterSet, items: list[WorkItem], config: SchedulerConfig,
             core_class: type[SchedulerCore] = SchedulerCore, loads_wait_for_forward: bool = True) -> SimulatedRun:
    """Per-request results, loads and pauses. The core sees the simulated clock as
    `time.monotonic` (arrival times, waits)."""
    clock = SimulatedClock()
    with mock.patch.object(time, "monotonic", clock.monotonic):
        return _simulate(adapters, items, core_class(config, worker_hello()), clock, loads_wait_for_forward)


def worker_hello(slots: int = 8, host_entries: int = 16, host_cache_bytes: int = 1 << 40) -> pb.WorkerHello:
    """The simulated H200 worker: `slots` GPU adapter slots, `host_entries` adapters in pinned memory."""
    return hello(max_loras_per_batch=slots, max_loaded_loras=host_entries, num_kv_pages=16384, page_size=16,
                 max_context_length=2048, vocab_size=VOCAB_SIZE, host_cache_bytes=host_cache_bytes)


@dataclass
class TimedWorker(FakeWorker):
    """Times each forward by `steps` on the simulated clock as it is sent (it starts when the
    forward before it ends), and each copy as it is issued: one at a time, `copy_ms` each, and
    the next forward sent starts `load_stall_ms` later. With `loads_wait_for_forward` (the
    worker before overlapped loads ran beside its forward in flight) a copy starts once the
    forward running when the load came has ended; without it, once the forwards that read its
    slot have. A blocking load (overlap off) is reported done at once, as the scheduler counts
    it; the forward sent next starts after its copy. A forward's result reaches the scheduler
    as the forward ends."""

    clock: SimulatedClock = field(default_factory=SimulatedClock)
    steps: StepModel = StepModel(0.0, 0.0, 0.0, 0.0)
    copy_ms: float = 0.0
    load_stall_ms: float = 0.0
    loads_wait_for_forward: bool = True
    stall_ms: float = 0.0  # owed by the next forward sent
    blocking_copies: int = 0  # run before the next forward sent
    last_end: float = 0.0  # of the forward sent last (ms)
    forward_end: float = 0.0  # of the forward answered last (ms)
    ends: deque[float] = field(default_factory=deque)  # of the forwards in flight, oldest first
    copy_free_at: float = 0.0
    copy_done_at: dict[str, float] = field(default_factory=dict)
    slot_read_until: dict[int, float] = field(default_factory=dict)  # the end of the last forward reading each slot

    def sent(self, batch: pb.Forward) -> None:
        step_ms = self.steps.step_ms(batch)
        start = max(self.clock.ms, self.last_end) + self.blocking_copies * self.copy_ms
        end = start + self.stall_ms + step_ms
        # Landing admission: a forward carrying an adapter still being copied waits for it layer
        # by layer, so it ends no sooner than one layer's compute after the copy.
        slots = {s.adapter_slot for s in batch.sequences if s.adapter_slot >= 0}
        for name in {self.slots[slot] for slot in slots} & self.copy_done_at.keys():
            end = max(end, self.copy_done_at[name] + step_ms / LAYERS)
        self.last_end = end
        self.ends.append(end)
        self.slot_read_until.update(dict.fromkeys(slots, end))
        self.stall_ms, self.blocking_copies = 0.0, 0

    def forward(self, batch: pb.Forward) -> pb.ForwardResult:
        self.forward_end = self.clock.ms = self.ends.popleft()
        return super().forward(batch)

    def next_event_ms(self) -> float:
        """When the oldest forward in flight ends, or else the next copy does (inf: neither)."""
        if self.ends:
            return self.ends[0]
        return min((self.copy_done_at[name] for name in self.loading), default=math.inf)

    def pump(self) -> None:
        """What the scheduler does at the current time: hears of copies landed, sends batches."""
        self.core.on_load_events(self.tick_loads())
        self._execute(self.core.take_commands())
        self.send_batches()

    def _execute(self, commands: list[pb.WorkerCommand]) -> None:
        for command in commands:
            super()._execute([command])
            if command.WhichOneof("kind") != "load_slot":
                continue
            if command.load_slot.blocking:
                self.blocking_copies += 1
            else:
                self._time_copy(command.load_slot.name, command.load_slot.slot)

    def _time_copy(self, name: str, slot: int) -> None:
        running_until = self.ends[0] if self.ends else self.clock.ms
        previous = running_until if self.loads_wait_for_forward else self.slot_read_until.get(slot, 0.0)
        self.copy_free_at = max(self.clock.ms, previous, self.copy_free_at) + self.copy_ms
        self.copy_done_at[name] = self.copy_free_at
        self.stall_ms += self.load_stall_ms

    def tick_loads(self) -> pb.LoadEvents:
        events = pb.LoadEvents(staged=self.staged)
        self.staged = []
        for name, (slot, _) in list(self.loading.items()):
            if self.copy_done_at.get(name, -math.inf) <= self.clock.ms:  # a blocking load: at once
                del self.loading[name]
                timed = self.copy_done_at.pop(name, None) is not None
                events.loaded.add(name=name, slot=slot, copy_s=self.copy_ms / 1e3 if timed else 0.0)
            else:
                copied_ms = self.clock.ms - (self.copy_done_at[name] - self.copy_ms)
                events.copying.add(name=name, landed=min(1.0, max(0.0, copied_ms / self.copy_ms)))
        return events


def _simulate(adapters: AdapterSet, items: list[WorkItem], core: SchedulerCore,
              clock: SimulatedClock, loads_wait_for_forward: bool) -> SimulatedRun:
    """Event by event: an arrival is submitted at its time (the core may issue its load and send
    a forward then), a forward's result at its end, a copy's landing at its end."""
    worker = TimedWorker(core, one_ahead=True, clock=clock, steps=adapters.steps, copy_ms=adapters.copy_ms,
                         load_stall_ms=adapters.load_stall_ms, loads_wait_for_forward=loads_wait_for_forward)
    for name in ADAPTERS:
        worker.register(name, size=adapters.size_bytes, rank=adapters.rank)
    start_ms = _prefetch(worker, clock)
    arrival = {item.index: start_ms + item.send_at * 1e3 for item in items}
    pending = deque(items)
    first_token: dict[int, float] = {}
    finished: dict[int, float] = {}
    tokens: dict[int, int] = {}
    while len(finished) < len(items):
        next_arrival = arrival[pending[0].index] if pending else math.inf
        event = worker.next_event_ms()
        if next_arrival < event:
            clock.ms = max(clock.ms, next_arrival)
            submit(core, pending.popleft())
        elif worker.ends:
            worker.core.on_forward_result(worker.forward(worker.in_flight.popleft()))
        else:  # nothing in flight or landing: the core may be waiting for time alone (a drain)
            clock.ms = max(clock.ms, event) if event < math.inf else clock.ms + 1.0
        worker.pump()
        for _, message in core.take_outputs():
            output, index = message.output, int(message.output.request_id)
            tokens[index] = tokens.get(index, 0) + len(output.token_ids)
            if output.token_ids and index not in first_token:
                first_token[index] = clock.ms
            if output.finished:
                finished[index] = clock.ms
    results = [RequestResult(first_token[i] - arrival[i], finished[i] - arrival[i], tokens[i]) for i in arrival]
    loads = sum(1 for c in worker.log if c.WhichOneof("kind") == "load_slot")
    return SimulatedRun(results, loads, core.stats().requests_paused)


def _prefetch(worker: TimedWorker, clock: SimulatedClock) -> float:
    """As the benchmark starts its clock once the server has staged the adapters: the core's
    prefetch fills the slots first. Returns the time the workload starts at (ms)."""
    while True:
        commands = len(worker.log)
        worker.step()
        if not worker.loading and len(worker.log) == commands:
            break
        clock.ms += 1.0
    worker.stall_ms = 0.0
    return clock.ms


def submit(core: SchedulerCore, item: WorkItem) -> None:
    params = serving_pb2.SamplingParams(max_new_tokens=item.output_len, temperature=0, top_p=1, top_k=-1,
                                        ignore_eos=True)
    core.submit(CLIENT, pb.SubmitRequest(request_id=str(item.index), input_ids=item.input_ids,
                                         adapter=item.adapter, sampling=params))


def summarize(results: list[RequestResult]) -> dict:
    ttft = sorted(r.ttft_ms for r in results)
    tpot = [t for r in results if (t := r.tpot_ms) is not None]
    return {"median_ttft_ms": statistics.median(ttft), "p99_ttft_ms": ttft[math.ceil(0.99 * len(ttft)) - 1],
            "mean_ttft_ms": statistics.fmean(ttft), "median_tpot_ms": statistics.median(tpot),
            "mean_e2e_ms": statistics.fmean(r.e2e_ms for r in results),
            "fast_share": sum(t <= FAST_TTFT_MS for t in ttft) / len(ttft),
            "ttft_percentiles_ms": {p: nearest_rank(ttft, p / 100) for p in TTFT_PERCENTILES}}


class ArrivalOrderCore(SchedulerCore):
    """The policy before shortest-first: waiting requests were admitted,
    and claimed the slots that freed, in arrival order."""

    def admission_order(self, now: float) -> list[Request]:
        return list(self.waiting)


POLICIES: dict[str, type[SchedulerCore]] = {"shortest-first": SchedulerCore, "arrival-order": ArrivalOrderCore}
WORKERS = {"answers-first": True, "loads-beside": False}  # TimedWorker.loads_wait_for_forward
METRICS = ("median_ttft_ms", "p99_ttft_ms", "mean_ttft_ms", "median_tpot_ms", "mean_e2e_ms", "fast_share", "loads",
           "pauses")


def sweep(adapters: AdapterSet, core_class: type[SchedulerCore], config: SchedulerConfig, seeds: int,
          num_prompts: int, rate: float, loads_wait_for_forward: bool = True) -> dict:
    """Seeds 1..`seeds` (1 is the H200 runs' workload); the median over seeds of each figure."""
    runs = []
    for seed in range(1, seeds + 1):
        run = simulate(adapters, workload(seed, num_prompts, rate), config, core_class, loads_wait_for_forward)
        runs.append({"seed": seed, **summarize(run.results), "loads": run.loads, "pauses": run.pauses})
    return {"median over seeds": {key: statistics.median(run[key] for run in runs) for key in METRICS},
            "runs": runs}


def against_off(sweeps: dict[tuple, list[dict]]) -> dict[str, dict]:
    """Each overlap-on sweep against the overlap-off sweep of the same set and policy, seed by seed
    (the same requests): per TTFT percentile, in how many seeds overlap started later, and the
    median difference. Issue 23's target is none later at any percentile."""
    compared = {}
    for key, runs in sweeps.items():
        *same, overlap, landing = key
        off = sweeps.get((*same, "off", "off"))
        if overlap == "off" or off is None:
            continue
        set_name, policy, drain_after_s, ratio, max_pauses, worker, step_scale = same
        name = (f"{set_name} {policy} drain_after_s={drain_after_s:g} pause_tokens_ratio={ratio:g}"
                f" max_pauses_per_request={max_pauses} landing_admission={landing} worker={worker}"
                f" step_scale={step_scale:g}")
        compared[name] = {p: {"later_in_seeds": sum(on["ttft_percentiles_ms"][p] > base["ttft_percentiles_ms"][p]
                                                    for on, base in zip(runs, off)),
                              "median_difference_ms": statistics.median(on["ttft_percentiles_ms"][p]
                                                                        - base["ttft_percentiles_ms"][p]
                                                                        for on, base in zip(runs, off))}
                          for p in TTFT_PERCENTILES}
    return compared


def calibrate(measured_file: Path) -> dict:
    """A measured run of the large set (arrival order, drain after 2 s, as seed-large-a6a4a22.json) against
    the simulation of the same requests under that policy, and the prediction for this one."""
    measured = json.loads(measured_file.read_text())
    records = measured["records"]
    items = workload(measured["args"]["seed"], len(records), float(measured["args"]["request_rate"]))
    before = simulate(LARGE, items, SchedulerConfig(max_batch_tokens=4096, drain_after_s=2.0), ArrivalOrderCore)
    after = simulate(LARGE, items, SchedulerConfig(max_batch_tokens=4096))
    observed = [RequestResult(r["ttft_ms"], r["e2e_ms"], r["output_tokens"]) for r in records]
    fast = 150.0  # ms: a request that found its adapter in a slot, or a slot to load it into
    return {"measured": {**summarize(observed), "loads": measured["stats"]["loads_started"]},
            "simulated, its policy": {**summarize(before.results), "loads": before.loads},
            "ttft_correlation": statistics.correlation([r.ttft_ms for r in observed],
                                                       [r.ttft_ms for r in before.results]),
            "requests_fast_in_both_or_slow_in_both": sum((o.ttft_ms < fast) == (s.ttft_ms < fast)
                                                         for o, s in zip(observed, before.results)),
            "predicted, this policy": {**summarize(after.results), "loads": after.loads, "pauses": after.pauses}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sets", nargs="+", default=["large"], choices=list(SETS))
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--drain-after-s", type=float, nargs="+", default=[SchedulerConfig.drain_after_s],
                        help="SchedulerConfig.drain_after_s values to compare (inf: never drain)")
    parser.add_argument("--pause-tokens-ratio", type=float, nargs="+", default=[SchedulerConfig.pause_tokens_ratio],
                        help="SchedulerConfig.pause_tokens_ratio values to compare (inf: never pause)")
    parser.add_argument("--max-pauses-per-request", type=int, nargs="+",
                        default=[SchedulerConfig.max_pauses_per_request])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--request-rate", type=float, default=4.0)
    parser.add_argument("--step-scale", type=float, nargs="+", default=[1.0],
                        help="multiplies every forward time: what a faster engine would give (several: how much "
                             "a result moves with the engine's speed)")
    parser.add_argument("--overlap", nargs="+", default=["on"], choices=["on", "off"],
                        help="overlap_loading; off: the blocking baseline (landing admission does not apply)")
    parser.add_argument("--landing-admission", nargs="+", choices=["off", "on"],
                        default=["on" if SchedulerConfig.admit_landing_loads else "off"],
                        help="admit_landing_loads: a request joins the forward predicted to follow its copy")
    parser.add_argument("--worker", nargs="+", default=["answers-first"], choices=list(WORKERS),
                        help="answers-first: a copy starts once the forward in flight has ended, as the worker "
                             "the model was fitted to; loads-beside: once the forwards reading its slot have, as now")
    parser.add_argument("--calibrate", type=Path, help="a `loraserve bench` JSON of the large set, overlap on")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = run_record("slot_policy_sim", median_over_seeds={}, ttft_percentiles_by_seed={})
    if args.calibrate:
        results["calibration"] = calibrate(args.calibrate)
        print(json.dumps(results["calibration"]))
    sweeps: dict[tuple, list[dict]] = {}
    for set_name in args.sets:
        for policy in args.policies:
            for drain_after_s in args.drain_after_s:
                for ratio, max_pauses, overlap, landing, worker, step_scale in itertools.product(
                        args.pause_tokens_ratio, args.max_pauses_per_request, args.overlap, args.landing_admission,
                        args.worker, args.step_scale):
                    if overlap == "off" and landing == "on":
                        continue
                    name = (f"{set_name} {policy} drain_after_s={drain_after_s:g} pause_tokens_ratio={ratio:g}"
                            f" max_pauses_per_request={max_pauses} overlap={overlap} landing_admission={landing}"
                            f" worker={worker} step_scale={step_scale:g}")
                    config = SchedulerConfig(max_batch_tokens=4096, drain_after_s=drain_after_s,
                                             pause_tokens_ratio=ratio, max_pauses_per_request=max_pauses,
                                             overlap_loading=overlap == "on", admit_landing_loads=landing == "on")
                    adapters = replace(SETS[set_name], steps=SETS[set_name].steps.scaled(step_scale))
                    swept = sweep(adapters, POLICIES[policy], config, args.seeds, args.num_prompts,
                                  args.request_rate, WORKERS[worker])
                    figures = swept["median over seeds"]
                    results["median_over_seeds"][name] = figures
                    results["ttft_percentiles_by_seed"][name] = [
                        {str(p): round(ms, 1) for p, ms in run["ttft_percentiles_ms"].items()} for run in swept["runs"]]
                    print(name, " ".join(f"{key}={value:.3g}" for key, value in figures.items()), flush=True)
                    sweeps[(set_name, policy, drain_after_s, ratio, max_pauses, worker, step_scale, overlap,
                            landing)] = swept["runs"]
    results["against_off"] = against_off(sweeps)
    for name, percentiles in results["against_off"].items():
        print(f"{name}: TTFT percentile: seeds later than off, median difference (ms):",
              " ".join(f"P{p} {c['later_in_seeds']} {c['median_difference_ms']:+.1f}" for p, c in percentiles.items()))
    if args.out:
        write_result(args.out, results)


if __name__ == "__main__":
    main()
