"""``--task classify``: transformers' Trainer step on an encoder's sequence classifier
(``BertForSequenceClassification``, built by ``build.build_model``), as the Trainer runs it: one batch of b
sequences of ``seq_len`` token ids and b integer labels (the collator of a dataset with ``input_ids`` and ``labels``
only: no attention mask, no token-type ids), ``outputs = model(**inputs)`` under autocast, ``loss = outputs.loss``
(the model's own ``CrossEntropyLoss`` on [b, num_labels], modeling_bert.py L1133-1135), accelerate's fp32 copy of the
16-bit logits under mixed precision, ``loss / grad_accum`` backpropagated; then the optimizer step
(``step.StepTracer``).

The head region the tracker calls ``logits`` starts at the pooler (``BertPooler``: dense + tanh on the first token)
and runs through the classifier and the loss, and in backward until the last encoder layer's output gradient.

Two knobs give the 2022 stacks' behaviour to the 5.25 model (``legacy_attention``): ``softmax_saves_input`` runs
``F.softmax`` as an autograd function that saves its input as well as its output (torch 1.10's ``SoftmaxBackward0``,
whose generated ``Functions.h`` holds ``self_`` and ``result_``), and ``extended_mask`` gives every layer the extended
mask transformers 4.x builds from an all-ones ``attention_mask`` (4.16.2 ``modeling_utils.py:306-307``: ``(1.0 -
mask) * -10000.0`` in the parameters' dtype, [b, 1, 1, s], so zeros), which 5.25 skips for an unpadded batch."""

from __future__ import annotations

import contextlib

import torch

from .cuda_emulation import SIXTEEN_BIT, original_softmax, is_fake
from .step import StepTracer, base_model


class _SoftmaxSavingInput(torch.autograd.Function):
    """``aten._softmax`` whose backward node keeps its input as well as its output, as torch < 1.11's did."""

    @staticmethod
    def forward(ctx, input, dim, half_to_float):
        output = torch.ops.aten._softmax(input, dim, half_to_float)
        ctx.save_for_backward(input, output)
        ctx.dim = dim
        return output

    @staticmethod
    def backward(ctx, grad):
        input, output = ctx.saved_tensors
        return torch.ops.aten._softmax_backward_data(grad, output, ctx.dim, input.dtype), None, None


def _softmax_saving_input(input, dim=None, _stacklevel=3, dtype=None):
    """``F.softmax`` as torch 1.10's CUDA autocast ran it, saving its input: a 16-bit input without a dtype becomes
    fp32, fp16 by ``_softmax``'s half_to_float (``SoftMax.cpp::softmax``), bf16 through an fp32 copy (what
    ``_softmax`` reads and saves); a given dtype converts first."""
    if dim is None:  # (the implicit-dim legacy call: not BERT's)
        return original_softmax(input, dim, _stacklevel, dtype)
    dim = dim if dim >= 0 else dim + input.dim()
    half_to_float = False
    if dtype is None and torch.is_autocast_enabled("cpu") and input.dtype in SIXTEEN_BIT:
        dtype = torch.float32
    with torch.autocast(device_type="cpu", enabled=False):
        if dtype is not None and input.dtype != dtype:
            if input.dtype is torch.float16 and dtype is torch.float32 and is_fake(input):
                half_to_float = True
            else:
                input = input.to(dtype)
        return _SoftmaxSavingInput.apply(input, dim, half_to_float)


@contextlib.contextmanager
def legacy_attention(model, setup):
    """The 2022 stacks' attention on the 5.25 model while the block runs (module docstring)."""
    saved = contextlib.ExitStack()
    if getattr(setup, "softmax_saves_input", False):
        original = torch.nn.functional.softmax
        torch.nn.functional.softmax = _softmax_saving_input
        saved.callback(setattr, torch.nn.functional, "softmax", original)
    if getattr(setup, "extended_mask", False):
        encoder = base_model(model).base_model
        create = encoder._create_attention_masks
        dtype = next(model.parameters()).dtype

        def with_extended_mask(*args, **kwargs):
            attention_mask, cross_mask = create(*args, **kwargs)
            if attention_mask is None:  # an unpadded batch: 4.x's extended mask of ones, (1 - 1) * -10000
                embedded = kwargs["embedding_output"]  # (BertModel.forward passes every argument by name)
                batch, length = embedded.shape[:2]
                attention_mask = torch.zeros(batch, 1, 1, length, dtype=dtype, device=embedded.device)
            return attention_mask, cross_mask

        encoder._create_attention_masks = with_extended_mask
        saved.callback(delattr, encoder, "_create_attention_masks")
    with saved:
        yield


class ClassifyStepTracer(StepTracer):
    """``StepTracer`` with the sequence classifier's batch and loss (module docstring)."""

    def run(self, steps: int = 2, progress=None) -> None:
        with legacy_attention(self.model, self.setup):
            super().run(steps, progress)

    def _install_loss(self) -> None:
        self.head = base_model(self.model).base_model.pooler  # BertModel.pooler: where the head region starts
        self.loss = self._classify_loss

    def _classify_loss(self, forward_module, input_ids, on_logits=None, position_ids=None):
        labels = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        outputs = forward_module(input_ids=input_ids, labels=labels)
        loss = outputs.loss
        if self.setup.precision.autocast:
            outputs.logits.float()  # accelerate's convert_outputs_to_fp32: a copy of the [b, num_labels] logits
        del outputs
        return loss
