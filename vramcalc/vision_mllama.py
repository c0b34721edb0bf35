"""Llama-3.2-Vision (``mllama``): the tiled vision tower, the projector and the language model's cross-attention layers.

transformers 5.25 ``models/mllama/modeling_mllama.py`` (``MllamaForConditionalGeneration``):
- ``MllamaVisionModel`` (L800-1010): Conv2d patch embedding (no bias), a class embedding [H], gated position
  embeddings (``MllamaPrecomputedPositionEmbedding``: gate [1], embedding [N1, H], tile_embedding
  nn.Embedding(R + 1, T·N1·H)), pre- and post-tile aspect-ratio embeddings (``MllamaPrecomputedAspectRatioEmbedding``:
  nn.Embedding(R + 1, T·H) and a gate [1] each), ``layernorm_pre``/``layernorm_post``, a local ``transformer`` of
  L_v layers and a gated ``global_transformer`` of L_g layers (``MllamaVisionEncoderLayer``: q/k/v/o_proj without
  bias, fc1/fc2 with bias, two LayerNorms, and gate_attn/gate_ffn [1] when gated). N1 = (P/p)^2 + 1 patches (the
  class token included) per tile, T = ``max_num_tiles``, R = ``len(supported_aspect_ratios)``. Its output
  concatenates the final hidden state with the ``intermediate_layers_indices`` layers' outputs: ``vision_output_dim``
  (7680 = 6 x 1280) per patch.
- ``multi_modal_projector``: nn.Linear(vision_output_dim, h, bias=True) (``MllamaModel``, L1285-1290).
- ``MllamaTextModel`` (L1060-1080): ``embed_tokens`` holds vocab_size + 8 rows; of its ``num_hidden_layers`` layers,
  those in ``cross_attention_layers`` are ``MllamaCrossAttentionDecoderLayer`` (L672-720: q/k/v/o_proj, q_norm and
  k_norm RMSNorm(head_dim), input and post-attention RMSNorms, a SwiGLU MLP, and two tanh gates [1]); the others are
  Llama decoder layers. Their keys and values come from the projected vision states, images x tiles x N1 long per
  sample (``MllamaTextCrossAttention.forward``), not from image tokens in the sequence: each image is one
  ``<|image|>`` token of the text.

vramcalc reads the language model as a Llama ``ModelSpec`` of the self-attention layers (``num_layers`` = L -
len(cross_attention_layers)); ``MllamaVisionSpec`` holds the tower, the projector, the cross-attention layers and
the 8 extra embedding rows, so that ``ModelSpec.params`` (inventory + ``vision.params``) is the whole model's.

Images and tiles (``image_processing_mllama.py``): an image is resized onto the canvas of aspect-ratio tiles that
``get_optimal_tiled_canvas`` picks (L129-184; a square image of S px: 1 tile when S <= P, else the largest n x n
arrangement with n^2 <= T, i.e. 4 tiles at T = 4), and ``pad_batches_and_tiles`` (L242-292) pads every image to
``max_image_tiles`` tiles: ``pixel_values`` is [b, images, T, C, P, P] whatever the image size. So the tower encodes
T tiles per image and the cross-attention keys/values are images x T x N1 long; ``--image-size`` only changes which
tiles the ``aspect_ratio_mask`` marks valid, not a tensor's shape.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .errors import VramcalcError
from .vision import MAX_VISION, VisionTensor

FAMILY = "mllama"
EXTRA_EMBEDDING_ROWS = 8  # MllamaTextModel.embed_tokens: nn.Embedding(vocab_size + 8, ...) (modeling_mllama.py L1068)
# configuration_mllama.py L49-70 (MllamaVisionConfig defaults) and L112-133 (MllamaTextConfig)
_VISION_DEFAULTS = dict(hidden_size=1280, num_hidden_layers=32, num_global_layers=8, attention_heads=16,
                        num_channels=3, intermediate_size=5120, vision_output_dim=7680, image_size=448,
                        patch_size=14, max_num_tiles=4)
_INTERMEDIATE_DEFAULT = (3, 7, 15, 23, 30)
_TEXT_DEFAULTS = dict(vocab_size=128256, hidden_size=4096, num_hidden_layers=40, num_attention_heads=32,
                      num_key_value_heads=8, intermediate_size=14336, max_position_embeddings=131072)
_CROSS_DEFAULT = (3, 8, 13, 18, 23, 28, 33, 38)
_VISION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
_CROSS_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def supported_aspect_ratios(max_tiles: int) -> int:
    """R: the (w, h) tile arrangements with w·h <= T (``get_all_supported_aspect_ratios``, image_processing_mllama.py
    L48-74; 8 for T = 4, the config's default list)."""
    return sum(1 for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1) if w * h <= max_tiles)


