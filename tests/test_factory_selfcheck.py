"""Fast checks that the factory's files and the oracle behave as the server tests assume."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.gemma2.modeling_gemma2 import apply_rotary_pos_emb

from tests.model_factory import (
    ARCHITECTURES,
    BOS_ID,
    EOS_ID,
    SLIDING_WINDOW,
    STANDARD_ADAPTER_SPECS,
    UNK_ID,
    build_adapter,
    build_adapter_for_other_base,
    build_corrupt_adapter,
    build_dora_adapter,
    build_embedding_adapter,
    build_high_rank_adapter,
    build_modules_to_save_adapter,
    build_pickle_only_adapter,
    build_resized_vocab_adapter,
    build_tiny_model,
    build_truncated_adapter,
)
from tests.oracle import PeftOracle

# PEFT warns about exactly the situations some of these adapters exist to create.
pytestmark = [
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to True:UserWarning"),
    pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning"),
]

PROMPT = list(range(4, 44))  # 40 tokens: longer than Mistral's window of SLIDING_WINDOW


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Path]:
    """(arch, tie_word_embeddings) -> model directory."""
    root = tmp_path_factory.mktemp("models")
    return {
        (arch, tied): build_tiny_model(root / f"{arch}-tied{int(tied)}", arch, tie_word_embeddings=tied)
        for arch in ARCHITECTURES
        for tied in (False, True)
    }


@pytest.fixture(scope="session")
def llama_adapters(models: dict[tuple[str, bool], Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama-adapters")
    base = models["llama", False]
    return {name: build_adapter(base, root / name, spec) for name, spec in STANDARD_ADAPTER_SPECS.items()}


@pytest.fixture(scope="session")
def llama_oracle(models: dict[tuple[str, bool], Path], llama_adapters: dict[str, Path]) -> PeftOracle:
    return PeftOracle(models["llama", False], llama_adapters)


@pytest.fixture(scope="session")
def mistral_oracle(models: dict[tuple[str, bool], Path], tmp_path_factory: pytest.TempPathFactory) -> PeftOracle:
    root = tmp_path_factory.mktemp("mistral-adapters")
    base = models["mistral", True]
    names = ("qv_r8", "all_linear")
    return PeftOracle(base, {name: build_adapter(base, root / name, STANDARD_ADAPTER_SPECS[name]) for name in names})


def _tensor_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def _adapter_config(adapter_dir: Path) -> dict[str, object]:
    return json.loads((adapter_dir / "adapter_config.json").read_text())


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_model_loads_and_matches_tokenizer(models: dict[tuple[str, bool], Path], arch: str, tied: bool) -> None:
    model_dir = models[arch, tied]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = model.config
    assert config.tie_word_embeddings is tied
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert len(tokenizer) <= config.vocab_size
    assert ("lm_head.weight" in load_file(model_dir / "model.safetensors")) is not tied
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    assert all(not torch.equal(p, torch.ones_like(p)) for p in norms)
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias.abs().min() > 0
    if arch == "qwen3":
        assert config.head_dim * config.num_attention_heads != config.hidden_size
    if arch.startswith("gemma"):
        assert_soft_caps_bite(model)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0]
    assert torch.isfinite(logits).all()
    assert logits.std(dim=-1).min() > 0.05  # not a flat distribution


def assert_soft_caps_bite(model: torch.nn.Module) -> None:
    """The raw logits, and attention scores where capped, reach beyond Gemma's soft caps."""
    config = model.config
    with torch.no_grad():
        outputs = model.model(torch.tensor([PROMPT]))
        assert model.lm_head(outputs.last_hidden_state).abs().max() > config.final_logit_softcapping
        if config.attn_logit_softcapping is None:
            return
        # Layer 0's scores, as its attention computes them before capping.
        attention = model.model.layers[0].self_attn
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor([PROMPT])))
        q, k = (proj(hidden).view(1, len(PROMPT), -1, attention.head_dim).transpose(1, 2)
                for proj in (attention.q_proj, attention.k_proj))
        cos, sin = model.model.rotary_emb(hidden, torch.arange(len(PROMPT))[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = q @ k.transpose(2, 3) * attention.scaling
        assert scores.abs().max() > config.attn_logit_softcapping


def test_sharded_model_equals_unsharded(models: dict[tuple[str, bool], Path], tmp_path: Path) -> None:
    sharded = build_tiny_model(tmp_path, "llama", shard=True)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) >= 2
    merged = {k: v for f in shard_files for k, v in load_file(sharded / f).items()}
    single = load_file(models["llama", False] / "model.safetensors")
    assert merged.keys() == single.keys()
    assert all(torch.equal(merged[k], single[k]) for k in single)


def test_bfloat16_model(tmp_path: Path) -> None:
    model_dir = build_tiny_model(tmp_path, "qwen3", dtype="bfloat16")
    assert {t.dtype for t in load_file(model_dir / "model.safetensors").values()} == {torch.bfloat16}
    assert AutoConfig.from_pretrained(model_dir).dtype == torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([PROMPT])).logits).all()


