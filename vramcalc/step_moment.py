"""One moment of a training step (the estimator's unit) and the decoder-layer setup its saved tensors depend on:
the two things both the single-GPU estimator and the per-GPU device_map model build on."""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import NamedTuple

from .options import GradCkpt, Phase
from .terms import activations, expert_parallel, moe_lora, stack_layers
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
    # reserved holds beyond the tensors were this moment the peak (set last, ``estimator._with_reserved``)
    stranded: int = 0

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
    if getattr(setup, "cp", 1) > 1:  # --cp: the ring's merged output keeps q's [b, a, s, d] layout (terms/context_parallel)
        layers = replace(layers, query_head_major=True)
    if activations.checkpoint_mode(setup.grad_ckpt) is GradCkpt.WRAPPER and layers.dynamic_cache:
        # torch's checkpoint_wrapper around transformers' layers: transformers' gradient_checkpointing_enable, and
        # with it enable_input_require_grads, never runs (activations.first_layer_recomputes_gradless); a stack's own
        # decoder checkpoints as it always does
        layers = replace(layers, checkpoint_inputs_need_grad=False)
    return _layer_setup(setup.method, setup.precision, setup.adapter_dtype, resolved.attn_used,
                        moe_lora.linear_targets(family, resolved.lora_modules), setup.lora_rank, setup.lora_dropout, setup.kernels, setup.compile, setup.activation_offload,
                        layers, expert_parallel.slot_share(resolved), getattr(setup, "ep", 1) > 1,
                        tuple(name for name, _ in moe_lora.target_parameters(family, resolved.lora_modules)),
                        setup.modules_to_save, getattr(setup, "repeat_kv", False), resolved.base_4bit)


@functools.lru_cache(maxsize=4096)
def _layer_setup(method, precision, adapter_dtype, attn_used, lora_modules, lora_rank, lora_dropout, kernels,
                 compiled, offload, layers=stack_layers.HF, ep=1, ep_dispatch=False, lora_experts=(),
                 modules_to_save=(), repeat_kv=False, base_4bit=False):
    lora = method.uses_lora or method.peft_facts is not None  # a peft method's targets ride on the LoRA fields
    return activations.LayerSetup(method, activations.dtypes(method, precision, adapter_dtype), attn_used,
                                  lora_modules if lora else (), lora_rank if lora else 0, lora_dropout if lora else 0.0,
                                  kernels, compiled, offload, layers, ep, lora_experts if lora else (), ep_dispatch,
                                  modules_to_save, repeat_kv, base_4bit)
