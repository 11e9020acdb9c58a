"""Forward steps over fixed-size device buffers, replayed from CUDA graphs on the GPU.

A decode-only batch (one new token per sequence) is padded to a batch-size bucket and a
page-table width bucket. With `mixed=True`, a batch with prefill chunks is padded to a
token bucket instead and its attention runs the ragged paged kernel (a block of up to
ATTENTION_BLOCK_M query tokens of one sequence per program; `EngineConfig.static_mixed`, on
by default). Everything the step reads lives in per-shape static buffers, refilled before
each step by one upload (a kernel reading their pinned host twin): the step's inputs, built
once by `worker.step_inputs` (token ids, positions, KV write indices, page table, sequence
lengths, per-token slots and sequence rows), padded, and the multi-LoRA and attention block
tables. On CUDA the whole forward (embedding to final norm, 2 kernels per adapted module,
the paged attention kernels) is captured once per shape and replayed, so a step costs a few
launches instead of thousands. On CPU the same step runs eagerly with the torch reference
kernels, which is how CI covers the buffer logic.

Padding rows read page 0, have length 0 (attention output 0), no adapter, and write their
keys and values to the KV cache's scratch row.

A step with a DoRA adapter also rescales each adapted module's output per token
(worker/lora/dora.py), and a step with an embedding LoRA adds each token's embedding delta
(worker/lora/slots.py): each such kind of step (`LoraVariant`) is a graph of its own,
captured on first use, so steps without them pay nothing for them. So is a step in which no
token has an adapter: it launches no LoRA kernel, where an empty block table would still queue
them beside the base GEMMs. The LM head's LoRA runs after the graph, with the logits
(worker/engine.py).

A step that reads an adapter still being copied must wait before each layer on that layer's
copy event, which is recorded after capture: a single graph cannot hold that wait. Such a
step replays the same forward captured as one graph per layer (`LayeredGraph`), with the
waits queued between them on the stream; the host never blocks. Only prefill steps meet a
landing adapter in practice (the engine stops waiting once a queued forward has waited on
every layer), so the mixed buckets are captured this way up front, decode buckets on demand.
"""

from __future__ import annotations

import bisect
import gc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from worker.batch import NO_ADAPTER, SequenceInput
from worker.host_upload import mapped_bytes, upload_into
from worker.kernels.elementwise import LoraDeltas, StagedDeltas
from worker.kernels.lora_blocks import BLOCK_COLUMNS, BLOCK_M, PROMPT_BLOCK_M, lora_blocks, max_blocks
from worker.kernels.multi_lora import (
    LoraScratch,
    ModuleDelta,
    add_lora_delta_reference,
    add_lora_deltas,
    lora_expand,
    lora_shrink,
)
from worker.kernels.paged_attention import (
    ATTENTION_BLOCK_M,
    attention_blocks,
    decode_attention,
    decode_attention_reference,
    ragged_attention,
    ragged_attention_reference,
)
from worker.kv_cache import PagedKVCache
from worker.lora.slots import LoraSlots
from worker.model.llama import LORA_GROUPS, LlamaModel
from worker.step_inputs import StepInputs

BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)
# A step carrying a prompt costs about 21 us per padded token at 8B sizes (a seed run: 280
# tokens padded to 512 took 17.9 ms, 242 tokens in 256 took 13.2 ms), so buckets come every
# 64 tokens up to 512, where most prompts land, then 768 and doubling. Not 448: its steps
# took 22.7 ms (median of 19) against 19.1 ms for the same token counts padded to 512.
MIXED_TOKEN_BUCKETS = (64, 128, 192, 256, 320, 384, 512, 768, 1024, 2048, 4096)
# The copier's thread queues adapter copies on its own streams while this thread may be
# capturing: "thread_local" restricts only the capturing thread's calls, "global" every thread's.
CAPTURE_MODE = "thread_local"
MIN_PAGE_BUCKET = 64  # 1024 tokens at page size 16; widths grow 4x, so few shapes are ever captured


