"""The encoder family (BERT, ``--task classify``): its parameter inventory against transformers' own model, its config
reading and refusals, and the estimate against the trace of the real ``BertForSequenceClassification`` step on a
tiny config over precisions, checkpointing, batch sizes, optimizers, attention implementations and gradient
accumulation (``terms/encoder.py``; the full-size grid is ``benchmarks/accuracy_encoder.py``)."""

import dataclasses
import math
import statistics

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vramcalc as vc
from vramcalc.errors import VramcalcError
from vramcalc.hf_config import config_fields, spec_from_config
from vramcalc.model import ModelSpec

from .conftest import needs_torch
from .trace_helpers import peak_error

# BertConfig's fields of google-bert/bert-base-uncased's config.json (data/models_sources.md S67)
BERT_BASE_CONFIG = {"model_type": "bert", "architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1,
                    "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 768, "intermediate_size": 3072,
                    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "num_attention_heads": 12,
                    "num_hidden_layers": 12, "pad_token_id": 0, "position_embedding_type": "absolute",
                    "type_vocab_size": 2, "vocab_size": 30522}
# two layers, four heads of 64, dropouts as BERT's (0.1), an MLP 4h wide
TINY = ModelSpec(name="tiny-bert", family="bert", hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=4,
                 head_dim=64, intermediate_size=1024, vocab_size=2048, max_position_embeddings=512, qkv_bias=True,
                 o_bias=True, mlp_bias=True, type_vocab_size=2, hidden_dropout=0.1, attention_dropout=0.1,
                 score_labels=2)
# the grid (each also at every attention implementation below): precisions, checkpointing (transformers 5's
# non-reentrant and 4.x's reentrant), batch 1 and 2, optimizers, gradient accumulation, gradients kept between steps
SETUPS = [
    dict(precision="fp32"),
    dict(precision="mixed-fp16"),
    dict(precision="mixed-bf16", batch_size=1),
    dict(precision="bf16"),
    dict(precision="bf16-true", optimizer="adafactor"),
    dict(precision="fp32", grad_ckpt="reentrant", batch_size=1),
    dict(precision="mixed-fp16", grad_ckpt=True),
    dict(precision="mixed-fp16", grad_ckpt="reentrant", grad_accum=2, optimizer="adamw-8bit"),
    dict(precision="fp32", grad_accum=2, optimizer="adafactor"),
    dict(precision="mixed-fp16", grads_kept=True, batch_size=1),
]
ATTENTION = ("eager", "sdpa")
# the 2022 stacks' eager attention (torch 1.10's softmax saving its input, transformers 4.x's extended mask), eager
# only
LEGACY_SETUPS = [
    dict(precision="fp32", softmax_saves_input=True, extended_mask=True, grads_kept=True),
    dict(precision="mixed-fp16", softmax_saves_input=True, extended_mask=True),
    dict(precision="mixed-bf16", softmax_saves_input=True, extended_mask=True, batch_size=1),
    dict(precision="bf16", softmax_saves_input=True, extended_mask=True),
    dict(precision="mixed-fp16", softmax_saves_input=True),
    dict(precision="mixed-bf16", extended_mask=True),
    dict(precision="fp32", grad_ckpt="reentrant", softmax_saves_input=True, extended_mask=True, batch_size=1),
    dict(precision="mixed-fp16", grad_ckpt="reentrant", grad_accum=2, softmax_saves_input=True, extended_mask=True),
]
# a config without dropout (hidden_dropout_prob and attention_probs_dropout_prob 0: dropout returns its input)
NO_DROPOUT = dataclasses.replace(TINY, name="tiny-bert-no-dropout", hidden_dropout=0.0, attention_dropout=0.0)
NO_DROPOUT_SETUPS = [dict(precision="mixed-fp16"), dict(precision="fp32", grad_ckpt="reentrant")]


def _cases():
    for attn in ATTENTION:
        for options in SETUPS:
            yield pytest.param(TINY, dict(options, attn=attn, seq_len=256), id=attn + "-" + "-".join(
                f"{k}={v}" for k, v in options.items()))
        if attn == "eager":
            for options in LEGACY_SETUPS:
                yield pytest.param(TINY, dict(options, attn=attn, seq_len=256), id="legacy-" + "-".join(
                    f"{k}={v}" for k, v in options.items()))
        for options in NO_DROPOUT_SETUPS:
            yield pytest.param(NO_DROPOUT, dict(options, attn=attn, seq_len=256), id=f"no-dropout-{attn}-" + "-".join(
                f"{k}={v}" for k, v in options.items()))


def test_a_bert_config_json_reads_as_the_encoder_family():
    spec = spec_from_config(BERT_BASE_CONFIG, name="bert-base-uncased")
    assert (spec.family, spec.num_kv_heads, spec.head_dim) == ("bert", 12, 64)
    assert (spec.type_vocab_size, spec.hidden_dropout, spec.attention_dropout, spec.score_labels) == (2, 0.1, 0.1, 2)
    assert spec.qkv_bias and spec.o_bias and spec.mlp_bias and not spec.tie_word_embeddings
    assert spec.params == vc.catalogue.get_model("bert-base-uncased").params


