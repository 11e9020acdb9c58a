"""Request validation against the model's limits, and default resolution."""

from __future__ import annotations

import math
import re

import pytest

from frontend.validation import (
    DEFAULT_MAX_NEW_TOKENS,
    GRPC_FIELD_NAMES,
    Field,
    InvalidRequest,
    ModelLimits,
    check_prompt,
    check_request,
    resolve_sampling,
)
from protos.loraserve.v1 import serving_pb2

LIMITS = ModelLimits(vocab_size=100, max_context_length=200)


def request(text: str = "", input_ids: list[int] | None = None, **sampling) -> serving_pb2.GenerateRequest:
    return serving_pb2.GenerateRequest(text=text, input_ids=input_ids or [],
                                       sampling=serving_pb2.SamplingParams(**sampling))


REFUSED_REQUESTS = {
    "neither text nor ids": (request(), "the prompt is empty"),
    "both text and ids": (request("hi", [1]), "not both"),
    "text without a tokenizer": (request("hi"), "no tokenizer; send input_ids"),
    "zero new tokens": (request(input_ids=[1], max_new_tokens=0), "at least 1"),
    "more new tokens than the context": (request(input_ids=[1], max_new_tokens=201), "exceeds the model's context"),
    "negative temperature": (request(input_ids=[1], temperature=-1), "temperature"),
    "nan temperature": (request(input_ids=[1], temperature=math.nan), "temperature"),
    "infinite temperature": (request(input_ids=[1], temperature=math.inf), "temperature"),
    "top_p zero": (request(input_ids=[1], top_p=0), "top_p"),
    "top_p above one": (request(input_ids=[1], top_p=1.01), "top_p"),
    "top_p nan": (request(input_ids=[1], top_p=math.nan), "top_p"),
    "top_k zero": (request(input_ids=[1], top_k=0), "top_k"),
    "top_k below -1": (request(input_ids=[1], top_k=-5), "top_k"),
    "empty stop string": (request(input_ids=[1], stop=["a", ""]), "stop strings must not be empty"),
}


@pytest.mark.parametrize("case", REFUSED_REQUESTS)
def test_refused_requests(case):
    bad, message = REFUSED_REQUESTS[case]
    with pytest.raises(InvalidRequest, match=message):
        check_request(bad, LIMITS, has_tokenizer=False)


def test_stop_strings_need_a_tokenizer():
    with pytest.raises(InvalidRequest, match="need a tokenizer"):
        check_request(request(input_ids=[1], stop=["x"]), LIMITS, has_tokenizer=False)
    check_request(request(input_ids=[1], stop=["x"]), LIMITS, has_tokenizer=True)


# The .proto's field names a refusal could write ("text" is also an English word, so left out):
# each must come from the API's names, so that another API can name the field its own way.
PROTO_FIELD = re.compile(r"\b({})\b".format("|".join(
    ["input_ids", *(f.name for f in serving_pb2.SamplingParams.DESCRIPTOR.fields)])))


def refusal(check) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as refused:
        check()
    return refused.value


@pytest.mark.parametrize("case", REFUSED_REQUESTS)
def test_refused_requests_name_their_field_in_any_api_s_terms(case):
    refused = refusal(lambda: check_request(REFUSED_REQUESTS[case][0], LIMITS, has_tokenizer=False))
    assert refused.field is not None
    elsewhere = refused.describe({field: f"<{field.name}>" for field in Field})
    assert not PROTO_FIELD.search(elsewhere), elsewhere
    assert refused.message == refused.describe(GRPC_FIELD_NAMES)


@pytest.mark.parametrize("good", [
    request("hi"), request(input_ids=[1, 99]), request(input_ids=[1], max_new_tokens=200),
    request(input_ids=[1], temperature=0, top_p=1, top_k=-1), request(input_ids=[1], temperature=1.5, top_p=0.01, top_k=1),
])
def test_accepted_requests(good):
    check_request(good, LIMITS, has_tokenizer=True)


REFUSED_PROMPTS = {
    "empty after tokenization": ([], {}, "produced no tokens"),
    "id at the vocabulary size": ([5, 100], {}, "token id 100"),
    "prompt as long as the context": ([1] * 200, {}, "200 tokens; the model's context is 200"),
    "prompt plus new tokens too long": ([1] * 150, {"max_new_tokens": 51}, "exceed"),
}


@pytest.mark.parametrize("case", REFUSED_PROMPTS)
def test_refused_prompts(case):
    prompt, sampling, message = REFUSED_PROMPTS[case]
    with pytest.raises(InvalidRequest, match=message):
        check_prompt(prompt, serving_pb2.SamplingParams(**sampling), LIMITS)


@pytest.mark.parametrize("case", REFUSED_PROMPTS)
def test_refused_prompts_name_their_field_in_any_api_s_terms(case):
    prompt, sampling, _ = REFUSED_PROMPTS[case]
    refused = refusal(lambda: check_prompt(prompt, serving_pb2.SamplingParams(**sampling), LIMITS))
    assert refused.field is not None
    elsewhere = refused.describe({field: f"<{field.name}>" for field in Field})
    assert not PROTO_FIELD.search(elsewhere), elsewhere


def test_a_prompt_that_exactly_fills_the_context_is_accepted():
    check_prompt([1] * 150, serving_pb2.SamplingParams(max_new_tokens=50), LIMITS)


def test_defaults_are_resolved_and_the_seed_stays_absent():
    resolved = resolve_sampling(serving_pb2.SamplingParams(stop=["x"], logprobs=True), 10, LIMITS)
    assert (resolved.max_new_tokens, resolved.temperature, resolved.top_p, resolved.top_k) == (
        DEFAULT_MAX_NEW_TOKENS, 0.0, 1.0, -1)
    assert list(resolved.stop) == ["x"] and resolved.logprobs and not resolved.HasField("seed")


def test_explicit_values_and_the_seed_are_kept():
    given = serving_pb2.SamplingParams(max_new_tokens=7, temperature=0.8, top_p=0.9, top_k=40, seed=0)
    resolved = resolve_sampling(given, 10, LIMITS)
    assert resolved == given and resolved.HasField("seed")


def test_the_default_max_new_tokens_is_capped_by_the_context():
    check_prompt([1] * 190, serving_pb2.SamplingParams(), LIMITS)
    assert resolve_sampling(serving_pb2.SamplingParams(), 190, LIMITS).max_new_tokens == 10