def test_tokenizer_round_trips_and_chats(models: dict[tuple[str, bool], Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(models["llama", False])
    text = "Hello, world!\n\tThe naïve café — 日本語 🙂 costs 42 €."
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == BOS_ID
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert UNK_ID in tokenizer("a\x01b")["input_ids"]  # control bytes are not in the alphabet
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert chat == "<s>user: Hi</s>\nassistant: Hello</s>\nassistant: "
    assert tokenizer(chat, add_special_tokens=False)["input_ids"].count(EOS_ID) == 2


@pytest.mark.parametrize("name", STANDARD_ADAPTER_SPECS)
def test_adapter_config_states_spec(llama_adapters: dict[str, Path], name: str) -> None:
    spec = STANDARD_ADAPTER_SPECS[name]
    config = _adapter_config(llama_adapters[name])
    assert config["r"] == spec.rank
    assert config["lora_alpha"] == spec.alpha
    assert config["target_modules"] == spec.target_modules
    assert config["use_rslora"] == spec.use_rslora
    assert config["rank_pattern"] == spec.rank_pattern
    assert config["alpha_pattern"] == spec.alpha_pattern
    assert config["fan_in_fan_out"] == spec.fan_in_fan_out
    assert config["layers_to_transform"] == spec.layers_to_transform
    assert not config["use_dora"]


@pytest.mark.parametrize("name", STANDARD_ADAPTER_SPECS)
def test_adapter_changes_logits(llama_oracle: PeftOracle, name: str) -> None:
    delta = llama_oracle.logits(PROMPT, name) - llama_oracle.logits(PROMPT, None)
    assert delta.abs().max() > 0.05


def test_patterns_shape_the_tensors(llama_adapters: dict[str, Path]) -> None:
    prefix = "base_model.model.model.layers"
    layer1 = _tensor_shapes(llama_adapters["layer1_only"])
    assert layer1 and all(k.startswith(f"{prefix}.1.") for k in layer1)
    patterned = _tensor_shapes(llama_adapters["rank_alpha_pattern"])
    assert patterned[f"{prefix}.0.self_attn.k_proj.lora_A.weight"] == (2, 64)
    assert patterned[f"{prefix}.1.self_attn.q_proj.lora_A.weight"] == (12, 64)
    assert patterned[f"{prefix}.0.self_attn.q_proj.lora_A.weight"] == (8, 64)
    bf16 = load_file(llama_adapters["bf16_qv"] / "adapter_model.safetensors")
    assert {t.dtype for t in bf16.values()} == {torch.bfloat16}


@pytest.mark.parametrize(
    ("oracle_name", "adapters"),
    [
        ("llama_oracle", ["qv_r8", None, "rank_alpha_pattern", "qv_r8", "layer1_only", "all_linear"]),
        ("mistral_oracle", ["all_linear", None, "qv_r8"]),
    ],
)
def test_mixed_batch_matches_per_sequence(
    request: pytest.FixtureRequest, oracle_name: str, adapters: list[str | None]
) -> None:
    oracle: PeftOracle = request.getfixturevalue(oracle_name)
    seqs = [PROMPT[: 40 - 7 * i] for i in range(len(adapters))]  # lengths 40, 33, 26, ...
    for seq, adapter, batched in zip(seqs, adapters, oracle.batch_logits(seqs, adapters)):
        torch.testing.assert_close(batched, oracle.logits(seq, adapter), atol=1e-5, rtol=0)


def test_sliding_window_matters(models: dict[tuple[str, bool], Path]) -> None:
    windowed = PeftOracle(models["mistral", False]).logits(PROMPT, None)
    full = AutoModelForCausalLM.from_pretrained(models["mistral", False], sliding_window=None)
    with torch.no_grad():
        unwindowed = full(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(windowed[:SLIDING_WINDOW], unwindowed[:SLIDING_WINDOW], atol=1e-5, rtol=0)
    assert (windowed[-1] - unwindowed[-1]).abs().max() > 1e-3


def test_assert_teacher_forced(llama_oracle: PeftOracle) -> None:
    prompt, generated = PROMPT[:10], []
    for _ in range(8):
        generated.append(int(llama_oracle.logits(prompt + generated, "qv_r8")[-1].argmax()))
    llama_oracle.assert_teacher_forced(prompt, generated, "qv_r8", atol=1e-6)
    worst = int(llama_oracle.logits(prompt + generated[:3], "qv_r8")[-1].argmin())
    with pytest.raises(AssertionError, match="generated token 3 .* reference argmax"):
        llama_oracle.assert_teacher_forced(prompt, generated[:3] + [worst], "qv_r8", atol=1e-3)


def _check_dora(d: Path) -> None:
    assert _adapter_config(d)["use_dora"]
    assert any(k.endswith(".lora_magnitude_vector") for k in _tensor_shapes(d))


def _check_pickle_only(d: Path) -> None:
    assert (d / "adapter_model.bin").is_file()
    assert not (d / "adapter_model.safetensors").exists()


def _check_unreadable(d: Path) -> None:
    with pytest.raises(SafetensorError):
        load_file(d / "adapter_model.safetensors")


def _check_embedding(d: Path) -> None:
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in _tensor_shapes(d)


def _check_lm_head(d: Path) -> None:
    assert "base_model.model.lm_head.lora_A.weight" in _tensor_shapes(d)


def _check_resized_vocab(d: Path) -> None:
    shapes = _tensor_shapes(d)
    assert shapes["base_model.model.model.embed_tokens.lora_embedding_A"] == (8, 272)
    assert shapes["base_model.model.lm_head.lora_B.weight"] == (272, 8)


def _check_modules_to_save(d: Path) -> None:
    assert _tensor_shapes(d)["base_model.model.lm_head.weight"] == (256, 64)


def _check_other_base(d: Path) -> None:
    assert _tensor_shapes(d)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == (8, 96)


def _check_high_rank(d: Path) -> None:
    assert _adapter_config(d)["r"] == 128


BAD_ADAPTERS: dict[str, tuple[Callable[[Path, Path], Path], Callable[[Path], None]]] = {
    "dora": (build_dora_adapter, _check_dora),
    "pickle_only": (build_pickle_only_adapter, _check_pickle_only),
    "truncated": (build_truncated_adapter, _check_unreadable),
    "corrupt": (build_corrupt_adapter, _check_unreadable),
    "embedding": (build_embedding_adapter, _check_embedding),
    "lm_head": (lambda m, o: build_embedding_adapter(m, o, target="lm_head"), _check_lm_head),
    "modules_to_save": (build_modules_to_save_adapter, _check_modules_to_save),
    "resized_vocab": (build_resized_vocab_adapter, _check_resized_vocab),
    "other_base": (build_adapter_for_other_base, _check_other_base),
    "high_rank": (lambda m, o: build_high_rank_adapter(m, o, 128), _check_high_rank),
}


@pytest.mark.parametrize("name", BAD_ADAPTERS)
def test_bad_adapter(models: dict[tuple[str, bool], Path], tmp_path: Path, name: str) -> None:
    build, check = BAD_ADAPTERS[name]
    assert build(models["llama", False], tmp_path / name) == tmp_path / name
    check(tmp_path / name)
