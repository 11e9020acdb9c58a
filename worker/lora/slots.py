"""GPU adapter slots: stacked A and B.T buffers per target module, and the multi-LoRA product.

For module m, `a[m]` is [layers, slots, max_rank, in] and `b_t[m]` is [layers, slots,
max_rank, out]. A slot holding an adapter of rank r uses rows [:r]; rows beyond it are
stale and never read, so heterogeneous ranks share one buffer without zeroing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from worker.errors import UnsupportedAdapterError
from worker.lora.host_cache import HostAdapter
from worker.model.config import ModelConfig
from worker.plan import LoraSegment


class LoraSlots:
    def __init__(
        self,
        model: ModelConfig,
        *,
        num_slots: int,
        max_rank: int,
        modules: Iterable[str],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.modules = tuple(modules)
        shapes = model.module_shapes()
        layers = model.num_layers
        self.a = {m: torch.zeros(layers, num_slots, max_rank, shapes[m][0], dtype=dtype, device=device)
                  for m in self.modules}
        self.b_t = {m: torch.zeros(layers, num_slots, max_rank, shapes[m][1], dtype=dtype, device=device)
                    for m in self.modules}
        self.ranks: list[dict[tuple[int, str], int]] = [{} for _ in range(num_slots)]
        self.occupants: list[str | None] = [None] * num_slots

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b_t.values()))

    def check_servable(self, name: str, modules: Iterable[str]) -> None:
        missing = sorted(set(modules) - set(self.modules))
        if missing:
            raise UnsupportedAdapterError(
                f"adapter {name!r} targets {missing}, which this server has no slots for "
                f"(lora target modules: {', '.join(self.modules)})"
            )

    def assign(self, slot: int, adapter: HostAdapter) -> None:
        """Records the slot's new occupant; its weights arrive through `copy_pairs`."""
        self.ranks[slot] = {key: a.shape[0] for key, (a, _) in adapter.tensors.items()}
        self.occupants[slot] = adapter.name

    def clear(self, slot: int) -> None:
        self.ranks[slot] = {}
        self.occupants[slot] = None

    def copy_pairs(self, slot: int, layer: int, adapter: HostAdapter) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(destination, source) pairs that write one layer of `adapter` into `slot`."""
        pairs = []
        for (target_layer, module), (a, b_t) in adapter.tensors.items():
            if target_layer != layer:
                continue
            rank = a.shape[0]
            pairs.append((self.a[module][layer, slot, :rank], a))
            pairs.append((self.b_t[module][layer, slot, :rank], b_t))
        return pairs

    def add_delta(
        self, out: torch.Tensor, x: torch.Tensor, layer: int, module: str, segments: Sequence[LoraSegment]
    ) -> None:
        """Reference multi-LoRA: out[s:e] += (x[s:e] @ A[slot, :r].T) @ B.T[slot, :r] per segment."""
        if module not in self.a:
            return
        for segment in segments:
            rank = self.ranks[segment.slot].get((layer, module), 0)
            if rank == 0:
                continue
            a = self.a[module][layer, segment.slot, :rank]
            b_t = self.b_t[module][layer, segment.slot, :rank]
            rows = slice(segment.start, segment.end)
            out[rows] += (x[rows] @ a.t()) @ b_t
