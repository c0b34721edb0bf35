"""peft's methods as --method words (issue 17): the table, the CLI, the estimate's DoRA formulas against the trace,
and every accepted method built by real peft in the trace."""

import json

import pytest

import vramcalc as vc
from vramcalc.errors import VramcalcError
from vramcalc.estimator import step_moments
from vramcalc.options import Method
from vramcalc.peft_methods import PEFT_METHODS
from vramcalc.training_setup import resolve_setup

from .cli_helpers import run_cli
from .conftest import needs_torch
from .tiny_models import TINY

TOLERANCE = 0.03
CORE = {"full", "lora", "qlora", "prompt"}


def test_every_method_word_has_one_row_and_vramcalc_methods_lists_it(capsys):
    assert {m.value for m in Method} - CORE == {row.word for row in PEFT_METHODS}
    code, out, _ = run_cli(capsys, "methods", "--format", "json")
    assert code == 0
    assert [row["method"] for row in json.loads(out)] == [m.value for m in Method]


def test_a_method_without_formulas_is_refused_in_one_line_pointing_to_trace(capsys):
    code, _, err = run_cli(capsys, "estimate", "llama-3.1-8b", "--method", "hra")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error:") and "vramcalc trace" in err


@pytest.mark.parametrize("argv, word", [
    (("--method", "full", "--lora-rank", "8"), "--lora-rank"),
    (("--method", "ln-tuning", "--lora-targets", "qv"), "--lora-targets"),
    (("--method", "vera", "--quant", "nf4"), "--quant"),  # peft ships no bitsandbytes VeRA layer
    (("--method", "qlora", "--quant", "none"), "none"),
])
def test_an_option_the_method_does_not_take_is_one_error_line(capsys, argv, word):
    code, _, err = run_cli(capsys, "estimate", "llama-3.1-8b", *argv)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error:") and word in err


def test_the_size_knob_defaults_to_peft_s_own_default():
    """VeRA's r is 256 in VeraConfig, OFT's oft_block_size 32 (peft 0.21.2 config classes), not LoRA's 8."""
    spec = TINY["llama"]
    assert resolve_setup(spec, method="vera").setup.lora_rank == 256
    assert resolve_setup(spec, method="oft").setup.lora_rank == 32
    assert resolve_setup(spec, method="dora").setup.lora_rank == 8


def test_dora_exceeds_lora_by_its_two_saved_outputs_per_target():
    """peft lora/dora.py:163: ``(mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling`` saves
    the base output and lora_B's output, two bf16 [T, n_out] per target: on llama-3.1-8b with all-linear targets,
    sum n_out = q 4096 + k 1024 + v 1024 + o 4096 + gate 14336 + up 14336 + down 4096 = 43008 per layer."""
    import vramcalc

    options = dict(method="lora", lora_rank=16, lora_targets="all-linear", seq_len=2048)
    lora = vramcalc.estimate("llama-3.1-8b", **options)
    dora = vramcalc.estimate("llama-3.1-8b", **dict(options, method="dora"))
    extra = dora.terms()["activations"] - lora.terms()["activations"]
    per_token = 2 * 2 * 43008 * 32  # two bf16 outputs, 32 layers
    per_layer = 3 * 4 * 43008 * 32  # weight_norm, mag_norm_scale and mag_norm_scale - 1: fp32 [n_out] (dora.py:153)
    assert extra == per_token * 2048 + per_layer
    assert dora.total_bytes > lora.total_bytes


