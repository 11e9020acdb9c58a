"""The host cache a tensor-parallel group shares: rank 0 reads each file once for every rank.

Two host caches over two mappings of one memfd stand for two ranks' processes: rank 0's reads
and writes both ranks' slices, rank 1's reads nothing and follows rank 0's progress words."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from worker.errors import AdapterStateError, CorruptAdapterError
from worker.lora.adapter import AdapterManifest, read_adapter_manifest
from worker.lora.host_cache import HostCache, SharedStaging
from worker.lora.shared_host_memory import SharedHostMemory, SharedLayout, create_shared_memory
from worker.model.config import load_model_config
from worker.tensor_parallel import TensorParallel

RANKS = 2
LAYOUT = SharedLayout(board_words=2, arena_bytes=4 << 20, ranks=RANKS)


class Ranks:
    """Rank 0's and rank 1's host caches, as two processes would map them."""

    def __init__(self, model_dir: Path, agree=None, pinned_rank: int | None = None) -> None:
        """`pinned_rank`: the rank whose pages are registered with CUDA, as the one GPU stands for it."""
        self._fd = create_shared_memory(LAYOUT.nbytes)  # as the worker group's rank 0 creates it
        path = f"/proc/self/fd/{self._fd}"
        self.model = load_model_config(model_dir)
        groups = [TensorParallel(rank=rank, size=RANKS) for rank in range(RANKS)]
        slices = [functools.partial(tp.lora_slices, self.model) for tp in groups]
        shard = groups[0].local_config(self.model)
        self.caches = [
            HostCache(shard, LAYOUT.arena_bytes, LAYOUT.board_words, torch.float32, pin=rank == pinned_rank,
                      shared=SharedStaging(SharedHostMemory(path, LAYOUT, rank, rank == pinned_rank), rank, slices),
                      **({} if agree is None else {"agree": agree}))
            for rank in range(RANKS)]
        self.slices = slices

    def manifest(self, adapter_dir: Path) -> AdapterManifest:
        return read_adapter_manifest(adapter_dir, self.model, 32)

    def close(self) -> None:
        for cache in self.caches:
            cache.close()
        os.close(self._fd)


def expected_slices(manifest: AdapterManifest, slices) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    tensors = load_file(manifest.weights_path)
    expected = {}
    for target in manifest.targets:
        a_index, b_index = slices(target.module)
        b_t = (tensors[target.b_key] * target.scaling)[b_index].t()
        expected[(target.layer, target.module)] = (tensors[target.a_key][a_index], b_t)
    return expected


@pytest.fixture
def ranks(model_dirs):
    ranks = Ranks(model_dirs["llama"])
    yield ranks
    ranks.close()


def test_each_rank_finds_its_slices_though_only_rank_0_reads(ranks, mixed_adapter_dirs):
    manifest = ranks.manifest(mixed_adapter_dirs["llama"]["a1"])  # column- and row-parallel modules
    reads = []
    for rank, cache in enumerate(ranks.caches):
        cache.read_hook = lambda name, layer, rank=rank: reads.append(rank)
    follower, reader = ranks.caches[1], ranks.caches[0]
    following = follower.stage("a1", manifest)  # relayed commands may reach rank 1 first
    reader.stage("a1", manifest)
    follower.wait("a1")
    assert set(reads) == {0} and len(reads) == ranks.model.num_layers
    for rank, cache in enumerate(ranks.caches):
        entry = cache.entries["a1"]
        for key, (a, b_t) in expected_slices(manifest, ranks.slices[rank]).items():
            torch.testing.assert_close(entry.tensors[key][0], a, rtol=0, atol=0)
            torch.testing.assert_close(entry.tensors[key][1], b_t, rtol=0, atol=0)
    assert following.progress.complete
    assert [r.name for r in follower.poll()] == ["a1"] == [r.name for r in reader.poll()]


def test_a_reused_progress_word_reads_as_nothing_read_until_rank_0_reads(ranks, mixed_adapter_dirs):
    first, second = ranks.manifest(mixed_adapter_dirs["llama"]["a0"]), ranks.manifest(mixed_adapter_dirs["llama"]["a1"])
    for cache in ranks.caches:
        cache.stage("a0", first)
        cache.wait("a0")
        cache.poll()
        cache.evict("a0")
    following = ranks.caches[1].stage("a1", second)  # on the board word a0 left at "every layer read"
    assert following.board_word == 0 and following.progress.layers_read == 0 and not following.progress.done
    ranks.caches[0].stage("a1", second)
    ranks.caches[1].wait("a1")
    assert following.progress.complete


def test_a_failed_read_on_rank_0_fails_the_staging_on_every_rank(ranks, mixed_adapter_dirs):
    manifest = ranks.manifest(mixed_adapter_dirs["llama"]["a1"])

    def fail_at_layer_1(name: str, layer: int) -> None:
        if layer == 1:
            raise OSError("disk went away")

    ranks.caches[0].read_hook = fail_at_layer_1
    for cache in ranks.caches:
        cache.stage("a1", manifest)
    with pytest.raises(CorruptAdapterError, match="disk went away"):
        ranks.caches[0].wait("a1")
    with pytest.raises(CorruptAdapterError, match="rank 0 could not read"):
        ranks.caches[1].wait("a1")
    assert all("a1" not in cache.entries for cache in ranks.caches)
    assert ranks.caches[0].arena.free_bytes == ranks.caches[1].arena.free_bytes == LAYOUT.arena_bytes


def test_staging_is_reported_and_evicted_only_once_every_rank_has_it(model_dirs, mixed_adapter_dirs):
    def another_rank_is_behind(done: list[bool], failed: list[bool]) -> tuple[list[bool], list[bool]]:
        return [False] * len(done), failed

    ranks = Ranks(model_dirs["llama"], agree=another_rank_is_behind)
    manifest = ranks.manifest(mixed_adapter_dirs["llama"]["a0"])
    reader = ranks.caches[0]
    reader.stage("a0", manifest)
    reader.wait("a0")
    assert reader.poll() == []
    with pytest.raises(AdapterStateError, match="being staged"):
        reader.evict("a0")
    assert "a0" in reader.entries
    ranks.close()
