"""Run Hugging Face Trainer's training step on a built model, telling the tracker where the step is.

What the step does, as ``transformers.Trainer`` (v5) with accelerate's native AMP does it:
- the optimizer is built from two parameter groups, decay and no-decay (``Trainer.get_decay_parameter_names``), and
  with bitsandbytes 8-bit optimizers every nn.Embedding is overridden to 32-bit states (``Trainer.create_optimizer``);
- forward runs under ``torch.autocast`` (Trainer ``bf16=True``/``fp16=True``; none for fp32) and accelerate's
  ``convert_outputs_to_fp32`` copies the 16-bit logits of the output to fp32; the outputs are dropped before backward;
- ``loss / grad_accum`` is backpropagated once per micro-batch; then ``optimizer.step()`` and
  ``optimizer.zero_grad(set_to_none=True)``. At least two steps run: optimizer state appears in the first.
Sequences are unpadded (no attention mask), so SDPA may take its flash kernel.
The activation knobs (``--grad-ckpt selective``, ``--compile``, ``--activation-offload``, ``--packing``) are applied
to the built model with the real torch code (``_install_knobs``, ``_packed_batch``).
Under data parallelism (``tracing/distributed.py``) the forward goes through the wrapper (DDP) and the micro-batches
before the last run in accelerate's ``no_sync`` (``Accelerator.accumulate``): ``forward_module`` and
``accumulation`` say how; by default the model itself runs and every micro-batch synchronises.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from ..model import ModelSpec
from ..errors import VramcalcError
from ..options import Attention, GptqKernel, GradCkpt, Kernels, Loss, Method, Optimizer, Phase, Term
from ..terms.activations import runs_with_cache
from ..training_setup import ResolvedSetup
from .build import base_model, decoder_layers, half_dtype  # noqa: F401 (re-exported)
from .losses import (Fp32LogitsHead, PassThroughHead, chunked_cross_entropy, fused_cross_entropy,
                     model_dtype_causal_lm_loss, shifted_causal_lm_loss, unsloth_2024_causal_lm_loss)
from .tracker import AllocationTracker

LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.0  # Trainer default; the decay/no-decay split exists regardless
_NO_DECAY_PATTERNS = ("bias", "layernorm", "rmsnorm", "norm.", "_norm")


def make_optimizer(model: nn.Module, optimizer: Optimizer, paged_context=None, tracker=None) -> torch.optim.Optimizer:
    """The optimizer Trainer builds for ``optim=...`` (names in comments), over the trainable parameters."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    no_decay = [p for name, p in named if any(pattern in name.lower() for pattern in _NO_DECAY_PATTERNS)]
    no_decay_ids = {id(p) for p in no_decay}
    decay = [p for _, p in named if id(p) not in no_decay_ids]
    groups = [g for g in ({"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if any(type(p).__name__ == "DTensor" for _, p in named):  # --tp: no group mixes DTensor and plain tensors
        from .tensor_parallel import split_dtensor_groups

        groups = split_dtensor_groups(groups)
    if optimizer is Optimizer.ADAMW:  # adamw_torch_fused
        return torch.optim.AdamW(groups, lr=LEARNING_RATE, fused=True)
    if optimizer is Optimizer.ADAMW_FOREACH:  # adamw_torch
        return torch.optim.AdamW(groups, lr=LEARNING_RATE, foreach=True)
    if optimizer is Optimizer.SGD:  # sgd
        return torch.optim.SGD(groups, lr=LEARNING_RATE, foreach=True)
    if optimizer is Optimizer.SGD_MOMENTUM:
        return torch.optim.SGD(groups, lr=LEARNING_RATE, momentum=0.9, foreach=True)
    if optimizer is Optimizer.ADAFACTOR:  # adafactor
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=LEARNING_RATE, scale_parameter=False, relative_step=False, warmup_init=False)
    if optimizer.is_torchao:  # adamw_torch_8bit / adamw_torch_4bit (block_size=256); AdamWFp8 passed in by hand
        from .torchao_optim import make_torchao_optimizer

        return make_torchao_optimizer(groups, optimizer, tracker, lr=LEARNING_RATE, trainer_built=True)
    from .bnb_optim import make_bnb_optimizer

    return make_bnb_optimizer(model, groups, optimizer, LEARNING_RATE, paged_context=paged_context)


def _synchronised(last_micro_batch: bool):
    return contextlib.nullcontext()


class TrainerLoss:
    """The loss of one micro-batch as Trainer computes it, for the trace and the calibration harness alike.

    ``hf``: the model's own ForCausalLMLoss (labels = inputs), then accelerate's ``convert_outputs_to_fp32`` copy of
    the 16-bit logits while ``outputs`` lives. ``hf-loop``: the same, but ``outputs`` (its logits fp32 under mixed
    precision, and without checkpointing its ``past_key_values``: ``activations.runs_with_cache``) is kept in ``held`` until the
    next micro-batch's model call returns, as a custom loop keeps it. ``chunked`` / ``fused``: lm_head is bypassed
    (losses.PassThroughHead) and the loss is computed from the final hidden states with lm_head's weight; prompt
    tuning's virtual tokens get label -100. ``on_logits`` is called when the loss starts on the hidden states (the trace's logits region).
    """

    def __init__(self, model: nn.Module, setup):
        self.setup = setup
        self.held = None  # ``hf-loop``: the last micro-batch's ``outputs``, which the loop keeps
        inner = base_model(model)
        self.head = inner.get_output_embeddings()
        self.softcap = getattr(inner.config, "final_logit_softcapping", None)
        if not setup.loss.in_model:
            inner.set_output_embeddings(PassThroughHead(self.head))
            inner.config.final_logit_softcapping = None
        if setup.loss is Loss.HF_SHIFTED:  # transformers 4.46-4.49's loss function (losses.shifted_causal_lm_loss)
            inner.loss_function = shifted_causal_lm_loss
        if setup.loss is Loss.HF_FP32_LOGITS:  # transformers 4.31-4.45: the model's fp32 logits, shifted
            inner.set_output_embeddings(Fp32LogitsHead(self.head, self.softcap))
            inner.config.final_logit_softcapping = None  # applied by the head, before its cast
            inner.loss_function = shifted_causal_lm_loss  # whose ``.float()`` of fp32 logits is the tensor itself
        if setup.loss is Loss.MODEL_DTYPE:  # no fp32 upcast (losses.model_dtype_causal_lm_loss)
            inner.loss_function = model_dtype_causal_lm_loss
        if setup.loss is Loss.UNSLOTH_2024:  # Unsloth <= 2024.11.7 (losses.unsloth_2024_causal_lm_loss)
            inner.loss_function = unsloth_2024_causal_lm_loss
            inner.config.final_logit_softcapping = None  # its kernels apply the cap to each row in registers

    # whether the model runs with transformers' DynamicCache, as the estimate decides it (a class attribute, so a
    # check can run the same loop with the cache off)
    runs_with_cache = staticmethod(runs_with_cache)

    def __call__(self, forward_module: nn.Module, input_ids: torch.Tensor, on_logits=None, position_ids=None):
        """``forward_module``: the model, or the wrapper whose forward runs it (DDP). ``position_ids``: a packed
        row's positions (``--packing``), None otherwise."""
        extra_inputs = {} if position_ids is None else {"position_ids": position_ids}
        if self.runs_with_cache(self.setup):  # a custom loop's call, with the config's use_cache (build.hf_config
            extra_inputs["use_cache"] = True  # turns it off for every other step)
        if self.setup.loss.in_model:
            outputs = forward_module(input_ids=input_ids, labels=input_ids, **extra_inputs)
            loss = outputs.loss
            if self.setup.loss is Loss.HF_LOOP or getattr(self.setup, "loop_keeps_outputs", False):
                # a custom loop's ``outputs``, rebound only once the call returned
                if self.setup.precision.autocast:  # accelerate's wrapped forward returns fp32 logits
                    outputs.logits = outputs.logits.float()
                self.held = outputs
            elif self.setup.precision.autocast:
                copies = [outputs.logits.float()]  # accelerate's fp32 copy, dropped with outputs
                cache = getattr(outputs, "cache", None)  # transformers 5.25's field (past_key_values before)
                if getattr(self.setup, "trainer_use_cache", False) and cache is not None:
                    # --trainer-use-cache: convert_to_fp32 copies the returned tuple cache's tensors too, all
                    # before the converted output replaces the original (accelerate utils/operations.py)
                    copies += [t.float() for entry in cache.layers for t in (entry.keys, entry.values)]
                del copies
            del outputs
            return loss
        hidden = forward_module(input_ids=input_ids, **extra_inputs).logits  # PassThroughHead: the hidden states
        labels = input_ids
        extra = hidden.shape[1] - labels.shape[1]
        if extra:
            pad = torch.full((labels.shape[0], extra), -100, dtype=labels.dtype, device=labels.device)
            labels = torch.cat([pad, labels], dim=1)
        if on_logits is not None:
            on_logits()
        loss_fn = chunked_cross_entropy if self.setup.loss is Loss.CHUNKED else fused_cross_entropy
        return loss_fn(hidden, self.head.weight, labels, softcap=self.softcap)


class PhaseHooks:
    """Module and tensor hooks that tell the tracker where a step is.

    - forward: ``in_logits`` from the output head's first call to the end of forward;
    - backward-start -> backward: when the gradient of the last block's output arrives (the head and loss are done);
    - backward -> backward-end: when the gradient of the first block's input arrives (only if it requires grad);
    - a parameter's ``.grad`` is a gradient from its post-accumulate-grad hook on.
    Hooks allocate nothing, so the trace is unchanged by them.
    """

    def __init__(self, tracker: AllocationTracker, blocks, heads, params, tick=None):
        self.tracker = tracker
        self.handles = []
        self.blocks = blocks = list(blocks)

        def head_pre_hook(module, args):
            if tracker.phase is Phase.FORWARD:
                tracker.in_logits = True

        def last_block_hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if tracker.phase is Phase.FORWARD and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(self._backward_start)

        def first_block_pre_hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
            if tracker.phase is Phase.FORWARD and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(self._backward_end)

        for head in heads:
            self.handles.append(head.register_forward_pre_hook(head_pre_hook))
        self.handles.append(blocks[-1].register_forward_hook(last_block_hook))
        self.handles.append(blocks[0].register_forward_pre_hook(first_block_pre_hook, with_kwargs=True))
        for param in params:
            if param.requires_grad:
                self.handles.append(param.register_post_accumulate_grad_hook(self._on_grad))
        if tick is not None:
            self.count_blocks(tick)

    def count_blocks(self, tick) -> None:
        """Call ``tick()`` as each block runs forward, and as the gradient of its output arrives in backward: the
        progress of a long trace (2 ticks per block and micro-batch; a checkpointed block's recompute is not
        counted). Hooks only: nothing is allocated."""
        tracker = self.tracker

        def backward_tick(grad):
            tick()

        def forward_tick(module, args, output):
            if tracker.phase is not Phase.FORWARD:
                return
            tick()
            hidden = output[0] if isinstance(output, tuple) else output
            if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(backward_tick)

        for block in self.blocks:
            self.handles.append(block.register_forward_hook(forward_tick))

    def _backward_start(self, grad):
        self.tracker.in_logits = False
        self.tracker.phase = Phase.BACKWARD

    def _backward_end(self, grad):
        self.tracker.phase = Phase.BACKWARD_END

    def _on_grad(self, param):
        if param.grad is not None:
            self.tracker.retag(param.grad, Term.GRADIENTS)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class StepTracer:
    """Runs the training steps of one setup under a tracker, and hooks the model to report phases."""

    def __init__(self, model: nn.Module, spec: ModelSpec, resolved: ResolvedSetup, tracker: AllocationTracker):
        self.model = model
        self.spec = spec
        self.resolved = resolved
        self.setup = resolved.setup
        self.tracker = tracker
        self.optimizer = make_optimizer(model, self.setup.optimizer, paged_context=tracker.paged, tracker=tracker)
        self.forward_module: nn.Module = model  # a DDP wrapper's forward under data parallelism
        self.accumulation = _synchronised  # (is the last micro-batch) -> context of one micro-batch
        self._hooks = []
        self._install_loss()
        self._install_knobs()
        self._install_phase_hooks()
        if getattr(self.setup, "compile", False) and checkpoint_mode(self.setup):
            self._compile_layers()  # outermost: the checkpoint (and its recompute marker) runs the compiled forward

    # -- loss --------------------------------------------------------------------------------------
    def _install_loss(self) -> None:
        self.loss = TrainerLoss(self.model, self.setup)
        self.head = self.loss.head
        compiled = getattr(self.setup, "compile", False) and getattr(self.setup, "compile_loss", True)
        if compiled and self.setup.loss.in_model:
            from .compiled import compile_loss

            compile_loss(base_model(self.model))  # torch.compile of the forward covers the model's loss too

    def _loss(self, input_ids: torch.Tensor, position_ids=None):
        def logits_begin():
            self.tracker.in_logits = True

        return self.loss(self.forward_module, input_ids, on_logits=logits_begin, position_ids=position_ids)

    # -- activation knobs --------------------------------------------------------------------------
    def _compile_layers(self) -> None:
        from .compiled import compile_layer

        graphs: dict = {}  # one graph per kind of layer (compiled.compile_layer)
        for layer in decoder_layers(self.model):
            compile_layer(layer, graphs)

    def _install_knobs(self) -> None:
        """Selective checkpointing, torch.compile and activation offloading on each decoder layer (issue 11).

        - ``--grad-ckpt selective``: each layer's checkpoint function gets ``context_fn`` =
          ``create_selective_checkpoint_contexts(selective_policy)`` (torch ``utils/checkpoint.py``), the same
          non-reentrant checkpoint transformers applies for full checkpointing (``build.py``), so the matmul outputs
          are cached in forward and the rest recomputed; ``--grad-ckpt selective-op``: torchtitan's policy
          (``selective_op_contexts``) in the same place.
        - ``--compile``: each layer's forward goes through AOTAutograd with the min-cut partitioner
          (``compiled.compile_layer``), as torchtune and torchtitan compile layer by layer.
        - ``--activation-offload``: tensors autograd saves move to host memory (``HostOffload``, save_on_cpu's
          semantics): under checkpointing around the checkpoint call, as transformers'
          ``activation_checkpointing_enable(offload=True)`` does (the checkpointed inputs go to the host); without it
          around each decoder layer's forward (torchtune ``OffloadActivations`` without its stream window).
        """
        setup = self.setup
        check_traceable_knobs(setup)
        check_wrapper_cache(self.resolved)
        layers = decoder_layers(self.model)
        ckpt = checkpoint_mode(setup)
        if ckpt.caches_ops:
            from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

            context_fn = (functools.partial(create_selective_checkpoint_contexts, selective_policy)
                          if ckpt is GradCkpt.SELECTIVE else selective_op_contexts)
            for layer in layers:
                if getattr(layer, "_gradient_checkpointing_func", None) is not None:
                    layer._gradient_checkpointing_func = functools.partial(
                        checkpoint, use_reentrant=False, context_fn=context_fn)
        if getattr(setup, "compile", False) and not ckpt:
            self._compile_layers()
        if getattr(setup, "activation_offload", False):
            for layer in layers:
                if ckpt and getattr(layer, "_gradient_checkpointing_func", None) is not None:
                    layer._gradient_checkpointing_func = _offloaded(layer._gradient_checkpointing_func, self.tracker)
                else:
                    self._hooks.append(_OffloadedForward(layer, self.tracker))

    # -- phase hooks -------------------------------------------------------------------------------
    def _install_phase_hooks(self) -> None:
        layers = decoder_layers(self.model)
        self.phases = PhaseHooks(self.tracker, layers, [self.head], self.model.parameters())
        self._hooks.extend(self.phases.handles)
        for layer in layers:
            if getattr(layer, "_gradient_checkpointing_func", None) is not None:
                self._hooks.append(_RecomputeMarker(layer, self.tracker))
            elif getattr(layer, "checkpoint_fn", None) is not None:  # torch's checkpoint_wrapper (--grad-ckpt wrapper)
                self._hooks.append(WrapperRecomputeMarker(layer, self.tracker))

    def count_layers(self, tick) -> None:
        """``tick()`` as each decoder layer runs forward and as its output's gradient arrives (``PhaseHooks``)."""
        start = len(self.phases.handles)
        self.phases.count_blocks(tick)
        self._hooks.extend(self.phases.handles[start:])

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()

    # -- the step ----------------------------------------------------------------------------------
    def autocast(self):
        precision = self.setup.precision
        if not precision.autocast:  # fp32, bf16-true
            return contextlib.nullcontext()
        dtype = half_dtype(precision)
        return torch.autocast(device_type="cpu", dtype=dtype)

    def run(self, steps: int = 2, progress=None) -> None:
        """``steps`` training steps; ``progress(note)`` is called after each optimizer step."""
        attn_used = self.resolved.attn_used
        with _packed_batch(self.setup, attn_used) as position_ids, repeated_kv(self.setup, attn_used):
            self._run(steps, progress, position_ids)

    def _run(self, steps: int, progress, position_ids) -> None:
        tracker = self.tracker
        setup = self.setup
        if position_ids is None:
            input_ids = torch.zeros(setup.batch_size, setup.seq_len, dtype=torch.long)
        else:  # one packed row of batch_size sequences
            input_ids = torch.zeros(1, setup.batch_size * setup.seq_len, dtype=torch.long)
        self._steps(steps, progress, input_ids, position_ids)

    def _steps(self, steps: int, progress, input_ids, position_ids=None) -> None:
        """``steps`` optimizer steps of ``input_ids`` (``step``)."""
        for step in range(steps):
            self.step(step, input_ids, position_ids)
            if progress:
                progress(f"step {step + 2} of {steps}" if step + 1 < steps else "done")

    def step(self, step: int, input_ids, position_ids=None) -> None:
        """One optimizer step of ``grad_accum`` micro-batches of ``input_ids``, the tracker told each phase (a caller
        may give each step its own batch shape: docs/evidence/varying_length_reserved/varlen_trace.py)."""
        tracker = self.tracker
        setup = self.setup
        tracker.step = step
        for micro in range(setup.grad_accum):
            with self.accumulation(micro == setup.grad_accum - 1):
                tracker.phase = Phase.FORWARD
                tracker.after_previous = getattr(self.loss, "held", None) is not None  # hf-loop's outputs
                with self.autocast():
                    loss = self._loss(input_ids, position_ids)
                tracker.after_previous = False
                tracker.in_logits = False
                tracker.end_forward()
                tracker.phase = Phase.BACKWARD_START
                tracker.in_logits = True
                (loss / setup.grad_accum).backward()
                del loss
            tracker.in_logits = False
            tracker.mark_gradients(self.model.parameters())
        tracker.phase = Phase.OPTIMIZER_STEP
        tracker.in_optimizer = True
        self.optimizer.step()
        tracker.in_optimizer = False
        tracker.mark_optimizer_states(self.optimizer)
        # --grads-kept: torch < 2.0's default zeroes the gradients in place (Trainer ``model.zero_grad()``)
        self.optimizer.zero_grad(set_to_none=not getattr(setup, "grads_kept", False))


def flagging_recompute(function, tracker: AllocationTracker):
    """``function``, flagging the tracker's ``in_recompute`` while it runs outside forward (a checkpoint's
    recompute in backward), and clearing it also when torch's non-reentrant checkpoint stops it early."""

    def marked(*args, **kwargs):
        recomputing = tracker.phase is not Phase.FORWARD
        tracker.in_recompute = recomputing
        try:
            return function(*args, **kwargs)
        finally:
            if recomputing:
                tracker.in_recompute = False

    return marked


class _RecomputeMarker:
    """Marks the tracker while a checkpointed layer recomputes its forward in backward.

    transformers v5 checkpoints a layer's ``forward`` (``modeling_layers.GradientCheckpointingLayer``), so module hooks
    do not run again in the recompute; the function given to the checkpoint does. This wraps the layer's
    ``_gradient_checkpointing_func`` so that function flags the recompute, also when torch's non-reentrant checkpoint
    stops it early; ``remove()`` puts the original back.
    """

    def __init__(self, layer: nn.Module, tracker: AllocationTracker):
        self.layer = layer
        self.original = original = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda function, *args, **kwargs: original(
            flagging_recompute(function, tracker), *args, **kwargs)

    def remove(self) -> None:
        self.layer._gradient_checkpointing_func = self.original


class WrapperRecomputeMarker:
    """``_RecomputeMarker`` for a block inside torch's ``CheckpointWrapper``
    (``torch/distributed/algorithms/_checkpoint/checkpoint_wrapper.py``: ``forward`` calls
    ``self.checkpoint_fn(self._checkpoint_wrapped_module, ...)``): ``--grad-ckpt wrapper``, and torchtune's and
    litgpt's own checkpointed blocks. ``remove()`` puts the original ``checkpoint_fn`` back."""

    def __init__(self, wrapper: nn.Module, tracker: AllocationTracker):
        self.wrapper = wrapper
        self.original = original = wrapper.checkpoint_fn
        wrapper.checkpoint_fn = lambda function, *args, **kwargs: original(
            flagging_recompute(function, tracker), *args, **kwargs)

    def remove(self) -> None:
        self.wrapper.checkpoint_fn = self.original


def check_traceable_knobs(setup) -> None:
    """The knobs the trace cannot run with the real code on a CPU: one error line each."""
    kernels = getattr(setup, "kernels", Kernels.NONE)
    if kernels is Kernels.LIGER:
        raise VramcalcError("--kernels liger is estimate only: Liger-Kernel's RMSNorm, SwiGLU and RoPE are Triton "
                            "kernels, which need a GPU; use vramcalc estimate")
    if kernels is Kernels.UNSLOTH:
        raise VramcalcError("--kernels unsloth is estimate only: Unsloth's RMSNorm, RoPE and LoRA kernels are "
                            "Triton kernels, which need a GPU; use vramcalc estimate")
    if getattr(setup, "quantize_experts", False):
        raise VramcalcError("--quantize-experts is estimate only: transformers 5 builds the experts as fused 3-D "
                            "parameters, and the per-expert nn.Linear layout of transformers 4.x is not installed "
                            "to trace; use vramcalc estimate")
    if getattr(setup, "gptq_kernel", None) is GptqKernel.TRITON_V2:
        raise VramcalcError("--gptq-kernel triton-v2 is estimate only: gptqmodel's dequantization is a Triton "
                            "kernel, which needs a GPU; use vramcalc estimate")
    if getattr(setup, "compile", False) and setup.method is Method.QLORA:
        raise VramcalcError("--compile with --method qlora is estimate only: AOTAutograd cannot functionalize "
                            "bitsandbytes' double-quantized dequantize (an in-place add_ on the absmax), which "
                            "torch.compile leaves to a graph break; use vramcalc estimate")


def check_wrapper_cache(resolved) -> None:
    """``--grad-ckpt wrapper`` with the model's KV cache and eager attention: transformers 5.25 passes the cache to
    the layers, whose recompute appends a second copy that eager attention's 4-D mask cannot take, so the real
    backward raises (``activations.cache_object_in_layers``); the estimate models the transformers <= 4.35 tuple
    cache that ran it. One error line instead of the traceback."""
    setup = resolved.setup
    if (checkpoint_mode(setup) is GradCkpt.WRAPPER and runs_with_cache(setup)
            and resolved.attn_used is Attention.EAGER):
        raise VramcalcError("--grad-ckpt wrapper with eager attention is estimate only: transformers 5.25 hands its "
                            "KV cache to the checkpointed layers, whose recompute appends a second copy that the 4-D "
                            "mask no longer fits, so its backward raises; the estimate models transformers <= 4.35's "
                            "tuple cache; use vramcalc estimate, or trace --attn sdpa")


def checkpoint_mode(setup) -> GradCkpt:
    """The setup's checkpointing as a ``GradCkpt`` (a plain bool in setups made before the selective option)."""
    return GradCkpt.parse(setup.grad_ckpt, "grad_ckpt")


def _selective_ops() -> frozenset:
    """The ops whose outputs selective checkpointing saves: every matmul and the attention kernels.

    torchtitan's op-level policy (``torchtitan/models/llama3/infra/parallelize.py::_save_list``, the "op" mode of
    ``apply_ac``) saves ``aten.mm`` and the SDPA flash/efficient kernels (and, for float8, ``aten.max``); Megatron's
    selective recompute keeps the same matmul outputs. ``--grad-ckpt selective`` saves every mm, not torchtitan's
    every other one (that is ``selective-op``: ``selective_op_contexts``), and counts the other matmul ops (``addmm``
    of a biased Linear, ``bmm``, bitsandbytes' ``gemm_4bit`` and LLM.int8 ``int8_scaled_mm``, the MoE
    ``_grouped_mm``) as matmuls too."""
    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default,
           aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_efficient_attention.default,
           aten._scaled_dot_product_cudnn_attention.default}
    grouped = getattr(aten, "_grouped_mm", None)
    if grouped is not None:
        ops.add(grouped.default)
    for name in ("gemm_4bit", "int8_scaled_mm", "int8_mixed_scaled_mm"):  # LLM.int8's matmul, with outliers or not
        try:
            ops.add(getattr(torch.ops.bitsandbytes, name).default)
        except (AttributeError, RuntimeError):
            pass
    return frozenset(ops)


def selective_policy(ctx, func, *args, **kwargs):
    """``create_selective_checkpoint_contexts`` policy: save matmul and attention outputs, recompute the rest."""
    from torch.utils.checkpoint import CheckpointPolicy

    if func in _SELECTIVE_OPS():
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_SELECTIVE_OPS = functools.lru_cache(maxsize=1)(_selective_ops)


def _op_sac_save_list() -> frozenset:
    """torchtitan's ``_op_sac_save_list`` (``torchtitan/distributed/activation_checkpoint.py``, and each model's
    ``parallelize.py``): ``aten.mm`` and the SDPA kernels (collectives and float8's ``aten.max`` are not ops a
    single-device HF step runs)."""
    aten = torch.ops.aten
    names = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math")
    return frozenset({aten.mm.default, *(getattr(aten, name).default for name in names if hasattr(aten, name))})


_OP_SAC_SAVE_LIST = functools.lru_cache(maxsize=1)(_op_sac_save_list)


def selective_op_contexts():
    """``--grad-ckpt selective-op``: torchtitan's op-level policy, one per checkpoint call (its
    ``selective_checkpointing_context_fn``: a fresh counter per layer). ``aten.mm`` calls are counted in call order,
    forward and recompute apart; the even ones are recomputed ("Saves output of all compute ops, except every second
    mm"), the other ops of the save list saved, the rest recomputed. torchtitan's forced recompute of the MoE router's
    mm (``per_op_sac_force_recompute_mm_shapes_by_fqns``, default ``moe.router.gate``) names a torchtitan module that
    transformers' models do not have, so their router's mm is counted like any other."""
    from collections import defaultdict

    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    counts: dict = defaultdict(int)

    def policy(ctx, func, *args, **kwargs):
        key = "recompute" if ctx.is_recompute else "forward"
        if func is torch.ops.aten.mm.default:
            counts[key] += 1
            if counts[key] % 2 == 0:
                return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if func in _OP_SAC_SAVE_LIST() else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """``torch.autograd.graph.save_on_cpu`` on a trace: each saved tensor is copied to a host tensor (``pack``:
    ``empty_like`` then ``copy_``, keeping the strides as torchtune's ``OffloadActivations`` does: compiled backward
    graphs expect them) and back to the device when backward unpacks it (``unpack``: a device copy that lives while
    its node runs). The host copies are counted by the tracker as host memory. Parameters (and views
    of them) are not copied: they are on the device anyway (torchtune ``OffloadActivations`` skips parameters and
    buffers; torch's save_on_cpu would copy them too)."""

    def __init__(self, tracker: AllocationTracker):
        def pack(tensor):
            if tracker.is_weight(tensor) or not tensor.is_floating_point() and tensor.numel() <= 1:
                return (False, tensor)
            with tracker.host():  # torchtune: torch.empty_like(activation, pin_memory=..., device="cpu")
                packed = torch.empty_like(tensor)
            packed.copy_(tensor)
            return (True, packed)

        def unpack(saved):
            moved, tensor = saved
            return tensor.clone() if moved else tensor

        super().__init__(pack, unpack)


def _offloaded(checkpoint_function, tracker: AllocationTracker):
    """transformers ``_activation_checkpointing_enable(offload=True)``: the checkpoint runs under save_on_cpu, so
    the layer inputs it keeps go to the host."""

    def offloaded(function, *args, **kwargs):
        with HostOffload(tracker):
            return checkpoint_function(function, *args, **kwargs)

    return offloaded


class _OffloadedForward:
    """A decoder layer's forward under ``HostOffload`` (activation offloading without checkpointing)."""

    def __init__(self, layer: nn.Module, tracker: AllocationTracker):
        self.layer = layer
        self.original = layer.forward
        original = self.original

        def forward(*args, **kwargs):
            with HostOffload(tracker):
                return original(*args, **kwargs)

        layer.forward = forward

    def remove(self) -> None:
        self.layer.forward = self.original


@contextlib.contextmanager
def repeated_kv(setup, attn_used: Attention):
    """``--repeat-kv``: transformers before 4.54 (PR #39412) always ran ``repeat_kv`` on k and v before SDPA; v5's
    ``sdpa_attention_forward`` does so only where ``use_gqa_in_sdpa`` says no (a mask, head dims over 256), so it is
    made to say no (FlashAttention-2, eager and the rest take their own paths). The calibration harness' real step
    runs under it too (``calibrate/training.py``)."""
    if not getattr(setup, "repeat_kv", False) or attn_used is not Attention.SDPA:
        yield
        return
    from transformers.integrations import sdpa_attention

    original = sdpa_attention.use_gqa_in_sdpa
    sdpa_attention.use_gqa_in_sdpa = lambda *args, **kwargs: False
    try:
        yield
    finally:
        sdpa_attention.use_gqa_in_sdpa = original


@contextlib.contextmanager
def _packed_batch(setup, attn_used: Attention):
    """``--packing``: the batch is one row of ``batch_size`` sequences of ``seq_len`` tokens with position ids that
    restart at each (transformers ``DataCollatorWithFlattening``). Yields the position ids (None without packing).

    What transformers v5 makes of it (``masking_utils.py``): with no 2-D mask and position ids given,
    ``find_packed_sequence_indices`` finds the sequences and, for sdpa and eager, ``create_causal_mask`` builds a
    block-diagonal [1, 1, T, T] mask (``packed_sequence_mask_function``). FlashAttention-2 takes the sequences' bounds
    from the position ids instead (``modeling_flash_attention_utils.py::prepare_fa_kwargs_from_position_ids``,
    ``flash_attn_varlen_func``) and no mask is built, a sliding window included (the kernel's ``window_size``): the
    trace runs flash as SDPA's flash kernel without a mask, which saves the same tensors."""
    if not getattr(setup, "packing", False):
        yield None
        return
    from transformers import masking_utils

    b, s = setup.batch_size, setup.seq_len
    position_ids = torch.arange(s, dtype=torch.long).repeat(b).unsqueeze(0)
    # transformers cannot read fake ids: answer what find_packed_sequence_indices finds on real ones
    sequence_index = torch.arange(b, dtype=torch.long).repeat_interleave(s).unsqueeze(0)
    original_find = masking_utils.find_packed_sequence_indices
    original_preprocess = masking_utils._preprocess_mask_arguments
    flash = attn_used is Attention.FLASH

    def find_packed(ids):
        return sequence_index if b > 1 else None

    def preprocess(*args, **kwargs):
        out = original_preprocess(*args, **kwargs)
        return (True, None, None, *out[3:]) if flash else out

    masking_utils.find_packed_sequence_indices = find_packed
    masking_utils._preprocess_mask_arguments = preprocess
    try:
        yield position_ids
    finally:
        masking_utils.find_packed_sequence_indices = original_find
        masking_utils._preprocess_mask_arguments = original_preprocess
