"""Llama-3.2-Vision (``mllama``): the stored tensors, saved activations and moments of the parts a Llama language
model does not have (``vision_mllama.MllamaVisionSpec``): the tiled tower, the projector and the cross-attention layers.

What trains (peft 0.21.2, transformers 5.25):
- the tower and projector follow ``--vision`` (``terms/vision.py``'s rules: frozen, lora on the tower's Linears whose
  names the LoRA targets match by suffix, full);
- the cross-attention layers and the 8 extra embedding rows are the language model's: they train under
  ``--method full``; under LoRA the targets adapt their q/k/v/o_proj and gate/up/down_proj as in any decoder layer.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from ..options import Method, Vision
from .stored_tensor import StoredTensor


def _matches(module: str, targets: tuple[str, ...]) -> bool:
    return any(module == t or module.endswith("." + t) or t.endswith("." + module) for t in targets)


def _kind(name: str, part: str) -> str:
    """``embedding`` for the extra embedding rows, ``norm`` for the norms (no weight decay), ``linear`` for the
    cross-attention layers' other tensors (a decoder layer's), ``vision`` for the tower's and projector's."""
    if part == "embedding":
        return "embedding"
    if "norm" in name:
        return "norm"
    return "linear" if part == "cross" else "vision"


@functools.lru_cache(maxsize=256)
def mllama_stored_tensors(vision, mode: Vision | None, method: Method, param_bits: int, all_linear: bool,
                          lora_modules: tuple[str, ...], lora_rank: int, adapter_bits: int) -> tuple[StoredTensor, ...]:
    """Parameters in the parameter dtype (the tower's trainable under ``--vision full``, the language model's parts
    under ``--method full``) and LoRA's A [r, in] and B [out, r] per adapted Linear. Scope ``vision``."""
    out = []
    tower_lora = mode is Vision.LORA
    text_lora = method is Method.LORA
    for t in vision.tensors:
        trains = mode is Vision.FULL if t.part in ("tower", "projector") else method is Method.FULL
        out.append(StoredTensor(f"vision.{t.name}", _kind(t.name, t.part), t.shape, t.count, param_bits,
                                trains, scope="vision"))
    for t in vision.tensors:
        if not t.module or not t.name.endswith(".weight"):
            continue
        lora = text_lora if t.part == "cross" else tower_lora
        if lora and (all_linear or _matches(t.module, lora_modules)):
            out.append(StoredTensor(f"vision.{t.name}.lora_A", "adapter", (lora_rank, t.in_features), t.count,
                                    adapter_bits, True, scope="vision"))
            out.append(StoredTensor(f"vision.{t.name}.lora_B", "adapter", (t.out_features, lora_rank), t.count,
                                    adapter_bits, True, scope="vision"))
    return tuple(out)


def stored(model, resolved) -> tuple[StoredTensor, ...]:
    from .vision_encoder import _adapter_bits

    setup = resolved.setup
    lora = setup.method is Method.LORA
    return mllama_stored_tensors(model.vision, setup.vision, setup.method, setup.precision.param_dtype.bits,
                                 setup.lora_targets == ("all-linear",), resolved.lora_modules if lora else (),
                                 setup.lora_rank if lora else 0, _adapter_bits(resolved) if lora else 0)



_F32 = 4
_INDEX = 8  # int64
_SCALAR = 512  # a [1] tensor as the allocator holds it (a gate's tanh)


