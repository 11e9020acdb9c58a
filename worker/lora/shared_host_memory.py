"""Pinned host memory that the ranks of a tensor-parallel group share on their host.

Rank 0 reads each adapter file once and writes every rank's slices of it; each rank copies its
own slices to its GPU from the same physical pages. The mapping holds a progress board (one
32-bit word per host-cache entry, see `ReadProgress`) and then one sub-arena per rank. Every
rank runs the same host-cache calls in the same order, so their allocators hand out the same
offsets: an adapter's slices for rank r lie at its region's offset within sub-arena r.

Rank 0 creates the mapping as a memfd (not a file under /dev/shm, which containers cap at
64 MiB by default) and the ranks it starts inherit it; each maps it and registers with CUDA the
pages its GPU reads, so its copies are true asynchronous DMA and the GPU can poll the board.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import torch

from settings.config import EngineConfig

_CUDA_HOST_REGISTER_PORTABLE_MAPPED = 0x01 | 0x02  # pinned for every context; the GPU may read it in place


@dataclass(frozen=True)
class SharedLayout:
    board_words: int  # one per host-cache entry
    arena_bytes: int  # one rank's host cache
    ranks: int

    @classmethod
    def of(cls, config: EngineConfig, ranks: int) -> SharedLayout:
        return cls(config.max_loaded_loras, config.host_cache_bytes, ranks)

    # The board and each sub-arena start on a page of their own: a rank registers only the pages
    # its GPU reads (the board and its sub-arena), and registered ranges may not share a page.
    @property
    def board_bytes(self) -> int:
        return _pages(4 * self.board_words)

    @property
    def arena_stride(self) -> int:
        return _pages(self.arena_bytes)

    @property
    def nbytes(self) -> int:
        return self.board_bytes + self.ranks * self.arena_stride


def _pages(nbytes: int) -> int:
    return -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE


def create_shared_memory(nbytes: int) -> int:
    """A new anonymous shared mapping's file descriptor (inheritable, for the ranks rank 0 starts)."""
    fd = os.memfd_create("loraserve-host-cache", 0)
    os.ftruncate(fd, nbytes)
    return fd


class SharedHostMemory:
    """One rank's view of the group's mapping: the board and every rank's sub-arena."""

    def __init__(self, path: str, layout: SharedLayout, rank: int, pin: bool) -> None:
        """`path`: the mapping (`/proc/self/fd/N` for an inherited memfd, or a file); `pin`: register
        the board and `rank`'s sub-arena with CUDA (other ranks' sub-arenas this process only writes)."""
        self.layout = layout
        fd = os.open(path, os.O_RDWR)
        try:
            if os.fstat(fd).st_size < layout.nbytes:
                raise ValueError(f"{path} holds {os.fstat(fd).st_size} bytes; the host cache needs {layout.nbytes}")
            self._mapping = mmap.mmap(fd, layout.nbytes)
        finally:
            os.close(fd)
        self.buffer = torch.frombuffer(self._mapping, dtype=torch.uint8)
        board = self.buffer[:layout.board_bytes]
        self.board = board.view(torch.int32)
        if pin:
            _register_with_cuda(board)
            _register_with_cuda(self.buffer[self._arena_start(rank):][:layout.arena_stride])

    def arena(self, rank: int) -> torch.Tensor:
        return self.buffer[self._arena_start(rank):][:self.layout.arena_bytes]

    def _arena_start(self, rank: int) -> int:
        return self.layout.board_bytes + rank * self.layout.arena_stride


def _register_with_cuda(buffer: torch.Tensor) -> None:
    torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(),
                                                                _CUDA_HOST_REGISTER_PORTABLE_MAPPED))
