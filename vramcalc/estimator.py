"""estimate(): assemble the term functions at each moment of a training step and report the largest.

Moments (each a full set of terms; the peak is the largest moment, never the sum of each term's own maximum):
  forward          end of forward, inside the loss: weights, states, saved activations, logits' forward peak
  backward-start   the loss's backward: saved activations and the 12·T·V gradients of the logits
  backward         lm_head's backward (its weight gradient beside the logits gradient), then the decoder layers:
                   gradients grow while saved activations are released, with one layer's backward transients
                   (and, under checkpointing, that layer's recomputed activations)
  backward-end     every gradient, during the embedding's backward
  optimizer-step   every gradient and state, plus the optimizer's scratch
With gradient accumulation the gradients of earlier micro-batches are alive through forward and backward. Optimizer
states exist at every moment: the peak is taken over the second step, after the first created them.

Only this module sees the whole setup. The term functions take the values they use (the stored tensors, a
``LayerSetup``, ``Dtypes``, enums, counts) and are cached on those, so a setup never seen before reuses whatever its
batch shape, optimizer or checkpointing do not change (the stored tensors, what a layer saves); the decoder layers
are walked once per kind and crossed one run of same-kind layers at a time (``layer_runs``), not one layer at a time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from .breakdown import MemoryBreakdown
from .catalogue import GpuSpec, get_gpu, get_model
from .errors import VramcalcError
from .facts import CHUNKED_LOSS_CHUNKS
from .model import ModelSpec
from .parallel_degrees import data_parallel_degree, stage_gpus
from .options import Attention, DeviceMap, Loss, Method, Optimizer, Phase, Quant, Sharding, Task, Term
from .profiles import runtime_profile
from .sample_lengths import (LengthProfile, expected_later_records, expected_record_tokens, step_lengths,
                             steps_per_epoch)
from .terms import context_parallel  # --cp
from .terms import encoder  # --task classify: an encoder's sequence classifier
from .terms import (activations, adapters, distributed, expert_parallel, float8, gptq, layouts, load_reserved,
                    loading, logits, optimizer, parameters, peft_methods, quantized, runtime, stack_layers, states,
                    tasks, temporaries, tensor_parallel, trl_loss, vision)
from .terms.distributed import GatheredTimeline
from .gptq import is_gptq, saves_dequantized
from .training_setup import ResolvedSetup, resolve_setup
from .units import DType, maximum, minimum, select

_F32 = DType.FP32.bytes
from .model import reward_spec  # --task reward (terms/tasks.py)
from .setup_inputs import setup_inputs
from .step_moment import Moment, first_kind, layer_runs, layer_setup, saved_plan  # noqa: F401 (layer_setup: tests)


_TENSOR_FIELDS = ("weights", "gradients", "optimizer_states", "activations", "logits", "temporaries")
_MOMENT_FIELDS = _TENSOR_FIELDS + ("all_gather_stream", "reduce_scatter_stream", "stranded")


def estimate(model, *, gpu: str | GpuSpec | None = None, revision: str | None = None, sample_lengths=None,
             **options) -> MemoryBreakdown:
    """Peak device memory of one fine-tuning step, by term. Options are the TrainingSetup fields (see DESIGN.md);
    any left out take the defaults of a current transformers + peft + Trainer user (listed in ``inputs``).
    ``revision``: the branch, tag or commit of a Hub repo id (``catalogue.get_model``). ``sample_lengths``: the
    dataset's token count per sample (``sample_lengths.LengthProfile.of``: a list, a histogram or a file), for
    unpacked batches padded to their longest sample, ``seq_len`` their truncation length (``_with_sample_lengths``)."""
    if sample_lengths is not None:
        return _with_sample_lengths(model, gpu, revision, LengthProfile.of(sample_lengths), options)
    spec = get_model(model, revision)
    resolved = resolve_setup(spec, **options)
    device = get_gpu(gpu) if gpu is not None else None
    if getattr(resolved.setup, "pp", 1) > 1:  # --pp: the largest pipeline rank's step (pipeline_step.py)
        from .pipeline_step import pipeline_estimate

        return pipeline_estimate(spec, resolved, device)
    rank_spec, rank_resolved = tensor_parallel.rank_view(spec, resolved)  # --tp: one rank's slice (else as given)
    rank_spec, rank_resolved = context_parallel.rank_view(rank_spec, rank_resolved)  # --cp: its s/C positions
    terms, phase, details, warnings = _estimate_parts(rank_spec, rank_resolved, device)
    details = dict(details)
    if context_parallel.cp_degree(resolved) > 1:  # the ring's traffic inside the cp group
        details.update(context_parallel.context_parallel_details(spec, resolved, activations.dtypes(
            resolved.setup.method, resolved.setup.precision, resolved.setup.adapter_dtype).c,
            heads=spec.num_heads // resolved.setup.tp,
            kv_heads=context_parallel.ring_kv_heads(spec, resolved.setup) // resolved.setup.tp))
    if rank_spec is not spec:  # the whole model's counts; the rank's traffic inside its tensor-parallel group
        details.update(params=spec.params, active_params=spec.active_params,
                       **tensor_parallel.tensor_parallel_details(spec, resolved, activations.dtypes(
                           resolved.setup.method, resolved.setup.precision, resolved.setup.adapter_dtype).c))
    if getattr(resolved.setup, "ep", 1) > 1:  # --ep: the rank's experts and its group's all-to-all traffic
        details.update(expert_parallel.expert_parallel_details(spec, resolved, activations.dtypes(
            resolved.setup.method, resolved.setup.precision, resolved.setup.adapter_dtype).c))
    inputs = functools.partial(setup_inputs, spec, resolved, device)
    warnings = resolved.warnings + tuple(w for w in warnings if w not in rank_resolved.warnings)  # the breakdown's
    return MemoryBreakdown(spec.name, dict(terms), phase, inputs, "estimate", device, warnings, details)


def _with_sample_lengths(model, gpu, revision, profile: LengthProfile, options: dict) -> MemoryBreakdown:
    """The estimate of a run whose steps each take their batch's longest sample (``sample_lengths``): the tensor
    terms at the longest step, T_max = min(``seq_len``, the longest sample); and ``details["length_ladders_bytes"]``,
    what the shorter steps' loss blocks add to ``max_memory_reserved`` on average over the batches' order,
    E[R] - R(T_max) with E[R] = R(E[T_1]) + K(T_max)/T_max · E[sum of the later records' T_r] (in ``reserved_bytes``,
    not in ``total_bytes``: whole free segments, released when a ``cudaMalloc`` fails). The floor at R(T_max) is the
    max form's last term (``sample_lengths.realized_reserved_bytes``): without checkpointing, where activations
    dominate, a run reserves at least its longest step's R (docs/evidence/varying_length_reserved/README.md,
    "Without checkpointing")."""
    spec = get_model(model, revision)
    setup = resolve_setup(spec, **options).setup
    if setup.packing:
        raise VramcalcError("--sample-lengths describes batches padded to their longest sample; packed batches "
                            "(--packing) all hold --seq-len tokens")
    lengths = step_lengths(profile, setup.seq_len, setup.batch_size)
    data_parallel = (data_parallel_degree(stage_gpus(setup), setup.tp * setup.cp) if setup.sharding is not Sharding.NONE
                     else 1)
    steps = steps_per_epoch(profile, setup.batch_size, data_parallel)
    at_longest = estimate(model, gpu=gpu, revision=revision, **{**options, "seq_len": lengths.longest})
    details = dict(at_longest.details, longest_step_tokens=lengths.longest, steps_per_epoch=steps,
                   share_of_steps_at_longest=round(lengths.share_at_longest(), 4),
                   expected_later_records=round(expected_later_records(lengths, steps), 2))
    ladder = at_longest.details.get("reserved_growth_per_longer_step_bytes", 0)
    if ladder:  # a loss with [rows, V] blocks (none for a fused loss)
        first = estimate(model, gpu=gpu, revision=revision, **{**options, "seq_len": max(1, round(lengths.mean))})
        # the staircase climbs from the first step's own reserve (the loading's cached blocks, where they are the
        # higher mark, hold the shorter steps' ladders: the run's reserved is the larger of the two)
        first_step = first.details.get("step_reserved_bytes", first.reserved_bytes)
        expected = first_step + ladder / lengths.longest * expected_record_tokens(lengths, steps)
        details["length_ladders_bytes"] = max(0, int(expected) - at_longest.reserved_bytes)

    def inputs() -> dict:
        out = dict(at_longest.inputs, seq_len=setup.seq_len, sample_lengths=profile.summary())
        out["origins"] = dict(out["origins"], sample_lengths="given")
        return out

    return MemoryBreakdown(at_longest.model, at_longest.terms_bytes, at_longest.phase, inputs, "estimate",
                           at_longest.gpu, at_longest.warnings, details)


@functools.lru_cache(maxsize=4096)
def _estimate_parts(spec: ModelSpec, resolved: ResolvedSetup, device: GpuSpec | None) -> tuple:
    """(terms, phase, details, warnings) of an estimate, as tuples (each call gets its own dicts)."""
    spec = stack_layers.built_model(spec, resolved.setup.stack)  # the model as the stack builds it, for every term
    peak = _tensor_peak(spec, resolved)
    out = _finish(spec, resolved, dict(peak.terms), peak.phase, "estimate", device, peak.paged_bytes, None,
                  peak.stream_pools_bytes, peak.stranded_bytes)
    details = dict(out.details)
    if peak.phase_peaks:  # each phase's peak, from the same moments (``_reports_phase_peaks``)
        details["phase_peak_bytes"] = dict(peak.phase_peaks)
    if not resolved.setup.packing and peak.loss_ladder_bytes:
        details["reserved_growth_per_longer_step_bytes"] = reserved_growth_per_longer_step(peak.loss_ladder_bytes)
    if peak.phase is Phase.LOAD:  # the loading's high-water mark is the run's: the step's own beside it
        details["step_reserved_bytes"] = peak.step_reserved_bytes
    if resolved.setup.sharding is Sharding.NONE:  # the load's replayed reserved memory (terms/load_reserved.py)
        load = load_reserved.torchtune_01_load_reserved_bytes(spec, resolved)
        if load:
            details["load_reserved_bytes"] = load
            details["step_reserved_bytes"] = peak.step_reserved_bytes
    return tuple(out.terms_bytes.items()), out.phase, tuple(details.items()), tuple(out.warnings)


@dataclass(frozen=True)
class _TensorPeak:
    """What an estimate's tensor terms depend on: the model and the resolved setup only (cached)."""

    terms: tuple  # (Term, bytes) of the tensor terms at the peak moment
    phase: Phase
    paged_bytes: int  # bitsandbytes paged optimizer state (outside torch's allocator)
    phase_peaks: tuple = ()  # (phase, bytes): each phase's largest moment, where ``_reports_phase_peaks``
    stream_pools_bytes: int = 0  # what FSDP's side streams keep cached beyond the tensor peak (``_stream_pools_bytes``)
    stranded_bytes: int = 0  # the caching allocator's cached blocks beside the peak (``runtime.step_reserved_bytes``)
    loss_ladder_bytes: int = 0  # the [rows, V] blocks the loss's backward holds (``reserved_growth_per_longer_step``)
    step_reserved_bytes: int = 0  # the training step's own reserved memory, the loading's left out


