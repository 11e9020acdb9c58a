"""Sampling: greedy, temperature, top-k, top-p, seeds and logprobs."""

from __future__ import annotations

import pytest
import torch

from tests.driver import Driver, Request, make_engine
from worker.batch import SamplingParams
from worker.sampling import sample, validate_sampling


def logits_rows(n: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_and_logprobs_are_log_softmax():
    logits = logits_rows(4)
    params = [SamplingParams(logprobs=True)] * 4
    tokens, logprobs = sample(logits, params, positions=[1, 2, 3, 4])
    assert tokens == logits.argmax(-1).tolist()
    expected = torch.log_softmax(logits, -1).max(-1).values.tolist()
    assert logprobs == pytest.approx(expected, abs=1e-6)


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = logits_rows(6, seed=1)
    greedy = logits.argmax(-1).tolist()
    for params in (SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.5, top_p=1e-6)):
        tokens, _ = sample(logits, [params] * 6, positions=list(range(6)))
        assert tokens == greedy


def test_top_k_restricts_to_the_k_most_likely():
    logits = logits_rows(1, seed=2)
    allowed = set(torch.topk(logits[0], 3).indices.tolist())
    params = SamplingParams(temperature=5.0, top_k=3)
    drawn = {sample(logits, [params], positions=[p])[0][0] for p in range(200)}
    assert drawn <= allowed and len(drawn) > 1


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    params = SamplingParams(temperature=1.0, top_p=0.7)
    drawn = {sample(probs.log(), [params], positions=[p])[0][0] for p in range(200)}
    assert drawn == {0, 1}


def test_temperature_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    params = SamplingParams(temperature=1.0)
    counts = torch.zeros(3)
    for p in range(3000):
        counts[sample(probs.log()[None], [params], positions=[p])[0][0]] += 1
    assert torch.allclose(counts / counts.sum(), probs, atol=0.04)


def test_seed_reproduces_independently_of_batch_and_position_order():
    logits = logits_rows(3, seed=3)
    seeded = SamplingParams(temperature=1.0, seed=1234)
    alone, _ = sample(logits[1:2], [seeded], positions=[17])
    in_batch, _ = sample(logits, [SamplingParams(temperature=1.0), seeded, SamplingParams()], positions=[5, 17, 9])
    assert in_batch[1] == alone[0]
    draws = {sample(logits[1:2], [seeded], positions=[p])[0][0] for p in range(40)}
    assert len(draws) > 1  # the position varies the draw, so a sequence is not one token repeated


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=-0.1), SamplingParams(top_p=0.0), SamplingParams(top_p=1.5),
    SamplingParams(top_k=0), SamplingParams(top_k=-2),
])
def test_invalid_parameters_are_refused(params):
    with pytest.raises(ValueError):
        validate_sampling(params)


def test_seeded_generation_is_reproducible_through_the_engine(model_dirs):
    engine = make_engine(model_dirs["qwen3"])
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=42, logprobs=True)
    first = Request("a", [5, 6, 7, 8], sampling=params, max_new_tokens=8)
    Driver(engine, chunk=4).run([first])
    second = Request("b", [5, 6, 7, 8], sampling=params, max_new_tokens=8)
    other = Request("c", [9, 10, 11], sampling=SamplingParams(temperature=1.0), max_new_tokens=8)
    Driver(engine, chunk=2).run([other, second])
    assert first.generated == second.generated
    engine.close()
