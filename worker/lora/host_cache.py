"""Adapters staged from disk into the pinned arena by a background thread.

Each staged adapter holds, per adapted (layer, module), A as [rank, in] and B.T pre-scaled
by PEFT's scaling as [rank, out]: both are row-contiguous, so copying the first `rank`
rows of a slot is one contiguous copy per tensor.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open

from worker.errors import AdapterStateError, CapacityError, CorruptAdapterError
from worker.lora.adapter import AdapterManifest, FileFingerprint, LoraTarget
from worker.lora.arena import PinnedArena, Region
from worker.model.config import ModelConfig


AdapterTensors = tuple[torch.Tensor, torch.Tensor]  # (A, B.T) of one adapted module


@dataclass
class HostAdapter:
    name: str
    manifest: AdapterManifest
    region: Region
    tensors: dict[tuple[int, str], AdapterTensors]  # keyed by (layer, module)
    staged: Future = field(default_factory=Future)
    copies_in_flight: int = 0  # the pinned region must outlive every copy reading it

    @property
    def nbytes(self) -> int:
        return self.region.size

    def is_ready(self) -> bool:
        return self.staged.done() and self.staged.exception() is None


@dataclass(frozen=True)
class StagingResult:
    name: str
    error: Exception | None


class HostCache:
    """Bounded by entry count and by bytes; eviction policy belongs to the caller."""

    def __init__(
        self, model: ModelConfig, capacity_bytes: int, max_entries: int, dtype: torch.dtype, pin: bool
    ) -> None:
        self.model = model
        self.dtype = dtype
        self.max_entries = max_entries
        self.arena = PinnedArena(capacity_bytes, pin)
        self.entries: dict[str, HostAdapter] = {}
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
        entry = HostAdapter(name, manifest, region, self._layout(manifest, region))
        self.entries[name] = entry
        self._unreported.append(name)
        self._reader.submit(self._read, entry)
        return entry

    def poll(self) -> list[StagingResult]:
        """Adapters whose staging finished since the last poll; failed ones are dropped."""
        results = []
        for name, entry in list(self.entries.items()):
            if name in self._unreported and entry.staged.done():
                self._unreported.remove(name)
                error = entry.staged.exception()
                if error is not None:
                    self._drop(entry)
                results.append(StagingResult(name, error))
        return results

    def wait(self, name: str) -> HostAdapter:
        """Blocks until `name` is staged; raises its staging error."""
        entry = self.entries[name]
        error = entry.staged.exception()
        if error is not None:
            self._unreported.remove(name)
            self._drop(entry)
            raise error
        return entry

    def evict(self, name: str) -> None:
        entry = self.entries.get(name)
        if entry is None:
            return
        if entry.copies_in_flight or not entry.staged.done():
            raise AdapterStateError(f"adapter {name!r} is being staged or copied to the GPU; evict it later")
        self._unreported = [n for n in self._unreported if n != name]
        self._drop(entry)

    def close(self) -> None:
        self._reader.shutdown(wait=True, cancel_futures=True)

    def _drop(self, entry: HostAdapter) -> None:
        del self.entries[entry.name]
        self.arena.release(entry.region)

    def _layout(self, manifest: AdapterManifest, region: Region) -> dict[tuple[int, str], AdapterTensors]:
        shapes = self.model.module_shapes()
        tensors = {}
        offset = 0
        for target in manifest.targets:
            in_features, out_features = shapes[target.module]
            a = self.arena.view(region, offset, (target.rank, in_features), self.dtype)
            offset += a.nbytes
            b_t = self.arena.view(region, offset, (target.rank, out_features), self.dtype)
            offset += b_t.nbytes
            tensors[(target.layer, target.module)] = (a, b_t)
        return tensors

    def _read(self, entry: HostAdapter) -> None:
        try:
            _check_unchanged(entry.manifest)
            with safe_open(entry.manifest.weights_path, framework="pt") as tensors:
                for target in entry.manifest.targets:
                    self._copy_target(tensors, target, entry.tensors[(target.layer, target.module)])
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            entry.staged.set_exception(
                CorruptAdapterError(f"reading {entry.manifest.weights_path} failed: {error}")
            )
            return
        except CorruptAdapterError as error:
            entry.staged.set_exception(error)
            return
        entry.staged.set_result(None)

    def _copy_target(self, tensors, target: LoraTarget, destination: tuple[torch.Tensor, torch.Tensor]) -> None:
        a_dst, b_t_dst = destination
        a_dst.copy_(tensors.get_tensor(target.a_key))
        b = tensors.get_tensor(target.b_key).to(torch.float32) * target.scaling
        b_t_dst.copy_(b.t())


def _check_unchanged(manifest: AdapterManifest) -> None:
    stat = manifest.weights_path.stat()
    if FileFingerprint(stat.st_size, stat.st_mtime_ns) != manifest.fingerprint:
        raise CorruptAdapterError(
            f"{manifest.weights_path} changed on disk since the adapter was registered; register it again"
        )
