"""What Qwen2.5-VL's vision tower saves for backward (``vision_qwen.py``; transformers 5.25
``models/qwen2_5_vl/modeling_qwen2_5_vl.py``), for every patch of every image of the batch, which the tower encodes
as one sequence of n patches.

Per patch, c bytes of the parameter dtype, a the adapter's (the Linear rules are ``terms/vision.py``'s):
- ``Qwen2_5_VLRMSNorm`` (norm1, norm2, merger.ln_q; L65-81): ``x.to(float32)`` saved by ``pow`` and the product
  (4·H_v), ``rsqrt``'s fp32 output (4), when the input needs a gradient or the weight trains; the 16-bit normalised
  input (c·H_v) saved by ``weight * x`` when the weight trains. No op here is an autocast op;
- ``attn.qkv`` saves its input when it trains; ``apply_rotary_pos_emb_vision`` (L208-219) computes q and k in fp32,
  but its products with cos and sin save only the tables (which need no gradient), not the fp32 q and k; its 16-bit
  results q and k (c·H_v each) and v, a view of the qkv
  output that keeps all of it (3·c·H_v), are what SDPA saves with its output (c·H_v) and its fp32 logsumexp, one
  call per window (L313-331: the windows of ``window_lengths`` in the windowed blocks, one per image in
  ``fullatt_block_indexes``); the memory-efficient kernel pads each call's logsumexp rows to 32, flash saves a philox
  seed and offset per call; ``torch.cat`` of the window outputs is what ``attn.proj`` saves (c·H_v);
- the SwiGLU MLP with bias: gate_proj's input (the norm2 output), gate's output (silu's input), silu's output and
  up's output (saved by the product), the product (down_proj's input): c·H_v + 4·c·I_v when everything trains;
- once: the 16-bit ``pixel_values.type(dtype)`` copy the Conv3d saves when it trains (c·C·T·p² per patch; fp32: the
  batch itself), the int64 ``window_index`` (per merged token) the permutation's index saves, the fp32 rotary cos
  and sin tables [n, d] the blocks' products save; the merger: ln_q, mlp.0's input (c·H_v per patch), GELU's input
  and output (c·H_v each per patch) and the int64 ``reverse_indices`` of the final permutation.
Gradient checkpointing (every block is a ``GradientCheckpointingLayer``): each block keeps its input (c·H_v) and
rebuilds its saved tensors in its own backward.
"""

from __future__ import annotations

import functools

from ..options import Vision
from ..vision_qwen import image_grid, window_lengths
from .activations import SDPA_FLASH_MAX_HEAD_DIM, SEED_OFFSET_BYTES

_F32 = 4
_INDEX = 8
_EFFICIENT_ROWS = 32