@functools.lru_cache(maxsize=4096)
def _tensor_peak(spec: ModelSpec, resolved: ResolvedSetup) -> _TensorPeak:
    if resolved.setup.device_map is DeviceMap.AUTO:  # the largest GPU's peak (device_map_step.py)
        from .device_map_step import gpu_peaks

        largest = max(gpu_peaks(spec, resolved), key=lambda gpu: gpu.tensor_bytes)
        return _TensorPeak(largest.terms, Phase(largest.phase), 0)  # (no step order per GPU: no stranded blocks)
    moments = step_moments(spec, resolved)
    peak = max(moments, key=lambda moment: moment.tensor_bytes)
    terms = ((Term.WEIGHTS, peak.weights), (Term.GRADIENTS, peak.gradients),
             (Term.OPTIMIZER_STATES, peak.optimizer_states), (Term.ACTIVATIONS, peak.activations),
             (Term.LOGITS, peak.logits), (Term.TEMPORARIES, peak.temporaries))
    optimizer_name = resolved.setup.optimizer
    paged = 0
    if optimizer_name.is_paged:  # only paged optimizers take states out of torch's allocator
        embedding_32bit = stack_layers.stack_layers(resolved.setup.stack).trainer_optimizer
        paged = optimizer.optimizer_state_bytes(parameters.stored_tensors(spec, resolved), optimizer_name,
                                                embedding_32bit).paged_bytes
    setup = resolved.setup
    dt = activations.dtypes(setup.method, setup.precision, setup.adapter_dtype)
    ladder = logits.ladder_bytes(setup.loss, dt.c, dt.autocast, setup.tokens, spec.vocab_size,
                                 next((m.logits for m in moments if m.phase is Phase.BACKWARD_START), 0))
    step = max((m for m in moments if m.phase is not Phase.LOAD), key=lambda moment: moment.tensor_bytes)
    return _TensorPeak(terms, peak.phase, paged, _phase_peaks(moments) if _reports_phase_peaks(resolved) else (),
                       _stream_pools_bytes(spec, resolved, moments), int(peak.stranded), ladder,
                       int(step.tensor_bytes + step.own_stranded))


def reserved_growth_per_longer_step(loss_ladder_bytes) -> int:
    """What ``max_memory_reserved`` gains each time a step is longer than every earlier one (unpacked data padded to
    each batch's longest sample): K(T) = the [rows, V] blocks the loss's backward holds at once (the backward-start
    moment's logits term: 3·4·b·T·V for transformers' loss, the fp32 upcast, log_softmax's output and its
    gradient; for ``--loss unsloth-2024`` under autocast the forward's fp32 copy of the returned logits, 4·b·T·V,
    ``logits.ladder_bytes``). The caching allocator serves a request only from one free block at least
    as large and never merges blocks of different segments (``CUDACachingAllocator.cpp`` ``get_free_block``,
    ``try_merge_blocks``), so a longer step's loss cannot use the shorter steps' segments and each record strands one
    ladder: reserved = R(T_1) + sum of K(T_r) over the later records (allocator replays,
    docs/evidence/varying_length_reserved/README.md). How many records a run has depends on the length
    distribution and the step count: given the dataset's sample lengths, ``_with_sample_lengths`` adds their
    expected sum (``sample_lengths``); without them the estimate stays at one length and reports K at ``seq_len``. These are
    whole free segments, which a failing ``cudaMalloc`` releases (``release_cached_blocks``): they inflate
    reserved and nvidia-smi, not whether the job fits."""
    return int(loss_ladder_bytes)


def _stream_pools_bytes(spec: ModelSpec, resolved: ResolvedSetup, moments: list[Moment]) -> int:
    """``runtime.stream_pool_bytes`` for FSDP's all-gather and reduce-scatter streams
    (``distributed.side_stream_pools``); 0 for other engines. The default stream's bytes at a moment are the
    moment's less its side-stream shares (``Moment``). Byte counts may be numpy arrays (a sweep's batch shapes)."""
    if resolved.setup.sharding is not Sharding.FSDP:  # one GPU and the other engines: no side stream
        return 0
    pools = distributed.side_stream_pools(spec, resolved)
    if not any(pools):
        return 0
    default = functools.reduce(maximum, (m.tensor_bytes - minimum(m.all_gather_stream, m.weights)
                                         - minimum(m.reduce_scatter_stream, m.gradients) for m in moments))
    return runtime.stream_pool_bytes(default, pools, functools.reduce(maximum, (m.tensor_bytes for m in moments)))


def _reports_phase_peaks(resolved: ResolvedSetup) -> bool:
    """Whether an estimate's details give each phase's peak: GRPO's generation beside its training (terms/tasks.py),
    the first micro-batch beside the later ones where the loop holds the logits (the ``next-forward`` phase,
    ``_next_forward_moments``)."""
    setup = resolved.setup
    return setup.task.uses_fused_head or setup.loss.held_by_loop or setup.loop_keeps_outputs


def _phase_peaks(moments: list[Moment]) -> tuple:
    """(phase, the largest tensor bytes of its moments), the load phase included."""
    peaks: dict = {}
    for m in moments:
        peaks[m.phase.value] = max(peaks.get(m.phase.value, 0), int(m.tensor_bytes))
    return tuple(peaks.items())


@functools.lru_cache(maxsize=4096)
def _trainable_params(spec: ModelSpec, resolved: ResolvedSetup) -> int:
    return sum(t.numel * t.count for t in parameters.stored_tensors(spec, resolved) if t.trainable)


def assemble_measured(spec: ModelSpec, resolved: ResolvedSetup, tensor_terms: dict, phase: Phase, *, source: str,
                      gpu=None, paged_bytes: int = 0, details: dict | None = None) -> MemoryBreakdown:
    """A breakdown whose tensor terms were traced or measured; runtime terms come from the same model as estimate's."""
    device = get_gpu(gpu) if gpu is not None else None
    terms = {term: int(tensor_terms.get(term, 0)) for term in Term if term.is_tensor}
    peak = _tensor_peak(spec, resolved)
    stream_pools = peak.stream_pools_bytes if resolved.setup.sharding is Sharding.FSDP else 0
    return _finish(spec, resolved, terms, phase, source, device, paged_bytes, details, stream_pools,
                   peak.stranded_bytes)


def allocator_stranded_bytes(spec: ModelSpec, resolved: ResolvedSetup) -> int:
    """The caching allocator's stranded blocks beside the estimate's peak (``runtime.step_reserved_bytes`` less the
    peak): the mechanism part of ``allocator_slack``, without a GPU profile's calibrated fraction."""
    return _tensor_peak(spec, resolved).stranded_bytes


def peak_tensor_bytes_grid(spec: ModelSpec, resolved: ResolvedSetup, batch_sizes, seq_lens):
    """Peak tensor bytes over arrays of batch sizes and sequence lengths (numpy), the phase of each peak and the
    caching allocator's stranded bytes beside it (``Moment.stranded``)."""
    import numpy

    if resolved.setup.device_map is DeviceMap.AUTO:
        raise VramcalcError("--device-map auto is estimated one setup at a time (no batch or sequence sweeps)")
    if getattr(resolved.setup, "pp", 1) > 1:
        raise VramcalcError("--pp is estimated one setup at a time (no batch or sequence sweeps)")
    b = numpy.asarray(batch_sizes, dtype=numpy.int64)
    s = numpy.asarray(seq_lens, dtype=numpy.int64)
    moments = step_moments(spec, resolved, b, s)
    shape = numpy.broadcast(b, s).shape
    totals = numpy.stack([numpy.broadcast_to(numpy.asarray(m.tensor_bytes, dtype=numpy.int64), shape) for m in moments])
    phases = numpy.array([m.phase.value for m in moments])
    stranded = numpy.stack([numpy.broadcast_to(numpy.asarray(m.stranded, dtype=numpy.int64), shape) for m in moments])
    at = totals.argmax(axis=0)
    return totals.max(axis=0), phases[at], numpy.take_along_axis(stranded, at[numpy.newaxis], axis=0)[0]


def _finish(spec, resolved, terms, phase, source, device, paged_bytes, details, stream_pools_bytes=0,
            stranded_bytes=0) -> MemoryBreakdown:
    setup = resolved.setup
    profile = runtime_profile(device, setup.cuda_context_mib)
    peak_tensor = sum(terms.values())
    communicating = setup.num_gpus if setup.sharding is not Sharding.NONE else 1  # NCCL only under an engine
    if setup.tp > 1:  # a tensor-parallel group communicates whatever the data-parallel engine
        communicating = max(communicating, setup.tp)
    if getattr(setup, "ep", 1) > 1:  # so does an expert-parallel group (its all-to-alls)
        communicating = max(communicating, setup.ep)
    terms[Term.RUNTIME_OVERHEAD] = runtime.runtime_overhead_bytes(profile, device, communicating, paged_bytes)
    terms[Term.RUNTIME_OVERHEAD] += tasks.vllm_reservation_bytes(setup, device)  # 0 but GRPO with vLLM
    terms[Term.ALLOCATOR_SLACK] = runtime.allocator_slack_bytes(profile, peak_tensor, stranded_bytes)
    out = {
        "params": spec.params,
        "active_params": spec.active_params,
        "trainable_params": _trainable_params(spec, resolved),
        "paged_optimizer_bytes": paged_bytes,
        "runtime_profile": profile.source,
    }
    if setup.sharding is not Sharding.NONE:
        out.update(_data_parallel_details(spec, resolved, device))
    if stream_pools_bytes:  # reserved beyond the slack while the GPU has room (``runtime.stream_pool_bytes``)
        out["stream_pools_bytes"] = stream_pools_bytes
    if setup.device_map is DeviceMap.AUTO:  # where each part sits, every GPU's peak (device_map_step.py)
        from .device_map_step import device_map_details

        out.update(device_map_details(spec, resolved))
    out.update(tasks.task_details(parameters.stored_tensors(spec, resolved), setup, device))  # {} for sft
    if setup.task is Task.DISTILL:  # the GKD teacher (terms/tasks.py)
        out.update(tasks.distill_details(setup, activations.dtypes(setup.method, setup.precision,
                                                                   setup.adapter_dtype)))
    if spec.vision is not None and setup.images:  # image tokens, tiles, the tower's saved bytes (terms/vision.py)
        out.update(vision.details_for(spec, resolved))
    if device is not None:  # the step's time on that GPU (cost.step_for: cached per setup, standard library)
        from .cost import step_details

        out.update(step_details(spec, resolved, device, paged_bytes))
    if details:
        out.update(details)
    inputs = functools.partial(setup_inputs, spec, resolved, device)  # built on first access of ``inputs``
    warnings = resolved.warnings
    total = sum(terms.values())
    if device is not None and stream_pools_bytes and total <= device.memory_bytes < total + stream_pools_bytes:
        warnings = warnings + (f"FSDP's streams would keep {stream_pools_bytes / 2**30:.2f} GiB cached beyond the peak "
                               f"and {device.name} has no room for it: the caching allocator frees and re-allocates "
                               "those blocks when a cudaMalloc fails (num_alloc_retries), which slows every step",)
    return MemoryBreakdown(spec.name, terms, phase, inputs, source, device, warnings, out)


