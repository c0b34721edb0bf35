"""MoE families people fine-tune in 2026 (issue 13, item 2): qwen2_moe, deepseek_v2, gpt_oss, llama4_text. Exact
parameter counts against the transformers model built on ``meta`` from transformers' default config of each
model_type (written as config.json and read back) and from a tiny config, and the estimate within 3% (1% median) of
the trace on tiny real configs over the setups of tests/test_families_devset.py."""

import statistics

import pytest

from vramcalc.estimator import step_moments
from vramcalc.hf_config import load_config
from vramcalc.model import ModelSpec
from vramcalc.training_setup import resolve_setup

from .conftest import needs_torch
from .test_families_devset import SETUPS
from .tiny_models import default_config_counts, tiny_counts

TOLERANCE = 0.03  # issue 13: within 3% on each setup
MEDIAN_TOLERANCE = 0.01  # and 1% median over a family's setups

# Tiny configs that keep each family's structure
TINY = {
    # a dense layer then a MoE layer (decoder_sparse_step 2), q/k/v biases, a shared expert and its sigmoid gate
    "qwen2_moe": ModelSpec(name="tiny-qwen2-moe", family="qwen2_moe", hidden_size=256, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=64, intermediate_size=512, vocab_size=2048, qkv_bias=True,
                           num_experts=8, experts_per_token=2, moe_intermediate_size=96, n_shared_experts=1,
                           shared_expert_intermediate_size=192, decoder_sparse_step=2),
    # tests/tiny_models.py's DeepSeek-V3 shape: a dense layer, then MoE layers with a shared expert; MLA with q_lora
    "deepseek_v2": ModelSpec(name="tiny-deepseek-v2", family="deepseek_v2", hidden_size=256, num_layers=3,
                             num_heads=4, num_kv_heads=4, head_dim=32, intermediate_size=512, vocab_size=2048,
                             num_experts=8, experts_per_token=2, moe_intermediate_size=64, n_shared_experts=1,
                             first_k_dense_replace=1, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
                             qk_rope_head_dim=16, v_head_dim=32),
    # a sliding then a full layer (window 128, shorter than every setup's sequence), sinks, biases everywhere
    "gpt_oss": ModelSpec(name="tiny-gpt-oss", family="gpt_oss", hidden_size=256, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=64, intermediate_size=192, vocab_size=2048, qkv_bias=True,
                         o_bias=True, num_experts=8, experts_per_token=2, sliding_window=128,
                         layer_types=("sliding_attention", "full_attention")),
    # dense, MoE, dense, MoE (interleave step 2); three chunked RoPE layers with the weightless q/k norm, then a
    # NoPE full-attention layer; a chunk longer than every setup's sequence; one expert per token, a shared expert
    "llama4_text": ModelSpec(name="tiny-llama4", family="llama4_text", hidden_size=256, num_layers=4, num_heads=4,
                             num_kv_heads=2, head_dim=64, intermediate_size=512, vocab_size=2048, qk_norm=True,
                             num_experts=4, experts_per_token=1, moe_intermediate_size=96, n_shared_experts=1,
                             decoder_sparse_step=2, sliding_window=2048,
                             layer_types=("chunked_attention",) * 3 + ("full_attention",), nope_layers=(3,)),
}
FAMILIES = sorted(TINY)
# Class defaults a default config leaves unset (None) that the model needs to run, with the published value used
# (DeepseekV2Config.num_experts_per_tok defaults to None, configuration_deepseek_v2.py L115; DeepSeek-V2's
# config.json sets 6)
DEFAULT_CONFIG_GAPS: dict[str, dict] = {"deepseek_v2": {"num_experts_per_tok": 6}}


@needs_torch
@pytest.mark.parametrize("family", FAMILIES)
def test_default_config_json_count_equals_the_meta_built_transformers_model(family, tmp_path):
    read, built = default_config_counts(family, tmp_path, **DEFAULT_CONFIG_GAPS.get(family, {}))
    assert read == built


@needs_torch
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_count_equals_the_meta_built_transformers_model(family):
    read, built = tiny_counts(TINY[family])
    assert read == built


# Known gaps, kept as claims (strict xfail). (deepseek_v2 LoRA all-linear was one until peft 0.21's MoE target
# conversion was modelled: terms/moe_lora.py, tests/test_moe_lora_conversion.py.)
KNOWN_GAPS: dict = {}
CASES = [pytest.param(family, index, marks=KNOWN_GAPS.get((family, index), ()),
                      id=f"{family}-{'-'.join(f'{k}={v}' for k, v in SETUPS[index].items())}")
         for family in FAMILIES for index in range(len(SETUPS))]


def _relative_error(family, index):
    from vramcalc.tracing.runner import run_trace

    spec = TINY[family]
    resolved = resolve_setup(spec, **SETUPS[index])
    estimated = max(m.tensor_bytes for m in step_moments(spec, resolved))
    traced = sum(run_trace(spec, resolved, progress=False).terms.values())
    return (estimated - traced) / traced


_ERRORS: dict[tuple[str, int], float] = {}


@needs_torch
@pytest.mark.trace
@pytest.mark.parametrize("family, index", CASES)
def test_estimated_peak_is_within_3_percent_of_the_trace(family, index):
    error = _ERRORS[family, index] = _relative_error(family, index)
    print(family, SETUPS[index], f"{error:+.4f}")
    assert abs(error) < TOLERANCE