@functools.lru_cache(maxsize=1024)
def qwen_vision_saved(vision, mode: Vision | None, images: int, grid: tuple[int, int], c: int,
                      adapted: tuple[str, ...], lora_rank: int, adapter_bytes: int, lora_dropout: bool,
                      autocast: bool = False, grad_ckpt: bool = False):
    """What the tower's forward saves for ``images`` images of ``grid`` patches each (module docstring)."""
    from .vision_encoder import VisionSaved

    if mode is None or mode is Vision.FROZEN or images == 0:
        return VisionSaved(0, 0)
    full = mode is Vision.FULL
    H, I, A, d = vision.hidden_size, vision.intermediate_size, vision.num_heads, vision.head_dim
    n = images * grid[0] * grid[1]
    windows = window_lengths(vision, *grid) * images
    whole = (grid[0] * grid[1],) * images
    kernel_flash = c == 2 and d <= SDPA_FLASH_MAX_HEAD_DIM

    def lse_bytes(lengths) -> int:
        rows = sum(lengths) if kernel_flash else sum(-(-k // _EFFICIENT_ROWS) * _EFFICIENT_ROWS for k in lengths)
        return _F32 * A * rows

    def linear(name: str, width: int, x_saved: bool, x_grad: bool) -> tuple[int, bool]:
        """(bytes per token, whether the shared input is now saved) of one Linear reading c-byte inputs
        (``terms/vision.py`` ``vision_saved``'s rule)."""
        out = 0
        if full and not x_saved:
            out, x_saved = out + c * width, True
        if name in adapted:
            if lora_dropout and x_grad:
                out += width
            if autocast and adapter_bytes != c:
                out += c * width
            elif lora_dropout or adapter_bytes != c:
                out += adapter_bytes * width
            elif not x_saved:
                out, x_saved = out + c * width, True
            out += (c if autocast else adapter_bytes) * lora_rank
        return out, x_saved

    def rms_norm(grad: bool) -> int:
        return (_F32 * H + _F32 if full or grad else 0) + (c * H if full else 0)

    layer_bytes = []
    x_grad = full  # the patch embedding trains only under --vision full (LoRA does not reach a Conv3d)
    any_attention = False
    for index in range(vision.num_layers):
        per_token = rms_norm(x_grad)
        saved, _ = linear("qkv", H, False, full or x_grad)
        per_token += saved
        qkv_grad = full or x_grad or "qkv" in adapted
        calls = whole if index in vision.full_attention_blocks else windows
        fixed = 0
        if qkv_grad:
            any_attention = True
            per_token += 3 * c * H + 2 * c * H + c * H  # the qkv output (v's base), rotated q and k, SDPA's output
            fixed = lse_bytes(calls) + (SEED_OFFSET_BYTES * len(calls) if kernel_flash else 0)
        per_token += linear("proj", H, False, qkv_grad)[0]  # the concatenated window outputs
        h1_grad = qkv_grad or "proj" in adapted
        per_token += rms_norm(h1_grad)
        saved, x_saved = linear("gate_proj", H, False, full or h1_grad)
        per_token += saved + linear("up_proj", H, x_saved, full or h1_grad)[0]
        gate_grad = full or h1_grad or "gate_proj" in adapted
        up_grad = full or h1_grad or "up_proj" in adapted
        per_token += (2 * c * I if gate_grad else 0) + (c * I if up_grad else 0)  # silu in, up out; silu out
        per_token += linear("down_proj", I, False, gate_grad or up_grad)[0]
        x_grad = gate_grad or up_grad or "down_proj" in adapted
        layer_bytes.append(n * per_token + fixed)
    saved_layers = sum(layer_bytes)
    recompute = 0
    if grad_ckpt:
        recompute = max(layer_bytes)
        saved_layers = n * c * H * vision.num_layers
    m2 = vision.scale_factor ** 2
    outer = 0
    if full:
        outer += n * c * vision.num_channels * vision.temporal_patch_size * vision.patch_size ** 2 if c != _F32 else 0
        outer += _INDEX * n // m2  # window_index, saved by the permutation's index
    if any_attention:
        outer += n * 2 * _F32 * d  # the rotary cos and sin tables
    grad = full or x_grad
    if grad:
        outer += n * rms_norm(True)  # merger.ln_q
    outer += n // m2 * linear("mlp.0", H * m2, False, grad)[0]
    m0_grad = grad or "mlp.0" in adapted
    if m0_grad:
        outer += n * c * H  # GELU's input
    outer += n // m2 * linear("mlp.2", H * m2, False, m0_grad)[0]  # GELU's output
    if m0_grad or "mlp.2" in adapted:
        outer += _INDEX * n // m2  # reverse_indices
    return VisionSaved(saved_layers, outer, recompute)


def qwen_setup_saved(vision, setup, adapted: tuple[str, ...], adapter_bytes: int):
    """``qwen_vision_saved`` for a training setup: batch_size x images images of the setup's grid."""
    return qwen_vision_saved(vision, setup.vision, setup.batch_size * setup.images,
                             image_grid(vision, setup.image_size, setup.image_tokens),
                             setup.precision.param_dtype.bits // 8, adapted,
                             setup.lora_rank if adapted else 0, adapter_bytes, setup.lora_dropout > 0,
                             setup.precision.autocast, bool(setup.grad_ckpt))


def qwen_pixel_values_bytes(vision, setup) -> int:
    """The batch's fp32 ``pixel_values`` [patches, C·T·p²] (``Qwen2VLImageProcessor``), held through the step."""
    gh, gw = image_grid(vision, setup.image_size, setup.image_tokens)
    patches = setup.batch_size * setup.images * gh * gw
    return patches * _F32 * vision.num_channels * vision.temporal_patch_size * vision.patch_size ** 2
