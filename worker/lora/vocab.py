"""The shapes of LoRA on the vocabulary modules, beside the decoder layers' linear modules.

As PEFT stores them, with A as [r, in] and B as [out, r]: the embedding's A is [r, vocab] and its
B [hidden, r] (a token's delta is B @ A[:, token]), the LM head's A [r, hidden] and B [vocab, r].
Under tensor parallelism both are split by vocabulary as their base weights are: a rank holds
the embedding A's columns and the LM head B's rows of its vocabulary range.
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.model.config import ModelConfig


@dataclass(frozen=True)
class LoraShapes:
    """Every LoRA-targetable module's (in_features, out_features) on this rank, vocabulary modules
    included: what the host cache lays out and adapter sizes count (duck-typed as a ModelConfig's
    `num_layers` and `module_shapes`)."""

    num_layers: int
    shapes: dict[str, tuple[int, int]]

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        return self.shapes


def lora_shapes(model: ModelConfig, vocab_rows: int | None = None) -> LoraShapes:
    """`vocab_rows`: the vocabulary rows this rank holds (all of them without tensor parallelism)."""
    vocab = model.vocab_size if vocab_rows is None else vocab_rows
    hidden = model.hidden_size
    return LoraShapes(model.num_layers,
                      {**model.module_shapes(), "embed_tokens": (vocab, hidden), "lm_head": (hidden, vocab)})
