"""Families of the 2022-2024 fine-tuning measurements (OPT, BLOOM, GPT-J): exact parameter counts against the
transformers model built on ``meta`` (from each config class's defaults written as config.json, and from tiny
configs), the estimate within 1% of the trace on tiny real configs over full, LoRA (qv and all-linear) and QLoRA
fine-tuning, with and without checkpointing, at batch 1 and 2, under each attention implementation the family
supports, and the layouts the estimate does not model refused in one line."""

import json

import pytest

import vramcalc as vc
from vramcalc.errors import VramcalcError
from vramcalc.hf_config import load_config, spec_from_config
from vramcalc.model import ModelSpec

from .conftest import needs_torch
from .tiny_models import catalogue_row_and_config, default_config_counts, meta_param_count, tiny_counts
from .trace_helpers import peak_error

TOLERANCE = 0.01

# Tiny configs that keep each family's structure: learned positions with offset 2, LayerNorm with biases, a ReLU MLP,
# tied (opt); an embedding LayerNorm, a fused query_key_value with ALiBi, GeLUFunction, tied (bloom); a parallel block
# with one LayerNorm, partial interleaved rotary (a quarter of head_dim), gelu_new, lm_head with bias (gptj)
TINY = {
    "opt": ModelSpec(name="tiny-opt", family="opt", hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=4,
                     head_dim=64, intermediate_size=1024, vocab_size=2048, tie_word_embeddings=True,
                     max_position_embeddings=1024, qkv_bias=True, o_bias=True, mlp_bias=True),
    "bloom": ModelSpec(name="tiny-bloom", family="bloom", hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=4,
                       head_dim=64, intermediate_size=1024, vocab_size=2048, tie_word_embeddings=True,
                       qkv_bias=True, o_bias=True, mlp_bias=True),
    "gptj": ModelSpec(name="tiny-gptj", family="gptj", hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=4,
                      head_dim=64, intermediate_size=1024, vocab_size=2048, max_position_embeddings=1024,
                      mlp_bias=True, rotary_dim=16),
}
FAMILIES = sorted(TINY)
# the attention implementations each family's transformers class supports (bloom: eager only; sdpa falls back to it)
ATTENTION = {"opt": ("sdpa", "eager", "flash"), "bloom": ("eager",), "gptj": ("sdpa", "flash")}

SETUPS = [
    dict(seq_len=512),
    dict(seq_len=512, method="lora"),
    dict(seq_len=512, method="lora", lora_targets="all-linear"),
    dict(seq_len=512, method="qlora"),
    dict(seq_len=512, method="qlora", lora_targets="all-linear"),
    dict(seq_len=1024, method="qlora", grad_ckpt=True),
    dict(seq_len=512, method="lora", grad_ckpt=True),
    dict(seq_len=512, method="lora", lora_targets="all-linear", grad_ckpt=True, batch_size=2),
    dict(seq_len=512, grad_ckpt=True, batch_size=2),
    dict(seq_len=512, method="lora", batch_size=2),
    dict(seq_len=256, precision="mixed-bf16"),
    dict(seq_len=256, method="lora", precision="mixed-bf16"),
    dict(seq_len=256, precision="fp32"),
]
# Known gaps, each a strict xfail: BLOOM's checkpointed QLoRA forward holds a second fp32 [b, a, s, s] softmax-sized
# tensor in the trace that the forward-transient rule does not explain (-12.6%; at real size the logits dominate the
# forward); GPT-J's QLoRA with checkpointing misses the 16-bit cast of the residual gradient waiting for the attention
# branch while the MLP computes in fp32 (-1.6%)
KNOWN = {("bloom", 5): "checkpointed QLoRA forward: a second fp32 softmax-sized tensor not modelled (-12.6%)",
         ("gptj", 5): "QLoRA with checkpointing: the attention branch's 16-bit residual gradient cast (-1.6%)"}


def _cases():
    for family in FAMILIES:
        for attn in ATTENTION[family]:
            for index, options in enumerate(SETUPS):
                if attn != ATTENTION[family][0] and index not in (0, 1, 6, 8):
                    continue  # the other implementations on full, LoRA, checkpointed LoRA and checkpointed full
                marks = [pytest.mark.xfail(strict=True, reason=KNOWN[family, index])] if (
                    (family, index) in KNOWN and attn == ATTENTION[family][0]) else []
                name = f"{family}-{attn}-" + "-".join(f"{k}={v}" for k, v in options.items())
                yield pytest.param(family, dict(options, attn=attn), id=name, marks=marks)


@needs_torch
@pytest.mark.parametrize("family", FAMILIES)
def test_default_config_json_count_equals_the_meta_built_transformers_model(family, tmp_path):
    read, built = default_config_counts(family, tmp_path)
    assert read == built


@needs_torch
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_count_equals_the_meta_built_transformers_model(family):
    read, built = tiny_counts(TINY[family])
    assert read == built


@needs_torch
@pytest.mark.trace
@pytest.mark.parametrize("family, options", list(_cases()))
def test_estimated_peak_is_within_1_percent_of_the_trace(family, options):
    assert abs(peak_error(TINY[family], **options)) < TOLERANCE


