"""What one context-parallel rank holds and sends: accelerate's ``ParallelismConfig(cp_size=C)`` under transformers'
Trainer, i.e. torch's ring attention over SDPA (``--cp C``).

The stack (transformers 5.25.0, accelerate 1.16, torch 2.13):
  Trainer.training_step enters ``accelerator.maybe_context_parallel`` around the forward and the backward
  (trainer.py:2113-2127), with ``input_ids``, ``labels``, ``shift_labels`` and ``position_ids`` as buffers sharded on
  the sequence dimension (trainer.py:2438-2530); accelerate's ``_prepare_cp`` sets the rotate method from
  ``TorchContextParallelConfig.cp_comm_strategy`` (default "allgather", utils/dataclasses.py:2098-2107) and wraps
  torch's ``context_parallel`` on the ``cp`` mesh dimension (accelerator.py:1628-1641).
  torch's ``context_parallel`` (_context_parallel/_attention.py:1515-1601) reorders each buffer with the head-tail
  load balancer (rank r keeps chunks r and 2C-1-r of 2C, _load_balancer.py) and keeps s/C positions per rank, then
  monkey-patches ``F.scaled_dot_product_attention`` so that q, k, v become ``Shard(2)`` DTensors whose flash (or
  efficient, cuDNN) kernel runs as ``_templated_ring_attention`` (:317-485): C partial SDPA calls on the local
  queries against each rank's K/V chunk, merged in fp32 (``_SDPAMerger``, :139-229); the backward
  (``_templated_ring_attention_backward``, :488-655) does the same with fp32 dq/dk/dv accumulators and passes the
  dK/dV partial sums around the ring by all-to-all (:520).
  FSDP2 shards parameters, gradients and optimizer states over ``dp_shard_cp`` = dp_shard x cp ranks
  (accelerate parallelism_config.py:141-153): ``terms/distributed.py`` with ``--num-gpus`` N/tp.

Hence a rank is, activation by activation, the single-GPU model on b sequences of s/C tokens (``rank_view``: every
saved activation, the logits and the loss are the rank's s/C positions), with these differences:
  o_proj's input   the merged attention output leaves the ring in the query's [b, a, s/C, d] layout
                   (``_SDPAMerger.results``: a new tensor from fp32 arithmetic on [b, a, s, d] chunks), so
                   ``transpose(1, 2).contiguous()`` before o_proj copies it where the flash kernel's own output is
                   already [b, s, a, d]: + b·(s/C)·a·d·c per layer where o_proj saves its input (the existing
                   ``query_head_major`` rule of ``terms/activations.py``, set by ``step_moment.layer_setup``)
  attention backward   ``ring_backward_bytes``: the all-gathered K/V of the whole sequence, the fp32 dq/dk/dv
                   accumulators, the contiguous k and v, the kernel's gradients, the dK/dV all-to-all buffers (a
                   moment of its own in each layer's backward, ``ring_moment_bytes``)
  --compile        the compiled block keeps the all-gathered K/V for backward (``compiled_ring_saved_bytes``)
  --repeat-kv      k and v repeated to every head before SDPA (torchtitan's ``Attention``): the ring exchanges a·d
                   (``ring_kv_heads``)

torchtitan (9dec370) runs the same torch ring: ``utils.create_context_parallel_ctx`` enters ``context_parallel`` on
its ``cp`` mesh with the "allgather" rotation and the buffers ``input_ids``, ``labels`` and the rotary
``freqs_cis`` (sequence dim 0), under ``sdpa_kernel([FLASH, EFFICIENT])``, and ``apply_fsdp`` shards over
``dp_shard_cp``: the same rank view. Its loss reads pre-shifted labels and its rotary table is a model buffer, each
a few bytes per token apart from the HF stack's.
  buffers          the full-length ``input_ids`` storage stays allocated after the in-place ``resize_`` to the
                   shard (8·b·s bytes; not counted, < 0.1% of a layer's activations)
"""

from __future__ import annotations

import dataclasses
import functools

from ..model import ModelSpec
from ..options import GradCkpt
from ..training_setup import ResolvedSetup
from ..units import maximum

F32_BYTES = 4  # _ContextParallelOptions.convert_to_f32 = True (_attention.py:71-77): merges and dq/dk/dv in fp32


def cp_degree(resolved: ResolvedSetup) -> int:
    return getattr(resolved.setup, "cp", 1)