def tower_saved(vision, mode: Vision | None, tiles: int, c: int, adapted: tuple[str, ...], lora_rank: int,
                adapter_bytes: int, lora_dropout: bool, autocast: bool, input_grad: bool = False) -> int:
    """What the tower's forward saves for ``tiles`` tiles (b x images x T), 0 when frozen.

    Encoder layers (local and global): the SigLIP-style layer rule of ``terms/vision.vision_saved`` (pre-LayerNorm
    attention with four projections, then fc1 -> gelu -> fc2; ``MllamaVisionEncoderLayer``) applied to one image's
    T·Np tokens (Np = N1 padded to 8): the local transformer attends over all of an image's tiles at once (the
    hidden states are viewed [b·images, T·Np, H]). Under autocast the residual stream is fp32 (``layernorm_pre``'s
    fp32 output starts it), which the rule's fp32 LayerNorm input already counts. Beyond the rule:
    - the 4-D aspect-ratio mask [b·images, 1, T·Np, T·Np] (c; ``_prepare_aspect_ratio_attention_mask``), which the
      memory-efficient SDPA kernel saves (one tensor, shared by every layer);
    - a gated global layer's ``gate.tanh() * x`` (twice): x (c·H per token) when the gates train, the [1] tanh when
      x needs a gradient;
    - once per image under ``--vision full``: the conv's c-cast pixel values (c·C·P² per tile; none in fp32), the
      tile position embedding the gate multiplies (c·N1·H per tile), ``layernorm_pre``'s fp32 input and mean/rstd
      ((4 or c)·H + 8 per token);
    - whenever a gradient flows: ``layernorm_post``'s input and mean/rstd, and the projector's input, the
      concatenated [T·N1, vision_output_dim] states (fp32 under autocast; its c-cast copy is what a trained
      projector saves).
    ``input_grad``: the patch embedding's output requires grad whatever trains. transformers'
    ``gradient_checkpointing_enable`` calls ``enable_input_require_grads`` (modeling_utils.py L3192-3200), which hooks
    the ``get_input_embeddings()`` of every PreTrainedModel inside the model (L2149-2180): the text embedding and
    ``MllamaVisionModel.patch_embedding``. So under checkpointing even a frozen tower saves what its input's
    gradient needs (the tower's layers are not checkpointed: ``MllamaVisionEncoderLayer`` is a plain nn.Module), and
    ``layernorm_pre`` saves its input."""
    from ..vision import VisionSpec
    from .vision_encoder import vision_saved

    if mode is None or tiles == 0 or (mode is Vision.FROZEN and not input_grad):
        return 0
    full = mode is Vision.FULL
    H, L = vision.hidden_size, vision.num_layers + vision.num_global_layers
    Np, N1 = vision.padded_patches, vision.patches
    # one SigLIP-style layer per patch token: a VisionSpec of one patch per "tile" (image_size = patch_size)
    shim = VisionSpec(family="smolvlm", hidden_size=H, intermediate_size=vision.intermediate_size, num_layers=L,
                      num_heads=vision.num_heads, image_size=vision.patch_size, patch_size=vision.patch_size,
                      text_hidden_size=vision.text_hidden_size, scale_factor=1)
    names = tuple("out_proj" if name == "o_proj" else name for name in adapted)
    tokens = tiles * Np
    layers = vision_saved(shim, mode, tokens, c, names, lora_rank, adapter_bytes, lora_dropout, autocast,
                          input_grad=input_grad).layers
    if full:  # o_proj reads the memory-efficient kernel's [b, s, a, d] output itself: no contiguous copy
        layers -= tokens * c * H * L
    images = tiles // vision.max_num_tiles
    grad = full or bool(adapted) or input_grad
    out = layers
    if grad:
        out += images * (vision.max_num_tiles * Np) ** 2 * c  # the aspect-ratio mask
        out += tokens * (_F32 * H + 2 * _F32)  # layernorm_post (input fp32 under autocast, else c = 4 or 2)
        if not autocast:
            out -= tokens * (_F32 - c) * H
        out += 2 * vision.num_global_layers * (tokens * c * H if full else _SCALAR)
    if full:
        if c != _F32:
            out += tiles * c * vision.num_channels * vision.image_size ** 2
        out += tiles * c * N1 * H  # the gated tile position embedding
    if full or input_grad:
        out += tiles * N1 * ((_F32 if autocast else c) * H + 2 * _F32)  # layernorm_pre
    if input_grad and not full:  # the patch embedding's output, a leaf that requires grad, held by AccumulateGrad
        out += tiles * (vision.patches - 1) * c * H
    proj = "multi_modal_projector"
    if full or proj in adapted:
        width = vision.vision_output_dim
        cat = _F32 if autocast else c
        per = c * width if autocast else cat * width  # the trained projector's (cast) input
        if proj in adapted:
            per = (c if autocast else adapter_bytes) * width + (c if autocast else adapter_bytes) * lora_rank
            if full:
                per += c * width
        out += tiles * N1 * per
    return out


