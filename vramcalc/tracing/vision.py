"""Trace a vision-language model: the real ``AutoModelForImageTextToText`` on fake tensors, with pixel values.

The model is the one transformers 5.25 builds from the VLM config (SmolVLM, Idefics3, Gemma-3), in the setup's
dtype; the method is applied as a user would: ``--vision full`` trains every parameter, ``frozen`` turns the tower's
and projector's ``requires_grad`` off (full) or restricts LoRA's targets to the language model (a regular expression
over its module paths), ``lora`` gives peft the language model's target names as they are (so they match the
tower's Linears too) or ``"all-linear"`` itself. The batch: ``input_ids`` whose first image tokens per sample are the
config's image token (``labels = input_ids``, as the text trace), ``pixel_values`` in fp32 as image processors return
them ([b, images·tiles, C, P, P] for SmolVLM/Idefics3, [b·images, C, P, P] for Gemma-3) and, for Gemma-3, the
processor's ``token_type_ids`` (1 on image tokens), which give its language model the bidirectional image masks.

SmolVLM's and Idefics3's ``get_image_features`` drop all-zero padding images with a boolean index (a data-dependent
shape that fake tensors cannot take); the trace runs the same method without that filter (every image of a training
batch is real): the same ``.to(dtype)`` copy reaches the tower, and the same patch mask, connector and split follow.
"""

from __future__ import annotations

import contextlib
import functools
import re

import torch
from torch import nn

from ..errors import VramcalcError
from ..model import ModelSpec
from ..options import Method, Vision
from ..training_setup import ResolvedSetup
from ..vision import image_tokens_per_sample, tiles_per_sample
from ..vision_qwen import QWEN_FAMILIES
from .build import _ATTN_IMPLEMENTATION, _cast_adapters, _load_dtype, _materialise, _quiet, hf_config
from .step import PhaseHooks, StepTracer, check_traceable_knobs

IMAGE_TOKEN_ID = 3  # a token id inside every vocabulary; the config's image token is set to it
_LANGUAGE_MODEL = {"smolvlm": "text_model", "idefics3": "text_model", "gemma3": "language_model",
                   "qwen2_5_vl": "language_model", "mllama": "language_model"}


def vlm_config(spec: ModelSpec):
    """The transformers config of the VLM: the language model's config (``build.hf_config``) nested with the tower's."""
    from transformers import AutoConfig

    vision = spec.vision
    if vision.family == "mllama":  # cross-attention layers and a tiled tower (tracing/vision_mllama.py)
        from .vision_mllama import mllama_config

        return mllama_config(spec)
    text = hf_config(spec).to_dict()
    if vision.family in QWEN_FAMILIES:  # Qwen2.5-VL (tracing/vision_qwen.py)
        from .vision_qwen import qwen_text_config, qwen_tower_config

        return AutoConfig.for_model(vision.family, text_config=qwen_text_config(text, vision),
                                    vision_config=qwen_tower_config(vision), use_cache=False,
                                    tie_word_embeddings=spec.tie_word_embeddings, image_token_id=IMAGE_TOKEN_ID,
                                    video_token_id=IMAGE_TOKEN_ID + 1, vision_start_token_id=IMAGE_TOKEN_ID + 2,
                                    vision_end_token_id=IMAGE_TOKEN_ID + 3)
    tower = dict(hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
                 num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_heads,
                 image_size=vision.image_size, patch_size=vision.patch_size, num_channels=vision.num_channels)
    if vision.family == "gemma3":
        tower.update(model_type="siglip_vision_model", vision_use_head=vision.use_head)
        outer = dict(mm_tokens_per_image=vision.mm_tokens_per_image, image_token_index=IMAGE_TOKEN_ID,
                     boi_token_index=IMAGE_TOKEN_ID + 1, eoi_token_index=IMAGE_TOKEN_ID + 2)
    else:
        outer = dict(scale_factor=vision.scale_factor, image_token_id=IMAGE_TOKEN_ID)
    # use_cache off as in the text trace (build.hf_config): SmolVLMModel.forward builds a DynamicCache from the outer
    # config's use_cache (default True) even in training, a cost the estimate does not count
    return AutoConfig.for_model(vision.family, text_config=text, vision_config=tower, use_cache=False,
                                tie_word_embeddings=spec.tie_word_embeddings, **outer)


