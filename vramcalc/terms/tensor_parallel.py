"""What one tensor-parallel rank holds and sends: transformers' ``tp_plan="auto"`` on T ranks (``--tp T``).

The plan (transformers 5.25.0): ``base_model_tp_plan`` of the family's config (models/llama/configuration_llama.py:48-56)
shards q/k/v and gate/up "colwise" and o/down "rowwise"; ``PreTrainedModel.init_parallel_plans`` adds
``embed_tokens: "embedding_rowwise"`` (distributed/mixin.py:92-94) and the causal LM adds ``lm_head:
"colwise_gather_output"`` (models/llama/modeling_llama.py:414). The styles (distributed/tensor_parallel.py):
  colwise    weight (and bias) ``Shard(0)``: [out/T, in] per rank; input Replicate, output ``Shard(-1)`` handed on
             as the local [b, s, out/T] (:143-213)
  rowwise    weight ``Shard(-1)``: [out, in/T]; bias Replicate; the local matmul is ``Partial`` and is all-reduced
             to Replicate [b, s, h] (:281-380)
  embedding_rowwise   weight ``Shard(0)``: [V/T, h] rows; partial lookups all-reduced (:432-473)
  colwise_gather_output (lm_head)   weight ``Shard(0)``: [V/T, h]; its [b, s, V/T] output all-gathered to the full
             [b, s, V] logits on every rank (:709-711): the logits and the loss are not vocab-parallel
  not in the plan     norms (and Qwen3's, Gemma-3's q/k norms, "replicated_with_grad_allreduce"): whole on every rank
Parameters are DTensors (``distribute_tensor``), so their gradients and optimizer states are DTensors of the same
placement: a rank's gradient and optimizer state of a sharded weight are its shard's. peft shards a LoRA adapter with
its base layer (peft 0.21.2 tuners/lora/model.py:402-440): lora_B of a colwise layer colwise ([out/T, r]), lora_A of
a rowwise layer rowwise ([r, in/T]); the other factor is whole.

Hence one rank of a T-way group is, tensor by tensor and activation by activation, the same model with a/T attention
heads, k/T key/value heads and an MLP of width I/T (``rank_spec``), except that the embedding and lm_head keep the
vocabulary's V in their activations (the logits are gathered) while storing V/T rows (``vocab_sharded``):
  weights, gradients, optimizer states   q/k/v/o, gate/up/down (and LoRA's sharded factor): /T; embedding and lm_head
                                          rows: ceil(V/T); norms, LoRA's other factor: whole
  activations                             attention (q, k, v, the kernel's output and logsumexp, o_proj's input) and
                                          the MLP intermediate: /T; the residual stream, norms' inputs and outputs
                                          (q/k/v's and gate/up's inputs), the hidden state out of each block: whole,
                                          [b, s, h] on every rank (replicated by the all-reduce)
  logits                                  whole: [b, s, V] on every rank
  temporaries                             + the backward all-reduces' buffers (``backward_all_reduce_bytes``)
``--tp-plan torchtitan`` (torchtitan 9dec370 ``parallelisms/parallelize_llama.py`` ``apply_tp``): the same split of
the decoder's Linears, with sequence parallelism and loss parallelism:
  ``tok_embeddings``   ``RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))``: [V/T, h] rows, the
                       output reduce-scattered onto the sequence, [b, s/T, h]
  norms                ``SequenceParallel``: on the rank's [b, s/T, h] (their saved tensors 1/T of a token's;
                       ``activations.LayerSetup.sequence_shards``), the residual stream too
  attention, MLP       ``PrepareModuleInput``: the norm's output all-gathered to [b, s, h] (saved by q/k/v and gate/up
                       as one GPU's norm output is); o and w2 ``RowwiseParallel(output_layouts=Shard(1))``: the partial
                       output reduce-scattered, and in backward the input gradient reduce-scattered
                       (``backward_reduce_scatter_bytes``)
  ``output``           ``ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)``:
                       [b, s, V/T] logits under ``loss_parallel()`` (``rank_spec(vocab_parallel=True)``,
                       ``logits.logits_bytes(loss_parallel=True)``)
Data parallelism over dp = N/T ranks then applies its engine to that slice (``terms/distributed.py`` on
``rank_view``'s setup). Departures: smaller DTensor transients (the forward all-reduce's [b, s, h] output beside the
partial one, the vocab mask of the embedding lookup, lm_head's [b, s, V/T] local output before its gather and its
[b, s, V/T] gradient slice) are not counted: the trace measures them (tests/test_tensor_parallel.py).
"""

from __future__ import annotations

import dataclasses
import functools

from ..model import ModelSpec
from ..options import GradCkpt, Phase, TpPlan
from ..parallel_degrees import data_parallel_degree
from ..training_setup import ResolvedSetup
from .stored_tensor import StoredTensor


