"""Trace Llama-3.2-Vision (``mllama``): the transformers config and the processor-shaped image inputs.

The batch, as ``MllamaProcessor`` makes it for ``images`` images per sample (``image_processing_mllama.py``
``pad_batches_and_tiles``, ``build_aspect_ratio_mask``, ``convert_aspect_ratios_to_ids``; ``processing_mllama.py``
``convert_sparse_cross_attention_mask_to_dense``): ``pixel_values`` fp32 [b, images, T, C, P, P] (every image padded to
T = max_num_tiles tiles), ``aspect_ratio_ids`` int64 [b, images], ``aspect_ratio_mask`` int64 [b, images, T] and
``cross_attention_mask`` int64 [b, s, images, T]; the first ``images`` tokens of each sample are ``<|image|>``.
Values do not matter on fake tensors; shapes and dtypes are the processor's.
"""

from __future__ import annotations

import torch

from ..model import ModelSpec
from .build import hf_config

IMAGE_TOKEN_ID = 3


def mllama_config(spec: ModelSpec):
    """``MllamaConfig`` of the spec: the Llama text fields with the cross-attention layers put back, and the tower."""
    from transformers import AutoConfig

    vision = spec.vision
    text = hf_config(spec).to_dict()
    text.pop("model_type", None)
    text.update(model_type="mllama_text_model", num_hidden_layers=vision.text_layers,
                cross_attention_layers=list(vision.cross_layers), use_cache=False)
    tower = dict(model_type="mllama_vision_model", hidden_size=vision.hidden_size,
                 intermediate_size=vision.intermediate_size, num_hidden_layers=vision.num_layers,
                 num_global_layers=vision.num_global_layers, attention_heads=vision.num_heads,
                 image_size=vision.image_size, patch_size=vision.patch_size, max_num_tiles=vision.max_num_tiles,
                 vision_output_dim=vision.vision_output_dim,
                 intermediate_layers_indices=list(vision.intermediate_layers), num_channels=vision.num_channels)
    return AutoConfig.for_model("mllama", text_config=text, vision_config=tower, use_cache=False,
                                image_token_index=IMAGE_TOKEN_ID)


def image_inputs(spec: ModelSpec, setup) -> dict:
    """The processor's image tensors for the setup's batch (module docstring)."""
    vision = spec.vision
    b, s, n, T = setup.batch_size, setup.seq_len, setup.images, vision.max_num_tiles
    P = vision.image_size
    return dict(pixel_values=torch.zeros(b, n, T, vision.num_channels, P, P),
                aspect_ratio_ids=torch.ones(b, n, dtype=torch.long),
                aspect_ratio_mask=torch.ones(b, n, T, dtype=torch.long),
                cross_attention_mask=torch.ones(b, s, n, T, dtype=torch.long))
