"""Invariants of the analytic estimate, over random setups (hypothesis)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vramcalc import estimate
from vramcalc.options import Term

MODELS = ["smollm2-135m", "llama-3.1-8b", "qwen3-30b-a3b", "gemma-2-2b", "phi-3-mini", "deepseek-v3", "qwen2.5-7b"]

setups = st.fixed_dictionaries(
    {
        "model": st.sampled_from(MODELS),
        "precision": st.sampled_from(["bf16", "mixed-bf16", "fp16"]),
        "optimizer": st.sampled_from(["adamw", "adamw-foreach", "adamw-8bit", "paged-adamw", "sgd-momentum", "adafactor"]),
        "batch_size": st.integers(1, 16),
        "seq_len": st.integers(16, 16384),
        "grad_ckpt": st.booleans(),
        "attn": st.sampled_from(["sdpa", "eager", "flash"]),
        "loss": st.sampled_from(["hf", "chunked", "fused"]),
        "grad_accum": st.integers(1, 4),
    }
)
lora_options = st.fixed_dictionaries(
    {"lora_rank": st.sampled_from([4, 8, 16, 64]), "lora_targets": st.sampled_from(["qv", "all-linear"]),
     "lora_dropout": st.sampled_from([0.0, 0.05]), "adapter_dtype": st.sampled_from(["fp32", "bf16"])}
)


def _estimate(setup, **extra):
    setup = dict(setup, **extra)
    return estimate(setup.pop("model"), **setup)


@settings(max_examples=150, deadline=None)
@given(setups, st.sampled_from(["full", "lora", "qlora", "prompt"]))
def test_terms_are_non_negative_integers_that_sum_to_the_total(setup, method):
    result = _estimate(setup, method=method)
    terms = result.terms()
    assert set(terms) == {t.value for t in Term}
    assert all(isinstance(v, int) and v >= 0 for v in terms.values())
    assert sum(terms.values()) == result.total_bytes
    assert result.peak_tensor_bytes == result.total_bytes - terms["runtime_overhead"] - terms["allocator_slack"]


@settings(max_examples=150, deadline=None)
@given(setups, st.sampled_from(["full", "lora", "qlora"]))
def test_estimate_never_shrinks_with_a_larger_batch_or_a_longer_sequence(setup, method):
    base = _estimate(setup, method=method).peak_tensor_bytes
    assert _estimate(setup, method=method, batch_size=setup["batch_size"] + 1).peak_tensor_bytes >= base
    assert _estimate(setup, method=method, seq_len=setup["seq_len"] + 64).peak_tensor_bytes >= base


@settings(max_examples=150, deadline=None)
@given(setups, st.sampled_from(["full", "lora", "qlora", "prompt"]))
def test_checkpointing_never_increases_activations(setup, method):
    from vramcalc.estimator import layer_setup, step_moments
    from vramcalc.catalogue import get_model
    from vramcalc.terms.activations import model_saved
    from vramcalc.training_setup import resolve_setup

    spec = get_model(setup["model"])
    options = {k: v for k, v in setup.items() if k != "model"}
    on = resolve_setup(spec, method=method, **dict(options, grad_ckpt=True))
    off = resolve_setup(spec, method=method, **dict(options, grad_ckpt=False))
    b, s = setup["batch_size"], setup["seq_len"]
    layer = layer_setup(on)  # what a layer saves does not depend on checkpointing; what it keeps does
    assert layer == layer_setup(off)
    assert model_saved(spec, layer, True).bytes(b, s) <= model_saved(spec, layer, False).bytes(b, s)
    assert max(m.tensor_bytes for m in step_moments(spec, on)) <= max(m.tensor_bytes for m in step_moments(spec, off))


@settings(max_examples=150, deadline=None)
@given(setups, lora_options, st.sampled_from(["bf16", "fp16"]))
def test_qlora_needs_less_than_lora_and_lora_less_than_full(setup, lora, precision):
    # Where this ordering holds: 16-bit models (no kbit preparation), and LoRA on every linear only with 16-bit
    # adapters and no dropout; the two tests below pin the exceptions that the libraries really produce.
    setup = dict(setup, precision=precision)
    if lora["lora_targets"] == "all-linear":
        lora = dict(lora, adapter_dtype="bf16", lora_dropout=0.0)
    # "needs" is what the device must hold: total_bytes, which counts paged optimizer state too
    full = _estimate(setup, method="full").total_bytes
    with_lora = _estimate(setup, method="lora", **lora).total_bytes
    with_qlora = _estimate(setup, method="qlora", **lora).total_bytes
    assert with_qlora < with_lora < full


# -- independent facts (shared/reference/memory-math.md), derived by hand, not from the estimator --------------------
LLAMA_3_8B = dict(h=4096, L=32, a=32, k=8, d=128, I=14336, V=128256)
LLAMA_3_8B_PARAMS = 8_030_261_248  # memory-math.md section 1 table: Llama-3-8B (128256, 4096, 14336, 32L, 32/8)


@pytest.mark.parametrize("targets, expected", [
    # section 4: q,v: r·L·(2h + a·d + k·d) = 16·32·(8192 + 4096 + 1024) = 6,815,744 ("6.82M")
    ("qv", 16 * 32 * (2 * 4096 + 32 * 128 + 8 * 128)),
    # section 4: all-linear: r·L·(7h + 2a·d + 2k·d + 3I) = 16·32·81,920 = 41,943,040 ("41.94M")
    ("all-linear", 16 * 32 * (7 * 4096 + 2 * 32 * 128 + 2 * 8 * 128 + 3 * 14336)),
    # a module named twice is adapted once (peft matches each module once): the q,v count
    ("q_proj,v_proj,q_proj", 16 * 32 * (2 * 4096 + 32 * 128 + 8 * 128)),
])
def test_lora_trainable_parameters_match_the_hand_count(targets, expected):
    details = estimate("llama-3.1-8b", method="lora", lora_rank=16, lora_targets=targets).details
    assert details["trainable_params"] == expected


def test_pure_bf16_full_fine_tuning_holds_2_bytes_of_weights_and_4_of_adamw_state_per_parameter():
    # section 2: "pure bf16 params, torch AdamW | 2 | 2 | 4 (bf16 states!) | 8", states from zeros_like(p); each tensor
    # is one allocation rounded to 512 B, and fused AdamW adds a 0-d fp32 "step" per tensor (one 512-B block each):
    # a few hundred tensors x 512 B x 3, under 1e-5 of 32 GB
    result = estimate("llama-3.1-8b", method="full", precision="bf16", optimizer="adamw")
    assert result.details["params"] == LLAMA_3_8B_PARAMS
    assert result.terms()["weights"] == pytest.approx(2 * LLAMA_3_8B_PARAMS, rel=1e-5)
    assert result.terms()["optimizer_states"] == pytest.approx(4 * LLAMA_3_8B_PARAMS, rel=1e-5)


@pytest.mark.parametrize("precision, forward, backward", [("bf16", 10, 12), ("fp32", 8, 12)])
def test_the_hf_loss_peaks_at_the_bytes_per_logit_memory_math_measured(precision, forward, backward):
    # section 5.4 [M]: forward peak inside the loss 2 + 4 + 4 = 10·T·V (bf16 logits, fp32 upcast, saved log_softmax),
    # fp32 model 8·T·V; backward peak 12·T·V; plus the int64 labels (8·T). No accelerate fp32 copy without autocast:
    # compare the loss's own chain, which is what pure bf16 (no autocast copy beyond the chain) and fp32 both peak at.
    from vramcalc.options import AdapterDtype, Loss, Method, Precision
    from vramcalc.terms.activations import dtypes
    from vramcalc.terms.logits import logits_bytes

    spec = vc_get_model("llama-3.1-8b")
    tokens, V = 4096, LLAMA_3_8B["V"]
    dt = dtypes(Method.LORA, Precision(precision), AdapterDtype.FP32)
    lg = logits_bytes(spec, Loss.HF, dt, tokens)
    assert lg.backward_peak == backward * tokens * V + 8 * tokens
    assert lg.forward_peak >= forward * tokens * V + 8 * tokens


def vc_get_model(name):
    from vramcalc import get_model

    return get_model(name)


@pytest.mark.trace
@pytest.mark.slow
def test_kbit_prepared_qlora_exceeds_lora_in_the_trace_too_when_activations_dominate():
    # prepare_model_for_kbit_training makes the residual stream fp32 and bitsandbytes' Linear4bit computes in its
    # input's dtype, so the MLP activations are fp32: with a small model and long batches QLoRA costs more than LoRA
    # under the same mixed precision (fms-hf-tuning#373 reports the effect). The trace of the real HF step, not the
    # estimate, is the evidence here (a tiny Llama, h=256, so that it takes seconds); the estimate must agree.
    from .conftest import has_torch
    from .tiny_models import TINY

    if not has_torch():
        pytest.skip("needs the trace extra: pip install 'vramcalc[trace]'")
    import vramcalc

    spec = TINY["llama"]
    setup = dict(precision="mixed-bf16", batch_size=2, seq_len=2048, lora_targets="all-linear")
    traced = {m: vramcalc.trace(spec, method=m, **setup).peak_tensor_bytes for m in ("lora", "qlora")}
    estimated = {m: estimate(spec, method=m, **setup).peak_tensor_bytes for m in ("lora", "qlora")}
    assert traced["qlora"] > traced["lora"]
    assert estimated["qlora"] > estimated["lora"]


# -- many batch shapes at once (sweep) ----------------------------------------------------------------------------
def test_the_phi3_sweep_example_of_issue_9_agrees_with_estimate_to_the_byte():
    # sequence lengths on both sides of phi-3-mini's 2047-token sliding window in one array: each row takes its own
    # mask decision (before the fix the 4096 row inherited the 1024 row's peak)
    np = pytest.importorskip("numpy")
    from vramcalc import get_model
    from vramcalc.estimator import peak_tensor_bytes_grid
    from vramcalc.training_setup import resolve_setup

    spec = get_model("phi-3-mini")
    peaks, _, _ = peak_tensor_bytes_grid(spec, resolve_setup(spec), np.array([1, 1]), np.array([1024, 4096]))
    for seq_len, peak in zip((1024, 4096), peaks):
        assert int(peak) == estimate("phi-3-mini", seq_len=seq_len).peak_tensor_bytes


@settings(max_examples=25, deadline=None)
@given(model=st.sampled_from(["phi-3-mini", "gemma-2-2b", "llama-3.1-8b", "qwen3-30b-a3b"]),
       method=st.sampled_from(["full", "lora", "qlora", "prompt"]), grad_ckpt=st.booleans(),
       attn=st.sampled_from(["sdpa", "eager"]),
       shapes=st.lists(st.tuples(st.integers(1, 4), st.integers(16, 9000)), min_size=2, max_size=6))
def test_a_grid_of_batch_shapes_equals_one_estimate_per_row(model, method, grad_ckpt, attn, shapes):
    np = pytest.importorskip("numpy")
    from vramcalc import get_model
    from vramcalc.estimator import peak_tensor_bytes_grid
    from vramcalc.training_setup import resolve_setup

    spec = get_model(model)
    resolved = resolve_setup(spec, method=method, grad_ckpt=grad_ckpt, attn=attn)
    b, s = np.array(shapes).T
    peaks, phases, _ = peak_tensor_bytes_grid(spec, resolved, b, s)
    for (batch, seq_len), peak, phase in zip(shapes, peaks, phases):
        one = estimate(model, method=method, grad_ckpt=grad_ckpt, attn=attn, batch_size=batch, seq_len=seq_len)
        assert (int(peak), str(phase)) == (one.peak_tensor_bytes, one.phase.value)
