"""The SigLIP-style encoder rule of a vision tower: which of its Linears LoRA adapts, its parameter tensors, and
what its layers save for backward (the per-layer rule ``terms/vision.py``'s module docstring states). Used by
``terms/vision.py`` for smolvlm, idefics3 and gemma3, and by ``terms/vision_mllama.py`` for the mllama tower."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..options import Method, Vision
from ..vision import VisionSpec
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