def cross_saved(model, layer, vision, b: int, s: int, kv: int, tower_grad: bool, grad_ckpt: bool = False):
    """What the cross-attention layers save (``MllamaCrossAttentionDecoderLayer``), for b samples of s text tokens
    and kv = images x T x N1 vision states each. Per layer, on the text tokens, the Llama layer walk
    (``activations._LayerWalk``) of its pieces: input RMSNorm, q_proj, q_norm (RMSNorm over head_dim, a rows per
    token), the attention's q, out and logsumexp, o_proj, the post-attention RMSNorm and SwiGLU MLP; plus the tanh
    gates (``gate.tanh() * x`` saves x, c·h, when the gates train) and ``full_text_row_masked_out_mask * mlp_out``.
    On the vision states: k_proj and v_proj (X, the projector's output, saved once for all layers when their weights
    train; LoRA's per-module cast copies), k_norm, and the keys and values SDPA saves, repeated to a heads
    (``repeat_kv``: ``use_gqa_in_sdpa`` is False with a mask). Once: the additive cross-attention mask
    [b, 1, s, kv] (c) that the memory-efficient kernel saves and the [b, s, 1] row mask."""
    from .activations import _LayerWalk

    vs = vision
    h, a, k, d = vs.text_hidden_size, vs.text_heads, vs.text_kv_heads, vs.text_head_dim
    c, r = layer.dtypes.c, layer.dtypes.r
    full = layer.method is Method.FULL
    X = len(vs.cross_layers)
    # the text side
    walk = _LayerWalk(model, layer, True, layer_requires_grad=True)
    n = walk.norm(h, r)
    q = walk.linears([walk.use("q_proj", h)], n)
    q = walk.norm(d, q, rows=a)  # q_norm
    text = walk.per_token
    # the vision-state side: the k_proj/v_proj input X (c under autocast) saved once
    kv_walk = _LayerWalk(model, layer, True, layer_requires_grad=tower_grad)
    x_bytes = c if layer.dtypes.autocast else r
    kv_walk.linears([kv_walk.use("k_proj", h), kv_walk.use("v_proj", h)], x_bytes, x_saved=True)
    kv_grad = kv_walk.grad
    kv_walk.norm(d, x_bytes, rows=k)  # k_norm
    kv_tokens = kv_walk.per_token
    attention_grad = walk.grad or kv_grad
    out_bytes = c if layer.dtypes.autocast else max(q, r)
    attention = 0
    if attention_grad:
        kv_width = a * d if a > k > 1 else k * d
        text += out_bytes * 2 * a * d + _F32 * a  # q and out, logsumexp (s a multiple of 32 in practice)
        kv_tokens += out_bytes * 2 * kv_width
        attention += 2 * 512  # philox seed and offset
    walk.grad = attention_grad
    before = walk.per_token
    # o_proj reads the kernel's output itself: the memory-efficient kernel writes it [b, s, a, d], so the
    # transpose(1, 2).contiguous() and reshape are views (no copy to save)
    walk.linears([walk.use("o_proj", a * d)], out_bytes, x_saved=attention_grad)
    walk.per_token += c * h if full else 0  # the attention gate's product saves o_proj's output
    walk._x_in = r
    walk.mlp_block(False)
    walk.per_token += c * h if full else 0  # the MLP gate's product saves the row-masked MLP output
    text += walk.per_token - before
    per_layer = b * s * text + b * kv * kv_tokens + attention + walk.per_layer + 2 * _SCALAR
    masks = b * s * kv * c + b * s * c  # the cross-attention mask, the row mask
    x_saved = any(use.trains for use in (kv_walk.use("k_proj", h), kv_walk.use("v_proj", h)))
    if grad_ckpt:  # each layer keeps its input; X and the masks are inputs of every checkpoint; the recompute of
        # one cross-attention layer beyond what a self-attention layer's recompute holds
        from .activations import layer_saved

        own = layer_saved(model, layer, False, False, True).bytes(b, s)
        return CrossSaved(X * b * s * r * h + b * kv * x_bytes * h + masks, max(0, per_layer - own))
    return CrossSaved(X * per_layer + (b * kv * x_bytes * h if x_saved else 0) + (masks if attention_grad else 0), 0)


class CrossSaved(NamedTuple):
    kept: int  # alive from the layers' forward to their backward
    recompute: int = 0  # under checkpointing: during one cross-attention layer's backward, beyond a self layer's


