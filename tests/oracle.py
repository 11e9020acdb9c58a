"""The reference ("oracle") for server outputs: transformers + PEFT on the same files.

Eager attention in float32 on CPU is the slowest but least surprising path, which is what
a reference should be.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in mixed-adapter batches


class PeftOracle:
    """A base model with any number of LoRA adapters loaded side by side in one PeftModel."""

    def __init__(
        self,
        model_dir: Path,
        adapters: Mapping[str, Path] | None = None,
        *,
        dtype: str = "float32",
        device: str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        base = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=getattr(torch, dtype), attn_implementation="eager"
        ).to(self.device)
        self.adapter_names: tuple[str, ...] = tuple(adapters or {})
        self.model: PreTrainedModel | PeftModel = _attach_adapters(base, adapters or {})
        self.model.eval()

    @torch.inference_mode()
    def logits(self, token_ids: Sequence[int], adapter: str | None) -> torch.Tensor:
        """Float32 logits [len(token_ids), vocab] of one sequence with `adapter` (None = base)."""
        input_ids = torch.tensor([list(token_ids)], device=self.device)
        with self._only(adapter):
            return self.model(input_ids=input_ids).logits[0].float().cpu()

    @torch.inference_mode()
    def batch_logits(self, seqs: Sequence[Sequence[int]], adapters: Sequence[str | None]) -> list[torch.Tensor]:
        """Per-sequence logits of one right-padded batch through PEFT's mixed-adapter forward."""
        if len(seqs) != len(adapters):
            raise ValueError(f"{len(seqs)} sequences but {len(adapters)} adapters")
        for adapter in adapters:
            self._check_known(adapter)
        # Right padding keeps positions 0..len-1 without explicit position_ids, and causal
        # attention keeps real tokens from seeing the pads behind them, so any pad id works.
        width = max(len(s) for s in seqs)
        input_ids = torch.zeros((len(seqs), width), dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            input_ids[row, : len(seq)] = torch.tensor(list(seq))
            attention_mask[row, : len(seq)] = 1
        kwargs: dict[str, object] = {}
        if isinstance(self.model, PeftModel):
            kwargs["adapter_names"] = [a or BASE_ADAPTER for a in adapters]
        logits = self.model(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), **kwargs
        ).logits
        return [logits[row, : len(seq)].float().cpu() for row, seq in enumerate(seqs)]

    def assert_teacher_forced(
        self, prompt: Sequence[int], generated: Sequence[int], adapter: str | None, *, atol: float
    ) -> None:
        """Assert each generated token is within `atol` of the reference's best logit.

        Scoring the server's own continuation (rather than comparing with a reference greedy
        run) keeps one near-tie from making every later token disagree.
        """
        if not prompt:
            raise ValueError("teacher forcing needs a non-empty prompt")
        logits = self.logits([*prompt, *generated], adapter)
        for i, token in enumerate(generated):
            row = logits[len(prompt) + i - 1]  # the logits that predicted generated[i]
            best = int(row.argmax())
            gap = float(row[best] - row[token])
            if gap > atol:
                raise AssertionError(
                    f"adapter {adapter!r}: generated token {i} (sequence position {len(prompt) + i}) "
                    f"is {token} with reference logit {float(row[token]):.6f}, but the reference "
                    f"argmax is {best} with logit {float(row[best]):.6f} (gap {gap:.6f} > atol {atol})"
                )

    @contextmanager
    def _only(self, adapter: str | None) -> Iterator[None]:
        self._check_known(adapter)
        if not isinstance(self.model, PeftModel):
            yield
        elif adapter is None:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(adapter)
            yield

    def _check_known(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.adapter_names:
            raise KeyError(f"unknown adapter {adapter!r}; loaded: {list(self.adapter_names)}")


# A GPU batch against PEFT on the CPU in float32: kernels and bfloat16 rounding (Gemma 2's extra
# norms and soft caps round more often: 0.071 seen on 2 of 3328 logits, as the churn test allows).
CUDA_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.08}


def assert_batch_matches_peft(model_dir: Path, adapters: Mapping[str, Path], requests: Sequence, dtype: str) -> None:
    """Every request's logits and tokens (a GPU engine's, in `dtype`) against PEFT, teacher-forced;
    a request's id names its adapter ("base": none)."""
    oracle = PeftOracle(model_dir, adapters)
    atol = CUDA_TOLERANCE[dtype]
    for request in requests:
        adapter = None if request.request_id == "base" else request.request_id
        expected = oracle.logits(request.tokens[:-1], adapter)
        torch.testing.assert_close(request.all_logits(), expected, atol=atol, rtol=0 if dtype == "float32" else 0.05)
        oracle.assert_teacher_forced(request.prompt, request.generated, adapter, atol=atol)


def _attach_adapters(base: PreTrainedModel, adapters: Mapping[str, Path]) -> PreTrainedModel | PeftModel:
    if not adapters:
        return base
    (first_name, first_dir), *rest = adapters.items()
    model = PeftModel.from_pretrained(base, first_dir, adapter_name=first_name)
    for name, adapter_dir in rest:
        model.load_adapter(adapter_dir, adapter_name=name)
    return model