def tp_degree(resolved: ResolvedSetup) -> int:
    return getattr(resolved.setup, "tp", 1)


def sequence_parallel(setup) -> bool:
    """``--tp-plan torchtitan`` on T > 1 ranks: sequence-parallel norms and residual stream, loss parallelism."""
    return getattr(setup, "tp", 1) > 1 and getattr(setup, "tp_plan", TpPlan.HF) is TpPlan.TORCHTITAN


@functools.lru_cache(maxsize=256)
def rank_spec(spec: ModelSpec, tp: int, vocab_parallel: bool = False) -> ModelSpec:
    """The model one tensor-parallel rank computes: a/T query heads, k/T key/value heads (head_dim kept), an MLP of
    width I/T; hidden size and layers unchanged. The vocabulary: unchanged under transformers' plan (its rows are
    sharded in ``vocab_sharded``, its logits gathered); ``vocab_parallel`` (torchtitan's plan): ceil(V/T), rank 0's
    rows of the embedding and the output layer and the width of its ``Shard(-1)`` logits, so the rank's loss runs
    on [b, s, V/T] (torchtitan ``apply_tp``: ``RowwiseParallel`` on ``tok_embeddings``, ``ColwiseParallel(...,
    output_layouts=Shard(-1))`` on ``output``). ``parallel_degrees.check_degrees`` has checked that T divides a, k
    and I."""
    if tp == 1:
        return spec
    return dataclasses.replace(spec, num_heads=spec.num_heads // tp, num_kv_heads=spec.num_kv_heads // tp,
                               intermediate_size=spec.intermediate_size // tp, params_published=None,
                               active_params_published=None, params_exact=None,
                               vocab_size=vocab_rows(spec.vocab_size, tp) if vocab_parallel else spec.vocab_size)


