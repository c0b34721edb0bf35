"""temporaries: short-lived or weight-derived tensors: autocast weight copies, dequantized 4-bit weights, the
gradients of activations inside one layer's backward, the gradient of the hidden states, the final norm's and the
embedding's backward. (Optimizer scratch is in ``optimizer.optimizer_step_temporary_bytes``.)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

from ..facts import BNB_BLOCKSIZE
from .peft_methods import CACHED_ONLY_ADAPTERS, SLICED_PROJECTIONS, VECTOR_ADAPTERS
from ..model import ModelSpec
from ..options import Attention, Kernels, Method
from ..units import DType, maximum
from . import quantized
from ..gptq import is_gptq
from .activations import Dtypes, gemma_norm
from .layouts import shared_norm_grad_bytes
from .stored_tensor import StoredTensor

_F32 = DType.FP32.bytes  # bytes of an fp32 element


@dataclass(frozen=True)
class WeightCopies:
    forward: int  # alive at the end of forward
    backward_start: int  # still saved when backward starts


@functools.lru_cache(maxsize=4096)
def weight_copy_bytes(model: ModelSpec, dt: Dtypes, method: Method, grad_ckpt: bool,
                      tensors: tuple[StoredTensor, ...], head_calls: int = 1,
                      gradless_first: tuple[str, ...] = ()) -> WeightCopies:
    """Autocast's 16-bit copies of fp32 Linear weights that F.linear saves for its input gradient.

    ATen ``autocast_mode.cpp::cached_cast`` caches the copy of a leaf weight that requires grad until autocast exits
    (the end of forward); a frozen weight is cast on every call and its copy lives only if saved. Either way
    ``F.linear`` saves the copy it multiplied with whenever its input needs a gradient, until that layer's
    backward. Applies when fp32 weights meet 16-bit autocast (mixed precision, and QLoRA's kbit-prepared lm_head);
    with checkpointing only lm_head's copy stays saved past forward (plus, for trained weights, the autocast cache
    until forward ends). Bytes: c·V·h for an fp32 lm_head (or tied embedding), c·n per fp32 Linear weight of the
    layers (none under QLoRA, whose Linears are 4-bit) and per fp32 adapter tensor.

    ``gradless_first``: the first layer's Linears whose input needs no gradient
    (``activations.first_layer_gradless_linears``): their frozen weights' copies are not saved in that layer.

    ``head_calls``: how many times one forward calls lm_head (a chunked loss: ``CHUNKED_LOSS_CHUNKS``, one
    ``F.linear(hidden_chunk, weight)`` per chunk). A frozen fp32 head (LoRA, QLoRA's kbit-prepared head, prompt
    tuning under mixed-*) is not cached (``cached_cast``'s ``arg.requires_grad()`` condition), so each call casts it
    again and saves its own copy until that chunk's backward: c·V·h per call. A trained head is cast once.
    """
    if not dt.autocast or dt.c == _F32:
        return WeightCopies(0, 0)
    full = method is Method.FULL
    head = next((t for t in tensors if t.kind in ("lm_head", "embedding") and (t.kind == "lm_head" or model.tie_word_embeddings)), None)
    head_copy = dt.c * model.head_width * model.hidden_size if head is not None and head.bits == 32 else 0
    if head is not None and not head.trainable:
        head_copy *= head_calls  # one uncached cast per lm_head call, each saved by its chunk's F.linear
    layer_copies = 0
    for t in tensors:
        if t.kind == "linear" and t.bits == 32 and t.name.endswith(".weight") and (full or not grad_ckpt):
            layer_copies += dt.c * t.numel * t.count
        elif model.traits.dense_experts and t.kind in ("experts", "router") and t.bits == 32 and (
                full or not grad_ckpt):
            # Llama-4: the experts' torch.bmm and the router's F.linear autocast their fp32 weights too (unlike
            # torch._grouped_mm, which has no autocast kernel)
            layer_copies += dt.c * t.numel * t.count
        if (t.kind == "linear" and t.bits == 32 and not t.trainable and not grad_ckpt
                and t.name.removesuffix(".weight") in gradless_first):
            layer_copies -= dt.c * t.numel  # once: the first layer's
    if method is Method.QLORA:
        layer_copies = 0
    # fp32 LoRA adapters are trained leaves too: autocast caches their 16-bit copies and F.linear saves them. LoRA on
    # lm_head / embed_tokens sits outside the checkpointed layers (kept under checkpointing too); the embedding's
    # lora_embedding_A goes through F.embedding, which autocast does not cast
    adapters = outside = cached_only = 0
    # peft's ParamWrapper on fused experts (terms/moe_lora.py) never calls its lora_A/B Linears: autocast casts
    # nothing, but get_delta_factors copies the factors to the experts' dtype (``.to(param.dtype)``) and baddbmm saves
    # those copies, 16-bit ones here; with fp32 experts (mixed-*) they are views and nothing is copied
    fp32_experts = any(t.kind == "experts" and t.bits == 32 for t in tensors)
    for t in tensors:
        if t.kind == "adapter" and t.bits == 32 and not t.name.endswith(("lora_embedding_A",) + VECTOR_ADAPTERS + SLICED_PROJECTIONS):
            if fp32_experts and t.name.startswith("mlp.experts."):
                continue
            if t.name.startswith(("lm_head.", "embed_tokens.", "prompt_encoder.")):  # outside the decoder layers
                outside += dt.c * t.numel * t.count
            elif t.name.endswith(CACHED_ONLY_ADAPTERS):  # cast inside a custom Function: cached, never saved
                cached_only += dt.c * t.numel * t.count
            else:
                adapters += dt.c * t.numel * t.count
    saved = head_copy + outside + (0 if grad_ckpt else layer_copies + adapters)
    forward = head_copy + outside + adapters + cached_only + (layer_copies if full or not grad_ckpt else 0)
    return WeightCopies(forward, saved)


class LayerCopies(NamedTuple):
    """Autocast copies of one decoder layer's fp32 weights that its own F.linear calls save (``weight_copy_bytes``),
    split by when its backward frees them."""

    whole: int  # every copy the layer's forward saved
    down: int  # the MLP's down projection's (and its adapters'): freed first
    mlp: int  # the MLP's Linears' (down's included): freed before attention's backward
    o: int  # the attention output projection's: freed first in attention's backward
    # the k and v projections' (a fused qkv's whole), and their adapters': what a recompute's KV cache copy keeps
    # (``activations.cache_history_saved``)
    kv: int = 0


@functools.lru_cache(maxsize=4096)
def layer_weight_copies(model: ModelSpec, dt: Dtypes, method: Method, moe: bool,
                        tensors: tuple[StoredTensor, ...], gradless: tuple[str, ...] = ()) -> LayerCopies:
    """The 16-bit autocast copies one decoder layer (dense or MoE) saves for its backward: c per fp32 Linear weight
    of the layer (QLoRA's are 4-bit: none) and per fp32 adapter tensor cast by F.linear (the same rule as
    ``weight_copy_bytes``). Without checkpointing every layer's copies are saved from forward; under checkpointing
    the recomputed layer makes its own again (torch ``utils/checkpoint.py`` reruns the layer's forward under the
    saved autocast state). Each is freed by its Linear's backward (``Node::release_variables``). ``gradless``: the
    Linears whose input needs no gradient (``activations.first_layer_gradless_linears``): F.linear saves the weight
    only for the input's gradient, so neither their weight's copy nor their lora_A's is saved."""
    if not dt.autocast or dt.c == _F32:
        return LayerCopies(0, 0, 0, 0)
    scopes = ("layer", "moe") if moe else ("layer", "dense")
    mlp_names = set(model.traits.mlp_names)
    down_name = model.traits.mlp_names[-1]
    whole = down = mlp = o = kv = 0
    names = model.traits.qkv_names
    kv_names = set(names if len(names) == 1 else names[1:])
    uncast = ("lora_embedding_A",) + VECTOR_ADAPTERS + SLICED_PROJECTIONS + CACHED_ONLY_ADAPTERS
    for t in tensors:
        linear = t.kind == "linear" and t.name.endswith(".weight") and method is not Method.QLORA
        adapter = t.kind == "adapter" and not t.name.endswith(uncast)
        if t.scope not in scopes or t.bits != 32 or not (linear or adapter):
            continue
        module = t.name.split(".")[0]
        if module in gradless and (linear or t.name.endswith(".lora_A")):
            continue
        nbytes = dt.c * t.numel
        whole += nbytes
        if module in mlp_names:
            mlp += nbytes
            down += nbytes if module == down_name else 0
        elif module == model.traits.o_name:
            o += nbytes
        elif module in kv_names:
            kv += nbytes
    return LayerCopies(whole, down, mlp, o, kv)


def dequantized_weight_bytes(model: ModelSpec, method: Method, double_quant: bool, dt: Dtypes, tokens, setup=None,
                             role: str | None = None):
    """QLoRA: the largest 4-bit Linear dequantized for one matmul.

    Backward dequantizes at any token count (``MatMul4Bit.backward``: ``torch.matmul(grad_output,
    F.dequantize_4bit(B, ctx.state).to(grad_output.dtype))``): the full weight in the input's dtype, beside the
    layer's backward gradients (with double quantization an fp32 absmax first). (Forward: above 1536 tokens
    bitsandbytes' CUDA ``gemm_4bit`` runs ``_dequant_linear_fallback``, the same transient; below, a fused kernel
    needs none. The estimator adds this to backward moments only.)
    ``setup`` (optional): a quant-state dtype other than the input's (both copies at once in backward) or an LLM.int8
    base (``CB.to(A.dtype)`` in backward) take ``quantized.dequant_bytes``'s decoder-layer transient instead.
    ``role`` (default knobs only): the largest Linear of that role (``LinearModule.role``: the attention's backward
    dequantizes its own projections, not the MLP's).
    """
    if method is not Method.QLORA or not model.bnb_quantizable or is_gptq(setup):
        return 0  # (a GPTQ base dequantizes in forward only: terms/gptq.py)
    if setup is not None and not quantized.knobs(setup).is_default:
        return quantized.dequant_bytes(model, setup, max(dt.r, dt.c), tokens, dt.c).layer_backward
    modules = [m for m in model.inventory.linears if role is None or m.role == role]
    if not modules:
        return 0
    module = max(modules, key=lambda m: m.weight_numel)
    largest = quantized.largest_quantized_numel(model, setup) if role is None else module.weight_numel
    # dequantize_blockwise's fp32 absmax, freed once the weight is rebuilt, before the matmul's [T, in] gradient
    # (in the layer's backward transients) is made: it counts only where it is the larger of the two
    absmax = _F32 * -(-largest // BNB_BLOCKSIZE) if double_quant else 0
    return _dequant_bytes_per_weight(model, dt) * largest + maximum(absmax - dt.c * tokens * module.in_features, 0)


def _dequant_bytes_per_weight(model: ModelSpec, dt: Dtypes) -> int:
    """Bytes per weight of the backward's dequantized copy: in the input's dtype; where a LayerNorm family under 16-bit
    autocast hands its 4-bit Linears fp32 inputs (``layouts.residual_bytes``), ``Linear4bit.set_compute_type``
    computes in fp32, so the 16-bit dequantized weight and its fp32 cast (``.to(grad_output.dtype)``) live at once."""
    if model.traits.layer_norm and dt.autocast and dt.r != _F32 and dt.c != _F32:
        return dt.c + _F32
    return max(dt.r, dt.c)


def mlp_backward_bytes(model: ModelSpec, c: int, r: int, batch_size, seq_len, in_place: bool = False):
    """Gradients alive at once in an MLP's backward, at mul's: the incoming [T, h] gradient of the residual stream
    (r bytes: fp32 under mixed precision, where the residual add promotes), down's input gradient and mul's two
    gradients [T, I] (c bytes each, the compute dtype); for MoE, over the T·K routed slots. ``in_place``: Unsloth's
    LoRA_MLP backward (``unsloth/kernels/fast_lora.py:116-225``) makes down's input gradient DW [T, I] and then
    writes h, df and de into DW and the saved e and g (``swiglu_DWf_DW_dfg_kernel``) and dX into X (``out = X``):
    one [T, I] beside the incoming gradient."""
    m = model
    width = m.expert_width * m.experts_per_token if m.is_moe else m.mlp_width  # Qwen v1: intermediate_size / 2
    if m.traits.dense_experts:  # Llama-4: every token through every expert
        width = m.expert_width * m.num_experts
    if m.traits.rope_copies_per_projection and r != c:
        # GPT-J's ``attn_output + feed_forward_hidden_states + residual``: the fp32 residual gradient's cast for the
        # 16-bit attn + MLP sum, handed to both branches, waits for the attention's beside the MLP's backward
        return batch_size * seq_len * (3 * c * width + (r + c) * m.hidden_size)
    if m.traits.alibi:  # BLOOM's GeLUFunction backward (bloom_gelu_back, modeling_bloom.py L116-132)
        return batch_size * seq_len * (BLOOM_GELU_BACKWARD_LIVE * c * width + r * m.hidden_size)
    return batch_size * seq_len * ((1 if in_place else 3) * c * width + r * m.hidden_size)


# bloom_gelu_back's eager ops at their widest (``0.5 * x``, ``1 - tanh_out * tanh_out``, ``0.1070322243 * x`` and its
# product with x, beside tanh_out) and the incoming gradient: six [T, I] beside the saved input
BLOOM_GELU_BACKWARD_LIVE = 6


def down_backward_bytes(model: ModelSpec, c: int, r: int, batch_size, seq_len):
    """Gradients alive in a dense MLP's first backward op, down's, before its input is freed: the residual stream's
    incoming [T, h] gradient (r), its cast to the compute dtype where the add promoted (c, when r != c: ``AddBackward0``
    casts each input's gradient to that input's dtype) and down's input gradient [T, I] (c)."""
    m = model
    cast = c * m.hidden_size if r != c else 0
    return batch_size * seq_len * (r * m.hidden_size + cast + c * m.mlp_width)


def eager_softmax_backward_bytes(model: ModelSpec, c: int, r: int, batch_size, seq_len):
    """Gradients alive when eager attention's softmax backward runs (transformers ``eager_attention_forward``; the
    cast probabilities, v and o_proj's input already freed: ``activations.backward_freed``): per [b, a, s, s]
    element the probabilities' gradient in fp32 (``ToCopyBackward0`` of ``.to(q.dtype)``) and
    ``_softmax_backward_data``'s fp32 result (the scores are fp32 once the fp32 4-D mask is added); per token the
    residual stream's incoming gradient (r·h) and the gradient of the (repeated) v, waiting for its branch (autograd
    runs the later-created softmax first)."""
    m = model
    a, k, d = m.num_heads, m.num_kv_heads, m.qk_head_dim
    kv_width = a * d if a > k else k * d  # repeat_kv's copy, or k itself
    return 2 * _F32 * batch_size * a * seq_len * seq_len + batch_size * seq_len * (r * m.hidden_size + c * kv_width)


def eager_scores_backward_bytes(model: ModelSpec, c: int, r: int, batch_size, seq_len):
    """Gradients alive at q·kᵀ's backward, right after the softmax's (its fp32 output then freed: the estimator
    subtracts it): the scores' gradient cast back to the compute dtype (c per [b, a, s, s] element), and per token
    the residual stream's gradient (r·h), v's waiting gradient and the new dq and dk (c each)."""
    m = model
    a, k, d = m.num_heads, m.num_kv_heads, m.qk_head_dim
    kv_width = a * d if a > k else k * d
    return c * batch_size * a * seq_len * seq_len + batch_size * seq_len * (r * m.hidden_size
                                                                             + c * (a * d + 2 * kv_width))


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


def layer_backward_bytes(model: ModelSpec, c: int, r: int, attn_used: Attention, batch_size, seq_len,
                         mlp_in_place: bool = False):
    """The larger of the two halves of a layer's backward transients (MLP first, then attention)."""
    return maximum(mlp_backward_bytes(model, c, r, batch_size, seq_len, mlp_in_place),
                   attention_backward_bytes(model, c, attn_used, batch_size, seq_len))


RMS_NORM_BACKWARD_FP32_COPIES = 5  # traced: pow, mul, div and mul-by-scalar gradients of LlamaRMSNorm, [T, h] fp32


def norm_backward_bytes(model: ModelSpec, tokens, kernels: Kernels = Kernels.NONE) -> int:
    """RMSNorm's backward through its fp32 ops (``x.to(fp32) -> pow -> mean -> rsqrt -> mul``) holds about five fp32
    [T, h] gradients at once (traced on LlamaRMSNorm); the final norm's is the one outside any layer. The Triton
    norms write dX into the incoming gradient but for Gemma's: none. Unsloth ``kernels/rms_layernorm.py``
    (``dX = torch.empty_like(dY) if ctx.GEMMA else dY``); Liger (Liger-Kernel@ead96b61 ``ops/rms_norm.py:540-543``
    ``dX = dY`` when ``in_place``, which ``transformers/monkey_patch.py:68`` sets but for the Gemma families, :1024)."""
    if kernels.saves_norm_input and not gemma_norm(model):
        return 0
    return RMS_NORM_BACKWARD_FP32_COPIES * _F32 * tokens * model.hidden_size


def head_grad_cast_bytes(dt: Dtypes, head: StoredTensor | None) -> int:
    """A trained fp32 lm_head weight under 16-bit autocast (mixed precision; QLoRA's kbit-prepared lm_head copy):
    F.linear multiplies autocast's c copy of it, so ``MmBackward`` writes its weight gradient in c, c·V·h, and the
    cast's ``ToCopyBackward`` (made before the mm in forward, so run right after it) turns that into the fp32 .grad.
    ``head``: ``states.trained_head``. 0 without autocast, in fp32 compute or with a frozen or 16-bit head."""
    if head is None or not dt.autocast or dt.c == _F32 or head.bits != 32:
        return 0
    return dt.c * head.numel


def hidden_grad_bytes(model: ModelSpec, dt: Dtypes, tokens):
    """The gradient of the hidden states [T, h] in the compute dtype, passed from one block's backward to the next."""
    return model.hidden_size * tokens * dt.c


def embedding_backward_bytes(model: ModelSpec, method: Method, dt: Dtypes, tokens,
                             modules_to_save: tuple[str, ...] = ()):
    """embedding_dense_backward: the gradient of the embedding output [T, h] in, a [V, h] gradient out; when tied,
    it is added into lm_head's existing gradient, so the new one is a transient. Full fine-tuning trains the
    embedding, and so does peft with ``embed_tokens`` in ``modules_to_save``: its trained copy is an untied
    ``nn.Embedding`` (``parameters.module_copies``), whose dense [V, h] gradient is its own (counted in the
    gradients), so only the incoming [T, h] is transient."""
    if method is not Method.FULL:
        return dt.r * tokens * model.hidden_size if "embed_tokens" in modules_to_save else 0
    grad_in = dt.r * tokens * model.hidden_size
    if model.traits.learned_positions and model.tie_word_embeddings:
        # OPT: ``inputs_embeds + pos_embeds`` hands one [T, h] gradient to both embeddings; the position table's
        # backward (the later node, run first) and then the token embedding's have released it when the tied sum runs
        grad_in = 0
    # tied: autograd's input buffer adds the embedding's new gradient to lm_head's, out of place
    new_grads = 2 * dt.r * model.vocab_size * model.hidden_size if model.tie_word_embeddings else 0
    return grad_in + new_grads
