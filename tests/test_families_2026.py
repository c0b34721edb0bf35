"""Families people fine-tune in 2026 (issue 13, item 2): exact parameter counts against the transformers model built
on ``meta`` from transformers' default config of each model_type (written as config.json and read back) and from
a tiny config, and the estimate within 3% (1% median) of the trace on tiny real configs over the setups of
tests/test_families_devset.py."""

import dataclasses
import json
import statistics

import pytest

from vramcalc.estimator import step_moments
from vramcalc.hf_config import load_config
from vramcalc.model import ModelSpec
from vramcalc.training_setup import resolve_setup

from .conftest import needs_torch
from .test_families_devset import SETUPS
from .tiny_models import default_config_counts, meta_param_count, tiny_counts

TOLERANCE = 0.03  # issue 13: within 3% on each setup
MEDIAN_TOLERANCE = 0.01  # and 1% median over a family's setups

# Tiny configs that keep each family's structure: grouped kv heads, whole-width q/k norms and post-norms (olmo2),
# scalar multipliers (granite), LayerNorm + GELU with biases and a sliding window shorter than some setups'
# sequences (starcoder2), NoPE layers (smollm3), sliding and full layers with per-head q/k norms and four norms
# (gemma3_text); q/k/v biases without o_proj's, fused gate_up, four norms and half-width interleaved rotary (glm4);
# a parallel block with Cohere2LayerNorm, sliding and NoPE full layers (cohere2); biases on every Linear and fp32
# rotary tables copied per layer (ernie4_5)
TINY = {
    "olmo2": ModelSpec(name="tiny-olmo2", family="olmo2", hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=64, intermediate_size=768, vocab_size=2048, qk_norm=True),
    "granite": ModelSpec(name="tiny-granite", family="granite", hidden_size=256, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=64, intermediate_size=768, vocab_size=2048, tie_word_embeddings=True),
    "starcoder2": ModelSpec(name="tiny-starcoder2", family="starcoder2", hidden_size=256, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=64, intermediate_size=1024, vocab_size=2048,
                            tie_word_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True, sliding_window=384),
    # four layers: SmolLM3Config's no_rope_layer_interval 4 makes the last one NoPE
    "smollm3": ModelSpec(name="tiny-smollm3", family="smollm3", hidden_size=256, num_layers=4, num_heads=4,
                         num_kv_heads=2, head_dim=64, intermediate_size=768, vocab_size=2048, tie_word_embeddings=True),
    # one sliding and one full layer (two rotary tables, two eager masks); a window past every setup's sequence
    "gemma3_text": ModelSpec(name="tiny-gemma3", family="gemma3_text", hidden_size=256, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=64, intermediate_size=768, vocab_size=2048,
                             tie_word_embeddings=True, qk_norm=True, sliding_window=2048,
                             layer_types=("sliding_attention", "full_attention")),
    # q/k/v biases, o_proj without, fused gate_up, four norms, partial rotary (half of head_dim)
    "glm4": ModelSpec(name="tiny-glm4", family="glm4", hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=64, intermediate_size=768, vocab_size=2048, qkv_bias=True, rotary_dim=32),
    # parallel block, MHA, sliding and full (NoPE) layers; a window past every setup's sequence
    "cohere2": ModelSpec(name="tiny-cohere2", family="cohere2", hidden_size=256, num_layers=2, num_heads=4,
                         num_kv_heads=4, head_dim=64, intermediate_size=768, vocab_size=2048, tie_word_embeddings=True,
                         sliding_window=2048, layer_types=("sliding_attention", "full_attention")),
    # biases on every Linear, fp32 rotary tables
    "ernie4_5": ModelSpec(name="tiny-ernie4_5", family="ernie4_5", hidden_size=256, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=64, intermediate_size=768, vocab_size=2048,
                          tie_word_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True),
}
FAMILIES = sorted(TINY)
# families whose default config is checked here though their tiny configs live in tests/test_families_devset.py
DEFAULT_CONFIG_FAMILIES = FAMILIES + ["gemma", "phi"]


@needs_torch
@pytest.mark.parametrize("family", DEFAULT_CONFIG_FAMILIES)
def test_default_config_json_count_equals_the_meta_built_transformers_model(family, tmp_path):
    read, built = default_config_counts(family, tmp_path)
    assert read == built


@needs_torch
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_count_equals_the_meta_built_transformers_model(family):
    read, built = tiny_counts(TINY[family])
    assert read == built


def _relative_errors(family):
    from vramcalc.tracing.runner import run_trace

    spec = TINY[family]
    errors = []
    for options in SETUPS:
        resolved = resolve_setup(spec, **options)
        estimated = max(m.tensor_bytes for m in step_moments(spec, resolved))
        traced = sum(run_trace(spec, resolved, progress=False).terms.values())
        errors.append((estimated - traced) / traced)
    return errors


@needs_torch
@pytest.mark.trace
@pytest.mark.parametrize("family", FAMILIES)
def test_estimated_peak_is_within_3_percent_of_the_trace_on_every_setup(family):
    errors = _relative_errors(family)
    print(family, " ".join(f"{e:+.4f}" for e in errors))
    assert max(abs(e) for e in errors) < TOLERANCE, errors
    assert statistics.median(abs(e) for e in errors) < MEDIAN_TOLERANCE, errors


