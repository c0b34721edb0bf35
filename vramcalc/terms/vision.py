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
from .. import facts


def _adapter_bits(resolved) -> int:
    """The adapters' element bits as peft casts them (``facts.adapter_bits``)."""
    setup = resolved.setup
    return facts.adapter_bits(setup.method, setup.precision, setup.adapter_dtype)

_F32 = 4
_INDEX = 8  # int64 position ids
_EFFICIENT_ROWS = 32  # the memory-efficient kernel pads logsumexp's rows to a multiple of 32


def _matches(module: str, targets: tuple[str, ...]) -> bool:
    """peft ``check_target_module_exists`` for a list: the module path ends with ``.target`` (or is it)."""
    return any(module == t or module.endswith("." + t) or t.endswith("." + module) for t in targets)


def adapted_modules(vision: VisionSpec, mode: Vision | None, lora_targets: tuple[str, ...],
                    lora_modules: tuple[str, ...]) -> tuple[str, ...]:
    """The tower's and projector's nn.Linear names LoRA adapts under ``--vision lora``: every one for
    ``all-linear``, else those the language model's target names match by suffix."""
    if mode is not Vision.LORA:
        return ()
    names = vision.linear_names()
    if lora_targets == ("all-linear",):
        return names
    return tuple(name for name in names if _matches(name, lora_modules))


@functools.lru_cache(maxsize=1024)
def vision_stored_tensors(vision: VisionSpec, mode: Vision | None, param_bits: int, adapted: tuple[str, ...],
                          lora_rank: int, adapter_bits: int) -> tuple[StoredTensor, ...]:
    """The tower's and projector's parameters in the parameter dtype (trainable under ``--vision full``) and, under
    ``--vision lora``, A [r, in] and B [out, r] per adapted Linear (peft). Kinds: ``norm`` for the LayerNorms and
    Gemma-3's RMSNorm (Trainer gives them no weight decay), ``vision`` for the rest; scope ``vision``."""
    full = mode is Vision.FULL
    out = []
    for t in vision.tensors:
        kind = "norm" if "norm" in t.name.rsplit(".", 1)[0].rsplit(".", 1)[-1] else "vision"
        out.append(StoredTensor(f"vision.{t.name}", kind, t.shape, t.count, param_bits, full, scope="vision"))
    for t in vision.tensors:
        if t.module in adapted and t.name.endswith(".weight"):
            out.append(StoredTensor(f"vision.{t.name}.lora_A", "adapter", (lora_rank, t.in_features), t.count,
                                    adapter_bits, True, scope="vision"))
            out.append(StoredTensor(f"vision.{t.name}.lora_B", "adapter", (t.out_features, lora_rank), t.count,
                                    adapter_bits, True, scope="vision"))
    return tuple(out)


@dataclass(frozen=True)
class VisionSaved:
    """Bytes the tower's forward saves for backward, for all its tiles: ``layers`` (the encoder layers) and ``outer``
    (embeddings, post_layernorm, projector)."""

    layers: int
    outer: int
    recompute: int = 0  # under checkpointing: the largest layer's saved tensors, rebuilt in its backward

    @property
    def total(self) -> int:
        return self.layers + self.outer


