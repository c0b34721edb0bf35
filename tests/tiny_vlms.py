"""Small but real vision-language configs (config.json dicts, as the Hub serves them): SmolVLM, Idefics3 and Gemma-3
with a tiny SigLIP tower, each family's connector and a tiny language model, so a trace runs in a second or two."""

_LLAMA = dict(model_type="llama", hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=512, vocab_size=2048)
_TOWER = dict(hidden_size=192, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4, image_size=64,
              patch_size=8)

TINY_VLM = {
    # 64 patches per tile, pixel shuffle 2: 16 image tokens per tile
    "smolvlm": dict(model_type="smolvlm", scale_factor=2, image_token_id=2000, text_config=dict(_LLAMA),
                    vision_config=dict(_TOWER, model_type="smolvlm_vision")),
    "idefics3": dict(model_type="idefics3", scale_factor=2, image_token_id=2000, tie_word_embeddings=True,
                     text_config=dict(_LLAMA), vision_config=dict(_TOWER, model_type="idefics3_vision")),
    # 64 patches average-pooled to 16 tokens; the pooling head as in Gemma-3 checkpoints (vision_use_head false)
    "gemma3": dict(model_type="gemma3", mm_tokens_per_image=16, image_token_index=2000, boi_token_index=2001,
                   eoi_token_index=2002,
                   text_config=dict(model_type="gemma3_text", hidden_size=256, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=512,
                                    vocab_size=2048),
                   vision_config=dict(_TOWER, model_type="siglip_vision_model", vision_use_head=False)),
    # the SiglipVisionConfig default: the attention-pooling head is built (and counted)
    "gemma3-head": dict(model_type="gemma3", mm_tokens_per_image=16, image_token_index=2000,
                        text_config=dict(model_type="gemma3_text", hidden_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                         intermediate_size=512, vocab_size=2048),
                        vision_config=dict(_TOWER, model_type="siglip_vision_model")),
}


def hf_vlm_config(config: dict):
    """The transformers config object of a config.json dict (``AutoConfig.for_model``)."""
    from transformers import AutoConfig

    kwargs = {key: value for key, value in config.items() if key != "model_type"}
    return AutoConfig.for_model(config["model_type"], **kwargs)


def meta_vlm_param_count(config: dict) -> int:
    """``sum(p.numel())`` of the ``AutoModelForImageTextToText`` transformers builds on ``meta`` (tied weights once)."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(hf_vlm_config(config))
    return sum({id(p): p.numel() for p in model.parameters()}.values())

# Qwen2.5-VL: a 4-block tower (blocks 1 and 3 attend over the whole image, 0 and 2 within windows of 56 px = 2 x 2
# merged tokens = 16 patches), patch 14, temporal patch 2, merge 2, and a tiny Qwen2 language model (M-RoPE sections
# sum to head_dim / 2 = 32)
TINY_VLM["qwen2_5_vl"] = dict(
    model_type="qwen2_5_vl", image_token_id=2000, video_token_id=2001, vision_start_token_id=2002,
    vision_end_token_id=2003,
    text_config=dict(model_type="qwen2_5_vl_text", hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=512, vocab_size=2048,
                     rope_scaling=dict(type="mrope", mrope_section=[8, 12, 12])),
    vision_config=dict(model_type="qwen2_5_vl_vision", depth=4, hidden_size=64, intermediate_size=128, num_heads=4,
                       out_hidden_size=256, window_size=56, fullatt_block_indexes=[1, 3]))
# the flat layout of the Hub's Qwen2.5-VL config.json files (text fields at the top level), tied
TINY_VLM["qwen2_5_vl-flat"] = dict(
    model_type="qwen2_5_vl", hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=256, vocab_size=1024, tie_word_embeddings=True, image_token_id=1000,
    rope_scaling=dict(type="mrope", mrope_section=[4, 6, 6]),
    vision_config=dict(depth=3, hidden_size=32, intermediate_size=96, num_heads=2, out_hidden_size=128,
                       fullatt_block_indexes=[2]))