@functools.lru_cache(maxsize=1024)
def _data_parallel_details_cached(spec: ModelSpec, resolved: ResolvedSetup, device: GpuSpec | None) -> tuple:
    from .cost import communication_per_step  # cost reads the catalogue's prices: only under data parallelism

    out = {"host_offload_bytes_per_node": distributed.host_offload_bytes_per_node(spec, resolved)}
    if device is not None:
        try:
            traffic = communication_per_step(spec, resolved, device)
        except VramcalcError:  # no bandwidth for this GPU in the catalogue: bytes only
            traffic = None
        if traffic is not None:
            out.update(communication_bytes_per_step=traffic.total_bytes,
                       communication_seconds_per_step=round(traffic.seconds, 6), communication_link=traffic.link)
    return tuple(out.items())


def _data_parallel_details(spec: ModelSpec, resolved: ResolvedSetup, device: GpuSpec | None) -> dict:
    """Host RAM under offload, and the traffic of one step (and its time on the GPU's links when one is named)."""
    return dict(_data_parallel_details_cached(spec, resolved, device))


def step_moments(spec: ModelSpec, resolved: ResolvedSetup, batch_size=None, seq_len=None) -> list[Moment]:
    """``_step_moments``, with a tensor-parallel rank's all-reduce buffers in each layer's backward (``--tp``)."""
    moments = _step_moments(spec, resolved, batch_size, seq_len)
    if tensor_parallel.tp_degree(resolved) == 1:
        return moments
    setup = resolved.setup
    tokens = ((setup.batch_size if batch_size is None else batch_size)
              * (setup.padded_seq_len if seq_len is None else seq_len + setup.padded_seq_len - setup.seq_len))
    if tensor_parallel.sequence_parallel(setup):  # the layers' reduce-scatters: ``_moments``
        return moments
    c = activations.dtypes(setup.method, setup.precision, setup.adapter_dtype).c
    return tensor_parallel.with_backward_all_reduce(moments, spec.hidden_size, tokens, c)


def _step_moments(spec: ModelSpec, resolved: ResolvedSetup, batch_size=None, seq_len=None) -> list[Moment]:
    """Every moment of the step at which the peak can fall (see the module docstring), on one GPU or one rank.

    ``batch_size`` and ``seq_len`` override the setup's and may be numpy arrays of one shape: every byte count is
    then an array over those batch shapes (``sweep`` evaluates many setups at once this way). Decisions that depend
    on the sequence length (a sliding-window mask) are taken per element.
    Under data parallelism the model states are the rank's (``terms/distributed.py``): DDP's buckets are gradients
    at every moment; FSDP2 and ZeRO-3 add the units gathered around the compute (``GatheredTimeline``).
    """
    setup = resolved.setup
    spec = stack_layers.built_model(spec, setup.stack)  # litgpt unties a tied lm_head
    if spec.traits.encoder:  # an encoder's sequence classifier (terms/encoder.py)
        b = setup.batch_size if batch_size is None else batch_size
        return _encoder_moments(spec, resolved, b, setup.seq_len if seq_len is None else seq_len)
    peft_methods.check_estimable(setup, spec.family, resolved.attn_used)
    if setup.quant is not Quant.NONE and peft_methods.composes_quantized_base(setup):
        return _quantized_base_moments(spec, resolved, batch_size, seq_len)
    b = setup.batch_size if batch_size is None else batch_size
    s = setup.padded_seq_len if seq_len is None else seq_len + (setup.padded_seq_len - setup.seq_len)
    if setup.task.uses_fused_head:  # chosen and rejected rows, or GRPO's completions (terms/tasks.py)
        b = tasks.training_rows(setup, b)
    if setup.task is Task.REWARD:  # a sequence classifier on chosen and rejected rows (terms/tasks.py)
        spec, b = reward_spec(spec), tasks.pair_rows(b)
    sequences = b
    if setup.packing:  # one row of b·s tokens (DataCollatorWithFlattening)
        b, s = 1, b * s
    # torchtune attends a packed batch with flex attention's BlockMask: no dense mask (stack_layers.py)
    dense_packing = setup.packing and not stack_layers.stack_layers(setup.stack).packed_block_mask
    if activations.runs_with_cache(setup):
        # a model run with its cache finds no packed sequences in the position ids (transformers 5.25
        # masking_utils.py L862-870: only ``if ... cache is None``): plain causal attention over the packed row
        dense_packing = False
    masked = activations.attention_masked(spec, s, resolved.attn_used, dense_packing, sequences)
    if peft_methods.prefix_masked(setup.method):  # a key/value prefix: SDPA gets a 4-D mask
        masked = True
    if setup.task.uses_fused_head or setup.task in (Task.DISTILL, Task.REWARD):  # the collator's padded 2-D
        # attention mask reaches the attention (terms/tasks.py)
        masked = tasks.preference_masked(masked, resolved.attn_used)
    if spec.vision is not None and setup.images and spec.vision.mm_tokens_per_image:  # Gemma-3's image blocks
        masked = True  # attend bidirectionally: token_type_ids give the language model 4-D masks (terms/vision.py)
    if not hasattr(masked, "shape"):
        return _moments(spec, resolved, b, s, masked)
    if masked.all() or not masked.any():
        return _moments(spec, resolved, b, s, bool(masked.all()))
    # rows on both sides of the sliding window: each row takes the moments of its own mask decision, the other
    # decision's moments zero there (the two lists need not pair up: a masked Gemma-2 or Gemma-3 has more layer runs)
    with_mask = _moments(spec, resolved, b, s, True)
    without = _moments(spec, resolved, b, s, False)
    return ([Moment(m.phase, *(select(masked, getattr(m, f), 0) for f in _MOMENT_FIELDS)) for m in with_mask]
            + [Moment(n.phase, *(select(masked, 0, getattr(n, f)) for f in _MOMENT_FIELDS)) for n in without])


def _quantized_base_moments(spec: ModelSpec, resolved: ResolvedSetup, batch_size, seq_len) -> list[Moment]:
    """A peft method on a 4-bit base (``peft_methods.composes_quantized_base``): the method's moments on a 16-bit
    base, each shifted by what QLoRA's peak moment differs from LoRA's, term by term (the same rank, targets and
    options; the 4-bit base, its quant state and dequantization, kbit preparation's fp32 casts)."""
    if hasattr(batch_size, "shape") or hasattr(seq_len, "shape"):
        raise VramcalcError(f"--method {resolved.setup.method.value} on a --quant base is estimated one setup at a "
                            "time (no batch or sequence sweeps)")
    setup = resolved.setup
    # the 16-bit walks keep the base's op kind 4-bit (``ResolvedSetup.base_4bit``): torchtitan's selective policy
    # counts ``aten.mm`` calls, which a 4-bit base does not make, so its cache does not add across the shift
    on_16bit = replace(resolved, setup=replace(setup, quant=Quant.NONE), base_4bit=True)
    lora = replace(resolved, setup=replace(setup, method=Method.LORA, quant=Quant.NONE), base_4bit=True)
    qlora = replace(resolved, setup=replace(setup, method=Method.QLORA))

    def peak(moments):
        return max(moments, key=lambda moment: moment.tensor_bytes)

    lora_peak = peak(step_moments(spec, lora, batch_size, seq_len))
    qlora_peak = peak(step_moments(spec, qlora, batch_size, seq_len))
    shift = [getattr(qlora_peak, f) - getattr(lora_peak, f) for f in _TENSOR_FIELDS]
    return [m._replace(**{f: max(0, getattr(m, f) + d) for f, d in zip(_TENSOR_FIELDS, shift)})
            for m in step_moments(spec, on_16bit, batch_size, seq_len)]


