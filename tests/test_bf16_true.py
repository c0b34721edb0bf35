"""``--precision bf16-true``: the model in bf16 with no autocast (Lightning Fabric's "bf16-true", litgpt's configs,
torchtune's ``dtype: bf16``). The claims: it is a precision word with bf16 states; with bf16 adapters it never
saves more than ``bf16`` (autocast only adds fp32 outputs and per-matmul casts; fp32 adapters without autocast do
compute, and save, in fp32); the stacks that run without autocast default to it; and the
estimate matches the trace of transformers' own model run without autocast (``tracing/step.py``), on Llama and on
the LayerNorm families where autocast matters (their fp32 LayerNorm outputs under autocast)."""

import pytest

import vramcalc as vc
from vramcalc.estimator import step_moments
from vramcalc.model import ModelSpec
from vramcalc.options import Precision
from vramcalc.training_setup import resolve_setup

from .conftest import needs_torch
from .tiny_models import TINY

TOLERANCE = 0.03  # issue 11: estimate vs trace, per setup

PHI = ModelSpec(name="tiny-phi", family="phi", hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=8,
                head_dim=32, intermediate_size=1024, vocab_size=2048, qkv_bias=True, o_bias=True, mlp_bias=True,
                rotary_dim=16)
NEOX = ModelSpec(name="tiny-neox", family="gpt_neox", hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=4,
                 head_dim=64, intermediate_size=1024, vocab_size=2048, qkv_bias=True, o_bias=True, mlp_bias=True,
                 rotary_dim=16)


def test_bf16_true_is_a_bf16_word_without_autocast():
    word = Precision.parse("bf16-true", "precision")
    assert word.param_dtype.bytes == 2 and word.compute_dtype.bytes == 2
    assert not word.autocast and not word.is_mixed
    assert Precision.BF16.autocast and Precision.MIXED_BF16.autocast and not Precision.FP32.autocast


@pytest.mark.parametrize("spec", [TINY["llama"], PHI, NEOX], ids=lambda s: s.family)
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_no_autocast_never_saves_more_than_autocast(spec, method):
    options = dict(method=method, seq_len=512, batch_size=2)
    if method != "full":
        options["adapter_dtype"] = "bf16"
    true = vc.estimate(spec, precision="bf16-true", **options)
    autocast = vc.estimate(spec, precision="bf16", **options)
    assert true.peak_tensor_bytes <= autocast.peak_tensor_bytes
    assert true.terms()["weights"] == autocast.terms()["weights"]


@pytest.mark.parametrize("stack", ["litgpt", "torchtune"])
def test_stacks_without_autocast_default_to_bf16_true(stack):
    estimate = vc.estimate("llama-3.1-8b", stack=stack, method="lora", seq_len=512)
    assert estimate.inputs["precision"] == "bf16-true"
    assert estimate.inputs["origins"]["precision"] == f"stack {stack}"
    assert vc.estimate("llama-3.1-8b", stack=stack, method="lora", seq_len=512,
                       precision="bf16").inputs["precision"] == "bf16"  # an explicit word wins


CASES = [
    (TINY["llama"], dict(seq_len=512, method="lora")),
    (TINY["llama"], dict(seq_len=512)),
    (TINY["llama"], dict(seq_len=1024, method="qlora", grad_ckpt=True)),
    (PHI, dict(seq_len=512, method="lora")),
    (PHI, dict(seq_len=512)),
    (PHI, dict(seq_len=512, method="qlora")),
    (NEOX, dict(seq_len=512, method="lora", lora_targets="all-linear")),
    (NEOX, dict(seq_len=256, method="qlora", grad_ckpt=True, batch_size=2)),
]


@needs_torch
@pytest.mark.trace
@pytest.mark.parametrize("spec, options", CASES,
                         ids=[f"{s.family}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for s, o in CASES])
def test_bf16_true_estimate_matches_the_trace_without_autocast(spec, options):
    from vramcalc.tracing.runner import run_trace

    resolved = resolve_setup(spec, precision="bf16-true", **options)
    estimated = max(m.tensor_bytes for m in step_moments(spec, resolved))
    traced = sum(run_trace(spec, resolved, progress=False).terms.values())
    assert abs(estimated - traced) / traced < TOLERANCE


def test_fp16_true_is_an_fp16_word_without_autocast_and_deepspeed_computes_in_it():
    from vramcalc.terms.distributed import compute_setup

    word = Precision.parse("fp16-true", "precision")
    assert word.param_dtype.bytes == 2 and word.compute_dtype.name.lower().startswith("fp16")
    assert not word.autocast and not word.is_mixed
    # accelerate leaves autocast off under DeepSpeed (native_amp False for DistributedType.DEEPSPEED)
    for stated, computed in (("fp16", "fp16-true"), ("bf16", "bf16-true"), ("mixed-fp16", "fp16-true")):
        resolved = resolve_setup(vc.get_model("llama-3.1-8b"), num_gpus=2, sharding="zero2", precision=stated)
        assert compute_setup(resolved).setup.precision.value == computed
    fsdp = resolve_setup(vc.get_model("llama-3.1-8b"), num_gpus=2, sharding="fsdp", precision="fp16")
    assert compute_setup(fsdp).setup.precision.autocast  # FSDP2 under accelerate keeps native AMP


@needs_torch
@pytest.mark.trace
@pytest.mark.parametrize("method", ["full", "lora"])
def test_fp16_true_estimate_matches_the_trace_without_autocast(method):
    from vramcalc.tracing.runner import run_trace

    spec = TINY["llama"]
    resolved = resolve_setup(spec, precision="fp16-true", method=method, seq_len=512,
                             **({"adapter_dtype": "bf16"} if method == "lora" else {}))  # 16-bit: the model's
    estimated = max(m.tensor_bytes for m in step_moments(spec, resolved))
    traced = sum(run_trace(spec, resolved, progress=False).terms.values())
    assert abs(estimated - traced) / traced < TOLERANCE


def test_kbit_prep_under_bf16_true_is_refused_in_one_line():
    from vramcalc.errors import VramcalcError

    with pytest.raises(VramcalcError) as caught:
        vc.estimate("llama-3.1-8b", method="qlora", precision="bf16-true", kbit_prep=True)
    assert "bf16-true" in str(caught.value) and "\n" not in str(caught.value)
