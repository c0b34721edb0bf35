"""VisionSpec: the vision tower and projector of a vision-language model, and the images one sample carries.

Families (transformers 5.25, ``AutoModelForImageTextToText``):
- ``smolvlm`` and ``idefics3`` (``models/smolvlm/modeling_smolvlm.py``, ``models/idefics3/modeling_idefics3.py``): a
  SigLIP-style encoder (``*VisionTransformer``: Conv2d patch embedding with bias, learned position embedding of
  (image_size / patch_size)^2 rows, L pre-LayerNorm layers with q/k/v/out_proj and fc1/fc2 all with bias, a
  post_layernorm) and a connector that pixel-shuffles the N patches into N / sf^2 tokens of width H_v·sf^2 and
  projects them with ``modality_projection.proj = nn.Linear(H_v·sf^2, h, bias=False)`` (``SmolVLMConnector``,
  L390-425). Tokens per image tile: ``(image_size // patch_size)^2 / scale_factor^2`` (``SmolVLMModel.image_seq_len``,
  L439-441). The processors split a large image into tiles of the vision ``image_size`` plus one global view
  (``image_processing_smolvlm.py`` ``split_image``): here a square image of S pixels is ceil(S / tile)^2 + 1 tiles
  when S > tile, else 1.
- ``gemma3`` (``models/gemma3/modeling_gemma3.py``, ``models/siglip/modeling_siglip.py``): ``SiglipVisionModel``
  (the same encoder; ``vision_use_head``, default True, adds ``SiglipMultiheadAttentionPoolingHead``; Gemma-3
  checkpoints set it False) and ``Gemma3MultiModalProjector`` (L635-668): an avg-pool to ``mm_tokens_per_image``
  tokens, ``mm_soft_emb_norm`` (Gemma3RMSNorm [H_v]) and ``mm_input_projection_weight`` [H_v, h] (an nn.Parameter,
  not an nn.Linear: neither LoRA nor bitsandbytes reach it). Every image is resized to the vision ``image_size``
  (pan-and-scan off by default): one tile of ``mm_tokens_per_image`` tokens.

Symbols: H_v vision hidden, I_v vision intermediate, L_v vision layers, p patch, P image size, N = (P / p)^2 patches.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from .errors import VramcalcError
from .vision_qwen import QWEN_FAMILIES, QWEN_VISION_DEFAULTS
from .vision_tensor import VisionTensor  # noqa: F401 (re-exported: terms, tests)

# Outer model_type -> (the vision config class defaults, the outer defaults): transformers 5.25
# configuration_smolvlm.py L56-62 / L93-98, configuration_idefics3.py (same values), configuration_siglip.py L93-103,
# configuration_gemma3.py L207-212
_SIGLIP_IDEFICS = dict(hidden_size=1152, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
                       num_channels=3, image_size=224, patch_size=32)
_SIGLIP = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
               image_size=224, patch_size=16, vision_use_head=True)
VISION_FAMILIES = {
    "smolvlm": (_SIGLIP_IDEFICS, dict(scale_factor=2, tie_word_embeddings=False)),
    "idefics3": (_SIGLIP_IDEFICS, dict(scale_factor=2, tie_word_embeddings=False)),
    "gemma3": (_SIGLIP, dict(mm_tokens_per_image=256, tie_word_embeddings=True)),
    "qwen2_5_vl": (QWEN_VISION_DEFAULTS, dict(tie_word_embeddings=False)),  # vision_qwen.py reads it
}
MAX_VISION = 2**16  # any vision size field: far past SigLIP-so400m (1152 wide, 27 layers, 4304 intermediate)


@dataclass(frozen=True)
class VisionSpec:
    family: str  # the outer model_type: smolvlm, idefics3, gemma3
    hidden_size: int  # vision_config.hidden_size (H_v)
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int  # the tile the tower encodes (P)
    patch_size: int
    text_hidden_size: int  # h: the projector's output width
    num_channels: int = 3
    scale_factor: int = 0  # smolvlm / idefics3 pixel shuffle
    mm_tokens_per_image: int = 0  # gemma3
    use_head: bool = False  # siglip vision_use_head
    # Qwen2.5-VL (vision_qwen.py): scale_factor is spatial_merge_size, image_size the default image side
    temporal_patch_size: int = 0
    window_size: int = 0  # pixels per attention window side
    full_attention_blocks: tuple[int, ...] = ()  # fullatt_block_indexes
    out_hidden_size: int = 0  # the merger's output width (0: text_hidden_size)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise VramcalcError(f"vision_config: hidden_size ({self.hidden_size}) must be a multiple of "
                                f"num_attention_heads ({self.num_heads})")
        if self.image_size % self.patch_size:
            raise VramcalcError(f"vision_config: image_size ({self.image_size}) must be a multiple of patch_size "
                                f"({self.patch_size})")
        side = self.image_size // self.patch_size
        if self.scale_factor and side % self.scale_factor:
            raise VramcalcError(f"{self.family}: scale_factor ({self.scale_factor}) must divide the {side} patches per "
                                "side (the pixel shuffle)")
        if self.mm_tokens_per_image:
            tokens_side = math.isqrt(self.mm_tokens_per_image)
            if tokens_side ** 2 != self.mm_tokens_per_image or side % tokens_side:
                raise VramcalcError(f"{self.family}: mm_tokens_per_image ({self.mm_tokens_per_image}) must be a square "
                                    f"whose side divides the {side} patches per side (the average pool)")

    @property
    def patches(self) -> int:
        """N = (P / p)^2 patches per tile, the encoder's sequence length."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def tokens_per_tile(self) -> int:
        """Image tokens one tile puts in the language model's sequence: N / sf^2 (smolvlm, idefics3) or
        mm_tokens_per_image (gemma3)."""
        if self.mm_tokens_per_image:
            return self.mm_tokens_per_image
        return self.patches // self.scale_factor ** 2

    @property
    def projector_in(self) -> int:
        return self.hidden_size * self.scale_factor ** 2 if self.scale_factor else self.hidden_size

    def tokens_per_image(self, image_size: int | None = None, image_tokens: int | None = None) -> int:
        """Image tokens one image puts in the language model's sequence: tiles x tokens per tile, or Qwen2.5-VL's
        grid (``vision_qwen.tokens_per_image``)."""
        if self.family in QWEN_FAMILIES:
            from .vision_qwen import tokens_per_image

            return tokens_per_image(self, image_size, image_tokens)
        return self.tiles(image_size, image_tokens) * self.tokens_per_tile

    def tiles(self, image_size: int | None = None, image_tokens: int | None = None) -> int:
        """Tiles the tower encodes per image: from ``image_tokens`` (a multiple of ``tokens_per_tile``), or from a
        square image of ``image_size`` pixels (smolvlm/idefics3: ceil(S / P)^2 + 1 when S > P, else 1; gemma3 resizes
        every image to P: 1), or 1 (an image at the tower's own resolution)."""
        if self.family in QWEN_FAMILIES:  # one variable-size grid per image
            return 1
        if image_tokens is not None:
            if image_tokens % self.tokens_per_tile:
                raise VramcalcError(f"--image-tokens {image_tokens} is not a multiple of the {self.tokens_per_tile} "
                                    f"tokens of one {self.family} image tile")
            return image_tokens // self.tokens_per_tile
        if image_size is None or image_size <= self.image_size or self.mm_tokens_per_image:
            return 1
        per_side = -(-image_size // self.image_size)
        return per_side * per_side + 1

    @functools.cached_property
    def tensors(self) -> tuple[VisionTensor, ...]:
        """Every parameter tensor of the tower and projector, as ``sum(p.numel())`` counts them."""
        if self.family in QWEN_FAMILIES:
            from .vision_qwen import qwen_tensors

            return qwen_tensors(self)
        H, I, L, p, C = self.hidden_size, self.intermediate_size, self.num_layers, self.patch_size, self.num_channels
        out = [VisionTensor("embeddings.patch_embedding.weight", (H, C, p, p)),
               VisionTensor("embeddings.patch_embedding.bias", (H,)),
               VisionTensor("embeddings.position_embedding.weight", (self.patches, H))]
        for name, fan_in, fan_out in (("q_proj", H, H), ("k_proj", H, H), ("v_proj", H, H), ("out_proj", H, H),
                                      ("fc1", H, I), ("fc2", I, H)):
            out.append(VisionTensor(f"{name}.weight", (fan_out, fan_in), L, name, fan_in, fan_out))
            out.append(VisionTensor(f"{name}.bias", (fan_out,), L, name, fan_in, fan_out))
        out += [VisionTensor("layer_norm.weight", (H,), 2 * L), VisionTensor("layer_norm.bias", (H,), 2 * L),
                VisionTensor("post_layernorm.weight", (H,)), VisionTensor("post_layernorm.bias", (H,))]
        if self.use_head:  # SiglipMultiheadAttentionPoolingHead: probe, nn.MultiheadAttention, LayerNorm, MLP
            out += [VisionTensor("head.probe", (1, 1, H)), VisionTensor("head.attention.in_proj_weight", (3 * H, H)),
                    VisionTensor("head.attention.in_proj_bias", (3 * H,)),
                    VisionTensor("head.attention.out_proj.weight", (H, H), 1, "out_proj", H, H),
                    VisionTensor("head.attention.out_proj.bias", (H,), 1, "out_proj", H, H),
                    VisionTensor("head.layernorm.weight", (H,)), VisionTensor("head.layernorm.bias", (H,)),
                    VisionTensor("head.mlp.fc1.weight", (I, H), 1, "fc1", H, I),
                    VisionTensor("head.mlp.fc1.bias", (I,), 1, "fc1", H, I),
                    VisionTensor("head.mlp.fc2.weight", (H, I), 1, "fc2", I, H),
                    VisionTensor("head.mlp.fc2.bias", (H,), 1, "fc2", I, H)]
        h = self.text_hidden_size
        if self.mm_tokens_per_image:  # Gemma3MultiModalProjector
            out += [VisionTensor("multi_modal_projector.mm_input_projection_weight", (H, h), part="projector"),
                    VisionTensor("multi_modal_projector.mm_soft_emb_norm.weight", (H,), part="projector")]
        else:  # SmolVLMConnector / Idefics3Connector
            out.append(VisionTensor("connector.modality_projection.proj.weight", (h, self.projector_in), 1,
                                    "modality_projection.proj", self.projector_in, h, part="projector"))
        return tuple(out)

    @functools.cached_property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors)

    def linear_names(self) -> tuple[str, ...]:
        """peft target names of the nn.Linear modules (tower and projector) in forward order."""
        return tuple(dict.fromkeys(t.module for t in self.tensors if t.module))


