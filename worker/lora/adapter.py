"""Reading and validating PEFT LoRA adapter directories without loading their weights.

Validation reads adapter_config.json and the safetensors header only, so registering an
adapter is cheap and every reason it cannot be served is reported before any load.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from safetensors import SafetensorError, safe_open

from worker.errors import (
    AdapterConfigMismatchError,
    AdapterNotFoundError,
    AdapterRankError,
    AdapterShapeError,
    CorruptAdapterError,
    PickleRefusedError,
    UnsupportedAdapterError,
)
from worker.lora.peft_config import (
    VOCAB_MODULES,
    alpha,
    check_config,
    check_saved_modules,
    check_vocab_targets,
    expected_rank,
    module_path,
    scaling,
    selected_modules,
    selection_fields,
    vocab_layer,
)
from worker.lora.vocab import LoraShapes, lora_shapes
from worker.model.config import ModelConfig, module_parent

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
# What PEFT saves ("base_model.model." + module path), also without that prefix or with the
# adapter name "default" before ".weight", as some trainers write them. DoRA's magnitude is
# saved as "lora_magnitude_vector" (older PEFT in memory: "lora_magnitude_vector.default.weight").
_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\."
    r"lora_(?:([AB])(?:\.default)?\.weight|(magnitude)_vector(?:\.default)?(?:\.weight)?)$"
)
# LoRA on the vocabulary modules: the embedding's `lora_embedding_A` [r, vocab] and
# `lora_embedding_B` [hidden, r] (nn.Parameters: no ".weight"; ".default" in memory), the LM
# head's lora_A/lora_B like any linear module's.
_VOCAB_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.(embed_tokens)\.lora_embedding_([AB])(?:\.default)?"
    r"|(lm_head)\.lora_([AB])(?:\.default)?\.weight)$"
)
# The base weights PEFT saves beside a vocabulary module's LoRA (save_embedding_layers): PEFT loads them
# over the base model's, so they must be the base model's; only their shape is checked (it reveals a
# resized vocabulary), as reading them whole would cost a vocabulary-sized read per registration.
_VOCAB_BASE_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.(embed_tokens)|(lm_head))\.base_layer\.weight$")
# A module_to_save's replacement table ([vocab, hidden], as the base weight), as PEFT saves it: the
# module's path and ".weight", with or without the "base_model.model." prefix.
_SAVED_MODULE_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.(embed_tokens)|(lm_head))\.weight$")
MAGNITUDE = "magnitude"


@dataclass(frozen=True)
class LoraTarget:
    """One adapted linear module of one layer: delta(x) = scaling * (x @ A.T) @ B.T.

    With DoRA, the module's output (bias aside) and delta are rescaled per output feature
    by magnitude / ||W + scaling * B @ A|| (row norms).

    A LoRA on one of Phi-3's fused modules (qkv_proj, gate_up_proj) is one target per engine
    module (q/k/v, gate/up): the same A, and `rows` of B and of the magnitude. The fused delta's
    rows are exactly the parts' deltas, and DoRA's norms are per row, so the split is exact."""

    layer: int
    module: str
    rank: int
    alpha: float
    scaling: float
    a_key: str  # safetensors key of A, shape [rank, in_features]
    b_key: str  # safetensors key of B, shape [out_features (of the checkpoint module), rank]
    checkpoint_module: str  # the module as the adapter names it: `module`, or the fused one holding it
    magnitude_key: str | None = None  # DoRA only: safetensors key of the magnitude, shape [out_features]
    rows: tuple[int, int] | None = None  # [start, stop) of a fused module's B and magnitude; None: all rows


@dataclass(frozen=True)
class SavedModule:
    """A vocabulary module PEFT's modules_to_save replaces: the adapter's whole table [vocab, hidden]."""

    module: str  # embed_tokens or lm_head
    key: str  # its safetensors key


@dataclass(frozen=True)
class FileFingerprint:
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class AdapterManifest:
    """A validated adapter: where its tensors are and how to scale them."""

    path: Path
    targets: tuple[LoraTarget, ...]
    max_rank: int
    fingerprint: FileFingerprint
    saved: tuple[SavedModule, ...] = ()  # modules_to_save's tables, the embedding's first

    @property
    def saved_modules(self) -> frozenset[str]:
        """The vocabulary modules it replaces (modules_to_save): it needs a saved-module slot."""
        return frozenset(s.module for s in self.saved)

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def modules(self) -> frozenset[str]:
        """The engine modules it adapts (Phi-3's fused ones split), which the slots must hold."""
        return frozenset(t.module for t in self.targets)

    @property
    def target_modules(self) -> frozenset[str]:
        """The modules it adapts by the adapter's own names (Phi-3's fused ones), for the API."""
        return frozenset(t.checkpoint_module for t in self.targets)

    @property
    def ranks(self) -> list[int]:
        """Every rank its modules have, ascending (rank_pattern may give several)."""
        return sorted({t.rank for t in self.targets})

    @property
    def alphas(self) -> list[float]:
        """Every lora_alpha its modules have, ascending (alpha_pattern may give several)."""
        return sorted({t.alpha for t in self.targets})

    @property
    def dora(self) -> bool:
        return any(t.magnitude_key is not None for t in self.targets)

    def nbytes(self, model: ModelConfig | LoraShapes, element_size: int) -> int:
        """What staging the adapter takes: A, B.T and DoRA's magnitudes. An adapter of the
        vocabulary modules or replacement tables needs `model` to be `LoraShapes`, which has their
        shapes (this rank's vocabulary rows)."""
        shapes = model.module_shapes()
        tables = 0
        if self.saved:
            vocab, hidden = shapes["embed_tokens"]  # both tables are [vocab, hidden], as the embedding
            tables = len(self.saved) * vocab * hidden
        return (sum(_target_numel(t, *shapes[t.module]) for t in self.targets) + tables) * element_size


def _target_numel(target: LoraTarget, in_features: int, out_features: int) -> int:
    magnitude = out_features if target.magnitude_key is not None else 0
    return target.rank * (in_features + out_features) + magnitude


def read_adapter_manifest(path: str | Path, model: ModelConfig, max_lora_rank: int) -> AdapterManifest:
    directory = Path(path)
    config = _read_config(directory)
    check_config(config, directory, model)
    check_vocab_targets(config, model.tie_word_embeddings)
    saved_modules = check_saved_modules(config, model.tie_word_embeddings)
    weights = _weights_file(directory)
    targets, saved = _read_targets(weights, config, model, saved_modules)
    max_rank = max((t.rank for t in targets), default=0)
    if max_rank > max_lora_rank:
        raise AdapterRankError(f"adapter {directory} has rank {max_rank}, above max_lora_rank {max_lora_rank}")
    stat = weights.stat()
    return AdapterManifest(directory, targets, max_rank, FileFingerprint(stat.st_size, stat.st_mtime_ns), saved)


def _read_config(directory: Path) -> dict:
    if not directory.is_dir():
        raise AdapterNotFoundError(f"adapter directory {directory} does not exist")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterNotFoundError(f"{directory} has no {CONFIG_FILE}: not a PEFT adapter directory")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptAdapterError(f"{config_path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise CorruptAdapterError(f"{config_path} must hold a JSON object")
    return config


def _weights_file(directory: Path) -> Path:
    weights = directory / WEIGHTS_FILE
    if weights.is_file():
        return weights
    pickled = [name for name in PICKLE_WEIGHTS_FILES if (directory / name).is_file()]
    if pickled:
        raise PickleRefusedError(
            f"{directory} holds only {pickled[0]}, a pickle file; loading pickles can run arbitrary code, "
            f"so only {WEIGHTS_FILE} is accepted (convert it with safetensors)"
        )
    raise AdapterNotFoundError(f"{directory} has no {WEIGHTS_FILE}")


def _read_targets(weights: Path, config: dict, model: ModelConfig, saved_modules: frozenset[str]
                  ) -> tuple[tuple[LoraTarget, ...], tuple[SavedModule, ...]]:
    shapes = _header_shapes(weights)
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    saved: dict[str, str] = {}
    for key in shapes:
        if _is_vocab_base_weight(key, shapes[key], model):
            continue
        module = _saved_module(key, shapes[key], model)
        if module is not None:
            if module in saved:
                raise CorruptAdapterError(f"{weights} holds the {module} table twice: {saved[module]!r} and {key!r}")
            saved[module] = key
            continue
        layer, module, which = _parse_key(key, model)
        pair = pairs.setdefault((layer, module), {})
        if which in pair:
            raise CorruptAdapterError(f"{weights} holds lora_{which} of {module_path(layer, module)} twice: "
                                      f"{pair[which]!r} and {key!r}")
        pair[which] = key
    if not pairs and not saved:
        raise CorruptAdapterError(f"{weights} holds no LoRA tensors")
    _check_saved_match_config(set(saved), saved_modules, weights)
    _check_tensors_match_config(set(pairs), config, model)
    _check_magnitudes_match_config(pairs, config, weights)
    targets = [part for (layer, module), keys in sorted(pairs.items())
               for part in _split(_target(layer, module, keys, shapes, config, model), model)]
    return tuple(targets), tuple(SavedModule(module, saved[module]) for module in VOCAB_MODULES if module in saved)


def _saved_module(key: str, shape: list[int], model: ModelConfig) -> str | None:
    """The vocabulary module a modules_to_save table replaces (None: not such a key); a table of
    another vocabulary or hidden size is refused."""
    match = _SAVED_MODULE_KEY.match(key)
    if match is None:
        return None
    module = match[1] or match[2]
    if len(shape) != 2 or shape[1] != model.hidden_size:
        raise AdapterShapeError(f"the {module} table {key!r} is {shape}, not [vocab, {model.hidden_size}]: is the "
                                "adapter for another base model?")
    if shape[0] != model.vocab_size:
        raise AdapterShapeError(
            f"the {module} table {key!r} covers a vocabulary of {shape[0]} tokens, the base model has "
            f"{model.vocab_size}: the adapter was trained with a resized vocabulary, which is not served")
    return module


def _check_saved_match_config(found: set[str], listed: frozenset[str], weights: Path) -> None:
    """The replacement tables must be exactly the modules modules_to_save lists."""
    for module in VOCAB_MODULES:
        if module in found and module not in listed:
            raise AdapterConfigMismatchError(
                f"{weights} holds a full {module} table, but the config's modules_to_save does not list it")
        if module in listed and module not in found:
            raise AdapterConfigMismatchError(
                f"the config's modules_to_save lists {module}, but {weights} holds no {module} table")


def _split(target: LoraTarget, model: ModelConfig) -> list[LoraTarget]:
    """A fused module's target as its engine modules' targets (the same target otherwise)."""
    if target.module in VOCAB_MODULES:
        return [target]
    parts = model.module_parts(target.module)
    if len(parts) == 1:
        return [target]
    return [replace(target, module=part, rows=(rows.start, rows.stop)) for part, rows in parts]


def _check_tensors_match_config(found: set[tuple[int, str]], config: dict, model: ModelConfig) -> None:
    """The tensors must be exactly the modules the config selects, as PEFT would load them."""
    selected = selected_modules(config, model)
    fields = " / ".join(selection_fields(config))
    if found - selected:
        path = module_path(*min(found - selected))
        raise AdapterConfigMismatchError(
            f"the weights hold LoRA tensors for {path}, which the config's {fields} do not select"
        )
    if selected - found:
        path = module_path(*min(selected - found))
        raise AdapterConfigMismatchError(
            f"the config's {fields} select {path}, but the weights hold no LoRA tensors for it"
        )


def _check_magnitudes_match_config(pairs: dict[tuple[int, str], dict[str, str]], config: dict,
                                   weights: Path) -> None:
    """DoRA (use_dora) needs a magnitude for every adapted module; plain LoRA has none."""
    dora = bool(config.get("use_dora"))
    for (layer, module), keys in sorted(pairs.items()):
        if (MAGNITUDE in keys) != dora:
            state = "lacks the lora_magnitude_vector" if dora else "holds a lora_magnitude_vector"
            raise AdapterConfigMismatchError(
                f"{weights}: {module_path(layer, module)} {state}, but the config's use_dora is {dora}"
            )


def _header_shapes(weights: Path) -> dict[str, list[int]]:
    try:
        with safe_open(weights, framework="pt") as tensors:
            return {key: tensors.get_slice(key).get_shape() for key in tensors.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise CorruptAdapterError(f"{weights} is not a readable safetensors file: {error}") from error


def _is_vocab_base_weight(key: str, shape: list[int], model: ModelConfig) -> bool:
    """A saved base embedding or LM head: skipped if it is the model's shape, refused otherwise."""
    match = _VOCAB_BASE_KEY.match(key)
    if match is None:
        return False
    expected = [model.vocab_size, model.hidden_size]
    if shape != expected:
        raise AdapterShapeError(
            f"tensor {key!r} is {shape}, not the base model's {expected}: the adapter was trained with a resized "
            f"vocabulary (or for another base model), which is not served"
        )
    return True


def _parse_key(key: str, model: ModelConfig) -> tuple[int, str, str]:
    vocab = _VOCAB_LORA_KEY.match(key)
    if vocab is not None:
        module = vocab[1] or vocab[3]
        return vocab_layer(module, model.num_layers), module, vocab[2] or vocab[4]
    match = _LORA_KEY.match(key)
    if match is None:
        raise UnsupportedAdapterError(
            f"tensor {key!r} is not a LoRA A/B weight of a supported module "
            f"({', '.join((*model.checkpoint_modules(), *VOCAB_MODULES))}); bias tensors are not served"
        )
    layer, parent, module, which = int(match[1]), match[2], match[3], match[4] or match[5]
    if module not in model.checkpoint_modules() or module_parent(module) != parent:
        raise UnsupportedAdapterError(f"tensor {key!r} targets {parent}.{module}, which cannot be served")
    if layer >= model.num_layers:
        raise AdapterShapeError(f"tensor {key!r} is for layer {layer}; the model has {model.num_layers} layers")
    return layer, module, which


def _target(layer, module, keys, shapes, config, model: ModelConfig) -> LoraTarget:
    if not {"A", "B"} <= set(keys):
        raise CorruptAdapterError(f"layer {layer} {module} has lora_{sorted(keys)[0]} without its pair")
    in_features, out_features = (lora_shapes(model).module_shapes()[module] if module in VOCAB_MODULES
                                 else model.checkpoint_module_shape(module))
    a_shape, b_shape = shapes[keys["A"]], shapes[keys["B"]]
    rank = a_shape[0] if len(a_shape) == 2 else -1
    if module in VOCAB_MODULES:
        _check_vocabulary(module, a_shape, b_shape, model)
    if a_shape != [rank, in_features] or b_shape != [out_features, rank] or rank <= 0:
        raise AdapterShapeError(
            f"layer {layer} {module}: A {a_shape} and B {b_shape} do not fit the base model "
            f"(expected [r, {in_features}] and [{out_features}, r]); is the adapter for another base model?"
        )
    config_rank, rank_field = expected_rank(config, layer, module)
    if rank != config_rank:
        raise AdapterConfigMismatchError(
            f"{module_path(layer, module)} has rank {rank} in the weights but {config_rank} from the config's "
            f"{rank_field}"
        )
    magnitude_key = keys.get(MAGNITUDE)
    if magnitude_key is not None and shapes[magnitude_key] != [out_features]:
        raise AdapterShapeError(f"layer {layer} {module}: lora_magnitude_vector {shapes[magnitude_key]} does not fit "
                                f"the base model (expected [{out_features}])")
    module_alpha = alpha(config, layer, module)
    return LoraTarget(layer, module, rank, module_alpha, scaling(config, module_alpha, rank), keys["A"], keys["B"],
                      module, magnitude_key)


def _check_vocabulary(module: str, a_shape: list[int], b_shape: list[int], model: ModelConfig) -> None:
    """The vocabulary side of an embedding's A [r, vocab] or an LM head's B [vocab, r]."""
    vocab = a_shape[-1] if module == "embed_tokens" else b_shape[0]
    if vocab != model.vocab_size:
        raise AdapterShapeError(
            f"{module}: LoRA A {a_shape} and B {b_shape} cover a vocabulary of {vocab} tokens, the base model has "
            f"{model.vocab_size}: the adapter was trained with a resized vocabulary, which is not served"
        )
