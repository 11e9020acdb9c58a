"""Adapters staged from disk into the pinned arena by a background thread, layer by layer.

Each staged adapter holds, per adapted (layer, module), A as [rank, in] and B.T pre-scaled
by PEFT's scaling as [rank, out]: both are row-contiguous, so copying the first `rank`
rows of a slot is one contiguous copy per tensor. A DoRA adapter also holds each module's
magnitude vector [out].

The reader publishes each layer as soon as it is in the arena (`ReadProgress`), so a load to
the GPU can start while the rest of the file is still being read.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

from worker.errors import AdapterStateError, CapacityError, CorruptAdapterError
from worker.lora.adapter import AdapterManifest, FileFingerprint, LoraTarget
from worker.lora.arena import PinnedArena, Region
from worker.model.config import ModelConfig
from worker.model.weights import Rows
from worker.tensor_parallel import ALL


AdapterTensors = tuple[torch.Tensor, torch.Tensor]  # (A, B.T) of one adapted module
# Called by the reader before it reads a layer: (adapter name, layer). Tests use it to make
# reads slow, to hold a layer back, or to fail a read part way.
LayerReadHook = Callable[[str, int], None]
Index = tuple[slice, slice]
# module -> how a tensor-parallel rank indexes the file's A [r, in] and B [out, r] (its shard).
LoraSlices = Callable[[str], tuple[Index, Index]]
WHOLE: Index = (slice(None), slice(None))


class ReadProgress:
    """How many leading layers of one adapter the reader has put in the pinned arena.

    Layers are read in order, so `layers_read == n` means layers [0, n) may be copied while
    the rest is still being read. Threads wait with `wait_for_layer`; a CUDA stream cannot
    wait on a thread, so `word` holds the same figure in host memory (pinned on a GPU) for
    the GPU to poll (worker/lora/stream_wait.py). A failed read sets `word` to the layer
    count, so no stream waits forever: the copies behind it read a partial region, and the
    load is reported failed.
    """

    def __init__(self, num_layers: int, pin: bool) -> None:
        self.num_layers = num_layers
        self.word = torch.zeros(1, dtype=torch.int32, pin_memory=pin)
        self._word = self.word.numpy()  # a plain store, no torch dispatch, from the reader thread
        self._changed = threading.Condition()
        self._layers_read = 0
        self._error: Exception | None = None

    @property
    def layers_read(self) -> int:
        return self._layers_read

    @property
    def error(self) -> Exception | None:
        return self._error

    @property
    def done(self) -> bool:
        return self._error is not None or self._layers_read == self.num_layers

    @property
    def complete(self) -> bool:
        """Every layer read without error."""
        return self._error is None and self._layers_read == self.num_layers

    def publish(self, layers_read: int) -> None:
        # The layer's bytes were stored before `word` (x86 keeps stores in order), so a GPU that
        # sees the new count also sees them.
        with self._changed:
            self._layers_read = layers_read
            self._word[0] = layers_read
            self._changed.notify_all()

    def fail(self, error: Exception) -> None:
        with self._changed:
            self._error = error
            self._word[0] = self.num_layers
            self._changed.notify_all()

    def wait_for_layer(self, layer: int) -> None:
        """Blocks until `layer` is in the arena; raises the read's error if it failed."""
        with self._changed:
            self._changed.wait_for(lambda: self._error is not None or layer < self._layers_read)
        if self._error is not None:
            raise self._error

    def wait_done(self) -> None:
        self.wait_for_layer(self.num_layers - 1)


@dataclass
class HostAdapter:
    name: str
    manifest: AdapterManifest
    region: Region
    tensors: dict[tuple[int, str], AdapterTensors]  # keyed by (layer, module)
    magnitudes: dict[tuple[int, str], torch.Tensor]  # DoRA's [out] per (layer, module); empty for plain LoRA
    progress: ReadProgress
    copies_in_flight: int = 0  # the pinned region must outlive every copy reading it

    @property
    def nbytes(self) -> int:
        return self.region.size


@dataclass(frozen=True)
class StagingResult:
    name: str
    error: Exception | None