def vision_from_config(config: dict, text_hidden_size: int) -> VisionSpec | None:
    """The VisionSpec of a VLM config (the outer dict, whose ``text_config`` holds the language model), or None when
    its model_type is not one of ``VISION_FAMILIES``. Absent fields take the config classes' defaults."""
    family = config.get("model_type")
    if family not in VISION_FAMILIES:
        return None
    if family in QWEN_FAMILIES:
        from .vision_qwen import qwen_vision_fields

        return VisionSpec(**qwen_vision_fields(config, text_hidden_size))
    vision_defaults, outer_defaults = VISION_FAMILIES[family]
    nested = config.get("vision_config")
    if nested is None:
        nested = {}
    if not isinstance(nested, dict):
        raise VramcalcError(f"config.json field 'vision_config' must be an object, got {type(nested).__name__}")

    def number(source: dict, key: str, default, where: str) -> int:
        value = source.get(key)
        if value is None:
            return default
        if isinstance(value, list) and len(value) == 2 and value[0] == value[1]:  # [P, P]: square
            value = value[0]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
                or not 1 <= value <= MAX_VISION:
            raise VramcalcError(f"config.json field {where}{key!r} must be an integer from 1 to {MAX_VISION:,}, "
                                f"got {value!r}")
        return int(value)

    fields = {key: number(nested, key, default, "vision_config.") for key, default in vision_defaults.items()
              if key != "vision_use_head"}
    use_head = False
    if "vision_use_head" in vision_defaults:
        use_head = nested.get("vision_use_head", vision_defaults["vision_use_head"])
        if not isinstance(use_head, bool):
            raise VramcalcError(f"config.json field vision_config.'vision_use_head' must be true or false, "
                                f"got {use_head!r}")
    extra = {}
    if "scale_factor" in outer_defaults:
        extra["scale_factor"] = number(config, "scale_factor", outer_defaults["scale_factor"], "")
    if "mm_tokens_per_image" in outer_defaults:
        extra["mm_tokens_per_image"] = number(config, "mm_tokens_per_image", outer_defaults["mm_tokens_per_image"], "")
    return VisionSpec(family=family, hidden_size=fields["hidden_size"], intermediate_size=fields["intermediate_size"],
                      num_layers=fields["num_hidden_layers"], num_heads=fields["num_attention_heads"],
                      image_size=fields["image_size"], patch_size=fields["patch_size"],
                      num_channels=fields["num_channels"], text_hidden_size=text_hidden_size, use_head=use_head,
                      **extra)


