"""The vision tower of a vision-language model: its stored tensors, what its forward saves, and its moments.

The tower (``vision.VisionSpec``) encodes ``T = batch_size x images x tiles`` tiles of N patches before the language
model runs; its image features replace the image tokens of the sequence (``masked_scatter``), which ``seq_len``
already counts (``vision.resolve_images``). So the language model's terms are the text model's at ``seq_len``, and
the tower adds: its weights (frozen or not), its gradients, optimizer states and adapters as ``--vision`` trains them,
and the tensors its forward saves for backward (``vision_activations_bytes``), alive from the end of its forward
(before the language model's) until its own backward, which runs after the language model's decoder layers and before
the text embedding's (the tower's autograd nodes are newer than ``embed_tokens``': ``SmolVLMModel.forward`` embeds
the text first, L555-557).

``--vision`` (peft 0.21.2, transformers 5.25):
- ``frozen``: nothing in the tower or projector trains; its forward saves nothing (no input or weight needs a
  gradient) and its output reaches ``masked_scatter`` as a constant.
- ``lora``: the LoRA target names also match the tower's nn.Linear modules (peft matches a target name against the
  end of each module path, ``check_target_module_exists``; ``all-linear`` takes every nn.Linear but lm_head,
  ``tuners_utils.py`` L2430-2490, so q_proj and v_proj, the default, adapt SigLIP's q_proj and v_proj too).
- ``full``: every tower and projector parameter trains (Trainer trains every parameter with ``requires_grad``).

Saved tensors of one SigLIP encoder layer (``SmolVLMEncoderLayer``, ``SiglipEncoderLayer``), per patch token; c
bytes of the parameter dtype (no autocast: ``resolve_images`` refuses mixed precision), a the adapter's bytes:
- ``layer_norm1``/``layer_norm2`` (``native_layer_norm``): its input (c·H_v) and fp32 mean and rstd (4 + 4) when the
  input needs a gradient or the norm trains;
- q/k/v/out_proj, fc1, fc2: a trained Linear saves its input (the LayerNorm output once for q, k, v); a frozen one
  nothing; LoRA saves ``x.to(a)`` per adapted module (a new tensor when a != c; else the input itself), A's output
  [r] (a·r), and with dropout its 1-byte mask and output (peft ``lora/layer.py::Linear.forward``);
- SDPA (flash for 16-bit, memory-efficient for fp32; no mask: the tower attends every patch): q, k, v, out (4·c·H_v)
  and fp32 logsumexp [A_v] (rows padded to 32 by the memory-efficient kernel), plus flash's philox seed and offset;
- the attention output's ``transpose(1, 2).contiguous()`` copy, saved by out_proj when it trains (c·H_v);
- ``gelu_pytorch_tanh`` saves its input, fc1's output (c·I_v), when it needs a gradient.
Once per tile: the conv's input (``pixel_values.to(dtype)``, c·C·P²) and the position ids (int64 [N]) when the
embeddings train; ``post_layernorm`` as above; the connector's pixel-shuffled copy (c·H_v per patch) when its proj
trains (or its LoRA copy); Gemma-3's projector: the contiguous [H_v, P/p, P/p] copy saved by ``avg_pool2d``, the
fp32 RMSNorm input, rsqrt and normalised output, and the matmul's input when it trains (modeling_gemma3.py L652-668).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..options import Method, Vision
from ..vision import VisionSpec, tiles_per_sample
from ..vision_qwen import QWEN_FAMILIES
from .activations import SDPA_FLASH_MAX_HEAD_DIM, SEED_OFFSET_BYTES
from .stored_tensor import StoredTensor
from .vision_encoder import (  # noqa: F401 (re-exported)
    _F32, _INDEX, VisionSaved, _adapter_bits, _matches, adapted_modules, vision_saved, vision_stored_tensors)


def image_details(vision: VisionSpec, setup, saved: VisionSaved) -> dict:
    """The figures ``details`` shows for a VLM: image tokens per sample in the language model's sequence, tiles the
    tower encodes per step, the tower's parameters and its saved activations (part of the ``activations`` term)."""
    from ..vision import image_tokens_per_sample

    return {"image_tokens_per_sample": image_tokens_per_sample(vision, setup),
            "vision_tiles_per_step": setup.batch_size * tiles_per_sample(vision, setup),
            "vision_params": vision.params, "vision_activations_bytes": saved.total}