@pytest.mark.parametrize("change, words", [
    ({"is_decoder": True}, "is_decoder"),
    ({"position_embedding_type": "relative_key"}, "relative_key"),
    ({"hidden_act": "gelu_new"}, "gelu_new"),
    ({"hidden_dropout_prob": 1.5}, "hidden_dropout_prob"),
    ({"num_attention_heads": 7}, "multiple"),
])
def test_layouts_the_estimate_does_not_model_are_refused_in_one_line(change, words):
    with pytest.raises(VramcalcError, match=words):
        spec_from_config({**BERT_BASE_CONFIG, **change}, name="bert")


def test_an_encoder_spec_without_its_own_fields_is_refused_in_one_line():
    with pytest.raises(VramcalcError, match="max_position_embeddings"):
        ModelSpec(name="x", family="bert", hidden_size=64, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=64,
                  intermediate_size=64, vocab_size=10)
    with pytest.raises(VramcalcError, match="type_vocab_size"):
        dataclasses.replace(TINY, type_vocab_size=0)


def test_num_labels_comes_from_the_config_or_its_labels():
    assert spec_from_config({**BERT_BASE_CONFIG, "num_labels": 5}).score_labels == 5
    labels = {"id2label": {"0": "a", "1": "b", "2": "c"}}
    assert spec_from_config({**BERT_BASE_CONFIG, **labels}).score_labels == 3


@needs_torch
@pytest.mark.parametrize("name", ["bert-base-uncased", "bert-large-uncased"])
def test_catalogue_rows_count_the_meta_built_sequence_classifier(name):
    import torch
    from transformers import AutoModelForSequenceClassification

    from vramcalc.tracing.build import hf_config

    spec = vc.catalogue.get_model(name)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(hf_config(spec))
    built = sum(p.numel() for p in model.parameters())
    assert spec.params == built == spec.params_exact


def test_an_encoder_trains_as_a_sequence_classifier_and_other_tasks_are_refused():
    breakdown = vc.estimate("bert-large-uncased")
    assert breakdown.inputs["task"] == "classify"
    assert breakdown.inputs["origins"]["task"].startswith("implied by model")
    # the default sequence (2048) is past BERT's 512 learned positions: the longest it can embed instead
    assert breakdown.inputs["seq_len"] == 512 and "512 learned positions" in breakdown.inputs["origins"]["seq_len"]
    with pytest.raises(VramcalcError, match="--task classify"):
        vc.estimate("bert-large-uncased", task="sft")
    with pytest.raises(VramcalcError, match="encoder"):
        vc.estimate("llama-3.2-1b", task="classify")


@pytest.mark.parametrize("options, words", [
    (dict(method="lora"), "--method full only"),
    (dict(seq_len=1024), "512 learned positions"),
    (dict(num_gpus=2, sharding="ddp"), "one GPU"),
    (dict(grad_ckpt="selective"), "selective"),
    (dict(loss="chunked"), "--loss"),
    (dict(stack="torchtune"), "stack"),
])
def test_what_the_encoder_step_does_not_model_is_refused_in_one_line(options, words):
    with pytest.raises(VramcalcError, match=words):
        vc.estimate("bert-base-uncased", **options)


def test_checkpointing_lowers_the_peak_and_eager_attention_saves_more_than_sdpa():
    def peak(**options):
        breakdown = vc.estimate("bert-large-uncased", seq_len=512, batch_size=4, precision="fp32", **options)
        return breakdown.peak_tensor_bytes

    assert peak(attn="eager", grad_ckpt="reentrant") < peak(attn="eager")
    assert peak(attn="sdpa") < peak(attn="eager")


def test_kept_gradients_add_the_gradients_to_every_moment_of_the_step():
    plain = vc.estimate("bert-large-uncased", seq_len=512, batch_size=4, precision="fp32", attn="eager")
    kept = vc.estimate("bert-large-uncased", seq_len=512, batch_size=4, precision="fp32", attn="eager",
                       grads_kept=True)
    gradients = kept.details["trainable_params"] * 4  # every fp32 gradient (512-byte blocks aside)
    assert 0.9 * gradients < kept.peak_tensor_bytes - plain.peak_tensor_bytes <= 1.01 * gradients


def _layer_saved_bytes(precision, batch_size=4, seq_len=512, **knobs):
    from vramcalc.options import AdapterDtype, Attention, GradCkpt, Method, Precision
    from vramcalc.terms import activations, encoder

    spec = vc.get_model("bert-large-uncased")
    dt = activations.dtypes(Method.FULL, Precision(precision), AdapterDtype.FP32)
    shape = encoder.shape_of(dt, Precision(precision), Attention.EAGER, 1, GradCkpt.NONE, **knobs)
    return encoder.layer_saved(spec, shape).bytes(batch_size, seq_len)


