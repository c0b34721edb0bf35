"""temporaries: short-lived or weight-derived tensors: autocast weight copies, dequantized 4-bit weights, the
gradients of activations inside one layer's backward, the gradient of the hidden states, the final norm's and the
embedding's backward. (Optimizer scratch is in ``optimizer.optimizer_step_temporary_bytes``.)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..facts import BNB_BLOCKSIZE, BNB_GEMM_4BIT_CUSTOM_MAX_TOKENS
from .peft_methods import CACHED_ONLY_ADAPTERS, SLICED_PROJECTIONS, VECTOR_ADAPTERS
from ..model import ModelSpec
from ..options import Attention, Method
from ..units import DType, maximum, select
from . import quantized
from .activations import Dtypes
from .layouts import shared_norm_grad_bytes
from .stored_tensor import StoredTensor

_F32 = DType.FP32.bytes  # bytes of an fp32 element


@dataclass(frozen=True)
class WeightCopies:
    forward: int  # alive at the end of forward
    backward_start: int  # still saved when backward starts


@functools.lru_cache(maxsize=4096)
def weight_copy_bytes(model: ModelSpec, dt: Dtypes, method: Method, grad_ckpt: bool,
                      tensors: tuple[StoredTensor, ...]) -> WeightCopies:
    """Autocast's 16-bit copies of fp32 Linear weights that F.linear saves for its input gradient.

    ATen ``autocast_mode.cpp::cached_cast`` caches the copy of a leaf weight that requires grad until autocast exits
    (the end of forward); a frozen weight is cast on every call and its copy lives only if saved. Either way
    ``F.linear`` saves the copy it multiplied with whenever its input needs a gradient, until that layer's
    backward. Applies when fp32 weights meet 16-bit autocast (mixed precision, and QLoRA's kbit-prepared lm_head);
    with checkpointing only lm_head's copy stays saved past forward (plus, for trained weights, the autocast cache
    until forward ends). Bytes: c·V·h for an fp32 lm_head (or tied embedding), c·n per fp32 Linear weight of the
    layers (none under QLoRA, whose Linears are 4-bit) and per fp32 adapter tensor.
    """
    if not dt.autocast or dt.c == _F32:
        return WeightCopies(0, 0)
    full = method is Method.FULL
    head = next((t for t in tensors if t.kind in ("lm_head", "embedding") and (t.kind == "lm_head" or model.tie_word_embeddings)), None)
    head_copy = dt.c * model.head_width * model.hidden_size if head is not None and head.bits == 32 else 0
    layer_copies = 0
    for t in tensors:
        if t.kind == "linear" and t.bits == 32 and t.name.endswith(".weight") and (full or not grad_ckpt):
            layer_copies += dt.c * t.numel * t.count
        elif model.traits.dense_experts and t.kind in ("experts", "router") and t.bits == 32 and (
                full or not grad_ckpt):
            # Llama-4: the experts' torch.bmm and the router's F.linear autocast their fp32 weights too (unlike
            # torch._grouped_mm, which has no autocast kernel)
            layer_copies += dt.c * t.numel * t.count
    if method is Method.QLORA:
        layer_copies = 0
    # fp32 LoRA adapters are trained leaves too: autocast caches their 16-bit copies and F.linear saves them. LoRA on
    # lm_head / embed_tokens sits outside the checkpointed layers (kept under checkpointing too); the embedding's
    # lora_embedding_A goes through F.embedding, which autocast does not cast
    adapters = outside = cached_only = 0
    for t in tensors:
        if t.kind == "adapter" and t.bits == 32 and not t.name.endswith(("lora_embedding_A",) + VECTOR_ADAPTERS + SLICED_PROJECTIONS):
            if t.name.startswith(("lm_head.", "embed_tokens.", "prompt_encoder.")):  # outside the decoder layers
                outside += dt.c * t.numel * t.count
            elif t.name.endswith(CACHED_ONLY_ADAPTERS):  # cast inside a custom Function: cached, never saved
                cached_only += dt.c * t.numel * t.count
            else:
                adapters += dt.c * t.numel * t.count
    saved = head_copy + outside + (0 if grad_ckpt else layer_copies + adapters)
    forward = head_copy + outside + adapters + cached_only + (layer_copies if full or not grad_ckpt else 0)
    return WeightCopies(forward, saved)


def dequantized_weight_bytes(model: ModelSpec, method: Method, double_quant: bool, dt: Dtypes, tokens, setup=None):
    """QLoRA: the largest 4-bit Linear dequantized for one matmul.

    Above 1536 tokens bitsandbytes' CUDA ``gemm_4bit`` runs ``_dequant_linear_fallback``: an fp32 absmax (twice, with
    double quantization) and the full weight in the input's dtype, freed after ``F.linear``. Backward dequantizes
    again (``MatMul4Bit.backward``). Below, a fused kernel needs none.
    ``setup`` (optional): a quant-state dtype other than the input's (both copies at once in backward) or an LLM.int8
    base (``CB.to(A.dtype)`` in backward) take ``quantized.dequant_bytes``'s decoder-layer transient instead.
    """
    if method is not Method.QLORA or not model.traits.bnb_quantizable:
        return 0
    if setup is not None and not quantized.knobs(setup).is_default:
        return quantized.dequant_bytes(model, setup, max(dt.r, dt.c), tokens, dt.c).layer_backward
    largest = max(module.weight_numel for module in model.inventory.linears)
    absmax = 2 * _F32 * -(-largest // BNB_BLOCKSIZE) if double_quant else 0
    return select(tokens > BNB_GEMM_4BIT_CUSTOM_MAX_TOKENS, max(dt.r, dt.c) * largest + absmax, 0)


def mlp_backward_bytes(model: ModelSpec, c: int, batch_size, seq_len):
    """Gradients alive at once in an MLP's backward: the incoming [T, h] gradient, then down's input gradient and
    mul's two gradients [T, I] (c bytes each, the compute dtype); for MoE, over the T·K routed slots."""
    m = model
    width = m.expert_width * m.experts_per_token if m.is_moe else m.mlp_width  # Qwen v1: intermediate_size / 2
    if m.traits.dense_experts:  # Llama-4: every token through every expert
        width = m.expert_width * m.num_experts
    return c * batch_size * seq_len * (3 * width + m.hidden_size)


