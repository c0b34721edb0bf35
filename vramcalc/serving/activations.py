"""Transient tensors of a transformers ``generate`` forward (no autograd: nothing is saved, so the peak is the
largest set of tensors alive at one moment of one layer), for the prefill and for a decode step.

Each candidate moment lists the tensors alive then, read off the transformers 5.x module code (file named per
candidate) and checked against the serving trace (``serving/trace.py``, ``benchmarks/serving_accuracy.md``).
Symbols: b batch, p tokens per sequence in this forward, T = b·p, h hidden, I intermediate, a heads, k KV heads,
d head_dim, e bytes per element of the compute dtype, S = T·K routed (token, expert) pairs, V vocab.

Alive across a whole forward (``LlamaModel.forward`` and its siblings): the embedding output ``inputs_embeds`` [T, h],
the previous layer's output [T, h] (the loop variable), rotary ``cos``/``sin`` [b, p, d_rope] (cast to the compute
dtype), the attention masks transformers builds (eager attention always: one float [b, 1, p, kv] per layer kind;
SDPA only when the window cannot be skipped: bool), and ``generate``'s int64 [b, n] ``attention_mask`` /
``position_ids`` bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model import ModelSpec
from ..units import round_up

# [T, I] tensors alive at the peak of a plain MLP's activation, by family (hidden_act defaults: PhiConfig "gelu_new",
# GPTNeoXConfig "gelu")
_NON_GATED_ACT_TENSORS = {"phi": 4, "gpt_neox": 2}
GENERATE_INT64_BUFFERS = 4  # attention_mask, its cumsum, position_ids (masked_fill), the cache-position slice


@dataclass(frozen=True)
class ForwardShape:
    batch: int
    new_tokens: int  # tokens this forward feeds per sequence (prompt length, or 1 for a decode step)
    kv_tokens: int  # tokens the attention reads per sequence (the cache after this forward's update)
    element_bytes: int = 2
    padded: bool = False  # a StaticCache decode: empty future slots make transformers pass SDPA a padding mask

    @property
    def tokens(self) -> int:
        return self.batch * self.new_tokens


def tensor_bytes(n_elements: int, element_bytes: int) -> int:
    """Bytes of one allocation of n elements, rounded to the CUDA caching allocator's 512-byte granule."""
    return round_up(n_elements * element_bytes)


def rope_dim(spec: ModelSpec) -> int:
    """Width of the rotary ``cos``/``sin`` tables: MLA's rope part, phi/gpt_neox partial rotary, else head_dim."""
    return spec.rope_dim


def resident_bytes(spec: ModelSpec, shape: ForwardShape, sequence_len: int) -> int:
    """Alive during every layer of the forward (module docstring), besides the weights and the cache."""
    e, T, b, p = shape.element_bytes, shape.tokens, shape.batch, shape.new_tokens
    out = 2 * tensor_bytes(T * spec.hidden_size, e)  # inputs_embeds, previous layer output
    out += 2 * tensor_bytes(b * p * rope_dim(spec), e)  # cos, sin
    buffers = GENERATE_INT64_BUFFERS if p > 1 else GENERATE_INT64_BUFFERS - 1  # the prefill's attention_mask clone
    # 512-byte scalars: two lifted constants and the stop check's ``gt``; the prefill also holds ``ones`` (cache_position)
    out += buffers * tensor_bytes(b * sequence_len, 8) + (4 if p > 1 else 3) * 512
    out += _mask_bytes(spec, shape)
    return out


def _mask_bytes(spec: ModelSpec, shape: ForwardShape) -> int:
    """4-D masks built once per forward (``masking_utils.create_causal_mask`` / ``create_sliding_window_causal_mask``)."""
    b, p, kv = shape.batch, shape.new_tokens, shape.kv_tokens
    if not spec.traits.supports_sdpa:  # eager: an additive mask in the compute dtype, one per layer kind
        kinds = 2 if spec.sliding_window and spec.family == "gemma2" else 1
        return kinds * tensor_bytes(b * p * kv, shape.element_bytes)
    if shape.padded or (spec.sliding_window and kv >= spec.sliding_window):
        # SDPA bool mask: padding, or a window that cannot ride on is_causal (a decode step too, once the keys
        # reach the window: masking_utils._ignore_causal_mask_sdpa answers False for local attention)
        return tensor_bytes(b * p * kv, 1)
    return 0


