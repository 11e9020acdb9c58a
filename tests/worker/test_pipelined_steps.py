"""Steps queued one ahead (Engine.launch / finish): a decode fed the token its request sampled
in the previous forward, on the device, before the host has read that token."""

from __future__ import annotations

import pytest
import torch

from tests.driver import Driver, Request, make_engine, make_resident
from worker.batch import NO_ADAPTER, SamplingParams, SequenceInput
from worker.engine import Engine

PLACEHOLDER = 0  # token id sent for a previous-token input


def requests(adapter_slots: list[int]) -> list[Request]:
    sampled = SamplingParams(temperature=0.8, seed=7, logprobs=True)
    return [Request(f"r{i}", torch.randint(3, 200, (4 + 3 * i,), generator=torch.Generator().manual_seed(i)).tolist(),
                    adapter_slot=slot, max_new_tokens=6, sampling=sampled if i == 1 else SamplingParams())
            for i, slot in enumerate(adapter_slots)]


def run_pipelined(engine: Engine, batch: list[Request]) -> None:
    """Prefills, then launches every decode step before finishing the one before it."""
    driver = Driver(engine, chunk=64)
    driver.step(batch)  # whole prompts: each request has sampled its first token
    previous = None
    for step in range(1, batch[0].max_new_tokens):
        inputs = []
        for request in batch:
            driver._grow_pages(request, request.fed + 1)
            known = step == 1  # the prefill's token is on the host; later ones are not yet
            inputs.append(SequenceInput(request.request_id, [request.generated[-1] if known else PLACEHOLDER],
                                        request.fed, list(request.pages), adapter_slot=request.adapter_slot,
                                        sampling=request.sampling, previous_token=not known))
            request.fed += 1
        launched = engine.launch(inputs)
        if previous is not None:
            collect(batch, engine.finish(previous))
        previous = launched
    collect(batch, engine.finish(previous))


def collect(batch: list[Request], output) -> None:
    by_id = {r.request_id: r for r in batch}
    for token in output.tokens:
        by_id[token.request_id].generated.append(token.token_id)


def generated_both_ways(model_dir, adapter_dirs, **settings) -> dict[bool, list[list[int]]]:
    """Tokens of the same requests run step by step (False) and queued one ahead (True)."""
    outputs = {}
    for pipelined in (False, True):
        engine = make_engine(model_dir, **settings)
        for slot, (name, path) in zip((2, 0), adapter_dirs.items()):
            engine.register_adapter(name, path)
            make_resident(engine, name, slot)
        batch = requests([2, NO_ADAPTER, 0, 2])
        if pipelined:
            run_pipelined(engine, batch)
        else:
            Driver(engine, chunk=64).run(batch)
        outputs[pipelined] = [r.generated for r in batch]
        engine.close()
    return outputs


@pytest.mark.parametrize("static", [True, False], ids=["static", "eager"])
def test_steps_queued_one_ahead_generate_what_sequential_steps_do(model_dirs, mixed_adapter_dirs, static):
    outputs = generated_both_ways(model_dirs["llama"], mixed_adapter_dirs["llama"], static_decode=static)
    assert outputs[True] == outputs[False]


def test_a_previous_token_needs_the_previous_forward_to_have_sampled_it(model_dirs):
    engine = make_engine(model_dirs["llama"])
    fresh = SequenceInput("r0", [PLACEHOLDER], 0, [0], previous_token=True)
    with pytest.raises(ValueError, match="previous forward sampled no token"):
        engine.launch([fresh])
    engine.finish(engine.launch([SequenceInput("r0", [5, 6], 0, [0])]))
    with pytest.raises(ValueError, match=r"\['r1'\]"):
        engine.launch([SequenceInput("r1", [PLACEHOLDER], 2, [0], previous_token=True)])
    # The failed launch left no previous tokens: r0's would be stale now.
    with pytest.raises(ValueError, match="previous forward sampled no token"):
        engine.launch([SequenceInput("r0", [PLACEHOLDER], 2, [0], previous_token=True)])
    engine.close()
