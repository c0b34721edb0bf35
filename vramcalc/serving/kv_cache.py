"""KV-cache bytes per family, exact to the storage.

Per layer and per token a cache holds (e = bytes per element, 2 for bf16/fp16, 1 for an fp8 cache):
- multi-head / grouped-query / multi-query attention (llama, mistral, mixtral, qwen2, qwen3, qwen3_moe, gemma, gemma2,
  phi, phi3, gpt_neox; partial rotary and fused qkv projections change nothing in the cache):
  keys and values of the ``num_key_value_heads`` heads: 2 · k · d · e
  (transformers ``cache_utils.DynamicLayer``/``StaticLayer``: keys ``[b, k, t, d]`` and values ``[b, k, t, d]``);
- DeepSeek-V3 multi-head latent attention: the compressed latent and the shared rope key, one "head" each:
  (kv_lora_rank + qk_rope_head_dim) · e (transformers 5.x ``DeepseekV3Attention.forward`` calls ``cache.update(kv_nope
  [b, 1, t, kv_lora_rank], k_rot [b, 1, t, qk_rope_head_dim])`` before ``expand_kv``; vLLM's MLA backends cache the same
  576 values per token for DeepSeek-V3: 512 + 64, DeepSeek-V2 paper section 2.1.2).
Which layers slide: Gemma-2 alternates, sliding on even layer indices (``Gemma2Config.layer_types``: layer i slides
when (i + 1) % 2); Mistral, Mixtral and Phi-3 slide on every layer when the config sets ``sliding_window`` (e.g.
Phi-3-mini's 2047; Mistral-7B-v0.3 sets none). Qwen2/Qwen3 configs ship ``use_sliding_window: false``.
A model whose config lists ``layer_types`` (Gemma-3 ``gemma3_text``, Cohere2, gpt-oss, Llama-4) slides on the layers
marked "sliding_attention" or "chunked_attention": ``DynamicCache`` and ``StaticCache`` give both a sliding-window
layer (``cache_utils.py`` L1527-1528, L1544-1545), of ``sliding_window`` tokens, or ``attention_chunk_size`` for a
chunked layer (``get_layer_types_and_kwargs``, L2050-2055; vramcalc keeps Llama-4's chunk in ``sliding_window``).
A hybrid's convolution layers (LFM2's ``layer_types`` "conv") hold no keys and values but a conv state
(``LinearAttentionLayer.lazy_initialization``, cache_utils.py L1241-1249: zeros of ``[b, h, conv_L_cache]`` in the
convolution input's dtype, made at the prefill, overwritten in place after; ``Lfm2ShortConv`` passes
``conv_kernel_size = conv_L_cache``, modeling_lfm2.py L360-362), the same in a DynamicCache and a StaticCache
(both map "conv" to ``LinearAttentionLayer``, L1532, L1548): ``h · conv_L_cache`` elements per sequence, whatever the
context. Mamba and gated-delta-net recurrent states are not modelled (no such family).

Tokens a layer holds in transformers' caches (``cache_utils.py``, 5.x):
- ``DynamicLayer``: every token seen (``torch.cat`` each step);
- ``DynamicSlidingWindowLayer``: keeps the view ``full[:, :, -(w-1):]`` of ``cat(old, new)``, so its storage holds
  every token of the last forward's input plus the ``min(seen_before, w-1)`` kept: after a prefill of P tokens, P;
  after a decode step with n tokens seen, ``min(n, w)``;
- ``StaticLayer``: ``max_cache_len`` slots, zeros at the first update; ``StaticSlidingWindowLayer``: ``min(max_cache_len, w)``.
Every tensor is its own allocation, rounded up to the CUDA allocator's 512 bytes (``units.round_up``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model import ModelSpec
from ..units import round_up


@dataclass(frozen=True)
class CacheLayout:
    """What one layer of a model caches per token: tensors as (heads, width) pairs, and the sliding window."""

    tensors: tuple[tuple[int, int], ...]  # ((heads, width), ...): (k, d), (k, d) for K and V; (1, r), (1, rope) for MLA
    window: int | None  # tokens attended by a sliding layer; None for full attention
    state_elements: int = 0  # elements per sequence, whatever the context: a convolution layer's conv state h·K

    def elements_per_token(self) -> int:
        return sum(heads * width for heads, width in self.tensors)


def layer_is_sliding(spec: ModelSpec, index: int) -> bool:
    """Whether decoder layer ``index`` attends within ``spec.sliding_window`` (``ModelSpec.layer_slides``)."""
    return spec.layer_slides[index]


def layer_layouts(spec: ModelSpec, tp: int = 1) -> tuple[CacheLayout, ...]:
    """One CacheLayout per decoder layer. Under tensor parallelism each GPU holds ``max(1, k // tp)`` KV heads
    (vLLM replicates a head when tp exceeds the KV heads); the MLA latent is not split by heads and is replicated."""
    if spec.traits.mla:
        tensors = ((1, spec.kv_lora_rank), (1, spec.qk_rope_head_dim))
    else:
        heads = max(1, spec.num_kv_heads // tp)
        tensors = ((heads, spec.head_dim), (heads, spec.head_dim))
    conv = CacheLayout((), None, state_elements=spec.hidden_size * spec.conv_kernel)  # not split under tp
    return tuple(conv if spec.layer_is_conv[i] else
                 CacheLayout(tensors, spec.sliding_window if layer_is_sliding(spec, i) else None)
                 for i in range(spec.num_layers))


def state_bytes_per_sequence(spec: ModelSpec, element_bytes: int = 2, tp: int = 1) -> int:
    """Bytes of a hybrid's conv states per sequence, every convolution layer together, whatever the context (module
    docstring); 0 for a model whose every layer attends. LFM2-1.2B, bf16: 10 layers · 2048 · 3 · 2 = 122,880 B."""
    return sum(layout.state_elements for layout in layer_layouts(spec, tp)) * element_bytes


def kv_bytes_per_token(spec: ModelSpec, element_bytes: int = 2, tp: int = 1) -> int:
    """Bytes one token adds to the cache of every full-attention layer together, and to every sliding layer while
    the window is not full: sum over layers of the per-layer elements times ``element_bytes``.

    Llama-3.1-8B (config.json: 32 layers, 8 KV heads, head_dim 128), bf16: 2 · 32 · 8 · 128 · 2 = 131,072 B.
    """
    return sum(layout.elements_per_token() for layout in layer_layouts(spec, tp)) * element_bytes


def hf_tokens_held(layout: CacheLayout, tokens_seen: int, *, last_input: int, static_len: int | None = None) -> int:
    """Tokens in a transformers cache layer's storage after a forward (module docstring).

    ``tokens_seen``: tokens in the sequence so far, this forward's included; ``last_input``: tokens this forward fed
    (the prompt length for the prefill, 1 for a decode step); ``static_len``: StaticCache's ``max_cache_len``.
    """
    w = layout.window
    if static_len is not None:
        return static_len if w is None else min(static_len, w)
    if w is None:
        return tokens_seen
    before = tokens_seen - last_input
    return min(before, w - 1) + last_input


def hf_cache_bytes(spec: ModelSpec, batch_size: int, tokens_seen: int, *, last_input: int, element_bytes: int = 2,
                   static_len: int | None = None) -> int:
    """Storage bytes of a transformers cache (every layer's keys and values) after a forward: each tensor is
    ``[batch, heads, tokens held, width]``, one allocation rounded to 512 bytes."""
    total = 0
    for layout in layer_layouts(spec):
        held = hf_tokens_held(layout, tokens_seen, last_input=last_input, static_len=static_len)
        total += sum(round_up(batch_size * heads * held * width * element_bytes) for heads, width in layout.tensors)
        if layout.state_elements:  # a convolution layer's [b, h, K] conv state
            total += round_up(batch_size * layout.state_elements * element_bytes)
    return total


def hf_largest_layer_tensor_bytes(spec: ModelSpec, batch_size: int, tokens: int, element_bytes: int = 2) -> int:
    """The old cache storage an update keeps alive while ``torch.cat`` builds its successor, for the layer where it
    is largest: ``DynamicLayer`` reassigns ``keys`` before concatenating ``values`` (one old tensor at a time);
    ``DynamicSlidingWindowLayer`` concatenates both before reassigning either (both old tensors)."""
    best = 0
    for layout in layer_layouts(spec):
        held = tokens if layout.window is None else min(tokens, layout.window)
        sizes = [round_up(batch_size * heads * held * width * element_bytes) for heads, width in layout.tensors]
        if sizes:  # (a convolution layer's state is updated in place)
            best = max(best, max(sizes) if layout.window is None else sum(sizes))
    return best


def paged_tokens_per_request(spec: ModelSpec, context: int, block_size: int) -> dict:
    """Tokens a paged engine (vLLM) reserves per request, per layer kind: whole blocks of the context for full
    layers; for sliding layers the window plus one block (vLLM V1 ``SlidingWindowManager`` frees blocks that fall out of
    the window; one partly used block on each side)."""
    blocks = -(-context // block_size)
    out = {"full": blocks * block_size}
    if spec.sliding_window:
        window_blocks = min(blocks, -(-spec.sliding_window // block_size) + 1)
        out["sliding"] = window_blocks * block_size
    return out


def paged_bytes_per_request(spec: ModelSpec, context: int, *, element_bytes: int, block_size: int, tp: int = 1) -> int:
    """KV bytes one request of ``context`` tokens holds in a paged pool (per GPU)."""
    tokens = paged_tokens_per_request(spec, context, block_size)
    total = 0
    for layout in layer_layouts(spec, tp):
        held = tokens["full"] if layout.window is None else tokens["sliding"]
        total += layout.elements_per_token() * held * element_bytes + layout.state_elements * element_bytes
    return total
