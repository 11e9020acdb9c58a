"""Decode steps over fixed-size device buffers, replayed from CUDA graphs on the GPU.

A decode-only batch (one new token per sequence) is padded to a batch-size bucket and a
page-table width bucket. Everything the step reads lives in per-shape static buffers,
refilled before each step by one host-to-device copy: token ids, positions, KV write
indices, page tables, sequence lengths, per-token slots and the multi-LoRA block table. On
CUDA the whole forward (embedding to final norm, 2 kernels per adapted module, the paged
decode-attention kernel) is captured once per shape and replayed, so a step costs a few
launches instead of thousands. On CPU the same step runs eagerly with the torch reference
kernels, which is how CI covers the buffer logic.

Padding rows read page 0, have length 0 (attention output 0), no adapter, and write their
keys and values to the KV cache's scratch row. A batch whose adapter is still landing does
not come here: the eager path waits per layer on the copy (see `Engine.forward`).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from worker.batch import NO_ADAPTER, SequenceInput
from worker.kernels.decode_attention import decode_attention, decode_attention_reference
from worker.kernels.lora_blocks import BLOCK_COLUMNS, lora_blocks, max_blocks
from worker.kernels.multi_lora import add_lora_delta, add_lora_delta_reference, shrink_partials_shape
from worker.kv_cache import PagedKVCache
from worker.lora.slots import LoraSlots
from worker.model.llama import LlamaModel

BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)
MIN_PAGE_BUCKET = 64  # 1024 tokens at page size 16; widths grow 4x, so few shapes are ever captured


@dataclass(frozen=True)
class DecodeShape:
    batch: int  # padded number of sequences
    pages: int  # page-table width


def decode_shape(num_sequences: int, pages_needed: int) -> DecodeShape:
    batch = BATCH_BUCKETS[bisect.bisect_left(BATCH_BUCKETS, num_sequences)]
    pages = MIN_PAGE_BUCKET
    while pages < pages_needed:
        pages *= 4
    return DecodeShape(batch, pages)


class StaticInputs:
    """The device buffers of one shape (views of one int64 block) and their pinned host twin."""

    def __init__(self, shape: DecodeShape, num_slots: int, lora_scratch: tuple[torch.Tensor, torch.Tensor],
                 device: torch.device) -> None:
        self.shape = shape
        b, w = shape.batch, shape.pages
        self.num_block_rows = max_blocks(b, num_slots)
        sizes = {"input_ids": b, "positions": b, "kv_write": b, "seq_lens": b, "token_slots": b,
                 "blocks": self.num_block_rows * BLOCK_COLUMNS, "page_table": b * w}
        on_gpu = device.type == "cuda"
        self.host = torch.zeros(sum(sizes.values()), dtype=torch.long, pin_memory=on_gpu)
        self.device_block = torch.zeros_like(self.host, device=device)
        self._host_views, self._device_views, offset = {}, {}, 0
        for name, size in sizes.items():
            self._host_views[name] = self.host.numpy()[offset:offset + size]
            self._device_views[name] = self.device_block[offset:offset + size]
            offset += size
        self.lora_partials, self.lora_shrunk = lora_scratch[0][:, :b], lora_scratch[1][:b]
        self._copied = torch.cuda.Event() if on_gpu else None

    def device(self, name: str) -> torch.Tensor:
        view = self._device_views[name]
        if name == "page_table":
            return view.view(self.shape.batch, self.shape.pages)
        if name == "blocks":
            return view.view(self.num_block_rows, BLOCK_COLUMNS)
        return view

    def fill(self, sequences: Sequence[SequenceInput], slot_ranks: Sequence[int], page_size: int,
             scratch_index: int) -> None:
        """Writes the batch (sorted by slot) into the host twin and copies it to the device."""
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has read the host twin
        host = self._host_views
        count = len(sequences)
        host["page_table"][:] = 0
        page_table = host["page_table"].reshape(self.shape.batch, self.shape.pages)
        for row, seq in enumerate(sequences):
            pages = -(-seq.total_len // page_size)
            page_table[row, :pages] = seq.page_table[:pages]
        positions = np.fromiter((seq.context_len for seq in sequences), dtype=np.int64, count=count)
        host["input_ids"][:] = 0
        host["input_ids"][:count] = [seq.token_ids[0] for seq in sequences]
        host["positions"][:] = 0
        host["positions"][:count] = positions
        host["kv_write"][:] = scratch_index
        rows = np.arange(count)
        host["kv_write"][:count] = page_table[rows, positions // page_size] * page_size + positions % page_size
        host["seq_lens"][:] = 0
        host["seq_lens"][:count] = positions + 1
        slots = [seq.adapter_slot for seq in sequences]
        host["token_slots"][:] = NO_ADAPTER
        host["token_slots"][:count] = slots
        host["blocks"][:] = lora_blocks(slots, slot_ranks, self.num_block_rows).reshape(-1)
        self.device_block.copy_(self.host, non_blocking=True)
        if self._copied is not None:
            self._copied.record()


class DecodeRunner:
    def __init__(self, model: LlamaModel, kv_cache: PagedKVCache, slots: LoraSlots, *, page_size: int,
                 max_batch: int, use_cuda_graphs: bool) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.slots = slots
        self.page_size = page_size
        self.max_batch = min(max_batch, BATCH_BUCKETS[-1])
        self.device = kv_cache.memory.device
        self.use_cuda_graphs = use_cuda_graphs and self.device.type == "cuda"
        self._inputs: dict[DecodeShape, StaticInputs] = {}
        self._graphs: dict[DecodeShape, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_cuda_graphs else None
        # The multi-LoRA kernels' scratch, shared by every shape (graphs never run concurrently).
        max_in = max((a.shape[-1] for a in slots.a.values()), default=1)
        self._lora_scratch = (
            torch.zeros(shrink_partials_shape(self.max_batch, max_in, slots.max_rank), device=self.device),
            torch.zeros(self.max_batch, slots.max_rank, dtype=model.dtype, device=self.device),
        )

    def supports(self, sequences: Sequence[SequenceInput]) -> bool:
        return len(sequences) <= self.max_batch and all(len(seq.token_ids) == 1 for seq in sequences)

    @property
    def graphs_captured(self) -> int:
        return len(self._graphs)

    def capture_all(self) -> None:
        """Captures every batch bucket at the first width now, not in the middle of serving."""
        if self.use_cuda_graphs:
            for batch in BATCH_BUCKETS:
                shape = DecodeShape(batch, MIN_PAGE_BUCKET)
                if batch <= self.max_batch and shape not in self._graphs:
                    self._capture(self._inputs.get(shape) or self._new_inputs(shape))

    def run(self, sequences: Sequence[SequenceInput]) -> torch.Tensor:
        """Final-normed hidden states [len(sequences), hidden]; sequences sorted by adapter slot."""
        pages = max(-(-seq.total_len // self.page_size) for seq in sequences)
        shape = decode_shape(len(sequences), pages)
        inputs = self._inputs.get(shape) or self._new_inputs(shape)
        slot_ranks = [self.slots.adapter_rank(slot) for slot in range(self.slots.num_slots)]
        inputs.fill(sequences, slot_ranks, self.page_size, self.kv_cache.scratch_index)
        if not self.use_cuda_graphs:
            return self._step(inputs)[:len(sequences)]
        graph, hidden = self._graphs.get(shape) or self._capture(inputs)
        graph.replay()
        return hidden[:len(sequences)]

    def _new_inputs(self, shape: DecodeShape) -> StaticInputs:
        inputs = StaticInputs(shape, self.slots.num_slots, self._lora_scratch, self.device)
        self._inputs[shape] = inputs
        return inputs

    def _capture(self, inputs: StaticInputs) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warms up (Triton compiles, allocator settles) on a side stream, then captures."""
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step(inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            hidden = self._step(inputs)
        self._graphs[inputs.shape] = (graph, hidden)
        return graph, hidden

    def _step(self, inputs: StaticInputs) -> torch.Tensor:
        lora = _StaticLora(self.slots, inputs, use_triton=self.device.type == "cuda")
        keys, values = self.kv_cache.keys, self.kv_cache.values
        page_table, seq_lens = inputs.device("page_table"), inputs.device("seq_lens")
        attention = decode_attention if self.device.type == "cuda" else decode_attention_reference
        windows = [w or 0 for w in self.model.config.sliding_windows]

        def attend(index: int, q: torch.Tensor) -> torch.Tensor:
            return attention(q, keys(index), values(index), page_table, seq_lens, self.page_size,
                             self.model.scale, windows[index])

        return self.model.forward_tokens(inputs.device("input_ids"), inputs.device("positions"),
                                         inputs.device("kv_write"), self.kv_cache, lora, attend)


class _StaticLora:
    """The model's LoRA hook over the static buffers: no waits (no adapter of the batch is landing)."""

    def __init__(self, slots: LoraSlots, inputs: StaticInputs, *, use_triton: bool) -> None:
        self.slots = slots
        self.inputs = inputs
        self.use_triton = use_triton

    def before_layer(self, layer: int) -> None:
        return None

    def add_delta(self, out: torch.Tensor, x: torch.Tensor, layer: int, module: str) -> None:
        if module not in self.slots.a:
            return
        a, b_t = self.slots.a[module][layer], self.slots.b_t[module][layer]
        if self.use_triton:
            add_lora_delta(out, x, a, b_t, self.inputs.device("blocks"), self.inputs.lora_partials,
                           self.inputs.lora_shrunk)
        else:
            add_lora_delta_reference(out, x, a, b_t, self.inputs.device("token_slots"), self.slots.max_rank)