def _lora_targets(spec: ModelSpec, resolved: ResolvedSetup):
    """peft ``target_modules``: the language model's names (which match the tower's by suffix), ``"all-linear"``, or
    under ``--vision frozen`` a regular expression that only the language model's module paths match."""
    setup = resolved.setup
    names = list(resolved.lora_modules)
    if setup.vision is Vision.FROZEN or not setup.images:
        inner = _LANGUAGE_MODEL[spec.vision.family]
        return rf".*\.{inner}\..*\.({'|'.join(re.escape(name) for name in names)})"
    if setup.lora_targets == ("all-linear",):
        return "all-linear"
    return names


def build_vlm(spec: ModelSpec, resolved: ResolvedSetup, fake_mode, device: str = "cpu") -> nn.Module:
    """The VLM with the setup's method and ``--vision`` applied, materialised on fake CPU tensors."""
    from transformers import AutoModelForImageTextToText

    setup = resolved.setup
    try:
        with _quiet(), torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(
                vlm_config(spec), dtype=_load_dtype(resolved),
                attn_implementation=_ATTN_IMPLEMENTATION[resolved.attn_used])
            if setup.method is Method.LORA:
                from peft import LoraConfig, get_peft_model

                config = LoraConfig(r=setup.lora_rank, lora_alpha=setup.lora_rank, lora_dropout=setup.lora_dropout,
                                    target_modules=_lora_targets(spec, resolved), bias="none", task_type="CAUSAL_LM")
                model = get_peft_model(model, config, autocast_adapter_dtype=setup.adapter_dtype.value == "fp32")
                _cast_adapters(model, resolved)
            else:
                model.requires_grad_(True)
                if setup.vision is Vision.FROZEN or not setup.images:
                    for module in _tower_modules(model):
                        module.requires_grad_(False)
    except ImportError:
        raise
    except Exception as err:  # transformers and peft raise many types for configs they cannot build
        raise VramcalcError(f"transformers cannot build {spec.name} ({spec.vision.family}): {err}"
                            .splitlines()[0]) from None
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        _materialise(model, device)
    if setup.grad_ckpt:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    _patch_image_features(model)
    return model


