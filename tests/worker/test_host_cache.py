"""The pinned arena and the host cache's bounds."""

from __future__ import annotations

import pytest
import torch

from tests.driver import make_engine
from worker.errors import CapacityError
from worker.lora.arena import ALIGNMENT, PinnedArena


def test_arena_first_fit_and_coalescing():
    arena = PinnedArena(10 * ALIGNMENT, pin=False)
    a = arena.allocate(3 * ALIGNMENT)
    b = arena.allocate(ALIGNMENT + 1)  # rounds up to two units
    c = arena.allocate(5 * ALIGNMENT)
    assert (a.offset, b.offset, c.offset) == (0, 3 * ALIGNMENT, 5 * ALIGNMENT)
    assert arena.allocate(1) is None
    arena.release(a)
    arena.release(c)
    assert arena.allocate(6 * ALIGNMENT) is None  # 3 + 5 free, but not adjacent
    arena.release(b)
    whole = arena.allocate(10 * ALIGNMENT)
    assert whole is not None and whole.offset == 0


def test_arena_views_stay_inside_their_region():
    arena = PinnedArena(4 * ALIGNMENT, pin=False)
    region = arena.allocate(ALIGNMENT)

    view = arena.view(region, 0, (4, 16), torch.float32)
    view.fill_(1.5)
    assert arena.buffer[: view.nbytes].view(torch.float32).sum().item() == 1.5 * 64
    with pytest.raises(ValueError):
        arena.view(region, 0, (ALIGNMENT,), torch.float32)


def test_host_cache_bounds_by_count_and_bytes(model_dirs, mixed_adapter_dirs):
    adapters = mixed_adapter_dirs["llama"]
    engine = make_engine(model_dirs["llama"], max_loaded_loras=1)
    for name, path in adapters.items():
        engine.register_adapter(name, path)
    a1_bytes = engine.adapter_info("a1").nbytes
    engine.stage_adapter("a0")
    with pytest.raises(CapacityError, match="maximum of 1"):
        engine.stage_adapter("a1")
    engine.wait_staged("a0")
    engine.evict_host("a0")
    assert engine.host_cache.used_bytes == 0
    engine.close()

    small = make_engine(model_dirs["llama"], host_cache_bytes=a1_bytes - 1)
    small.register_adapter("a1", adapters["a1"])
    with pytest.raises(CapacityError, match="free bytes"):
        small.stage_adapter("a1")
    small.close()


def test_staged_bytes_match_the_reported_size(model_dirs, mixed_adapter_dirs):
    engine = make_engine(model_dirs["llama"])
    info = engine.register_adapter("a1", mixed_adapter_dirs["llama"]["a1"])
    engine.stage_adapter("a1")
    engine.wait_staged("a1")
    assert info.nbytes <= engine.host_cache.used_bytes < info.nbytes + 256
    assert engine.poll().staged == ["a1"]
    engine.close()
