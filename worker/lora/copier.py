"""Host-to-slot copies that run beside the forward, and the waits that keep them safe.

The three hazards (ARCHITECTURE.md), handled by both back-ends:
1. compute must not read a slot before its copy landed: `wait_layer` before each layer;
2. a copy must not overwrite a slot a pending forward still reads: each copy first waits
   on the slot's last-use marker, recorded when a forward that read the slot was issued;
3. the pinned source must outlive the copy: the caller holds `copies_in_flight` on the
   host entry until `is_done` reports the job finished.

`CudaCopier` uses a dedicated CUDA stream and events; `ThreadCopier` offers the same
interface on CPU with worker threads and threading events.

A DoRA adapter's layer also queues, after its copies and before its event, the computation
of its scales from the copied A and B (worker/lora/dora.py), so the per-layer events keep
meaning "this layer is ready".

Queuing a load's copies (14 per layer for seven modules) takes the host about 8 ms, so
`CudaCopier` queues them from a thread of its own: the engine's thread goes straight on to
launch the next forward instead of leaving the GPU idle for that long. A forward that must
wait on a layer first waits on the host until that layer's event is recorded, since a stream
that waits on an event not yet recorded does not wait at all.

A load may start while its adapter is still being read from disk: each layer's copy waits
for that layer's read (`ReadProgress`), so a forward waiting per layer on the copy runs as
far as the file has been read. If the read fails, the copy still runs to its end (over a
partial region), every waiter is released, and the caller reports the load failed.
"""

from __future__ import annotations

import queue
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
    layer_ready: list = field(default_factory=list)  # one event per layer: CUDA events or threading events
    layer_queued: list[threading.Event] = field(default_factory=list)  # CUDA only: set once layer_ready's is recorded
    copy_started: torch.cuda.Event | None = None  # CUDA only: when its stream took the load up
    host_copy_span: tuple[float, float] | None = None  # thread back-end: wall-clock copy start and end
    blocking: bool = False  # the seed's baseline: the command waited for the copy
    streamed: bool = False  # started while its adapter was still being read from disk
    layers_seen_landed: int = 0  # by the engine's polls; layers land in order, so each poll resumes here
    # Set once the copier's thread is through with the job: every copy queued (CUDA) or made
    # (thread back-end); an error raised while doing so is set here, never lost in the thread.
    finished: Future = field(default_factory=Future)


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
        # One thread queues every load, in the order started: a stream's work stays in that order.
        self._queue: queue.SimpleQueue[_QueuedLoad | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._queue_loads, name="slot-copy-queue", daemon=True)
        self._thread.start()

    def start(self, job: LoadJob) -> None:
        """Hands the load to the copier's thread, which queues every layer's copy and event;
        layers not yet read from disk wait on the GPU for the reader."""
        job.layer_ready = [torch.cuda.Event(enable_timing=True) for _ in range(self.num_layers)]
        job.layer_queued = [threading.Event() for _ in range(self.num_layers)]
        job.copy_started = torch.cuda.Event(enable_timing=True)
        # Snapshots taken now, on the engine's thread: the slot's last reader so far, and the
        # layers already read (a layer read since then passes its GPU-side wait at once).
        previous_reader = self._last_use.get(job.slot)
        progress = job.adapter.progress
        already_read = progress.layers_read
        # A driver call: made here, where the CUDA context is current (the copier's thread may have none yet).
        read_counter = device_address(progress.word) if already_read < self.num_layers else 0
        self._queue.put(_QueuedLoad(job, previous_reader, already_read, read_counter))

    def _queue_loads(self) -> None:
        with torch.cuda.device(self.stream.device):
            while (load := self._queue.get()) is not None:
                self._queue_copies(load)

    def _queue_copies(self, load: _QueuedLoad) -> None:
        job = load.job
        streaming = load.already_read < self.num_layers
        stream = self._streaming[job.slot] if streaming else self.stream
        layer = 0
        try:
            with torch.cuda.stream(stream):
                if load.previous_reader is not None:
                    stream.wait_event(load.previous_reader)
                # A runtime call: it also binds the device's context to this thread, which the
                # driver's stream waits below need.
                job.copy_started.record(stream)
                for layer in range(self.num_layers):
                    if layer >= load.already_read:
                        wait_until_at_least(stream, load.read_counter, job.adapter.progress.target(layer))
                    self._queue_layer(job, layer)
                    job.layer_ready[layer].record(stream)
                    job.layer_queued[layer].set()
        except BaseException as error:  # reported through the job, never lost in the thread
            job.finished.set_exception(error)
            self._release(job, stream, first=layer)
            return
        job.finished.set_result(None)

    def _release(self, job: LoadJob, stream: torch.cuda.Stream, first: int) -> None:
        """After a failure, the layers from `first` on are released behind whatever was queued:
        no waiter reads a slot while a copy into it may still run, and no copy outlives the
        pinned source's hold. The waiters are released even if recording fails too."""
        try:
            for layer in range(first, self.num_layers):
                job.layer_ready[layer].record(stream)
        finally:
            for layer in range(first, self.num_layers):
                job.layer_queued[layer].set()

    def _queue_layer(self, job: LoadJob, layer: int) -> None:
        self.slots.layer_writes(job.slot, layer, job.adapter).apply(non_blocking=True)
        if self.hook is not None:
            self.hook(job.name, job.slot, layer)

    def is_done(self, job: LoadJob) -> bool:
        return job.finished.done() and job.layer_ready[-1].query()

    def copy_seconds(self, job: LoadJob) -> float | None:
        """A finished copy's time on its stream, from its start there (after the slot's readers and
        the copies queued before it) to its last layer landing."""
        if job.copy_started is None or job.finished.exception() is not None:
            return None
        return job.copy_started.elapsed_time(job.layer_ready[-1]) / 1e3

    def wait(self, job: LoadJob) -> None:
        """Waits for every copy to land; raises the error that stopped the load being queued."""
        job.layer_queued[-1].wait()
        job.layer_ready[-1].synchronize()
        job.finished.result()

    def wait_layer(self, job: LoadJob, layer: int) -> None:
        job.layer_queued[layer].wait()
        torch.cuda.current_stream().wait_event(job.layer_ready[layer])

    def layer_copied(self, job: LoadJob, layer: int) -> bool:
        return job.layer_queued[layer].is_set() and job.layer_ready[layer].query()

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
        self._queue.put(None)
        self._thread.join()
        for stream in (self.stream, *self._streaming):
            stream.synchronize()


@dataclass
class _QueuedLoad:
    job: LoadJob
    previous_reader: torch.cuda.Event | None
    already_read: int
    read_counter: int  # the device address of the reader's progress word, when streaming


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
                self.slots.layer_writes(job.slot, layer, job.adapter).apply(non_blocking=False)
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

    def copy_seconds(self, job: LoadJob) -> float | None:
        """A finished copy's time in its thread, from its start (after the slot's readers) to its
        last layer written."""
        if job.host_copy_span is None:
            return None
        start, end = job.host_copy_span
        return end - start

    def wait(self, job: LoadJob) -> None:
        job.finished.result()

    def wait_layer(self, job: LoadJob, layer: int) -> None:
        """Returns once the layer landed, or the load failed: as on CUDA, the forward then runs
        over a partial slot and the failure is reported through `is_done` and `finished`."""
        job.layer_ready[layer].wait()

    def layer_copied(self, job: LoadJob, layer: int) -> bool:
        return job.layer_ready[layer].is_set()

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
