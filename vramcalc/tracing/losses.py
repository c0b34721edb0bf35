"""The loss implementations the trace runs, each allocating what its real counterpart allocates.

- ``hf``: transformers' own ``ForCausalLMLoss`` inside the model's forward (lm_head -> ``logits.float()`` ->
  ``cross_entropy``), unchanged.
- ``hf-shifted``: transformers 4.46-4.49's ``ForCausalLMLoss`` (``shifted_causal_lm_loss``), set as the model's
  ``loss_function``: the same steps as those wheels' ``loss/loss_utils.py`` (upcast, a contiguous shifted copy of
  the fp32 logits, ``fixed_cross_entropy``).
- ``hf-fp32-logits``: transformers 4.31-4.45's causal-LM forward (``Fp32LogitsHead``): lm_head, Gemma-2's soft-cap,
  ``.float()``, then the same shifted cross-entropy on the fp32 logits.
- ``chunked``: torchtune's ``CEWithChunkedOutputLoss`` pattern (``torchtune/modules/loss/ce_chunked_output_loss.py``):
  the hidden states are split into ``CHUNKED_LOSS_CHUNKS`` chunks along the tokens, and each chunk goes through
  lm_head, an fp32 upcast and a summed cross-entropy, so only one chunk's fp32 logits exist at a time.
- ``fused``: Liger-Kernel's ``LigerFusedLinearCrossEntropyFunction`` (``liger_kernel/ops/fused_linear_cross_entropy.py``,
  a Triton kernel): chunks of ``next_pow2(ceil(T / ceil(V / h)))`` tokens; each chunk's logits are turned into their
  gradient in place, which is projected into ``grad_input`` [T, h] and ``grad_weight`` [V, h] during *forward*; backward
  only scales them. The stand-in below makes the same allocations with torch ops (its arithmetic is a placeholder:
  the trace counts bytes, not values).

- ``unsloth-2024``: Unsloth 2024.1-2024.11.7's loss (``unsloth/models/llama.py:959-986``,
  ``kernels/cross_entropy_loss.py:262-347`` @October-2024), set as the model's ``loss_function``: the whole [T, V]
  logits as lm_head made them, labels shifted by ``torch.hstack`` with a -100 column, and ``Fast_CrossEntropyLoss``'s
  allocations (``Unsloth2024CrossEntropy``: fp32 ``losses`` and ``logsumexp`` per row, the logits saved, their
  gradient written into them). The Triton kernels' arithmetic is not run; the soft-cap they apply inside is turned off
  in the model (no [T, V] tensor for it).

For ``chunked`` and ``fused`` the model's lm_head is bypassed (it returns its input) and the loss is computed from
the hidden states with lm_head's own weight, as the integrations of both libraries do.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..facts import CHUNKED_LOSS_CHUNKS, UNSLOTH_CE_MAX_FUSED_SIZE, fused_chunk_tokens  # the losses' chunking


class PassThroughHead(nn.Module):
    """Stands where lm_head was: forward returns the hidden states, the weight stays reachable."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, hidden_states):
        return hidden_states


class Fp32LogitsHead(nn.Module):
    """Stands where lm_head was for transformers 4.31-4.45's forward (``modeling_llama.py`` of those wheels): ``logits =
    self.lm_head(hidden_states)``, Gemma-2's final soft-cap (``logits / cap -> tanh -> * cap``), then ``logits =
    logits.float()``, which leaves the 16-bit logits to die; the model returns and the loss reads the fp32 ones."""

    def __init__(self, head: nn.Module, softcap: float | None):
        super().__init__()
        self.head = head
        self.softcap = softcap

    def forward(self, hidden_states):
        logits = self.head(hidden_states)
        if self.softcap:
            logits = logits / self.softcap
            logits = torch.tanh(logits)
            logits = logits * self.softcap
        return logits.float()


def _shifted_cross_entropy(logits, labels, vocab_size: int, num_items_in_batch, ignore_index: int, as_cuda_autocast):
    """``logits[..., :-1, :].contiguous()`` against the labels likewise shifted, then ``fixed_cross_entropy`` (a
    summed cross-entropy divided by the item count when one is given, else the mean). ``as_cuda_autocast``: CUDA
    autocast runs ``cross_entropy`` in fp32 (its fp32 op list, torch ``docs/source/amp.rst``) where CPU autocast does
    not, so under autocast the shifted copy is cast to fp32 first, with autocast off."""
    shift_logits = logits[..., :-1, :].contiguous().view(-1, vocab_size)
    shift_labels = labels.to(logits.device)[..., 1:].contiguous().view(-1)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    if as_cuda_autocast and torch.is_autocast_enabled("cpu"):
        with torch.autocast(device_type="cpu", enabled=False):
            loss = F.cross_entropy(shift_logits.float(), shift_labels, ignore_index=ignore_index, reduction=reduction)
    else:
        loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index, reduction=reduction)
    return loss / num_items_in_batch if reduction == "sum" else loss


def shifted_causal_lm_loss(logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100,
                           **kwargs):
    """transformers 4.46-4.49 ``ForCausalLMLoss``, step for step (``loss/loss_utils.py`` of the 4.46.0 and 4.48.0
    wheels): ``logits.float()``, then the shifted cross-entropy (``_shifted_cross_entropy``)."""
    return _shifted_cross_entropy(logits.float(), labels, vocab_size, num_items_in_batch, ignore_index, False)


