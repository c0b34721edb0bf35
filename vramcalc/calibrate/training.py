"""The training step the harness measures: the trace's model, on a real device, with real weights and real kernels.

- The model is ``tracing/build.py::build_model`` (transformers from config, peft LoRA or prompt tuning, the setup's
  attention, checkpointing and dtypes) materialised on the device, then initialised (``initialise_weights``: normal
  std 0.02, norms 1, biases 0, RoPE frequencies recomputed) so that routing and losses are those of a real model.
- QLoRA: every 4-bit layer gets a real bitsandbytes ``Params4bit``, quantized from random 16-bit weights by
  bitsandbytes' own ``quantize_4bit`` on the device (``quantize_4bit_weights``), where the trace uses a stand-in.
- The step (``TrainingStep``) is Trainer's, as ``tracing/step.py::StepTracer.run`` runs it, with the same loss
  (``tracing/step.py::TrainerLoss``): the optimizer from
  ``make_optimizer`` (decay/no-decay groups, bitsandbytes overrides; paged optimizers take real unified memory on
  CUDA), forward under ``torch.autocast`` on the device (none for fp32), accelerate's fp32 copy of the logits, the
  setup's loss, ``loss / grad_accum`` backward per micro-batch, ``optimizer.step()``, ``zero_grad(set_to_none=True)``
  (in place with ``grads_kept``).
  mixed-fp16 adds Trainer's GradScaler. Tokens are random ids (MoE routing spreads as on real text).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..model import ModelSpec
from ..options import Method, Precision
from ..training_setup import ResolvedSetup

INIT_STD = 0.02  # transformers' default initializer_range
DATA_SEED = 0
from ..facts import BNB_BLOCKSIZE as QLORA_BLOCKSIZE  # bitsandbytes quantize_4bit default


def build_on_device(spec: ModelSpec, resolved: ResolvedSetup, device: torch.device) -> nn.Module:
    """The setup's model on ``device``, initialised, with real 4-bit weights for QLoRA."""
    from ..tracing.build import build_model

    model = build_model(spec, resolved, None, device=str(device))
    initialise_weights(model)
    if resolved.setup.method is Method.QLORA:
        quantize_4bit_weights(model, resolved, device)
    return model


@torch.no_grad()
def initialise_weights(model: nn.Module, std: float = INIT_STD) -> None:
    """What ``PreTrainedModel._init_weights`` does, for any module: norms 1, 1-D parameters (biases) 0, the rest
    normal(0, std); rotary embeddings get their inverse frequencies back. ``to_empty`` left garbage in all of them."""
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for name, param in module.named_parameters(recurse=False):
            if not param.is_floating_point() or param.device.type == "meta":
                continue
            if is_norm and name == "weight":
                param.fill_(1.0)
            elif param.ndim == 1:
                param.zero_()
            else:
                param.normal_(0.0, std)
        if hasattr(module, "inv_freq") and hasattr(module, "config"):
            _reset_rotary(module)


def _reset_rotary(module: nn.Module) -> None:
    """Recompute RoPE inverse frequencies with the module's own function (transformers v5 rotary embeddings)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = getattr(module, "rope_type", "default")
    function = getattr(module, "rope_init_fn", None)
    if function is None:
        function = module.compute_default_rope_parameters if rope_type == "default" else ROPE_INIT_FUNCTIONS[rope_type]
    inv_freq, _ = function(module.config)
    module.inv_freq.copy_(inv_freq.to(module.inv_freq.device, module.inv_freq.dtype))
    if hasattr(module, "original_inv_freq"):
        module.original_inv_freq.copy_(module.inv_freq)


def quantize_4bit_weights(model: nn.Module, resolved: ResolvedSetup, device: torch.device) -> int:
    """Give every bitsandbytes 4-bit layer a real quantized weight: random 16-bit weights through bitsandbytes'
    ``Params4bit`` quantization (``quantize_4bit``, blocksize 64, the setup's quant type and double quantization),
    as ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True))`` does. Returns the count."""
    import bitsandbytes as bnb

    setup = resolved.setup
    dtype = torch.float16 if setup.precision in (Precision.FP16, Precision.MIXED_FP16, Precision.FP16_TRUE) \
        else torch.bfloat16
    count = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight = torch.empty(module.out_features, module.in_features, dtype=dtype, device=device).normal_(0.0, INIT_STD)
        param = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=QLORA_BLOCKSIZE,
                                  compress_statistics=setup.double_quant, quant_type=setup.quant.value,
                                  quant_storage=torch.uint8, module=module)
        module.weight = param.to(device)  # not yet quantized: .to() quantizes on the device
        module.quant_state = module.weight.quant_state
        del weight, param
        count += 1
    return count


def autocast_dtype(precision: Precision) -> torch.dtype | None:
    """Trainer ``bf16=True``/``fp16=True`` autocasts forward (accelerate native AMP); fp32 runs without."""
    from ..tracing.build import half_dtype

    return None if precision is Precision.FP32 else half_dtype(precision)


class TrainingStep:
    """One optimizer step of Trainer's loop on a built model (``grad_accum`` micro-batches)."""

    def __init__(self, model: nn.Module, spec: ModelSpec, resolved: ResolvedSetup, device: torch.device):
        from ..tracing.step import TrainerLoss, make_optimizer

        self.model = model
        self.setup = resolved.setup
        self.attn_used = resolved.attn_used
        self.device = device
        self.optimizer = make_optimizer(model, self.setup.optimizer)
        generator = torch.Generator(device="cpu").manual_seed(DATA_SEED)
        self.input_ids = torch.randint(0, spec.vocab_size, (self.setup.batch_size, self.setup.seq_len),
                                       generator=generator).to(device)
        self.dtype = autocast_dtype(self.setup.precision)
        self.scaler = torch.amp.GradScaler(device.type) if self.setup.precision is Precision.MIXED_FP16 else None
        self.trainer_loss = TrainerLoss(model, self.setup)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def forward_context(self):
        """Autocast, and transformers before 4.54's repeat_kv where the setup says so (``--repeat-kv``)."""
        from ..tracing.step import repeated_kv

        stack = contextlib.ExitStack()
        stack.enter_context(self.autocast())
        stack.enter_context(repeated_kv(self.setup, self.attn_used))
        return stack

    def loss(self) -> torch.Tensor:
        """The setup's loss on one micro-batch (labels = inputs, shifted inside the loss)."""
        return self.trainer_loss(self.model, self.input_ids)

    def run(self) -> float:
        """One optimizer step; returns the last micro-batch's loss (for a sanity check, not for memory)."""
        value = float("nan")
        for _ in range(self.setup.grad_accum):
            with self.forward_context():
                loss = self.loss()
            scaled = loss / self.setup.grad_accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            value = loss.detach()
            del loss, scaled
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        # --grads-kept: torch < 2.0's default zeroes the gradients in place (tracing/step.py does the same)
        self.optimizer.zero_grad(set_to_none=not getattr(self.setup, "grads_kept", False))
        return float(value)