@functools.lru_cache(maxsize=1024)
def vision_saved(vision: VisionSpec, mode: Vision | None, tiles: int, c: int, adapted: tuple[str, ...],
                 lora_rank: int, adapter_bytes: int, lora_dropout: bool, autocast: bool = False,
                 grad_ckpt: bool = False, input_grad: bool = False) -> VisionSaved:
    """What the tower's forward saves for ``tiles`` tiles (module docstring); 0 when frozen or without images.
    ``c``: bytes of the parameter dtype (the residual stream); ``autocast``: the step runs under 16-bit autocast
    (``--precision bf16``/``fp16``, Trainer's bf16/fp16=True): CUDA autocast runs ``layer_norm`` in fp32 (its input
    cast to fp32 and saved, its weight and bias cast and saved, an fp32 output), so every Linear reading a LayerNorm
    output casts it to 16 bits on its own (a private copy each, saved when the Linear trains), and LoRA's A casts its
    input to 16 bits (the text model's rule, ``activations._LayerWalk._lora``). ``grad_ckpt``: every encoder layer is
    a ``GradientCheckpointingLayer`` that transformers' ``gradient_checkpointing_enable`` checkpoints (non-reentrant):
    each keeps its input (c·H_v per token) and rebuilds its saved tensors in its own backward (``recompute``).
    ``input_grad``: the first layer's input needs a gradient whatever trains (mllama under checkpointing:
    ``terms/vision_mllama.py``); only the encoder layers' part (``layers``) is meant then."""
    if (mode is None or mode is Vision.FROZEN and not input_grad) or tiles == 0:
        return VisionSaved(0, 0)
    full = mode is Vision.FULL
    H, I, A, n = vision.hidden_size, vision.intermediate_size, vision.num_heads, vision.patches
    kernel_flash = c == 2 and vision.head_dim <= SDPA_FLASH_MAX_HEAD_DIM
    lse_rows = n if kernel_flash else -(-n // _EFFICIENT_ROWS) * _EFFICIENT_ROWS
    norm_in = _F32 if autocast else c  # bytes of a LayerNorm's saved input
    norm_out = _F32 if autocast else c  # bytes of its output
    per_layer = 0  # bytes per layer (not per token): autocast's fp32 copies of LayerNorm weights and biases

    def linear(name: str, width: int, x_bytes: int, x_saved: bool, x_grad: bool = True) -> tuple[int, bool]:
        """(bytes per token, whether the shared input is now saved) of one Linear reading ``x_bytes`` elements;
        ``x_grad``: its input needs a gradient (dropout then saves its mask)."""
        out = 0
        if full:
            if autocast and x_bytes != c:
                out += c * width  # autocast's private 16-bit copy, saved by the trained Linear
            elif not x_saved:
                out, x_saved = out + x_bytes * width, True
        if name in adapted:
            if lora_dropout and x_grad:
                out += width  # native_dropout's 1-byte mask
            if autocast and adapter_bytes != c:
                out += c * width  # A's autocast copy of its input (peft's cast and the dropout output are transient)
            elif lora_dropout or adapter_bytes != x_bytes:
                out += adapter_bytes * width  # dropout's output or peft's x.to(adapter dtype), saved by A
            elif not x_saved:
                out, x_saved = out + x_bytes * width, True
            out += (c if autocast else adapter_bytes) * lora_rank  # A's output, saved by B
        return out, x_saved

    def layer_norm() -> int:
        nonlocal per_layer
        if autocast:
            per_layer += 2 * _F32 * H  # the fp32 weight and bias native_layer_norm saves
        return norm_in * H + 2 * _F32  # input, mean, rstd

    per_token = 0
    layer_tokens = []  # per token, what each layer saves
    x_grad = input_grad  # the layer input needs a gradient (the conv is frozen outside full training)
    for _ in range(vision.num_layers):
        layer_tokens.append(per_token)
        if full or x_grad:
            per_token += layer_norm()
        x_saved = False
        for name in ("q_proj", "k_proj", "v_proj"):
            saved, x_saved = linear(name, H, norm_out, x_saved, full or x_grad)
            per_token += saved
        qkv_grad = full or x_grad or any(name in adapted for name in ("q_proj", "k_proj", "v_proj"))
        if qkv_grad:
            per_token += 4 * c * H + _F32 * A * lse_rows // n  # q, k, v, out, logsumexp
        per_token += linear("out_proj", H, c, False, qkv_grad)[0]  # the contiguous attention output
        h1_grad = qkv_grad or "out_proj" in adapted
        if full or h1_grad:
            per_token += layer_norm()  # layer_norm2
        per_token += linear("fc1", H, norm_out, False, full or h1_grad)[0]
        f1_grad = full or h1_grad or "fc1" in adapted
        if f1_grad:
            per_token += c * I  # gelu's input
        per_token += linear("fc2", I, c, False, f1_grad)[0]  # gelu's output
        x_grad = f1_grad or "fc2" in adapted
    layer_tokens = [end - start for start, end in zip(layer_tokens, layer_tokens[1:] + [per_token])]
    seeds = SEED_OFFSET_BYTES if qkv_grad and kernel_flash else 0
    layer_bytes = tiles * n * per_token + per_layer + vision.num_layers * seeds
    recompute = 0
    if grad_ckpt:
        recompute = tiles * n * max(layer_tokens) + per_layer // vision.num_layers + seeds
        layer_bytes = tiles * n * c * H * vision.num_layers  # each layer's input
    # once per tile: embeddings, post_layernorm, projector
    outer = 0
    if full:
        outer += c * vision.num_channels * vision.image_size ** 2 + _INDEX * n  # conv input, position ids
    grad = full or x_grad
    if grad:
        outer += n * (norm_in * H + 2 * _F32)  # post_layernorm (its fp32 weight copies are per step, below)
    tokens = vision.tokens_per_tile
    if vision.mm_tokens_per_image:  # Gemma3MultiModalProjector on the post_layernorm output
        if grad:
            outer += n * norm_out * H  # the contiguous copy avg_pool2d saves
            outer += tokens * (_F32 * H + _F32 + (_F32 * H if full else 0))  # RMSNorm: fp32 x, rsqrt, y for (1 + w)
            outer += tokens * c * H if full else 0  # the matmul's 16-bit input
    else:
        proj = "modality_projection.proj"  # on the pixel-shuffled copy of the post_layernorm output
        outer += tokens * linear(proj, vision.projector_in, norm_out, False, grad)[0]
    extra = 2 * _F32 * H if autocast and grad else 0  # post_layernorm's fp32 weight and bias
    return VisionSaved(layer_bytes, tiles * outer + extra, recompute)


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
    if grad_ckpt or first_layer_needs_grad(layer.method):
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
