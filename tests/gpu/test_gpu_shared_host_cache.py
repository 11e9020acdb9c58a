"""The host cache a tensor-parallel group shares, pinned: registered with CUDA in each process,
copied from asynchronously, and its progress words polled by the GPU (one GPU stands for each rank).

Run on a GPU machine: `python -m pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tests.worker.test_shared_host_cache import Ranks, expected_slices
from worker.lora.stream_wait import device_address, wait_until_at_least

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_a_rank_that_reads_nothing_copies_its_slices_once_rank_0_has_read_them(
        model_dirs, mixed_adapter_dirs):
    ranks = Ranks(model_dirs["llama"], pinned_rank=1)
    reader, follower = ranks.caches
    assert follower.arena.buffer.is_pinned()
    manifest = ranks.manifest(mixed_adapter_dirs["llama"]["a1"])
    last_layer = ranks.model.num_layers - 1
    release = threading.Event()
    reader.read_hook = lambda name, layer: release.wait() if layer == last_layer else None
    entry = follower.stage("a1", manifest)
    reader.stage("a1", manifest)

    stream = torch.cuda.Stream()
    key = next(k for k in entry.tensors if k[0] == last_layer)
    with torch.cuda.stream(stream):
        wait_until_at_least(stream, device_address(entry.progress.word), entry.progress.target(last_layer))
        copied = entry.tensors[key][1].to("cuda", non_blocking=True)
        finished = torch.cuda.Event()
        finished.record(stream)
    time.sleep(0.2)
    assert not finished.query()  # the GPU waits on rank 0's word, which the follower never writes
    release.set()
    finished.synchronize()
    torch.testing.assert_close(copied.cpu(), expected_slices(manifest, ranks.slices[1])[key][1], rtol=0, atol=0)
    ranks.close()