@pytest.mark.parametrize("precision, knobs, input_bytes", [
    ("fp32", {}, 4),  # the fp32 scores
    ("mixed-fp16", {}, 2),  # the fp16 scores, which half_to_float reads
    ("mixed-bf16", {}, 4),  # the bf16 scores' fp32 copy
    ("mixed-fp16", dict(extended_mask=True), 4),  # the fp16 scores plus the fp32 mask: fp32
])
def test_torch_1_10s_softmax_keeps_its_input_one_scores_tensor_per_layer(precision, knobs, input_bytes):
    """torch 1.10.0's generated Functions.h: ``SoftmaxBackward0`` holds ``self_`` and ``result_``; 1.11.0 holds
    ``self_scalar_type`` and ``result_``. The difference is the softmax's input, [b, heads, s, s] of its dtype."""
    b, s, heads = 4, 512, 16
    kept = _layer_saved_bytes(precision, b, s, softmax_saves_input=True, **knobs)
    assert kept - _layer_saved_bytes(precision, b, s, **knobs) == input_bytes * b * heads * s * s


def test_the_extended_mask_changes_what_the_softmax_reads_not_what_it_saves():
    """transformers 4.x's added mask makes the mixed-precision scores fp32 before the softmax, whose output is fp32
    either way (CUDA autocast's softmax): without torch 1.10's kept input, the saved set is the same."""
    assert _layer_saved_bytes("mixed-fp16", extended_mask=True) == _layer_saved_bytes("mixed-fp16")


@pytest.mark.parametrize("options", [
    dict(softmax_saves_input=True),  # an LLM: not modelled
    dict(task="classify", softmax_saves_input=True),  # a decoder asked to classify is refused first
])
def test_the_2022_attention_knobs_off_an_encoders_eager_attention_are_refused_in_one_line(capsys, options):
    from .cli_helpers import assert_one_error_line

    assert_one_error_line(capsys, "llama-3.2-1b", options, "softmax|encoder")
    assert_one_error_line(capsys, "bert-large-uncased", dict(task="classify", attn="sdpa", extended_mask=True),
                          "eager attention")


def test_a_measured_cuda_context_replaces_the_profiles_in_the_total_and_in_the_inputs():
    options = dict(task="classify", seq_len=512, batch_size=4)
    plain = vc.estimate("bert-large-uncased", **options)
    given = vc.estimate("bert-large-uncased", cuda_context_mib=1341, **options)
    assert given.total_bytes - plain.total_bytes == (1341 - 500) * 2**20  # the default profile's 500 MiB
    assert given.peak_tensor_bytes == plain.peak_tensor_bytes
    assert given.inputs["cuda_context_mib"] == 1341 and "1341 MiB given" in given.details["runtime_profile"]
    with pytest.raises(VramcalcError, match="CUDA context"):
        vc.estimate("bert-large-uncased", cuda_context_mib=-1, **options)


@needs_torch
@pytest.mark.slow
@pytest.mark.parametrize("spec, options", list(_cases()))
def test_estimate_matches_the_traced_bert_classifier_step(spec, options):
    assert abs(peak_error(spec, **options)) < 0.005


@needs_torch
@pytest.mark.slow
def test_estimate_matches_the_trace_over_the_grid_median_and_max():
    errors = [abs(peak_error(case.values[0], **case.values[1])) for case in _cases()]
    assert statistics.median(errors) <= 0.005 and max(errors) <= 0.03


json_values = st.one_of(st.none(), st.booleans(), st.integers(min_value=-3, max_value=2**40),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                        st.sampled_from(["gelu", "absolute", "relu", 0.5, 2, 768]), st.lists(st.integers(), max_size=2),
                        st.dictionaries(st.text(max_size=3), st.integers(), max_size=3))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_json_in_bert_config_fields_is_an_estimate_or_a_vramcalc_error(data):
    config = dict(BERT_BASE_CONFIG)
    config.update(data.draw(st.dictionaries(st.sampled_from(config_fields("bert")), json_values, min_size=1,
                                            max_size=3)))
    try:
        breakdown = vc.estimate(spec_from_config(config, name="bert"), seq_len=data.draw(st.sampled_from([16, 512])))
    except VramcalcError:
        return
    terms = breakdown.terms()
    assert all(isinstance(v, int) and v >= 0 for v in terms.values())
    assert breakdown.total_bytes == sum(terms.values()) and not math.isnan(breakdown.total_bytes)


@needs_torch
def test_cuda_autocast_softmax_is_fp32_with_an_fp16_gradient():
    """CUDA autocast runs softmax without a dtype in fp32 (its fp32_set_opt_dtype list); fp16 takes _softmax's
    half_to_float, whose backward returns fp16 (tracing/cuda_emulation.py item 6)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vramcalc.tracing.cuda_emulation import cuda_softmax

    with FakeTensorMode(), torch.autocast("cpu", dtype=torch.float16):
        x = torch.empty(2, 4, 8, 8, dtype=torch.float16, requires_grad=True)
        y = cuda_softmax(x, dim=-1)
        y.sum().backward()
    assert y.dtype is torch.float32 and x.grad.dtype is torch.float16
