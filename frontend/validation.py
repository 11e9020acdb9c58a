"""Checks a GenerateRequest before anything reaches the scheduler, and resolves its defaults.

Two stages because the prompt's length is known only after tokenization:
`check_request` looks at the request itself, `check_prompt` at the prompt's token ids.
Both raise `InvalidRequest`, an INVALID_ARGUMENT `ServiceError` that names the field at
fault; each API writes its message with its own field names (`FieldNames`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

from frontend.errors import ServiceError, StatusCode
from protos.loraserve.v1 import serving_pb2

DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_TEMPERATURE = 0.0  # greedy
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = -1  # off


class Field(enum.Enum):
    """A field of a generation request that validation can refuse, whatever an API calls it."""

    PROMPT = enum.auto()  # the prompt as a whole
    TEXT = enum.auto()  # the prompt given as text
    INPUT_IDS = enum.auto()  # the prompt given as token ids
    MAX_NEW_TOKENS = enum.auto()
    TEMPERATURE = enum.auto()
    TOP_P = enum.auto()
    TOP_K = enum.auto()
    STOP = enum.auto()


FieldNames = Mapping[Field, str]
"""How one API writes each field in its error messages."""

# The .proto's names, which the gRPC API's messages use.
GRPC_FIELD_NAMES: FieldNames = {field: field.name.lower() for field in Field} | {Field.PROMPT: "text or input_ids"}
Describe = Callable[[FieldNames], str]


class InvalidRequest(ServiceError, ValueError):
    """The request is malformed or cannot fit the model.

    `field` is the field at fault (None when no one field is); `describe(names)` writes the
    message with an API's field names. `message` is the gRPC API's, in the .proto's names.
    """

    code = StatusCode.INVALID_ARGUMENT

    def __init__(self, describe: Describe | str, field: Field | None = None) -> None:
        self.describe: Describe = describe if callable(describe) else lambda _names: describe
        self.field = field
        super().__init__(self.describe(GRPC_FIELD_NAMES))


def no_tokenizer() -> InvalidRequest:
    return InvalidRequest(lambda names: f"this server has no tokenizer; send {names[Field.INPUT_IDS]}", Field.TEXT)


@dataclass(frozen=True)
class ModelLimits:
    vocab_size: int
    max_context_length: int

    @classmethod
    def from_server_info(cls, info: serving_pb2.ServerInfo) -> ModelLimits:
        return cls(vocab_size=info.vocab_size, max_context_length=info.max_context_length)


def check_request(request: serving_pb2.GenerateRequest, limits: ModelLimits, has_tokenizer: bool) -> None:
    _check_prompt_form(request, has_tokenizer)
    _check_sampling(request.sampling, limits, has_tokenizer)


def check_prompt(prompt_ids: Sequence[int], sampling: serving_pb2.SamplingParams, limits: ModelLimits) -> None:
    if not prompt_ids:
        raise InvalidRequest("the prompt is empty: its text produced no tokens", Field.PROMPT)
    out_of_vocab = next((token for token in prompt_ids if token >= limits.vocab_size), None)
    if out_of_vocab is not None:
        raise InvalidRequest(f"token id {out_of_vocab} is not below the vocabulary size {limits.vocab_size}",
                             Field.INPUT_IDS)
    context = limits.max_context_length
    if len(prompt_ids) >= context:
        raise InvalidRequest(f"the prompt has {len(prompt_ids)} tokens; the model's context is {context} tokens",
                             Field.PROMPT)
    new_tokens = max_new_tokens(sampling, len(prompt_ids), limits)
    if len(prompt_ids) + new_tokens > context:
        raise InvalidRequest(lambda names: f"the prompt's {len(prompt_ids)} tokens plus "
                                           f"{names[Field.MAX_NEW_TOKENS]} {new_tokens} exceed the model's context "
                                           f"of {context} tokens", Field.MAX_NEW_TOKENS)


def max_new_tokens(sampling: serving_pb2.SamplingParams, prompt_tokens: int, limits: ModelLimits) -> int:
    """The requested limit, or the default capped to what is left of the context."""
    if sampling.HasField("max_new_tokens"):
        return sampling.max_new_tokens
    return min(DEFAULT_MAX_NEW_TOKENS, limits.max_context_length - prompt_tokens)


def resolve_sampling(sampling: serving_pb2.SamplingParams, prompt_tokens: int,
                     limits: ModelLimits) -> serving_pb2.SamplingParams:
    """A copy with every default filled in, as the scheduler expects (seed stays absent if unset)."""
    resolved = serving_pb2.SamplingParams()
    resolved.CopyFrom(sampling)
    resolved.max_new_tokens = max_new_tokens(sampling, prompt_tokens, limits)
    if not sampling.HasField("temperature"):
        resolved.temperature = DEFAULT_TEMPERATURE
    if not sampling.HasField("top_p"):
        resolved.top_p = DEFAULT_TOP_P
    if not sampling.HasField("top_k"):
        resolved.top_k = DEFAULT_TOP_K
    return resolved


def _check_prompt_form(request: serving_pb2.GenerateRequest, has_tokenizer: bool) -> None:
    if request.text and request.input_ids:
        raise InvalidRequest(lambda names: f"send exactly one of {names[Field.TEXT]} and {names[Field.INPUT_IDS]}, "
                                           "not both", Field.PROMPT)
    if not request.text and not request.input_ids:
        raise InvalidRequest(lambda names: f"the prompt is empty: send {names[Field.TEXT]} or "
                                           f"{names[Field.INPUT_IDS]}", Field.PROMPT)
    if request.text and not has_tokenizer:
        raise no_tokenizer()


def _check_sampling(sampling: serving_pb2.SamplingParams, limits: ModelLimits, has_tokenizer: bool) -> None:
    if sampling.HasField("max_new_tokens"):
        if sampling.max_new_tokens == 0:
            _refuse(Field.MAX_NEW_TOKENS, "must be at least 1")
        if sampling.max_new_tokens > limits.max_context_length:
            _refuse(Field.MAX_NEW_TOKENS, f"{sampling.max_new_tokens} exceeds the model's context of "
                                          f"{limits.max_context_length} tokens")
    if sampling.HasField("temperature") and not (math.isfinite(sampling.temperature) and sampling.temperature >= 0):
        _refuse(Field.TEMPERATURE, f"must be a finite number >= 0, got {sampling.temperature}")
    if sampling.HasField("top_p") and not 0.0 < sampling.top_p <= 1.0:
        _refuse(Field.TOP_P, f"must be in (0, 1], got {sampling.top_p}")
    if sampling.HasField("top_k") and (sampling.top_k < -1 or sampling.top_k == 0):
        _refuse(Field.TOP_K, f"must be -1 (off) or at least 1, got {sampling.top_k}")
    if any(not stop for stop in sampling.stop):
        _refuse(Field.STOP, "strings must not be empty")
    if sampling.stop and not has_tokenizer:
        _refuse(Field.STOP, "strings need a tokenizer, and this server has none")


def _refuse(field: Field, what: str) -> NoReturn:
    """Refuses the request with "<the field's name> <what>"."""
    raise InvalidRequest(lambda names: f"{names[field]} {what}", field)
