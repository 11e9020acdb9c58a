"""Adapters staged from disk into the pinned arena by a background thread, layer by layer.

Each staged adapter holds, per adapted (layer, module), A as [rank, in] and B.T pre-scaled
by PEFT's scaling as [rank, out]: both are row-contiguous, so copying the first `rank`
rows of a slot is one contiguous copy per tensor. A DoRA adapter also holds each module's
magnitude vector [out].

The reader publishes each layer as soon as it is in the arena (`ReadProgress`), so a load to
the GPU can start while the rest of the file is still being read.

Under tensor parallelism the ranks share one host cache (worker/lora/shared_host_memory.py):
rank 0 reads each file once and writes every rank's slices; the other ranks read nothing and
follow rank 0's progress in shared memory. Every rank runs the same calls in the same order,
and each decision that depends on how far a read has got (evicting, reporting a staging done)
is agreed across the ranks first, so their allocators stay identical.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

from worker.errors import AdapterStateError, CapacityError, CorruptAdapterError
from worker.lora.adapter import AdapterManifest, FileFingerprint, LoraTarget, SavedModule
from worker.lora.arena import PinnedArena, Region, view_region
from worker.lora.peft_config import vocab_layer
from worker.lora.shared_host_memory import SharedHostMemory
from worker.model.config import ModelConfig


AdapterTensors = tuple[torch.Tensor, torch.Tensor]  # (A, B.T) of one adapted module
# Called by the reader before it reads a layer: (adapter name, layer). Tests use it to make
# reads slow, to hold a layer back, or to fail a read part way.
LayerReadHook = Callable[[str, int], None]
Index = tuple[slice, slice]
# module -> how a tensor-parallel rank indexes the file's A [r, in] and B [out, r] (its shard).
LoraSlices = Callable[[str], tuple[Index, Index]]
WHOLE: Index = (slice(None), slice(None))
# For each staging entry, on every rank alike: done on every rank, and failed on any (tensor
# parallelism's all-reduce; without it, the flags as they are).
Agreement = Callable[[list[bool], list[bool]], tuple[list[bool], list[bool]]]
# A progress word holds `base + layers read`; `base` steps by PROGRESS_STRIDE per staging, so a
# shared word's value left by an earlier entry reads as nothing read yet. FAILED_READ is past
# every layer, so that no GPU waits forever on a failed read.
PROGRESS_STRIDE = 1024
FAILED_READ = PROGRESS_STRIDE - 1
WORD_VALUES = 1 << 32  # the GPU compares the word cyclically, as 32-bit integers
RELAYED_POLL_S = 0.0005


def whole(module: str) -> tuple[Index, Index]:
    return WHOLE, WHOLE


def agree_locally(done: list[bool], failed: list[bool]) -> tuple[list[bool], list[bool]]:
    return done, failed


class ReadProgress:
    """How many leading layers of one adapter the reader has put in the pinned arena.

    Layers are read in order, so `layers_read == n` means layers [0, n) may be copied while
    the rest is still being read. Threads wait with `wait_for_layer`; a CUDA stream cannot
    wait on a thread, so `word` holds the same figure in host memory (pinned on a GPU) for
    the GPU to poll (worker/lora/stream_wait.py). A failed read sets `word` to the layer
    count, so no stream waits forever: the copies behind it read a partial region, and the
    load is reported failed.
    """

    def __init__(self, num_layers: int, pin: bool, word: torch.Tensor | None = None, base: int = 0) -> None:
        """`word`: where others (a GPU, other ranks) read the count; by default a new pinned word.
        `base`: what the count is stored above (a shared word's, see PROGRESS_STRIDE)."""
        if num_layers >= FAILED_READ:
            raise ValueError(f"a progress word counts at most {FAILED_READ - 1} layers")
        self.num_layers = num_layers
        self.word = torch.zeros(1, dtype=torch.int32, pin_memory=pin) if word is None else word
        self.base = base
        self._word = self.word.numpy()  # a plain store, no torch dispatch, from the reader thread
        self._changed = threading.Condition()
        self._layers_read = 0
        self._error: Exception | None = None
        self._store(0)

    @property
    def layers_read(self) -> int:
        return self._layers_read

    @property
    def error(self) -> Exception | None:
        return self._error

    @property
    def done(self) -> bool:
        return self.error is not None or self.layers_read == self.num_layers

    @property
    def complete(self) -> bool:
        """Every layer read without error."""
        return self.error is None and self.layers_read == self.num_layers

    def target(self, layer: int) -> int:
        """The word's value once `layer` is read (as an unsigned 32-bit integer)."""
        return (self.base + layer + 1) % WORD_VALUES

    def publish(self, layers_read: int) -> None:
        # The layer's bytes were stored before `word` (x86 keeps stores in order), so a GPU that
        # sees the new count also sees them.
        with self._changed:
            self._layers_read = layers_read
            self._store(layers_read)
            self._changed.notify_all()

    def fail(self, error: Exception) -> None:
        with self._changed:
            self._error = error
            self._store(FAILED_READ)
            self._changed.notify_all()

    def wait_for_layer(self, layer: int) -> None:
        """Blocks until `layer` is in the arena; raises the read's error if it failed."""
        with self._changed:
            self._changed.wait_for(lambda: self._error is not None or layer < self._layers_read)
        if self._error is not None:
            raise self._error

    def wait_done(self) -> None:
        self.wait_for_layer(self.num_layers - 1)

    def _store(self, count: int) -> None:
        value = (self.base + count) % WORD_VALUES
        self._word[0] = value - WORD_VALUES if value >= WORD_VALUES // 2 else value


class RelayedReadProgress(ReadProgress):
    """Another rank's reader's progress, as a rank that reads nothing sees it: its shared word."""

    def __init__(self, num_layers: int, word: torch.Tensor, base: int) -> None:
        self.num_layers = num_layers
        self.word = word
        self.base = base
        self._word = word.numpy()

    @property
    def layers_read(self) -> int:
        count = self._count()
        return 0 if count == FAILED_READ else count

    @property
    def error(self) -> Exception | None:
        if self._count() != FAILED_READ:
            return None
        return CorruptAdapterError("tensor-parallel rank 0 could not read the adapter file")

    def wait_for_layer(self, layer: int) -> None:
        while layer >= self.layers_read:
            if self.error is not None:
                raise self.error
            time.sleep(RELAYED_POLL_S)

    def publish(self, layers_read: int) -> None:
        raise AssertionError("only the reading rank publishes progress")

    def fail(self, error: Exception) -> None:
        raise AssertionError("only the reading rank publishes progress")

    def _count(self) -> int:
        count = (int(self._word[0]) - self.base) % WORD_VALUES
        return count if count <= FAILED_READ else 0  # a value left by an earlier entry


@dataclass
class HostAdapter:
    name: str
    manifest: AdapterManifest
    region: Region
    tensors: dict[tuple[int, str], AdapterTensors]  # keyed by (layer, module)
    magnitudes: dict[tuple[int, str], torch.Tensor]  # DoRA's [out] per (layer, module); empty for plain LoRA
    saved: dict[str, torch.Tensor]  # modules_to_save's replacement tables, this rank's vocabulary rows [vocab, hidden]
    progress: ReadProgress
    board_word: int | None = None  # its progress word on a shared host cache's board
    copies_in_flight: int = 0  # the pinned region must outlive every copy reading it

    @property
    def nbytes(self) -> int:
        return self.region.size


@dataclass(frozen=True)
class StagingResult:
    name: str
    error: Exception | None


@dataclass(frozen=True)
class SharedStaging:
    """A rank's part in a host cache its tensor-parallel group shares: rank 0 reads for all."""

    memory: SharedHostMemory
    rank: int
    slices: list[LoraSlices]  # per rank: what of each file tensor it copies

    @property
    def reads(self) -> bool:
        return self.rank == 0


# Where the reader writes one rank's copy of an entry: (A, B.T) and magnitudes by (layer, module),
# replacement tables by module, and what of each file tensor that rank takes.
RankWrites = tuple[dict[tuple[int, str], AdapterTensors], dict[tuple[int, str], torch.Tensor],
                   dict[str, torch.Tensor], LoraSlices]


class HostCache:
    """Bounded by entry count and by bytes; eviction policy belongs to the caller."""

    def __init__(
        self, model: ModelConfig, capacity_bytes: int, max_entries: int, dtype: torch.dtype, pin: bool,
        shared: SharedStaging | None = None, agree: Agreement = agree_locally,
    ) -> None:
        """`model`: this rank's part of the model, whose module shapes the staged tensors take;
        `shared`: this rank's part in its group's shared host cache (tensor parallelism);
        `agree`: how the ranks agree on whether stagings are done (`Agreement`)."""
        self.model = model
        self.dtype = dtype
        self.max_entries = max_entries
        self.pin = pin
        self.shared = shared
        self.agree = agree
        self.arena = PinnedArena(capacity_bytes, pin, None if shared is None else shared.memory.arena(shared.rank))
        self._written = self._memory_written()
        self._board_free = list(range(max_entries))  # shared progress words not in use, lowest first
        self._stagings = 0
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
        board_word, progress = self._new_progress()
        entry = HostAdapter(name, manifest, region, *self._layout(manifest, region, self.arena.buffer),
                            progress, board_word)
        self.entries[name] = entry
        self._unreported.append(name)
        if self._written:
            writes = [(*self._layout(manifest, region, buffer), slices) for buffer, slices in self._written]
            self._reader.submit(self._read, entry, writes)
        return entry

    def poll(self) -> list[StagingResult]:
        """Adapters whose staging finished (on every rank) since the last poll. A failed one is
        reported and dropped once no copy reads its region any more (a streamed load may still be draining)."""
        entries = [self.entries[name] for name in self._unreported]
        done, failed = self.agree([e.progress.done for e in entries], [e.progress.error is not None for e in entries])
        results = []
        for entry, is_done, failed_somewhere in zip(entries, done, failed):
            if not is_done or (failed_somewhere and entry.copies_in_flight):
                continue
            self._unreported.remove(entry.name)
            error = None
            if failed_somewhere:
                error = entry.progress.error or CorruptAdapterError(
                    f"reading adapter {entry.name!r} failed on another tensor-parallel rank")
                self._drop(entry)
            results.append(StagingResult(entry.name, error))
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
        if entry.copies_in_flight or not self.agree([entry.progress.done], [False])[0][0]:
            raise AdapterStateError(f"adapter {name!r} is being staged or copied to the GPU; evict it later")
        self._unreported = [n for n in self._unreported if n != name]
        self._drop(entry)

    def close(self) -> None:
        self._reader.shutdown(wait=True, cancel_futures=True)

    def _memory_written(self) -> list[tuple[torch.Tensor, LoraSlices]]:
        """Every rank's memory this process's reader writes, with what that rank takes of each tensor."""
        if self.shared is None:
            return [(self.arena.buffer, whole)]
        if not self.shared.reads:
            return []
        return [(self.shared.memory.arena(rank), slices) for rank, slices in enumerate(self.shared.slices)]

    def _new_progress(self) -> tuple[int | None, ReadProgress]:
        """A new entry's progress: its own pinned word, or on a shared cache a word of the board
        (the lowest free one, on every rank alike) above a base no earlier entry used."""
        num_layers = self.model.num_layers
        if self.shared is None:
            return None, ReadProgress(num_layers, self.pin)
        board_word = self._board_free.pop(0)
        word = self.shared.memory.board[board_word:board_word + 1]
        base = self._stagings * PROGRESS_STRIDE % WORD_VALUES
        self._stagings += 1
        if self.shared.reads:
            return board_word, ReadProgress(num_layers, self.pin, word, base)
        return board_word, RelayedReadProgress(num_layers, word, base)

    def _drop(self, entry: HostAdapter) -> None:
        del self.entries[entry.name]
        self.arena.release(entry.region)
        if entry.board_word is not None:
            bisect.insort(self._board_free, entry.board_word)

    def _layout(self, manifest: AdapterManifest, region: Region, buffer: torch.Tensor
                ) -> tuple[dict[tuple[int, str], AdapterTensors], dict[tuple[int, str], torch.Tensor],
                           dict[str, torch.Tensor]]:
        """Views of the region in `buffer`: (A, B.T) and, for DoRA, the magnitude of every target;
        then the replacement tables of modules_to_save."""
        shapes = self.model.module_shapes()
        tensors, magnitudes, saved = {}, {}, {}
        offset = 0
        for target in manifest.targets:
            in_features, out_features = shapes[target.module]
            a = view_region(buffer, region, offset, (target.rank, in_features), self.dtype)
            offset += a.nbytes
            b_t = view_region(buffer, region, offset, (target.rank, out_features), self.dtype)
            offset += b_t.nbytes
            tensors[(target.layer, target.module)] = (a, b_t)
            if target.magnitude_key is not None:
                magnitude = view_region(buffer, region, offset, (out_features,), self.dtype)
                offset += magnitude.nbytes
                magnitudes[(target.layer, target.module)] = magnitude
        for table in manifest.saved:
            saved[table.module] = view_region(buffer, region, offset, shapes["embed_tokens"], self.dtype)
            offset += saved[table.module].nbytes
        return tensors, magnitudes, saved

    def _read(self, entry: HostAdapter, writes: list[RankWrites]) -> None:
        """Reads the file in layer order (the manifest's targets are sorted by layer), each tensor
        once, publishing each layer once every rank's slices of it are in the arena. A replacement
        table is read with the layer whose copies carry it (the embedding's layer 0, the LM head's
        the last), so that layer's progress covers it."""
        progress = entry.progress
        manifest = entry.manifest
        by_layer = {layer: list(targets) for layer, targets in itertools.groupby(manifest.targets, lambda t: t.layer)}
        tables = {vocab_layer(table.module, self.model.num_layers): table for table in manifest.saved}
        try:
            _check_unchanged(manifest)
            with safe_open(manifest.weights_path, framework="pt") as tensors:
                for layer in sorted(by_layer.keys() | tables.keys()):
                    if self.read_hook is not None:
                        self.read_hook(entry.name, layer)
                    for target in by_layer.get(layer, ()):
                        _copy_target(tensors, target, writes)
                    if layer in tables:
                        _copy_table(tensors, tables[layer], writes)
                    progress.publish(layer + 1)
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            progress.fail(CorruptAdapterError(f"reading {entry.manifest.weights_path} failed: {error}"))
            return
        except Exception as error:  # a changed file, or a bug: reported, so no waiting copy hangs
            progress.fail(error)
            return
        progress.publish(self.model.num_layers)


def _copy_target(tensors, target: LoraTarget, writes: list[RankWrites]) -> None:
    key = (target.layer, target.module)
    a = tensors.get_tensor(target.a_key)
    b = _module_rows(tensors.get_tensor(target.b_key), target).to(torch.float32) * target.scaling
    magnitude = None if target.magnitude_key is None else _module_rows(tensors.get_tensor(target.magnitude_key), target)
    for rank_tensors, rank_magnitudes, _, slices in writes:
        a_dst, b_t_dst = rank_tensors[key]
        a_index, b_index = slices(target.module)
        a_dst.copy_(a[a_index])
        b_t_dst.copy_(b[b_index].t())
        if magnitude is not None:  # whole: DoRA is not served with tensor parallelism
            rank_magnitudes[key].copy_(magnitude)


def _copy_table(tensors, table: SavedModule, writes: list[RankWrites]) -> None:
    """A replacement table [vocab, hidden]: each rank takes its vocabulary rows, which are the rows
    it takes of the LM head's B [vocab, r] (the same split as the base embedding and LM head)."""
    source = tensors.get_slice(table.key)
    for _, _, rank_tables, slices in writes:
        rows = slices("lm_head")[1]
        rank_tables[table.module].copy_(source[rows])


def _module_rows(tensor: torch.Tensor, target: LoraTarget) -> torch.Tensor:
    """The target module's rows of a tensor saved for the checkpoint module (Phi-3's fused B holds several)."""
    return tensor if target.rows is None else tensor[slice(*target.rows)]


def _check_unchanged(manifest: AdapterManifest) -> None:
    stat = manifest.weights_path.stat()
    if FileFingerprint(stat.st_size, stat.st_mtime_ns) != manifest.fingerprint:
        raise CorruptAdapterError(
            f"{manifest.weights_path} changed on disk since the adapter was registered; register it again"
        )
