"""DoRA as PEFT computes it, folded into two vectors per adapted module and layer.

PEFT's DoRA forward (peft.tuners.lora.dora.DoraLinearLayer.forward) adds to the base output
`base = W x + bias` the correction (g - 1) * (base - bias) + g * delta, where delta = s B A x
and g = magnitude / ||W + s B A|| (one norm per output feature, over the input features,
treated as a constant). That is g * (base + delta) + (1 - g) * bias. g depends on weights
only, so it is computed once, when the adapter is loaded into a slot: the slot then holds
g ("scale") and (1 - g) * bias ("shift") for each module, and a forward applies
out = scale * (out + delta) + shift to its adapter's tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from worker.model.config import ModelConfig
from worker.model.llama import FUSED_FIELDS, LORA_GROUPS, ModelWeights

# (layer, module) -> the module's base weight [out, in] and bias [out] (or None), on the device.
BaseWeights = Callable[[int, str], tuple[torch.Tensor, torch.Tensor | None]]

# Rows of W + s B A are built this many elements at a time: a whole down_proj in float32
# would be a temporary of hundreds of MB on the load stream.
_NORM_CHUNK_ELEMENTS = 1 << 24


def dora_scale_and_shift(weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b_t: torch.Tensor,
                         magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, (1 - g) * bias) of one module, in float32. `b_t` is B.T already multiplied by the
    scaling (as the slots hold it), so W + b_t.T @ a is PEFT's W + s B A."""
    rows = max(1, _NORM_CHUNK_ELEMENTS // weight.shape[1])
    a, b = a.float(), b_t.float().t()
    norms = [torch.linalg.vector_norm(w.float() + b[start:start + rows] @ a, dim=1)
             for start, w in zip(range(0, weight.shape[0], rows), weight.split(rows))]
    scale = magnitude.float() / torch.cat(norms)
    shift = torch.zeros_like(scale) if bias is None else (1 - scale) * bias.float()
    return scale, shift


def base_module_weights(weights: ModelWeights, config: ModelConfig) -> BaseWeights:
    """Each module's rows of the fused base weights (views, no copy)."""
    shapes = config.module_shapes()

    def module_weights(layer: int, module: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        group = next(g for g in LORA_GROUPS if module in g)
        start = sum(shapes[m][1] for m in group[:group.index(module)])
        rows = slice(start, start + shapes[module][1])
        fused = weights.layers[layer]
        field = FUSED_FIELDS[group]
        bias = getattr(fused, f"{field}_bias")
        return getattr(fused, field)[rows], None if bias is None else bias[rows]
    return module_weights