@dataclass(frozen=True)
class MllamaVisionSpec:
    """The parts of a Llama-3.2-Vision model that a Llama ``ModelSpec`` does not hold (module docstring)."""

    hidden_size: int  # H_v
    intermediate_size: int  # I_v
    num_layers: int  # L_v, the local transformer
    num_global_layers: int  # L_g, the gated global transformer
    num_heads: int
    image_size: int  # P: the tile
    patch_size: int
    max_num_tiles: int  # T
    num_aspect_ratios: int  # R
    vision_output_dim: int
    intermediate_layers: tuple[int, ...]
    text_hidden_size: int  # h
    text_heads: int
    text_kv_heads: int
    text_intermediate_size: int
    text_layers: int  # every decoder layer, cross-attention layers included
    cross_layers: tuple[int, ...]
    num_channels: int = 3
    family: str = FAMILY
    use_head: bool = False  # (VisionSpec's field; the mllama tower has no pooling head)
    scale_factor: int = 0
    mm_tokens_per_image: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise VramcalcError(f"vision_config: hidden_size ({self.hidden_size}) must be a multiple of "
                                f"attention_heads ({self.num_heads})")
        if self.image_size % self.patch_size:
            raise VramcalcError(f"vision_config: image_size ({self.image_size}) must be a multiple of patch_size "
                                f"({self.patch_size})")
        if self.text_hidden_size % self.text_heads or self.text_heads % self.text_kv_heads:
            raise VramcalcError(f"text_config: hidden_size ({self.text_hidden_size}), num_attention_heads "
                                f"({self.text_heads}) and num_key_value_heads ({self.text_kv_heads}) must divide")
        if any(not 0 <= i < self.num_layers for i in self.intermediate_layers):
            raise VramcalcError(f"vision_config: intermediate_layers_indices must be layers of the {self.num_layers}-"
                                f"layer transformer, got {list(self.intermediate_layers)}")
        if self.vision_output_dim != self.hidden_size * (1 + len(self.intermediate_layers)):
            raise VramcalcError(f"vision_config: vision_output_dim ({self.vision_output_dim}) must be hidden_size x "
                                f"(1 + len(intermediate_layers_indices)) = "
                                f"{self.hidden_size * (1 + len(self.intermediate_layers))} (the tower concatenates them)")

    @property
    def patches(self) -> int:
        """N1 = (P / p)^2 + 1: the patches of one tile and its class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def padded_patches(self) -> int:
        """N1 padded to a multiple of 8 (``MllamaVisionModel.forward``: ``num_padding_patches``)."""
        return -(-self.patches // 8) * 8

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def text_head_dim(self) -> int:
        """hidden_size // num_attention_heads (``MllamaTextCrossAttention``: config.head_dim is not read)."""
        return self.text_hidden_size // self.text_heads

    @property
    def tokens_per_tile(self) -> int:
        """Image tokens a tile puts in the language model's sequence: none (an image is one ``<|image|>`` text token;
        the tiles reach the language model through cross-attention)."""
        return 0

    def tokens_per_image(self, image_size: int | None = None, image_tokens: int | None = None) -> int:
        """Image tokens an image puts in the language model's sequence beside its text: none
        (``VisionSpec.tokens_per_image``'s rule with ``tokens_per_tile`` 0; ``tiles`` refuses --image-tokens)."""
        return self.tiles(image_size, image_tokens) * self.tokens_per_tile

    def tiles(self, image_size: int | None = None, image_tokens: int | None = None) -> int:
        """Tiles the tower encodes per image: always T (the processor pads every image to ``max_image_tiles``)."""
        if image_tokens is not None:
            raise VramcalcError("--image-tokens does not apply to mllama: its images reach the language model through "
                                "cross-attention, not image tokens; give --image-size (or nothing)")
        return self.max_num_tiles

    def valid_tiles(self, image_size: int | None) -> int:
        """Tiles that hold the image (``aspect_ratio_mask``) for a square image of ``image_size`` px: 1 when it fits
        one tile, else the largest n x n arrangement with n^2 <= T (``get_optimal_tiled_canvas``: the smallest
        upscaling canvas, else the largest downscaling one, both the largest square for a square image)."""
        if image_size is None or image_size <= self.image_size:
            return 1
        n = 1
        while (n + 1) ** 2 <= self.max_num_tiles and n * self.image_size < image_size:
            n += 1
        return n * n

    @functools.cached_property
    def tensors(self) -> tuple[VisionTensor, ...]:
        """Every parameter tensor that a Llama ``ModelSpec`` of the self-attention layers does not count."""
        H, I, C, p, T, R = (self.hidden_size, self.intermediate_size, self.num_channels, self.patch_size,
                            self.max_num_tiles, self.num_aspect_ratios)
        N1 = self.patches
        out = [VisionTensor("patch_embedding.weight", (H, C, p, p)),
               VisionTensor("class_embedding", (H,)),
               VisionTensor("gated_positional_embedding.gate", (1,)),
               VisionTensor("gated_positional_embedding.embedding", (N1, H)),
               VisionTensor("gated_positional_embedding.tile_embedding.weight", (R + 1, T * N1 * H)),
               VisionTensor("tile_positional_embedding.embedding.weight", (R + 1, T * H), 2),  # pre and post
               VisionTensor("tile_positional_embedding.gate", (1,), 2),
               VisionTensor("layernorm_pre_post.weight", (H,), 2), VisionTensor("layernorm_pre_post.bias", (H,), 2)]
        layers = self.num_layers + self.num_global_layers
        for name, fan_in, fan_out, bias in (("q_proj", H, H, False), ("k_proj", H, H, False), ("v_proj", H, H, False),
                                            ("o_proj", H, H, False), ("fc1", H, I, True), ("fc2", I, H, True)):
            out.append(VisionTensor(f"{name}.weight", (fan_out, fan_in), layers, name, fan_in, fan_out))
            if bias:
                out.append(VisionTensor(f"{name}.bias", (fan_out,), layers, name, fan_in, fan_out))
        out += [VisionTensor("layer_norm.weight", (H,), 2 * layers), VisionTensor("layer_norm.bias", (H,), 2 * layers),
                VisionTensor("global.gate", (1,), 2 * self.num_global_layers)]
        h, D = self.text_hidden_size, self.vision_output_dim
        out += [VisionTensor("multi_modal_projector.weight", (h, D), 1, "multi_modal_projector", D, h, "projector"),
                VisionTensor("multi_modal_projector.bias", (h,), 1, "multi_modal_projector", D, h, "projector")]
        return tuple(out) + self.cross_tensors

    @functools.cached_property
    def cross_tensors(self) -> tuple[VisionTensor, ...]:
        """The language model's parts: the cross-attention layers (part ``cross``) and the 8 extra embedding rows
        (part ``embedding``)."""
        h, I, d, X = self.text_hidden_size, self.text_intermediate_size, self.text_head_dim, len(self.cross_layers)
        q, kv = self.text_heads * d, self.text_kv_heads * d
        out = []
        for name, fan_in, fan_out in (("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h),
                                      ("gate_proj", h, I), ("up_proj", h, I), ("down_proj", I, h)):
            out.append(VisionTensor(f"cross.{name}.weight", (fan_out, fan_in), X, name, fan_in, fan_out, "cross"))
        out += [VisionTensor("cross.qk_norm.weight", (d,), 2 * X, part="cross"),
                VisionTensor("cross.layernorm.weight", (h,), 2 * X, part="cross"),
                VisionTensor("cross.gate", (1,), 2 * X, part="cross"),
                VisionTensor("embed_tokens.extra_rows", (EXTRA_EMBEDDING_ROWS, h), part="embedding")]
        return tuple(out)

    @functools.cached_property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def tower_params(self) -> int:
        """The tower's and projector's parameters (what ``--vision`` trains)."""
        return sum(t.numel for t in self.tensors if t.part in ("tower", "projector"))

    def linear_names(self) -> tuple[str, ...]:
        """peft target names of the tower's and projector's nn.Linear modules."""
        return tuple(dict.fromkeys(t.module for t in self.tensors if t.module and t.part != "cross"))


def _number(source: dict, key: str, default, where: str, low: int = 1) -> int:
    value = source.get(key)
    if value is None:
        return default
    if isinstance(value, list) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
            or not low <= value <= MAX_VISION * 64:
        raise VramcalcError(f"config.json field {where}{key!r} must be an integer from {low} to {MAX_VISION * 64:,}, "
                            f"got {value!r}")
    return int(value)


def _indices(source: dict, key: str, default: tuple[int, ...], where: str, count: int) -> tuple[int, ...]:
    value = source.get(key)
    if value is None:
        return default
    if not isinstance(value, list) or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < count
                                          for i in value):
        raise VramcalcError(f"config.json field {where}{key!r} must be a list of layer indices from 0 to {count - 1}, "
                            f"got {value!r}")
    return tuple(dict.fromkeys(value))


