"""Qwen2.5-VL: its vision tower's configuration, parameter inventory and the image grid one image makes.

transformers 5.25 ``models/qwen2_5_vl/modeling_qwen2_5_vl.py``:
- ``Qwen2_5_VisionPatchEmbed`` (L99-122): ``nn.Conv3d(C, H_v, kernel = stride = [T, p, p], bias=False)`` on
  ``pixel_values`` of shape [patches, C·T·p·p] (T = temporal_patch_size 2: the processor repeats an image's frame);
- ``Qwen2_5_VLVisionBlock`` x depth (L342-370): ``norm1``/``norm2`` (Qwen2_5_VLRMSNorm [H_v], eps 1e-6),
  ``attn.qkv = nn.Linear(H_v, 3·H_v, bias=True)``, ``attn.proj = nn.Linear(H_v, H_v)`` and a SwiGLU MLP with bias
  (``Qwen2_5_VLMLP(config, bias=True)``: gate_proj, up_proj [I_v, H_v], down_proj [H_v, I_v]); the blocks of
  ``fullatt_block_indexes`` attend over each whole image, the others within windows of ``window_size`` pixels
  (``vision_utils.get_vision_window_index``); 2-D rotary position tables (no learned position embedding);
- ``Qwen2_5_VLPatchMerger`` (L185-198): ``ln_q`` (RMSNorm [H_v]), then ``mlp = Sequential(Linear(4·H_v, 4·H_v),
  GELU(), Linear(4·H_v, out_hidden_size))`` on every 2x2 group of patches (spatial_merge_size m = 2): one image token
  per m² patches.
The language model is Qwen2's (``Qwen2_5_VLTextModel``: q/k/v with bias, o_proj without, RMSNorm, SwiGLU) with
M-RoPE (3-D position ids), read here as the ``qwen2`` family. Hub configs are flat (the text fields at the top level,
``vision_config`` nested); transformers 5.25 also writes a nested ``text_config``: both are read.

Image tokens: the processor resizes an image with ``smart_resize`` (``models/qwen2_vl/image_processing_qwen2_vl.py``
L63-89: each side rounded to a multiple of p·m = 28, the area kept within [min_pixels, max_pixels], the
``Qwen2VLImageProcessor`` defaults 56·56 and 28·28·1280), then it has (h/p)·(w/p) patches and (h/p)·(w/p)/m² tokens.
"""

from __future__ import annotations

import math

from .errors import VramcalcError
from .vision_tensor import VisionTensor

# transformers 5.25 configuration_qwen2_5_vl.py: Qwen2_5_VLVisionConfig L29-41, Qwen2_5_VLTextConfig L83-102,
# Qwen2_5_VLConfig L159-163 (tie_word_embeddings False)
QWEN_VISION_DEFAULTS = dict(depth=32, hidden_size=3584, intermediate_size=3420, num_heads=16, in_channels=3,
                            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                            out_hidden_size=3584, fullatt_block_indexes=(7, 15, 23, 31))
QWEN_TEXT_DEFAULTS = dict(vocab_size=152_064, hidden_size=8192, intermediate_size=29_568, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=32_768,
                          use_sliding_window=False, sliding_window=4096)
QWEN_FAMILIES = ("qwen2_5_vl",)
# Qwen2VLImageProcessor defaults (image_processing_qwen2_vl.py L96: size shortest_edge 56·56, longest_edge 28·28·1280)
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280
# the image side assumed when neither --image-size nor --image-tokens is given: 16 x 16 image tokens (448 px for
# p = 14, m = 2), a typical chat image after smart_resize
DEFAULT_TOKENS_SIDE = 16
_MAX_VISION = 2**16


def qwen_text_config(config: dict) -> dict:
    """The language model's config of a Qwen2.5-VL config, as the ``qwen2`` family reads it: the nested
    ``text_config`` if any, else the outer (flat) fields; Qwen2_5_VLTextConfig's defaults for absent fields."""
    nested = config.get("text_config")
    source = nested if isinstance(nested, dict) else {k: v for k, v in config.items() if k != "vision_config"}
    text = {**QWEN_TEXT_DEFAULTS, **{k: v for k, v in source.items() if v is not None}}
    text["model_type"] = "qwen2"
    text["tie_word_embeddings"] = qwen_tied(config)
    name = config.get("_name_or_path", source.get("_name_or_path"))
    if name is not None:
        text["_name_or_path"] = name
    return text


def qwen_tied(config: dict) -> bool:
    """lm_head tied to the embedding: the outer ``tie_word_embeddings`` (default False), or True when a nested
    text_config says so (``Qwen2_5_VLConfig.__post_init__`` L203-207, the pre-v5 placement)."""
    value = config.get("tie_word_embeddings", False)
    nested = config.get("text_config")
    inner = nested.get("tie_word_embeddings", False) if isinstance(nested, dict) else False
    for v in (value, inner):
        if not isinstance(v, bool):
            raise VramcalcError(f"config.json field 'tie_word_embeddings' must be true or false, got {v!r}")
    return value or inner


