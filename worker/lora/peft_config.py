"""What each adapter_config.json field means for serving, and PEFT's rules for applying them.

Every field PEFT (0.4 to today) or a common trainer writes falls in one of three groups:
inert (it does not change the forward pass of saved weights), applied (it does, and the
server follows PEFT's own rules for it), or refused (it does, and the server cannot serve it).
Fields in none of the groups are newer than this table: they are ignored with a warning, so
a PEFT upgrade does not make every new adapter unservable.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from pathlib import Path

from worker.errors import CorruptAdapterError, UnsupportedAdapterError
from worker.model.config import FUSED_MODULES, ModelConfig, module_parent

log = logging.getLogger("loraserve.worker")

# The linear modules of either layout: the Llama family's, and Phi-3's fused ones.
LINEAR_MODULES = frozenset(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                            *FUSED_MODULES))

# Training, initialisation, provenance and bookkeeping: the saved A and B already hold their effect.
# use_qalora only changes GPTQ-quantised layers, which this server does not load.
# velora_config and monteclora_config only change the training-time forward.
INERT_FIELDS = frozenset({
    "peft_type", "task_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision",
    "inference_mode", "lora_dropout", "merge_weights", "fan_in_fan_out", "init_lora_weights",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_config", "megatron_core",
    "runtime_config", "use_qalora", "qalora_group_size", "velora_config", "monteclora_config",
    "ensure_weight_tying",  # inert unless it ties an embedding LoRA to the LM head: see check_vocab_targets
})


def _is_set(value: object) -> bool:
    return value is not None


def _is_truthy(value: object) -> bool:
    return bool(value)


def _is_bias(value: object) -> bool:
    return value not in (None, "none")


# field -> (does this value need an unsupported feature?, what the feature does to the forward pass)
# A variant's sub-config turns the variant on even when empty ({}), so any value but null is refused.
REFUSED_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "bias": (_is_bias, "it trains biases that are added to the base outputs"),
    "lora_bias": (_is_truthy, "lora_B carries a trained bias"),
    "layer_replication": (_is_set, "it stacks copies of base layers into a deeper model"),
    "trainable_token_indices": (_is_truthy, "it replaces rows of the token embedding"),
    "target_parameters": (_is_truthy, "it adapts raw parameters (e.g. MoE experts), not linear modules"),
    "enable_lora": (_is_set, "it is the old fused-qkv MergedLinear layout"),
    "alora_invocation_tokens": (_is_set, "activated LoRA applies only after its invocation tokens"),
    "use_bdlora": (_is_set, "BD-LoRA uses block-diagonal A or B"),
    "arrow_config": (_is_set, "Arrow routes each token between several LoRA experts"),
    "kasa_config": (_is_set, "KaSA inserts a learned singular-value diagonal between A and B"),
}

_ALL_LINEAR = "all-linear"
# PEFT's default target_modules for llama, mistral, qwen2, qwen3, gemma2 and gemma3_text when the config
# names none (PEFT has none for phi3: it refuses such a config).
_DEFAULT_TARGETS = ["q_proj", "v_proj"]
# The vocabulary modules and their paths in the base model. Their LoRA travels with a layer's copies
# (worker/lora/slots.py): the embedding's with layer 0's, the LM head's with the last layer's.
VOCAB_PATHS = {"embed_tokens": "model.embed_tokens", "lm_head": "lm_head"}
VOCAB_MODULES = tuple(VOCAB_PATHS)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_names_or_regex(value: object) -> bool:
    return isinstance(value, str) or isinstance(value, list) and all(isinstance(n, str) for n in value)


# The fields that change the math and are applied as PEFT does -> (what the value must be, check); a value of another type would otherwise
# surface as a TypeError deep in the matching instead of a refusal naming the field.
_APPLIED_FIELD_TYPES: dict[str, tuple[str, Callable[[object], bool]]] = {
    "r": ("a positive integer", lambda v: _is_int(v) and v > 0),
    "lora_alpha": ("a number", _is_number),
    "use_rslora": ("true or false", lambda v: isinstance(v, bool)),
    "use_dora": ("true or false", lambda v: isinstance(v, bool)),
    "rank_pattern": ("an object of regex -> rank",
                     lambda v: isinstance(v, dict) and all(_is_int(r) and r > 0 for r in v.values())),
    "alpha_pattern": ("an object of regex -> alpha",
                      lambda v: isinstance(v, dict) and all(_is_number(a) for a in v.values())),
    "target_modules": ("a list of names or a regex", _is_names_or_regex),
    "exclude_modules": ("a list of names or a regex", _is_names_or_regex),
    "layers_to_transform": ("a layer index or a list of them",
                            lambda v: _is_int(v) or isinstance(v, list) and all(_is_int(i) for i in v)),
    "layers_pattern": ("a name or a list of names", _is_names_or_regex),
    "modules_to_save": ("a list of module names", lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v)),
}
APPLIED_FIELDS = frozenset(_APPLIED_FIELD_TYPES)


def check_config(config: dict, directory: Path, model: ModelConfig) -> None:
    """Refuse what cannot be served, naming the field; warn once about fields unknown here."""
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise UnsupportedAdapterError(f"peft_type {peft_type!r} is not supported; only LORA adapters are")
    for field, (unsupported, why) in REFUSED_FIELDS.items():
        if unsupported(config.get(field)):
            raise UnsupportedAdapterError(f"{field}={config[field]!r} is not supported: {why} ({directory})")
    _check_types(config)
    _check_servable_targets(config, model)
    unknown = sorted(set(config) - INERT_FIELDS - APPLIED_FIELDS - set(REFUSED_FIELDS))
    if unknown:
        log.warning("adapter %s: ignoring adapter_config.json fields unknown to this server: %s",
                    directory, ", ".join(unknown))


def _check_types(config: dict) -> None:
    for field, (expected, valid) in _APPLIED_FIELD_TYPES.items():
        value = config.get(field)
        if value is not None and not valid(value):
            raise CorruptAdapterError(f"adapter_config.json field {field} must be {expected}, not {value!r}")


def _check_servable_targets(config: dict, model: ModelConfig) -> None:
    targets = config.get("target_modules")
    supported = ", ".join(model.checkpoint_modules())
    if targets is None and model.fused_projections:
        raise UnsupportedAdapterError(f"target_modules is unset, and PEFT has no default for {model.architecture}: "
                                      f"name the modules ({supported})")
    if not isinstance(targets, list):
        return
    # Modules of the other layout (q_proj on Phi-3, qkv_proj on Llama): an adapter for another model.
    absent = [t for t in targets if t.split(".")[-1] in LINEAR_MODULES - set(model.checkpoint_modules())]
    if absent:
        raise UnsupportedAdapterError(
            f"target_modules {absent} name modules {model.architecture} does not have; its linear modules "
            f"are {supported}"
        )


def saved_modules(config: dict) -> frozenset[str]:
    """The vocabulary modules `modules_to_save` replaces with full tables of the adapter's own.

    PEFT wraps every module whose path ends with a listed name; only the embedding and the LM head
    are served (a listed name must be `embed_tokens`, `lm_head` or a path ending in one of them)."""
    names = config.get("modules_to_save") or []
    modules = set()
    for name in names:
        module = next((m for m, path in VOCAB_PATHS.items() if path == name or path.endswith(f".{name}")), None)
        if module is None:
            raise UnsupportedAdapterError(
                f"modules_to_save names {name!r}, which is not served: only embed_tokens and lm_head may be "
                f"replaced per adapter")
        modules.add(module)
    return frozenset(modules)


def check_saved_modules(config: dict, tied_embeddings: bool) -> frozenset[str]:
    """`saved_modules`, refusing what has no path: a module both replaced and given a LoRA (PEFT's
    result depends on its wrapping order), and ensure_weight_tying on tied embeddings (PEFT may then
    make the LM head follow the replaced embedding, which the weights do not say)."""
    saved = saved_modules(config)
    lora = [m for m in sorted(saved) if _peft_selects_vocab(config, VOCAB_PATHS[m])]
    if lora:
        raise UnsupportedAdapterError(f"modules_to_save and target_modules both reach {lora}: a module is either "
                                      "replaced or given a LoRA, not both")
    if saved and config.get("ensure_weight_tying") and tied_embeddings:
        raise UnsupportedAdapterError(
            f"ensure_weight_tying=true with modules_to_save {sorted(saved)} on a model with tied embeddings is not "
            "supported: PEFT may then tie the LM head's table to the embedding's, which this server does not model")
    return saved


def vocab_layer(module: str, num_layers: int) -> int:
    """The layer whose copies carry a vocabulary module's LoRA: the first for the embedding, the
    last for the LM head, so the per-layer load events cover them."""
    return 0 if module == "embed_tokens" else num_layers - 1


def module_path(layer: int, module: str) -> str:
    """The module's name in the base model, which PEFT matches its config patterns against."""
    if module in VOCAB_PATHS:
        return VOCAB_PATHS[module]
    return f"model.layers.{layer}.{module_parent(module)}.{module}"


