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

TOLERANCE = 0.03  # issue 13: within 3% on each setup
MEDIAN_TOLERANCE = 0.01  # and 1% median over a family's setups

# Tiny configs that keep each family's structure
TINY = {
    # a dense layer then a MoE layer (decoder_sparse_step 2), q/k/v biases, a shared expert and its sigmoid gate
    "qwen2_moe": ModelSpec(name="tiny-qwen2-moe", family="qwen2_moe", hidden_size=256, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=64, intermediate_size=512, vocab_size=2048, qkv_bias=True,
                           num_experts=8, experts_per_token=2, moe_intermediate_size=96, n_shared_experts=1,
                           shared_expert_intermediate_size=192, decoder_sparse_step=2),
}
FAMILIES = sorted(TINY)
# Class defaults a default config leaves unset (None) that the model needs to run, with the published value used
DEFAULT_CONFIG_GAPS: dict[str, dict] = {}


def _meta_count(config) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum({id(p): p.numel() for p in model.parameters()}.values())  # tied weights once


@needs_torch
@pytest.mark.parametrize("family", FAMILIES)
def test_default_config_json_count_equals_the_meta_built_transformers_model(family, tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.for_model(family, **DEFAULT_CONFIG_GAPS.get(family, {}))
    (tmp_path / "config.json").write_text(config.to_json_string())
    assert load_config(tmp_path).params == _meta_count(config)


@needs_torch
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_count_equals_the_meta_built_transformers_model(family):
    from vramcalc.tracing.build import hf_config

    spec = TINY[family]
    assert spec.params == _meta_count(hf_config(spec))


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
