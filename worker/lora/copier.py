"""Host-to-slot copies that run beside the forward, and the waits that keep them safe.

The three hazards (ARCHITECTURE.md), handled by both back-ends:
1. compute must not read a slot before its copy landed: `wait_layer` before each layer;
2. a copy must not overwrite a slot a pending forward still reads: each copy first waits
   on the slot's last-use marker, recorded when a forward that read the slot was issued;
3. the pinned source must outlive the copy: the caller holds `copies_in_flight` on the
   host entry until `is_done` reports the job finished.

`CudaCopier` uses a dedicated CUDA stream and events; `ThreadCopier` offers the same
interface on CPU with worker threads and threading events.

A load may start while its adapter is still being read from disk: each layer's copy waits
for that layer's read (`ReadProgress`), so a forward waiting per layer on the copy runs as
far as the file has been read. If the read fails, the copy still runs to its end (over a
partial region), every waiter is released, and the caller reports the load failed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from worker.lora.host_cache import HostAdapter
from worker.lora.slots import LoraSlots
from worker.lora.stream_wait import device_address, wait_until_at_least

# Called after each layer's copies are issued: (adapter name, slot, layer). Tests use it to
# make loads slow or out of order; on CUDA it runs with the load stream current.
LayerCopiedHook = Callable[[str, int, int], None]


@dataclass
class LoadJob:
    name: str
    slot: int
    adapter: HostAdapter
    nbytes: int
    started_at: float = field(default_factory=time.perf_counter)
    layer_ready: list = field(default_factory=list)  # one event per layer
    copy_started: torch.cuda.Event | None = None  # CUDA only: when its stream took the load up
    host_copy_span: tuple[float, float] | None = None  # thread back-end: wall-clock copy start and end
    finished: Future = field(default_factory=Future)  # thread back-end only


class CudaCopier:
    def __init__(self, slots: LoraSlots, num_layers: int, device: torch.device,
                 hook: LayerCopiedHook | None = None) -> None:
        self.slots = slots
        self.num_layers = num_layers
        self.stream = torch.cuda.Stream(device=device)
        # A load still waiting for the disk holds its stream up: one stream per slot, so that
        # neither loads from the host cache nor loads into other slots queue behind its reads.
        self._streaming = [torch.cuda.Stream(device=device) for _ in range(slots.num_slots)]
        self.hook = hook
        self._last_use: dict[int, torch.cuda.Event] = {}

    def start(self, job: LoadJob) -> None:
        """Queues every layer's copy and event now; layers not yet read wait on the GPU for the reader."""
        progress = job.adapter.progress
        already_read = progress.layers_read  # snapshot: a layer read since then passes its wait at once
        streaming = already_read < self.num_layers
        stream = self._streaming[job.slot] if streaming else self.stream
        read_counter = device_address(progress.word) if streaming else 0
        with torch.cuda.stream(stream):
            if job.slot in self._last_use:
                stream.wait_event(self._last_use[job.slot])
            job.copy_started = torch.cuda.Event(enable_timing=True)
            job.copy_started.record(stream)
            for layer in range(self.num_layers):
                if layer >= already_read:
                    wait_until_at_least(stream, read_counter, layer + 1)
                writes = self.slots.layer_writes(job.slot, layer, job.adapter)
                for destination, source in writes.copies:
                    destination.copy_(source, non_blocking=True)
                for region in writes.zeros:
                    region.zero_()
                if self.hook is not None:
                    self.hook(job.name, job.slot, layer)
                event = torch.cuda.Event(enable_timing=True)
                event.record(stream)
                job.layer_ready.append(event)

    def is_done(self, job: LoadJob) -> bool:
        return job.layer_ready[-1].query()

    def wait(self, job: LoadJob) -> None:
        job.layer_ready[-1].synchronize()

    def wait_layer(self, job: LoadJob, layer: int) -> None:
        torch.cuda.current_stream().wait_event(job.layer_ready[layer])

    @contextmanager
    def reading(self, slots: Iterable[int]) -> Iterator[None]:
        """Marks `slots` as read by the forward issued inside the block."""
        slots = list(slots)
        try:
            yield
        finally:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream())
            for slot in slots:
                self._last_use[slot] = event

    def close(self) -> None:
        for stream in (self.stream, *self._streaming):
            stream.synchronize()


class ThreadCopier:
    def __init__(self, slots: LoraSlots, num_layers: int, hook: LayerCopiedHook | None = None) -> None:
        self.slots = slots
        self.num_layers = num_layers
        self.hook = hook
        self._pool = ThreadPoolExecutor(max_workers=max(1, slots.num_slots), thread_name_prefix="slot-copy")
        self._last_use: dict[int, threading.Event] = {}

    def start(self, job: LoadJob) -> None:
        job.layer_ready = [threading.Event() for _ in range(self.num_layers)]
        previous_reader = self._last_use.get(job.slot)
        self._pool.submit(self._copy, job, previous_reader)

    def _copy(self, job: LoadJob, previous_reader: threading.Event | None) -> None:
        try:
            if previous_reader is not None:
                previous_reader.wait()
            started = time.time()
            for layer in range(self.num_layers):
                job.adapter.progress.wait_for_layer(layer)  # in this thread, never the forward's
                writes = self.slots.layer_writes(job.slot, layer, job.adapter)
                for destination, source in writes.copies:
                    destination.copy_(source)
                for region in writes.zeros:
                    region.zero_()
                if self.hook is not None:
                    self.hook(job.name, job.slot, layer)
                job.layer_ready[layer].set()
            job.host_copy_span = (started, time.time())
        except BaseException as error:  # reported through the job, never lost in the thread
            job.finished.set_exception(error)
            for event in job.layer_ready:
                event.set()
            return
        job.finished.set_result(None)

    def is_done(self, job: LoadJob) -> bool:
        return job.finished.done()

    def wait(self, job: LoadJob) -> None:
        job.finished.result()

    def wait_layer(self, job: LoadJob, layer: int) -> None:
        """Returns once the layer landed, or the load failed: as on CUDA, the forward then runs
        over a partial slot and the failure is reported through `is_done` and `finished`."""
        job.layer_ready[layer].wait()

    @contextmanager
    def reading(self, slots: Iterable[int]) -> Iterator[None]:
        done = threading.Event()
        for slot in slots:
            self._last_use[slot] = done
        try:
            yield
        finally:
            done.set()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