def _inner(model: nn.Module) -> nn.Module:
    """The ``*Model`` under the ``*ForConditionalGeneration`` (under a peft wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


def _tower_modules(model: nn.Module) -> list[nn.Module]:
    inner = _inner(model)
    return [getattr(inner, name) for name in ("vision_model", "connector", "vision_tower", "multi_modal_projector",
                                                    "visual")
            if hasattr(inner, name)]


def language_layers(model: nn.Module) -> nn.ModuleList:
    inner = _inner(model)
    return getattr(inner, "text_model", None).layers if hasattr(inner, "text_model") else inner.language_model.layers


def _patch_image_features(model: nn.Module) -> None:
    """SmolVLM / Idefics3: ``get_image_features`` without the padding-image filter (module docstring)."""
    inner = _inner(model)
    if not hasattr(inner, "connector"):
        return

    def get_image_features(pixel_values, pixel_attention_mask=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        batch_size, num_images = pixel_values.shape[:2]
        pixel_values = pixel_values.to(dtype=inner.dtype)  # fp16 compatibility (as the original)
        pixel_values = pixel_values.view(batch_size * num_images, *pixel_values.shape[2:])
        patch_size = inner.config.vision_config.patch_size
        mask = torch.ones([pixel_values.shape[i] for i in (0, 2, 3)], dtype=torch.bool, device=pixel_values.device)
        subgrid = mask.unfold(dimension=1, size=patch_size, step=patch_size)
        subgrid = subgrid.unfold(dimension=2, size=patch_size, step=patch_size)
        patch_attention_mask = (subgrid.sum(dim=(-1, -2)) > 0).bool()
        outputs = inner.vision_model(pixel_values=pixel_values, patch_attention_mask=patch_attention_mask,
                                     return_dict=True)
        features = inner.connector(outputs.last_hidden_state)
        pooled = [f.reshape(-1, f.shape[-1]) for f in features.split([num_images] * batch_size)]
        return BaseModelOutputWithPooling(last_hidden_state=outputs.last_hidden_state, pooler_output=pooled)

    inner.get_image_features = get_image_features


@contextlib.contextmanager
def _unmasked_tower(model: nn.Module):
    """SmolVLM / Idefics3: the tower's all-ones patch mask as a GPU sees it. ``create_bidirectional_mask`` skips an
    all-ones mask for SDPA (``masking_utils._ignore_bidirectional_mask_sdpa``: ``padding_mask.all()``), so the tower
    runs SDPA's flash kernel without a mask; on fake tensors ``is_tracing`` forbids that check and a 4-D mask would
    be built. While the trace runs, the modeling module's ``create_bidirectional_mask`` returns None (every image of
    the batch is whole: the mask is all ones)."""
    import sys

    inner = _inner(model)
    tower = getattr(inner, "vision_model", None)
    module = sys.modules[type(tower).__module__] if tower is not None else None
    original = getattr(module, "create_bidirectional_mask", None)
    if original is None:
        yield
        return
    module.create_bidirectional_mask = lambda *args, **kwargs: None
    try:
        yield
    finally:
        module.create_bidirectional_mask = original


class VisionStepTracer(StepTracer):
    """The HF step on a VLM: the language model's decoder layers mark the phases; the batch carries images."""

    def _install_knobs(self) -> None:
        check_traceable_knobs(self.setup)

    def _install_phase_hooks(self) -> None:
        self.phases = PhaseHooks(self.tracker, language_layers(self.model), [self.head], self.model.parameters())
        self._hooks.extend(self.phases.handles)

    def _loss(self, input_ids: torch.Tensor, position_ids=None):
        def logits_begin():
            self.tracker.in_logits = True

        forward = functools.partial(self.forward_module, **self.image_inputs)
        return self.loss(forward, input_ids, on_logits=logits_begin)

    def _run(self, steps: int, progress, position_ids) -> None:
        setup, vision = self.setup, self.spec.vision
        b, s = setup.batch_size, setup.seq_len
        tokens = image_tokens_per_sample(vision, setup)
        input_ids = torch.zeros(b, s, dtype=torch.long)
        input_ids[:, :tokens] = IMAGE_TOKEN_ID
        tiles = tiles_per_sample(vision, setup)
        if not tiles:  # a text-only batch through the VLM
            self.image_inputs = {}
            return self._steps(steps, progress, input_ids)
        if vision.family in QWEN_FAMILIES:  # the processor's patches and grids (tracing/vision_qwen.py)
            from .vision_qwen import qwen_image_inputs

            with qwen_image_inputs(self.model, vision, setup, input_ids, IMAGE_TOKEN_ID) as self.image_inputs:
                self._steps(steps, progress, input_ids)
            del self.image_inputs
            return
        shape = (vision.num_channels, vision.image_size, vision.image_size)
        if vision.family == "mllama":  # tracing/vision_mllama.py
            from .vision_mllama import IMAGE_TOKEN_ID as MLLAMA_IMAGE, image_inputs

            input_ids[:, :setup.images] = MLLAMA_IMAGE
            self.image_inputs = image_inputs(self.spec, setup)
        elif vision.family == "gemma3":
            pixel_values = torch.zeros(b * tiles, *shape)
            token_type_ids = torch.zeros(b, s, dtype=torch.long)
            token_type_ids[:, :tokens] = 1
            self.image_inputs = dict(pixel_values=pixel_values, token_type_ids=token_type_ids)
        else:
            self.image_inputs = dict(pixel_values=torch.zeros(b, tiles, *shape))
        with _unmasked_tower(self.model):
            self._steps(steps, progress, input_ids)
        del self.image_inputs
