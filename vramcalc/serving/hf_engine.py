"""transformers ``generate`` memory: the tensor terms of the prefill and of the last decode step, as the serving trace
records them (``serving/trace.py``). Weights come from ``serving/weights.py``; the cache from ``kv_cache.py``;
transients from ``activations.py``.

Moments (transformers 5.x ``generation/utils.py`` ``_sample``):
- prefill: one forward over b prompts of p tokens; the peak sits in the last decoder layer, every layer's cache
  written (``hf_cache_bytes`` after a forward of p tokens); lm_head then runs on the last position only.
- decode: the last one-token forward, with n = prompt + generated - 1 tokens in the cache after its update.
  ``DynamicLayer.update`` builds ``torch.cat([old, new])`` while the old tensor lives, so one old tensor of the
  largest layer rides on top of the cache at that moment; ``StaticCache`` writes in place (``max_cache_len`` =
  ``max_length - 1``, ``generate`` line "max_cache_length = generation_config.max_length - 1").
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model import ModelSpec
from ..units import round_up
from .activations import (
    GENERATE_INT64_BUFFERS,
    ForwardShape,
    cache_update_bytes,
    tensor_bytes,
    decode_logits_bytes,
    forward_moments,
    prefill_logits_bytes,
    resident_bytes,
)
from .kv_cache import hf_cache_bytes, hf_largest_layer_tensor_bytes, hf_tokens_held, layer_layouts


@dataclass(frozen=True)
class HfMoment:
    kv_cache: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.kv_cache + self.activations + self.logits


def _layer_tensor_bytes(spec: ModelSpec, batch: int, held: int, element_bytes: int) -> int:
    """The cache tensors of the last decoder layer holding ``held`` tokens (missing before its update)."""
    layout = layer_layouts(spec)[-1]
    return sum(round_up(batch * heads * held * width * element_bytes) for heads, width in layout.tensors)


def cache_state_bytes(spec: ModelSpec, static: bool) -> int:
    """Scalar tensors transformers' cache layers keep beside their keys and values, one 512-byte allocation each
    (cache_utils.py, 5.x): ``StaticLayer.cumulative_length = torch.tensor(0)`` in every layer of a StaticCache
    (``StaticLayer.__init__``), ``DynamicSlidingWindowLayer._sliding_window_tensor`` in every sliding layer of a
    DynamicCache (``DynamicSlidingWindowLayer.__init__``, moved to the device at its first update). They live from
    the cache's creation to its end, so every moment of the prefill and of decode holds them. A hybrid's convolution
    layers are ``LinearAttentionLayer`` in both caches, with their own ``cumulative_length_linear = torch.tensor(0)``
    (``LinearAttentionCacheLayerMixin.__init__``) and no ``cumulative_length``: one each either way."""
    layouts = layer_layouts(spec)
    count = len(layouts) if static else sum(1 for layout in layouts
                                            if layout.window is not None or layout.state_elements)
    return count * tensor_bytes(1, 8)


def _with_state(moment: HfMoment, spec: ModelSpec, static: bool) -> HfMoment:
    return HfMoment(moment.kv_cache, moment.activations + cache_state_bytes(spec, static), moment.logits)


def prefill_moment(spec: ModelSpec, batch: int, prompt: int, *, element_bytes: int = 2, static_len: int | None = None,
                   kv_element_bytes: int | None = None) -> HfMoment:
    kv_e = kv_element_bytes or element_bytes
    kv = hf_cache_bytes(spec, batch, prompt, last_input=prompt, element_bytes=kv_e, static_len=static_len)
    attended = static_len if static_len is not None else prompt
    shape = ForwardShape(batch, prompt, attended, element_bytes)
    layout = layer_layouts(spec)[-1]
    held = static_len if static_len is not None else prompt
    if layout.window is not None and static_len is not None:
        held = min(held, layout.window)
    last_layer = _layer_tensor_bytes(spec, batch, held, kv_e)
    moments = [HfMoment(kv - (last_layer if before else 0), size, 0)
               for size, before in forward_moments(spec, shape, prompt)]
    head = resident_bytes(spec, shape, prompt) + tensor_bytes(shape.tokens * spec.hidden_size, element_bytes)
    moments.append(HfMoment(kv, head, prefill_logits_bytes(spec, batch, element_bytes)))
    return _with_state(max(moments, key=lambda moment: moment.total), spec, static_len is not None)


def decode_moment(spec: ModelSpec, batch: int, context: int, *, element_bytes: int = 2, static_len: int | None = None,
                  kv_element_bytes: int | None = None, prompt: int | None = None) -> HfMoment:
    """The peak over decode steps of a generation whose sequences end at ``context`` tokens (prompt + generated):
    the last step (largest cache), or, with sliding layers, the first (the prefill's full-prompt storage still
    held while the first cat allocates)."""
    kv_e = kv_element_bytes or element_bytes
    seen = context - 1  # the last sampled token never enters the cache
    kv = hf_cache_bytes(spec, batch, seen, last_input=1, element_bytes=kv_e, static_len=static_len)
    if static_len is not None:
        attended = static_len
    else:
        windows = [layout.window for layout in layer_layouts(spec)]
        attended = seen if any(w is None for w in windows) else min(seen, max(windows))
    shape = ForwardShape(batch, 1, attended, element_bytes, padded=static_len is not None)
    logits = decode_logits_bytes(spec, batch, seen)
    resident = resident_bytes(spec, shape, seen)
    moments = [HfMoment(kv, size, logits) for size, _ in forward_moments(spec, shape, seen)]
    # after the forward (generate's sampling, generation/utils.py ``_sample``): the decoder's locals (hidden states,
    # cos/sin, masks) are gone; generate's int64 [b, n] bookkeeping, five scalars, this step's logits and their fp32
    # copy beside the previous step's, and the bool [b, n] of the stop check's ``bitwise_and`` remain
    head = (GENERATE_INT64_BUFFERS - 1) * tensor_bytes(batch * seen, 8) + 3 * 512
    moments.append(HfMoment(kv, head, decode_logits_bytes(spec, batch, seen, True, element_bytes)
                            + tensor_bytes(batch * seen, 1)))
    if static_len is None:  # torch.cat keeps the layer's old tensor alive while it builds the new one
        if spec.traits.mla:
            small = resident + 3 * tensor_bytes(batch * spec.num_heads * spec.head_dim, element_bytes)
        else:  # the normed input [b, h] and the tensors alive at the update (activations.cache_update_bytes)
            small = resident + tensor_bytes(batch * spec.hidden_size, element_bytes) + cache_update_bytes(
                spec, batch, element_bytes)
        old = hf_largest_layer_tensor_bytes(spec, batch, seen - 1, kv_e)
        moments.append(HfMoment(kv + old, small, logits))
        if prompt is not None and spec.sliding_window and prompt + 1 < context:
            moments += _first_step_moments(spec, batch, prompt, element_bytes, kv_e, small)
    return _with_state(max(moments, key=lambda moment: moment.total), spec, static_len is not None)


def _first_step_moments(spec: ModelSpec, batch: int, prompt: int, element_bytes: int, kv_e: int,
                        small: int) -> list[HfMoment]:
    """The first decode step of a model with sliding layers: layers not yet updated still hold the prefill's
    full-prompt storage (``DynamicSlidingWindowLayer`` keeps a view of the prompt's cat until the next update).
    Two moments: the first sliding layer's cat (both its new tensors alive with every prefill storage), and the
    attention of the first full layer (sliding layers before it already cut to the window) or, without full layers,
    of layer 0."""
    layouts = layer_layouts(spec)

    def held_bytes(layout, held):
        return sum(round_up(batch * heads * held * width * kv_e) for heads, width in layout.tensors)

    after_prefill = [held_bytes(layout, prompt) for layout in layouts]
    after_first = [held_bytes(layout, hf_tokens_held(layout, prompt + 1, last_input=1)) for layout in layouts]
    logits = decode_logits_bytes(spec, batch, prompt)
    moments = []
    # at layer 0 the decoder loop has no previous layer output yet: its input is inputs_embeds itself
    first_layer = tensor_bytes(batch * spec.hidden_size, element_bytes)
    sliding = [i for i, layout in enumerate(layouts) if layout.window is not None]
    if sliding:
        moments.append(HfMoment(sum(after_prefill) + after_first[sliding[0]],
                                small - (first_layer if sliding[0] == 0 else 0), logits))
    full = [i for i, layout in enumerate(layouts) if layout.window is None]
    f = full[0] if full else 0
    kv = sum(after_first[: f + 1]) + sum(after_prefill[f + 1:])
    attended = hf_tokens_held(layouts[f], prompt + 1, last_input=1)
    shape = ForwardShape(batch, 1, attended, element_bytes)
    busiest = max(size for size, _ in forward_moments(spec, shape, prompt + 1)) - (first_layer if f == 0 else 0)
    moments.append(HfMoment(kv, busiest, logits))
    return moments
