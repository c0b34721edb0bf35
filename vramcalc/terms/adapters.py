"""LoRA outside the decoder layers: on ``lm_head`` and on ``embed_tokens`` (peft supports both; issue 11).

Parameters are in ``parameters.head_adapter_tensors``; this module gives what they save for backward and their
backward transients. Symbols as in ``activations``: T tokens, h hidden, V vocab, r rank, c compute bytes, x the
final norm's output (``max(norm_out, r)`` bytes per element).

- lm_head (peft ``tuners/lora/layer.py::Linear.forward`` around the frozen lm_head): ``x`` is cast to the adapter
  dtype, then ``lora_B(lora_A(dropout(x))) * scaling`` is added to the [T, V] logits. Saved: lora_A's input by the
  decoder rule (``activations._LayerWalk.linears`` for a LoRA'd frozen Linear: autocast's c·h copy for fp32
  adapters under autocast, the dropout output and its mask with dropout, else x itself, which no one else saves
  here: x·h) and lora_A's output [T, r]. Backward of ``* scaling`` makes a new [T, V] gradient
  (c·T·V) beside the logits' gradient while lm_head's backward runs.
- embed_tokens (peft ``tuners/lora/layer.py::Embedding.forward``): ``after_A = F.embedding(ids, lora_embedding_A.T)``
  [T, r], ``(after_A @ lora_embedding_B.T) * scaling`` added to the embedding output. The matmul saves after_A (its
  autocast copy, c·T·r, or after_A itself at adapter bytes without autocast) and autocast's copy of
  lora_embedding_B (a weight copy, ``temporaries.weight_copy_bytes``); F.embedding saves only the ids. The embedding
  output now requires grad, so without checkpointing the first decoder layer saves what every other layer saves
  (``activations.first_layer_needs_grad`` is false for LoRA).
"""

from __future__ import annotations

import functools

from ..model import ModelSpec
from .activations import LayerSetup, LinearUse, Saved, _LayerWalk, first_layer_needs_grad, layer_saved

HEAD = "lm_head"
EMBEDDING = "embed_tokens"


@functools.lru_cache(maxsize=4096)
def head_lora_saved(model: ModelSpec, layer: LayerSetup) -> Saved:
    """Saved by a LoRA on lm_head (0 without one): lora_A's input and output, per token."""
    if HEAD not in layer.lora_modules:
        return Saved()
    walk = _LayerWalk(model, layer, masked=False)
    dt = layer.dtypes
    walk.linears([LinearUse(HEAD, model.hidden_size, False, True, False)], max(dt.norm_out, dt.r))
    return walk.result()


@functools.lru_cache(maxsize=4096)
def embedding_lora_saved(model: ModelSpec, layer: LayerSetup, grad_ckpt: bool, masked: bool = False) -> Saved:
    """Saved by a LoRA on embed_tokens (0 without one): the matmul's copy of ``after_A`` and, without checkpointing,
    the first layer's tensors that exist only because its input now requires grad."""
    if EMBEDDING not in layer.lora_modules:
        return Saved()
    dt = layer.dtypes
    saved = Saved(per_token=(dt.c if dt.autocast else dt.adapter) * layer.lora_rank)
    if not grad_ckpt and not first_layer_needs_grad(layer.method, layer.modules_to_save):
        moe = model.is_moe_layer(0)
        grad, no_grad = layer_saved(model, layer, moe, masked, True), layer_saved(model, layer, moe, masked, False)
        saved += grad + no_grad * -1
    return saved


def head_lora_backward_bytes(model: ModelSpec, layer: LayerSetup, tokens):
    """lm_head's backward with a LoRA on it: ``* scaling``'s [T, V] gradient beside the logits' gradient."""
    if HEAD not in layer.lora_modules:
        return 0
    return layer.dtypes.c * tokens * model.vocab_size


def head_input_shared(layer: LayerSetup) -> bool:
    """Does a LoRA on lm_head save the final norm's output itself (a held 4-bit lm_head input then costs nothing
    more)? Only a 16-bit adapter of the input's dtype without dropout reads x unchanged and without autocast copy."""
    if HEAD not in layer.lora_modules or layer.lora_dropout > 0:
        return False
    dt = layer.dtypes
    return dt.adapter == max(dt.norm_out, dt.r) and not (dt.autocast and dt.adapter != dt.c)