def model_dtype_causal_lm_loss(logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100,
                               **kwargs):
    """``--loss model-dtype``: a cross-entropy on lm_head's output as it comes, with no ``.float()`` (a trainer's own
    ``compute_loss`` on ``outputs.logits``, a custom loop; Qwen v1's ``CrossEntropyLoss()(lm_logits[..., :-1,
    :].contiguous().view(-1, V), ...)``): the shifted cross-entropy, in fp32 under autocast as CUDA runs it."""
    return _shifted_cross_entropy(logits, labels, vocab_size, num_items_in_batch, ignore_index, True)


def chunked_cross_entropy(hidden, weight, labels, softcap=None, chunks: int = CHUNKED_LOSS_CHUNKS):
    """Sum over token chunks of cross-entropy(lm_head(chunk).float()), divided by the token count."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = F.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for hidden_chunk, label_chunk in zip(hidden.chunk(chunks), labels.chunk(chunks)):
        logits = F.linear(hidden_chunk, weight)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        total = total + F.cross_entropy(logits.float(), label_chunk, ignore_index=-100, reduction="sum")
    return total / labels.numel()


class FusedLinearCrossEntropy(torch.autograd.Function):
    """The allocations of Liger's fused linear cross-entropy, with torch ops."""

    @staticmethod
    def forward(ctx, hidden, weight, labels):
        tokens, width = hidden.shape
        vocab = weight.shape[0]
        grad_input = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight) if weight.requires_grad else None
        loss_1d = torch.zeros(tokens, dtype=torch.float32, device=hidden.device)
        chunk = fused_chunk_tokens(tokens, vocab, width)
        for start in range(0, tokens, chunk):
            logits_chunk = hidden[start : start + chunk] @ weight.t()  # its gradient is written in place
            grad_input[start : start + chunk] = logits_chunk @ weight
            if grad_weight is not None:
                grad_weight.addmm_(logits_chunk.t(), hidden[start : start + chunk])
            del logits_chunk
        ctx.save_for_backward(grad_input, grad_weight)
        return loss_1d.sum() / tokens

    @staticmethod
    def backward(ctx, grad_output):
        grad_input, grad_weight = ctx.saved_tensors
        return grad_input, grad_weight, None


def fused_cross_entropy(hidden, weight, labels, softcap=None):
    hidden = hidden.reshape(-1, hidden.shape[-1])
    return FusedLinearCrossEntropy.apply(hidden, weight, labels.reshape(-1))



class Unsloth2024CrossEntropy(torch.autograd.Function):
    """The allocations of Unsloth's ``Fast_CrossEntropyLoss`` (``kernels/cross_entropy_loss.py:262-347``
    @October-2024): forward makes ``losses`` [T] and ``logsumexp`` [T] fp32 (for V > 65536 a [T, n] one reduced by
    ``torch.logsumexp``, then ``losses += logsumexp`` and the ignored rows masked) and saves ``(logits, logsumexp,
    labels)``; backward's kernel writes ``dloss * y`` into the logits and returns them: no new tensor."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index):
        rows, vocab = logits.shape
        chunks = -(-vocab // UNSLOTH_CE_MAX_FUSED_SIZE)
        losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
        if chunks == 1:
            logsumexp = torch.empty(rows, dtype=torch.float32, device=logits.device)
        else:
            logsumexp = torch.empty((rows, chunks), dtype=torch.float32, device=logits.device)
            logsumexp = torch.logsumexp(logsumexp, dim=1)
            losses += logsumexp
            losses.masked_fill_(labels == ignore_index, 0)
        ctx.save_for_backward(logits, logsumexp, labels)
        return losses

    @staticmethod
    def backward(ctx, dlosses):
        logits, _, _ = ctx.saved_tensors
        return logits, None, None  # the kernel's ``tl.store(logits_ptr + col_offsets, dloss * y)``: in place


def unsloth_2024_causal_lm_loss(logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100,
                                **kwargs):
    """``CausalLM_fast_forward``'s loss (``unsloth/models/llama.py:974-986`` @October-2024): ``shift_labels =
    torch.hstack((labels[..., 1:], extra_ignored_labels[:b]))``, then ``fast_cross_entropy_loss`` on the unshifted
    logits (``kernels/cross_entropy_loss.py:352-378``): ``loss.sum() / n_items``. Unsloth's -100 column is a
    [max_seq_length, 1] buffer made once; here a [b, 1] one per call (8·b bytes)."""
    batch, seq_len, vocab = logits.shape
    ignored = torch.full((batch, 1), ignore_index, dtype=labels.dtype, device=labels.device)
    shift_labels = torch.hstack((labels[..., 1:], ignored))
    losses = Unsloth2024CrossEntropy.apply(logits.view(batch * seq_len, vocab), shift_labels.view(-1), ignore_index)
    n_items = num_items_in_batch if num_items_in_batch is not None else torch.count_nonzero(
        shift_labels != ignore_index)
    return losses.sum() / n_items
