"""Configs that nest the language model (``text_config``: llava, mistral3, gemma3, Qwen2.5-VL) are read from the
nested dict when its ``model_type`` is a supported family, and refused in one line that says what to do otherwise."""

import dataclasses

import pytest

from vramcalc.errors import VramcalcError
from vramcalc.hf_config import spec_from_config

# HuggingFaceTB/SmolLM2-135M config.json (data/models_sources.md S1)
SMOL = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
        "num_hidden_layers": 30, "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
        "tie_word_embeddings": True}
# a llava-style wrapper (transformers LlavaConfig: text_config, vision_config, image_token_index)
LLAVA = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"], "_name_or_path": "org/vlm",
         "image_token_index": 49151, "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152},
         "text_config": SMOL}


def test_the_nested_language_model_is_read_as_if_it_stood_alone():
    nested = spec_from_config(LLAVA, name="vlm")
    alone = spec_from_config(SMOL, name="vlm")
    assert nested == dataclasses.replace(alone, hf_repo="org/vlm")
    assert nested.params == alone.params == 134_515_008  # models.csv smollm2-135m params_exact
    assert "vision tower not counted" in nested.notes


def test_a_nested_family_with_no_formulas_is_refused_naming_both_types_and_what_to_do():
    # (gemma3_text, mllama and BLIP-2's opt, this test's examples until they gained formulas, are now read:
    # tests/test_families_2026.py, tests/test_vision_mllama.py, tests/test_families_legacy.py)
    blip2 = {"model_type": "blip-2", "text_config": {"model_type": "t5", "d_model": 2048}}
    with pytest.raises(VramcalcError) as caught:
        spec_from_config(blip2, name="blip2-flan-t5-xl")
    line = str(caught.value)
    assert "\n" not in line
    assert line.startswith("unsupported architecture 'blip-2' (language model 't5'); supported: llama")
    assert "vramcalc models" in line


def test_a_text_config_without_a_model_type_is_not_guessed():
    with pytest.raises(VramcalcError, match="unsupported architecture 'llava'"):
        spec_from_config({**LLAVA, "text_config": {k: v for k, v in SMOL.items() if k != "model_type"}})
