"""Every setting of loraserve, declared once: its default, help text and checks.

One frozen dataclass per part: `FrontendConfig`, `SchedulerConfig` and `EngineConfig` (each
handed whole to its process), `LoggingConfig` (all of them), `DeploymentConfig` (the
launcher's), nested in `ServeConfig`. `settings.flags` turns the fields into command-line
flags, into a child process's argv and into the README's table; a field's `Spec` (in its
metadata) says how. Field names are unique across the parts, so `ServeConfig.of` and
`ServeConfig.replace` take them flat.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from settings.logs import LOG_FORMATS

ROUTING_POLICIES = ("residency", "round-robin", "least-loaded")  # frontend/routing.py

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Target modules that share an input: one fused base GEMM each (`worker.model.llama`).
MODULE_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
# The rank of slots folded into the base GEMMs (`worker.lora.folded`): the most it pays for, and tl.dot's least.
FOLD_RANK = 16
GIB = 1 << 30


@dataclass(frozen=True)
class Switch:
    """A flag without a value that sets its field to `value`."""

    value: Any
    help: str


@dataclass(frozen=True)
class Spec:
    """How a field becomes flags (`settings.flags`), and the checks `check_fields` makes."""

    help: str
    flag: str | None = None  # default: --field-name
    aliases: tuple[str, ...] = ()  # further names of the same flag
    # Flags without a value; a boolean has only these (one for its non-default value at least).
    switches: Mapping[str, Switch] = dataclasses.field(default_factory=dict)
    choices: tuple[Any, ...] = ()
    parse: Callable[[str], Any] | None = None  # the flag's text -> the value (default: the field's type)
    minimum: float | None = None
    scaled: tuple[str, int, str] | None = None  # (flag, unit, its name): a second flag taking the value in units
    default_text: str | None = None  # the README's default where the value alone would mislead
    serve: bool = True  # False: the launcher sets it (a runtime file), `loraserve serve` has no flag


def setting(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None, help: str,
            **spec: Any) -> Any:
    """A dataclass field with its `Spec`."""
    metadata = {"spec": Spec(help=help, **spec)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def spec_of(field: dataclasses.Field) -> Spec:
    return field.metadata["spec"]


def check_fields(config: Any) -> None:
    """The checks every `Spec` declares (choices, minimum); raises ValueError."""
    for field in dataclasses.fields(config):
        spec, value = spec_of(field), getattr(config, field.name)
        if value is None:
            continue
        items = value if isinstance(value, tuple) else (value,)
        if spec.choices and any(item not in spec.choices for item in items):
            raise ValueError(f"{field.name} must be one of {', '.join(map(str, spec.choices))}, not {value!r}")
        if spec.minimum is not None and value < spec.minimum:
            raise ValueError(f"{field.name} must be {spec.minimum:g} or more, not {value}")


def _load_format(text: str) -> str:
    """`--load-format auto`: the checkpoint's safetensors."""
    return "safetensors" if text == "auto" else text