def setup_vision_saved(vision: VisionSpec, setup, lora_modules: tuple[str, ...], adapter_bits: int) -> VisionSaved:
    """``vision_saved`` for a training setup."""
    adapted = adapted_modules(vision, setup.vision, setup.lora_targets, lora_modules)
    if vision.family in QWEN_FAMILIES:  # Qwen2.5-VL's tower (terms/vision_qwen.py)
        from .vision_qwen import qwen_setup_saved

        return qwen_setup_saved(vision, setup, adapted, adapter_bits // 8)
    tiles = setup.batch_size * tiles_per_sample(vision, setup)
    return vision_saved(vision, setup.vision, tiles, setup.precision.param_dtype.bits // 8, adapted,
                        setup.lora_rank if setup.method is Method.LORA else 0, adapter_bits // 8,
                        setup.lora_dropout > 0, setup.precision.autocast, bool(setup.grad_ckpt))


def vision_moments(moments: list, saved: int, vision_grads: int, embedding_grads: int, phases, moment_type,
                   recompute: int = 0) -> list:
    """The language model's moments with the tower's saved activations added where they are alive (forward, the
    loss's and the decoder layers' backward), and one moment for the tower's own backward: every language-model
    gradient but the embedding's, the tower's saved tensors about to be released (its gradients grow as they go:
    the larger end is taken, each alone). The tower's weights, gradients and optimizer states are already in the
    stored tensors (``parameters.stored_tensors``)."""
    if not saved:
        return moments
    forward, backward_start, backward, backward_end = phases
    out = []
    before_tower = None
    for m in moments:
        if m.phase in (forward, backward_start, backward):
            m = m._replace(activations=m.activations + saved)
            if m.phase is backward:
                before_tower = m if before_tower is None or m.gradients >= before_tower.gradients else before_tower
        out.append(m)
    if before_tower is not None:
        end = next((m for m in moments if m.phase is backward_end), None)
        if end is not None:
            lm_grads = end.gradients - vision_grads - embedding_grads
            out.append(moment_type(backward_end, end.weights, lm_grads, end.optimizer_states, saved + recompute,
                                   end.logits, 0))
    return out


def stored(model, resolved) -> tuple[StoredTensor, ...]:
    """``vision_stored_tensors`` for a resolved setup (the language model's parameter dtype; adapters as peft casts
    them)."""

    setup = resolved.setup
    vision = model.vision
    if vision.family == "mllama":  # the tiled tower and the cross-attention layers (terms/vision_mllama.py)
        from . import vision_mllama

        return vision_mllama.stored(model, resolved)
    adapted = adapted_modules(vision, setup.vision, setup.lora_targets, resolved.lora_modules)
    bits = _adapter_bits(resolved) if adapted else 0
    return vision_stored_tensors(vision, setup.vision, setup.precision.param_dtype.bits, adapted,
                                 setup.lora_rank if adapted else 0, bits)


def pixel_values_bytes(vision: VisionSpec, tiles: int) -> int:
    """The batch's ``pixel_values``: fp32, as image processors return them (``BaseImageProcessor`` rescales and
    normalises to float32), held through the step: 4·C·P² per tile."""
    return tiles * _F32 * vision.num_channels * vision.image_size ** 2


def language_input_grad_bytes(model, layer, b, s, masked: bool, grad_ckpt) -> int:
    """What the language model's first decoder layer saves beyond the text model's when its input needs a gradient:
    the tower's features reach ``inputs_embeds`` through ``masked_scatter`` (which saves its [b, s, 1] boolean mask),
    and they need a gradient whenever anything in the tower trains; under LoRA the text embedding's output does not
    (``activations.first_layer_needs_grad``). Under checkpointing the layer keeps its input either way."""
    from .activations import first_layer_needs_grad, layer_masks, layer_saved

    extra = b * s  # masked_scatter's mask
    if grad_ckpt or first_layer_needs_grad(layer.method, layer.modules_to_save):
        return extra
    first = layer_masks(model, masked)[0]
    moe = model.is_moe_layer(0)
    return extra + (layer_saved(model, layer, moe, first, True).bytes(b, s)
                    - layer_saved(model, layer, moe, first, False).bytes(b, s))


def moments_for(model, resolved, tensors, moments: list, moment_type, layer=None, b=0, s=0,
                masked: bool = False) -> list:
    """``vision_moments`` for a resolved setup: ``tensors`` are the step's stored tensors (the tower's included);
    ``layer``, ``b``, ``s``, ``masked``: the language model's ``LayerSetup``, batch shape and mask decision."""
    from ..options import Phase
    from ..units import round_up

    setup = resolved.setup
    if model.vision.family == "mllama":  # terms/vision_mllama.py
        from . import vision_mllama

        return vision_mllama.moments_for(model, resolved, tensors, moments, moment_type, layer, b, s)
    saved = setup_vision_saved(model.vision, setup, resolved.lora_modules, _adapter_bits(resolved))
    if layer is not None:
        batch = pixel_values_bytes(model.vision, setup.batch_size * tiles_per_sample(model.vision, setup))
        if model.vision.family in QWEN_FAMILIES:
            from .vision_qwen import qwen_pixel_values_bytes

            batch = qwen_pixel_values_bytes(model.vision, setup)
        grad_in = language_input_grad_bytes(model, layer, b, s, masked, setup.grad_ckpt) if saved.total else 0
        saved = VisionSaved(saved.layers, saved.outer + batch + grad_in, saved.recompute)
    vision_grads = sum(round_up(t.numel * t.bits // 8) * t.count for t in tensors if t.trainable
                       and t.scope == "vision")
    embedding_grads = sum(round_up(t.numel * t.bits // 8) * t.count for t in tensors if t.trainable
                          and t.kind == "embedding")
    return vision_moments(moments, saved.total, vision_grads, embedding_grads,
                          (Phase.FORWARD, Phase.BACKWARD_START, Phase.BACKWARD, Phase.BACKWARD_END), moment_type,
                          saved.recompute)


def details_for(model, resolved) -> dict:
    """``image_details`` for a resolved setup."""

    setup = resolved.setup
    if model.vision.family == "mllama":  # terms/vision_mllama.py
        from . import vision_mllama

        return vision_mllama.details_for(model, resolved)
    saved = setup_vision_saved(model.vision, setup, resolved.lora_modules, _adapter_bits(resolved))
    return image_details(model.vision, setup, saved)
