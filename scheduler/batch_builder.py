"""Batch building: one ragged forward of decodes, then prefill chunks, under the token budget.

Steps are sent one ahead, so a request's last sampled token may still be in flight when its
next step is built: it decodes blind (`previous_token`: the worker feeds the token it sampled on
the GPU), once, and only if that token may not be its last.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from protos.loraserve.v1 import internal_pb2 as pb
from scheduler.requests import Request


@dataclass(frozen=True)
class InFlightForward:
    members: list[Request]
    sampling: list[Request]  # the members that sample a token in it
    extra_tokens: int = 0  # tokens beyond one a member (prompt chunks): what makes it longer than a decode step


def build_forward(running: list[Request], leaving: set[int], token_budget: int) -> tuple[pb.Forward, InFlightForward]:
    """The next forward over `running` (decodes first) but the requests whose ids are in
    `leaving`; counts the tokens each sends and samples."""
    budget = token_budget
    batch = pb.Forward()
    step = InFlightForward([], [])
    extra_tokens = 0
    decodes = [r for r in running if not r.in_prefill and id(r) not in leaving]
    prefills = [r for r in running if r.in_prefill and id(r) not in leaving]
    for request in decodes + prefills:
        if budget <= 0:
            break
        if request.tokens_in_flight:
            if not _may_decode_blind(request):
                continue
            _add_previous_token(batch, request)
            budget -= 1
        else:
            count = min(request.num_tokens - request.fed, budget)
            budget -= count
            _add_tokens(batch, request, count)
        step.members.append(request)
        extra_tokens += max(len(batch.sequences[-1].token_ids) - 1, 0)
        if batch.sequences[-1].sample:
            request.tokens_in_flight += 1
            step.sampling.append(request)
    return batch, replace(step, extra_tokens=extra_tokens)


def _may_decode_blind(request: Request) -> bool:
    """Its token in flight is the last sampled one, and may not be its last token."""
    return (request.tokens_in_flight == 1 and request.fed == request.num_tokens
            and len(request.generated) + 1 < request.sampling.max_new_tokens)


def _add_tokens(batch: pb.Forward, request: Request, count: int) -> None:
    batch.sequences.add(
        request_id=request.request_id,
        token_ids=request.tokens_from(request.fed, count),
        context_len=request.fed,
        page_table=request.pages,
        adapter_slot=request.slot,
        sample=request.fed + count == request.num_tokens,
        sampling=request.sampling.worker_params,
    )
    request.fed += count


def _add_previous_token(batch: pb.Forward, request: Request) -> None:
    batch.sequences.add(
        request_id=request.request_id,
        previous_token=True,
        context_len=request.fed,
        page_table=request.pages,
        adapter_slot=request.slot,
        sample=True,
        sampling=request.sampling.worker_params,
    )
    request.fed += 1