@dataclass(frozen=True)
class FrontendConfig:
    host: str = setting("127.0.0.1", help="address the gRPC, HTTP and metrics servers bind")
    port: int = setting(50051, help="gRPC API (0: any free port)", minimum=0)
    tokenizer_path: str | None = setting(
        None, flag="--tokenizer", default_text="the model directory",
        help="tokenizer directory; without one, prompts must be token ids")
    model_name: str | None = setting(
        None, flag="--served-model-name", aliases=("--model-name",), default_text="the model directory's name",
        help="the base model's name in the APIs")
    http_port: int | None = setting(None, default_text="off", minimum=0,
                                    help="OpenAI-compatible HTTP API (0: any free port)")
    metrics_port: int | None = setting(None, default_text="off", minimum=0,
                                       help="Prometheus metrics at `/metrics` (0: any free port)")
    max_message_bytes: int = setting(16 << 20, minimum=1, help="largest gRPC message, either way")
    grace_seconds: float = setting(
        5.0, minimum=0, help="on SIGTERM, how long in-flight requests may take to finish (new ones are refused)")
    admin_timeout_s: float = setting(5.0, minimum=0, help="how long an admin call waits for the scheduler")
    load_adapter_timeout_s: float = setting(
        30.0, minimum=0, help="how long LoadAdapter waits for the scheduler (the worker validates the files first)")
    readiness_retry_s: float = setting(0.5, minimum=0, help="between readiness probes while the scheduler is not ready")
    # A probe sent while the connection is being re-established can be lost with the old
    # pipe; a short wait retries it soon instead of holding readiness for admin_timeout_s.
    readiness_probe_timeout_s: float = setting(1.0, minimum=0, help="how long a readiness probe waits")
    stop_ack_timeout_s: float = setting(
        1.0, minimum=0, help="how long a request stopped at a stop string waits for the scheduler's timing")
    metrics_timeout_s: float = setting(2.0, minimum=0, help="how long a scrape waits for the scheduler's figures")
    liveness_silence_s: float = setting(
        10.0, minimum=0, help="ping the scheduler after this long without a message while work is in flight")
    liveness_ping_timeout_s: float = setting(5.0, minimum=0, help="fail the work in flight if a ping takes longer")
    liveness_check_interval_s: float = setting(1.0, minimum=0, help="how often the scheduler's silence is checked")
    auth_token_file: str | None = setting(
        None, default_text="none", help="file holding the bearer token every call but health needs (gRPC and HTTP)")
    admin_token_file: str | None = setting(
        None, default_text="none", help="file holding the bearer token LoadAdapter/UnloadAdapter need")
    tls_cert: str | None = setting(None, default_text="none",
                                   help="PEM certificate chain: serve TLS (with `--tls-key`)")
    tls_key: str | None = setting(None, default_text="none", help="PEM private key of `--tls-cert`")
    tls_client_ca: str | None = setting(
        None, default_text="none", help="PEM CA: mutual TLS, clients need a certificate it signed")
    replica_addresses: tuple[str, ...] = setting(
        (), flag="--replica-address", default_text="none",
        help="schedulers of replicas started elsewhere (`tcp://HOST:PORT ...`), served besides the local ones")
    replica_state_interval_s: float = setting(
        0.05, minimum=0.001, help="how often each replica is asked which adapters it holds and its load, for routing")
    routing_load_bound: float = setting(
        1.25, minimum=1, help="a replica holds at most this times its fair share of the requests in flight "
                              "before an adapter's requests go elsewhere (bounded-load hashing; docs/routing.md)")
    routing_min_bound: int = setting(
        16, minimum=1, help="... and it may always hold this many, however light the load")
    routing_requests_per_replica: int = setting(
        8, minimum=1, help="an adapter with more requests in flight than this per replica holding it spreads to "
                           "one more replica")
    routing_spread_interval_s: float = setting(
        1.0, minimum=0, help="at most one more replica per adapter this often")
    routing_policy: str = setting(
        "residency", choices=ROUTING_POLICIES,
        help="`residency` (where the adapter is, docs/routing.md); `round-robin` and `least-loaded` are "
             "adapter-blind baselines for measurements")

    def __post_init__(self) -> None:
        check_fields(self)
        if bool(self.tls_cert) != bool(self.tls_key) or (self.tls_client_ca and not self.tls_cert):
            raise ValueError("--tls-cert and --tls-key go together, and --tls-client-ca needs them")


