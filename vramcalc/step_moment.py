"""One moment of a training step (the estimator's unit), the decoder-layer setup its saved tensors depend on, and the
saved-tensor plan the moments read (the runs of same-kind layers, what each saves): what the single-GPU estimator,
the per-GPU device_map model and the pipeline stages build on."""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import NamedTuple

from .model import ModelSpec
from .options import GradCkpt, Phase
from .terms import activations, expert_parallel, moe_lora, stack_layers
from .terms.tensor_parallel import sequence_parallel
from .training_setup import ResolvedSetup


class Moment(NamedTuple):
    """The bytes of each tensor term at one moment of the step (a named tuple: a few dozen are built per setup), and
    how many of them FSDP allocated on its own streams (``distributed.side_stream_pools``): the gathered units'
    all-gather buffers (of ``weights``) and the reduced gradient shards (of ``gradients``). 0 where no engine
    allocates on a side stream."""

    phase: Phase
    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    logits: int
    temporaries: int
    all_gather_stream: int = 0
    reduce_scatter_stream: int = 0
    # the caching allocator's reserved bytes of the step less this moment's (``runtime.step_reserved_bytes``): what
    # reserved holds beyond the tensors were this moment the peak, the loading's high-water mark included (set last,
    # ``estimator._with_reserved``); ``own_stranded``: the same for the training step's own blocks alone
    stranded: int = 0
    own_stranded: int = 0

    @property
    def tensor_bytes(self) -> int:
        return self.weights + self.gradients + self.optimizer_states + self.activations + self.logits + self.temporaries


def layer_setup(resolved: ResolvedSetup, family: str = "") -> activations.LayerSetup:
    """The values a decoder layer's saved tensors depend on (``activations.LayerSetup``), from a resolved setup.
    ``family``: the model's, so that the LoRA targets peft moves onto fused experts leave the Linears
    (terms/moe_lora.py)."""
    setup = resolved.setup
    layers = stack_layers.stack_layers(setup.stack)
    if layers.stable_embedding and not setup.stable_embedding:  # a litgpt older than the swap (stack_layers.py)
        layers = replace(layers, stable_embedding=False)
    if layers.norm_fp32_product and not getattr(setup, "norm_fp32_product", True):  # torchtune before 1450d6126
        layers = replace(layers, norm_fp32_product=False)
    if getattr(setup, "cp", 1) > 1:  # --cp: the ring's merged output keeps q's [b, a, s, d] layout (terms/context_parallel)
        layers = replace(layers, query_head_major=True)
    if activations.checkpoint_mode(setup.grad_ckpt) is GradCkpt.WRAPPER and layers.dynamic_cache:
        # torch's checkpoint_wrapper around transformers' layers: transformers' gradient_checkpointing_enable, and
        # with it enable_input_require_grads, never runs (activations.first_layer_recomputes_gradless); a stack's own
        # decoder checkpoints as it always does
        layers = replace(layers, checkpoint_inputs_need_grad=False)
    layer = _layer_setup(setup.method, setup.precision, setup.adapter_dtype, resolved.attn_used,
                         moe_lora.linear_targets(family, resolved.lora_modules), setup.lora_rank, setup.lora_dropout, setup.kernels, setup.compile, setup.activation_offload,
                         layers, expert_parallel.slot_share(resolved), getattr(setup, "ep", 1) > 1,
                         tuple(name for name, _ in moe_lora.target_parameters(family, resolved.lora_modules)),
                         setup.modules_to_save, getattr(setup, "repeat_kv", False), resolved.base_4bit,
                         getattr(setup, "cp", 1) if setup.compile else 1,
                         setup.tp if sequence_parallel(setup) else 1)
    if setup.packing and layers.rope_buffer is stack_layers.RopeBuffer.TORCHTUNE:
        # torchtune's packed batches carry input_pos, which its RoPE gathers per call (activations.LayerSetup)
        layer = replace(layer, rope_gathered=True)
    return layer


