"""LoRA folded into the base GEMMs (`--lora-fold`): no LoRA kernel runs beside them.

Each module group's fused weight (q/k/v, o, gate/up, down: `LORA_GROUPS`) gets extra rows below
its own, every slot's A of each of the group's modules ([W; A_m0 of slots 0..S-1; A_m1 ...], each
slot's `FOLD_RANK` rows together): the base GEMM of a step with adapters computes every slot's
shrunk input as extra output columns, and the kernel that next reads the output adds each row's
own slot's `shrunk @ B^T` (`FoldedDeltas`, `worker.kernels._folded_readers_triton`). The slots'
A buffers are views of those rows, so adapter copies land there and nothing is stored twice; a
step without adapters multiplies by W's own rows only (a view) and pays nothing. Which steps fold
is the LoRA hook's choice (`worker.graph_step`: those carrying a prompt).

Why: the LoRA kernels beside the base GEMMs take SMs from them: a step carrying a prompt paid
+15.4% for rank-16 adapters, +6.3% folded (H100, docs/performance.md). It pays for low ranks
only: the extra columns are slots x rank, so rank 16 is the fold's rank (lower ranks are
zero-padded to it, and `tl.dot` needs 16). The cost: every adapted step's GEMMs read every
slot's A, and a forward carrying a landing slot's tokens waits for each layer's copy before that
layer's base GEMM. Under tensor parallelism a row-parallel module's shrunk columns are partial
sums that the all-reduce of its output sums too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from settings.config import FOLD_RANK
from worker.model.llama import FUSED_FIELDS, LORA_GROUPS, ModelWeights


@dataclass(frozen=True)
class FoldedGroup:
    base_rows: int  # the fused weight's own output rows
    weights: torch.Tensor  # [layers, base_rows + modules * slots * FOLD_RANK, in]
    biases: torch.Tensor | None  # [layers, same rows], zeros past base_rows


class FoldedWeights:
    """The model's fused weights with every slot's A below them; the model's weights become views."""

    def __init__(self, weights: ModelWeights, modules: Iterable[str], num_slots: int) -> None:
        served = set(modules)
        self.num_slots = num_slots
        self.groups: dict[tuple[str, ...], FoldedGroup] = {}
        for group in LORA_GROUPS:
            if set(group) <= served:  # the settings refuse part of a group (`EngineConfig`)
                self.groups[group] = _fold_group(weights, FUSED_FIELDS[group], len(group) * num_slots * FOLD_RANK)

    def a_views(self) -> dict[str, torch.Tensor]:
        """Each folded module's A rows as the slots hold A: [layers, slots, FOLD_RANK, in] (views)."""
        views = {}
        for group, folded in self.groups.items():
            rows = self.num_slots * FOLD_RANK
            for index, module in enumerate(group):
                first = folded.base_rows + index * rows
                views[module] = folded.weights[:, first:first + rows].unflatten(1, (self.num_slots, FOLD_RANK))
        return views

    def operands(self, layer: int, modules: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The folded weight and bias of `modules`' group in `layer` (None: the group is not folded)."""
        folded = self.groups.get(tuple(modules))
        if folded is None:
            return None
        return folded.weights[layer], None if folded.biases is None else folded.biases[layer]


def _fold_group(weights: ModelWeights, field: str, extra_rows: int) -> FoldedGroup:
    """Copies each layer's fused weight (and bias) into the first rows of a taller one and points the
    layer at them: the original is freed layer by layer."""
    first = getattr(weights.layers[0], field)
    base_rows, in_features = first.shape
    layers = len(weights.layers)
    folded = torch.zeros(layers, base_rows + extra_rows, in_features, dtype=first.dtype, device=first.device)
    has_bias = getattr(weights.layers[0], f"{field}_bias") is not None
    biases = (torch.zeros(layers, base_rows + extra_rows, dtype=first.dtype, device=first.device)
              if has_bias else None)
    for index, layer in enumerate(weights.layers):
        folded[index, :base_rows].copy_(getattr(layer, field))
        setattr(layer, field, folded[index, :base_rows])
        if biases is not None:
            biases[index, :base_rows].copy_(getattr(layer, f"{field}_bias"))
            setattr(layer, f"{field}_bias", biases[index, :base_rows])
    return FoldedGroup(base_rows, folded, biases)