def vocab_rows(vocab_size: int, tp: int) -> int:
    """Rows of the vocabulary on rank 0 (the largest): ``Shard(0)`` splits as ``torch.chunk``, ceil(V/T) rows."""
    return -(-vocab_size // tp)


def vocab_sharded(tensors: tuple[StoredTensor, ...], tp: int, vocab_parallel: bool = False) -> tuple[StoredTensor, ...]:
    """The stored tensors with the embedding's and lm_head's [V, h] weights cut to [ceil(V/T), h] rows
    ("embedding_rowwise", "colwise_gather_output"); every other tensor as ``rank_spec`` made it. ``vocab_parallel``:
    ``rank_spec`` has cut the vocabulary already (torchtitan's plan): as they are."""
    if tp == 1 or vocab_parallel:
        return tensors
    return tuple(dataclasses.replace(t, shape=(vocab_rows(t.shape[0], tp), *t.shape[1:]))
                 if t.kind in ("embedding", "lm_head") and len(t.shape) == 2 else t for t in tensors)


def rank_view(spec: ModelSpec, resolved: ResolvedSetup) -> tuple[ModelSpec, ResolvedSetup]:
    """(the rank's model, the setup its data-parallel engine sees): ``rank_spec`` and ``--num-gpus`` replaced by the
    data-parallel degree N/T, so that ``terms/distributed.py`` shards the rank's slice over its dp ranks."""
    tp = tp_degree(resolved)
    if tp == 1:
        return spec, resolved
    setup = resolved.setup
    dp_setup = dataclasses.replace(setup, num_gpus=data_parallel_degree(setup.num_gpus, tp))
    return rank_spec(spec, tp, sequence_parallel(setup)), dataclasses.replace(resolved, setup=dp_setup)


def backward_all_reduce_bytes(hidden_size: int, tokens, compute_bytes: int):
    """2·T·h·c: in a layer's backward, a colwise module's input gradient is ``Partial`` and DTensor all-reduces it out
    of place (``redistribute`` -> functional ``all_reduce``: a new [T, h] output, the partial input freed after the
    wait) before autograd adds it into the norm's incoming gradient: two [T, h] buffers beyond what one GPU holds
    there, where one GPU accumulates q/k/v's (gate/up's) input gradients in place. Added at each layer-backward moment
    (an overcount of at most 2·T·h·c at the MLP's first backward moment, which precedes the reductions)."""
    return 2 * tokens * hidden_size * compute_bytes


def with_backward_all_reduce(moments, hidden_size: int, tokens, compute_bytes: int) -> list:
    """``moments`` with ``backward_all_reduce_bytes`` added to each layer-backward moment's temporaries."""
    extra = backward_all_reduce_bytes(hidden_size, tokens, compute_bytes)
    return [m._replace(temporaries=m.temporaries + extra) if m.phase is Phase.BACKWARD else m for m in moments]


def backward_reduce_scatter_bytes(hidden_size: int, tokens, compute_bytes: int, tp: int):
    """T·h·c + T·h·c/T_p under sequence parallelism (``--tp-plan torchtitan``): a block's input gradient is
    ``Partial`` [T, h] and the backward of its all-gather reduce-scatters it onto the sequence (``Shard(1)``); DTensor
    scatters along dim 1 by concatenating the T_p chunks into a dim-0 buffer first (``torch.cat``, a [T, h] copy
    beside the summed gradient) and the reduce-scatter's [T/T_p, h] output joins them (traced,
    ``tracing/tensor_parallel.py`` ``distribute_torchtitan``). Added at each layer-backward moment, as
    ``backward_all_reduce_bytes`` is for transformers' plan."""
    return tokens * hidden_size * compute_bytes + tokens * hidden_size * compute_bytes // tp


# -- communication ----------------------------------------------------------------------------------------------------
COLWISE_INPUTS_PER_LAYER = 5  # q, k, v, gate, up: each colwise module wraps its input in its own DTensor
ROWWISE_OUTPUTS_PER_LAYER = 2  # o, down


@dataclasses.dataclass(frozen=True)
class TensorParallelTraffic:
    """Bytes one rank sends per optimizer step inside its tensor-parallel group (ring: an all-reduce of S bytes
    sends 2·(T-1)/T·S, an all-gather of S bytes in total (T-1)/T·S; NCCL doc/PERFORMANCE.md)."""

    all_reduces: int  # all-reduces of [b, s, h] per micro-batch
    all_reduce_bytes: int
    all_gather_bytes: int  # lm_head's gathered logits

    @property
    def total_bytes(self) -> int:
        return self.all_reduce_bytes + self.all_gather_bytes


def tensor_parallel_traffic(spec: ModelSpec, resolved: ResolvedSetup, compute_bytes: int) -> TensorParallelTraffic:
    """Per rank and optimizer step, over ``grad_accum`` micro-batches of T = b·s tokens, c = ``compute_bytes``:

    forward    each layer's two rowwise outputs (o, down) all-reduced, [T, h] each (Megatron's "g"); again in the
               recompute under checkpointing; the embedding's partial lookup once
    backward   the input gradient of every colwise module is ``Partial`` and is all-reduced back to its Replicate
               input: q, k, v, gate and up separately (each wraps its input in its own ``DTensor.from_local``), 5 per
               layer where Megatron's fused "f" does 2; lm_head's input gradient once
    gather     lm_head's [T, V/T] outputs all-gathered to [T, V]
    all-reduces per micro-batch: L·(2·(1 + ckpt) + 5) + 2. Not counted: LoRA's [T, r] all-reduces and the q/k norms'
    gradient all-reduces (both under 1% of these for r, head_dim << h).
    ``--tp-plan torchtitan``: each of those all-reduces is an all-gather and a reduce-scatter of the same [T, h]
    (sequence parallelism: the same bytes on a ring; the backward's colwise inputs share one all-gather's DTensor, a
    count this keeps), and loss parallelism gathers no logits: the output layer's [T, h] input is all-gathered
    instead (the loss's per-row max and sum all-reduces, [T] each, are not counted).
    """
    tp = tp_degree(resolved)
    setup = resolved.setup
    if tp == 1:
        return TensorParallelTraffic(0, 0, 0)
    tokens = setup.batch_size * setup.padded_seq_len
    forward = ROWWISE_OUTPUTS_PER_LAYER * (2 if setup.grad_ckpt is not GradCkpt.NONE else 1)
    per_micro = spec.num_layers * (forward + COLWISE_INPUTS_PER_LAYER) + 2
    share = (tp - 1) / tp
    all_reduce = round(2 * share * per_micro * tokens * spec.hidden_size * compute_bytes) * setup.grad_accum
    gathered = spec.hidden_size if sequence_parallel(setup) else spec.vocab_size
    gather = round(share * tokens * gathered * compute_bytes) * setup.grad_accum
    return TensorParallelTraffic(per_micro, all_reduce, gather)


def tensor_parallel_details(spec: ModelSpec, resolved: ResolvedSetup, compute_bytes: int) -> dict:
    """``details`` of a ``--tp`` estimate: the degrees, the rank's parameters and the group's traffic per step."""
    tp = tp_degree(resolved)
    if tp == 1:
        return {}
    traffic = tensor_parallel_traffic(spec, resolved, compute_bytes)
    return {"tp": tp, "data_parallel_ranks": data_parallel_degree(resolved.setup.num_gpus, tp),
            "tp_all_reduces_per_micro_batch": traffic.all_reduces,
            "tp_communication_bytes_per_step": traffic.total_bytes}