def vlm_tied(config: dict) -> bool | None:
    """Whether the VLM ties lm_head to the embedding: the outer ``tie_word_embeddings`` (the class default when
    absent), or None for a config that is not one of ``VISION_FAMILIES``."""
    family = config.get("model_type")
    if family not in VISION_FAMILIES:
        return None
    if family in QWEN_FAMILIES:
        from .vision_qwen import qwen_tied

        return qwen_tied(config)
    value = config.get("tie_word_embeddings", VISION_FAMILIES[family][1]["tie_word_embeddings"])
    if not isinstance(value, bool):
        raise VramcalcError(f"config.json field 'tie_word_embeddings' must be true or false, got {value!r}")
    return value


# The largest values the image options take: far past any chat sample (Idefics3 splits one image into at most 17
# tiles; long multi-image samples carry tens of images)
MAX_IMAGES = 2**12
MAX_IMAGE_SIZE = 2**16
MAX_IMAGE_TOKENS = 2**22
_IMAGE_OPTIONS = ("images", "image_size", "image_tokens", "vision")


def resolve_images(model, values: dict, given: dict) -> None:
    """Fill ``values`` with the image options (``TrainingSetup.images``, ``image_size``, ``image_tokens``, ``vision``)
    checked against the model and the method; one VramcalcError line for a bad combination.

    Rule for the sequence: ``seq_len`` is every token the language model sees, the image tokens included (what the
    processor's expanded ``input_ids`` hold and TRL's ``max_length`` truncates), so images x tiles x tokens per tile
    must fit in it. ``vision`` defaults to what the method trains: ``full`` for --method full, ``lora`` for --method
    lora (peft matches target names by suffix, so the default q_proj/v_proj and all-linear reach the tower's Linears:
    peft 0.21.2 ``tuners/tuners_utils.py`` L2430-2490, ``check_target_module_exists``)."""
    from .errors import positive_int
    from .options import Method, Precision, Sharding, Task, Vision

    given = dict(given)
    if given.get("images") is not None:
        given["images"] = 0 if str(given["images"]).strip() == "0" else positive_int(
            given["images"], "number of images", MAX_IMAGES)
    asked = [name for name in _IMAGE_OPTIONS if given.get(name) not in (None, 0)]
    vision = model.vision
    if vision is None:
        if asked:
            raise VramcalcError(f"--{asked[0].replace('_', '-')} applies to a vision-language model; {model.name} is "
                                f"text-only ({model.family}); vision models read: "
                                f"{', '.join(sorted(VISION_FAMILIES))}")
        values.update(images=0, image_size=None, image_tokens=None, vision=None)
        return
    images = given.get("images") or 0
    size = given.get("image_size")
    tokens = given.get("image_tokens")
    if size is not None and tokens is not None:
        raise VramcalcError("give --image-size or --image-tokens, not both")
    size = None if size is None else positive_int(size, "image size in pixels", MAX_IMAGE_SIZE)
    tokens = None if tokens is None else positive_int(tokens, "image tokens per image", MAX_IMAGE_TOKENS)
    mode = given.get("vision")
    if not images:
        if size is not None or tokens is not None or mode is not None:
            raise VramcalcError("--image-size, --image-tokens and --vision need --images N (images per sample)")
        values.update(images=0, image_size=None, image_tokens=None, vision=None)
        return
    method = values["method"]
    if method not in (Method.FULL, Method.LORA):
        raise VramcalcError(f"images are estimated for --method full or lora, not {method.value} (the vision "
                            "tower under other peft methods is not modelled)")
    mode = Vision.parse(mode, "vision") if mode is not None else (
        Vision.FULL if method is Method.FULL else Vision.LORA)
    if mode is Vision.LORA and method is not Method.LORA:
        raise VramcalcError("--vision lora needs --method lora (adapters on the vision tower's Linears)")
    if mode is Vision.FULL and method is not Method.FULL:
        raise VramcalcError("--vision full needs --method full (with --method lora the tower is frozen or adapted)")
    unsupported = [(values["precision"].is_mixed, f"--precision {values['precision'].value}"),
                   (values["sharding"] is not Sharding.NONE, f"--sharding {values['sharding'].value}"),
                   (values["task"] is not Task.SFT, f"--task {values['task'].value}"),
                   (values["packing"], "--packing"), (values["compile"], "--compile"),
                   (values["activation_offload"], "--activation-offload"),
                   (values["kernels"].value != "none", f"--kernels {values['kernels'].value}"),
                   (values["optimizer_in_backward"], "--optimizer-in-backward"),
                   (values["stack"].value != "hf", f"--stack {values['stack'].value}"),
                   (values["precision"] is Precision.FP8, "--precision fp8")]
    for bad, word in unsupported:
        if bad:
            raise VramcalcError(f"images with {word} are not modelled yet (vision-language models are estimated for "
                                "one GPU, --task sft, the hf stack, 16- or 32-bit precision without autocast)")
    tiles = vision.tiles(size, tokens)
    image_tokens = images * vision.tokens_per_image(size, tokens)
    if image_tokens > values["seq_len"]:
        raise VramcalcError(f"--seq-len {values['seq_len']} is shorter than the image tokens it must hold: {images} "
                            f"image(s) x {tiles} tile(s) x {image_tokens // images // tiles} tokens = {image_tokens} "
                            "(--seq-len counts every token the language model sees, image tokens included)")
    values.update(images=images, image_size=size, image_tokens=tokens, vision=mode)


def image_tokens_per_sample(vision: VisionSpec, setup) -> int:
    """Image tokens one sample puts in the language model's sequence (part of ``seq_len``)."""
    return setup.images * vision.tokens_per_image(setup.image_size, setup.image_tokens)


def tiles_per_sample(vision: VisionSpec, setup) -> int:
    """Tiles the vision tower encodes per sample (its batch is batch_size times this)."""
    return setup.images * vision.tiles(setup.image_size, setup.image_tokens)
