"""Run Hugging Face Trainer's training step on a built model, telling the tracker where the step is.

What the step does, as ``transformers.Trainer`` (v5) with accelerate's native AMP does it:
- the optimizer is built from two parameter groups, decay and no-decay (``Trainer.get_decay_parameter_names``), and
  with bitsandbytes 8-bit optimizers every nn.Embedding is overridden to 32-bit states (``Trainer.create_optimizer``);
- forward runs under ``torch.autocast`` (Trainer ``bf16=True``/``fp16=True``; none for fp32) and accelerate's
  ``convert_outputs_to_fp32`` copies the 16-bit logits of the output to fp32; the outputs are dropped before backward;
- ``loss / grad_accum`` is backpropagated once per micro-batch; then ``optimizer.step()`` and
  ``optimizer.zero_grad(set_to_none=True)``. At least two steps run: optimizer state appears in the first.
Sequences are unpadded (no attention mask), so SDPA may take its flash kernel.
Under data parallelism (``tracing/distributed.py``) the forward goes through the wrapper (DDP) and the micro-batches
before the last run in accelerate's ``no_sync`` (``Accelerator.accumulate``): ``forward_module`` and
``accumulation`` say how; by default the model itself runs and every micro-batch synchronises.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..model import ModelSpec
from ..options import Loss, Optimizer, Phase, Precision, Term
from ..training_setup import ResolvedSetup
from .build import half_dtype
from .losses import PassThroughHead, chunked_cross_entropy, fused_cross_entropy
from .tracker import AllocationTracker

LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.0  # Trainer default; the decay/no-decay split exists regardless
_NO_DECAY_PATTERNS = ("bias", "layernorm", "rmsnorm", "norm.", "_norm")


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = base_model(model).base_model  # the attribute named by base_model_prefix: model, gpt_neox, transformer
    return inner.layers if hasattr(inner, "layers") else inner.h  # FalconModel.h


def make_optimizer(model: nn.Module, optimizer: Optimizer, paged_context=None) -> torch.optim.Optimizer:
    """The optimizer Trainer builds for ``optim=...`` (names in comments), over the trainable parameters."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    no_decay = [p for name, p in named if any(pattern in name.lower() for pattern in _NO_DECAY_PATTERNS)]
    no_decay_ids = {id(p) for p in no_decay}
    decay = [p for _, p in named if id(p) not in no_decay_ids]
    groups = [g for g in ({"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
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
    from .bnb_optim import make_bnb_optimizer

    return make_bnb_optimizer(model, groups, optimizer, LEARNING_RATE, paged_context=paged_context)


def _synchronised(last_micro_batch: bool):
    return contextlib.nullcontext()


class TrainerLoss:
    """The loss of one micro-batch as Trainer computes it, for the trace and the calibration harness alike.

    ``hf``: the model's own ForCausalLMLoss (labels = inputs), then accelerate's ``convert_outputs_to_fp32`` copy of
    the 16-bit logits while ``outputs`` lives. ``chunked`` / ``fused``: lm_head is bypassed (losses.PassThroughHead)
    and the loss is computed from the final hidden states with lm_head's weight; prompt tuning's virtual tokens get
    label -100. ``on_logits`` is called when the loss starts on the hidden states (the trace's logits region).
    """

    def __init__(self, model: nn.Module, setup):
        self.setup = setup
        inner = base_model(model)
        self.head = inner.get_output_embeddings()
        self.softcap = getattr(inner.config, "final_logit_softcapping", None)
        if setup.loss is not Loss.HF:
            inner.set_output_embeddings(PassThroughHead(self.head))
            inner.config.final_logit_softcapping = None

    def __call__(self, forward_module: nn.Module, input_ids: torch.Tensor, on_logits=None):
        """``forward_module``: the model, or the wrapper whose forward runs it (DDP)."""
        if self.setup.loss is Loss.HF:
            outputs = forward_module(input_ids=input_ids, labels=input_ids)
            loss = outputs.loss
            if self.setup.precision is not Precision.FP32:
                outputs.logits.float()  # accelerate's fp32 copy, dropped with outputs
            del outputs
            return loss
        hidden = forward_module(input_ids=input_ids).logits  # PassThroughHead returned the hidden states
        labels = input_ids
        extra = hidden.shape[1] - labels.shape[1]
        if extra:
            pad = torch.full((labels.shape[0], extra), -100, dtype=labels.dtype, device=labels.device)
            labels = torch.cat([pad, labels], dim=1)
        if on_logits is not None:
            on_logits()
        loss_fn = chunked_cross_entropy if self.setup.loss is Loss.CHUNKED else fused_cross_entropy
        return loss_fn(hidden, self.head.weight, labels, softcap=self.softcap)


class StepTracer:
    """Runs the training steps of one setup under a tracker, and hooks the model to report phases."""

    def __init__(self, model: nn.Module, spec: ModelSpec, resolved: ResolvedSetup, tracker: AllocationTracker):
        self.model = model
        self.spec = spec
        self.resolved = resolved
        self.setup = resolved.setup
        self.tracker = tracker
        self.optimizer = make_optimizer(model, self.setup.optimizer, paged_context=tracker.paged)
        self.forward_module: nn.Module = model  # a DDP wrapper's forward under data parallelism
        self.accumulation = _synchronised  # (is the last micro-batch) -> context of one micro-batch
        self._hooks = []
        self._install_loss()
        self._install_phase_hooks()

    # -- loss --------------------------------------------------------------------------------------
    def _install_loss(self) -> None:
        self.loss = TrainerLoss(self.model, self.setup)
        self.head = self.loss.head

    def _loss(self, input_ids: torch.Tensor):
        def logits_begin():
            self.tracker.in_logits = True

        return self.loss(self.forward_module, input_ids, on_logits=logits_begin)

    # -- phase hooks -------------------------------------------------------------------------------
    def _install_phase_hooks(self) -> None:
        tracker = self.tracker
        layers = decoder_layers(self.model)

        def head_pre_hook(module, args):
            if tracker.phase is Phase.FORWARD:
                tracker.in_logits = True

        def last_layer_hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if tracker.phase is Phase.FORWARD and hidden.requires_grad:
                hidden.register_hook(self._on_layers_backward_start)

        def first_layer_pre_hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            if tracker.phase is Phase.FORWARD and hidden is not None and hidden.requires_grad:
                hidden.register_hook(self._on_layers_backward_end)

        self._hooks.append(self.head.register_forward_pre_hook(head_pre_hook))
        self._hooks.append(layers[-1].register_forward_hook(last_layer_hook))
        self._hooks.append(layers[0].register_forward_pre_hook(first_layer_pre_hook, with_kwargs=True))
        for layer in layers:
            if getattr(layer, "_gradient_checkpointing_func", None) is not None:
                self._hooks.append(_RecomputeMarker(layer, tracker))
        for param in self.model.parameters():
            if param.requires_grad:
                self._hooks.append(param.register_post_accumulate_grad_hook(self._on_grad))

    def count_layers(self, tick) -> None:
        """Call ``tick()`` as each decoder layer runs forward, and as the gradient of its output arrives in
        backward: the progress of a long trace (2 L ticks per micro-batch). A forward hook and a tensor hook only:
        nothing is allocated, so the trace is unchanged; a checkpointed layer's recompute is not counted."""
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

        for layer in decoder_layers(self.model):
            self._hooks.append(layer.register_forward_hook(forward_tick))

    def _on_layers_backward_start(self, grad):
        self.tracker.in_logits = False
        self.tracker.phase = Phase.BACKWARD

    def _on_layers_backward_end(self, grad):
        self.tracker.phase = Phase.BACKWARD_END

    def _on_grad(self, param):
        self.tracker.retag(param.grad, Term.GRADIENTS)

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()

    # -- the step ----------------------------------------------------------------------------------
    def autocast(self):
        precision = self.setup.precision
        if precision is Precision.FP32:
            return contextlib.nullcontext()
        dtype = half_dtype(precision)
        return torch.autocast(device_type="cpu", dtype=dtype)

    def run(self, steps: int = 2, progress=None) -> None:
        """``steps`` training steps; ``progress(note)`` is called after each optimizer step."""
        tracker = self.tracker
        setup = self.setup
        input_ids = torch.zeros(setup.batch_size, setup.seq_len, dtype=torch.long)
        for step in range(steps):
            tracker.step = step
            for micro in range(setup.grad_accum):
                with self.accumulation(micro == setup.grad_accum - 1):
                    tracker.phase = Phase.FORWARD
                    with self.autocast():
                        loss = self._loss(input_ids)
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
            self.optimizer.zero_grad(set_to_none=True)
            if progress:
                progress(f"step {step + 2} of {steps}" if step + 1 < steps else "done")


class _RecomputeMarker:
    """Marks the tracker while a checkpointed layer recomputes its forward in backward.

    transformers v5 checkpoints a layer's ``forward`` (``modeling_layers.GradientCheckpointingLayer``), so module hooks
    do not run again in the recompute; the function given to the checkpoint does. This wraps the layer's
    ``_gradient_checkpointing_func`` so that function flags the recompute, also when torch's non-reentrant checkpoint
    stops it early; ``remove()`` puts the original back.
    """

    def __init__(self, layer: nn.Module, tracker: AllocationTracker):
        self.layer = layer
        self.original = layer._gradient_checkpointing_func

        def checkpoint(function, *args, **kwargs):
            def marked(*inner_args, **inner_kwargs):
                recomputing = tracker.phase is not Phase.FORWARD
                tracker.in_recompute = recomputing
                try:
                    return function(*inner_args, **inner_kwargs)
                finally:
                    if recomputing:
                        tracker.in_recompute = False

            return self.original(marked, *args, **kwargs)

        layer._gradient_checkpointing_func = checkpoint

    def remove(self) -> None:
        self.layer._gradient_checkpointing_func = self.original
