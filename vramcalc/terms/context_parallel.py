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
                   accumulators, the dK/dV all-to-all buffers (a moment of its own in each layer's backward)
  buffers          the full-length ``input_ids`` storage stays allocated after the in-place ``resize_`` to the
                   shard (8·b·s bytes; not counted, < 0.1% of a layer's activations)
"""

from __future__ import annotations

import dataclasses
import functools

from ..model import ModelSpec
from ..options import GradCkpt
from ..training_setup import ResolvedSetup

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


def ring_backward_bytes(spec: ModelSpec, tokens, cp: int, compute_bytes: int, heads: int | None = None,
                        kv_heads: int | None = None):
    """Transients of one layer's ring-attention backward beyond one GPU's flash backward, on T = b·s/C local tokens,
    q width a·d and K/V width k·d (torch 2.13 ``_templated_ring_attention_backward``, _attention.py:488-655, with
    accelerate's default "allgather" rotation):
      the all-gathered K and V of all C ranks                 C · 2·T·k·d·c   (``_AllGatherRotater``, :273-300, :524)
      the local K/V concatenated for the exchange              2·T·k·d·c       (``torch.cat``, :533)
      fp32 dq accumulator                                      4·T·a·d         (:513)
      fp32 dK/dV partial sums sent on, and the received ones   2 · 2·T·k·d·4   (the all-to-all ``dkv_rotater``,
                                                                               :520, :595, :625-627)
    The kernel's own dq/dk/dv outputs replace what one GPU's backward allocates (not extra). Rank 0 (the one traced)
    runs the second half of its queries for i > 0 (:541-572), which the count does not distinguish."""
    a = spec.num_heads if heads is None else heads
    k = spec.num_kv_heads if kv_heads is None else kv_heads
    d = spec.head_dim
    kv = 2 * tokens * k * d
    return (cp + 1) * kv * compute_bytes + F32_BYTES * tokens * a * d + 2 * kv * F32_BYTES


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
