"""The model's tensors, by checkpoint name and shape, and the strict loaders that fill them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from worker.errors import ModelLoadError
from worker.model.config import FUSED_MODULES, ModelConfig, module_parent
from worker.tensor_parallel import TensorParallel

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Buffers some checkpoints carry that are recomputed at load time.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
DUMMY_INIT_RANGE = 1e-3  # as vLLM's dummy loader: small enough that 8B-sized stacks stay finite


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config must contain, with its shape."""
    h, i = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for layer in range(config.num_layers):
        shapes.update(_layer_shapes(config, f"model.layers.{layer}.", h, i))
    return shapes


def _layer_shapes(config: ModelConfig, prefix: str, h: int, i: int) -> dict[str, tuple[int, ...]]:
    norms = ["input_layernorm", "post_attention_layernorm"]
    if config.sandwich_norms:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    shapes = {f"{prefix}{norm}.weight": (h,) for norm in norms}
    for module, (in_features, out_features) in config.module_shapes().items():
        name = f"{prefix}{module_parent(module)}.{module}"
        shapes[name + ".weight"] = (out_features, in_features)
        if _has_bias(config, module):
            shapes[name + ".bias"] = (out_features,)
    if config.qk_norm:
        shapes[prefix + "self_attn.q_norm.weight"] = (config.head_dim,)
        shapes[prefix + "self_attn.k_norm.weight"] = (config.head_dim,)
    return shapes


def fused_tensors(config: ModelConfig) -> dict[str, tuple[tuple[str, slice], ...]]:
    """Phi-3's fused checkpoint tensors -> the tensors of `expected_shapes` they hold, each with its rows."""
    if not config.fused_projections:
        return {}
    fused = {}
    for layer in range(config.num_layers):
        for module in FUSED_MODULES:
            prefix = f"model.layers.{layer}.{module_parent(module)}."
            fused[f"{prefix}{module}.weight"] = tuple(
                (f"{prefix}{part}.weight", rows) for part, rows in config.module_parts(module))
    return fused


def checkpoint_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the checkpoint holds, by its name there: `expected_shapes`, with Phi-3's fused
    tensors in place of their parts."""
    shapes = expected_shapes(config)
    for name, parts in fused_tensors(config).items():
        in_features = shapes[parts[0][0]][1]
        for part, _ in parts:
            del shapes[part]
        shapes[name] = (parts[-1][1].stop, in_features)
    return shapes


class Rows:
    """Rows [start, stop) of a tensor, indexed like a tensor of those rows alone, through the
    tensor's own indexing: a safetensors slice then reads only the bytes asked for."""

    def __init__(self, sliceable, rows: slice) -> None:
        self.sliceable = sliceable
        self.rows = rows

    def __getitem__(self, index) -> torch.Tensor:
        rows, *rest = index if isinstance(index, tuple) else (index,)
        start, stop, step = rows.indices(self.rows.stop - self.rows.start)
        if step != 1:
            raise ValueError("Rows takes contiguous row ranges only")
        return self.sliceable[(slice(self.rows.start + start, self.rows.start + stop), *rest)]


def _has_bias(config: ModelConfig, module: str) -> bool:
    if module in ("q_proj", "k_proj", "v_proj"):
        return config.qkv_bias
    if module == "o_proj":
        return config.o_bias
    return config.mlp_bias


def load_safetensors(
    model_dir: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device,
    tp: TensorParallel = TensorParallel(),
) -> dict[str, torch.Tensor]:
    """Reads every tensor (this rank's part of it), refusing unknown, missing and mis-shaped ones.
    Phi-3's fused tensors are read as their parts (each part's rows of this rank), so the model
    sees q/k/v and gate/up as it does for Llama."""
    expected = expected_shapes(config)
    in_checkpoint = checkpoint_shapes(config)
    fused = fused_tensors(config)

    def rank_parts(name: str, sliceable, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        if name not in fused:
            return {name: tp.checkpoint_slice(config, name, sliceable, shape).to(dtype)}
        return {part: tp.checkpoint_slice(config, part, Rows(sliceable, rows), expected[part]).to(dtype)
                for part, rows in fused[name]}

    tensors: dict[str, torch.Tensor] = {}
    for file, names in _files_and_names(model_dir).items():
        tensors.update(_read_file(file, names, in_checkpoint, device, rank_parts))
    owner = {part: name for name, parts in fused.items() for part, _ in parts}  # named as in the checkpoint
    missing = sorted({owner.get(name, name) for name in set(expected) - set(tensors)})
    if missing:
        raise ModelLoadError(f"checkpoint {model_dir} is missing {len(missing)} tensors, e.g. {missing[:3]}")
    return tensors


def _files_and_names(model_dir: Path) -> dict[Path, list[str] | None]:
    """Checkpoint files, each with the tensor names the index assigns to it (None: all)."""
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files: dict[Path, list[str] | None] = {}
        for name, file in weight_map.items():
            names = files.setdefault(model_dir / file, [])
            assert names is not None
            names.append(name)
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return {single: None}
    if any(model_dir.glob("*.bin")):
        raise ModelLoadError(f"{model_dir} holds only pickle (*.bin) weights; only safetensors are loaded")
    raise ModelLoadError(f"{model_dir} has neither {SINGLE_FILE} nor {SAFETENSORS_INDEX}")


def _read_file(file, names, expected, device, rank_parts) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise ModelLoadError(f"checkpoint shard {file} is missing")
    tensors = {}
    try:
        with safe_open(file, framework="pt", device=str(device)) as shard:
            for name in names if names is not None else shard.keys():
                if name.endswith(IGNORED_SUFFIXES):
                    continue
                if name not in expected:
                    raise ModelLoadError(f"unexpected tensor {name!r} in {file.name} for this config")
                part = shard.get_slice(name)
                shape = tuple(part.get_shape())
                if shape != expected[name]:
                    raise ModelLoadError(f"tensor {name!r} has shape {shape}, config expects {expected[name]}")
                tensors.update(rank_parts(name, part, shape))
    except SafetensorError as error:
        raise ModelLoadError(f"cannot read {file}: {error}") from error
    return tensors


def dummy_weights(
    config: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int, tp: TensorParallel = TensorParallel()
) -> dict[str, torch.Tensor]:
    """Random weights from the config alone, created on the target device (this rank's part only)."""
    generator = torch.Generator(device=device).manual_seed(seed + tp.rank)
    tensors = {}
    for name, full_shape in expected_shapes(config).items():
        shape = tp.local_shape(config, name, full_shape)
        if name.endswith("norm.weight"):  # scaling by 1
            tensors[name] = torch.full(shape, 1.0 - config.norm_weight_offset, dtype=dtype, device=device)
            continue
        tensor = torch.empty(shape, dtype=dtype, device=device)
        tensor.uniform_(-DUMMY_INIT_RANGE, DUMMY_INIT_RANGE, generator=generator)
        tensors[name] = tensor
    return tensors
