"""The model states of one GPU: weights, gradients, optimizer states and the optimizer's scratch, each from its own
term function (``weights``, ``gradients``, ``optimizer``). On one GPU they are the answer as they stand; DDP adds its
buckets to them, DeepSpeed partitions its whole-model totals once, FSDP2 shards each tensor before the same term
functions run (``distributed.rank_states``; why FSDP2 cannot shard the totals: ``distributed``'s docstring).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from ..model import ModelSpec
from ..options import Method, Optimizer
from .gradients import gradient_bytes, layer_gradient_bytes
from .optimizer import BNB_QMAP_BYTES, optimizer_state_bytes, optimizer_step_temporary_bytes
from .parameters import COPY_INFIX
from .stored_tensor import StoredTensor
from ..units import round_up
from .weights import weight_bytes


@dataclass(frozen=True)
class RankStates:
    """The model states one GPU (one rank) holds, and the engine's gradient buffers (bytes)."""

    weights: int  # parameters at rest (sharded under fsdp and zero3)
    gradients: int  # gradients when the optimizer steps
    optimizer_states: int  # on the GPU (0 when offloaded)
    optimizer_step: int  # the optimizer's scratch on the GPU
    layer_gradients: tuple[int, int]  # (dense, MoE): gradient bytes a layer's backward leaves on the rank
    head_gradient: int  # lm_head's weight gradient when it first appears (full size; 0 unless it trains)
    standing_buffers: int = 0  # alive at every moment: DDP's buckets
    backward_buffers: int = 0  # alive while backward runs: DeepSpeed's reduce bucket
    accumulated_gradients: int = 0  # gradients kept across micro-batches (gradient accumulation)
    gathering: "Gathering | None" = None  # noqa: F821 (distributed.Gathering: FSDP2 and ZeRO-3 units)
    host_bytes: int = 0  # what the rank keeps in host memory (offload)
    # optimizer in backward: the largest decoder-layer step's scratch beyond its gradient (torchao's compiled step),
    # alive only while a layer's parameter steps, not during the head's or the embedding's backward
    layer_step_scratch: int = 0


def trained_head(model: ModelSpec, method: Method, tensors: tuple[StoredTensor, ...]) -> StoredTensor | None:
    """The lm_head weight that trains: in full fine-tuning lm_head's (the embedding's when tied); with lm_head in
    peft's ``modules_to_save`` its trained copy (``parameters.module_copies``: a tied lm_head's copy is its own
    weight, untied from the embedding); None when lm_head is frozen."""
    copy = next((t for t in tensors if t.name == "lm_head" + COPY_INFIX + "weight"), None)
    if copy is not None or method is not Method.FULL:
        return copy
    kind = "embedding" if model.tie_word_embeddings else "lm_head"
    return next(t for t in tensors if t.kind == kind)


def head_gradient_bytes(model: ModelSpec, method: Method, tensors: tuple[StoredTensor, ...]) -> int:
    """lm_head's weight gradient (``trained_head``), produced at the start of backward; 0 when lm_head is frozen."""
    head = trained_head(model, method, tensors)
    return 0 if head is None else head.numel * head.bits // 8


@functools.lru_cache(maxsize=4096)
def model_states(model: ModelSpec, tensors: tuple[StoredTensor, ...], method: Method, optimizer: Optimizer,
                 grad_accum: int, trainer_built: bool = True) -> RankStates:
    """Everything one GPU holds when nothing is sharded: W, G, O and the step's scratch from their term functions
    over the stored ``tensors`` (``parameters.parameter_tensors``); with gradient accumulation (``grad_accum`` > 1)
    the gradients stay alive through the next micro-batches. ``trainer_built``: HF Trainer built the optimizer
    (bitsandbytes' embeddings at 32 bits, torchao's ``block_size=256``); a stack's own recipe passes False."""
    gradients = gradient_bytes(tensors)
    return RankStates(
        weights=weight_bytes(tensors),
        gradients=gradients,
        optimizer_states=optimizer_state_bytes(tensors, optimizer, trainer_built).device_bytes,
        optimizer_step=optimizer_step_temporary_bytes(tensors, optimizer, trainer_built),
        layer_gradients=(layer_gradient_bytes(model, tensors, False), layer_gradient_bytes(model, tensors, True)),
        head_gradient=head_gradient_bytes(model, method, tensors),
        accumulated_gradients=gradients if grad_accum > 1 else 0,
    )


