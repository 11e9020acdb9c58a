"""The worker engine: executes the scheduler's commands, owns every tensor.

Mechanism only: which adapter goes to which slot, what to stage ahead or evict, is decided by
the caller (a load stages an adapter the host cache lacks). Commands never block on a copy
unless asked to (`blocking=True`, the seed's baseline); `poll` reports finished staging and
loads without blocking.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from settings.config import EngineConfig
from worker.batch import NO_ADAPTER, ForwardOutput, SampledToken, SequenceInput
from worker.errors import (
    AdapterNotFoundError,
    AdapterStateError,
    CapacityError,
    CorruptAdapterError,
    ModelLoadError,
    UnsupportedAdapterError,
)
from worker.graph_step import GraphStepRunner
from worker.host_upload import index_tensor
from worker.kernels.lora_blocks import PROMPT_BLOCK_M, lora_blocks
from worker.kernels.staged_deltas import FoldedDeltas
from worker.kv_cache import PagedKVCache
from worker.lora.adapter import AdapterManifest, read_adapter_manifest
from worker.lora.copier import CudaCopier, LayerCopiedHook, LoadJob, ThreadCopier
from worker.lora.dora import base_module_weights
from worker.lora.folded import FOLD_RANK, FoldedWeights
from worker.lora.host_cache import HostCache, LayerReadHook, SharedStaging
from worker.lora.shared_host_memory import SharedHostMemory, SharedLayout
from worker.lora.peft_config import VOCAB_MODULES
from worker.lora.slots import LoraSlots
from worker.lora.vocab import lora_shapes
from worker.model.config import DTYPES, ModelConfig, load_model_config
from worker.model.llama import LlamaModel, ModelWeights, fuse_weights
from worker.model.weights import dummy_weights, load_safetensors
from worker.sampling import DeviceSample, sample_on_device, to_host, validate_sampling
from worker.tensor_parallel import EmbeddingReplace, TensorParallel
from worker.step_inputs import (
    PreviousTokens,
    StepInputs,
    build_step_inputs,
    eager_step_tensors,
    feed_previous_tokens,
    previous_token_sources,
)
from worker.timeline import COMPUTE_LANE, COPY_LANE, Timeline


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: Path
    rank: int
    nbytes: int
    modules: frozenset[str]  # by the adapter's names (Phi-3's fused qkv_proj, gate_up_proj)
    ranks: list[int]
    alphas: list[float]
    dora: bool
    extra_modules: frozenset[str] = frozenset()  # modules_to_save it replaces: it needs a saved-module slot


@dataclass(frozen=True)
class PendingForward:
    """A forward queued on the GPU; `Engine.finish` waits for its tokens."""

    step: StepInputs
    sampled_rows: list[int]  # indices into step.sequences of the sequences that sample
    sampled: DeviceSample | None
    logits: dict[str, torch.Tensor] | None
    done: torch.cuda.Event | None  # after the tokens' host copies; None on CPU (already run)

    def is_done(self) -> bool:
        return self.done is None or self.done.query()


@dataclass(frozen=True)
class LoadReport:
    staged: list[str] = field(default_factory=list)
    loaded: list[tuple[str, int]] = field(default_factory=list)  # (adapter, slot)
    copy_seconds: dict[str, float] = field(default_factory=dict)  # of the loaded adapters whose copy was timed
    copying: dict[str, float] = field(default_factory=dict)  # the loads still copying: the share of layers landed
    failed: list[tuple[str, Exception]] = field(default_factory=list)


class Engine:
    def __init__(self, config: EngineConfig, *, load_hook: LayerCopiedHook | None = None,
                 read_hook: LayerReadHook | None = None, tp: TensorParallel = TensorParallel()) -> None:
        """`load_hook` runs after each layer of an adapter's copy to its slot, `read_hook` before each layer
        of its read from disk (tests slow them down); `tp`: this engine's rank in a tensor-parallel group,
        whose every rank runs the same calls in the same order."""
        self.config = config
        self.tp = tp
        self.device = _device(config.device, tp)
        self.model_config = load_model_config(config.model_path)
        tp.check(self.model_config)
        if config.context_length is not None and config.context_length > self.model_config.max_position_embeddings:
            raise ModelLoadError(f"--context-length {config.context_length} exceeds the model's "
                                 f"max_position_embeddings ({self.model_config.max_position_embeddings}): "
                                 "give at most that, or leave it unset")
        self.model_config.check_served_context(config.context_length or self.model_config.max_position_embeddings)
        self.dtype = _dtype(config.dtype, self.model_config)
        # This rank's heads and intermediate slice: what its KV cache, slots and host cache hold.
        self.shard_config = tp.local_config(self.model_config)
        self.model = LlamaModel(self.shard_config, self._load_weights(), self.device, tp)
        c = self.shard_config
        self.kv_cache = PagedKVCache(
            num_layers=c.num_layers, num_pages=config.num_kv_pages, page_size=config.page_size,
            num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=self.dtype, device=self.device,
        )
        vocab_rows = tp.vocab_rows(self.model_config)[1]
        folded = (FoldedWeights(self.model.weights, config.lora_target_modules, config.max_loras_per_batch)
                  if config.lora_fold else None)
        self.slots = LoraSlots(
            c, num_slots=config.max_loras_per_batch, max_rank=FOLD_RANK if folded else config.max_lora_rank,
            modules=config.lora_target_modules, dtype=self.dtype, device=self.device,
            base_weights=base_module_weights(self.model.weights, c), vocab_rows=vocab_rows,
            saved_module_slots=config.saved_module_slots, folded=folded,
        )
        on_gpu = self.device.type == "cuda"
        # Every LoRA module's shapes on this rank, the vocabulary modules' included: what it stages.
        self.lora_shapes = lora_shapes(c, vocab_rows)
        self.host_cache = HostCache(self.lora_shapes, config.host_cache_bytes, config.max_loaded_loras, self.dtype,
                                    pin=on_gpu, shared=self._shared_staging(pin=on_gpu), agree=tp.agree)
        self.host_cache.read_hook = read_hook
        self.copier = (CudaCopier(self.slots, c.num_layers, self.device, load_hook) if on_gpu
                       else ThreadCopier(self.slots, c.num_layers, load_hook))
        self.timeline = Timeline(self.device)
        self.graph_runner = GraphStepRunner(
            self.model, self.kv_cache, self.slots, page_size=config.page_size,
            max_batch=config.max_decode_batch, use_cuda_graphs=config.cuda_graphs, mixed=config.static_mixed,
        ) if config.static_decode else None
        self.adapters: dict[str, AdapterManifest] = {}
        self.pending: dict[int, LoadJob] = {}  # slot -> load in flight
        # Slots whose load failed, until loaded again. A forward the scheduler sent before it
        # learned of the failure may still name one: it runs (those tokens see no adapter, and
        # the scheduler drops them with their requests) instead of failing its whole batch.
        self.failed_slots: set[int] = set()
        # Slots whose load in flight a queued forward has already waited on, layer by layer:
        # forwards queued after it on the same stream need no waits of their own.
        self._waited_on: set[int] = set()
        self._previous: PreviousTokens | None = None  # what the last launched forward sampled

    def _shared_staging(self, pin: bool) -> SharedStaging | None:
        """Under tensor parallelism: this rank's part in the host cache its group shares."""
        tp = self.tp
        if not tp.enabled:
            return None
        if tp.host_memory is None:
            raise ModelLoadError("a tensor-parallel rank needs its group's shared host memory")
        memory = SharedHostMemory(tp.host_memory, SharedLayout.of(self.config, tp.size), tp.rank, pin)
        slices = [functools.partial(replace(tp, rank=rank).lora_slices, self.model_config) for rank in range(tp.size)]
        return SharedStaging(memory, tp.rank, slices)

    # Adapters -------------------------------------------------------------------------

    def register_adapter(self, name: str, path: str | Path) -> AdapterInfo:
        """Validates the adapter's files against this model; reads no weights."""
        if name in self.adapters:
            raise AdapterStateError(f"adapter {name!r} is already registered")
        manifest = read_adapter_manifest(path, self.model_config, self.config.max_lora_rank)
        self.slots.check_servable(name, manifest.modules)
        if manifest.dora and self.slots.folded is not None:
            raise UnsupportedAdapterError(f"adapter {name!r} is a DoRA adapter (use_dora), which --lora-fold does not "
                                          "serve (its per-token rescaling follows the delta): serve it without "
                                          "--lora-fold")
        if manifest.dora and self.tp.enabled:
            # A row-parallel module's weight norms would need the other ranks' input columns.
            raise UnsupportedAdapterError(f"adapter {name!r} is a DoRA adapter (use_dora), which is not served "
                                          f"with tensor parallelism (--tensor-parallel-size {self.tp.size})")
        self._check_saved_modules_servable(name, manifest)
        vocab = sorted((manifest.modules | manifest.saved_modules) & set(VOCAB_MODULES))
        if vocab and self.model_config.vocab_size % self.tp.size:
            # A rank's part of the vocabulary would be padded, and the file's slice shorter than it.
            raise UnsupportedAdapterError(
                f"adapter {name!r} adapts {vocab}, which is not served with --tensor-parallel-size {self.tp.size}: "
                f"it does not divide the vocabulary ({self.model_config.vocab_size} tokens)")
        self.adapters[name] = manifest
        return self.adapter_info(name)

    def _check_saved_modules_servable(self, name: str, manifest: AdapterManifest) -> None:
        """An adapter replacing the embedding or LM head (modules_to_save) needs slots that own tables."""
        if manifest.saved_modules and not self.config.saved_module_slots:
            raise UnsupportedAdapterError(
                f"adapter {name!r} replaces {sorted(manifest.saved_modules)} (modules_to_save), which needs GPU "
                f"slots with their own tables: start the server with --saved-module-slots N (each such slot takes "
                f"{self.slots.table_bytes()} bytes of GPU memory)")

    def adapter_info(self, name: str) -> AdapterInfo:
        manifest = self._manifest(name)
        nbytes = manifest.nbytes(self.lora_shapes, self.dtype.itemsize)  # what one rank holds
        return AdapterInfo(name, manifest.path, manifest.max_rank, nbytes, manifest.target_modules, manifest.ranks,
                           manifest.alphas, manifest.dora, manifest.saved_modules)

    def unregister_adapter(self, name: str) -> None:
        self._manifest(name)
        if name in self.slots.occupants:
            raise AdapterStateError(f"adapter {name!r} occupies a GPU slot; evict it first")
        self.host_cache.evict(name)
        del self.adapters[name]

    def stage_adapter(self, name: str) -> None:
        """Starts reading the adapter from disk into the pinned host cache."""
        self.host_cache.stage(name, self._manifest(name))

    def wait_staged(self, name: str) -> None:
        self._manifest(name)
        if name not in self.host_cache.entries:
            raise AdapterStateError(f"adapter {name!r} is not being staged")
        self.host_cache.wait(name)

    def evict_host(self, name: str) -> None:
        self.host_cache.evict(name)

    def load_adapter(self, name: str, slot: int, *, blocking: bool = False) -> None:
        """Copies an adapter into `slot` on a load stream, staging it first if the host cache
        lacks it. One still being read from disk streams: each layer's copy waits for its read.
        Blocking (the seed's baseline) reads the whole adapter, then copies it and waits."""
        if name not in self.host_cache.entries:
            self.stage_adapter(name)
        if blocking:
            self.wait_staged(name)
        adapter = self.host_cache.entries[name]
        self._check_slot_free_for(name, slot)
        self.slots.assign(slot, adapter)
        self.failed_slots.discard(slot)
        self._waited_on.discard(slot)
        job = LoadJob(name, slot, adapter, adapter.nbytes)
        adapter.copies_in_flight += 1
        self.pending[slot] = job
        job.blocking = blocking
        job.streamed = not adapter.progress.done  # its span then includes waiting for the disk
        self.copier.start(job)
        if blocking:
            self.copier.wait(job)

    def evict_slot(self, slot: int) -> None:
        if slot in self.pending:
            raise AdapterStateError(f"slot {slot} has a load in flight")
        self.slots.clear(slot)

    def slot_of(self, name: str) -> int | None:
        return self.slots.occupants.index(name) if name in self.slots.occupants else None

    @property
    def busy_loading(self) -> bool:
        """True while staging or slot loads are in flight (worth polling for)."""
        return bool(self.pending) or self.host_cache.staging_in_progress

    def poll(self) -> LoadReport:
        """Finished staging and loads since the last poll; never blocks.

        Loads first: a failed read is reported once, by the host cache, after the streamed
        load that was draining its region has finished."""
        report = LoadReport()
        jobs = list(self.pending.values())  # in the same order on every rank: they ran the same commands
        done = [self.copier.is_done(job) for job in jobs]
        failed = [is_done and _load_error(job) is not None for job, is_done in zip(jobs, done)]
        done, failed = self.tp.agree(done, failed)  # a load is done once every rank has it
        for job, is_done, failed_somewhere in zip(jobs, done, failed):
            if is_done:
                self._finish_load(job, report, failed_somewhere)
            else:
                report.copying[job.name] = self._layers_landed(job) / self.model_config.num_layers
        for result in self.host_cache.poll():
            if result.error is None:
                report.staged.append(result.name)
            else:
                report.failed.append((result.name, result.error))
        return report

    def _layers_landed(self, job: LoadJob) -> int:
        """Its layers land in order (one stream, or one thread): each poll queries only those
        not yet seen landed, at most one that has not."""
        while (job.layers_seen_landed < self.model_config.num_layers
               and self.copier.layer_copied(job, job.layers_seen_landed)):
            job.layers_seen_landed += 1
        return job.layers_seen_landed

    def _finish_load(self, job: LoadJob, report: LoadReport, failed_somewhere: bool) -> None:
        del self.pending[job.slot]
        self._waited_on.discard(job.slot)
        job.adapter.copies_in_flight -= 1
        read_error = job.adapter.progress.error
        self._add_copy_span(job)
        if not failed_somewhere:
            report.loaded.append((job.name, job.slot))
            if (copy_s := self.copier.copy_seconds(job)) is not None:
                report.copy_seconds[job.name] = copy_s
            return
        self.slots.clear(job.slot)
        self.failed_slots.add(job.slot)
        if read_error is None:  # a read error is the host cache's to report
            report.failed.append((job.name, _load_error(job) or CorruptAdapterError(
                f"loading adapter {job.name!r} failed on another tensor-parallel rank")))

    def _add_copy_span(self, job: LoadJob) -> None:
        """The load's span on the timeline: timed by its stream's events on CUDA (recorded by
        the copier's thread, so added once it is through), by the copying thread's clock on CPU."""
        args = dict(slot=job.slot, bytes=job.nbytes, blocking=job.blocking, streamed=job.streamed)
        if job.copy_started is not None and job.finished.exception() is None:
            self.timeline.add_gpu_span(COPY_LANE, job.name, job.copy_started, job.layer_ready[-1], **args)
        elif job.host_copy_span is not None:
            self.timeline.add_host_span(COPY_LANE, job.name, *job.host_copy_span, **args)

    # Forward --------------------------------------------------------------------------

    def forward(self, inputs: Sequence[SequenceInput], *, return_logits: bool = False) -> ForwardOutput:
        """Runs one forward and waits for its tokens."""
        return self.finish(self.launch(inputs, return_logits=return_logits))

    def launch(self, inputs: Sequence[SequenceInput], *, return_logits: bool = False) -> PendingForward:
        """Validates the batch, then queues its forward and sampling on the GPU without waiting.

        Sequences marked `previous_token` read the token their request sampled in the forward
        launched just before this one, on the device: the next step can be queued before the
        host has seen the current one's tokens. A failed launch leaves no previous tokens.
        """
        previous, self._previous = self._previous, None
        for seq in inputs:
            validate_sampling(seq.sampling)
            self._check_slot_served(seq)
        step = build_step_inputs(inputs, page_size=self.config.page_size, num_pages=self.config.num_kv_pages,
                                 vocab_size=self.model_config.vocab_size)
        sources = previous_token_sources(step, previous)
        # Steps with an adapter's own embedding or LM head table (modules_to_save) run eager.
        static = (self.graph_runner is not None and self.graph_runner.supports(step.sequences)
                  and not self.slots.any_saves(step.active_slots))
        landing = self._landing(step.active_slots)
        span = self.timeline.begin(COMPUTE_LANE, "forward", sequences=len(inputs), tokens=step.num_tokens,
                                   adapters=sorted({self.slots.occupants[s] for s in step.active_slots}),
                                   path=_path_name(static, landing))

        def feed(input_ids: torch.Tensor) -> None:
            if sources:
                feed_previous_tokens(input_ids, sources, previous)

        with torch.inference_mode(), self.copier.reading(step.active_slots):
            if static:
                hidden = self.graph_runner.run(step, feed, self._layer_waits(landing))
            else:
                hidden = self._eager_forward(step, feed, landing)
            sampled_rows, sampled = self._sample(step, hidden)
            self._waited_on.update(job.slot for job in landing)
            self.timeline.end(span)
            done = None
            if self.device.type == "cuda":  # passed once the tokens' copies to the host are done
                done = torch.cuda.Event()
                done.record()
            logits = self._all_logits(step, hidden) if return_logits else None
        if sampled is not None:
            self._previous = PreviousTokens(sampled.token_ids, {step.sequences[i].request_id: row
                                                                for row, i in enumerate(sampled_rows)})
        return PendingForward(step, sampled_rows, sampled, logits, done)

    def finish(self, pending: PendingForward) -> ForwardOutput:
        """Waits for a launched forward's tokens; they come in the caller's order."""
        if pending.sampled is None:
            return ForwardOutput(tokens=[], logits=pending.logits)
        if pending.done is not None:
            pending.done.synchronize()  # this forward's tokens only, not a forward queued after it
        token_ids, logprobs = to_host(pending.sampled)
        step = pending.step
        by_caller_order = sorted((step.order[i], step.sequences[i].request_id, token, logprob)
                                 for i, token, logprob in zip(pending.sampled_rows, token_ids, logprobs))
        return ForwardOutput(tokens=[SampledToken(request_id, token, logprob)
                                     for _, request_id, token, logprob in by_caller_order],
                             logits=pending.logits)

    def _landing(self, active_slots: Iterable[int]) -> list[LoadJob]:
        """The loads still copying into slots this forward reads, that no queued forward waited on."""
        return [self.pending[slot] for slot in active_slots if slot in self.pending and slot not in self._waited_on]

    def _layer_waits(self, landing: list[LoadJob]) -> Callable[[int], None] | None:
        """Per-layer waits on the landing copies (the static path then replays a graph per layer)."""
        if not landing:
            return None

        def wait(layer: int) -> None:
            for job in landing:
                self.copier.wait_layer(job, layer)
        return wait

    def _eager_forward(self, step: StepInputs, feed: Callable[[torch.Tensor], None],
                       landing: list[LoadJob]) -> torch.Tensor:
        tensors = eager_step_tensors(step, page_size=self.config.page_size, device=self.device)
        feed(tensors.input_ids)
        return self.model.forward(tensors, self.kv_cache, _ForwardLora(self, step, landing))

    def _sample(self, step: StepInputs, hidden: torch.Tensor) -> tuple[list[int], DeviceSample | None]:
        """Queues the sampling of every sequence that samples: (their indices, tokens on the device)."""
        chosen = [i for i, seq in enumerate(step.sequences) if seq.sample]
        if not chosen:
            return chosen, None
        last_tokens = (step.seq_starts[chosen] + step.token_counts[chosen] - 1).tolist()
        logits = self.model.logits(hidden[index_tensor(last_tokens, self.device)], self._lm_head_lora(step, chosen),
                                   self._saved_lm_head(step, chosen))
        seqs = [step.sequences[i] for i in chosen]
        return chosen, sample_on_device(logits, [s.sampling for s in seqs], [s.total_len for s in seqs])

    def _all_logits(self, step: StepInputs, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.model.logits(hidden, self._lm_head_lora(step, None), self._saved_lm_head(step, None)).cpu()
        return {
            seq.request_id: logits[start:start + count]
            for seq, start, count in zip(step.sequences, step.seq_starts.tolist(), step.token_counts.tolist())
        }

    def _lm_head_lora(self, step: StepInputs, sampled: list[int] | None
                      ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The LM head's LoRA deltas of the logits of the `sampled` sequences' last tokens (None:
        of every token); None, and no per-row work, when no adapter of the step adapts the LM head."""
        if not self.slots.any_adapts(step.active_slots, "lm_head"):
            return None
        row_slots = step.token_slots if sampled is None else [step.sequences[i].adapter_slot for i in sampled]
        slots = index_tensor(row_slots, self.device)
        return lambda hidden: self.slots.lm_head_delta(hidden, slots)

    def _saved_lm_head(self, step: StepInputs, sampled: list[int] | None
                       ) -> Callable[[torch.Tensor, torch.Tensor], None] | None:
        """Overwrites the logits of the `sampled` sequences' last tokens (None: of every token) whose
        adapter replaces the LM head (modules_to_save) with its table's; None, and no per-row work,
        when no adapter of the step replaces anything."""
        if not self.slots.any_saves(step.active_slots):
            return None
        row_slots = step.token_slots.tolist() if sampled is None else [step.sequences[i].adapter_slot
                                                                       for i in sampled]
        rows_by_slot = _rows_by_slot(row_slots, lambda slot: self.slots.replaces(slot, "lm_head"), self.device)
        if not rows_by_slot:
            return None
        return lambda logits, hidden: self.slots.saved_logits(logits, hidden, rows_by_slot)

    def close(self) -> None:
        self.copier.close()
        self.host_cache.close()

    # Helpers --------------------------------------------------------------------------

    def _load_weights(self) -> ModelWeights:
        path = Path(self.config.model_path)
        if self.config.load_format == "dummy":
            tensors = dummy_weights(self.model_config, self.dtype, self.device, self.config.seed, self.tp)
        elif self.config.load_format == "safetensors":
            tensors = load_safetensors(path, self.model_config, self.dtype, self.device, self.tp)
        else:
            raise ValueError(f"load_format must be 'safetensors' or 'dummy', got {self.config.load_format!r}")
        return fuse_weights(self.model_config, tensors)

    def _manifest(self, name: str) -> AdapterManifest:
        if name not in self.adapters:
            raise AdapterNotFoundError(f"adapter {name!r} is not registered")
        return self.adapters[name]

    def _check_slot_free_for(self, name: str, slot: int) -> None:
        if not 0 <= slot < self.slots.num_slots:
            raise CapacityError(f"slot {slot} outside [0, {self.slots.num_slots})")
        if slot in self.pending:
            raise AdapterStateError(f"slot {slot} has a load in flight")
        other = self.slot_of(name)
        if other is not None and other != slot:
            raise AdapterStateError(f"adapter {name!r} already occupies slot {other}")

    def _check_slot_served(self, seq: SequenceInput) -> None:
        slot = seq.adapter_slot
        if slot == NO_ADAPTER:
            return
        served = 0 <= slot < self.slots.num_slots and self.slots.occupants[slot] is not None
        if not served and slot not in self.failed_slots:
            raise ValueError(f"request {seq.request_id}: adapter slot {slot} holds no adapter")


class _ForwardLora:
    """The model's LoRA hook for one forward: waits per layer on loads still landing."""

    def __init__(self, engine: Engine, step: StepInputs, landing: list[LoadJob]) -> None:
        self.slots = engine.slots
        self.copier = engine.copier
        self.batch = engine.slots.segment_batch(step.token_slots.tolist(), engine.device)
        self.landing = landing
        self.token_slots = (index_tensor(step.token_slots, engine.device)
                            if engine.slots.any_adapts(step.active_slots, "embed_tokens") else None)
        self.saved_embeddings = self._saved_embeddings(engine, step)
        self.folded_blocks = self._folded_blocks(engine, step)

    def _folded_blocks(self, engine: Engine, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor] | None:
        """With LoRA folded and a token with an adapter: the folded readers' block table and the
        tokens' slots, on the device."""
        if engine.slots.folded is None or self.batch is None:
            return None
        blocks = lora_blocks(step.token_slots, engine.slots.adapter_ranks(), block_m=PROMPT_BLOCK_M)
        return index_tensor(blocks, engine.device), index_tensor(step.token_slots, engine.device)

    def _saved_embeddings(self, engine: Engine, step: StepInputs) -> EmbeddingReplace | None:
        """The tokens whose adapter replaces the embedding (modules_to_save), looked up in its table."""
        if not engine.slots.any_saves(step.active_slots):
            return None
        replacing = [slot for slot in step.active_slots if engine.slots.replaces(slot, "embed_tokens")]
        rows = np.flatnonzero(np.isin(step.token_slots, replacing))
        if not rows.size:
            return None
        rows_tensor = index_tensor(rows, engine.device)
        row_slots = index_tensor(step.token_slots[rows], engine.device)
        return lambda hidden, ids, inside: self.slots.saved_embeddings(hidden, ids, inside, rows_tensor, row_slots)

    def embedding_delta(self, ids: torch.Tensor, inside: torch.Tensor | None) -> torch.Tensor | None:
        if self.token_slots is None:
            return None
        return self.slots.embedding_delta(ids, inside, self.token_slots)

    def before_layer(self, layer: int) -> None:
        for job in self.landing:
            self.copier.wait_layer(job, layer)

    def gemm_operands(self, layer: int, modules: Sequence[str], weight: torch.Tensor,
                      bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        folded = self.slots.folded_operands(layer, modules) if self.folded_blocks is not None else None
        return folded or (weight, bias)

    def start_deltas(self, x: torch.Tensor, layer: int, modules: Sequence[str]) -> None:
        """The eager path computes each delta whole in `finish_deltas`."""

    def finish_deltas(self, x: torch.Tensor, layer: int, outputs: Sequence[tuple[str, torch.Tensor]],
                      shrunk: torch.Tensor | None = None) -> FoldedDeltas | None:
        if shrunk is not None:
            blocks, token_slots = self.folded_blocks
            return self.slots.folded_deltas(layer, [module for module, _ in outputs], shrunk, blocks, PROMPT_BLOCK_M,
                                            token_slots)
        if self.batch is None:
            return None
        padded = self.batch.pad(x)
        for module, out in outputs:
            self.slots.add_delta(out, padded, layer, module, self.batch)


def _rows_by_slot(row_slots: list[int], replaces: Callable[[int], bool],
                  device: torch.device) -> dict[int, torch.Tensor]:
    """The rows of each slot that `replaces`, as index tensors on `device`."""
    rows: dict[int, list[int]] = {}
    for row, slot in enumerate(row_slots):
        if replaces(slot):
            rows.setdefault(slot, []).append(row)
    return {slot: index_tensor(indexes, device) for slot, indexes in rows.items()}


def _path_name(static: bool, landing: list[LoadJob]) -> str:
    """The timeline's name of a forward's path: the static buffers and kernels (one CUDA graph),
    the same with per-layer waits while an adapter lands (a graph per layer), or the general
    eager forward."""
    if not static:
        return "eager"
    return "static-waiting" if landing else "static"


def _load_error(job: LoadJob) -> Exception | None:
    """Why a finished load failed on this rank: its read from disk, or its copy."""
    copy_error = job.finished.exception() if job.finished.done() else None
    return job.adapter.progress.error or copy_error


def _device(name: str, tp: TensorParallel) -> torch.device:
    """The device named; on CUDA, a tensor-parallel rank's own GPU (the group's GPUs are the visible ones)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and tp.enabled:
        return torch.device("cuda", tp.rank)
    return torch.device(name)


def _dtype(name: str, model: ModelConfig) -> torch.dtype:
    if name == "auto":
        checkpoint_dtype = getattr(model.hf_config, "dtype", None) or torch.float32
        return checkpoint_dtype if isinstance(checkpoint_dtype, torch.dtype) else DTYPES[str(checkpoint_dtype)]
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]
