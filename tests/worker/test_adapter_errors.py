"""Every adapter that cannot be served is refused with its typed error; serving goes on."""

from __future__ import annotations

import os
import time

import pytest

from tests import model_factory as factory
from tests.driver import Driver, Request, make_engine, make_resident
from worker.errors import (
    AdapterConfigMismatchError,
    AdapterNotFoundError,
    AdapterRankError,
    AdapterShapeError,
    AdapterStateError,
    CorruptAdapterError,
    InvalidAdapterError,
    PickleRefusedError,
    UnsupportedAdapterError,
)

BAD_ADAPTERS = {
    "pickle": (factory.build_pickle_only_adapter, PickleRefusedError, "pickle"),
    "truncated": (factory.build_truncated_adapter, CorruptAdapterError, "safetensors"),
    "corrupt": (factory.build_corrupt_adapter, CorruptAdapterError, "safetensors"),
    "resized_vocab": (factory.build_resized_vocab_adapter, AdapterShapeError, "resized vocabulary"),
    # Served only with --saved-module-slots (tests/worker/test_modules_to_save.py).
    "modules_to_save": (factory.build_modules_to_save_adapter, UnsupportedAdapterError,
                        r"modules_to_save.*--saved-module-slots"),
    "other_base": (factory.build_adapter_for_other_base, AdapterShapeError, "another base"),
}


@pytest.fixture(scope="module")
def serving_engine(model_dirs, mixed_adapter_dirs):
    engine = make_engine(model_dirs["llama"], max_lora_rank=16)
    engine.register_adapter("good", mixed_adapter_dirs["llama"]["a0"])
    make_resident(engine, "good", 0)
    yield engine
    engine.close()


def assert_still_serving(engine) -> None:
    request = Request("probe", [5, 6, 7, 8, 9], adapter_slot=0, max_new_tokens=2)
    Driver(engine).run([request])
    assert len(request.generated) == 2


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_bad_adapter_is_refused_with_its_error(case, serving_engine, model_dirs, artifacts):
    build, error_type, message = BAD_ADAPTERS[case]
    path = build(model_dirs["llama"], artifacts / f"bad-{case}")
    with pytest.raises(error_type, match=message):
        serving_engine.register_adapter(case, path)
    assert case not in serving_engine.adapters
    assert_still_serving(serving_engine)


def test_rank_above_maximum_is_refused(serving_engine, model_dirs, artifacts):
    path = factory.build_high_rank_adapter(model_dirs["llama"], artifacts / "bad-rank", rank=32)
    with pytest.raises(AdapterRankError, match="max_lora_rank 16"):
        serving_engine.register_adapter("too-big", path)
    assert_still_serving(serving_engine)


def test_missing_directory_and_files(serving_engine, tmp_path):
    with pytest.raises(AdapterNotFoundError, match="does not exist"):
        serving_engine.register_adapter("missing", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterNotFoundError, match="not a PEFT adapter"):
        serving_engine.register_adapter("empty", tmp_path / "empty")
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    with pytest.raises(AdapterNotFoundError, match="adapter_model.safetensors"):
        serving_engine.register_adapter("config-only", tmp_path / "config-only")
    (tmp_path / "bad-json").mkdir()
    (tmp_path / "bad-json" / "adapter_config.json").write_text("{not json")
    with pytest.raises(CorruptAdapterError, match="JSON"):
        serving_engine.register_adapter("bad-json", tmp_path / "bad-json")
    assert_still_serving(serving_engine)


def test_errors_map_to_two_families():
    """The service maps InvalidAdapterError to INVALID_ARGUMENT and not-found to NOT_FOUND."""
    for error in (AdapterRankError, UnsupportedAdapterError, AdapterShapeError, CorruptAdapterError,
                  PickleRefusedError, AdapterConfigMismatchError):
        assert issubclass(error, InvalidAdapterError)
    assert not issubclass(AdapterNotFoundError, InvalidAdapterError)


def test_adapter_changed_on_disk_after_registration_fails_staging(serving_engine, model_dirs, artifacts):
    path = factory.build_adapter(model_dirs["llama"], artifacts / "changing", factory.AdapterSpec(seed=9))
    serving_engine.register_adapter("changing", path)
    weights = path / "adapter_model.safetensors"
    later = time.time_ns() + 5_000_000_000
    os.utime(weights, ns=(later, later))
    serving_engine.stage_adapter("changing")
    with pytest.raises(CorruptAdapterError, match="changed on disk"):
        serving_engine.wait_staged("changing")
    assert "changing" not in serving_engine.host_cache.entries
    serving_engine.unregister_adapter("changing")
    assert_still_serving(serving_engine)


def test_registering_a_name_twice_is_refused(serving_engine, mixed_adapter_dirs):
    with pytest.raises(AdapterStateError, match="already registered"):
        serving_engine.register_adapter("good", mixed_adapter_dirs["llama"]["a1"])


def test_adapter_for_modules_without_slots_is_refused(model_dirs, mixed_adapter_dirs):
    engine = make_engine(model_dirs["llama"], lora_target_modules=("q_proj", "v_proj"))
    engine.register_adapter("a0", mixed_adapter_dirs["llama"]["a0"])
    with pytest.raises(UnsupportedAdapterError, match="no slots"):
        engine.register_adapter("a1", mixed_adapter_dirs["llama"]["a1"])
    engine.close()