class HostCache:
    """Bounded by entry count and by bytes; eviction policy belongs to the caller."""

    def __init__(
        self, model: ModelConfig, capacity_bytes: int, max_entries: int, dtype: torch.dtype, pin: bool,
        lora_slices: LoraSlices = lambda module: (WHOLE, WHOLE),
    ) -> None:
        """`model`: this rank's part of the model, whose module shapes the staged tensors take;
        `lora_slices`: what of each file tensor this rank reads (all of it without tensor parallelism)."""
        self.model = model
        self.lora_slices = lora_slices
        self.dtype = dtype
        self.max_entries = max_entries
        self.pin = pin
        self.arena = PinnedArena(capacity_bytes, pin)
        self.entries: dict[str, HostAdapter] = {}
        self.read_hook: LayerReadHook | None = None
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-reader")
        self._unreported: list[str] = []

    @property
    def staging_in_progress(self) -> bool:
        return bool(self._unreported)

    @property
    def used_bytes(self) -> int:
        return self.arena.capacity - self.arena.free_bytes

    def stage(self, name: str, manifest: AdapterManifest) -> HostAdapter:
        """Reserves room now (so capacity errors are immediate); reads the file in the background."""
        if name in self.entries:
            return self.entries[name]
        if len(self.entries) >= self.max_entries:
            raise CapacityError(f"host cache holds its maximum of {self.max_entries} adapters; evict one first")
        nbytes = manifest.nbytes(self.model, self.dtype.itemsize)
        region = self.arena.allocate(nbytes)
        if region is None:
            raise CapacityError(
                f"host cache has {self.arena.free_bytes} free bytes, adapter {name!r} needs {nbytes}; evict first"
            )
        entry = HostAdapter(name, manifest, region, *self._layout(manifest, region),
                            ReadProgress(self.model.num_layers, self.pin))
        self.entries[name] = entry
        self._unreported.append(name)
        self._reader.submit(self._read, entry)
        return entry

    def poll(self) -> list[StagingResult]:
        """Adapters whose staging finished since the last poll. A failed one is reported and
        dropped once no copy reads its region any more (a streamed load may still be draining)."""
        results = []
        for name in list(self._unreported):
            entry = self.entries[name]
            progress = entry.progress
            if not progress.done or (progress.error is not None and entry.copies_in_flight):
                continue
            self._unreported.remove(name)
            if progress.error is not None:
                self._drop(entry)
            results.append(StagingResult(name, progress.error))
        return results

    def wait(self, name: str) -> HostAdapter:
        """Blocks until `name` is staged; raises its staging error."""
        entry = self.entries[name]
        try:
            entry.progress.wait_done()
        except Exception:
            if not entry.copies_in_flight:  # otherwise `poll` drops it once the copy has drained
                self._unreported.remove(name)
                self._drop(entry)
            raise
        return entry

    def evict(self, name: str) -> None:
        entry = self.entries.get(name)
        if entry is None:
            return
        if entry.copies_in_flight or not entry.progress.done:
            raise AdapterStateError(f"adapter {name!r} is being staged or copied to the GPU; evict it later")
        self._unreported = [n for n in self._unreported if n != name]
        self._drop(entry)

    def close(self) -> None:
        self._reader.shutdown(wait=True, cancel_futures=True)

    def _drop(self, entry: HostAdapter) -> None:
        del self.entries[entry.name]
        self.arena.release(entry.region)

    def _layout(self, manifest: AdapterManifest, region: Region
                ) -> tuple[dict[tuple[int, str], AdapterTensors], dict[tuple[int, str], torch.Tensor]]:
        """Views of the region: (A, B.T) and, for DoRA, the magnitude of every target."""
        shapes = self.model.module_shapes()
        tensors, magnitudes = {}, {}
        offset = 0
        for target in manifest.targets:
            in_features, out_features = shapes[target.module]
            a = self.arena.view(region, offset, (target.rank, in_features), self.dtype)
            offset += a.nbytes
            b_t = self.arena.view(region, offset, (target.rank, out_features), self.dtype)
            offset += b_t.nbytes
            tensors[(target.layer, target.module)] = (a, b_t)
            if target.magnitude_key is not None:
                magnitude = self.arena.view(region, offset, (out_features,), self.dtype)
                offset += magnitude.nbytes
                magnitudes[(target.layer, target.module)] = magnitude
        return tensors, magnitudes

    def _read(self, entry: HostAdapter) -> None:
        """Reads the file in layer order (the manifest's targets are sorted by layer),
        publishing each layer once its tensors are in the arena."""
        progress = entry.progress
        try:
            _check_unchanged(entry.manifest)
            with safe_open(entry.manifest.weights_path, framework="pt") as tensors:
                for layer, targets in itertools.groupby(entry.manifest.targets, key=lambda t: t.layer):
                    if self.read_hook is not None:
                        self.read_hook(entry.name, layer)
                    for target in targets:
                        self._copy_target(tensors, target, entry)
                    progress.publish(layer + 1)
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            progress.fail(CorruptAdapterError(f"reading {entry.manifest.weights_path} failed: {error}"))
            return
        except Exception as error:  # a changed file, or a bug: reported, so no waiting copy hangs
            progress.fail(error)
            return
        progress.publish(self.model.num_layers)

    def _copy_target(self, tensors, target: LoraTarget, entry: HostAdapter) -> None:
        key = (target.layer, target.module)
        a_dst, b_t_dst = entry.tensors[key]
        a_index, b_index = self.lora_slices(target.module)
        a_dst.copy_(tensors.get_slice(target.a_key)[a_index])
        b = _module_rows(tensors.get_slice(target.b_key), target)[b_index].to(torch.float32) * target.scaling
        b_t_dst.copy_(b.t())
        if target.magnitude_key is not None:  # whole: DoRA is not served with tensor parallelism
            entry.magnitudes[key].copy_(_module_rows(tensors.get_slice(target.magnitude_key), target)[ALL])


def _module_rows(sliceable, target: LoraTarget):
    """The target module's rows of a tensor saved for the checkpoint module (Phi-3's fused B holds several)."""
    return sliceable if target.rows is None else Rows(sliceable, slice(*target.rows))


def _check_unchanged(manifest: AdapterManifest) -> None:
    stat = manifest.weights_path.stat()
    if FileFingerprint(stat.st_size, stat.st_mtime_ns) != manifest.fingerprint:
        raise CorruptAdapterError(
            f"{manifest.weights_path} changed on disk since the adapter was registered; register it again"
        )
