"""Tensor parallelism: which slice of each weight a rank holds, and the collectives of a forward.

Megatron's layout. Column-parallel modules (q, k, v, gate, up) are split by output: a rank
holds its query heads, its KV heads (whole heads; replicated when ranks outnumber them) and its
slice of the intermediate size. Row-parallel modules (o, down) are split by input, each rank's
product is a partial sum, and one all-reduce per module completes it. Embedding and LM head are
split by vocabulary (padded to a multiple of the ranks).

LoRA follows its base module, so that it costs no collective of its own: a column-parallel
module keeps A whole and slices B by output; a row-parallel one slices A by input and keeps B
whole, and its delta B (A_r x_r) is added to the partial sum before the all-reduce, which sums
the ranks' parts into B (A x). The embedding's LoRA is split like its table: a rank holds the
columns of A [r, vocab] of its vocabulary range and B whole, looks up its own tokens (zero for
the others) and adds its delta before the embedding's all-reduce; the LM head's keeps A whole
and slices B [vocab, r] by rows, so each rank computes its own logits' delta before the gather.
An adapter's own embedding and LM head tables (modules_to_save) are split by vocabulary as the base
ones, and replace their rows before the same all-reduce and gather.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from worker.errors import ModelLoadError
from worker.model.config import ModelConfig

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
VOCAB_PARALLEL = ("model.embed_tokens.weight", "lm_head.weight")
ALL = slice(None)
# (this rank's row of each token in its vocabulary part, which tokens are in its part (None: all))
# -> the embedding's LoRA delta of each token [T, hidden], or None when no adapter of the step has one.
EmbeddingDelta = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor | None]
# (embeddings [T, hidden], this rank's row of each token, which tokens are in its part (None: all)) ->
# None, having overwritten the embeddings of tokens whose adapter replaces the table (modules_to_save).
EmbeddingReplace = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], None]


class GroupFailure(BaseException):
    """A collective failed or timed out, or a rank died: the group cannot go on.

    Not an `Exception`, so that no command handler reports it and carries on: the worker exits
    and its supervisor starts the whole group again."""


@dataclass(frozen=True)
class TensorParallel:
    """One rank's place in its group; the defaults are a worker without tensor parallelism."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None  # a forward's collectives (NCCL on CUDA, gloo on CPU)
    control: dist.ProcessGroup | None = None  # the load agreement, on CPU tensors (gloo)
    host_memory: str | None = None  # the group's shared host cache (worker/lora/shared_host_memory.py)

    @property
    def enabled(self) -> bool:
        return self.size > 1

    # Layout ---------------------------------------------------------------------------

    def check(self, config: ModelConfig) -> None:
        """Refuses a model this group size cannot split evenly."""
        n = self.size
        problems = []
        if config.num_heads % n:
            problems.append(f"{config.num_heads} attention heads")
        if config.num_kv_heads % n and n % config.num_kv_heads:
            problems.append(f"{config.num_kv_heads} KV heads (neither divides the other)")
        if config.intermediate_size % n:
            problems.append(f"intermediate size {config.intermediate_size}")
        if problems:
            raise ModelLoadError(f"--tensor-parallel-size {n} cannot split {', '.join(problems)}")

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The model as one rank sees it: its heads and intermediate slice (hidden size and vocabulary whole)."""
        if not self.enabled:
            return config
        return replace(config, num_heads=config.num_heads // self.size,
                       num_kv_heads=max(config.num_kv_heads // self.size, 1),
                       intermediate_size=config.intermediate_size // self.size)

    def output_rows(self, config: ModelConfig, module: str) -> slice:
        """The output features of a column-parallel module this rank computes."""
        if module in ("k_proj", "v_proj"):
            first_head, heads = self._kv_heads(config)
            return slice(first_head * config.head_dim, (first_head + heads) * config.head_dim)
        width = self.local_config(config).module_shapes()[module][1]
        return slice(self.rank * width, (self.rank + 1) * width)

    def input_columns(self, config: ModelConfig, module: str) -> slice:
        """The input features of a row-parallel module this rank reads."""
        width = self.local_config(config).module_shapes()[module][0]
        return slice(self.rank * width, (self.rank + 1) * width)

    def vocab_rows(self, config: ModelConfig) -> tuple[int, int]:
        """(first row, rows per rank) of the vocabulary split, padded to a multiple of the ranks."""
        per_rank = -(-config.vocab_size // self.size)
        return self.rank * per_rank, per_rank

    def lora_slices(self, config: ModelConfig, module: str) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
        """How this rank indexes an adapter's A [r, in] and B [out, r] of `module`."""
        if not self.enabled:
            return (ALL, ALL), (ALL, ALL)
        if module in ("embed_tokens", "lm_head"):
            first, per_rank = self.vocab_rows(config)
            vocab = slice(first, first + per_rank)
            return ((ALL, vocab), (ALL, ALL)) if module == "embed_tokens" else ((ALL, ALL), (vocab, ALL))
        if module in ROW_PARALLEL:
            return (ALL, self.input_columns(config, module)), (ALL, ALL)
        return (ALL, ALL), (self.output_rows(config, module), ALL)

    def checkpoint_slice(self, config: ModelConfig, name: str, sliceable, shape: tuple[int, ...]) -> torch.Tensor:
        """This rank's part of checkpoint tensor `name` (full `shape`), read through `sliceable[index]`
        (a tensor, or a safetensors slice that reads only those bytes)."""
        if not self.enabled:
            return sliceable[tuple(ALL for _ in shape)]
        if name in VOCAB_PARALLEL:
            return self._vocab_part(config, sliceable, shape)
        module = _module_of(name)
        if module in COLUMN_PARALLEL:
            rows = self.output_rows(config, module)
            return sliceable[(rows, ALL) if len(shape) == 2 else (rows,)]
        if module in ROW_PARALLEL and len(shape) == 2:
            return sliceable[ALL, self.input_columns(config, module)]
        if module in ROW_PARALLEL:  # a bias: added once, by rank 0, to the partial sums
            bias = sliceable[ALL]
            return bias if self.rank == 0 else torch.zeros_like(bias)
        return sliceable[tuple(ALL for _ in shape)]

    def local_shape(self, config: ModelConfig, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of this rank's part of checkpoint tensor `name`."""
        return tuple(self.checkpoint_slice(config, name, _ShapeOnly(shape), shape).shape)

    def _kv_heads(self, config: ModelConfig) -> tuple[int, int]:
        """(first KV head, KV heads) of this rank: a share of them, or one replicated head."""
        if config.num_kv_heads >= self.size:
            per_rank = config.num_kv_heads // self.size
            return self.rank * per_rank, per_rank
        return self.rank * config.num_kv_heads // self.size, 1

    def _vocab_part(self, config: ModelConfig, sliceable, shape: tuple[int, ...]) -> torch.Tensor:
        first, per_rank = self.vocab_rows(config)
        part = sliceable[min(first, shape[0]):min(first + per_rank, shape[0]), ALL]
        if part.shape[0] == per_rank:
            return part
        padding = torch.zeros(per_rank - part.shape[0], *part.shape[1:], dtype=part.dtype, device=part.device)
        return torch.cat([part, padding])

    # Collectives ----------------------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums the ranks' partial results in place."""
        if self.enabled:
            self._collective(dist.all_reduce, x, group=self.group)
        return x

    def embed(self, table: torch.Tensor, input_ids: torch.Tensor, lora: EmbeddingDelta | None = None,
              replace: EmbeddingReplace | None = None) -> torch.Tensor:
        """Embedding lookup over a vocabulary-split table: each rank fills its ids' rows (and their
        LoRA deltas, from `lora`; `replace` swaps in adapters' own tables), the sum has them all."""
        if not self.enabled:
            local, inside = input_ids, None
            hidden = table[input_ids]
        else:
            first, per_rank = table.shape[0] * self.rank, table.shape[0]
            local = input_ids - first
            inside = (local >= 0) & (local < per_rank)
            local = local.clamp(0, per_rank - 1)
            hidden = table[local] * inside.unsqueeze(-1).to(table.dtype)
        if replace is not None:
            replace(hidden, local, inside)
        delta = None if lora is None else lora(local, inside)
        if delta is not None:
            hidden += delta
        return self.all_reduce(hidden)

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Every rank's logits [n, V / ranks] -> the whole vocabulary's [n, V] on every rank."""
        if not self.enabled:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.size)]
        self._collective(dist.all_gather, parts, logits.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)[:, :vocab_size]

    def agree(self, done: list[bool], failed: list[bool]) -> tuple[list[bool], list[bool]]:
        """For loads or stagings under way on every rank (same order): done on every rank, and failed on any."""
        if not self.enabled or not done:
            return done, failed
        counts = torch.tensor([done, failed], dtype=torch.int32)
        self._collective(dist.all_reduce, counts, group=self.control)
        return [c == self.size for c in counts[0].tolist()], [c > 0 for c in counts[1].tolist()]

    def _collective(self, operation, *args, **kwargs) -> None:
        try:
            operation(*args, **kwargs)
        except RuntimeError as error:  # gloo's timeout and a dead peer's closed connection alike
            raise GroupFailure(f"tensor-parallel rank {self.rank}: {operation.__name__} failed: {error}") from error


class _ShapeOnly:
    """Indexable like a tensor, answering only the shape of what indexing would give."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def __getitem__(self, index) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        return torch.empty(self.shape, device="meta")[index]


def _module_of(name: str) -> str | None:
    """`model.layers.3.self_attn.q_proj.weight` -> `q_proj`."""
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else None
