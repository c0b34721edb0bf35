"""Trace Qwen2.5-VL: the real ``Qwen2_5_VLForConditionalGeneration`` on fake tensors, with the batch its processor
makes.

The batch: ``pixel_values`` [sum of patches, C·T·p·p] in fp32 (``Qwen2VLImageProcessor`` output), ``image_grid_thw``
[b·images, 3] = (1, grid_h, grid_w) per image, and ``input_ids`` whose first tokens per sample are each image's tokens followed by one text token (as
``<|vision_end|>`` follows each image: ``get_rope_index`` gives each run of image tokens its own grid).

Three computations of the real code read tensor values, which fake tensors do not have; each is done once on real
tensors by transformers' own functions (outside the fake mode) and handed in:
- the tower's indices (``vision_utils.get_vision_window_index``, ``get_vision_position_ids``,
  ``get_vision_attention_seqlens``), through the precomputed-kwargs path those functions offer (their ``kwargs``
  argument), as ``Qwen2_5_VisionTransformerPretrainedModel.forward`` passes its own;
- the language model's 3-D M-RoPE position ids (``Qwen2_5_VLModel.get_rope_index`` on the real ``input_ids`` and
  ``mm_token_type_ids``), passed as ``position_ids`` as a collator may;
- the per-window split of ``Qwen2_5_VLVisionAttention.forward``'s SDPA branch (``lengths.tolist()``): the trace runs
  that branch line for line with the window lengths computed on the real ``cu_seqlens``;
and ``get_image_features``' ``split_sizes`` likewise. The tensors, kernels and saved tensors are the real code's.
"""

from __future__ import annotations

import contextlib

import torch

from ..vision_qwen import image_grid


def qwen_tower_config(vision) -> dict:
    """The ``vision_config`` dict of a Qwen2.5-VL VisionSpec."""
    return dict(model_type="qwen2_5_vl_vision", depth=vision.num_layers, hidden_size=vision.hidden_size,
                intermediate_size=vision.intermediate_size, num_heads=vision.num_heads,
                in_channels=vision.num_channels, patch_size=vision.patch_size,
                spatial_merge_size=vision.scale_factor, temporal_patch_size=vision.temporal_patch_size,
                window_size=vision.window_size, out_hidden_size=vision.out_hidden_size or vision.text_hidden_size,
                fullatt_block_indexes=list(vision.full_attention_blocks))


def mrope_section(head_dim: int) -> list[int]:
    """M-RoPE's (t, h, w) split of the head_dim / 2 frequencies, in Qwen2.5-VL's 16:24:24 proportion (any split
    sums to head_dim / 2 and gives the same tensor shapes)."""
    hw = 3 * head_dim // 16
    return [head_dim // 2 - 2 * hw, hw, hw]


def qwen_text_config(text: dict, vision) -> dict:
    """The Qwen2 text config dict as ``Qwen2_5_VLTextConfig``'s: its model_type and an M-RoPE section."""
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    out = {k: v for k, v in text.items() if k not in ("model_type", "architectures", "rope_scaling")}
    rope = dict(text.get("rope_parameters") or {})
    rope.update(rope_type="default", mrope_section=mrope_section(head_dim))
    out.update(model_type="qwen2_5_vl_text", rope_parameters=rope)
    return out


def _inner(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


@contextlib.contextmanager
def qwen_image_inputs(model, vision, setup, input_ids: torch.Tensor, image_token_id: int):
    """The image part of the batch (``pixel_values``, ``image_grid_thw``, the M-RoPE ``position_ids``), with the
    tower's data-dependent steps precomputed (module docstring) while the step runs."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from transformers import vision_utils

    inner = _inner(model)
    visual = inner.visual
    attention = type(visual.blocks[0].attn)
    b = input_ids.shape[0]
    grid_h, grid_w = image_grid(vision, setup.image_size, setup.image_tokens)
    per_image = grid_h * grid_w
    count = b * setup.images
    tokens = setup.images * per_image // vision.scale_factor ** 2
    with unset_fake_temporarily():
        grid = torch.tensor([[1, grid_h, grid_w]] * count, dtype=torch.long)
        ids = torch.zeros(b, input_ids.shape[1], dtype=torch.long)
        per = tokens // setup.images  # each image's tokens, one text token (<|vision_end|>) after each
        for i in range(setup.images):
            ids[:, i * (per + 1):i * (per + 1) + per] = image_token_id
        token_types = (ids == image_token_id).int()
        position_ids, _ = inner.get_rope_index(ids, token_types, image_grid_thw=grid)
        pre = {}
        pre["position_ids"] = vision_utils.get_vision_position_ids(grid, visual.spatial_merge_size)
        pre["cu_seqlens"], _ = vision_utils.get_vision_attention_seqlens(grid, visual.config)
        pre["window_index"], pre["cu_window_seqlens"] = vision_utils.get_vision_window_index(
            grid, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
            patch_size=visual.patch_size)
        lengths = {id(cu): (cu[1:] - cu[:-1]).tolist() for cu in (pre["cu_seqlens"], pre["cu_window_seqlens"])}
        split_sizes = (grid.prod(-1) // visual.spatial_merge_size ** 2).tolist()
    pixel_values = torch.zeros(count * per_image, vision.num_channels * vision.temporal_patch_size
                               * vision.patch_size ** 2)

    def get_image_features(pixel_values, image_grid_thw=None, **kwargs):
        """``Qwen2_5_VLModel.get_image_features`` (L1012-1025) with the tower's indices handed in."""
        pixel_values = pixel_values.type(visual.dtype)
        outputs = visual(pixel_values, grid_thw=image_grid_thw, **dict(pre), **kwargs)
        outputs.pooler_output = torch.split(outputs.pooler_output, split_sizes)
        return outputs

    original = attention.forward

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
        """``Qwen2_5_VLVisionAttention.forward`` (L270-339), its SDPA/eager branch, the window lengths known."""
        from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as modeling

        seq_length = hidden_states.shape[0]
        query_states, key_states, value_states = (
            self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0))
        cos, sin = position_embeddings
        query_states, key_states = modeling.apply_rotary_pos_emb_vision(query_states, key_states, cos, sin)
        query_states = query_states.transpose(0, 1).unsqueeze(0)
        key_states = key_states.transpose(0, 1).unsqueeze(0)
        value_states = value_states.transpose(0, 1).unsqueeze(0)
        attention_interface = modeling.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, modeling.eager_attention_forward)
        split = lengths[id(cu_seqlens)]
        splits = [torch.split(tensor, split, dim=2) for tensor in (query_states, key_states, value_states)]
        attn_outputs = [attention_interface(self, q, k, v, attention_mask=None, scaling=self.scaling,
                                            dropout=0.0 if not self.training else self.attention_dropout,
                                            is_causal=False, **kwargs)[0]
                        for q, k, v in zip(*splits)]
        attn_output = torch.cat(attn_outputs, dim=1)
        attn_output = attn_output.reshape(seq_length, -1).contiguous()
        return self.proj(attn_output)

    inner.get_image_features = get_image_features
    attention.forward = forward
    try:
        yield dict(pixel_values=pixel_values, image_grid_thw=grid, position_ids=position_ids)
    finally:
        attention.forward = original
        del inner.get_image_features
