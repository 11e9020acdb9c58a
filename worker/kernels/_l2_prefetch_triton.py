"""Triton kernel of `worker.kernels.l2_prefetch` (imported only on CUDA machines)."""

from __future__ import annotations

import triton
import triton.language as tl

from worker.kernels.l2_prefetch import CHUNK

CHUNKS_PER_PROGRAM = 128
_PREFETCH: tl.constexpr = tl.constexpr(f"cp.async.bulk.prefetch.L2.global [$1], {CHUNK};\n\tmov.u32 $0, 0;")


@triton.jit
def _prefetch_kernel(address, chunks, CHUNK_BYTES: tl.constexpr, PER_PROGRAM: tl.constexpr):
    index = tl.minimum(tl.program_id(0) * PER_PROGRAM + tl.arange(0, PER_PROGRAM), chunks - 1)
    tl.inline_asm_elementwise(_PREFETCH, "=r,l",
                              [address + index.to(tl.int64) * CHUNK_BYTES], dtype=tl.int32, is_pure=False,
                              pack=1)


def prefetch_l2(address: int, nbytes: int) -> None:
    chunks = triton.cdiv(nbytes, CHUNK)
    _prefetch_kernel[(triton.cdiv(chunks, CHUNKS_PER_PROGRAM),)](address, chunks, CHUNK_BYTES=CHUNK,
                                                                  PER_PROGRAM=CHUNKS_PER_PROGRAM, num_warps=4)
