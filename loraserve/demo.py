"""The built-in demo: a tiny random Llama model, a byte-level tokenizer and three adapters.

Made locally on first use (no downloads) in `$LORASERVE_HOME/demo-v1` (by default
`~/.cache/loraserve/demo-v1`), so `loraserve serve` with no arguments works on a fresh
machine; that directory is also the demo's adapter root. Tests build their own models from
the same tokenizer.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from loraserve.synthetic import PARENT_MODULE, LayerShapes, write_random_adapter

DEMO_VERSION = "v1"
DEMO_MODEL_NAME = "loraserve-demo"  # the base model's name in the APIs
TOKENIZER_VOCAB_SIZE = 256
DEMO_CONTEXT = 1024
DEMO_ADAPTERS = {
    "demo-qv": dict(rank=8, alpha=16, modules=("q_proj", "v_proj"), seed=1),
    "demo-all": dict(rank=16, alpha=16, modules=("q_proj", "k_proj", "v_proj", "o_proj",
                                                   "gate_proj", "up_proj", "down_proj"), seed=2),
    "demo-mlp": dict(rank=4, alpha=8, modules=("gate_proj", "up_proj", "down_proj"), seed=3),
}

# Special tokens take ids 0..3 in this order; the model configs use the same ids.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(len(SPECIAL_TOKENS))

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. A server answers many requests at once, "
    "and each request may ask for a different adapter. The model reads the prompt, writes "
    "one token after another, and stops at the end of the sentence or when it has written "
    "enough. Hello, world! How are you today? I am fine, thank you. What is the weather "
    "like in the city? It is sunny and warm, with a light wind from the sea. Numbers such "
    "as 0, 1, 2, 3, 4, 5, 6, 7, 8 and 9 appear in text too, as do names like Alice and Bob. "
    "She said that the answer was forty two; he did not believe her, but it was true. "
    "In the beginning there was the word, and the word was tokenized into bytes. "
)


@dataclass(frozen=True)
class DemoAssets:
    root: Path  # the demo's own directory (its adapter root)
    model_dir: Path
    adapters: dict[str, Path]


def default_cache_dir() -> Path:
    base = os.environ.get("LORASERVE_HOME") or Path.home() / ".cache" / "loraserve"
    return Path(base) / f"demo-{DEMO_VERSION}"


def ensure_demo(cache_dir: Path | None = None) -> DemoAssets:
    """Builds the demo once (atomically) and returns where it is."""
    root = cache_dir or default_cache_dir()
    if not (root / "complete").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=".demo-"))
        _build_demo(staging)
        (staging / "complete").write_text(DEMO_VERSION)
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
    return DemoAssets(root, root / "model", {name: root / "adapters" / name for name in DEMO_ADAPTERS})


def _build_demo(root: Path) -> None:
    model_dir = root / "model"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=TOKENIZER_VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=DEMO_CONTEXT,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(model_dir)
    build_tokenizer(model_dir, max_length=DEMO_CONTEXT)
    shapes = _layer_shapes(model)
    for name, spec in DEMO_ADAPTERS.items():
        write_random_adapter(root / "adapters" / name, shapes, rank=spec["rank"], alpha=spec["alpha"],
                             modules=spec["modules"], dtype=torch.float32, seed=spec["seed"], std=0.05)


def _layer_shapes(model: LlamaForCausalLM) -> LayerShapes:
    """Each targetable projection's (in, out) features, read off the model's first layer."""
    layer = model.model.layers[0]
    shapes = {name: (module.in_features, module.out_features)
              for name, parent in PARENT_MODULE.items() for module in [getattr(getattr(layer, parent), name)]}
    return LayerShapes(len(model.model.layers), shapes)


def build_tokenizer(out_dir: Path, max_length: int) -> None:
    """Write a byte-level BPE tokenizer (at most TOKENIZER_VOCAB_SIZE tokens) with a chat template.

    The alphabet is every byte that occurs in valid UTF-8 text except control characters
    other than tab, newline and carriage return: 213 bytes, leaving room for 4 special tokens
    and 39 merges. So any such text round-trips exactly, multi-byte characters included;
    an uncovered byte encodes to <unk>.
    """
    byte_to_char = bytes_to_unicode()
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=[byte_to_char[b] for b in _utf8_text_bytes()],
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS], trainer=trainer)
    # Like Llama: plain encoding starts with <s>; the chat template writes its own.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", BOS_ID)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,  # would alter spaces and break round trips
    ).save_pretrained(out_dir)


def _utf8_text_bytes() -> list[int]:
    printable_ascii = [0x09, 0x0A, 0x0D, *range(0x20, 0x7F)]
    continuation = range(0x80, 0xC0)
    leading = range(0xC2, 0xF5)  # 0xC0, 0xC1 and 0xF5.. never occur in valid UTF-8
    return [*printable_ascii, *continuation, *leading]
