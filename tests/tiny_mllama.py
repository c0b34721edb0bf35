"""Small but real Llama-3.2-Vision (``mllama``) configs, and the published Llama-3.2-11B-Vision config.json.

The tiny tower keeps the real one's structure (local transformer whose intermediate layers are concatenated, a gated
global transformer, 4 tiles, 8 aspect ratios) at 32-px tiles of 8-px patches (17 patches with the class token, padded
to 24); the language model has 4 layers, 2 of them cross-attention."""

TINY_MLLAMA = dict(
    model_type="mllama", image_token_index=2000,
    text_config=dict(model_type="mllama_text_model", hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=512, vocab_size=2048, cross_attention_layers=[1, 3],
                     pad_token_id=0, bos_token_id=1, eos_token_id=2),
    vision_config=dict(model_type="mllama_vision_model", hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                       num_global_layers=2, attention_heads=4, image_size=32, patch_size=8, max_num_tiles=4,
                       intermediate_layers_indices=[1, 3], vision_output_dim=3 * 128))

# meta-llama/Llama-3.2-11B-Vision config.json (https://huggingface.co/meta-llama/Llama-3.2-11B-Vision/blob/main/
# config.json, the fields that shape the model; the rest take MllamaConfig's defaults, which equal the file's)
LLAMA_32_11B_VISION = dict(
    model_type="mllama", image_token_index=128256,
    text_config=dict(model_type="mllama_text_model", hidden_size=4096, num_hidden_layers=40, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
                     rope_scaling=dict(factor=8.0, high_freq_factor=4.0, low_freq_factor=1.0,
                                       original_max_position_embeddings=8192, rope_type="llama3"),
                     max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                     cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38]),
    vision_config=dict(model_type="mllama_vision_model", hidden_size=1280, intermediate_size=5120,
                       num_hidden_layers=32, num_global_layers=8, attention_heads=16, image_size=560, patch_size=14,
                       max_num_tiles=4, intermediate_layers_indices=[3, 7, 15, 23, 30], vision_output_dim=7680,
                       supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
                       norm_eps=1e-5))
