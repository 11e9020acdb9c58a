"""Warms the L2 cache with a weight's bytes while the GPU's memory is otherwise idle.

A decode step's attention is bound by latency, not bandwidth: for those microseconds HBM
mostly idles. The o projection that follows reads its whole weight (33.5 MB at 8B sizes,
inside an H200's 50 MB L2). Prefetched into L2 beside the attention, the GEMM then reads it
from L2. The kernel issues Hopper's bulk L2 prefetch (`cp.async.bulk.prefetch.L2.global`,
CHUNK bytes each, one per thread): it moves no data into registers and returns at once.
"""

from __future__ import annotations

import torch

CHUNK = 4096  # bytes per bulk prefetch (a multiple of 16, as the instruction needs)


def prefetch_l2(tensor: torch.Tensor) -> None:
    """Queues the prefetch of a contiguous CUDA tensor's bytes (whole chunks: may run past its end
    by less than CHUNK, which a prefetch may: it faults on nothing)."""
    if not tensor.is_contiguous():
        raise ValueError("prefetch_l2 needs a contiguous tensor")
    from worker.kernels import _l2_prefetch_triton as kernels

    kernels.prefetch_l2(tensor.data_ptr(), tensor.numel() * tensor.element_size())