def moments_for(model, resolved, tensors, moments: list, moment_type, layer=None, b=0, s=0) -> list:
    """The language model's moments with the tower's and the cross-attention layers' saved tensors added (and the
    batch's image tensors), and one moment for the tower's backward, the last of the step (the tower's autograd
    nodes are older than the text embedding's: ``MllamaModel.forward`` runs the tower first)."""
    from ..options import Phase

    setup, vision = resolved.setup, model.vision
    saved = setup_saved(model, resolved, layer, b, s)
    batch = batch_bytes(vision, setup)
    total = saved.tower + saved.cross + batch
    out = []
    for m in moments:
        if m.phase in (Phase.FORWARD, Phase.BACKWARD_START, Phase.BACKWARD):
            extra = saved.recompute if m.phase is Phase.BACKWARD else 0
            m = m._replace(activations=m.activations + total + extra)
        out.append(m)
    if saved.tower:
        end = next((m for m in moments if m.phase is Phase.BACKWARD_END), None)
        if end is not None:
            from ..units import round_up

            # the tower's and projector's gradients (and their adapters') grow during this moment; the language
            # model's, cross-attention layers and embedding rows included, are complete
            vision_grads = sum(round_up(t.numel * t.bits // 8) * t.count for t in tensors if t.trainable
                               and t.scope == "vision"
                               and not t.name.startswith(("vision.cross.", "vision.embed_tokens")))
            out.append(moment_type(Phase.BACKWARD_END, end.weights, end.gradients - vision_grads,
                                   end.optimizer_states, saved.tower + batch, end.logits, 0))
    return out


class MllamaSaved(NamedTuple):
    tower: int
    cross: int
    recompute: int = 0


def setup_saved(model, resolved, layer, b: int, s: int) -> MllamaSaved:
    """The tower's saved bytes and the cross-attention layers' (kept, and their recompute under checkpointing)."""
    from .vision_encoder import _adapter_bits

    setup, vision = resolved.setup, model.vision
    lora = setup.method is Method.LORA
    adapted = ()
    if setup.vision is Vision.LORA:
        names = vision.linear_names()
        adapted = names if setup.lora_targets == ("all-linear",) else tuple(
            name for name in names if _matches(name, resolved.lora_modules))
    c = setup.precision.param_dtype.bits // 8
    tiles = setup.batch_size * setup.images * vision.max_num_tiles
    ckpt = bool(setup.grad_ckpt)
    tower = tower_saved(vision, setup.vision, tiles, c, adapted, setup.lora_rank if lora else 0,
                        _adapter_bits(resolved) // 8 if lora else 0, setup.lora_dropout > 0,
                        setup.precision.autocast, input_grad=ckpt)
    cross = 0
    if layer is not None:
        kv = setup.images * vision.max_num_tiles * vision.patches
        cross = cross_saved(model, layer, vision, b, s, kv, ckpt or setup.vision in (Vision.LORA, Vision.FULL),
                            ckpt)
        return MllamaSaved(tower, cross.kept, cross.recompute)
    return MllamaSaved(tower, 0)


def batch_bytes(vision, setup) -> int:
    """The processor's image tensors, held through the step: fp32 ``pixel_values`` [b, images, T, C, P, P], int64
    ``aspect_ratio_ids`` [b, images], ``aspect_ratio_mask`` [b, images, T], ``cross_attention_mask`` [b, s, images,
    T] (each allocation rounded to 512 bytes)."""
    from ..units import round_up

    b, n, T = setup.batch_size, setup.images, vision.max_num_tiles
    return (round_up(b * n * T * _F32 * vision.num_channels * vision.image_size ** 2) + round_up(_INDEX * b * n)
            + round_up(_INDEX * b * n * T) + round_up(_INDEX * b * setup.seq_len * n * T))


def details_for(model, resolved) -> dict:
    """``details`` for an mllama VLM: no image tokens in the sequence (one ``<|image|>`` text token per image), the
    tiles the tower encodes per step (every image padded to T), the tower's and projector's parameters and the
    tower's saved activations (part of ``activations``; the cross-attention layers' are the language model's)."""
    vision, setup = model.vision, resolved.setup
    return {"image_tokens_per_sample": 0,
            "vision_tiles_per_step": setup.batch_size * setup.images * vision.max_num_tiles,
            "vision_params": vision.tower_params,
            "vision_activations_bytes": setup_saved(model, resolved, None, 0, 0).tower}