@needs_torch
def test_the_tiny_smollm3_trace_has_a_nope_layer():
    import torch
    from transformers import AutoModelForCausalLM

    from vramcalc.tracing.build import hf_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(TINY["smollm3"]))
    assert [layer.self_attn.use_rope for layer in model.model.layers] == [1, 1, 1, 0]


def test_smollm3_sliding_window_is_refused_in_one_line():
    from vramcalc.errors import VramcalcError
    from vramcalc.hf_config import spec_from_config

    config = dict(model_type="smollm3", hidden_size=64, num_attention_heads=4, num_hidden_layers=4,
                  intermediate_size=128, vocab_size=100, use_sliding_window=True, sliding_window=32)
    with pytest.raises(VramcalcError, match="use_sliding_window"):
        spec_from_config(config)


@needs_torch
def test_a_gemma3_checkpoint_text_config_with_class_defaults_counts_like_transformers(tmp_path):
    # google/gemma-3-4b-it config.json: text_config lists only what differs from Gemma3TextConfig's defaults
    from transformers import AutoConfig

    text = {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
            "sliding_window": 1024}
    wrapper = {"model_type": "gemma3", "text_config": text}
    (tmp_path / "config.json").write_text(json.dumps(wrapper))
    spec = load_config(tmp_path)
    assert spec.family == "gemma3_text" and spec.num_heads == 8 and spec.num_kv_heads == 4 and spec.head_dim == 256
    assert spec.params == meta_param_count(AutoConfig.for_model(**text))


# Past the window (issue 13 item 4): the sliding layers get transformers' 4-D sliding mask (SDPA's memory-efficient
# kernel saves it, grouped k and v are repeated) while the full layers keep the flash path without one
WINDOWED = {family: dataclasses.replace(TINY[family], name=f"{TINY[family].name}-window", sliding_window=256)
            for family in ("gemma3_text", "cohere2")}
WINDOWED_SETUPS = [dict(seq_len=512), dict(seq_len=512, method="lora"),
                   dict(seq_len=512, method="lora", grad_ckpt=True), dict(seq_len=512, method="qlora", grad_ckpt=True),
                   dict(seq_len=384, attn="eager")]


def test_past_the_window_only_the_sliding_layers_are_masked():
    from vramcalc.terms.activations import layer_masks

    spec = WINDOWED["gemma3_text"]
    assert layer_masks(spec, True) == (True, False) and layer_masks(spec, False) == (False, False)
    mistral = ModelSpec(name="m", family="mistral", hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                        head_dim=16, intermediate_size=128, vocab_size=100, sliding_window=32)
    assert layer_masks(mistral, True) == (True,) * 3


@needs_torch
@pytest.mark.trace
@pytest.mark.parametrize("family", sorted(WINDOWED))
def test_past_the_window_the_estimate_is_within_3_percent_of_the_trace(family):
    from vramcalc.tracing.runner import run_trace

    spec = WINDOWED[family]
    errors = []
    for options in WINDOWED_SETUPS:
        resolved = resolve_setup(spec, **options)
        estimated = max(m.tensor_bytes for m in step_moments(spec, resolved))
        traced = sum(run_trace(spec, resolved, progress=False).terms.values())
        errors.append((estimated - traced) / traced)
    print(family, " ".join(f"{e:+.4f}" for e in errors))
    assert max(abs(e) for e in errors) < TOLERANCE, errors


@needs_torch
@pytest.mark.parametrize("head_dim", [None, 32])
def test_cohere2_head_dim_is_the_config_s_or_hidden_over_heads(tmp_path, head_dim):
    # Cohere2Config.__post_init__ sets head_dim = hidden_size // num_attention_heads (configuration_cohere2.py L92),
    # then a head_dim given in config.json overrides it (PreTrainedConfig sets the remaining kwargs afterwards)
    from transformers import AutoConfig

    fields = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
                  intermediate_size=512, vocab_size=1000)
    if head_dim:
        fields["head_dim"] = head_dim
    (tmp_path / "config.json").write_text(json.dumps(dict(model_type="cohere2", **fields)))
    spec = load_config(tmp_path)
    assert spec.head_dim == (head_dim or 64) and spec.layer_types.count("full_attention") == 1
    assert spec.params == meta_param_count(AutoConfig.for_model("cohere2", **fields))


def test_glm4_rotary_width_is_the_partial_rotary_factor_of_head_dim(tmp_path):
    # Glm4Config: partial_rotary_factor 0.5 unless the config sets one (configuration_glm4.py L76)
    base = dict(model_type="glm4", hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                intermediate_size=512, vocab_size=1000, head_dim=64)
    (tmp_path / "config.json").write_text(json.dumps(base))
    assert load_config(tmp_path).rope_dim == 32
    (tmp_path / "config.json").write_text(json.dumps(dict(base, rope_parameters={"partial_rotary_factor": 1.0})))
    assert load_config(tmp_path).rope_dim == 64