def qwen_vision_fields(config: dict, text_hidden_size: int) -> dict:
    """The ``VisionSpec`` fields of a Qwen2.5-VL config (``vision_config``, class defaults for absent fields)."""
    nested = config.get("vision_config")
    if nested is None:
        nested = {}
    if not isinstance(nested, dict):
        raise VramcalcError(f"config.json field 'vision_config' must be an object, got {type(nested).__name__}")
    aliases = {"depth": "num_hidden_layers", "num_heads": "num_attention_heads"}  # Qwen2_5_VLVisionConfig.attribute_map

    def number(key: str) -> int:
        value = nested.get(key, nested.get(aliases.get(key, key)))
        if value is None:
            return QWEN_VISION_DEFAULTS[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
                or not 1 <= value <= _MAX_VISION:
            raise VramcalcError(f"config.json field vision_config.{key!r} must be an integer from 1 to "
                                f"{_MAX_VISION:,}, got {value!r}")
        return int(value)

    fields = {key: number(key) for key in QWEN_VISION_DEFAULTS if key != "fullatt_block_indexes"}
    depth = fields["depth"]
    full = nested.get("fullatt_block_indexes", QWEN_VISION_DEFAULTS["fullatt_block_indexes"])
    if not isinstance(full, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in full):
        raise VramcalcError(f"config.json field vision_config.'fullatt_block_indexes' must be a list of integers, "
                            f"got {full!r}")
    p, m = fields["patch_size"], fields["spatial_merge_size"]
    return dict(family=config["model_type"], hidden_size=fields["hidden_size"],
                intermediate_size=fields["intermediate_size"], num_layers=depth, num_heads=fields["num_heads"],
                image_size=p * m * DEFAULT_TOKENS_SIDE, patch_size=p, text_hidden_size=text_hidden_size,
                num_channels=fields["in_channels"], scale_factor=m, temporal_patch_size=fields["temporal_patch_size"],
                window_size=fields["window_size"], full_attention_blocks=tuple(sorted({i for i in full if 0 <= i < depth})),
                out_hidden_size=fields["out_hidden_size"])


def smart_resize(height: int, width: int, factor: int, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """``smart_resize`` of transformers 5.25 (``models/qwen2_vl/image_processing_qwen2_vl.py`` L63-89), line for
    line: the (height, width) the processor resizes an image to."""
    if max(height, width) / min(height, width) > 200:
        raise VramcalcError(f"an image's aspect ratio must be under 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_grid(vision, image_size: int | None = None, image_tokens: int | None = None) -> tuple[int, int]:
    """(grid_h, grid_w) in patches of one image (the processor's ``image_grid_thw`` with t = 1): from a square image
    of ``image_size`` pixels through ``smart_resize``; from ``image_tokens`` N as the grid of N merged tokens with the
    most square shape (rows: the largest divisor of N at most sqrt(N)); else the default 16 x 16 tokens."""
    p, m = vision.patch_size, vision.scale_factor
    if image_tokens is not None:
        rows = max(d for d in range(1, math.isqrt(image_tokens) + 1) if image_tokens % d == 0)
        return rows * m, image_tokens // rows * m
    if image_size is None:
        return DEFAULT_TOKENS_SIDE * m, DEFAULT_TOKENS_SIDE * m
    h, w = smart_resize(image_size, image_size, p * m)
    return h // p, w // p


def tokens_per_image(vision, image_size: int | None = None, image_tokens: int | None = None) -> int:
    """Image tokens one image puts in the language model's sequence: (grid_h · grid_w) / m²."""
    gh, gw = image_grid(vision, image_size, image_tokens)
    return gh * gw // vision.scale_factor ** 2


def window_lengths(vision, grid_h: int, grid_w: int) -> tuple[int, ...]:
    """Patches per attention window of one image, in order (``vision_utils.get_vision_window_index``): the merged
    grid (grid / m) is cut into squares of w = window_size / m / p merged tokens per side, the last row and column
    of windows shorter; empty windows vanish (``unique_consecutive``)."""
    m = vision.scale_factor
    side = max(vision.window_size // m // vision.patch_size, 1)

    def cuts(n: int) -> list[int]:
        return [side] * (n // side) + ([n % side] if n % side else [])

    return tuple(rh * rw * m * m for rh in cuts(grid_h // m) for rw in cuts(grid_w // m))


def qwen_tensors(vision) -> tuple:
    """Every parameter tensor of the Qwen2.5-VL tower and merger, as ``sum(p.numel())`` counts them."""
    H, I, L, p, C = vision.hidden_size, vision.intermediate_size, vision.num_layers, vision.patch_size, \
        vision.num_channels
    merged = H * vision.scale_factor ** 2
    out_h = vision.out_hidden_size or vision.text_hidden_size
    out = [VisionTensor("patch_embed.proj.weight", (H, C, vision.temporal_patch_size, p, p)),
           VisionTensor("blocks.norm1.weight", (H,), L), VisionTensor("blocks.norm2.weight", (H,), L)]
    for name, fan_in, fan_out in (("qkv", H, 3 * H), ("proj", H, H), ("gate_proj", H, I), ("up_proj", H, I),
                                  ("down_proj", I, H)):
        out.append(VisionTensor(f"blocks.{name}.weight", (fan_out, fan_in), L, name, fan_in, fan_out))
        out.append(VisionTensor(f"blocks.{name}.bias", (fan_out,), L, name, fan_in, fan_out))
    out.append(VisionTensor("merger.ln_q.weight", (H,), part="projector"))
    for name, fan_in, fan_out in (("mlp.0", merged, merged), ("mlp.2", merged, out_h)):
        out.append(VisionTensor(f"merger.{name}.weight", (fan_out, fan_in), 1, name, fan_in, fan_out, "projector"))
        out.append(VisionTensor(f"merger.{name}.bias", (fan_out,), 1, name, fan_in, fan_out, "projector"))
    return tuple(out)
