"""What one expert-parallel rank holds and sends: transformers' expert plan on E ranks (``--ep E``).

One group (transformers 5.25.0; ``parallel_degrees.check_expert_degree``): ``DistributedConfig(tp_size=E,
tp_plan={}, ep_size=E)``, the E ranks of one group share one batch of T = b·s tokens. The family's
``base_model_ep_plan`` (models/qwen3_moe/configuration_qwen3_moe.py:66-70) shards the 3-D expert tensors
``grouped_gemm`` (``MoEParamShard``: ``Shard(0)`` over the expert dimension, distributed/expert_parallel.py:96-114)
and reaches them through ``ep_dispatch_experts`` (``AllToAllEP`` in training, :159-259). Nothing else is in a plan:
attention, the router (``mlp.gate``), shared experts, norms, embedding and lm_head are whole on every rank.

  weights, gradients, optimizer states   expert tensors (and gpt-oss's expert biases): n/E experts; the rest whole.
                                          The parameters are DTensors, so their gradients and optimizer states are the
                                          local shard's. LoRA on the 3-D experts (peft 0.21's conversion, also of
                                          ``all-linear``) is refused under --ep (training_setup._lora_modules: peft's
                                          ParamWrapper fails on DTensor shards), so adapters are those of one GPU.
  activations                             attention, norms and the router run on all T tokens on every rank (the batch
                                          is shared); the rank takes a 1/E row slice (:203-210) and, under uniform
                                          routing, its experts receive S/E = T·K/E (token, expert) pairs: the experts'
                                          per-slot tensors of ``activations._moe`` are those of one GPU divided by E,
                                          plus what the dispatch and combine save (``dispatch_saved_per_slot``).
EP across FSDP ranks (--num-gpus N > E, --sharding fsdp; ``DistributedConfig(fsdp_size=N, ep_size=E)``,
distributed/fsdp.py:176-238):
  weights, gradients, optimizer states   every dense tensor a dim-0 FSDP2 shard over N (``distributed.tensor_ranks``),
                                          the rank's n/E experts one over efsdp = N/E (``expert_fsdp_ranks``), both
                                          padded to ceil(rows/ranks) rows: when efsdp exceeds n/E a rank holds whole
                                          experts and its peers padding. Kept in the loaded dtype (no fp32 upcast, no
                                          16-bit gather: ``fsdp_mixed_precision`` is off). peft's adapters, attached
                                          after ``fully_shard``, are whole on every rank with whole gradients.
  gathered units                          a decoder layer's dense unit over N and, nested in it, its experts' unit
                                          over efsdp, each with its all-gather buffer; backward prefetches the
                                          previous layer's dense unit only (``distributed.Unit.prefetch_bytes``).
  activations                             every rank its own batch of T tokens (``slot_share`` 1): its experts receive
                                          T·K/E pairs from each of the E ranks of its group, T·K in all, as on one GPU,
                                          plus what the dispatch and combine save for the T·K pairs it sends.
Routing balance: uniform, the assumption the one-GPU MoE estimate already makes (every expert holds S/n slots: the
grouped experts' tensors are sized by S, not by the busiest expert). A skewed routing sends more pairs to the rank
of the busiest experts; the estimate is then that of a balanced router (load-balancing loss, capacity-free dispatch).
"""

from __future__ import annotations

import dataclasses

from ..model import ModelSpec
from ..options import GradCkpt
from ..training_setup import ResolvedSetup
from .stored_tensor import StoredTensor

_INT64 = 8


def ep_degree(resolved: ResolvedSetup) -> int:
    return getattr(resolved.setup, "ep", 1)


def fsdp_by_transformers(resolved: ResolvedSetup) -> bool:
    """EP over FSDP ranks (--num-gpus N > E, --sharding fsdp): ``DistributedConfig(fsdp_size=N, ep_size=E)``, the
    model sharded at load time by transformers' own FSDP2 plan, which Trainer wraps in nothing else."""
    setup = resolved.setup
    return ep_degree(resolved) > 1 and setup.num_gpus > ep_degree(resolved) and setup.sharding.value == "fsdp"


def expert_fsdp_ranks(resolved: ResolvedSetup) -> int:
    """efsdp = fsdp·tp/ep = N/E (distributed/configuration_utils.py:108-129, ``efsdp_size``): the ranks holding the
    same n/E experts, which FSDP2 shards them over (fsdp.py:197-214)."""
    return resolved.setup.num_gpus // ep_degree(resolved)


def slot_share(resolved: ResolvedSetup) -> int:
    """What the rank's experts' routed slots are divided by against one GPU's T·K: E when the group shares one batch
    (each rank dispatches a 1/E row slice of it, expert_parallel.py:203-210), 1 over FSDP ranks, where every rank has
    a batch of its own (``dp_size`` = N batches, fsdp.py:200-205: "an EP group holds ep_size / tp_size distinct
    batches") and, under uniform routing, receives T·K/E pairs from each of the E ranks of its group: T·K."""
    ep = ep_degree(resolved)
    return 1 if ep == 1 or fsdp_by_transformers(resolved) else ep