@dataclass(frozen=True)
class StepShape:
    tokens: int  # padded number of tokens
    seqs: int  # rows of the page table (= tokens for a decode step)
    pages: int  # page-table width
    mixed: bool  # prefill chunks allowed (ragged attention) or decodes only


def _page_bucket(pages_needed: int) -> int:
    pages = MIN_PAGE_BUCKET
    while pages < pages_needed:
        pages *= 4
    return pages


def decode_shape(num_sequences: int, pages_needed: int) -> StepShape:
    batch = BATCH_BUCKETS[bisect.bisect_left(BATCH_BUCKETS, num_sequences)]
    return StepShape(batch, batch, _page_bucket(pages_needed), mixed=False)


def mixed_shape(num_tokens: int, max_sequences: int, pages_needed: int) -> StepShape:
    tokens = MIXED_TOKEN_BUCKETS[bisect.bisect_left(MIXED_TOKEN_BUCKETS, num_tokens)]
    return StepShape(tokens, min(tokens, max_sequences), _page_bucket(pages_needed), mixed=True)


class LoraVariant(NamedTuple):
    """What a step's graph computes beside the base model."""

    dora: bool  # DoRA's per-token rescaling of adapted outputs
    embedding: bool  # the embedding's LoRA deltas
    deltas: bool = True  # False: no token has an adapter, so no LoRA kernel is launched at all


PLAIN = LoraVariant(dora=False, embedding=False)


@dataclass
class LayeredGraph:
    """One step's forward as consecutive graphs: before layer 0 (and the embedding, whose LoRA
    lands with layer 0's), then one per layer (the last one ends with the final norm), so that
    a wait can be queued before each layer."""

    parts: list[torch.cuda.CUDAGraph] = field(default_factory=list)
    hidden: torch.Tensor | None = None

    def replay(self, wait_for_layer: Callable[[int], None]) -> torch.Tensor:
        self.parts[0].replay()
        for layer, part in enumerate(self.parts[1:]):
            wait_for_layer(layer)
            part.replay()
        return self.hidden


class StaticInputs:
    """The device buffers of one shape (views of one int64 block) and their pinned host twin."""

    def __init__(self, shape: StepShape, num_slots: int, lora_scratch: LoraScratch, device: torch.device) -> None:
        self.shape = shape
        t, s, w = shape.tokens, shape.seqs, shape.pages
        self.block_m = PROMPT_BLOCK_M if shape.mixed else BLOCK_M  # tokens per LoRA block
        self.num_block_rows = max_blocks(t, num_slots, self.block_m)
        self.num_attention_rows = max_blocks(t, s, ATTENTION_BLOCK_M) if shape.mixed else 0
        sizes = {"input_ids": t, "positions": t, "kv_write": t, "token_slots": t, "token_rows": t, "seq_lens": s,
                 "blocks": self.num_block_rows * BLOCK_COLUMNS, "attention_blocks": self.num_attention_rows * 3,
                 "page_table": s * w}
        on_gpu = device.type == "cuda"
        self.host = torch.zeros(sum(sizes.values()), dtype=torch.long, pin_memory=on_gpu)
        self.device_block = torch.zeros_like(self.host, device=device)
        self._host_views, self._device_views, offset = {}, {}, 0
        for name, size in sizes.items():
            self._host_views[name] = self.host.numpy()[offset:offset + size]
            self._device_views[name] = self.device_block[offset:offset + size]
            offset += size
        self.lora_scratch = lora_scratch.first(t)
        self._mapped_host = mapped_bytes(self.host) if on_gpu else None
        self._copied = torch.cuda.Event() if on_gpu else None

    def device(self, name: str) -> torch.Tensor:
        view = self._device_views[name]
        if name == "page_table":
            return view.view(self.shape.seqs, self.shape.pages)
        if name == "blocks":
            return view.view(self.num_block_rows, BLOCK_COLUMNS)
        if name == "attention_blocks":
            return view.view(self.num_attention_rows, 3)
        return view

    def fill(self, step: StepInputs, slot_ranks: Sequence[int], scratch_index: int) -> None:
        """Writes the step's inputs, padded, into the host twin and uploads it to the device (a
        kernel reading the pinned twin: a copy would queue behind adapter loads)."""
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's upload has read the host twin
        host = self._host_views
        for name, values, padding in (("input_ids", step.input_ids, 0), ("positions", step.positions, 0),
                                      ("kv_write", step.kv_write_index, scratch_index),
                                      ("token_slots", step.token_slots, NO_ADAPTER),
                                      ("token_rows", step.token_rows, -1), ("seq_lens", step.seq_lens, 0)):
            host[name][:len(values)] = values
            host[name][len(values):] = padding
        page_table = host["page_table"].reshape(self.shape.seqs, self.shape.pages)
        page_table[:] = 0
        rows, width = step.page_table.shape
        page_table[:rows, :width] = step.page_table
        if self.shape.mixed:
            host["attention_blocks"][:] = attention_blocks(step.token_counts, self.num_attention_rows).reshape(-1)
        host["blocks"][:] = lora_blocks(host["token_slots"], slot_ranks, self.num_block_rows,
                                         self.block_m).reshape(-1)
        if self._mapped_host is None:
            self.device_block.copy_(self.host)
        else:
            upload_into(self.device_block, self._mapped_host)
            self._copied.record()


