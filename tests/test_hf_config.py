"""Any Hugging Face config.json works as MODEL for the supported families; bad ones get a one-line answer."""

import json

import pytest

from vramcalc import catalogue, estimate
from vramcalc.errors import VramcalcError
from vramcalc.hf_config import load_config

# Public config.json field values (shared/reference/models_ref.csv rows and their S-sources)
CONFIGS = {
    "llama": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072},
    "qwen2": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
              "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False},
    "qwen3_moe": {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48,
                  "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
                  "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "mlp_only_layers": [],
                  "decoder_sparse_step": 1},
    "gemma2": {"model_type": "gemma2", "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42,
               "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 256000},
    "deepseek_v3": {"model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432,
                    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
                    "vocab_size": 129280, "n_routed_experts": 256, "num_experts_per_tok": 8,
                    "moe_intermediate_size": 2048, "n_shared_experts": 1, "first_k_dense_replace": 3,
                    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                    "v_head_dim": 128},
}
SAME_AS = {"llama": "llama-3.1-8b", "qwen2": "qwen2.5-7b", "qwen3_moe": "qwen3-30b-a3b", "gemma2": "gemma-2-9b",
           "deepseek_v3": "deepseek-v3"}


@pytest.mark.parametrize("family", CONFIGS)
def test_config_json_counts_like_the_catalogue_row(tmp_path, family):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIGS[family]))
    assert load_config(path).params == catalogue.get_model(SAME_AS[family]).params


def test_a_folder_holding_config_json_works_as_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["llama"]))
    from_folder = estimate(str(tmp_path), seq_len=1024)
    from_catalogue = estimate("llama-3.1-8b", seq_len=1024)
    assert from_folder.peak_tensor_bytes == from_catalogue.peak_tensor_bytes


def test_malformed_config_is_a_one_line_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(VramcalcError, match="not valid JSON"):
        load_config(path)


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size"])
def test_missing_field_is_named(tmp_path, field):
    config = dict(CONFIGS["llama"])
    del config[field]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(VramcalcError, match=field):
        load_config(path)


def test_missing_moe_field_is_named(tmp_path):
    config = dict(CONFIGS["qwen3_moe"])
    del config["num_experts"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(VramcalcError, match="num_experts"):
        load_config(path)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "gpt2", "n_embd": 768}))
    with pytest.raises(VramcalcError, match="unsupported architecture 'gpt2'; supported: llama"):
        load_config(path)