def mlp_bytes(spec: ModelSpec, shape: ForwardShape, moe_layer: bool) -> int:
    """The MLP's own peak (on top of the residual stream [T, h] and the normed input [T, h])."""
    e, T, h = shape.element_bytes, shape.tokens, spec.hidden_size
    if not moe_layer:
        I = spec.intermediate_size
        if not spec.traits.gated_mlp:
            # fc1 -> act -> fc2 (PhiMLP.forward, GPTNeoXMLP.forward): fc1's output [T, I] lives through the activation.
            # phi's gelu_new (activations.py NewGELUActivation: 0.5 * x * (1 + tanh(...))) ends with x, (1 + tanh),
            # 0.5 * x and their product alive: 4 x [T, I]; gpt_neox's gelu (one F.gelu kernel): x and its output
            return _NON_GATED_ACT_TENSORS.get(spec.family, 2) * tensor_bytes(T * I, e)
        if spec.traits.fused_gate_up:  # Phi3MLP: gate_up [T, 2I] kept by the gate view, act(gate), product
            return tensor_bytes(T * 2 * I, e) + 2 * tensor_bytes(T * I, e)
        return 3 * tensor_bytes(T * I, e)  # act(gate) [T, I], up [T, I], product [T, I] (LlamaMLP.forward)
    K, I = spec.experts_per_token, spec.expert_width
    S = T * K
    # integrations/moe.py grouped_mm_experts_forward: gathered input G [S, h]; up: gate_up [S, 2I] + act + product;
    # end: G, down output D [S, h], weighted W and un-permuted W2 [S, h] in the routing weights' dtype
    weight_bytes = 2 if spec.family == "qwen3_moe" else 4  # Qwen3MoE casts top-k weights back; Mixtral/DeepSeek: fp32
    up = tensor_bytes(S * h, e) + tensor_bytes(S * 2 * I, e) + 2 * tensor_bytes(S * I, e)
    end = 2 * tensor_bytes(S * h, e) + 2 * tensor_bytes(S * h, max(weight_bytes, e))
    routing = tensor_bytes(T * K, 4) + tensor_bytes(T * K, 8) + 3 * tensor_bytes(S, 8) + 2 * tensor_bytes(S, 4)  # top-k weights/ids, sort, perm, inv_perm
    peak = max(up, end) + routing
    if spec.n_shared_experts:  # DeepseekV3MoE: routed output [T, h] alive while the shared MLP runs
        shared = 3 * tensor_bytes(T * spec.moe_intermediate_size * spec.n_shared_experts, e) + tensor_bytes(T * h, e)
        peak = max(peak, shared)
    return peak


def cache_update_bytes(spec: ModelSpec, tokens: int, element_bytes: int) -> int:
    """Attention tensors alive while ``Cache.update`` concatenates (besides the resident ones and the normed input
    [T, h]): the roped q_embed [T, a·d] and k_embed [T, k·d], and the storage the values live in: v_proj's output
    [T, k·d] (``LlamaAttention.forward``, models/llama/modeling_llama.py L244-252: q/k reassigned by
    ``apply_rotary_pos_emb``, v kept), or, with a fused projection, the whole qkv output [T, (a + 2k)·d], whose last
    slice the values are a view of (``Phi3Attention.forward``, models/phi3/modeling_phi3.py L219-233;
    ``GPTNeoXAttention.forward``, models/gpt_neox/modeling_gpt_neox.py L195-203). Phi's partial rotary keeps more
    (``PhiAttention.forward``, models/phi/modeling_phi.py L200-216): the ``query_pass``/``key_pass`` views hold the
    q and k projections, and the roped parts [T, a·r], [T, k·r] stay bound to locals through the ``cat``."""
    a, k, d, e, T = spec.num_heads, spec.num_kv_heads, spec.head_dim, element_bytes, tokens
    roped = tensor_bytes(T * a * d, e) + tensor_bytes(T * k * d, e)
    if spec.family == "phi":
        r = spec.rope_dim
        return 2 * roped + tensor_bytes(T * k * d, e) + tensor_bytes(T * a * r, e) + tensor_bytes(T * k * r, e)
    if spec.traits.fused_qkv:
        return roped + tensor_bytes(T * (a + 2 * k) * d, e)
    return roped + tensor_bytes(T * k * d, e)