def mllama_parts(config: dict) -> tuple[dict, "MllamaVisionSpec", str]:
    """An ``mllama`` config as (the config of a Llama language model of its self-attention layers, the
    ``MllamaVisionSpec`` of everything else, the note the spec carries) (module docstring); ``hf_config`` reads the
    first and attaches the second. lm_head is never tied: MllamaForConditionalGeneration declares no
    _tied_weights_keys (L1426)."""
    text = config.get("text_config") or {}
    vision = config.get("vision_config") or {}
    for key, value in (("text_config", text), ("vision_config", vision)):
        if not isinstance(value, dict):
            raise VramcalcError(f"config.json field {key!r} must be an object, got {type(value).__name__}")
    t = {key: _number(text, key, default, "text_config.") for key, default in _TEXT_DEFAULTS.items()}
    layers = t["num_hidden_layers"]
    cross = _indices(text, "cross_attention_layers", _CROSS_DEFAULT, "text_config.", layers)
    if len(cross) >= layers:
        raise VramcalcError("text_config: every layer is a cross-attention layer; mllama needs self-attention layers")
    v = {key: _number(vision, key, default, "vision_config.") for key, default in _VISION_DEFAULTS.items()}
    v["num_global_layers"] = _number(vision, "num_global_layers", 8, "vision_config.", low=0)
    v["attention_heads"] = _number(vision, "attention_heads", vision.get("num_attention_heads") or 16,
                                   "vision_config.")
    ratios = vision.get("supported_aspect_ratios")
    aspect = len(ratios) if isinstance(ratios, list) and ratios else supported_aspect_ratios(v["max_num_tiles"])
    spec = MllamaVisionSpec(
        hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"], num_layers=v["num_hidden_layers"],
        num_global_layers=v["num_global_layers"], num_heads=v["attention_heads"], image_size=v["image_size"],
        patch_size=v["patch_size"], max_num_tiles=v["max_num_tiles"], num_aspect_ratios=aspect,
        vision_output_dim=v["vision_output_dim"],
        intermediate_layers=_indices(vision, "intermediate_layers_indices", _INTERMEDIATE_DEFAULT, "vision_config.",
                                     v["num_hidden_layers"]),
        text_hidden_size=t["hidden_size"], text_heads=t["num_attention_heads"],
        text_kv_heads=t["num_key_value_heads"], text_intermediate_size=t["intermediate_size"], text_layers=layers,
        cross_layers=cross, num_channels=v["num_channels"])
    llama = dict(model_type="llama", **{k: value for k, value in t.items() if k != "num_hidden_layers"},
                 num_hidden_layers=layers - len(cross), head_dim=t["hidden_size"] // t["num_attention_heads"],
                 rms_norm_eps=text.get("rms_norm_eps", 1e-5), _name_or_path=config.get("_name_or_path"))
    notes = (f"Llama-3.2-Vision (mllama): {layers - len(cross)} self-attention layers as llama, {len(cross)} "
             "cross-attention layers, vision tower and projector")
    return llama, spec, notes