@pytest.mark.parametrize("family, targets", [("opt", ("q_proj", "v_proj")), ("bloom", ("query_key_value",)),
                                             ("gptj", ("q_proj", "v_proj"))])
def test_qv_means_peft_default_lora_targets_of_the_family(family, targets):
    # peft utils/constants.py TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    from vramcalc.training_setup import resolve_setup

    assert resolve_setup(TINY[family], method="lora").lora_modules == targets


def test_opt_350m_post_norm_layout_is_refused_in_one_line():
    # facebook/opt-350m: do_layer_norm_before false, word_embed_proj_dim 512 with project_in/project_out
    config = dict(model_type="opt", hidden_size=1024, num_attention_heads=16, num_hidden_layers=24, ffn_dim=4096,
                  vocab_size=50272, word_embed_proj_dim=512, do_layer_norm_before=False)
    with pytest.raises(VramcalcError, match="opt-350m"):
        spec_from_config(config)


def test_bloom_config_keys_read_like_bloomconfig(tmp_path):
    # bigscience/bloom-560m's config.json spells the width n_embed and the depth n_layer (BloomConfig's kwarg and
    # attribute_map); intermediate is 4h, no position limit (ALiBi)
    config = dict(model_type="bloom", n_embed=1024, n_layer=24, num_attention_heads=16, vocab_size=250880)
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = load_config(tmp_path)
    assert (spec.hidden_size, spec.num_layers, spec.intermediate_size, spec.tie_word_embeddings) == (1024, 24, 4096,
                                                                                                     True)
    assert spec.params == 559_214_592  # keras-hub bloom_presets.py "bloom_560m_multi" params


@pytest.mark.parametrize("family, attn, match", [("bloom", "flash", "only eager"), ("gptj", "eager", "not modelled")])
def test_an_attention_the_estimate_does_not_model_is_refused_in_one_line(family, attn, match):
    with pytest.raises(VramcalcError, match=match):
        vc.estimate(TINY[family], attn=attn)


def test_bloom_sdpa_falls_back_to_eager_as_transformers_does():
    assert vc.estimate(TINY["bloom"]).total_bytes == vc.estimate(TINY["bloom"], attn="eager").total_bytes


# The catalogue rows (data/models.csv) and the configs they come from (data/models_sources.md S64-S66), trimmed to
# the keys the reader and transformers look at; params_exact is sum(p.numel()) of the meta-built model
_OPT = dict(model_type="opt", vocab_size=50272, max_position_embeddings=2048, do_layer_norm_before=True,
            enable_bias=True, activation_function="relu")
_BLOOM = dict(model_type="bloom", vocab_size=250880)
PUBLISHED_CONFIGS = {
    "opt-125m": {**_OPT, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "ffn_dim": 3072},
    "opt-1.3b": {**_OPT, "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 32, "ffn_dim": 8192},
    "opt-2.7b": {**_OPT, "hidden_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 32, "ffn_dim": 10240},
    "opt-6.7b": {**_OPT, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "ffn_dim": 16384},
    "opt-13b": {**_OPT, "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40, "ffn_dim": 20480},
    "opt-66b": {**_OPT, "hidden_size": 9216, "num_hidden_layers": 64, "num_attention_heads": 72, "ffn_dim": 36864},
    "bloom-560m": {**_BLOOM, "n_embed": 1024, "n_layer": 24, "num_attention_heads": 16},
    "bloom-1b1": {**_BLOOM, "n_embed": 1536, "n_layer": 24, "num_attention_heads": 16},
    "bloom-1b7": {**_BLOOM, "n_embed": 2048, "n_layer": 24, "num_attention_heads": 16},
    "bloom-3b": {**_BLOOM, "n_embed": 2560, "n_layer": 30, "num_attention_heads": 32},
    "bloom-7b1": {**_BLOOM, "n_embed": 4096, "n_layer": 30, "num_attention_heads": 32},
    "bloomz-7b1": {**_BLOOM, "n_embed": 4096, "n_layer": 30, "num_attention_heads": 32},
    "bloom": {**_BLOOM, "hidden_size": 14336, "n_layer": 70, "n_head": 112},
    "gpt-j-6b": dict(model_type="gptj", vocab_size=50400, n_positions=2048, n_embd=4096, n_layer=28, n_head=16,
                     rotary_dim=64, activation_function="gelu_new"),
}
_METADATA = {"name", "hf_repo", "license", "source", "notes", "params_published", "active_params_published",
             "params_exact"}


@pytest.mark.parametrize("name", PUBLISHED_CONFIGS)
def test_catalogue_rows_hold_what_their_published_config_says(name):
    row_fields, read_fields, (row_params, read_params, exact) = catalogue_row_and_config(
        name, PUBLISHED_CONFIGS[name], _METADATA)
    assert row_fields == read_fields
    assert row_params == read_params == exact


@needs_torch
@pytest.mark.parametrize("name", ["opt-1.3b", "bloom-560m", "gpt-j-6b"])
def test_catalogue_counts_equal_the_meta_built_transformers_model(name):
    from transformers import AutoConfig

    config = dict(PUBLISHED_CONFIGS[name])
    assert spec_from_config(config, name=name).params == meta_param_count(AutoConfig.for_model(**config))
