"""Typed errors the service maps to gRPC status codes.

`InvalidAdapterError` and its subclasses become INVALID_ARGUMENT, `AdapterNotFoundError`
becomes NOT_FOUND, `CapacityError` becomes RESOURCE_EXHAUSTED.
"""


class WorkerError(Exception):
    """Base class of every error the worker raises on purpose."""


class ModelLoadError(WorkerError):
    """The model directory cannot be served (missing files, unknown tensors, bad shapes)."""


class AdapterNotFoundError(WorkerError):
    """The adapter directory or one of its files does not exist, or the name is unknown."""


class InvalidAdapterError(WorkerError):
    """The adapter exists but cannot be served by this model and configuration."""


class AdapterRankError(InvalidAdapterError):
    """The adapter's rank exceeds `max_lora_rank`."""


class UnsupportedAdapterError(InvalidAdapterError):
    """The adapter uses a feature the server does not implement (modules_to_save, biases, ...)."""


class AdapterShapeError(InvalidAdapterError):
    """The adapter's tensors do not fit the base model (an adapter for another base)."""


class CorruptAdapterError(InvalidAdapterError):
    """The adapter's files cannot be parsed (corrupt or truncated safetensors, bad JSON)."""


class AdapterConfigMismatchError(InvalidAdapterError):
    """adapter_config.json and the weights disagree (modules or ranks PEFT would not load)."""


class PickleRefusedError(InvalidAdapterError):
    """Only a pickle-based weight file exists; unpickling could execute arbitrary code."""


class CapacityError(WorkerError):
    """A bounded resource (host cache, GPU slots, KV pages) has no room for the request."""


class AdapterStateError(WorkerError):
    """The command does not fit the adapter's current state (e.g. evicting a busy adapter)."""