def attention_moments(spec: ModelSpec, shape: ForwardShape) -> list[tuple[int, bool]]:
    """The attention block's own peaks (on top of the normed input [T, h]), as (bytes, before the layer's cache
    update): a moment before the update does not yet hold this layer's cache tensors."""
    e, b, p, kv = shape.element_bytes, shape.batch, shape.new_tokens, shape.kv_tokens
    a, k, d, T = spec.num_heads, spec.num_kv_heads, spec.head_dim, shape.tokens
    if spec.traits.mla:
        # DeepseekV3Attention.forward: q_states [T, a·qk], roped q_rot, query cat, compressed_kv [T, r + rope];
        # expand_kv over the whole cache: kv_b_proj output [b, kv, a·(nope + v)], key_states [b, a, kv, qk];
        # SDPA (memory-efficient kernel: q/k and v widths differ) output [T, a·v]
        qk, v = spec.qk_head_dim, spec.v_head_dim
        per_query = tensor_bytes(T * a * qk, e) * 2 + tensor_bytes(T * a * spec.qk_rope_head_dim, e) + tensor_bytes(T * a * v, e)
        per_query += tensor_bytes(T * (spec.kv_lora_rank + spec.qk_rope_head_dim), e)
        per_key = tensor_bytes(b * kv * a * (spec.qk_nope_head_dim + v), e) + tensor_bytes(b * kv * a * qk, e)
        return [(per_query + per_key + tensor_bytes(b * a * _round32(p), 4), False)]
    q, kd = tensor_bytes(T * a * d, e), tensor_bytes(T * k * d, e)
    if not spec.traits.supports_sdpa:
        # eager_attention_forward (Gemma-2): repeat_kv copies of K and V [b, a, kv, d]; scores [b, a, p, kv]: the
        # masked 16-bit scores, softmax's fp32 input copy and its fp32 output alive together (10 bytes a score)
        scores = b * a * p * kv
        return [(q + 2 * tensor_bytes(b * a * kv * d, e) + tensor_bytes(scores, e) + 2 * tensor_bytes(scores, 4), False)]
    moments = []
    # rotary on q (q·cos, rotate_half(q)·sin, their sum) while k and v live: before the update
    moments.append((4 * q + 2 * kd, True))
    if spec.qk_norm:  # Qwen3 q_norm: the projection, its fp32 copy and the fp32 normalised q (before the update)
        moments.append((q + 2 * tensor_bytes(T * a * d, 4), True))
    # the update: q_embed, k_embed and v (or the fused qkv storage) alive while torch.cat writes the cache
    moments.append((cache_update_bytes(spec, T, e), False))
    if shape.padded or (spec.sliding_window and p > 1 and kv >= spec.sliding_window):
        # a 4-D mask reaches SDPA: transformers repeats K and V to every head (no enable_gqa with a mask) and the
        # memory-efficient kernel takes an additive bias: logical_not of the bool mask, zeros, masked_fill (16-bit)
        # (one query token: sdpa_attention_forward's pack_gqa folds the heads onto the KV heads instead)
        repeat = 2 * tensor_bytes(b * a * kv * d, e) if a != k and p > 1 else 0
        moments.append((q + repeat + tensor_bytes(b * p * kv, 1) + 2 * tensor_bytes(b * p * kv, e), False))
    else:
        moments.append((2 * q + tensor_bytes(b * a * p, 4), False))  # flash: q_embed, output, logsumexp
    return moments


def _round32(n: int) -> int:
    return -(-n // 32) * 32


def forward_moments(spec: ModelSpec, shape: ForwardShape, sequence_len: int) -> list[tuple[int, bool]]:
    """(activation bytes, before the layer's cache update) of each candidate moment of the costliest layer: the
    resident tensors plus an attention moment, or the residual, normed input and the MLP's peak (dense or MoE)."""
    e, T, h = shape.element_bytes, shape.tokens, spec.hidden_size
    resident = resident_bytes(spec, shape, sequence_len)
    normed = tensor_bytes(T * h, e)
    moments = [(resident + normed + size, before) for size, before in attention_moments(spec, shape)]
    kinds = ([False] if spec.num_dense_layers else []) + ([True] if spec.num_moe_layers else [])
    mlp = max(mlp_bytes(spec, shape, kind) for kind in kinds)
    moments.append((resident + 2 * tensor_bytes(T * h, e) + mlp, False))  # residual R and normed N
    return moments


def prefill_logits_bytes(spec: ModelSpec, batch: int, element_bytes: int = 2) -> int:
    """``generate`` asks for the last position's logits only (``logits_to_keep=1``): [b, 1, V] in the compute dtype,
    and the sampler's fp32 copy [b, V] (``next_token_logits``)."""
    return tensor_bytes(batch * spec.vocab_size, element_bytes) + tensor_bytes(batch * spec.vocab_size, 4)


def decode_logits_bytes(spec: ModelSpec, batch: int, sequence_len: int, at_head: bool = False, element_bytes: int = 2) -> int:
    """During a decode forward the previous step's fp32 ``next_token_logits`` [b, V] is still referenced, with the
    grown int64 [b, n] ``input_ids`` and ``attention_mask`` (``torch.cat`` each step) and four 512-byte scalars (the
    stop flags, argmax). ``at_head``: the moment after lm_head, which adds this step's [b, 1, V] logits and their
    fp32 copy."""
    out = tensor_bytes(batch * spec.vocab_size, 4) + 3 * tensor_bytes(batch * sequence_len, 8) + 4 * 512
    if at_head:
        out += tensor_bytes(batch * spec.vocab_size, element_bytes) + tensor_bytes(batch * spec.vocab_size, 4)
    return out
