"""The strict checkpoint loader, dummy weights, and batch validation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.driver import Driver, Request, make_engine
from worker.batch import SequenceInput
from worker.errors import ModelLoadError


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def rewrite_weights(model_dir, change) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("model.layers.0.mlp.up_proj.weight"), "missing"),
    (lambda t: t.__setitem__("model.extra.weight", torch.zeros(2)), "unexpected tensor"),
    (lambda t: t.__setitem__("model.norm.weight", torch.ones(3)), "shape"),
])
def test_strict_loader_refuses_bad_checkpoints(change, message, model_dirs, tmp_path):
    model_dir = copy_model(model_dirs["llama"], tmp_path / "model")
    rewrite_weights(model_dir, change)
    with pytest.raises(ModelLoadError, match=message):
        make_engine(model_dir)


def test_unsupported_architecture_and_pickles_are_refused(model_dirs, tmp_path):
    model_dir = copy_model(model_dirs["llama"], tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="not supported"):
        make_engine(model_dir)
    pickled = copy_model(model_dirs["llama"], tmp_path / "pickled")
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="pickle"):
        make_engine(pickled)


def test_dummy_weights_need_only_the_config(model_dirs, tmp_path):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(model_dirs["qwen3"] / "config.json", config_only / "config.json")
    engine = make_engine(config_only, load_format="dummy")
    request = Request("r", [1, 2, 3, 4, 5], max_new_tokens=3)
    Driver(engine).run([request])
    assert torch.isfinite(request.all_logits()).all()
    assert len(request.generated) == 3
    engine.close()


def test_generation_config_end_tokens_are_read(model_dirs, tmp_path):
    model_dir = copy_model(model_dirs["llama"], tmp_path / "model")
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 77]}))
    engine = make_engine(model_dir)
    assert 77 in engine.model_config.eos_token_ids
    engine.close()


@pytest.mark.parametrize("bad_input, message", [
    (SequenceInput("r", [1, 2, 3, 4, 5], 0, [0]), "need 2 pages"),
    (SequenceInput("r", [1, 2], 0, [10_000]), "page id"),
    (SequenceInput("r", [1, 99_999], 0, [0]), "vocabulary"),
    (SequenceInput("r", [], 0, [0]), "no new tokens"),
    (SequenceInput("r", [1], 0, [0], adapter_slot=2), "holds no adapter"),
])
def test_bad_batches_are_refused_before_running(bad_input, message, model_dirs):
    engine = make_engine(model_dirs["llama"])
    with pytest.raises(ValueError, match=message):
        engine.forward([bad_input])
    engine.close()


def test_llama31_config_in_the_v4_format_gives_transformers_rope(tmp_path):
    """Real Llama 3.1 checkpoints carry rope_theta + rope_scaling (the transformers v4 form)."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from loraserve.synthetic import LLAMA31_8B
    from worker.model.config import load_model_config
    from worker.model.rope import RotaryEmbedding

    (tmp_path / "config.json").write_text(json.dumps(LLAMA31_8B | {"eos_token_id": [128001, 128008, 128009]}))
    config = load_model_config(tmp_path)
    assert (config.rope_type(None), config.eos_token_ids) == ("llama3", (128001, 128008, 128009))
    positions = torch.tensor([0, 5, 9000, 100_000])
    cos, sin = RotaryEmbedding(config, torch.device("cpu")).cos_sin(positions, torch.float32)
    hf_cos, hf_sin = LlamaRotaryEmbedding(AutoConfig.from_pretrained(tmp_path))(
        torch.zeros(1, dtype=torch.float32), positions[None])
    torch.testing.assert_close(cos[:, 0], hf_cos[0])
    torch.testing.assert_close(sin[:, 0], hf_sin[0])


GEMMA3_1B = {  # config.json of Gemma 3 1B (transformers v4 form: rope_theta, rope_local_base_freq, a pattern)
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 1152,
    "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1,
    "head_dim": 256, "query_pre_attn_scalar": 256, "rope_theta": 1000000, "rope_local_base_freq": 10000,
    "rope_scaling": None, "sliding_window": 512, "sliding_window_pattern": 6, "final_logit_softcapping": None,
    "attn_logit_softcapping": None, "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 32768,
    "vocab_size": 262144, "rms_norm_eps": 1e-06, "eos_token_id": [1, 106],
}


def test_gemma3_config_gives_transformers_ropes_windows_and_knobs(tmp_path):
    """Every sixth layer is global (rope base 1e6, no window); the others local (base 1e4, 512 keys)."""
    from transformers import AutoConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    from worker.model.config import load_model_config
    from worker.model.rope import RotaryEmbedding

    (tmp_path / "config.json").write_text(json.dumps(GEMMA3_1B))
    config = load_model_config(tmp_path)
    assert config.sliding_windows[4:7] == (512, None, 512)
    assert config.layer_ropes[4:7] == ("sliding_attention", "full_attention", "sliding_attention")
    assert (config.attention_scale, config.attn_logit_softcap, config.final_logit_softcap) == (256**-0.5, 0.0, 0.0)
    assert (config.qk_norm, config.sandwich_norms, config.norm_weight_offset) == (True, True, 1.0)
    positions = torch.tensor([0, 5, 9000, 30_000])
    hf_rope = Gemma3RotaryEmbedding(AutoConfig.from_pretrained(tmp_path))
    for layer_type in ("sliding_attention", "full_attention"):
        cos, sin = RotaryEmbedding(config, torch.device("cpu"), layer_type).cos_sin(positions, torch.float32)
        hf_cos, hf_sin = hf_rope(torch.zeros(1, dtype=torch.float32), positions[None], layer_type)
        torch.testing.assert_close(cos[:, 0], hf_cos[0])
        torch.testing.assert_close(sin[:, 0], hf_sin[0])


def test_gemma_embedding_models_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GEMMA3_1B | {"use_bidirectional_attention": True}))
    from worker.model.config import load_model_config

    with pytest.raises(ModelLoadError, match="use_bidirectional_attention"):
        load_model_config(tmp_path)
