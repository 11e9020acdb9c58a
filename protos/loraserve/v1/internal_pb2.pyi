from protos.loraserve.v1 import serving_pb2 as _serving_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_UNSPECIFIED: _ClassVar[ErrorCode]
    INVALID_ARGUMENT: _ClassVar[ErrorCode]
    NOT_FOUND: _ClassVar[ErrorCode]
    ALREADY_EXISTS: _ClassVar[ErrorCode]
    RESOURCE_EXHAUSTED: _ClassVar[ErrorCode]
    UNAVAILABLE: _ClassVar[ErrorCode]
    FAILED_PRECONDITION: _ClassVar[ErrorCode]
    INTERNAL: _ClassVar[ErrorCode]
    PERMISSION_DENIED: _ClassVar[ErrorCode]
ERROR_CODE_UNSPECIFIED: ErrorCode
INVALID_ARGUMENT: ErrorCode
NOT_FOUND: ErrorCode
ALREADY_EXISTS: ErrorCode
RESOURCE_EXHAUSTED: ErrorCode
UNAVAILABLE: ErrorCode
FAILED_PRECONDITION: ErrorCode
INTERNAL: ErrorCode
PERMISSION_DENIED: ErrorCode

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: ErrorCode
    message: str
    def __init__(self, code: _Optional[_Union[ErrorCode, str]] = ..., message: _Optional[str] = ...) -> None: ...