def _moments(spec: ModelSpec, resolved: ResolvedSetup, b, s, masked: bool) -> list[Moment]:
    """``step_moments`` for one sliding-window mask decision."""
    setup = resolved.setup
    tokens = b * s
    compute = resolved
    tensors = parameters.stored_tensors(spec, resolved)
    # one GPU's weights, gradients and optimizer states
    traits = stack_layers.stack_layers(setup.stack)
    # a stack's own recipe builds the optimizer (bitsandbytes' 8-bit embedding states, torchao's default block size)
    rank = states.model_states(spec, tensors, setup.method, setup.optimizer, setup.grad_accum,
                               traits.trainer_optimizer)
    if setup.grads_kept:  # zero_grad(set_to_none=False): the gradients stay, as under accumulation
        rank = replace(rank, accumulated_gradients=rank.gradients)
    if setup.sharding is not Sharding.NONE:  # the engine shards them, and may compute in 16 bits
        rank = distributed.rank_states(spec, resolved, rank)
        compute = distributed.compute_setup(resolved)  # the setup itself under DDP
        tensors = parameters.stored_tensors(spec, compute)
    # lm_head's weight gradient as the loss's backward builds it: under optimizer-in-backward (one GPU only) it is
    # stepped and freed only once every chunk has added to it (the post-accumulate-grad hook): the loss sees it whole
    loss_head_grad = rank.head_gradient
    outer_step = outer_grad = head_step_scratch = 0
    if setup.optimizer_in_backward:
        rank = states.optimizer_in_backward(rank, tensors, setup.optimizer, traits.trainer_optimizer)
        outer_step = states.outer_step_bytes(tensors, setup.optimizer,  # lm_head's, the embedding's step
                                             traits.trainer_optimizer)
        # their gradients alone (alive through the head's backward); a step's scratch only while it runs
        outer_grad = states.outer_step_bytes(tensors, Optimizer.SGD)
        head_step_scratch = states.head_step_bytes(spec, setup.method, tensors, setup.optimizer,
                                                   traits.trainer_optimizer)[1]
    csetup = compute.setup
    layer = layer_setup(compute, spec.family)
    dt = layer.dtypes
    ckpt = csetup.grad_ckpt
    W, O, G_acc = rank.weights, rank.optimizer_states, rank.accumulated_gradients
    W = W + stack_layers.rope_buffer_bytes(spec, layer.layers, s)  # a stack's rotary buffers
    B = rank.standing_buffers
    stable = stack_layers.has_stable_embedding(layer.layers, csetup.method)  # litgpt QLoRA's never-freed gradient
    if stable:
        B = B + stack_layers.stable_embedding_grad_bytes(spec, dt.r)
    Bb = B + rank.backward_buffers
    plan = saved_plan(spec, layer, ckpt, masked)
    gptq_base = is_gptq(csetup)
    saves_weights = saves_dequantized(csetup)  # auto-gptq's cuda-old matmuls save each dequantized weight
    gptq_triton = gptq_base and not saves_weights  # --gptq-kernel triton-v2 (options.GptqKernel)
    if saves_weights:  # (terms/gptq.py)
        plan = gptq.with_saved_weights(plan, spec, layer, bool(ckpt), activations.first_layer_needs_grad(layer.method))
    A = plan.model.bytes(b, s)
    extras = quantized.step_extras(spec, csetup, layer, masked, b, s, adapters.head_input_shared(layer))
    head_lora = adapters.head_lora_saved(spec, layer).bytes(b, s)
    first_masked = activations.layer_masks(spec, masked)[0]
    A = A + extras.held + head_lora + adapters.embedding_lora_saved(spec, layer, ckpt, first_masked).bytes(b, s)
    A = A + peft_methods.prompt_encoder_saved_bytes(spec, csetup.method, dt, b, csetup.virtual_tokens)
    A = A + peft_methods.prefix_saved_bytes(spec, csetup.method, dt, b, s, csetup.virtual_tokens)
    A = A + peft_methods.adalora_orth_reg_bytes(spec, csetup.method, compute.lora_modules, csetup.lora_rank, dt)
    # the model's KV cache (``activations.runs_with_cache``): a loop that keeps ``outputs`` without checkpointing
    # (transformers turns the cache off under its own), or any loop under torch's checkpoint_wrapper
    # (``--grad-ckpt wrapper``). Each layer's entry changes forward's saved tensors by its ``forward`` bytes; where
    # the cache outlives the model call (``activations.cache_in_backward``) it stays through backward, growing to
    # ``after`` once a layer's backward is done (``_layer_backward_moments``), and where the loop keeps ``outputs``
    # through the step and the next forward; otherwise it is alive in the forward's moments only. (Autocast's copies
    # of each layer's weights, ``temporaries.layer_weight_copies``, offloaded: not modelled; a recompute's cache copy
    # keeps the k and v projections' too.)
    copies_by_kind = {kind: temporaries.layer_weight_copies(spec, dt, csetup.method, kind[0], tensors)
                      for kind, _, _ in layer_runs(spec, masked)} if not layer.offload else {}
    kv = _kv_cache_bytes(spec, layer, masked, b, s, ckpt, copies_by_kind) if activations.runs_with_cache(csetup) \
        else {}
    runs = layer_runs(spec, masked)
    kv_forward = sum(kv[kind].forward * (hi - lo + 1) for kind, hi, lo in runs) if kv else 0
    # the first layer's autocast weight copies where its input needs no gradient under checkpointing: its
    # gradless Linears save none (``temporaries.layer_weight_copies``)
    first_copies = None
    if copies_by_kind and activations.first_layer_recomputes_gradless(layer, ckpt):
        first_copies = temporaries.layer_weight_copies(spec, dt, csetup.method, spec.is_moe_layer(0), tensors,
                                                       activations.first_layer_gradless_linears(spec, layer, masked))
    kv_first = None  # the first layer's entry where its input needs no gradient (its recompute history lacks it)
    if kv and activations.first_layer_recomputes_gradless(layer, ckpt):
        kind0 = first_kind(spec, masked)
        kv_first = _kv_cache_bytes(spec, layer, masked, b, s, ckpt,
                                   {**copies_by_kind, kind0: first_copies} if first_copies else copies_by_kind,
                                   requires_grad=False)[kind0]
    kv_held = 0
    if kv and activations.loop_keeps_outputs(csetup):
        kv_held = sum(kv[kind].after * (hi - lo + 1) for kind, hi, lo in runs)
        if kv_first:
            kv_held = kv_held - kv[first_kind(spec, masked)].after + kv_first.after
        if ckpt and activations.cache_object_in_layers(layer.attn_used) and (spec.num_layers > 1 or not kv_first):
            kv_held = kv_held + activations.cache_history_tables(spec, dt, layer.layers).bytes(b, s)
    cache_fp32 = _trainer_cache_fp32_bytes(spec, dt, tokens) if csetup.trainer_use_cache and kv else 0
    kv_forward_only = 0  # the cache of a model call whose ``outputs`` die with it (transformers <= 4.35's tuple)
    if kv and activations.cache_in_backward(csetup, layer.attn_used):
        A = A + kv_forward
    elif kv and csetup.trainer_use_cache:  # the model's own (key, value) tuples: what its attention keeps anyway
        kv = {}
    elif kv:
        kv_forward_only, kv = kv_forward, {}
    head_grad = rank.head_gradient
    head_calls = CHUNKED_LOSS_CHUNKS if csetup.loss is Loss.CHUNKED else 1  # lm_head once per chunk (logits.py)
    copies = temporaries.weight_copy_bytes(spec, dt, csetup.method, ckpt, tensors, head_calls,
                                           activations.first_layer_gradless_linears(spec, layer, masked))
    if csetup.task is Task.REWARD:  # the score head's [B, s, 1] output and its pooling (terms/tasks.py)
        lg = tasks.reward_logits_bytes(dt, b, s)
    elif csetup.loss is Loss.TRL:  # TRL's fused lm_head never calls lm_head: no autocast copy of it either
        lg = trl_loss.trl_logits_bytes(spec, dt, tokens, loss_head_grad, sequences=b,
                                       **tasks.fused_head_shape(csetup, b, s))
        copies = trl_loss.without_head_copy(copies, spec, dt, tensors)
    else:
        lg = logits.logits_bytes(spec, csetup.loss, dt, tokens, loss_head_grad, sequences=b,
                                 keeps_outputs=csetup.loop_keeps_outputs,
                                 compiled=csetup.compile and csetup.compile_loss,
                                 whole_head=csetup.method is Method.FULL, fp32_logits=layer.layers.fp32_unembed,
                                 head_cast_grad_bytes=temporaries.head_grad_cast_bytes(
                                     dt, states.trained_head(spec, csetup.method, tensors)) if loss_head_grad else 0,
                                 loss_parallel=tensor_parallel.sequence_parallel(csetup))  # --tp-plan torchtitan
    if csetup.task is Task.DISTILL:  # GKD: the student's full logits and the JSD loss (terms/tasks.py)
        lg = tasks.distill_logits_bytes(spec, dt, b, s)
    dequant_beside = None  # torchtune: torchao's eager dequantization, beside a layer's saved tensors (stack_layers)
    if csetup.method is Method.QLORA and layer.layers.torchao_nf4:
        dequant = 0
        dequant_beside = stack_layers.nf4_dequant_moment_bytes(spec, dt.c, tokens, bool(ckpt), csetup.compile)
    else:
        dequant = temporaries.dequantized_weight_bytes(spec, csetup.method, csetup.double_quant, dt, tokens,
                                                       setup=csetup)
    # bitsandbytes' backward dequantization per block (default knobs): the MLP's Linears' in the MLP's backward, the
    # attention's own in the attention's (``_layer_backward_moments``)
    linear_dequant = attention_dequant = 0
    if csetup.method is Method.QLORA and quantized.knobs(csetup).is_default:
        linear_dequant = dequant
        attention_dequant = temporaries.dequantized_weight_bytes(spec, csetup.method, csetup.double_quant, dt, tokens,
                                                                 setup=csetup, role="attention")
    if gptq_triton:  # triton-v2 dequantizes again in backward (terms/gptq.py::backward_dequant_bytes)
        dequant = dequant + gptq.backward_dequant_bytes(spec)
    dequant = dequant + float8.layer_backward_cast_bytes(spec, setup.precision, tokens)  # fp8: torchao's casts
    if tensor_parallel.sequence_parallel(csetup) and rank.gathering is not None:
        # a block input gradient's reduce-scatter: beside the FSDP path's one transient of a layer's backward (the
        # single-group path's MLP moments come before it and hold the [T, I/T] gradients it follows)
        dequant = dequant + tensor_parallel.backward_reduce_scatter_bytes(spec.hidden_size, tokens, dt.c, csetup.tp)
    method_forward = peft_methods.forward_transient_bytes(spec, compute, dt, tokens)  # DoRA's weight norm, per module
    has_method_forward = peft_methods.has_forward_transients(csetup.method)
    recompute_beside = 0
    if has_method_forward:  # a layer's backward: the method's own backward temporaries beside the layer's backward
        # ones (DoRA's, VeRA's, OFT's per-token gradients) or beside the layer's saved tensors and incoming gradient
        # alone (LoHa's and LoKr's [out, in] weight gradients, in the first target's backward) or, under
        # checkpointing, its recompute's forward ones (DoRA's weight norm, LoHa's rebuilt weight, VeRA's and OFT's
        # per-token casts) beside the recomputed layer alone, whichever is larger (one runs first)
        beside = peft_methods.backward_beside_bytes(spec, compute, dt, tokens)
        if ckpt:  # beside the incoming gradients (peft_methods.recompute_incoming_grad_bytes)
            beside = maximum(beside, peft_methods.recompute_incoming_grad_bytes(spec, dt, tokens)
                             + peft_methods.forward_transient_bytes(spec, compute, dt, tokens, recompute=True))
        recompute_beside = dequant + beside
        dequant = dequant + peft_methods.backward_transient_bytes(spec, compute, dt, tokens)
    # --tp-plan torchtitan: the residual stream, its gradient and the norms are the rank's [b, s/T, h] shard
    residual_tokens = tokens // csetup.tp if tensor_parallel.sequence_parallel(csetup) else tokens
    hidden_grad = temporaries.hidden_grad_bytes(spec, dt, residual_tokens)
    if gptq_base and ckpt:  # the recompute's dequantization beside the recomputed layer and the incoming gradient
        recompute_beside = maximum(recompute_beside, dt.r * tokens * spec.hidden_size + gptq.forward_dequant_bytes(
            spec, dt.r, dt.c, tokens, csetup.gptq_desc_act, saved=True, triton=gptq_triton))
    head_saved = plan.head.bytes(b, s) + head_lora
    gathered = GatheredTimeline(spec, rank.gathering)
    # the moments' shares on FSDP's side streams (``Moment``): the gathered units' buffers, the reduced shards
    buffers = gathered.buffers()  # (none under ZeRO-3, which gathers in place)
    shards = gathered.reduced_shards if setup.sharding is Sharding.FSDP else 0
    moments = []
    if rank.gathering is not None:  # the last decoder layer's copy-out and forward, and the tail's copy-out
        A_layers = A - head_saved
        last = (spec.is_moe_layer(spec.num_layers - 1), activations.layer_masks(spec, masked)[-1],
                activations.layer_operators(spec)[-1])
        A_before_last = A_layers - plan.kept[last].bytes(b, s)
        moments += [
            Moment(Phase.FORWARD, W + gathered.last_layer_copy_out, B + G_acc, O, A_before_last, 0, 0,
                   buffers.last_layer_copy_out),
            Moment(Phase.FORWARD, W + gathered.last_layer_forward, B + G_acc, O, A_layers, 0, 0,
                   buffers.last_layer_forward),
            Moment(Phase.FORWARD, W + gathered.tail_copy_out, B + G_acc, O, A_layers, 0, 0, buffers.tail_copy_out),
        ]
    norm_backward = temporaries.norm_backward_bytes(spec, residual_tokens, layer.kernels)
    if dequant_beside is not None:  # torchao: the last layer's down projection dequantizes beside every saved tensor
        moments.append(Moment(Phase.FORWARD, W, B + G_acc, O, A - head_saved, 0,
                              stack_layers.nf4_forward_moment_bytes(spec, dt.c, tokens, bool(ckpt), csetup.compile)))
    if gptq_base:  # the last layer's largest dequantization beside the saved activations (terms/gptq.py)
        moments.append(Moment(Phase.FORWARD, W, B + G_acc, O, A - head_saved, 0, copies.forward
                              + gptq.forward_dequant_bytes(spec, dt.r, dt.c, tokens, csetup.gptq_desc_act,
                                                           saved=not ckpt, triton=gptq_triton)))
    if extras.head_forward_moment:  # a quantized lm_head's forward: its dequantized weight beside its output
        moments.append(Moment(Phase.FORWARD, W, B + G_acc, O, A, extras.head_forward_logits,
                              copies.forward + extras.head_forward))
    if spec.traits.alibi and ckpt:  # BLOOM's checkpointed forward: its last layer's eager transients (layouts.py)
        moments.append(Moment(Phase.FORWARD, W, B + G_acc, O, A - head_saved, 0, copies.forward
                              + layouts.bloom_forward_transient_bytes(spec, layer, b, s)))
    if has_method_forward:  # the last target's forward: the layers' saved tensors, no logits yet
        moments.append(Moment(Phase.FORWARD, W, B + G_acc, O, A - head_saved, 0, copies.forward + method_forward))
    # the final norm's output beside the loss inside the model's forward: what it adds to the forward's peak
    hidden_beside_loss = maximum(0, lg.forward_in_model + activations.loss_hidden_bytes(
        spec, layer, csetup.loss.in_model and csetup.task is Task.SFT, tokens) - lg.forward_peak)
    loss_forward = Moment(Phase.FORWARD, W + gathered.loss_forward, B + G_acc, O, A, lg.forward_peak,
                          copies.forward + hidden_beside_loss, buffers.loss_forward)
    moments += [
        loss_forward,
        Moment(Phase.BACKWARD_START, W + gathered.loss_backward, B + G_acc, O, A, lg.backward_peak,
               copies.backward_start, buffers.loss_backward),
        Moment(Phase.BACKWARD, W + gathered.head_backward, Bb + maximum(G_acc, head_grad) + outer_grad, O, A,
               lg.head_backward,
               copies.backward_start + hidden_grad + extras.head_backward
               + adapters.head_lora_backward_bytes(spec, layer, tokens), buffers.head_backward),
        # the final norm's backward: its input gradient (fused: the loss's grad_input) and fp32 transients
        Moment(Phase.BACKWARD, W + gathered.head_backward, Bb + maximum(G_acc, head_grad) + outer_grad, O,
               A - activations.head_input_saved(spec, layer).bytes(b, s), lg.forward_hidden_grad + lg.held,
               copies.backward_start + (0 if lg.forward_hidden_grad else hidden_grad) + norm_backward,
               buffers.head_backward),
    ]
    if cache_fp32:  # accelerate's conversion after the model call: the fp32 copy of the returned tuple cache beside
        # the loss's forward peak, the final norm's output no longer bound (``hidden_beside_loss``)
        moments.append(loss_forward._replace(activations=loss_forward.activations + cache_fp32,
                                             temporaries=loss_forward.temporaries - hidden_beside_loss))
    if kv_forward_only:  # alive until the model call returns: the forward's moments only
        moments = [m._replace(activations=m.activations + kv_forward_only) if m.phase is Phase.FORWARD else m
                   for m in moments]
    cast = temporaries.head_grad_cast_bytes(dt, states.trained_head(spec, csetup.method, tensors))
    if cast and rank.gathering is None and csetup.task is Task.SFT and csetup.loss in _LM_HEAD_LOSSES:
        moments[-2:] = _cast_head_backward_moments(moments[-2], moments[-1], G_acc, head_grad, cast,
                                                   Bb + outer_grad, lg.held + logits.LABEL_BYTES * tokens)
    if head_step_scratch:  # optimizer in backward: lm_head's step once its gradient is whole, before the norm's
        moments.append(moments[-1]._replace(gradients=Bb + outer_grad + head_step_scratch,
                                            temporaries=moments[-1].temporaries - norm_backward))
    # FSDP1 flat parameters (litgpt): autograd builds each unit's flat gradient only once all its views' gradients
    # exist (stack_layers.fsdp_flat_params)
    flat_units = rank.gathering is not None and setup.sharding is Sharding.FSDP and traits.fsdp_flat_params
    layer_moments = _layer_backward_moments(spec, layer, ckpt, rank, gathered, W, O, Bb, G_acc, dequant, b, s, plan,
                                            A - head_saved, hidden_grad, norm_backward, dequant_beside, lg.held,
                                            recompute_beside, masked, flat_units, copies_by_kind,
                                            context_parallel.ring_moment_bytes(
                                                spec, b * s, setup.cp, dt.c, compiled=csetup.compile,
                                                o_input_copy_bytes=activations.attention_output_copy(
                                                    spec, layer, masked).bytes(b, s),
                                                kv_heads=context_parallel.ring_kv_heads(spec, csetup))
                                            if getattr(setup, "cp", 1) > 1 else 0,  # --cp
                                            buffers if setup.sharding is Sharding.FSDP else None, kv,
                                            linear_dequant, attention_dequant, kv_first if kv else None, first_copies,
                                            block_reduce_scatter=tensor_parallel.backward_reduce_scatter_bytes(
                                                spec.hidden_size, tokens, dt.c, csetup.tp)
                                            if tensor_parallel.sequence_parallel(csetup) else 0,
                                            inputs_retained=distributed.fsdp1_retains_recompute_inputs(setup))
    if rank.layer_step_scratch and layer_moments:
        # optimizer in backward: the largest layer tensor's step (torchao's compiled update) runs from its
        # post-accumulate-grad hook, which autograd runs as soon as the weight's MmBackward returns, beside that
        # node's input gradient: the first layer moment (the last layer's output projection), not every moment
        layer_moments.append(layer_moments[0]._replace(gradients=layer_moments[0].gradients
                                                       + rank.layer_step_scratch))
    moments += layer_moments
    embedding_backward = temporaries.embedding_backward_bytes(spec, csetup.method, dt, tokens, csetup.modules_to_save)
    if stable:
        embedding_backward = stack_layers.stable_embedding_backward_bytes(spec, dt.r, tokens)
    if rank.gathering is None:
        moments.append(Moment(Phase.BACKWARD_END, W, Bb + rank.gradients + outer_step, O, kv_held, lg.held,
                              embedding_backward))
    else:  # the embedding's copy-out (its buffer and parameters at once) and its backward, every layer reduced
        moments += [
            # (the reduced units' shards replace their accumulated gradients: see ``_layer_backward_moments``)
            Moment(Phase.BACKWARD_END, W + gathered.embedding_copy_out,
                   Bb + maximum(G_acc, gathered.tail_waiting_grads + gathered.embedding_reduced), O, kv_held,
                   lg.held, 0, buffers.embedding_copy_out, shards),
            Moment(Phase.BACKWARD_END, W + gathered.embedding_gathered,
                   Bb + rank.gathering.embed.grads_bytes
                   + maximum(G_acc, gathered.tail_waiting_grads + gathered.embedding_reduced), O,
                   kv_held, lg.held, embedding_backward, buffers.embedding_gathered, shards),
        ]
        if flat_units:  # the root unit's view gradients (lm_head's held since the loss) and their concatenation
            root = rank.gathering.embed.grads_bytes + rank.gathering.tail.grads_bytes
            moments.append(Moment(Phase.BACKWARD_END, W + gathered.embedding_gathered,
                                  Bb + 2 * root + maximum(G_acc, gathered.embedding_reduced), O, kv_held, lg.held, 0,
                                  buffers.embedding_gathered, shards))
    # every unit reduced: the embedding's shards too (none left on the GPU under CPU offload: ``rank_states``)
    step_shards = shards + gathered.last_reduced_shards if shards else 0
    moments.append(Moment(Phase.OPTIMIZER_STEP, W, B + rank.gradients, O, kv_held, lg.held, rank.optimizer_step, 0,
                          step_shards))
    if lg.held:  # the loop's ``logits`` (and cache) live until the next model call returns (Loss.held_by_loop)
        moments += [m._replace(all_gather_stream=buffers.loss_forward) for m in
                    _next_forward_moments(W + gathered.loss_forward, B + G_acc, O, A + kv_held, lg, extras,
                                          copies.forward + hidden_beside_loss)]
    load_reserved_bytes = 0
    if setup.sharding is Sharding.NONE:  # the weights reaching the GPU (``terms/loading.py``), before any step
        moments.append(Moment(Phase.LOAD, W, 0, 0, 0, 0, loading.load_peak_bytes(spec, resolved) - rank.weights))
        # what the load leaves reserved, where its sequence is replayed (``--load requantize``: terms/load_reserved.py)
        load_reserved_bytes = load_reserved.torchtune_01_load_reserved_bytes(spec, resolved)
    if setup.task.uses_fused_head:  # the reference model and its forward, GRPO's generation (terms/tasks.py)
        moments = tasks.task_moments(moments, spec, setup, tensors, dt, b, s, lg, Moment)
    if setup.task is Task.DISTILL:  # the teacher's weights and no-grad forward (terms/tasks.py)
        moments = tasks.distill_moments(moments, spec, setup, dt, b, s, Moment)
    if setup.task is Task.REWARD:
        moments = tasks.reward_moments(moments, b, s)
    if spec.vision is not None and setup.images:  # a VLM's vision tower (terms/vision.py)
        moments = vision.moments_for(spec, resolved, tensors, moments, Moment, layer, b, s, masked)
    (moe, layer_masked, conv), _, _ = layer_runs(spec, masked)[0]  # the last layer's kind (backward order)
    layer_bytes = activations.layer_saved(spec, layer, moe, layer_masked, conv=conv).bytes(b, s)
    # the weight gradients backward allocates afresh each step: one GPU, each freed by zero_grad and not stepped
    # inside backward (torch's set_to_none default)
    gradients, largest_layer_request = (), 0
    if csetup.sharding is Sharding.NONE and not csetup.optimizer_in_backward:
        gradients = _gradient_groups(tensors)
        largest_layer_request = maximum(tokens * spec.intermediate_size * dt.c, 4 * tokens * spec.hidden_size)
        if layer.attn_used is Attention.EAGER:  # eager attention's fp32 scores, [b, a, s, s]
            largest_layer_request = maximum(largest_layer_request, 4 * b * spec.num_heads * s * s)
    # a checkpointed layer's recompute cuts the blocks its forward cut, the same sizes, and its backward's largest
    # requests are of those sizes too (sdpa, flash): at a peak inside that backward they are live, not stranded. An
    # eager attention's backward makes [b, a, s, s] fp32 gradients beside the recomputed scores and probabilities,
    # larger than any block the forward left, so the forward's blocks stay stranded there.
    refilled = bool(ckpt) and layer.attn_used is not Attention.EAGER
    return _with_reserved(moments, lg.backward_request, layer_bytes, gradients, largest_layer_request, refilled,
                          lg.head_strands, hidden_beside_loss, load_reserved_bytes)