@functools.lru_cache(maxsize=256)
def _rank_resolved(resolved: ResolvedSetup) -> ResolvedSetup:
    setup = resolved.setup
    return dataclasses.replace(resolved, setup=dataclasses.replace(setup, seq_len=setup.seq_len // setup.cp))


def rank_view(spec: ModelSpec, resolved: ResolvedSetup) -> tuple[ModelSpec, ResolvedSetup]:
    """(the model, the setup one cp rank runs): the sequence cut to s/C (``parallel_degrees.check_context_parallel``
    has checked that 2·C divides s); ``--num-gpus`` unchanged, so FSDP2 shards over every rank but the tp group's,
    dp_shard x cp, as accelerate's ``dp_shard_cp`` mesh dimension does. cp = 1: as given."""
    if cp_degree(resolved) == 1:
        return spec, resolved
    return spec, _rank_resolved(resolved)


def whole_job(resolved: ResolvedSetup) -> ResolvedSetup:
    """The job's setup back from a rank's view (the sequence of s = C x s/C tokens)."""
    setup = resolved.setup
    return dataclasses.replace(resolved, setup=dataclasses.replace(setup, seq_len=setup.seq_len * setup.cp))


def compiled_ring_saved_bytes(cp: int, kv_width: int, compute_bytes: int) -> int:
    """Bytes per local token a compiled layer (``--compile``) keeps for backward beyond eager's ring: the
    all-gathered K/V of the C ranks, C · 2·k·d·c (k·d = ``kv_width``).

    Under torch.compile the ring runs inside the layer's graph: AOTAutograd traces the forward ring
    (``_templated_ring_attention``, whose ``_AllGatherRotater`` all-gathers the rank's ``cat([k, v])`` once) and the
    backward ring (``_templated_ring_attention_backward``, which all-gathers the same ``cat`` again) into one joint
    graph; the partitioner's CSE (``min_cut_rematerialization_partition``: ``fx_graph_cse``, functorch
    ``config.cse``) makes the two all-gathers one node, and a collective is not recomputable (``should_ban_
    recomputation``: ``op_types.is_recomputable``), so the forward graph returns views of the gathered buffer as saved
    tensors and the backward graph gathers nothing (traced: ``tracing/compiled.py`` on torch 2.13, the same ring as
    torch 2.6's _attention.py:301-330, 358-530). The views keep the whole [C·2·T·k·d] buffer alive until the layer's
    last SDPA backward. Eager's ring saves only the rank's own k and v and gathers again in backward
    (``ring_backward_bytes``). Under checkpointing the recompute keeps it instead, through the layer's backward."""
    return cp * 2 * kv_width * compute_bytes


def ring_backward_bytes(spec: ModelSpec, tokens, cp: int, compute_bytes: int, heads: int | None = None,
                        kv_heads: int | None = None, compiled: bool = False):
    """Transients of one layer's ring-attention backward at its largest moment, on T = b·s/C local tokens, on the
    traced rank 0 (torch 2.13 ``_templated_ring_attention_backward``, _attention.py:488-655, "allgather" rotation;
    torch 2.6's, which torchtitan 9dec370 ran, allocates the same, _attention.py:606-775). With A = T·a·d query
    elements, kv = 2·T·k·d (one rank's K and V), c the compute bytes, 4 fp32's:
      before the loop: fp32 accumulators dq, dk, dv (``zeros_like(..., float32)``)     4·A + 4·kv
                       ``key.contiguous()``, ``value.contiguous()`` (k, v are transposed views)  c·kv
      step 0: K/V concatenated (``torch.cat``), all-gathered from the C ranks       c·kv + C·c·kv
              the kernel's gradients (dq_, dk_, dv_, held until the next step's return)  c·A + c·kv
              the fp32 dK/dV sums concatenated and the all-to-all's output           2·4·kv
      step 1 (C >= 3), as it concatenates K/V again (discarded by the all-gather rotater):
              M1 = (4 + c)·A + (12 + (C + 4)·c)·kv
      every step i >= 1: rank 0 runs the second half of its queries (i > rank), and ``_partial_update`` makes a new
              fp32 dq beside the old one, the step's kernel gradients c·(A/2 + kv), dK/dV received (the previous
              all-to-all's output, now grad_key and grad_value), concatenated and sent:
              M2 = (8 + c/2)·A + (12 + (C + 2)·c)·kv
    ring = max(M1, M2); against the traced backward (``tracing/context_parallel.py``, the tracker inside DTensor's
    handlers): tiny Llama C = 4, T = 1024, a = 4, k = 2: M1 = 8,912,896 bytes, as traced; tiny Qwen3 C = 2, T = 2048,
    a = 8, k = 2: M2 = 19,922,944 (traced 19,955,712, the sliced logsumexp's contiguous copy beside). The flash
    kernel's own gradients are among them (the moment stands in for one GPU's attention backward).
    ``compiled`` (``--compile``): the layer's graph keeps the gathered K/V as a saved tensor
    (``compiled_ring_saved_bytes``) and its backward neither copies, concatenates nor gathers K/V again
    (``compiled_ring_backward_bytes``)."""
    a = spec.num_heads if heads is None else heads
    k = spec.num_kv_heads if kv_heads is None else kv_heads
    d = spec.head_dim
    q, kv = tokens * a * d, 2 * tokens * k * d
    c = compute_bytes
    if compiled:
        return compiled_ring_backward_bytes(tokens, a * d, kv, c)
    f = F32_BYTES
    later_step = (2 * f) * q + c * q // 2 + (3 * f + (cp + 2) * c) * kv
    second_step = (f + c) * q + (3 * f + (cp + 4) * c) * kv if cp >= 3 else 0
    return maximum(second_step, later_step)


def ring_kv_heads(spec: ModelSpec, setup) -> int:
    """The key/value heads the ring exchanges: the model's k, or a where k and v are repeated to every head before
    SDPA (``--repeat-kv``: transformers < 4.54, torchtitan's ``repeat_kv`` in ``Attention.forward``; a > k > 1)."""
    a, k = spec.num_heads, spec.num_kv_heads
    return a if getattr(setup, "repeat_kv", False) and a > k > 1 else k


def ring_moment_bytes(spec: ModelSpec, tokens, cp: int, compute_bytes: int, compiled: bool = False,
                      o_input_copy_bytes=0, kv_heads: int | None = None):
    """What a layer's backward holds beside its attention block's saved tensors while the ring runs: the ring's
    buffers (``ring_backward_bytes``), the attention output's gradient that o_proj's backward made (the ring's
    ``grad_out``, c·T·a·d) and the layer output's gradient, which the residual adds to the block input's gradient
    once the attention's backward returns (c·T·h), less o_proj's saved copy of the attention output
    (``o_input_copy_bytes``, ``activations.attention_output_copy``), which o_proj's backward freed. T = b·s/C local
    tokens."""
    return (ring_backward_bytes(spec, tokens, cp, compute_bytes, kv_heads=kv_heads, compiled=compiled)
            + compute_bytes * tokens * (spec.num_heads * spec.head_dim + spec.hidden_size) - o_input_copy_bytes)


def compiled_ring_backward_bytes(tokens, q_width: int, kv, compute_bytes: int):
    """The compiled ring's backward transients beyond its saved tensors (the graph of ``tracing/compiled.py``):
    fp32 dq accumulator, fp32 dK/dV accumulators, the kernel's c gradients, and the fp32 dK/dV concatenation with
    the all-to-all's output: 4·T·a·d + c·(T·a·d + kv) + 3·4·kv."""
    c = compute_bytes
    return (F32_BYTES + c) * tokens * q_width + (3 * F32_BYTES + c) * kv


# -- communication ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ContextParallelTraffic:
    """Bytes one rank sends per optimizer step inside its cp group (rotation per torch 2.13 ``_attention.py``)."""

    kv_forward_bytes: int  # K/V exchanged in the forward passes (and the recompute under checkpointing)
    kv_backward_bytes: int  # K/V exchanged again in the backward
    dkv_backward_bytes: int  # the fp32 dK/dV partial sums passed around the ring

    @property
    def total_bytes(self) -> int:
        return self.kv_forward_bytes + self.kv_backward_bytes + self.dkv_backward_bytes


def context_parallel_traffic(spec: ModelSpec, resolved: ResolvedSetup, compute_bytes: int,
                             heads: int | None = None, kv_heads: int | None = None) -> ContextParallelTraffic:
    """Per rank and optimizer step, over ``grad_accum`` micro-batches of b sequences, with s/C local tokens:
    one K/V chunk is 2·b·(s/C)·k·d·c bytes; per layer
      forward   (C-1) chunks: the all-gather sends the rank's chunk to C-1 peers (an all-to-all ring passes it C-1
                times, the same bytes); again in the recompute under checkpointing
      backward  (C-1) K/V chunks again, and C dK/dV exchanges of fp32 partial sums, 2·b·(s/C)·k·d·4 each (the
                all-to-all after every one of the C steps, :625-627)
    ``resolved`` is the whole job's setup (s, not s/C)."""
    cp = cp_degree(resolved)
    setup = resolved.setup
    if cp == 1:
        return ContextParallelTraffic(0, 0, 0)
    k = spec.num_kv_heads if kv_heads is None else kv_heads
    local = setup.batch_size * (setup.padded_seq_len // cp)
    chunk = 2 * local * k * spec.head_dim
    forwards = 2 if setup.grad_ckpt is not GradCkpt.NONE else 1
    per_micro = spec.num_layers
    kv_forward = per_micro * forwards * (cp - 1) * chunk * compute_bytes * setup.grad_accum
    kv_backward = per_micro * (cp - 1) * chunk * compute_bytes * setup.grad_accum
    dkv = per_micro * cp * chunk * F32_BYTES * setup.grad_accum
    return ContextParallelTraffic(kv_forward, kv_backward, dkv)


def context_parallel_details(spec: ModelSpec, resolved: ResolvedSetup, compute_bytes: int,
                             heads: int | None = None, kv_heads: int | None = None) -> dict:
    """``details`` of a ``--cp`` estimate: the degrees, the rank's tokens and the ring's traffic per step."""
    cp = cp_degree(resolved)
    if cp == 1:
        return {}
    setup = resolved.setup
    traffic = context_parallel_traffic(spec, resolved, compute_bytes, heads, kv_heads)
    return {"cp": cp, "cp_rotate_method": "allgather", "cp_tokens_per_rank": setup.padded_seq_len // cp,
            "fsdp_shard_ranks": setup.num_gpus // setup.tp,
            "cp_kv_bytes_per_step": traffic.kv_forward_bytes + traffic.kv_backward_bytes,
            "cp_dkv_bytes_per_step": traffic.dkv_backward_bytes,
            "cp_communication_bytes_per_step": traffic.total_bytes}