def attention_backward_bytes(model: ModelSpec, c: int, attn_used: Attention, batch_size, seq_len):
    """Gradients alive at once in attention's backward: dq, dk, dv and the incoming gradient of the output; eager
    adds, per [b, a, s, s] element, the gradient of the probabilities (c) and its fp32 copy for the softmax backward
    (4), less what backward frees."""
    m = model
    a, k, d = m.num_heads, m.num_kv_heads, m.qk_head_dim
    attention = c * batch_size * seq_len * (2 * a * d + 2 * k * d)
    if attn_used is Attention.EAGER and m.traits.attention_sinks:
        # gpt-oss: the softmax runs in the scores' dtype (c without autocast; under autocast the fp32 mask makes it
        # fp32, not modelled here): the probabilities' gradient and the softmax's, c each
        attention += 2 * c * batch_size * a * seq_len * seq_len
    elif attn_used is Attention.EAGER:
        attention += (c + _F32) * batch_size * a * seq_len * seq_len
    return attention + shared_norm_grad_bytes(model, batch_size, seq_len)  # 0 but for phi and Falcon's old layout


def layer_backward_bytes(model: ModelSpec, c: int, attn_used: Attention, batch_size, seq_len):
    """The larger of the two halves of a layer's backward transients (MLP first, then attention)."""
    return maximum(mlp_backward_bytes(model, c, batch_size, seq_len),
                   attention_backward_bytes(model, c, attn_used, batch_size, seq_len))


RMS_NORM_BACKWARD_FP32_COPIES = 5  # traced: pow, mul, div and mul-by-scalar gradients of LlamaRMSNorm, [T, h] fp32


def norm_backward_bytes(model: ModelSpec, tokens) -> int:
    """RMSNorm's backward through its fp32 ops (``x.to(fp32) -> pow -> mean -> rsqrt -> mul``) holds about five fp32
    [T, h] gradients at once (traced on LlamaRMSNorm); the final norm's is the one outside any layer."""
    return RMS_NORM_BACKWARD_FP32_COPIES * _F32 * tokens * model.hidden_size


def hidden_grad_bytes(model: ModelSpec, dt: Dtypes, tokens):
    """The gradient of the hidden states [T, h] in the compute dtype, passed from one block's backward to the next."""
    return model.hidden_size * tokens * dt.c


def embedding_backward_bytes(model: ModelSpec, method: Method, dt: Dtypes, tokens):
    """embedding_dense_backward: the gradient of the embedding output [T, h] in, a [V, h] gradient out; when tied,
    it is added into lm_head's existing gradient, so the new one is a transient. Only full fine-tuning trains the
    embedding."""
    if method is not Method.FULL:
        return 0
    grad_in = dt.r * tokens * model.hidden_size
    # tied: autograd's input buffer adds the embedding's new gradient to lm_head's, out of place
    new_grads = 2 * dt.r * model.vocab_size * model.hidden_size if model.tie_word_embeddings else 0
    return grad_in + new_grads
