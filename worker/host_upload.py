"""Host values onto the GPU by a kernel that reads pinned memory, not by the copy engine.

Host-to-device copies run on the GPU's copy engine in the order they were issued, whatever
their stream: a step's few kilobytes of inputs issued after an adapter load's 1.3 GB waited
for the whole 26 ms copy (profiler trace of a pipelined cold request: the compute stream's
input copy started when the load's last copy ended). Here an elementwise kernel on the
current stream reads the pinned source through its mapped device address (zero copy), so a
step's inputs never queue behind a load.

The caching host allocator cannot see such a read, so a pinned source must stay unchanged
until the stream has passed it: `upload` holds its source until then; `upload_into` leaves
that to the caller.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from worker.lora.stream_wait import device_address


class _MappedBytes:
    """The bytes of a pinned host tensor as the GPU addresses them (`__cuda_array_interface__`)."""

    def __init__(self, host: torch.Tensor) -> None:
        self.host = host  # kept alive with the view
        self.__cuda_array_interface__ = {"shape": (host.numel() * host.element_size(),), "typestr": "|u1",
                                         "data": (device_address(host), False), "version": 3}


def mapped_bytes(host: torch.Tensor) -> torch.Tensor:
    """A uint8 CUDA view of a contiguous pinned host tensor's memory."""
    if not (host.is_pinned() and host.is_contiguous()):
        raise ValueError("only a contiguous pinned host tensor can be read by a kernel")
    return torch.as_tensor(_MappedBytes(host), device="cuda")


def upload_into(out: torch.Tensor, source: torch.Tensor) -> None:
    """out[:] = source, by a kernel on the current stream; `source` is `mapped_bytes` of a pinned
    tensor of out's size and dtype, unchanged until the stream has passed this point."""
    torch.bitwise_or(source, 0, out=out.view(-1).view(torch.uint8))  # an elementwise kernel, never a memcpy


_held: deque[tuple[torch.cuda.Event, torch.Tensor]] = deque()  # pinned sources the GPU may still read


def upload(values: list | np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values as a tensor on `device`, queued on the current stream without waiting for it."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    host = _pinned(values, dtype)
    out = torch.empty(host.shape, dtype=dtype, device=device)
    if host.numel():
        upload_into(out, mapped_bytes(host))
    read = torch.cuda.Event()
    read.record()
    _held.append((read, host))
    while _held and _held[0][0].query():
        _held.popleft()
    return out


def _pinned(values: list | np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(values, np.ndarray):  # torch.tensor cannot pin what it builds from numpy
        host = torch.empty(values.shape, dtype=dtype, pin_memory=True)
        host.copy_(torch.from_numpy(values))
        return host
    return torch.tensor(values, dtype=dtype, pin_memory=True)


def index_tensor(values: list | np.ndarray, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Host indices on the device without waiting for the GPU, nor for adapter loads queued on
    the copy engine."""
    return upload(values, dtype, device)