@dataclass(frozen=True)
class SchedulerConfig:
    initial_adapters: dict[str, str] = setting(
        factory=dict, flag="--lora-paths", default_text="none", help="`NAME=PATH ...` adapters registered at start")
    overlap_loading: bool = setting(True, help="adapters load while other requests run", switches={
        "--enable-lora-overlap-loading": Switch(True, "run the ready requests while adapters load"),
        "--disable-lora-overlap-loading": Switch(False, "the blocking baseline: a batch waits for its loads")})
    # Overlap mode, idle server: start a request once its adapter's copy runs, its forward
    # waiting per layer on the copy. Off by default: a request arriving during the copy waits
    # behind that forward, which costs little only when copies are short (GPU, pinned cache).
    pipelined_loads: bool = setting(False, help="idle server: start a request while its adapter's copy runs",
                                    switches={"--pipelined-loads": Switch(True, "idle server: start a request "
                                                                          "while its adapter's copy runs "
                                                                          "(per-layer waits)")})
    # Overlap mode: a request whose adapter is being copied from host memory joins the first
    # forward predicted to meet the copy without waiting for it (per-layer waits let it start
    # before the copy ends), before the worker reports the load, once a report has shown the
    # copy's pace. Measured on the seed's workload it starts the median request 22-33% sooner
    # than waiting for the report, for about 1% on the median TPOT (docs/performance.md).
    admit_landing_loads: bool = setting(
        True, help="start a request in the first forward predicted to meet its adapter's copy without "
                   "waiting for it, not after the load is reported", switches={
                       "--admit-landing-loads": Switch(True, "start a request in the first forward predicted to "
                                                             "meet its adapter's copy, at the pace the worker "
                                                             "reports, without waiting for it (scheduler/landing.py)"),
                       "--no-admit-landing-loads": Switch(False, "a request whose adapter is loading waits for "
                                                                 "the load's report (a step or two after the copy)")})
    # Slot preemption: a request that finds every slot referenced pauses the running request
    # with the most tokens left whose adapter runs nothing else, if it has at least this many
    # times the tokens the waiting one asks for (shortest remaining first). The paused request
    # keeps its KV pages and resumes once its adapter holds a slot again. inf: never pause.
    pause_tokens_ratio: float = setting(  # benchmarks/slot_policy_sim.py; docs/slot-policy.md "Slot preemption"
        1.5, help="slot preemption: a request finding every slot busy pauses a running one, alone on its slot, "
                  "with this many times its tokens left (it keeps its KV cache and resumes later; `inf`: never)")
    max_pauses_per_request: int = setting(1, minimum=0, help="bounds the delay one request takes from preemption")
    # 2: the next step is sent while the worker runs the current one (the GPU never waits for
    # the scheduler); 1: the scheduler waits for each step's tokens.
    max_forwards_in_flight: int = setting(2, choices=(1, 2), help="steps sent to the worker ahead of their tokens",
                                          switches={"--disable-overlap-schedule": Switch(
                                              1, "the scheduler waits for each step's tokens before sending the "
                                                 "next (comparisons)")})
    prefetch: bool = setting(True, help="stage idle adapters into host memory and free slots ahead of demand",
                             switches={"--no-prefetch": Switch(False, "stage and load adapters only on demand")})
    max_batch_tokens: int = setting(2048, minimum=1, help="tokens per forward (decodes + prefill chunks)")
    max_running_requests: int = setting(256, minimum=1, help="requests admitted at once")
    max_queued_requests: int = setting(1024, minimum=0, help="waiting requests before RESOURCE_EXHAUSTED / 429")
    max_draining_slots: int = setting(  # benchmarks/slot_policy_sim.py
        1, minimum=0, help="slots drained at once for adapters waiting for one")
    # Before this, slots usually free on their own, and a drain holds back resident requests.
    drain_after_s: float = setting(
        3.0, minimum=0, help="a slot is drained for an adapter once its oldest request has waited this long; "
                             "until then waiting requests take freed slots shortest first, then oldest first")
    adapter_root: str | None = setting(
        None, default_text="none (the demo: its directory)",
        help="LoadAdapter accepts only paths inside this directory")
    registry_file: str | None = setting(
        None, serve=False, help="keeps the adapters loaded at run time across scheduler restarts (JSON)")

    def __post_init__(self) -> None:
        check_fields(self)
        if math.isnan(self.pause_tokens_ratio) or self.pause_tokens_ratio <= 1:
            raise ValueError(f"pause_tokens_ratio must exceed 1 (inf: never pause), not {self.pause_tokens_ratio}: "
                             "at 1 or less two requests could pause each other in turn")