@functools.lru_cache(maxsize=4096)
def _layer_setup(method, precision, adapter_dtype, attn_used, lora_modules, lora_rank, lora_dropout, kernels,
                 compiled, offload, layers=stack_layers.HF, ep=1, ep_dispatch=False, lora_experts=(),
                 modules_to_save=(), repeat_kv=False, base_4bit=False, ring_ranks=1, sequence_shards=1):
    lora = method.uses_lora or method.peft_facts is not None  # a peft method's targets ride on the LoRA fields
    return activations.LayerSetup(method, activations.dtypes(method, precision, adapter_dtype), attn_used,
                                  lora_modules if lora else (), lora_rank if lora else 0, lora_dropout if lora else 0.0,
                                  kernels, compiled, offload, layers, ep, lora_experts if lora else (), ep_dispatch,
                                  modules_to_save, repeat_kv, base_4bit, ring_ranks, sequence_shards)


@functools.lru_cache(maxsize=256)
def layer_runs(spec: ModelSpec, masked: bool = False) -> tuple[tuple[tuple[bool, bool, bool], int, int], ...]:
    """The runs of same-kind decoder layers in backward order: ((moe, masked, conv), highest index, lowest index); a
    layer's kind is dense or MoE, whether its attention is masked (``activations.layer_masks``: the sliding
    layers of a model that also has full ones) and whether it is a hybrid's convolution layer
    (``activations.layer_operators``)."""
    kinds = tuple(zip(spec.layer_is_moe, activations.layer_masks(spec, masked), activations.layer_operators(spec)))
    runs = []
    hi = spec.num_layers - 1
    for index in range(spec.num_layers - 1, -1, -1):
        if index == 0 or kinds[index - 1] != kinds[index]:
            runs.append((kinds[index], hi, index))
            hi = index - 1
    return tuple(runs)


class SavedPlan(NamedTuple):
    """The per-token/per-square saved tensors the moments read, for one (model, layer setup, checkpointing, mask)."""

    model: activations.Saved  # the whole model at the end of forward
    head: activations.Saved  # the final norm's and lm_head's
    shared: activations.Saved  # rotary tables, position ids, checkpointed masks
    attention: activations.Saved  # one layer's attention block
    # per layer kind (moe, masked, conv) the model has (``layer_runs``):
    kept: dict  # what a layer keeps until its backward
    recompute: dict  # a layer's recomputed activations under checkpointing
    attention_left: dict  # what its backward adds to ``kept`` once the MLP's backward is done
    freed: dict  # what its backward frees before its MLP's and its attention's transients peak
    # the first layer's recompute, attention_left and freed where its input needs no gradient under checkpointing
    # (``activations.first_layer_recomputes_gradless``), else None
    first: tuple | None = None


@functools.lru_cache(maxsize=4096)
def saved_plan(spec: ModelSpec, layer: activations.LayerSetup, ckpt: bool, masked: bool) -> SavedPlan:
    kinds = {kind for kind, _, _ in layer_runs(spec, masked)}  # the layer kinds the model has: (moe, masked, conv)
    kept = {kind: activations.layer_kept(spec, layer, ckpt, *kind) for kind in kinds}
    recompute = {kind: activations.layer_recomputed(spec, layer, ckpt, *kind) for kind in kinds}
    attention_left = {kind: activations.attention_left(spec, layer, ckpt, *kind) for kind in kinds}
    # (under selective checkpointing or offload the saved tensors are cached or brought back: not modelled)
    order_known = not layer.offload and not activations.checkpoint_mode(ckpt).caches_ops
    nothing = activations.BackwardFreed(activations.Saved(), activations.Saved(), False, 0)
    freed = {kind: activations.backward_freed(spec, layer, *kind) if order_known else nothing for kind in kinds}
    first = None
    if activations.first_layer_recomputes_gradless(layer, ckpt):
        kind = first_kind(spec, masked)
        first = (activations.layer_recomputed(spec, layer, ckpt, *kind, requires_grad=False),
                 activations.attention_left(spec, layer, ckpt, *kind, requires_grad=False),
                 activations.backward_freed(spec, layer, *kind, requires_grad=False) if order_known else nothing)
    return SavedPlan(activations.model_saved(spec, layer, ckpt, masked), activations.head_saved(spec, layer),
                      activations.shared_saved(spec, layer.dtypes, layer.attn_used, ckpt, masked, layer.layers),
                      activations.attention_saved(spec, layer, masked), kept, recompute, attention_left, freed, first)


def first_kind(spec: ModelSpec, masked: bool) -> tuple[bool, bool, bool]:
    """The first decoder layer's kind (moe, masked, conv), as ``layer_runs`` names kinds."""
    return spec.is_moe_layer(0), activations.layer_masks(spec, masked)[0], activations.layer_operators(spec)[0]
