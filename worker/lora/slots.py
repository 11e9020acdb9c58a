"""GPU adapter slots: stacked A and B.T buffers per target module, and the multi-LoRA product.

For module m, `a[m]` is [layers, slots, max_rank, in] and `b_t[m]` is [layers, slots,
max_rank, out]. A slot holding an adapter of rank r has A rows [r:] zeroed on load (and
all of A for modules it does not adapt), so one batched product over several slots, cut at
the largest rank among them, serves heterogeneous ranks exactly.

DoRA (worker/lora/dora.py): `scale[m]` and `shift[m]`, [layers, slots + 1, out] in float32,
hold each slot's per-output rescaling, computed when the layer is loaded; they stay the
identity (1 and 0) for plain LoRA and for modules an adapter does not adapt, so a batch mixing
both rescales every adapted token alike. The extra last row, never written, is the identity
that slot NO_ADAPTER (-1) indexes.

The vocabulary modules (embed_tokens, lm_head) have one A and B.T per slot, [slots + 1,
max_rank, in] and [slots + 1, max_rank, out], the extra row zeros for NO_ADAPTER. Their copies
travel with layer 0's (the embedding) and the last layer's (the LM head), so the per-layer
load events cover them. A token's delta reads its own slot's A (the embedding: the column of
its token id; the LM head: all slots' A times its hidden state, a small product) and the
stacked B.T of every slot through a per-token one-hot over the slots: one product for the
whole batch, whatever the adapters, and zeros for slots without the module (A zeroed on load).

PEFT's modules_to_save of the vocabulary modules: slots [0, saved_module_slots) each own a whole
embedding and LM head table ([vocab, hidden], this rank's vocabulary rows), copied with the same
layers' copies as the vocabulary LoRA. Only adapters with such tables load there; a token of such a
slot reads its slot's embedding row instead of the base one, and a sampled row its slot's LM head.
A table is read only while its slot's occupant replaces that module, so a stale one is never seen
and needs no clearing.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker.batch import NO_ADAPTER
from worker.errors import UnsupportedAdapterError
from worker.kernels.staged_deltas import FoldedDeltas
from worker.lora.dora import BaseWeights, dora_scale_and_shift
from worker.lora.folded import FOLD_RANK, FoldedWeights
from worker.lora.host_cache import HostAdapter
from worker.lora.peft_config import VOCAB_MODULES, vocab_layer
from worker.model.config import ModelConfig
from worker.host_upload import index_tensor


class LoraSlots:
    def __init__(
        self,
        model: ModelConfig,
        *,
        num_slots: int,
        max_rank: int,
        modules: Iterable[str],
        dtype: torch.dtype,
        device: torch.device,
        base_weights: BaseWeights,
        vocab_rows: int | None = None,
        saved_module_slots: int = 0,
        folded: FoldedWeights | None = None,
    ) -> None:
        """`base_weights`: the base model's modules, which DoRA's weight norms are taken over;
        `vocab_rows`: this rank's part of the vocabulary (all of it without tensor parallelism);
        `saved_module_slots`: the first slots, which own modules_to_save tables; `folded`: the
        base weights with every slot's A below them (`--lora-fold`), which hold the folded
        modules' A instead of buffers of their own (`max_rank` must then be `FOLD_RANK`)."""
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.modules = tuple(modules)
        shapes = model.module_shapes()
        layers = model.num_layers
        self.folded = folded
        folded_a = {} if folded is None else folded.a_views()
        self._folded_modules = frozenset(folded_a)
        if folded_a and max_rank != FOLD_RANK:
            raise ValueError(f"folded slots have rank {FOLD_RANK}, not {max_rank}")
        self.a = {m: folded_a[m] if m in folded_a else
                  torch.zeros(layers, num_slots, max_rank, shapes[m][0], dtype=dtype, device=device)
                  for m in self.modules}
        self.b_t = {m: torch.zeros(layers, num_slots, max_rank, shapes[m][1], dtype=dtype, device=device)
                    for m in self.modules}
        self.scale = {m: torch.ones(layers, num_slots + 1, shapes[m][1], device=device) for m in self.modules}
        self.shift = {m: torch.zeros(layers, num_slots + 1, shapes[m][1], device=device) for m in self.modules}
        self.base_weights = base_weights
        self.num_layers = layers
        vocab, hidden = model.vocab_size if vocab_rows is None else vocab_rows, model.hidden_size
        vocab_shapes = {"embed_tokens": (vocab, hidden), "lm_head": (hidden, vocab)}
        self.vocab_a = {m: torch.zeros(num_slots + 1, max_rank, i, dtype=dtype, device=device)
                        for m, (i, _) in vocab_shapes.items()}
        self.vocab_b_t = {m: torch.zeros(num_slots + 1, max_rank, o, dtype=dtype, device=device)
                          for m, (_, o) in vocab_shapes.items()}
        if saved_module_slots > num_slots:
            raise ValueError(f"saved_module_slots {saved_module_slots} exceeds the {num_slots} slots")
        self.saved_module_slots = saved_module_slots
        self.saved = {m: torch.zeros(saved_module_slots, vocab, hidden, dtype=dtype, device=device)
                      for m in VOCAB_MODULES}
        self.ranks: list[dict[tuple[int, str], int]] = [{} for _ in range(num_slots)]
        self.occupants: list[str | None] = [None] * num_slots
        self.dora: list[bool] = [False] * num_slots  # the occupant is a DoRA adapter
        # Per occupant, kept here because every step asks: the vocabulary modules it adapts, and
        # its largest rank over the linear modules.
        self._vocab_modules: list[frozenset[str]] = [frozenset()] * num_slots
        self._saved_modules: list[frozenset[str]] = [frozenset()] * num_slots  # the tables it replaces
        self._linear_rank: list[int] = [0] * num_slots
        # A DoRA adapter was ever loaded into the slot: its scales may differ from the identity,
        # so every later load writes all of them.
        self._scales_written: list[bool] = [False] * num_slots
        # Likewise for the vocabulary modules' A: a slot never given one holds zeros already, so a
        # load without them writes nothing there (a vocabulary's worth of A per slot).
        self._vocab_written: list[bool] = [False] * num_slots

    @property
    def nbytes(self) -> int:
        own_a = [a for m, a in self.a.items() if m not in self._folded_modules]  # folded A is the weights'
        buffers = (*own_a, *self.b_t.values(), *self.scale.values(), *self.shift.values(),
                   *self.vocab_a.values(), *self.vocab_b_t.values(), *self.saved.values())
        return sum(t.numel() * t.element_size() for t in buffers)

    def check_servable(self, name: str, modules: Iterable[str]) -> None:
        missing = sorted(set(modules) - set(self.modules) - set(VOCAB_MODULES))  # vocabulary modules: always
        if missing:
            raise UnsupportedAdapterError(
                f"adapter {name!r} targets {missing}, which this server has no slots for "
                f"(lora target modules: {', '.join(self.modules)})"
            )

    def table_bytes(self) -> int:
        """What one saved-module slot's two tables take."""
        return sum(t.shape[1] * t.shape[2] * t.element_size() for t in self.saved.values())

    def _check_saved_slot(self, name: str, slot: int, adapter: HostAdapter) -> None:
        """An adapter with modules_to_save tables loads only into a slot that owns tables."""
        if adapter.saved and slot >= self.saved_module_slots:
            raise UnsupportedAdapterError(
                f"adapter {name!r} replaces {sorted(adapter.saved)} (modules_to_save) and must load into a "
                f"saved-module slot (0 to {self.saved_module_slots - 1}), not slot {slot}")

    def assign(self, slot: int, adapter: HostAdapter) -> None:
        """Records the slot's new occupant; its weights arrive through `layer_writes`."""
        self._check_saved_slot(adapter.name, slot, adapter)
        self._saved_modules[slot] = frozenset(adapter.saved)
        self.ranks[slot] = {key: a.shape[0] for key, (a, _) in adapter.tensors.items()}
        self.occupants[slot] = adapter.name
        self._vocab_modules[slot] = frozenset(module for _, module in self.ranks[slot] if module in VOCAB_MODULES)
        self._linear_rank[slot] = max((rank for (_, module), rank in self.ranks[slot].items()
                                       if module not in VOCAB_MODULES), default=0)
        self.dora[slot] = bool(adapter.magnitudes)
        self._scales_written[slot] = self._scales_written[slot] or self.dora[slot]
        self._vocab_written[slot] = self._vocab_written[slot] or bool(self._vocab_modules[slot])

    def any_dora(self, slots: Iterable[int]) -> bool:
        return any(self.dora[slot] for slot in slots)

    def any_saves(self, slots: Iterable[int]) -> bool:
        """Whether an adapter in `slots` replaces a vocabulary module (modules_to_save)."""
        return any(self._saved_modules[slot] for slot in slots)

    def replaces(self, slot: int, module: str) -> bool:
        return slot != NO_ADAPTER and module in self._saved_modules[slot]

    def any_adapts(self, slots: Iterable[int], module: str) -> bool:
        """Whether an adapter in `slots` adapts vocabulary module `module`."""
        return any(module in self._vocab_modules[slot] for slot in slots)

    def adapter_rank(self, slot: int) -> int:
        """The largest rank of the slot's adapter over its linear modules and layers (0 when
        none): what the batched products of those modules read."""
        return self._linear_rank[slot]

    def adapter_ranks(self) -> list[int]:
        """`adapter_rank` of every slot, in slot order (what a LoRA block table is built from)."""
        return list(self._linear_rank)

    def clear(self, slot: int) -> None:
        self.ranks[slot] = {}
        self.occupants[slot] = None
        self.dora[slot] = False
        self._vocab_modules[slot] = frozenset()
        self._saved_modules[slot] = frozenset()
        self._linear_rank[slot] = 0

    def layer_writes(self, slot: int, layer: int, adapter: HostAdapter) -> LayerWrites:
        """What loading one layer of `adapter` into `slot` writes.

        Rows of A past the adapter's rank, and A of served modules it does not adapt in this
        layer, are zeroed: the batched product then reads every slot up to the largest rank
        in the batch and gets exact zeros from them (B may stay stale: it meets only zeros).
        DoRA's scales are computed from the copied A and B; the other modules' scales are
        reset to the identity if a DoRA adapter may have left them otherwise.
        """
        copies, zeros, ones, rescales = [], [], [], []
        self._vocab_writes(slot, layer, adapter, copies, zeros)
        for module in self.modules:
            tensors = adapter.tensors.get((layer, module))
            magnitude = adapter.magnitudes.get((layer, module))
            scale, shift = self.scale[module][layer, slot], self.shift[module][layer, slot]
            if magnitude is None and self._scales_written[slot]:
                ones.append(scale)
                zeros.append(shift)
            if tensors is None:
                zeros.append(self.a[module][layer, slot])
                continue
            a, b_t = tensors
            rank = a.shape[0]
            a_slot, b_t_slot = self.a[module][layer, slot, :rank], self.b_t[module][layer, slot, :rank]
            copies.append((a_slot, a))
            copies.append((b_t_slot, b_t))
            if rank < self.max_rank:
                zeros.append(self.a[module][layer, slot, rank:])
            if magnitude is not None:
                rescales.append(DoraRescale(scale, shift, *self.base_weights(layer, module), a_slot, b_t_slot,
                                            magnitude))
        return LayerWrites(copies, zeros, ones, rescales)

    def _vocab_writes(self, slot: int, layer: int, adapter: HostAdapter, copies: list, zeros: list) -> None:
        """The vocabulary modules whose copies travel with `layer`: as for a linear module, A past
        the rank (or all of it, if the adapter lacks the module) is zeroed, unless the slot never
        held a vocabulary LoRA (zeros already)."""
        for module in VOCAB_MODULES:
            if vocab_layer(module, self.num_layers) != layer:
                continue
            a_slot, b_t_slot = self.vocab_a[module][slot], self.vocab_b_t[module][slot]
            tensors = adapter.tensors.get((layer, module))
            if tensors is None:
                if self._vocab_written[slot]:
                    zeros.append(a_slot)
                continue
            a, b_t = tensors
            rank = a.shape[0]
            copies.append((a_slot[:rank], a))
            copies.append((b_t_slot[:rank], b_t))
            if rank < self.max_rank:
                zeros.append(a_slot[rank:])
        for module, table in adapter.saved.items():
            if vocab_layer(module, self.num_layers) == layer:
                copies.append((self.saved[module][slot], table))

    def saved_embeddings(self, hidden: torch.Tensor, ids: torch.Tensor, inside: torch.Tensor | None,
                         rows: torch.Tensor, row_slots: torch.Tensor) -> None:
        """Overwrites the embeddings of the tokens `rows` (of slots `row_slots`, which replace the
        embedding) with their slot's table rows; under tensor parallelism a token outside this
        rank's vocabulary part gets zeros, as for the base table, and the all-reduce sums them."""
        embedded = self.saved["embed_tokens"][row_slots, ids[rows]]
        if inside is not None:
            embedded = embedded * inside[rows].unsqueeze(-1).to(embedded.dtype)
        hidden[rows] = embedded

    def saved_logits(self, logits: torch.Tensor, hidden: torch.Tensor, rows_by_slot: dict[int, torch.Tensor]) -> None:
        """Overwrites the logits of each slot's rows (this rank's vocabulary part) with those of its LM head."""
        table = self.saved["lm_head"]
        for slot, rows in rows_by_slot.items():
            logits[rows] = hidden[rows] @ table[slot].t()

    def embedding_delta(self, ids: torch.Tensor, inside: torch.Tensor | None,
                        token_slots: torch.Tensor) -> torch.Tensor:
        """Each token's embedding LoRA delta [T, hidden]: B.T[slot] rows weighted by A[slot][:, id].

        `ids`: each token's row in this rank's vocabulary part; `inside`: which tokens are in it
        (None: all); `token_slots`: each token's slot, NO_ADAPTER (-1, the zero row) for none."""
        a = self.vocab_a["embed_tokens"][token_slots, :, ids]  # [T, r]
        if inside is not None:
            a = a * inside.unsqueeze(-1).to(a.dtype)
        return self._expand(a, token_slots, self.vocab_b_t["embed_tokens"])

    def lm_head_delta(self, hidden: torch.Tensor, row_slots: torch.Tensor) -> torch.Tensor:
        """The LM head's LoRA delta of each row's logits [n, this rank's vocabulary]."""
        a = self.vocab_a["lm_head"]  # [slots + 1, r, hidden]
        shrunk = (hidden @ a.flatten(0, 1).t()).view(hidden.shape[0], a.shape[0], a.shape[1])
        own = shrunk[torch.arange(hidden.shape[0], device=hidden.device), row_slots]  # [n, r]
        return self._expand(own, row_slots, self.vocab_b_t["lm_head"])

    @staticmethod
    def _expand(x: torch.Tensor, row_slots: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
        """x[t] @ b_t[slot(t)] for every row t, as one product: x is spread to its slot's block of a
        [n, (slots + 1) * r] matrix (zeros elsewhere) against the stacked B.T [(slots + 1) * r, out]."""
        slots = b_t.shape[0]
        # NO_ADAPTER (-1) -> the last row. A comparison, not F.one_hot, which may check its input on the host.
        one_hot = (row_slots.remainder(slots).unsqueeze(-1) == torch.arange(slots, device=x.device)).to(x.dtype)
        spread = one_hot.unsqueeze(-1) * x.unsqueeze(1)  # [n, slots + 1, r]
        return spread.flatten(1) @ b_t.flatten(0, 1)

    def folds(self, modules: Sequence[str]) -> bool:
        """Whether the group `modules`' LoRA is folded into its base GEMM (`worker.lora.folded`)."""
        return self.folded is not None and self.folded.operands(0, modules) is not None

    def folded_operands(self, layer: int, modules: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The folded weight and bias of the group `modules` in `layer`, or None if it is not folded."""
        return None if self.folded is None else self.folded.operands(layer, modules)

    def folded_deltas(self, layer: int, modules: Sequence[str], shrunk: torch.Tensor, blocks: torch.Tensor,
                      block_m: int, token_slots: torch.Tensor) -> FoldedDeltas:
        """The group's LoRA deltas for its reader to expand from the shrunk columns of its GEMM."""
        return FoldedDeltas(shrunk, tuple(self.b_t[m][layer] for m in modules), blocks, block_m, token_slots)

    def segment_batch(self, token_slots: Sequence[int], device: torch.device) -> SegmentBatch | None:
        return SegmentBatch.build(token_slots, self.ranks, device, self.dora)

    def add_delta(self, out: torch.Tensor, x_padded: torch.Tensor, layer: int, module: str,
                  batch: SegmentBatch) -> None:
        """out[t] += (x[t] @ A[slot(t)].T) @ B.T[slot(t)] for every adapted token, as two bmm;
        with a DoRA adapter in the batch, out[t] = scale * (out[t] + delta) + shift instead.

        `x_padded` is the input laid out by `batch.pad` ([slots, L, in]); the slot range is a
        view of the stacked buffers (no copy), and ranks are cut at the batch's largest for the
        module. A module no slot of the batch adapts has identity scales: it is left as it is.
        """
        rank = batch.max_rank.get((layer, module), 0)
        if rank == 0 or module not in self.a:
            return
        a = self.a[module][layer, batch.first_slot:batch.stop_slot, :rank]  # [S, r, in]
        b_t = self.b_t[module][layer, batch.first_slot:batch.stop_slot, :rank]  # [S, r, out]
        delta = torch.bmm(torch.bmm(x_padded, a.transpose(1, 2)), b_t)  # [S, L, out]
        adapted = out[batch.first_token:]
        adapted += delta.reshape(-1, delta.shape[-1])[batch.valid_rows]
        if batch.adapted_token_slots is not None:
            adapted.mul_(self.scale[module][layer][batch.adapted_token_slots])
            adapted.add_(self.shift[module][layer][batch.adapted_token_slots])


@dataclass(frozen=True)
class DoraRescale:
    """One DoRA module's scale and shift, computed from the slot's A and B once they are copied."""

    scale: torch.Tensor  # slot destination [out]
    shift: torch.Tensor  # slot destination [out]
    weight: torch.Tensor  # base [out, in]
    bias: torch.Tensor | None
    a: torch.Tensor  # the slot's A [r, in]
    b_t: torch.Tensor  # the slot's scaled B.T [r, out]
    magnitude: torch.Tensor  # pinned source [out]

    def write(self) -> None:
        magnitude = self.magnitude.to(self.scale.device, non_blocking=True)
        scale, shift = dora_scale_and_shift(self.weight, self.bias, self.a, self.b_t, magnitude)
        self.scale.copy_(scale)
        self.shift.copy_(shift)


@dataclass(frozen=True)
class LayerWrites:
    """Run in order on one stream (or thread): the rescales read the copies' results."""

    copies: list[tuple[torch.Tensor, torch.Tensor]]  # (slot destination, pinned source)
    zeros: list[torch.Tensor]  # slot regions to clear
    ones: list[torch.Tensor]  # slot scales to reset to the identity
    rescales: list[DoraRescale]

    def apply(self, non_blocking: bool) -> None:
        for destination, source in self.copies:
            destination.copy_(source, non_blocking=non_blocking)
        for region in self.zeros:
            region.zero_()
        for region in self.ones:
            region.fill_(1)
        for rescale in self.rescales:
            rescale.write()


@dataclass(frozen=True)
class SegmentBatch:
    """One forward's adapted tokens laid out per slot, built once and shared by all layers.

    Adapted tokens are the flat range [first_token, T), one contiguous run per slot.
    """

    first_slot: int
    stop_slot: int
    first_token: int
    gather_index: torch.Tensor  # [S, L] flat token index, or T (a zero row) for padding
    valid_rows: torch.Tensor  # indices into the flattened [S * L] rows, in token order
    max_rank: dict[tuple[int, str], int]  # (layer, module) -> largest rank among the slots used
    adapted_token_slots: torch.Tensor | None  # the slot of each adapted token, if a DoRA slot is used

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[T, in] -> [S, L, in], each slot's tokens in a row, zeros where padded."""
        return F.pad(x, (0, 0, 0, 1))[self.gather_index]  # row T of the padded x is zeros

    @classmethod
    def build(cls, token_slots: Sequence[int], ranks: list[dict[tuple[int, str], int]],
              device: torch.device, dora: Sequence[bool]) -> SegmentBatch | None:
        """From per-token slot indices, sorted by slot with base-model tokens first; `dora`: which
        slots hold DoRA adapters."""
        runs = _adapter_runs(token_slots)
        if not runs:
            return None
        num_tokens = len(token_slots)
        first, stop = runs[0][0], runs[-1][0] + 1
        longest = max(end - start for _, start, end in runs)
        gather = [[num_tokens] * longest for _ in range(stop - first)]
        valid = []
        for slot, start, end in runs:
            row = slot - first
            gather[row][:end - start] = range(start, end)
            valid.extend(row * longest + i for i in range(end - start))
        max_rank: dict[tuple[int, str], int] = {}
        for slot, _, _ in runs:
            for key, rank in ranks[slot].items():
                max_rank[key] = max(max_rank.get(key, 0), rank)
        adapted_token_slots = None
        if any(dora[slot] for slot, _, _ in runs):
            adapted_token_slots = index_tensor(token_slots[runs[0][1]:], device)
        return cls(first, stop, runs[0][1], index_tensor(gather, device), index_tensor(valid, device), max_rank,
                   adapted_token_slots)


def _adapter_runs(token_slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """(slot, start, end) of each adapter's tokens; they must tile [first adapted token, T)."""
    runs, position = [], 0
    for slot, group in itertools.groupby(token_slots):
        length = sum(1 for _ in group)
        if slot != NO_ADAPTER:
            runs.append((slot, position, position + length))
        position += length
    ordered = all(a[0] < b[0] and a[2] == b[1] for a, b in zip(runs, runs[1:]))
    if not ordered or (runs and runs[-1][2] != len(token_slots)):
        raise ValueError("per-token adapter slots must be sorted by slot, base-model tokens first")
    return runs