def _encoder_moments(spec: ModelSpec, resolved: ResolvedSetup, b, s) -> list[Moment]:
    """The step of an encoder's sequence classifier (``--task classify``): the model states as for any family
    (``states.model_states``), with the tensor moments of ``encoder.step_points`` (the embeddings', the last layer's
    and the head's forward, each layer's backward at the last and the first layer, the embeddings' backward), the
    optimizer step and the load; the caching allocator's stranded blocks as ``_with_reserved`` models them (no loss
    blocks: the logits are [b, num_labels])."""
    setup = resolved.setup
    tensors = parameters.stored_tensors(spec, resolved)
    rank = states.model_states(spec, tensors, setup.method, setup.optimizer, setup.grad_accum)
    if setup.grads_kept:  # zero_grad(set_to_none=False): the gradients stay, as under accumulation
        rank = replace(rank, accumulated_gradients=rank.gradients)
    dt = activations.dtypes(setup.method, setup.precision, setup.adapter_dtype)
    accumulating = max(setup.grad_accum, 2 if setup.grads_kept else 1)  # (a new gradient is added into its .grad)
    shape = encoder.shape_of(dt, setup.precision, resolved.attn_used, accumulating, setup.grad_ckpt,
                             setup.softmax_saves_input, setup.extended_mask)
    W, O, G_acc = rank.weights + encoder.buffer_bytes(spec), rank.optimizer_states, rank.accumulated_gradients
    moments = [Moment(phase, W, G_acc + part.gradients.bytes(b, s), O, part.activations.bytes(b, s), 0,
                      part.temporaries.bytes(b, s)) for phase, part in encoder.step_points(spec, shape)]
    ids = encoder.input_ids_bytes(b, s)
    moments.append(Moment(Phase.OPTIMIZER_STEP, W, rank.gradients, O, ids, 0, rank.optimizer_step))
    moments.append(Moment(Phase.LOAD, W, 0, 0, 0, 0, loading.load_peak_bytes(spec, resolved) - rank.weights))
    eager = resolved.attn_used is Attention.EAGER
    largest_request = encoder.largest_layer_request_bytes(spec, shape, b, s)
    return _with_reserved(moments, 0, encoder.layer_saved(spec, shape).bytes(b, s), _gradient_groups(tensors),
                          largest_request, refilled_in_backward=bool(setup.grad_ckpt) and not eager)


