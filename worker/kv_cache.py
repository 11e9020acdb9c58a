"""Paged KV-cache memory. The worker owns the memory; callers own the page tables."""

from __future__ import annotations

import torch


class PagedKVCache:
    """Per layer, keys and values of shape [num_pages * page_size, kv_heads, head_dim].

    A token at position p of a sequence lives at flat index
    page_table[p // page_size] * page_size + p % page_size (`worker.step_inputs.kv_index`).
    One page more than `num_pages` is allocated: padding rows of a fixed-size (CUDA-graph)
    batch write their keys there, at `scratch_index`, which no page table may name.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        shape = (num_layers, 2, (num_pages + 1) * page_size, num_kv_heads, head_dim)
        self.memory = torch.zeros(shape, dtype=dtype, device=device)

    def keys(self, layer: int) -> torch.Tensor:
        return self.memory[layer, 0]

    def values(self, layer: int) -> torch.Tensor:
        return self.memory[layer, 1]

    @property
    def scratch_index(self) -> int:
        return self.num_pages * self.page_size

    @property
    def nbytes(self) -> int:
        return self.memory.numel() * self.memory.element_size()