@dataclass(frozen=True)
class EngineConfig:
    model_path: str = setting(default_text="the demo",
                              help="Hugging Face model directory (Llama 2/3, Mistral, Qwen2, Qwen3, Gemma 2, "
                                   "Gemma 3 text, Phi-3)")
    load_format: str = setting("safetensors", choices=("safetensors", "dummy"), parse=_load_format,
                               help="`dummy`: random weights from config.json alone (`auto`: safetensors)")
    device: str = setting("auto", choices=("auto", "cpu", "cuda"), help="`cpu`, `cuda`, or `auto` (CUDA if there is one)")
    dtype: str = setting("auto", choices=("auto", "float32", "bfloat16", "float16"),
                         help="`float32`, `bfloat16`, `float16`, or `auto` (the checkpoint's)")
    tensor_parallel_size: int = setting(
        1, aliases=("--tp",), minimum=1,
        help="GPUs (CPU processes) one worker spreads the model over: a group of that many processes, one per GPU")
    tp_timeout_s: float = setting(
        60.0, minimum=0.1, help="a collective of the tensor-parallel group taking longer means a rank hung: "
                                "the group goes down and is started again")
    context_length: int | None = setting(
        None, aliases=("--max-model-len",), minimum=1, default_text="the model's `max_position_embeddings`",
        help="longest prompt plus output, in tokens (SGLang's name; vLLM's `--max-model-len`); "
             "at most the model's (a larger value is refused)")
    page_size: int = setting(16, minimum=1, help="tokens per KV-cache page")
    num_kv_pages: int = setting(2048, minimum=1, help="KV-cache pages")
    max_loras_per_batch: int = setting(8, minimum=1, help="GPU adapter slots")
    saved_module_slots: int = setting(
        0, minimum=0, help="GPU adapter slots (the first ones, at most all of them) that own an embedding and "
                           "an LM head table, for adapters with `modules_to_save`: each takes 2 x vocab x hidden "
                           "elements")
    max_loaded_loras: int = setting(16, minimum=1, help="adapters in the pinned host cache")
    max_lora_rank: int = setting(64, minimum=1, help="largest adapter rank accepted")
    lora_fold: bool = setting(False, help="LoRA runs inside the base GEMMs and the kernels that read their outputs",
                              switches={"--lora-fold": Switch(True, "steps carrying a prompt run LoRA inside the "
                                                                    "base GEMMs and their readers (adapters up to "
                                                                    "rank 16, no DoRA; docs/design.md)")})
    lora_target_modules: tuple[str, ...] = setting(TARGET_MODULES, choices=TARGET_MODULES,
                                                   help="projections the adapter slots hold (Phi-3's qkv_proj and "
                                                        "gate_up_proj as their q/k/v and gate/up parts)")
    host_cache_bytes: int = setting(4 * GIB, minimum=0, scaled=("--host-cache-gb", GIB, "GiB"),
                                    help="pinned host memory for adapters")
    seed: int = setting(0, help="seed of the dummy weights")
    static_decode: bool = setting(True, help="decode-only batches run on fixed-size buffers",
                                  switches={"--disable-static-decode": Switch(False, "decode steps run on the "
                                                                              "general eager path (comparisons)")})
    cuda_graphs: bool = setting(True, help="static decode steps are captured and replayed as CUDA graphs on a GPU",
                                switches={"--disable-cuda-graphs": Switch(False, "decode steps run eagerly "
                                                                          "(comparisons)")})
    max_decode_batch: int = setting(256, minimum=1, help="larger decode batches take the eager path")
    static_mixed: bool = setting(True, help="batches with prefill chunks run on static buffers too",
                                 switches={"--disable-mixed-graphs": Switch(False, "steps with prefill chunks run "
                                                                            "eagerly (comparisons)")})

    def __post_init__(self) -> None:
        check_fields(self)
        if self.lora_fold:
            self._check_foldable()
        if self.saved_module_slots > self.max_loras_per_batch:
            raise ValueError(f"saved_module_slots ({self.saved_module_slots}) must be at most max_loras_per_batch "
                             f"({self.max_loras_per_batch}): they are among the GPU adapter slots")


    def _check_foldable(self) -> None:
        if self.max_lora_rank > FOLD_RANK:
            raise ValueError(f"--lora-fold serves adapters up to rank {FOLD_RANK}: give --max-lora-rank {FOLD_RANK} "
                             f"or less, not {self.max_lora_rank}")
        for group in MODULE_GROUPS:
            if 0 < len(set(group) & set(self.lora_target_modules)) < len(group):
                raise ValueError(f"--lora-fold folds whole module groups (one base GEMM each): give all of "
                                 f"{', '.join(group)} in --lora-target-modules, or none")