def selected_modules(config: dict, model: ModelConfig) -> set[tuple[int, str]]:
    """The (layer, module) pairs PEFT puts a LoRA on for this config, by the model's module names
    (Phi-3's fused ones); vocabulary modules under the layer whose copies carry them."""
    linear = {(layer, module) for layer in range(model.num_layers) for module in model.checkpoint_modules()
              if _peft_selects(config, module_path(layer, module))}
    vocab = {(vocab_layer(module, model.num_layers), module) for module in VOCAB_MODULES
             if _peft_selects_vocab(config, VOCAB_PATHS[module])}
    return linear | vocab


def selection_fields(config: dict) -> list[str]:
    """The config fields that decided `selected_modules`, for error messages."""
    fields = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")
    return [field for field in fields if config.get(field) not in (None, [], "")] or ["target_modules (unset)"]


def _peft_selects_vocab(config: dict, path: str) -> bool:
    """As for a linear module, except that "all-linear" leaves out the embedding (not linear) and
    the output layer, and the default targets name neither."""
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets.lower() == _ALL_LINEAR:
        return False
    return _peft_selects(config, path)


def check_vocab_targets(config: dict, tied_embeddings: bool) -> None:
    """Refuses what has no path on the vocabulary modules: DoRA, and PEFT's ensure_weight_tying on a
    model with tied embeddings, which moves a LoRA on the LM head to the embedding and gives the LM
    head the embedding's LoRA transposed (peft.tuners.lora.model, tied_adapter: A = embedding B.T,
    B = embedding A.T), a delta the weights do not hold. Elsewhere ensure_weight_tying does nothing."""
    targeted = [module for module, path in VOCAB_PATHS.items() if _peft_selects_vocab(config, path)]
    if not targeted:
        return
    if config.get("use_dora"):
        raise UnsupportedAdapterError(f"use_dora=true with target_modules reaching {targeted} is not supported: "
                                      "DoRA is served on the decoder layers' linear modules only")
    if config.get("ensure_weight_tying") and tied_embeddings:
        raise UnsupportedAdapterError(
            f"ensure_weight_tying=true with target_modules reaching {targeted} on a model with tied embeddings "
            "is not supported: PEFT then ties the LM head's LoRA to the embedding's transposed, a delta this "
            "server does not compute"
        )