def test_estimated_trainable_parameters_are_peft_s_on_the_8b():
    """Counted by hand from peft's update_layer shapes (llama-3.1-8b: h 4096, I 14336, kv 1024, 32 layers, all-linear
    targets q, k, v, o, gate, up, down): DoRA r=8 adds the magnitude [out] to LoRA's r·(in + out); IA3 one vector
    per target, [out] (or [in] for down_proj); LN tuning a copy of the 65 norm weights [4096]; VeRA, OFT and prefix
    tuning as the comments say."""
    import vramcalc

    ins = {"q": 4096, "k": 4096, "v": 4096, "o": 4096, "gate": 4096, "up": 4096, "down": 14336}
    outs = {"q": 4096, "k": 1024, "v": 1024, "o": 4096, "gate": 14336, "up": 14336, "down": 4096}
    lora = 8 * sum(ins[n] + outs[n] for n in ins) * 32
    dora = lora + sum(outs.values()) * 32
    ia3 = (sum(outs[n] for n in outs if n != "down") + ins["down"]) * 32
    # VeRA r=256 (vera/layer.py update_layer): lambda_d [r] and lambda_b [out] per target (vera_A/B frozen)
    vera = (7 * 256 + sum(outs.values())) * 32
    # OFT oft_block_size 32 (oft/layer.py update_layer, r = in / 32): in/32 blocks of 32·31/2 = 496 entries
    oft = sum(ins[n] // 32 * 496 for n in ins) * 32
    # prefix tuning, 20 virtual tokens: embedding [20, 32 layers · 2 · 8 kv heads · 128] (utils/other.py:1231)
    prefix = 20 * 32 * 2 * 8 * 128
    expected = {"dora": dora, "ia3": ia3, "ln-tuning": 65 * 4096, "vera": vera, "oft": oft, "prefix": prefix}
    for method, params in expected.items():
        options = {"lora_targets": "all-linear"} if method not in ("ln-tuning", "prefix") else {}
        assert vramcalc.estimate("llama-3.1-8b", method=method, **options).details["trainable_params"] == params


@pytest.mark.parametrize("argv, word", [
    (("--grad-ckpt",), "--grad-ckpt"),  # transformers drops the cache under checkpointing: the step fails
    (("--attn", "eager"), "trace"),
])
def test_prefix_tuning_setups_outside_the_formulas_are_one_error_line(capsys, argv, word):
    code, _, err = run_cli(capsys, "estimate", "llama-3.1-8b", "--method", "prefix", *argv)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error:") and word in err


def test_prefix_tuning_saves_longer_keys_values_and_mask_per_layer():
    """peft passes the prefixes as n cached positions: every layer's efficient-attention kernel saves k and v of
    s + n positions (repeat_kv'd to the 32 query heads, 128 wide, bf16) and the [b, 1, s, s + n] additive mask, so
    n = 64 saves 32 layers · (2 · 2 · 4096 · 64 + 2 · 2048 · 64) bytes more than n = 20's 44/64 of that."""
    import vramcalc

    acts = {n: vramcalc.estimate("llama-3.1-8b", method="prefix", virtual_tokens=n, seq_len=2048).terms()["activations"]
            for n in (20, 64)}
    per_virtual_token = 32 * (2 * 2 * 32 * 128 + 2 * 2048)
    assert acts[64] - acts[20] == 44 * per_virtual_token


def test_a_4bit_base_is_estimated_for_dora_and_refused_in_one_line_for_the_others(capsys):
    """QDoRA is QLoRA's 4-bit base plus DoRA's extras over LoRA (terms/peft_methods.py::composes_quantized_base):
    it exceeds QLoRA of the same rank and targets; AdaLoRA on a 4-bit base is traced."""
    import vramcalc

    options = dict(lora_rank=16, lora_targets="all-linear", seq_len=2048)
    qdora = vramcalc.estimate("llama-3.1-8b", method="dora", quant="nf4", **options)
    qlora = vramcalc.estimate("llama-3.1-8b", method="qlora", **options)
    dora = vramcalc.estimate("llama-3.1-8b", method="dora", **options)
    assert qlora.peak_tensor_bytes < qdora.peak_tensor_bytes < dora.peak_tensor_bytes
    code, _, err = run_cli(capsys, "estimate", "llama-3.1-8b", "--method", "adalora", "--quant", "nf4")
    assert code == 2 and err.count("\n") == 1 and "vramcalc trace" in err


def test_the_import_stays_light():
    import subprocess
    import sys

    code = "import sys, vramcalc.peft_methods, vramcalc.terms.peft_methods; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


METHOD_CASES = [
    ("llama", dict(method="dora", seq_len=512)),
    ("llama", dict(method="dora", seq_len=512, lora_targets="all-linear")),
    ("llama", dict(method="dora", seq_len=512, lora_targets="all-linear", grad_ckpt=True)),
    ("llama", dict(method="dora", seq_len=256, precision="mixed-bf16", lora_rank=16)),
    ("mistral", dict(method="dora", seq_len=512, lora_targets="all-linear")),
    ("mistral", dict(method="dora", seq_len=512, lora_targets="all-linear", grad_ckpt=True)),
    ("mixtral", dict(method="dora", seq_len=512)),
    ("llama", dict(method="adalora", seq_len=512)),
    ("mistral", dict(method="adalora", seq_len=512, lora_targets="all-linear", grad_ckpt=True)),
    ("llama", dict(method="ia3", seq_len=512, lora_targets="all-linear")),
    ("mistral", dict(method="ia3", seq_len=512, grad_ckpt=True)),
    ("llama", dict(method="ln-tuning", seq_len=512)),
    ("mistral", dict(method="ln-tuning", seq_len=512, grad_ckpt=True)),
    ("llama", dict(method="loha", seq_len=512, lora_targets="all-linear")),
    ("mistral", dict(method="loha", seq_len=512, lora_targets="all-linear", grad_ckpt=True)),
    ("llama", dict(method="lokr", seq_len=512, lora_targets="all-linear")),
    ("mistral", dict(method="lokr", seq_len=512, lora_targets="all-linear", grad_ckpt=True)),
    ("llama", dict(method="loha", seq_len=64, lora_targets="all-linear", grad_ckpt=True)),
    # without autocast the fp32 update gets an fp32 cast of the input per target (was -12.4% and -4.6%)
    ("llama", dict(method="loha", seq_len=256, lora_targets="all-linear", precision="bf16-true")),
    ("qwen3", dict(method="loha", seq_len=256, precision="bf16-true", batch_size=2, grad_ckpt=True)),
    ("llama", dict(method="p-tuning", seq_len=512)),
    ("mistral", dict(method="p-tuning", seq_len=512, grad_ckpt=True, batch_size=2)),
    ("llama", dict(method="lokr", seq_len=64, lora_targets="all-linear")),  # was +5.4%: kron's backward temporaries
    ("llama", dict(method="vera", seq_len=512, lora_targets="all-linear")),
    ("llama", dict(method="vera", seq_len=512, lora_targets="all-linear", grad_ckpt=True)),
    ("mistral", dict(method="vera", seq_len=512, grad_ckpt=True)),
    ("llama", dict(method="oft", seq_len=512, lora_targets="all-linear")),
    ("llama", dict(method="oft", seq_len=512, lora_targets="all-linear", grad_ckpt=True)),
    ("mixtral", dict(method="oft", seq_len=512)),
    ("llama", dict(method="prefix", seq_len=512)),
    ("mistral", dict(method="prefix", seq_len=256, batch_size=2, virtual_tokens=64)),
    ("mixtral", dict(method="prefix", seq_len=512)),
    ("llama", dict(method="dora", quant="nf4", seq_len=512, lora_targets="all-linear")),  # QDoRA
    ("mistral", dict(method="dora", quant="nf4", seq_len=512, lora_targets="all-linear", grad_ckpt=True)),
]


@needs_torch
@pytest.mark.trace
@pytest.mark.parametrize("family, options", METHOD_CASES,
                         ids=[f"{f}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for f, o in METHOD_CASES])
def test_method_estimate_is_within_3_percent_of_the_trace(family, options):
    from vramcalc.tracing.runner import run_trace

    spec = TINY[family]
    resolved = resolve_setup(spec, **options)
    estimated = max(m.tensor_bytes for m in step_moments(spec, resolved))
    traced = sum(run_trace(spec, resolved, progress=False).terms.values())
    assert abs(estimated - traced) / traced < TOLERANCE


# c3a and vblora need target widths divisible by 256 (their default block size / vector length): not the tiny model's
TRACEABLE = [row.word for row in PEFT_METHODS if row.word not in ("c3a", "vblora")]


@needs_torch
@pytest.mark.trace
@pytest.mark.parametrize("word", TRACEABLE)
def test_every_method_is_built_by_peft_and_trains_only_its_own_parameters(word):
    """The trace builds the method with its peft config class and steps it: the optimizer holds states for the
    method's parameters only (fewer bytes than the frozen weights)."""
    from vramcalc.tracing.runner import run_trace

    spec = TINY["llama"]
    traced = run_trace(spec, resolve_setup(spec, method=word, seq_len=128), progress=False, steps=2).terms
    states = traced[next(term for term in traced if term.value == "optimizer_states")]
    weights = traced[next(term for term in traced if term.value == "weights")]
    assert 0 < states < weights


@needs_torch
@pytest.mark.trace
def test_dora_on_a_4bit_base_is_traced_with_bitsandbytes_weights():
    """``--quant nf4 --method dora``: peft's bitsandbytes LoRA layer with DoRA on 4-bit Linears."""
    from vramcalc.tracing.runner import run_trace

    spec = TINY["llama"]
    weights = {}
    for quant in (None, "nf4"):
        resolved = resolve_setup(spec, method="dora", seq_len=128, **({"quant": quant} if quant else {}))
        traced = run_trace(spec, resolved, progress=False, steps=2).terms
        weights[quant] = traced[next(term for term in traced if term.value == "weights")]
    assert weights["nf4"] < weights[None]


@pytest.mark.parametrize("options", [dict(kbit_prep=True), dict(quant_saves_input=True)])
def test_a_peft_method_on_a_16_bit_base_refuses_the_quantized_base_knobs(options):
    with pytest.raises(VramcalcError, match="applies to a quantized base"):
        vc.estimate("llama-3.1-8b", method="dora", **options)


@needs_torch
@pytest.mark.trace
@pytest.mark.parametrize("options", [dict(kbit_prep=True), dict(quant_saves_input=True)])
def test_qdora_takes_kbit_prep_and_held_inputs_as_the_real_libraries_run_them(options):
    # peft's prepare_model_for_kbit_training takes any model on a bitsandbytes base (QDoRA recipes call it); the
    # held inputs are bitsandbytes' Linear4bit's, whatever adapter wraps it
    from vramcalc.tracing.runner import run_trace

    spec = TINY["llama"]
    resolved = resolve_setup(spec, method="dora", quant="nf4", seq_len=256, batch_size=2, **options)
    traced = sum(run_trace(spec, resolved, progress=False).terms.values())
    estimated = vc.estimate(spec, method="dora", quant="nf4", seq_len=256, batch_size=2, **options).peak_tensor_bytes
    assert abs(estimated / traced - 1) < 0.01, (estimated, traced)