def experts_sharded(tensors: tuple[StoredTensor, ...], ep: int) -> tuple[StoredTensor, ...]:
    """The stored tensors with every 3-D expert tensor (and expert bias) cut to n/E experts (``Shard(0)``; the
    parallel-degree check makes E divide n); every other tensor whole."""
    if ep == 1:
        return tensors
    return tuple(dataclasses.replace(t, shape=(t.shape[0] // ep, *t.shape[1:])) if t.kind == "experts" else t
                 for t in tensors)


def dispatch_saved_per_slot() -> int:
    """Bytes the dispatch and combine save per (token, expert) pair the rank sends (``AllToAllEP``,
    distributed/expert_parallel.py): the int64 ``order // K`` that gathers the sent rows (index's backward) and the
    int64 ``order`` that scatters the returned rows back (``token_outputs[order] = recv_out``, :246). The [pairs, h]
    ``token_outputs`` the routing-weight product saves (:248) takes the place of the experts' own output, which one
    GPU saves for the same product and which the rank's experts no longer save (their routing weights are the
    ``ones_like`` of :234, no gradient): the per-slot h-wide bytes of ``activations._moe`` are unchanged."""
    return 2 * _INT64


# -- communication ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ExpertParallelTraffic:
    """Bytes one rank sends per optimizer step in its expert-parallel group."""

    all_to_alls: int  # all-to-alls of routed rows per micro-batch (dispatch and combine, forward and backward)
    all_to_all_bytes: int
    all_gather_bytes: int  # the combined row slices gathered back to the shared batch

    @property
    def total_bytes(self) -> int:
        return self.all_to_all_bytes + self.all_gather_bytes


def expert_parallel_traffic(spec: ModelSpec, resolved: ResolvedSetup, compute_bytes: int) -> ExpertParallelTraffic:
    """Per rank and optimizer step, over ``grad_accum`` micro-batches of T = b·s tokens, K experts per token,
    E ranks, c = ``compute_bytes``, L_moe MoE layers. One group sharing one batch:

    all-to-all   the rank sends its T/E tokens' T·K/E pairs, (E-1)/E of them to other ranks: T·K/E·h·c·(E-1)/E
                 bytes per exchange; four exchanges per MoE layer (dispatch and combine forward, their gradients
                 backward), two more per layer under checkpointing (the recompute dispatches and combines again)
    all-gather   the [T/E, h] combined slice to the [T, h] batch (``full_tensor``, :249-259): (E-1)/E·T·h·c per
                 layer forward (and recompute); its backward is a local slice
    Summed over the group: T·h·K·c·(E-1)/E per exchange, the brief's tokens × hidden × top_k × bytes × (E-1)/E.
    The counts' [E, n/E] int64 all-to-all per layer is not counted (n·8 bytes).
    Over FSDP ranks (``slot_share`` 1): the rank dispatches all T·K pairs of its own batch, T·K·h·c·(E-1)/E bytes per
    exchange, and gathers nothing back (``tp_mesh.size() == 1``, :249-250); FSDP2's own gathers and reduce-scatters
    are ``distributed.communication_bytes_per_step``'s.
    """
    ep = ep_degree(resolved)
    setup = resolved.setup
    if ep == 1:
        return ExpertParallelTraffic(0, 0, 0)
    tokens = setup.batch_size * setup.padded_seq_len
    moe_layers = sum(1 for i in range(spec.num_layers) if spec.is_moe_layer(i))
    forwards = 2 if setup.grad_ckpt is not GradCkpt.NONE else 1
    exchanges = moe_layers * (2 * forwards + 2)
    share = (ep - 1) / ep
    sliced = slot_share(resolved)
    per_exchange = tokens * spec.experts_per_token / sliced * spec.hidden_size * compute_bytes * share
    gather = 0 if sliced == 1 else round(moe_layers * forwards * share * tokens * spec.hidden_size * compute_bytes
                                         ) * setup.grad_accum
    return ExpertParallelTraffic(exchanges, round(exchanges * per_exchange) * setup.grad_accum, gather)


def expert_parallel_details(spec: ModelSpec, resolved: ResolvedSetup, compute_bytes: int) -> dict:
    """``details`` of an ``--ep`` estimate: the degree, the rank's experts and the group's traffic per step."""
    ep = ep_degree(resolved)
    if ep == 1:
        return {}
    traffic = expert_parallel_traffic(spec, resolved, compute_bytes)
    efsdp = expert_fsdp_ranks(resolved) if fsdp_by_transformers(resolved) else 1
    return {"ep": ep, "experts_per_rank": spec.num_experts // ep, "expert_fsdp_ranks": efsdp,
            "ep_all_to_alls_per_micro_batch": traffic.all_to_alls,
            "ep_all_to_all_bytes_per_step": traffic.all_to_all_bytes,
            "ep_communication_bytes_per_step": traffic.total_bytes}