def _peft_selects(config: dict, path: str) -> bool:
    """peft.tuners.tuners_utils.check_target_module_exists, for one linear module."""
    if _excluded(config.get("exclude_modules"), path):
        return False
    targets = config.get("target_modules")
    if targets is None:
        targets = _DEFAULT_TARGETS
    if isinstance(targets, str):
        # "all-linear" is every linear module but the output layer: all servable modules.
        return targets.lower() == _ALL_LINEAR or _fullmatch("target_modules", targets, path)
    if path in targets:
        return True  # a full path ignores layers_to_transform, as in PEFT
    return any(path.endswith(f".{target}") for target in targets) and _layer_selected(config, path)


def _excluded(exclude: str | list[str] | None, path: str) -> bool:
    if not exclude:
        return False
    if isinstance(exclude, str):
        return _fullmatch("exclude_modules", exclude, path)
    return path in exclude or any(path.endswith(f".{name}") for name in exclude)


def _layer_selected(config: dict, path: str) -> bool:
    indexes = config.get("layers_to_transform")
    if indexes is None or indexes == []:
        return True
    patterns = config.get("layers_pattern") or []
    if isinstance(patterns, str):
        patterns = [patterns]
    # PEFT takes the first numbered path segment, or the one after a layers_pattern name.
    regexes = [rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\." for pattern in patterns] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
    match = next((m for m in (_match("layers_pattern", r, path) for r in regexes) if m), None)
    if match is None:
        return False
    index = int(match["idx"])
    return index == indexes if isinstance(indexes, int) else index in indexes


def expected_rank(config: dict, layer: int, module: str) -> tuple[int, str]:
    """PEFT's rank for the module and the field it comes from (rank_pattern or r)."""
    return _pattern_value(config, "rank_pattern", module_path(layer, module), "r", 8)


def alpha(config: dict, layer: int, module: str) -> float:
    """PEFT's lora_alpha for the module: alpha_pattern's, else lora_alpha."""
    value, _ = _pattern_value(config, "alpha_pattern", module_path(layer, module), "lora_alpha", 8)
    return value


def scaling(config: dict, module_alpha: float, rank: int) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rslora."""
    return module_alpha / math.sqrt(rank) if config.get("use_rslora") else module_alpha / rank


def _pattern_value(
    config: dict, pattern_field: str, path: str, default_field: str, default: int
) -> tuple[float, str]:
    """peft.utils.other.get_pattern_key: the first key matching a path suffix wins, in file order."""
    patterns: dict = config.get(pattern_field) or {}
    for pattern, value in patterns.items():
        if _match(pattern_field, rf"(.*\.)?({pattern})$", path):
            return value, f"{pattern_field}[{pattern!r}]"
    return config.get(default_field, default), default_field


def _fullmatch(field: str, pattern: str, path: str) -> bool:
    return _compile(field, pattern).fullmatch(path) is not None


def _match(field: str, pattern: str, path: str) -> re.Match[str] | None:
    return _compile(field, pattern).match(path)


def _compile(field: str, pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as error:
        raise CorruptAdapterError(f"adapter_config.json field {field} holds an invalid regex {pattern!r}: {error}") \
            from error