class GraphStepRunner:
    """Runs a step (decodes, or with `mixed` prefill chunks too) on the static buffers of its
    shape, replaying the shape's CUDA graph on the GPU."""


    def __init__(self, model: LlamaModel, kv_cache: PagedKVCache, slots: LoraSlots, *, page_size: int,
                 max_batch: int, use_cuda_graphs: bool, mixed: bool = False) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.slots = slots
        self.page_size = page_size
        self.max_batch = min(max_batch, BATCH_BUCKETS[-1])
        self.device = kv_cache.memory.device
        self.use_cuda_graphs = use_cuda_graphs and self.device.type == "cuda"
        self.mixed = mixed
        self._inputs: dict[StepShape, StaticInputs] = {}
        self._graphs: dict[tuple[StepShape, LoraVariant], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._layered: dict[tuple[StepShape, LoraVariant], LayeredGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_cuda_graphs else None
        # LoRA shrinks run on it beside the base GEMMs (see _StaticLora).
        self._lora_stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None
        # The multi-LoRA kernels' scratch, shared by every shape (graphs never run concurrently).
        max_tokens = max(self.max_batch, MIXED_TOKEN_BUCKETS[-1] if mixed else 0)
        max_in = max((a.shape[-1] for a in slots.a.values()), default=1)
        delta_columns = max(sum(slots.b_t[m].shape[-1] for m in group if m in slots.b_t) for group in LORA_GROUPS)
        self._lora_scratch = LoraScratch.allocate(max_tokens, max_in, slots.max_rank, slots.num_slots, model.dtype,
                                                  self.device, delta_columns=delta_columns)

    def supports(self, sequences: Sequence[SequenceInput]) -> bool:
        if len(sequences) > self.max_batch:
            return False
        if all(len(seq.token_ids) == 1 for seq in sequences):
            return True
        return self.mixed and sum(len(seq.token_ids) for seq in sequences) <= MIXED_TOKEN_BUCKETS[-1]

    @property
    def graphs_captured(self) -> int:
        return len(self._graphs)

    @property
    def layered_graphs_captured(self) -> int:
        return len(self._layered)

    def capture_all(self) -> None:
        """Captures every batch bucket at the first width now, not in the middle of serving;
        the mixed buckets (where a cold request's prefill lands) also one graph per layer."""
        if not self.use_cuda_graphs:
            return
        shapes = [decode_shape(batch, 1) for batch in BATCH_BUCKETS if batch <= self.max_batch]
        mixed = [mixed_shape(tokens, self.max_batch, 1) for tokens in MIXED_TOKEN_BUCKETS] if self.mixed else []
        for shape in shapes + mixed:
            if (shape, PLAIN) not in self._graphs:
                self._capture(self._inputs_of(shape), PLAIN)
        for shape in mixed:
            if (shape, PLAIN) not in self._layered:
                self._capture_layered(self._inputs_of(shape), PLAIN)

    def run(self, step: StepInputs, feed: Callable[[torch.Tensor], None],
            wait_for_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Final-normed hidden states of every new token, in order. `feed` may rewrite the flat
        input ids on the device before the step runs. With `wait_for_layer` (an adapter of the
        batch is landing) it is called before each layer, between the step's per-layer graphs
        (eagerly without graphs)."""
        num_tokens, pages = step.num_tokens, step.page_table.shape[1]
        shape = (decode_shape(num_tokens, pages) if num_tokens == len(step.sequences)
                 else mixed_shape(num_tokens, self.max_batch, pages))
        inputs = self._inputs_of(shape)
        slot_ranks = self.slots.adapter_ranks()
        inputs.fill(step, slot_ranks, self.kv_cache.scratch_index)
        feed(inputs.device("input_ids"))
        variant = LoraVariant(dora=self.slots.any_dora(step.active_slots),
                              embedding=self.slots.any_adapts(step.active_slots, "embed_tokens"),
                              deltas=bool(step.active_slots))
        if not self.use_cuda_graphs:
            return self._step(inputs, variant, wait_for_layer)[:num_tokens]
        if wait_for_layer is not None:
            layered = self._layered.get((shape, variant)) or self._capture_layered(inputs, variant)
            return layered.replay(wait_for_layer)[:num_tokens]
        graph, hidden = self._graphs.get((shape, variant)) or self._capture(inputs, variant)
        graph.replay()
        return hidden[:num_tokens]

    def _inputs_of(self, shape: StepShape) -> StaticInputs:
        if shape not in self._inputs:
            self._inputs[shape] = StaticInputs(shape, self.slots.num_slots, self._lora_scratch, self.device)
        return self._inputs[shape]

    def _warm_up(self, inputs: StaticInputs, variant: LoraVariant) -> None:
        """Runs the step once on a side stream before capture (Triton compiles, allocator settles)."""
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step(inputs, variant)
        torch.cuda.current_stream().wait_stream(side)

    def _capture(self, inputs: StaticInputs, variant: LoraVariant) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        self._warm_up(inputs, variant)
        graph = torch.cuda.CUDAGraph()
        with _no_garbage_collection(), torch.cuda.graph(graph, pool=self._pool, capture_error_mode=CAPTURE_MODE):
            hidden = self._step(inputs, variant)
        self._graphs[(inputs.shape, variant)] = (graph, hidden)
        return graph, hidden

    def _capture_layered(self, inputs: StaticInputs, variant: LoraVariant) -> LayeredGraph:
        """Captures the step as `LayeredGraph` parts: each layer boundary (where a landing step
        waits) ends one capture and begins the next, in the shared pool and on one stream."""
        self._warm_up(inputs, variant)
        layered = LayeredGraph()

        def begin_part(_layer: int | None = None) -> None:
            if layered.parts:
                layered.parts[-1].capture_end()
            layered.parts.append(torch.cuda.CUDAGraph())
            layered.parts[-1].capture_begin(pool=self._pool, capture_error_mode=CAPTURE_MODE)

        torch.cuda.synchronize()
        with _no_garbage_collection(), torch.cuda.stream(torch.cuda.Stream(device=self.device)):
            begin_part()
            layered.hidden = self._step(inputs, variant, begin_part)
            layered.parts[-1].capture_end()
        self._layered[(inputs.shape, variant)] = layered
        return layered

    def _step(self, inputs: StaticInputs, variant: LoraVariant,
              wait_for_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        lora = _StaticLora(self.slots, inputs, use_triton=self.device.type == "cuda", variant=variant,
                           wait_for_layer=wait_for_layer, side_stream=self._lora_stream)
        keys, values = self.kv_cache.keys, self.kv_cache.values
        page_table, positions = inputs.device("page_table"), inputs.device("positions")
        on_gpu = self.device.type == "cuda"
        windows = [w or 0 for w in self.model.config.sliding_windows]
        if inputs.shape.mixed:
            attention = ragged_attention if on_gpu else ragged_attention_reference
            locate = inputs.device("attention_blocks") if on_gpu else inputs.device("token_rows")
            extra = (locate, positions)
        else:
            attention = decode_attention if on_gpu else decode_attention_reference
            extra = (inputs.device("seq_lens"),)

        def attend(index: int, q: torch.Tensor) -> torch.Tensor:
            return attention(q, keys(index), values(index), page_table, *extra, self.page_size,
                             self.model.scale, windows[index], self.model.config.attn_logit_softcap)

        return self.model.forward_tokens(inputs.device("input_ids"), inputs.device("positions"),
                                         inputs.device("kv_write"), self.kv_cache, lora, attend)


@contextmanager
def _no_garbage_collection() -> Iterator[None]:
    """Collects first, then keeps Python's collector off during a capture: a finalizer run
    mid-capture (a dropped CUDA graph's pool released, pinned memory freed) makes an implicitly
    synchronizing call, which invalidates the capture."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass(frozen=True)
class _StartedGroup:
    """A group whose LoRA work was launched on the side stream beside its base GEMM."""

    layer: int
    modules: tuple[str, ...]
    deltas: torch.Tensor | None  # [T, the modules' outputs side by side] if the expand ran there too


class _StaticLora:
    """The model's LoRA hook over the static buffers; waits per layer only if a load is landing.

    With a side stream (CUDA), each group's LoRA runs on it beside the base GEMM of the same
    input: both read memory at small batch, neither alone keeps the GPU's memory busy, and
    the LoRA kernels' launch and ramp gaps hide behind the GEMM. For batches up to
    `SPLIT_K_TOKENS` tokens (decodes, mixed steps with a prompt of a few hundred tokens) the
    whole delta (shrink, then expand into `LoraScratch.deltas`) runs there, and after both
    the kernel that next reads the GEMM's output adds it (`finish_deltas` returns it);
    larger batches (compute-bound, deltas too big to stage) run only the shrink there and
    the expand on the step's stream. The side stream forks after any per-layer wait and
    joins within the group, so a captured graph's parts each begin and end on the step's stream.
    With `variant.dora`, every delta is added in place and each adapted output then rescaled per
    token; with `variant.embedding`, each token's embedding delta is added to its embedding."""

    saved_embeddings = None  # steps with modules_to_save tables run eager (worker/engine.py)

    def __init__(self, slots: LoraSlots, inputs: StaticInputs, *, use_triton: bool, variant: LoraVariant,
                 wait_for_layer: Callable[[int], None] | None = None,
                 side_stream: torch.cuda.Stream | None = None) -> None:
        self.slots = slots
        self.inputs = inputs
        self.use_triton = use_triton
        self.adapted_modules = slots.a.keys() if variant.deltas else set()
        # Folded LoRA pays in steps carrying a prompt (H100, rank 16: mixed step 15.71 -> 14.64 ms); a
        # decode step's kernels beside its memory-bound GEMMs cost less (7.29 ms against 7.70 folded),
        # and read the same A (the slots' A is a view of the folded weights).
        self.fold = slots.folded is not None and inputs.shape.mixed
        self.dora = variant.dora
        self.embedding = variant.embedding
        self.wait_for_layer = wait_for_layer
        self.side_stream = side_stream
        self._started: _StartedGroup | None = None

    def embedding_delta(self, ids: torch.Tensor, inside: torch.Tensor | None) -> torch.Tensor | None:
        """Padding and base-model tokens (slot NO_ADAPTER) read the slots' zero row."""
        if not self.embedding:
            return None
        return self.slots.embedding_delta(ids, inside, self.inputs.device("token_slots"))

    def before_layer(self, layer: int) -> None:
        if self.wait_for_layer is not None:
            self.wait_for_layer(layer)

    def gemm_operands(self, layer: int, modules: Sequence[str], weight: torch.Tensor,
                      bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        folded = self.slots.folded_operands(layer, modules) if self.fold and self._adapts(modules) else None
        return folded or (weight, bias)

    def _adapts(self, modules: Sequence[str]) -> bool:
        return any(m in self.adapted_modules for m in modules)

    def start_deltas(self, x: torch.Tensor, layer: int, modules: Sequence[str]) -> None:
        adapted = tuple(m for m in modules if m in self.adapted_modules)
        # A side stream exists only on CUDA (Triton); a folded group's LoRA is in its GEMM.
        if self.side_stream is None or not adapted or (self.fold and self.slots.folds(modules)):
            return
        blocks, scratch, block_m = self.inputs.device("blocks"), self.inputs.lora_scratch, self.inputs.block_m
        deltas = self._deltas_buffer(x.shape[0], adapted)
        self.side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side_stream):
            lora_shrink(x, [self.slots.a[m][layer] for m in adapted], blocks, scratch, block_m=block_m)
            if deltas is not None:  # rows of base-model tokens stay unwritten (StagedDeltas)
                lora_expand([self.slots.b_t[m][layer] for m in adapted], self._split(deltas, adapted), blocks,
                            scratch, accumulate=False, block_m=block_m)
        self._started = _StartedGroup(layer, adapted, deltas)

    def _deltas_buffer(self, num_tokens: int, modules: Sequence[str]) -> torch.Tensor | None:
        staging = self.inputs.lora_scratch.deltas
        columns = sum(self.slots.b_t[m].shape[-1] for m in modules)
        if num_tokens > staging.shape[0] or columns > staging.shape[1]:
            return None
        return staging.view(-1)[:num_tokens * columns].view(num_tokens, columns)  # contiguous, as the kernels want

    def _split(self, deltas: torch.Tensor, modules: Sequence[str]) -> list[torch.Tensor]:
        return list(deltas.split([self.slots.b_t[m].shape[-1] for m in modules], dim=1))

    def finish_deltas(self, x: torch.Tensor, layer: int, outputs: Sequence[tuple[str, torch.Tensor]],
                      shrunk: torch.Tensor | None = None) -> LoraDeltas | None:
        adapted = [(module, out) for module, out in outputs if module in self.adapted_modules]
        started, self._started = self._started, None
        if shrunk is not None:
            return self.slots.folded_deltas(layer, [module for module, _ in outputs], shrunk,
                                            self.inputs.device("blocks"), self.inputs.block_m,
                                            self.inputs.device("token_slots"))
        if not adapted:
            return None
        group = [ModuleDelta(self.slots.a[module][layer], self.slots.b_t[module][layer], out) for module, out in adapted]
        blocks, block_m = self.inputs.device("blocks"), self.inputs.block_m
        if not self.use_triton:
            for module in group:
                add_lora_delta_reference(module.out, x, module.a, module.b_t, self.inputs.device("token_slots"),
                                         self.slots.max_rank)
        elif started is not None and (started.layer, started.modules) == (layer, tuple(m for m, _ in adapted)):
            torch.cuda.current_stream().wait_stream(self.side_stream)
            if started.deltas is None:
                lora_expand([m.b_t for m in group], [m.out for m in group], blocks, self.inputs.lora_scratch,
                            block_m=block_m)
            else:
                staged = StagedDeltas(started.deltas, self.inputs.device("token_slots"))
                if len(adapted) == len(outputs) and not self.dora:
                    return staged  # the caller's next kernel adds them
                for module, delta in zip(group, self._split(staged.dense(), started.modules)):
                    module.out.add_(delta)
        else:
            add_lora_deltas(x, group, blocks, self.inputs.lora_scratch, block_m)
        if self.dora:
            self._rescale(layer, adapted)
        return None

    def _rescale(self, layer: int, adapted: Sequence[tuple[str, torch.Tensor]]) -> None:
        """DoRA: out = scale * (out + delta) + shift per token; padding and base-model tokens
        (slot NO_ADAPTER, -1) read the buffers' last row, which is the identity."""
        token_slots = self.inputs.device("token_slots")
        for module, out in adapted:
            out.mul_(self.slots.scale[module][layer][token_slots])
            out.add_(self.slots.shift[module][layer][token_slots])
