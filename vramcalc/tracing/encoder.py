"""``--task classify``: transformers' Trainer step on an encoder's sequence classifier
(``BertForSequenceClassification``, built by ``build.build_model``), as the Trainer runs it: one batch of b
sequences of ``seq_len`` token ids and b integer labels (the collator of a dataset with ``input_ids`` and ``labels``
only: no attention mask, no token-type ids), ``outputs = model(**inputs)`` under autocast, ``loss = outputs.loss``
(the model's own ``CrossEntropyLoss`` on [b, num_labels], modeling_bert.py L1133-1135), accelerate's fp32 copy of the
16-bit logits under mixed precision, ``loss / grad_accum`` backpropagated; then the optimizer step
(``step.StepTracer``).

The head region the tracker calls ``logits`` starts at the pooler (``BertPooler``: dense + tanh on the first token)
and runs through the classifier and the loss, and in backward until the last encoder layer's output gradient."""

from __future__ import annotations

import torch

from .step import StepTracer, base_model


class ClassifyStepTracer(StepTracer):
    """``StepTracer`` with the sequence classifier's batch and loss (module docstring)."""

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