@functools.lru_cache(maxsize=4096)
def optimizer_in_backward(rank: RankStates, tensors: tuple[StoredTensor, ...], optimizer: Optimizer,
                          embedding_32bit: bool = True) -> RankStates:
    """The states when the optimizer steps each parameter from its post-accumulate-grad hook (torchtune
    ``optimizer_in_bwd``: ``training/_optimizer_in_backward.py`` (0.6) / ``memory.py`` ``register_optim_in_bwd_hooks``
    calls ``optim.step()`` then ``optim.zero_grad()`` for the one parameter whose gradient just became ready): a
    gradient lives from its accumulation to its own step, so the full gradient set never exists.

    Gradients at rest = 0; during backward, one parameter's gradient and its step's scratch are alive at a time:
    ``max over trainable tensors of (grad bytes + one-tensor step scratch)``, its gradient part charged to the
    backward buffers (alive at every backward moment, never in forward) and the rest (``layer_step_scratch``) to the
    decoder layers' backward moments only. When the decoder layers train, that maximum is taken over their
    tensors: the embedding's and lm_head's (V·h, often the largest) exist only around their own backward
    (``outer_step_bytes``), not while the layers' backward runs (traced, ``tracing/stacks/torchtune.py``). Optimizer states are unchanged (every parameter still has its own);
    the end-of-step scratch is gone (each step ran in backward). A bitsandbytes 8-bit optimizer per parameter fills
    its own "dynamic"/"udynamic" code tables on the device (``Optimizer8bit.fill_qmap``: ``self.name2qmap`` per
    instance): one pair per tensor with 8-bit states, not one per model (traced, ``tracing/stacks/torchtune.py``)."""
    trainable = [t for t in tensors if t.trainable]
    if not trainable:
        return rank
    one = _largest_step(trainable, optimizer, embedding_32bit)
    gradient = _largest_step(trainable, Optimizer.SGD)  # the same pool's largest gradient alone
    qmap_users = optimizer_state_bytes(tensors, optimizer, embedding_32bit).qmap_users
    extra_qmaps = (qmap_users - 1) * BNB_QMAP_BYTES if qmap_users > 1 else 0
    return replace(rank, gradients=0, optimizer_step=0, layer_gradients=(0, 0), head_gradient=0,
                   optimizer_states=rank.optimizer_states + extra_qmaps,
                   backward_buffers=rank.backward_buffers + gradient, layer_step_scratch=one - gradient,
                   accumulated_gradients=0)


def _largest_step(tensors, optimizer: Optimizer, trainer_built: bool = True) -> int:
    """The largest (gradient + one-tensor step scratch) over ``tensors``: the decoder layers' when any trains."""
    tensors = list(tensors)
    layers = [t for t in tensors if t.scope != "model"]
    pool = layers or tensors
    return max(round_up(t.numel * t.bits // 8)
               + optimizer_step_temporary_bytes((replace(t, count=1),), optimizer, trainer_built) for t in pool)


def outer_step_bytes(tensors: tuple[StoredTensor, ...], optimizer: Optimizer, trainer_built: bool = True) -> int:
    """Optimizer in backward: the largest (gradient + step scratch) of the tensors outside the decoder layers (the
    embedding, lm_head, the final norm), alive around lm_head's and the embedding's backward; 0 when only decoder
    tensors train or when those are the whole set (``_largest_step`` already counts them)."""
    trainable = [t for t in tensors if t.trainable]
    outer = [t for t in trainable if t.scope == "model"]
    if not outer or len(outer) == len(trainable):
        return 0
    return max(round_up(t.numel * t.bits // 8)
               + optimizer_step_temporary_bytes((replace(t, count=1),), optimizer, trainer_built) for t in outer)


def head_step_bytes(model: ModelSpec, method: Method, tensors: tuple[StoredTensor, ...], optimizer: Optimizer,
                    trainer_built: bool = True) -> tuple[int, int]:
    """Optimizer in backward: (gradient, step scratch) of an untied trained lm_head's step, which its
    post-accumulate-grad hook runs once the loss's chunks have all added to its gradient, before the final norm's
    backward (traced, ``tracing/stacks/torchtune.py``); (0, 0) when lm_head is frozen or tied (the embedding's
    backward finishes a tied one's gradient: ``outer_step_bytes`` at backward end)."""
    head = trained_head(model, method, tensors)
    if head is None or head.kind != "lm_head":
        return 0, 0
    one = replace(head, count=1)
    return (round_up(head.numel * head.bits // 8),
            optimizer_step_temporary_bytes((one,), optimizer, trainer_built))
