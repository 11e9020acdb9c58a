"""A CUDA stream that waits, on the GPU, for a counter that a host thread raises.

A load that streams from disk must queue each layer's copy behind that layer's read, and
record the layer's event at once: a forward launched meanwhile waits on those events, and a
stream waits only on an event's latest record (an event recorded later is not waited for).
torch has no stream-side wait for a host condition, so this calls the CUDA driver's stream
memory operation `cuStreamWaitValue32`: the GPU polls a 32-bit word in pinned host memory,
and no host thread blocks. The word is raised only by the host (the disk reader), never by
GPU work, so the wait cannot deadlock behind work queued after it.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch

_CU_STREAM_WAIT_VALUE_GEQ = 0x0  # (int32)(*address - value) >= 0: a cyclic greater-or-equal


class _Driver:
    def __init__(self) -> None:
        library = ctypes.CDLL("libcuda.so.1")
        # The _v2 entry point is the stream memory operation enabled on every platform (CUDA >= 11.7).
        self.wait_value = _function(library, ("cuStreamWaitValue32_v2", "cuStreamWaitValue32"),
                                    [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint])
        self.device_pointer = _function(library, ("cuMemHostGetDevicePointer_v2",),
                                        [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint])
        self.error_string = _function(library, ("cuGetErrorString",),
                                      [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)])

    def check(self, result: int, call: str) -> None:
        if result != 0:
            message = ctypes.c_char_p()
            self.error_string(result, ctypes.byref(message))
            text = message.value.decode() if message.value else "unknown error"
            raise RuntimeError(f"{call} failed: CUresult {result} ({text})")


def _function(library: ctypes.CDLL, names: tuple[str, ...], argtypes: list) -> Callable[..., int]:
    for name in names:
        function = getattr(library, name, None)
        if function is not None:
            function.argtypes = argtypes
            function.restype = ctypes.c_int
            return function
    raise RuntimeError(f"the CUDA driver exports none of {names}")


@functools.cache
def _driver() -> _Driver:
    return _Driver()


def device_address(word: torch.Tensor) -> int:
    """The address the GPU reads a pinned host tensor at (under unified addressing, its own)."""
    driver = _driver()
    address = ctypes.c_uint64()
    driver.check(driver.device_pointer(ctypes.byref(address), word.data_ptr(), 0), "cuMemHostGetDevicePointer")
    return address.value


def wait_until_at_least(stream: torch.cuda.Stream, address: int, value: int) -> None:
    """Work queued on `stream` after this starts once the int32 at `address` is >= `value`."""
    driver = _driver()
    driver.check(driver.wait_value(stream.cuda_stream, address, value, _CU_STREAM_WAIT_VALUE_GEQ),
                 "cuStreamWaitValue32")