def _gradient_groups(tensors) -> tuple[tuple[int, int], ...]:
    """(bytes of one gradient, how many) of the trainable tensors in the order backward makes them: lm_head's first,
    the decoder layers', the embedding's last."""
    def order(t):
        return 0 if "lm_head" in t.name else 2 if "embed" in t.name else 1

    return tuple((t.bytes_each, t.count) for t in sorted((t for t in tensors if t.trainable), key=order))


def _with_reserved(moments: list[Moment], head_request, layer_bytes, gradients=(),
                   largest_layer_request=0, refilled_in_backward=False, head_strands=True,
                   reused_forward_bytes=0, load_reserved_bytes=0) -> list[Moment]:
    """Each moment with its ``stranded`` bytes: the step's reserved memory (``runtime.step_reserved_bytes``; the
    weights' loading, before the step, reaches its own high-water mark, which the step's blocks then reuse: its
    allocated peak, or ``load_reserved_bytes`` where the load's sequence was replayed, ``terms/load_reserved.py``)
    less the moment's tensor bytes. ``head_request``: the loss's last [rows, V] gradient; ``layer_bytes``: one decoder
    layer's saved bytes; ``gradients`` and ``largest_layer_request``: for the gradients that need segments of their
    own (``runtime.fresh_gradient_segment_bytes``), which may reuse the loss's blocks (its logits at backward-start
    and what it stranded); ``refilled_in_backward``: a layer's backward refills its blocks (checkpointing), so a
    moment inside it strands none of them; ``head_strands``: whether the loss's gradients outgrow the blocks its
    forward freed (``LogitsBytes.head_strands``); ``reused_forward_bytes``: what the forward's high-water mark holds
    that backward requests of its size take again (the final norm's [T, h] output, ``activations.loss_hidden_bytes``:
    a layer's backward asks for [T, h] blocks), so it strands nothing."""
    steps = [m.tensor_bytes for m in moments if m.phase is not Phase.LOAD]
    # the forward's high-water mark: a loop that holds the logits into the next step's forward (``next-forward``)
    # reaches it there in every step after the first
    forward = [m.tensor_bytes for m in moments if m.phase in (Phase.FORWARD, Phase.NEXT_FORWARD)]
    starts = [m for m in moments if m.phase is Phase.BACKWARD_START]
    if not steps:
        return moments
    backward_start = starts[0].tensor_bytes if starts else 0
    request = head_request if starts else 0
    forward_mark = maximum(0, functools.reduce(maximum, forward) - reused_forward_bytes) if forward else 0
    head = select(head_strands, runtime.stranded_head_bytes(backward_start, forward_mark, request), 0)
    fresh = runtime.fresh_gradient_segment_bytes(gradients, largest_layer_request, request,
                                                 (starts[0].logits if starts else 0) + head) if gradients else 0
    step_peak = functools.reduce(maximum, steps)
    loading = maximum(functools.reduce(maximum, (m.tensor_bytes for m in moments if m.phase is Phase.LOAD), 0),
                      load_reserved_bytes)
    own = runtime.step_reserved_bytes(step_peak, backward_start, head, layer_bytes, fresh)
    own_in_backward = (runtime.step_reserved_bytes(step_peak, backward_start, head, 0, fresh) if refilled_in_backward
                       else own)
    reserved, in_backward = maximum(own, loading), maximum(own_in_backward, loading)
    return [m._replace(stranded=(in_backward if m.phase is Phase.BACKWARD else reserved) - m.tensor_bytes,
                       own_stranded=(own_in_backward if m.phase is Phase.BACKWARD else own) - m.tensor_bytes)
            for m in moments]


# the losses whose lm_head is the model's own nn.Linear call, run once on every token (``logits.logits_bytes``)
_LM_HEAD_LOSSES = (Loss.HF, Loss.HF_SHIFTED, Loss.HF_FP32_LOGITS, Loss.HF_LOOP, Loss.MODEL_DTYPE)


def _cast_head_backward_moments(head: Moment, norm: Moment, G_acc, head_grad, cast, buffers,
                                logits_left) -> list[Moment]:
    """lm_head's backward when its trained weight is fp32 under 16-bit autocast (``temporaries.head_grad_cast_bytes``):
    ``MmBackward`` first, with the logits' gradient, the saved c copy of the weight and its c weight gradient
    (``cast``) but no fp32 .grad yet; then the cast's ``ToCopyBackward``, once the mm's inputs are released (the
    logits' gradient, the weight copy): the c gradient beside the new fp32 one (``head_grad``), where the copy was.
    ``head``: the one moment that counted the fp32 .grad beside the mm's inputs; ``logits_left``: what the loss
    still holds (the loop's logits, the labels). The final norm's backward (``norm``) then runs without the weight
    copy, which the mm held (its c·V·h = ``cast``). Both run before the last decoder layer's output gradient
    exists: the trace's backward-start phase (``tracing/step.py`` ``_backward_start``)."""
    mm = head._replace(phase=Phase.BACKWARD_START, gradients=buffers + G_acc, temporaries=head.temporaries + cast)
    to_copy = head._replace(phase=Phase.BACKWARD_START, gradients=buffers + maximum(G_acc, head_grad),
                            logits=logits_left)
    return [mm, to_copy, norm._replace(temporaries=norm.temporaries - cast)]