@dataclass(frozen=True)
class LoggingConfig:
    log_level: str = setting("info", choices=("debug", "info", "warning", "error"),
                             help="`debug` adds per-request lines in the scheduler and per-forward lines in the worker")
    log_format: str = setting("logfmt", choices=LOG_FORMATS,
                              help="`logfmt` (key=value) or `json`, one line per record")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class DeploymentConfig:
    replicas: int | None = setting(
        None, minimum=1, default_text="one per GPU (1 on CPU or one GPU)",
        help="scheduler+worker pairs on this host, each worker on its own GPU when there are enough")
    log_file: str | None = setting(None, default_text="stderr", help="append the three processes' logs to this file")
    startup_timeout_s: float = setting(300.0, minimum=0, help="how long start-up may take before giving up")
    max_restarts: int = setting(
        5, minimum=0, help="restarts of one crashed process within the restart window before giving up")
    restart_window_s: float = setting(600.0, minimum=0, help="seconds in which restarts are counted")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class ServeConfig:
    """What `loraserve serve` runs: a part per process, logging for all, the launcher's own."""

    engine: EngineConfig
    frontend: FrontendConfig = dataclasses.field(default_factory=FrontendConfig)
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    deployment: DeploymentConfig = dataclasses.field(default_factory=DeploymentConfig)

    @classmethod
    def of(cls, **settings: Any) -> ServeConfig:
        """From flat field names: `ServeConfig.of(model_path=..., device="cpu", max_batch_tokens=64)`."""
        _check_names(settings)
        return cls(**{part: part_type(**settings_of(part_type, settings)) for part, part_type in PARTS.items()})

    def replace(self, **settings: Any) -> ServeConfig:
        """A copy with the named settings changed, each in the part that declares it."""
        _check_names(settings)
        return dataclasses.replace(self, **{
            part: dataclasses.replace(getattr(self, part), **settings_of(part_type, settings))
            for part, part_type in PARTS.items()})


# In the order of `loraserve serve --help` and of the README's table.
PARTS: dict[str, type] = {"engine": EngineConfig, "frontend": FrontendConfig, "scheduler": SchedulerConfig,
                          "logging": LoggingConfig, "deployment": DeploymentConfig}


def _check_names(settings: Mapping[str, Any]) -> None:
    unknown = set(settings) - {field.name for part in PARTS.values() for field in dataclasses.fields(part)}
    if unknown:
        raise TypeError(f"no such setting: {', '.join(sorted(unknown))}")


def settings_of(part_type: type, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Those of the flat `settings` that `part_type` declares."""
    names = {field.name for field in dataclasses.fields(part_type)}
    return {name: value for name, value in settings.items() if name in names}