@needs_torch
@pytest.mark.trace
@pytest.mark.parametrize("family", FAMILIES)
def test_median_error_over_the_setups_is_under_1_percent(family):
    errors = [_ERRORS.get((family, index)) for index in range(len(SETUPS))]
    errors = [_relative_error(family, index) if error is None else error for index, error in enumerate(errors)]
    assert statistics.median(abs(e) for e in errors) < MEDIAN_TOLERANCE, errors


def test_an_mxfp4_gpt_oss_checkpoint_is_counted_as_the_bf16_model_transformers_trains(tmp_path):
    # openai/gpt-oss-20b config.json fields (24 layers, 32 experts of width 2880, 4 per token, MXFP4 experts)
    import json

    from vramcalc.hf_config import MXFP4_NOTE

    config = {"model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": 24,
              "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "num_local_experts": 32,
              "num_experts_per_tok": 4, "vocab_size": 201088, "sliding_window": 128,
              "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                      "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = load_config(tmp_path)
    assert spec.notes == MXFP4_NOTE and "dequantize=True" in MXFP4_NOTE
    # published total of gpt-oss-20b: 20.9B parameters (OpenAI model card, arXiv 2508.10925 Table 1: 20.91B)
    assert abs(spec.params - 20.91e9) / 20.91e9 < 0.005
    resolved = resolve_setup(spec, method="lora", precision="bf16")
    assert any("MXFP4" in line and "bf16" in line for line in resolved.warnings)
    # the experts are counted at 16 bits each, as Mxfp4Dequantize loads them, not at MXFP4's 4.25 bits
    import vramcalc as vc

    experts = sum(t.total_numel for t in spec.inventory.tensors if t.kind.value == "experts")
    assert vc.estimate(spec, method="lora", precision="bf16", seq_len=128).terms()["weights"] >= 2 * experts


def test_gpt_oss_falls_back_to_eager_under_sdpa_and_its_sinks_are_parameters():
    spec = TINY["gpt_oss"]
    assert resolve_setup(spec, attn="sdpa").attn_used.value == "eager"
    sinks = [t for t in spec.inventory.tensors if t.name == "self_attn.sinks"]
    assert sinks and sinks[0].shape == (spec.num_heads,) and sinks[0].count == spec.num_layers


def test_llama4_past_the_chunk_only_its_chunked_layers_are_masked():
    # chunked (RoPE) layers get create_chunked_causal_mask; the full (NoPE) layer keeps SDPA's is_causal
    import dataclasses

    from vramcalc.terms.activations import layer_masks

    spec = dataclasses.replace(TINY["llama4_text"], sliding_window=256)
    kinds = spec.layer_types
    assert layer_masks(spec, True) == tuple(kind == "chunked_attention" for kind in kinds)
    assert "full_attention" in kinds and "chunked_attention" in kinds


@needs_torch
@pytest.mark.trace
@pytest.mark.parametrize("options", [dict(seq_len=256), dict(seq_len=512, method="lora")])
def test_llama4_past_the_chunk_under_sdpa_agrees_with_the_trace(options):
    import dataclasses

    from vramcalc.tracing.runner import run_trace

    spec = dataclasses.replace(TINY["llama4_text"], sliding_window=256)
    resolved = resolve_setup(spec, **options)
    estimated = max(m.tensor_bytes for m in step_moments(spec, resolved))
    traced = sum(run_trace(spec, resolved, progress=False).terms.values())
    assert abs(estimated - traced) / traced < TOLERANCE


def test_a_llama4_scout_text_config_reads_its_layout(tmp_path):
    # meta-llama/Llama-4-Scout-17B-16E text_config (as Llama4TextConfig's defaults): 48 layers, all MoE, every
    # fourth NoPE; 17B active parameters (model card "17B active"), 16 experts
    import json

    text = {"model_type": "llama4_text", "hidden_size": 5120, "intermediate_size": 8192,
            "intermediate_size_mlp": 16384, "num_hidden_layers": 48, "num_attention_heads": 40,
            "num_key_value_heads": 8, "head_dim": 128, "num_local_experts": 16, "num_experts_per_tok": 1,
            "vocab_size": 202048, "interleave_moe_layer_step": 1}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama4", "text_config": text}))
    spec = load_config(tmp_path)
    assert spec.num_moe_layers == 48 and spec.nope_layers == tuple(range(3, 48, 4))
    assert spec.sliding_window == 8192 and spec.layer_types.count("full_attention") == 12
    assert abs(spec.active_params - 17e9) / 17e9 < 0.03


def test_qwen2_moe_sliding_window_is_refused_in_one_line():
    from vramcalc.errors import VramcalcError
    from vramcalc.hf_config import spec_from_config

    config = dict(model_type="qwen2_moe", hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                  intermediate_size=128, vocab_size=100, num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=32, use_sliding_window=True, sliding_window=32)
    with pytest.raises(VramcalcError, match="use_sliding_window"):
        spec_from_config(config)


@needs_torch
@pytest.mark.trace
@pytest.mark.xfail(strict=True, reason="estimator gap: gpt-oss's eager sink backward under checkpointing is modelled "
                   "as two c-sized [b, a, s, s] gradients beside the recomputed softmax output; full fine-tuning at "
                   "s = 1024 traces 6% below the estimate (LoRA/QLoRA with checkpointing 1-2.4% above it)")
def test_gpt_oss_full_checkpointed_backward_agrees_with_the_trace():
    from vramcalc.tracing.runner import run_trace

    spec = TINY["gpt_oss"]
    resolved = resolve_setup(spec, seq_len=1024, grad_ckpt=True)
    estimated = max(m.tensor_bytes for m in step_moments(spec, resolved))
    traced = sum(run_trace(spec, resolved, progress=False).terms.values())
    assert abs(estimated - traced) / traced < TOLERANCE