def _trainer_cache_fp32_bytes(spec: ModelSpec, dt, tokens) -> int:
    """``--trainer-use-cache``: accelerate's fp32 copy of the cache the model returns, at the model call's end.

    transformers 4.x's Trainer leaves the config's ``use_cache`` on when it does not checkpoint (4.36.2
    ``trainer.py`` never sets it; ms-swift 1.5 ``swift/llm/sft.py`` @4312aeb28 sets ``model.config.use_cache =
    False`` only ``if args.gradient_checkpointing``), so the model returns every layer's keys and values: Qwen v1's
    remote code ``QWenAttention.forward`` ``present = (key, value)`` if ``use_cache`` (the rotated key, the value a
    view of c_attn's output), collected by ``QWenModel.forward`` into ``presents`` and returned as
    ``past_key_values``. Under mixed precision accelerate wraps the forward in ``convert_outputs_to_fp32``
    (0.25.0 ``accelerator.py:1280-1286``; ``utils/operations.py:629-647`` ``convert_to_fp32`` =
    ``recursively_apply`` of ``tensor.float()`` to every fp16/bf16 tensor in the output's mappings, tuples and
    lists, ``:87-127``), so each entry is copied to fp32, all before the converted output is built and the original
    dies: 2·k·d·4 bytes per token and layer (the c-byte entries as the 4.x attention computes them), beside the
    loss's forward peak (``hf``: the c logits, their fp32 copy and the saved log_softmax), then dropped with
    ``outputs`` when ``compute_loss`` returns. 0 without autocast (nothing is converted). The 16-bit tuple itself
    adds nothing: its entries are the tensors the attention saves (Qwen v1's flash path saves ``key`` and ``value``
    as they are; a GQA model whose attention repeats k and v would also hold the unrepeated ones, not modelled),
    unlike transformers >= 4.36's ``DynamicCache`` copies (``activations.kv_cache``)."""
    if not dt.autocast or dt.c >= _F32:
        return 0
    return spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * _F32 * tokens


def _kv_cache_bytes(spec: ModelSpec, layer: activations.LayerSetup, masked: bool, b, s, ckpt=False,
                    copies_by_kind=None, requires_grad: bool = True) -> dict:
    """Per layer kind (``layer_runs``), the bytes of one layer's KV cache entry (``activations.KvCache``'s held,
    forward, recompute and after, each in bytes), where the step runs with the cache
    (``activations.runs_with_cache``): ``activations.kv_cache`` without checkpointing,
    ``activations.checkpointed_kv_cache`` under torch's checkpoint_wrapper, whose recompute history keeps the
    autocast copies of the k and v projections' weights too (``temporaries.LayerCopies.kv``; ``copies_by_kind``).
    ``requires_grad``: whether the layer's input needs a gradient."""
    result = {}
    for kind, _, _ in layer_runs(spec, masked):
        if not ckpt:
            result[kind] = activations.KvCache(*(part.bytes(b, s) for part in activations.kv_cache(spec, layer,
                                                                                                 kind[1], kind[2])))
            continue
        entry = activations.checkpointed_kv_cache(spec, layer, kind[1], kind[2], requires_grad)
        held, forward, recompute, after = (part.bytes(b, s) for part in entry)
        if activations.cache_object_in_layers(layer.attn_used) and copies_by_kind:
            after = after + copies_by_kind[kind].kv
        result[kind] = activations.KvCache(held, forward, recompute, after)
    return result


def _next_forward_moments(W, G, O, A, lg, extras, copies_forward) -> list[Moment]:
    """A later micro-batch's forward beside what the loop still holds of the one before (``Loss.held_by_loop``).
    litgpt's ``fit`` (finetune/lora.py:355-366) rebinds ``logits`` only when ``model(...)`` returns, and ``loss``
    became a float at the previous iteration's logging (``log_interval`` 1); torchtune's 2024 recipes likewise
    (lora_finetune_single_device.py@0217d44c2:460-469, until ``del logits``, #1235). Held: the previous fp32 logits
    (``lg.held``) and, through their ``grad_fn`` chain, the previous graph. Backward released that graph's saved
    tensors, but not what a custom Function keeps as a ``ctx`` attribute: bitsandbytes <= 0.43's ``MatMul4Bit``
    keeps ``ctx.tensors = (A, B)`` (0.42.0 ``autograd/_functions.py:522-523``), so every input it held
    (``extras.held``, the same shape under a fixed batch shape) is still alive. The moments: the end of the model
    call (its own output, ``lg.output``) and, with a 4-bit lm_head, its forward (the dequantized weight beside the
    logits so far)."""
    previous = A + extras.held
    moments = [Moment(Phase.NEXT_FORWARD, W, G, O, previous, lg.held + lg.output, copies_forward)]
    if extras.head_forward_moment:
        moments.append(Moment(Phase.NEXT_FORWARD, W, G, O, previous, lg.held + extras.head_forward_logits,
                              copies_forward + extras.head_forward))
    return moments


