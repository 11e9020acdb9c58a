"""LoRA deltas staged beside a base GEMM for the kernel that next reads its output
(`worker.kernels.elementwise`), apart from both the public functions and the Triton module so
that each imports them without a cycle."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StagedDeltas:
    """A module output's LoRA deltas, staged for the kernel that next reads the output to add.
    Only rows of tokens with an adapter hold deltas: the others (token slot < 0: base-model
    and padding tokens) were not written (storing their zeros cost a step with a long base-model
    prompt milliseconds) and read as zero."""

    values: torch.Tensor  # [T, N]
    token_slots: torch.Tensor  # [T] integer; negative: no adapter, the row is not read

    def dense(self) -> torch.Tensor:
        """The deltas with unwritten rows as zeros (the torch paths)."""
        zero = torch.zeros((), dtype=self.values.dtype, device=self.values.device)
        return torch.where(self.token_slots[:, None] >= 0, self.values, zero)