class FrontendMessage(_message.Message):
    __slots__ = ("submit", "abort", "admin")
    SUBMIT_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    submit: SubmitRequest
    abort: AbortRequest
    admin: AdminRequest
    def __init__(self, submit: _Optional[_Union[SubmitRequest, _Mapping]] = ..., abort: _Optional[_Union[AbortRequest, _Mapping]] = ..., admin: _Optional[_Union[AdminRequest, _Mapping]] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("request_id", "input_ids", "adapter", "sampling")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    input_ids: _containers.RepeatedScalarFieldContainer[int]
    adapter: str
    sampling: _serving_pb2.SamplingParams
    def __init__(self, request_id: _Optional[str] = ..., input_ids: _Optional[_Iterable[int]] = ..., adapter: _Optional[str] = ..., sampling: _Optional[_Union[_serving_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AdminRequest(_message.Message):
    __slots__ = ("correlation_id", "load_adapter", "unload_adapter", "list_adapters", "server_info", "stats", "timeline", "metrics", "replica_state")
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    LOAD_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    UNLOAD_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    LIST_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    SERVER_INFO_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_STATE_FIELD_NUMBER: _ClassVar[int]
    correlation_id: int
    load_adapter: _serving_pb2.LoadAdapterRequest
    unload_adapter: _serving_pb2.UnloadAdapterRequest
    list_adapters: _serving_pb2.ListAdaptersRequest
    server_info: _serving_pb2.GetServerInfoRequest
    stats: _serving_pb2.GetStatsRequest
    timeline: _serving_pb2.GetTimelineRequest
    metrics: MetricsRequest
    replica_state: ReplicaStateRequest
    def __init__(self, correlation_id: _Optional[int] = ..., load_adapter: _Optional[_Union[_serving_pb2.LoadAdapterRequest, _Mapping]] = ..., unload_adapter: _Optional[_Union[_serving_pb2.UnloadAdapterRequest, _Mapping]] = ..., list_adapters: _Optional[_Union[_serving_pb2.ListAdaptersRequest, _Mapping]] = ..., server_info: _Optional[_Union[_serving_pb2.GetServerInfoRequest, _Mapping]] = ..., stats: _Optional[_Union[_serving_pb2.GetStatsRequest, _Mapping]] = ..., timeline: _Optional[_Union[_serving_pb2.GetTimelineRequest, _Mapping]] = ..., metrics: _Optional[_Union[MetricsRequest, _Mapping]] = ..., replica_state: _Optional[_Union[ReplicaStateRequest, _Mapping]] = ...) -> None: ...

class ReplicaStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReplicaState(_message.Message):
    __slots__ = ("gpu_adapters", "host_adapters", "requests")
    GPU_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    HOST_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    gpu_adapters: _containers.RepeatedScalarFieldContainer[str]
    host_adapters: _containers.RepeatedScalarFieldContainer[str]
    requests: int
    def __init__(self, gpu_adapters: _Optional[_Iterable[str]] = ..., host_adapters: _Optional[_Iterable[str]] = ..., requests: _Optional[int] = ...) -> None: ...

class MetricsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Histogram(_message.Message):
    __slots__ = ("bounds", "counts", "sum")
    BOUNDS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    bounds: _containers.RepeatedScalarFieldContainer[float]
    counts: _containers.RepeatedScalarFieldContainer[int]
    sum: float
    def __init__(self, bounds: _Optional[_Iterable[float]] = ..., counts: _Optional[_Iterable[int]] = ..., sum: _Optional[float] = ...) -> None: ...

class CacheTierMetrics(_message.Message):
    __slots__ = ("hits", "misses", "loads_started", "loads_finished", "bytes_loaded", "load_seconds")
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    LOADS_STARTED_FIELD_NUMBER: _ClassVar[int]
    LOADS_FINISHED_FIELD_NUMBER: _ClassVar[int]
    BYTES_LOADED_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    hits: int
    misses: int
    loads_started: int
    loads_finished: int
    bytes_loaded: int
    load_seconds: Histogram
    def __init__(self, hits: _Optional[int] = ..., misses: _Optional[int] = ..., loads_started: _Optional[int] = ..., loads_finished: _Optional[int] = ..., bytes_loaded: _Optional[int] = ..., load_seconds: _Optional[_Union[Histogram, _Mapping]] = ...) -> None: ...

class MetricsSnapshot(_message.Message):
    __slots__ = ("stats", "gpu_slots_total", "host_cache_capacity_bytes", "adapters_registered", "host", "gpu", "worker_forward_seconds")
    STATS_FIELD_NUMBER: _ClassVar[int]
    GPU_SLOTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    HOST_CACHE_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_REGISTERED_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    WORKER_FORWARD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    stats: _serving_pb2.ServerStats
    gpu_slots_total: int
    host_cache_capacity_bytes: int
    adapters_registered: int
    host: CacheTierMetrics
    gpu: CacheTierMetrics
    worker_forward_seconds: Histogram
    def __init__(self, stats: _Optional[_Union[_serving_pb2.ServerStats, _Mapping]] = ..., gpu_slots_total: _Optional[int] = ..., host_cache_capacity_bytes: _Optional[int] = ..., adapters_registered: _Optional[int] = ..., host: _Optional[_Union[CacheTierMetrics, _Mapping]] = ..., gpu: _Optional[_Union[CacheTierMetrics, _Mapping]] = ..., worker_forward_seconds: _Optional[_Union[Histogram, _Mapping]] = ...) -> None: ...

class SchedulerMessage(_message.Message):
    __slots__ = ("output", "admin")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    output: RequestOutput
    admin: AdminResponse
    def __init__(self, output: _Optional[_Union[RequestOutput, _Mapping]] = ..., admin: _Optional[_Union[AdminResponse, _Mapping]] = ...) -> None: ...

class RequestOutput(_message.Message):
    __slots__ = ("request_id", "token_ids", "logprobs", "finished", "finish_reason", "error", "timing", "prompt_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    finished: bool
    finish_reason: str
    error: Error
    timing: _serving_pb2.Timing
    prompt_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., timing: _Optional[_Union[_serving_pb2.Timing, _Mapping]] = ..., prompt_tokens: _Optional[int] = ...) -> None: ...

class AdminResponse(_message.Message):
    __slots__ = ("correlation_id", "error", "load_adapter", "unload_adapter", "list_adapters", "server_info", "stats", "timeline", "metrics", "replica_state")
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LOAD_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    UNLOAD_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    LIST_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    SERVER_INFO_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_STATE_FIELD_NUMBER: _ClassVar[int]
    correlation_id: int
    error: Error
    load_adapter: _serving_pb2.LoadAdapterResponse
    unload_adapter: _serving_pb2.UnloadAdapterResponse
    list_adapters: _serving_pb2.ListAdaptersResponse
    server_info: _serving_pb2.ServerInfo
    stats: _serving_pb2.ServerStats
    timeline: _serving_pb2.Timeline
    metrics: MetricsSnapshot
    replica_state: ReplicaState
    def __init__(self, correlation_id: _Optional[int] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., load_adapter: _Optional[_Union[_serving_pb2.LoadAdapterResponse, _Mapping]] = ..., unload_adapter: _Optional[_Union[_serving_pb2.UnloadAdapterResponse, _Mapping]] = ..., list_adapters: _Optional[_Union[_serving_pb2.ListAdaptersResponse, _Mapping]] = ..., server_info: _Optional[_Union[_serving_pb2.ServerInfo, _Mapping]] = ..., stats: _Optional[_Union[_serving_pb2.ServerStats, _Mapping]] = ..., timeline: _Optional[_Union[_serving_pb2.Timeline, _Mapping]] = ..., metrics: _Optional[_Union[MetricsSnapshot, _Mapping]] = ..., replica_state: _Optional[_Union[ReplicaState, _Mapping]] = ...) -> None: ...

class WorkerCommand(_message.Message):
    __slots__ = ("command_id", "register_adapter", "unregister_adapter", "stage_adapter", "evict_host", "load_slot", "evict_slot", "forward", "export_timeline")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    REGISTER_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    UNREGISTER_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    STAGE_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    EVICT_HOST_FIELD_NUMBER: _ClassVar[int]
    LOAD_SLOT_FIELD_NUMBER: _ClassVar[int]
    EVICT_SLOT_FIELD_NUMBER: _ClassVar[int]
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    EXPORT_TIMELINE_FIELD_NUMBER: _ClassVar[int]
    command_id: int
    register_adapter: RegisterAdapter
    unregister_adapter: UnregisterAdapter
    stage_adapter: StageAdapter
    evict_host: EvictHost
    load_slot: LoadSlot
    evict_slot: EvictSlot
    forward: Forward
    export_timeline: ExportTimeline
    def __init__(self, command_id: _Optional[int] = ..., register_adapter: _Optional[_Union[RegisterAdapter, _Mapping]] = ..., unregister_adapter: _Optional[_Union[UnregisterAdapter, _Mapping]] = ..., stage_adapter: _Optional[_Union[StageAdapter, _Mapping]] = ..., evict_host: _Optional[_Union[EvictHost, _Mapping]] = ..., load_slot: _Optional[_Union[LoadSlot, _Mapping]] = ..., evict_slot: _Optional[_Union[EvictSlot, _Mapping]] = ..., forward: _Optional[_Union[Forward, _Mapping]] = ..., export_timeline: _Optional[_Union[ExportTimeline, _Mapping]] = ...) -> None: ...

class ExportTimeline(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RegisterAdapter(_message.Message):
    __slots__ = ("name", "path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class UnregisterAdapter(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class StageAdapter(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class EvictHost(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class LoadSlot(_message.Message):
    __slots__ = ("name", "slot", "blocking")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    BLOCKING_FIELD_NUMBER: _ClassVar[int]
    name: str
    slot: int
    blocking: bool
    def __init__(self, name: _Optional[str] = ..., slot: _Optional[int] = ..., blocking: _Optional[bool] = ...) -> None: ...

class EvictSlot(_message.Message):
    __slots__ = ("slot",)
    SLOT_FIELD_NUMBER: _ClassVar[int]
    slot: int
    def __init__(self, slot: _Optional[int] = ...) -> None: ...

class SequenceSampling(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed", "logprobs")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    logprobs: bool
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., logprobs: _Optional[bool] = ...) -> None: ...

class SequenceInput(_message.Message):
    __slots__ = ("request_id", "token_ids", "context_len", "page_table", "adapter_slot", "sample", "sampling", "previous_token")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LEN_FIELD_NUMBER: _ClassVar[int]
    PAGE_TABLE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SLOT_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    context_len: int
    page_table: _containers.RepeatedScalarFieldContainer[int]
    adapter_slot: int
    sample: bool
    sampling: SequenceSampling
    previous_token: bool
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., context_len: _Optional[int] = ..., page_table: _Optional[_Iterable[int]] = ..., adapter_slot: _Optional[int] = ..., sample: _Optional[bool] = ..., sampling: _Optional[_Union[SequenceSampling, _Mapping]] = ..., previous_token: _Optional[bool] = ...) -> None: ...

class Forward(_message.Message):
    __slots__ = ("sequences",)
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[SequenceInput]
    def __init__(self, sequences: _Optional[_Iterable[_Union[SequenceInput, _Mapping]]] = ...) -> None: ...

class WorkerEvent(_message.Message):
    __slots__ = ("hello", "result", "load_events")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    LOAD_EVENTS_FIELD_NUMBER: _ClassVar[int]
    hello: WorkerHello
    result: CommandResult
    load_events: LoadEvents
    def __init__(self, hello: _Optional[_Union[WorkerHello, _Mapping]] = ..., result: _Optional[_Union[CommandResult, _Mapping]] = ..., load_events: _Optional[_Union[LoadEvents, _Mapping]] = ...) -> None: ...

class WorkerHello(_message.Message):
    __slots__ = ("model", "architecture", "dtype", "device", "vocab_size", "max_context_length", "num_kv_pages", "page_size", "max_loras_per_batch", "max_loaded_loras", "max_lora_rank", "host_cache_bytes", "eos_token_ids", "pid", "saved_module_slots")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_PAGES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_LORAS_PER_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_LOADED_LORAS_FIELD_NUMBER: _ClassVar[int]
    MAX_LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    HOST_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    SAVED_MODULE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    architecture: str
    dtype: str
    device: str
    vocab_size: int
    max_context_length: int
    num_kv_pages: int
    page_size: int
    max_loras_per_batch: int
    max_loaded_loras: int
    max_lora_rank: int
    host_cache_bytes: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    pid: int
    saved_module_slots: int
    def __init__(self, model: _Optional[str] = ..., architecture: _Optional[str] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_context_length: _Optional[int] = ..., num_kv_pages: _Optional[int] = ..., page_size: _Optional[int] = ..., max_loras_per_batch: _Optional[int] = ..., max_loaded_loras: _Optional[int] = ..., max_lora_rank: _Optional[int] = ..., host_cache_bytes: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., pid: _Optional[int] = ..., saved_module_slots: _Optional[int] = ...) -> None: ...

class RegisteredAdapter(_message.Message):
    __slots__ = ("name", "rank", "size_bytes", "target_modules", "ranks", "alphas", "dora", "extra_modules")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    ALPHAS_FIELD_NUMBER: _ClassVar[int]
    DORA_FIELD_NUMBER: _ClassVar[int]
    EXTRA_MODULES_FIELD_NUMBER: _ClassVar[int]
    name: str
    rank: int
    size_bytes: int
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    ranks: _containers.RepeatedScalarFieldContainer[int]
    alphas: _containers.RepeatedScalarFieldContainer[float]
    dora: bool
    extra_modules: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., rank: _Optional[int] = ..., size_bytes: _Optional[int] = ..., target_modules: _Optional[_Iterable[str]] = ..., ranks: _Optional[_Iterable[int]] = ..., alphas: _Optional[_Iterable[float]] = ..., dora: _Optional[bool] = ..., extra_modules: _Optional[_Iterable[str]] = ...) -> None: ...

class SampledToken(_message.Message):
    __slots__ = ("request_id", "token_id", "logprob")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_id: int
    logprob: float
    def __init__(self, request_id: _Optional[str] = ..., token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class ForwardResult(_message.Message):
    __slots__ = ("tokens", "forward_ms")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_MS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[SampledToken]
    forward_ms: float
    def __init__(self, tokens: _Optional[_Iterable[_Union[SampledToken, _Mapping]]] = ..., forward_ms: _Optional[float] = ...) -> None: ...

class LoadedSlot(_message.Message):
    __slots__ = ("name", "slot", "copy_s")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    COPY_S_FIELD_NUMBER: _ClassVar[int]
    name: str
    slot: int
    copy_s: float
    def __init__(self, name: _Optional[str] = ..., slot: _Optional[int] = ..., copy_s: _Optional[float] = ...) -> None: ...

class FailedLoad(_message.Message):
    __slots__ = ("name", "error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    error: Error
    def __init__(self, name: _Optional[str] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class LoadEvents(_message.Message):
    __slots__ = ("staged", "loaded", "failed", "copying")
    STAGED_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    COPYING_FIELD_NUMBER: _ClassVar[int]
    staged: _containers.RepeatedScalarFieldContainer[str]
    loaded: _containers.RepeatedCompositeFieldContainer[LoadedSlot]
    failed: _containers.RepeatedCompositeFieldContainer[FailedLoad]
    copying: _containers.RepeatedCompositeFieldContainer[CopyProgress]
    def __init__(self, staged: _Optional[_Iterable[str]] = ..., loaded: _Optional[_Iterable[_Union[LoadedSlot, _Mapping]]] = ..., failed: _Optional[_Iterable[_Union[FailedLoad, _Mapping]]] = ..., copying: _Optional[_Iterable[_Union[CopyProgress, _Mapping]]] = ...) -> None: ...

class CopyProgress(_message.Message):
    __slots__ = ("name", "landed")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LANDED_FIELD_NUMBER: _ClassVar[int]
    name: str
    landed: float
    def __init__(self, name: _Optional[str] = ..., landed: _Optional[float] = ...) -> None: ...

class CommandResult(_message.Message):
    __slots__ = ("command_id", "error", "adapter", "forward", "load_events", "timeline_json")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    LOAD_EVENTS_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_JSON_FIELD_NUMBER: _ClassVar[int]
    command_id: int
    error: Error
    adapter: RegisteredAdapter
    forward: ForwardResult
    load_events: LoadEvents
    timeline_json: str
    def __init__(self, command_id: _Optional[int] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., adapter: _Optional[_Union[RegisteredAdapter, _Mapping]] = ..., forward: _Optional[_Union[ForwardResult, _Mapping]] = ..., load_events: _Optional[_Union[LoadEvents, _Mapping]] = ..., timeline_json: _Optional[str] = ...) -> None: ...