def _layer_backward_moments(spec, layer, ckpt, rank, gathered, W, O, Bb, G_acc, dequant, b, s, plan,
                            layers_saved, hidden_grad, norm_backward, dequant_beside=None,
                            logits_held=0, recompute_beside=0, masked=False, flat_units=False,
                            copies_by_kind=None, ring_attention=0, buffers=None, kv_cache=None,
                            linear_dequant=0, attention_dequant=0, kv_first=None, first_copies=None,
                            block_reduce_scatter=0, inputs_retained=False) -> list[Moment]:
    """The start of the first and of the last layer of each run of same-kind layers, in backward order.

    At the start of a layer's backward: the gradients of the layers after it (and lm_head's) exist, the kept
    tensors of the layers up to it remain, plus this layer's backward transients and, under checkpointing, its
    recomputed activations. Both sums are linear along a run, so its ends bound it. With gathered units (a run's
    first layer follows a unit of another size and its last prefetches one, so the second and second-to-last
    layers are ends too) the end of each such layer's backward counts too: its full unsharded gradients wait there
    for their reduce-scatter beside the gathered units and the previous unit's reduce-scatter input.
    ``layers_saved``: the saved activations without the head's; a run of n layers is crossed at once (its kept
    tensors and gradients times n), so the cost is per run, not per layer. ``dequant_beside``: a dequantization
    whose transient replaces (is not added to) the halves' backward transients (torchao NF4, stack_layers.py);
    ``logits_held``: logits the training loop still holds (litgpt's ``fit``, ``LogitsBytes.held``).
    ``recompute_beside``: a peft method's temporaries in the checkpointed recompute of the layer's forward, beside the
    whole recomputed layer instead of its backward transients (``terms/peft_methods.py``).
    ``copies_by_kind``: per layer kind, the autocast weight copies its F.linear calls save
    (``temporaries.layer_weight_copies``): every layer's from forward without checkpointing, the recomputed layer's
    under it. On one GPU a layer's MLP backward is three moments: down's (its input gradient beside the whole layer),
    mul's (down's input and weight copy freed: ``activations.backward_freed``) and, for eager attention, the softmax's
    (o_proj's and probs @ v's saved tensors freed).
    ``flat_units`` (FSDP1 flat parameters, ``stack_layers.StackLayers.fsdp_flat_params``): a unit's parameters are
    views of one flat parameter (``torch.split`` + ``view``, torch ``distributed/fsdp/_flat_param.py``
    ``_get_unflat_views_aligned``), so autograd's ``SplitWithSizesBackward`` holds each view's gradient until the
    last one arrives and then concatenates them into the flat gradient: the root unit's (final norm, lm_head and
    the embedding: one unit, resharded only after the whole backward) lm_head gradient stays unsharded through every
    layer, and each layer ends its backward with its view gradients beside their concatenation.
    ``buffers`` (FSDP): ``gathered``'s all-gather-buffer share (``GatheredTimeline.buffers``); with it each moment
    also names its all-gather buffers and its reduced shards (``Moment``'s side-stream fields).
    ``kv_cache``: per layer kind, the bytes of a KV cache entry (``_kv_cache_bytes``; ``forward`` already in
    ``layers_saved``): a layer's attention backward frees its saved k and v, but the cache keeps its own copies
    (under torch's checkpoint_wrapper, the recompute's second copy too: ``activations.checkpointed_kv_cache``), so
    each layer already through its backward adds after - forward, and the layer in backward adds ``recompute``
    beside its recomputed tensors (``kv_first``: the first layer's entry where its input needs no gradient;
    ``first_copies``: its autocast weight copies then).
    ``plan.first``: the first layer's own recompute where its input needs no gradient (``SavedPlan``).
    ``linear_dequant``: the part of ``dequant`` that is bitsandbytes' backward dequantization of the largest 4-bit
    Linear (``MatMul4Bit.backward``, default knobs); one GPU: down's backward has it beside down's transients; the
    next dequantizing op, up's backward, runs once mul's has freed its input gradient and its two saved [T, I]
    inputs (a gated MLP: three [T, I] fewer than at mul's), with up's [T, h] input gradient made; the attention's
    backward dequantizes its own largest projection (``attention_dequant``).
    ``block_reduce_scatter`` (``--tp-plan torchtitan``, one tensor-parallel group): the MLP's input gradient
    reduce-scattered onto the sequence (``tensor_parallel.backward_reduce_scatter_bytes``), a moment of its own once
    the MLP's backward is done, beside the attention block's saved tensors and the residual's gradient.
    ``inputs_retained`` (``distributed.fsdp1_retains_recompute_inputs``): every layer through its backward keeps its
    checkpointed input (``kept``) and that input's gradient (``hidden_grad``) until the backward ends, the last one
    of those gradients being the incoming gradient the layer in backward already counts in its transients.
    ``ring_attention`` (``--cp``, always with FSDP2 units): the ring-attention backward's buffers
    (``context_parallel.ring_backward_bytes``), a moment of their own once the MLP's backward is done: what the
    attention block still holds, the layer's unsharded gradients waiting, and the ring's buffers as the transients.
    """
    c, r, attn_used = layer.dtypes.c, layer.dtypes.r, layer.attn_used
    if spec.traits.embedding_norm or spec.traits.learned_positions or spec.traits.rope_copies_per_projection:
        # BLOOM's fp32 residual stream under autocast (GPT-J's and OPT's under QLoRA), and so its gradient; phi and
        # gpt_neox QLoRA keep the model's r here: their traced layer backward (tests/test_families_devset.py) does
        r = layouts.residual_bytes(spec, layer)
    mlp_in_place = activations.unsloth_fused(spec, layer, spec.traits.mlp_names)  # Unsloth's LoRA_MLP
    transient = temporaries.layer_backward_bytes(spec, c, r, attn_used, b, s, mlp_in_place) + dequant
    attention_dequant = dequant - linear_dequant + attention_dequant
    softmax_transient = temporaries.eager_softmax_backward_bytes(spec, c, r, b, s) + attention_dequant
    scores_transient = temporaries.eager_scores_backward_bytes(spec, c, r, b, s) + attention_dequant
    softmax_out = activations.Saved(per_square=_F32 * spec.num_heads).bytes(b, s)  # freed by its backward
    attention_transient = temporaries.attention_backward_bytes(spec, c, attn_used, b, s) + attention_dequant
    if dequant_beside is not None:
        transient = maximum(transient, dequant_beside)
        attention_transient = maximum(attention_transient, dequant_beside)
        softmax_transient = maximum(softmax_transient, dequant_beside)
        scores_transient = maximum(scores_transient, dequant_beside)
    transient = maximum(transient, recompute_beside)

    def mlp_transients(kind):
        """Down's and mul's backward transients of a layer kind, in its MLP's own element bytes (QLoRA under mixed
        precision computes the MLP in fp32: ``activations.BackwardFreed.mlp_element_bytes``)."""
        c_mlp = plan.freed[kind].mlp_element_bytes or c
        in_place = mlp_in_place and not kind[0]  # a dense MLP
        down = temporaries.down_backward_bytes(spec, c_mlp, r, b, s) + dequant
        mlp = temporaries.mlp_backward_bytes(spec, c_mlp, r, b, s, in_place) + dequant
        if not kind[0] and spec.traits.gated_mlp:  # (none without linear_dequant) up's backward after mul's (docstring)
            mlp = mlp - linear_dequant + maximum(linear_dequant - b * s * (3 * c_mlp * spec.mlp_width
                                                                           - c * spec.hidden_size), 0)
        elif not kind[0]:  # a plain MLP's activation backward runs after fc2's backward freed its dequantized weight
            mlp = mlp - linear_dequant  # and before fc1's makes one, beside smaller gradients ([T, h], not [T, I])
        if dequant_beside is not None:
            down, mlp = maximum(down, dequant_beside), maximum(mlp, dequant_beside)
        return maximum(down, recompute_beside), maximum(mlp, recompute_beside)
    copies_by_kind = copies_by_kind or {}
    no_copies = temporaries.LayerCopies(0, 0, 0, 0)
    # without checkpointing every layer's copies are saved from forward, and freed layer by layer
    copies_left = 0 if ckpt else sum(copies_by_kind.get(kind, no_copies).whole * (hi - lo + 1)
                                     for kind, hi, lo in layer_runs(spec, masked))
    shared = plan.shared.bytes(b, s)
    remaining = layers_saved - shared
    runs = layer_runs(spec, masked)
    kept = {kind: saved.bytes(b, s) for kind, saved in plan.kept.items()}  # per (moe, masked) kind
    grads = rank.layer_gradients  # (dense, MoE)
    recompute = {kind: saved.bytes(b, s) for kind, saved in plan.recompute.items()}
    attention_lefts = {kind: saved.bytes(b, s) for kind, saved in plan.attention_left.items()}
    # the first layer, where its input needs no gradient (``SavedPlan.first``): its own recompute
    first = (plan.first[0].bytes(b, s), plan.first[1].bytes(b, s), plan.first[2]) if plan.first else None
    layer_end = norm_backward + 2 * hidden_grad  # the norm's fp32 backward, two [T, h]
    moments = []
    sharded = rank.gathering is not None
    G = rank.head_gradient if not sharded else rank.gathering.tail.sharded_grads_bytes
    # the root unit's view gradients (FSDP1 flat parameters: class docstring), or a tied tail's unsharded gradient,
    # wait for the embedding's backward
    tail_waits = flat_units or (sharded and rank.gathering.tied)
    if tail_waits:
        G = rank.gathering.tail.grads_bytes
    kv_cache = kv_cache or {}
    cached = 0  # the cache entries of the layers already through their backward, beyond their ``forward`` share
    done_before = 0  # layers of the earlier runs already through their backward (``inputs_retained``)
    for kind, hi, lo in runs:
        moe = kind[0]
        cached_per_layer = kv_cache[kind].after - kv_cache[kind].forward if kv_cache else 0
        kv_recompute = kv_cache[kind].recompute if kv_cache else 0  # beside the layer's own recompute
        # a run's first and last layers; with units also its second and second-to-last (a run's first layer waits
        # on the previous kind's, or the tail's, reduce-scatter input and its last prefetches a unit of another kind
        # or the embedding: the run is linear from its second layer to its second-to-last, so those bound it too)
        if sharded:
            ends = sorted({hi, lo, max(hi - 1, lo), min(lo + 1, hi)}, reverse=True)
        else:
            ends = (hi, lo) if hi != lo else (hi,)
        kept_moe, grads_moe = kept[kind], grads[moe]
        for index in ends:
            done = hi - index  # layers of this run already through their backward
            left = remaining - kept_moe * done if done else remaining  # kept tensors of the layers up to this one
            if kv_cache:
                left = left + cached + cached_per_layer * done
            if inputs_retained and done_before + done:  # FSDP1's reshard-only hooks keep the done layers' inputs
                left = left + kept_moe * done + hidden_grad * (done_before + done - 1)  # and their gradients
            G_here = G + grads_moe * done if done else G  # gradients of the layers after it
            layer_recompute, attention_left, freed = recompute[kind], attention_lefts[kind], plan.freed[kind]
            kv_here = kv_recompute
            if index == 0 and first is not None:  # the first layer, its input needing no gradient
                layer_recompute, attention_left, freed = first
                kv_here = kv_first.recompute if kv_first else kv_recompute
            if not sharded:
                # the MLP's backward (it runs first) with the whole layer saved: down's, then mul's once down's
                # input is freed; then attention's, once the MLP's saved tensors are freed and its gradients made
                copies = copies_by_kind.get(kind, no_copies)
                if index == 0 and first is not None and first_copies is not None:
                    copies = first_copies
                here = copies.whole if ckpt else copies_left - copies.whole * done
                down_transient, mlp_transient = mlp_transients(kind)
                held = shared + left + layer_recompute + kv_here
                waiting = Bb + maximum(G_acc, G_here)
                moments.append(Moment(Phase.BACKWARD, W, waiting, O, held, logits_held, down_transient + here))
                moments.append(Moment(Phase.BACKWARD, W, waiting + layouts.down_weight_grad_bytes(spec, layer),
                                      O, held - freed.mlp.bytes(b, s), logits_held, mlp_transient + here - copies.down))
                waiting = Bb + maximum(G_acc, G_here + grads_moe)
                if block_reduce_scatter:  # the MLP's input gradient reduce-scattered, its saved tensors freed
                    moments.append(Moment(Phase.BACKWARD, W, waiting, O, shared + left + attention_left, logits_held,
                                          block_reduce_scatter + hidden_grad + here - copies.mlp))
                if freed.eager_softmax:  # o_proj's and probs @ v's saved tensors freed first, then the softmax's
                    held = shared + left + attention_left + kv_here - freed.attention.bytes(b, s)
                    moments.append(Moment(Phase.BACKWARD, W, waiting, O, held, logits_held,
                                          softmax_transient + here - copies.mlp - copies.o))
                    moments.append(Moment(Phase.BACKWARD, W, waiting, O, held - softmax_out, logits_held,
                                          scores_transient + here - copies.mlp - copies.o))
                else:
                    moments.append(Moment(Phase.BACKWARD, W, waiting, O, shared + left + attention_left + kv_here,
                                          logits_held, attention_transient + here - copies.mlp - copies.o))
            else:
                unit = gathered.layer(index)
                weights = W + gathered.weights_during(index)
                # on the side streams (FSDP): the gathered units' buffers, the shards reduced so far
                # (FSDP1 flat parameters: the root unit's unsharded view gradients are not reduced yet)
                reduced = G_here - (rank.gathering.tail.grads_bytes if tail_waits else 0)
                side = (buffers.weights_during(index), reduced) if buffers is not None else (0, 0)
                # accumulated gradients (``G_acc``): the syncing micro-batch hands each unit's accumulated unsharded
                # gradient to its reduce-scatter and frees it (torch ``_fully_shard/_fsdp_param_group.py:623-626``,
                # ``_fsdp_collectives.py:603-606``; FSDP1 likewise replaces it by the shard), so the reduced units'
                # shards and the retained reduce-scatter input replace, never add to, what the units had accumulated
                waiting = Bb + maximum(G_acc, G_here + gathered.retained_reduce_buffer(index))
                moments.append(Moment(Phase.BACKWARD, weights, waiting, O, shared + left + layer_recompute + kv_here,
                                      logits_held, transient, *side))
                # the MLP's backward ending: the layer's gradients (the MLP's are most of them) wait beside what
                # its attention block still holds (recomputed under checkpointing, beside the checkpoint) and the
                # MLP's last backward transients (MoE: the experts' [T·K, 2·I_m] gradients)
                mlp_done = attention_left + kv_here
                # (its new unsharded gradients sit beside the accumulated ones until added in:
                # ``_fsdp_param.py:813-820`` ``accumulate_unsharded_grad_if_needed``)
                moments.append(Moment(Phase.BACKWARD, weights, waiting + unit.grads_bytes, O,
                                      shared + left + mlp_done, logits_held, maximum(layer_end, transient), *side))
                if ring_attention:  # --cp: the ring attention's backward (terms/context_parallel.py)
                    moments.append(Moment(Phase.BACKWARD, weights, waiting + unit.grads_bytes, O,
                                          shared + left + mlp_done, logits_held, ring_attention, *side))
                if flat_units:  # the layer's end: its view gradients and their concatenation, its tensors freed
                    moments.append(Moment(Phase.BACKWARD, weights, waiting + 2 * unit.grads_bytes, O,
                                          shared + left - (0 if inputs_retained else kept_moe) + cached_per_layer,
                                          logits_held, layer_end, *side))
        n = hi - lo + 1
        done_before += n
        if not inputs_retained:
            remaining -= kept_moe * n
        cached = cached + cached_per_layer * n
        if not ckpt:
            copies_left -= copies_by_kind.get(kind, no_copies).whole * n
        G += grads_moe * n
    return moments
