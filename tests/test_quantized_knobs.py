"""Issue 11 knobs of the quantized base and of LoRA outside the layers: the estimate against the trace of the real
bitsandbytes / peft code (``quant_saves_input``, ``quantize_lm_head``, ``quant_state_dtype``, ``quant=int8``,
``kbit_prep``, LoRA on ``lm_head`` / ``embed_tokens``), and the ``load`` phase's byte rules.

Golden numbers say where they came from; every trace claim compares two independent computations (the analytic
estimate and the traced step), so it can fail.
"""

import math

import pytest

from vramcalc.catalogue import get_model
from vramcalc.model import ModelSpec
from vramcalc.terms import loading, parameters, quantized
from vramcalc.terms.weights import weight_bytes
from vramcalc.training_setup import resolve_setup

from .conftest import needs_torch
from .tiny_models import TINY

# the tiny llama with a vocabulary small enough that the decoder layers, not the logits, carry the knobs' effect
WIDE = ModelSpec(name="tiny-llama-wide", family="llama", hidden_size=512, num_layers=3, num_heads=8, num_kv_heads=2,
                 head_dim=64, intermediate_size=1376, vocab_size=4096, max_position_embeddings=8192)


def _stored(spec, **options):
    return parameters.stored_tensors(spec, resolve_setup(spec, **options))


# -- parameters ---------------------------------------------------------------------------------------------------
def test_int8_linear_is_one_byte_per_weight_plus_an_fp32_scale_per_row():
    # bitsandbytes Int8Params: CB int8 [out, in], SCB fp32 [out] (nn/modules.py Int8Params._quantize); each
    # allocation rounded to CUDA's 512-byte granule
    spec = TINY["llama"]
    tensors = {t.name: t for t in _stored(spec, method="qlora", quant="int8")}
    down = tensors["down_proj.weight"]  # [256, 688]
    assert down.bits == 8 and not down.trainable
    assert down.bytes_each == math.ceil(256 * 688 / 512) * 512 + math.ceil(4 * 256 / 512) * 512


def test_int8_base_weighs_about_twice_the_nf4_base():
    spec = get_model("llama-2-7b")
    linear_nf4 = sum(t.total_bytes for t in _stored(spec, method="qlora") if t.kind == "quantized")
    linear_int8 = sum(t.total_bytes for t in _stored(spec, method="qlora", quant="int8") if t.kind == "quantized")
    # 1 + 4/in bytes per weight against 0.5 + 1/64 + 4/(64*256) (memory-math.md section 3): ratio 1.94
    assert 1.9 < linear_int8 / linear_nf4 < 1.97


def test_quantized_lm_head_stores_four_bit_codes():
    spec = get_model("llama-2-7b")
    plain = weight_bytes(_stored(spec, method="qlora"))
    quantized_head = weight_bytes(_stored(spec, method="qlora", quantize_lm_head=True))
    V, h = spec.vocab_size, spec.hidden_size
    # lm_head goes from 2 bytes to 0.5159 bytes per weight with double quantization (docs/stacks-research.md Q3:
    # -0.19 GB on Llama-2-7B)
    saved = plain - quantized_head
    assert abs(saved - (2 - 0.515869) * V * h) < 0.001 * V * h


def test_a_tied_lm_head_gets_its_own_quantized_weight():
    spec = TINY["gemma2"]  # tied embeddings
    names = [t.name for t in _stored(spec, method="qlora", quantize_lm_head=True)]
    assert "lm_head.weight" in names and "embed_tokens.weight" in names


@pytest.mark.parametrize("target, shapes", [("lm_head", [(8, 256), (2048, 8)]),
                                            ("embed_tokens", [(8, 2048), (256, 8)])])
def test_lora_outside_the_layers_has_peft_shapes(target, shapes):
    # peft tuners/lora/layer.py: Linear A [r, in], B [out, r]; Embedding lora_embedding_A [r, V], B [h, r]
    spec = TINY["llama"]
    tensors = _stored(spec, method="lora", lora_targets=f"q_proj,v_proj,{target}")
    adapters = [t.shape for t in tensors if t.kind == "adapter" and t.name.startswith(target)]
    assert adapters == shapes


# -- the load phase -------------------------------------------------------------------------------------------------
def test_whole_model_load_holds_the_sixteen_bit_model():
    spec = get_model("llama-2-7b")
    whole = loading.load_peak_bytes(spec, resolve_setup(spec, method="qlora", load="whole-model"))
    per_tensor = loading.load_peak_bytes(spec, resolve_setup(spec, method="qlora"))
    assert whole >= 2 * spec.params  # every weight at 2 bytes at once
    assert per_tensor < 0.35 * whole  # 4-bit weights plus one 16-bit tensor


def test_torchtune_quantize_on_build_peaks_as_the_tutorial_measured():
    # docs/stacks-research.md section 2, torchtune QLoRA Llama-2-7B: about 3.6 GB built plus to_nf4's 68 B x 45.09 M
    # weights (3.07 GB) = about 6.6 GB allocated at the load peak (torchao 0.1 nf4tensor.py:438-446)
    spec = get_model("llama-2-7b")
    peak = loading.load_peak_bytes(spec, resolve_setup(spec, method="qlora", load="per-layer"), "torchao-0.1")
    assert 6.4e9 < peak < 6.9e9


def test_per_tensor_load_is_the_weights_plus_one_tensor():
    spec = get_model("llama-3.1-8b")
    resolved = resolve_setup(spec, method="qlora")
    W = weight_bytes(parameters.stored_tensors(spec, resolved))
    largest = max(m.weight_numel for m in spec.inventory.linears)  # 14336 x 4096
    assert W + 2 * largest <= loading.load_peak_bytes(spec, resolved) <= W + 2.1 * largest


def test_an_fp32_qlora_model_loads_fp32_parameters_and_an_fp32_copy_of_the_linear_it_quantizes():
    # transformers v5 core_model_loading.py keeps the model's dtype for a tensor quantized on load (``_dtype = dtype``,
    # cast on the host in ``_materialize_copy``): an fp32 model's largest Linear reaches the GPU at 4 B per weight
    spec = get_model("llama-3.1-8b")
    fp32, bf16 = (resolve_setup(spec, method="qlora", precision=p) for p in ("fp32", "bf16"))
    largest = max(m.weight_numel for m in spec.inventory.linears)
    W32, W16 = (weight_bytes(parameters.stored_tensors(spec, r)) for r in (fp32, bf16))
    unquantized = spec.vocab_size * spec.hidden_size * 2 + spec.hidden_size * (2 * spec.num_layers + 1)
    assert W32 - W16 == 2 * unquantized  # embeddings, lm_head and norms at 4 bytes instead of 2
    assert W32 + 4 * largest <= loading.load_peak_bytes(spec, fp32) <= W32 + 4.1 * largest


# -- knobs without effect stay at today's numbers --------------------------------------------------------------------
def test_default_knobs_add_nothing():
    spec = TINY["llama"]
    resolved = resolve_setup(spec, method="qlora")
    from vramcalc.estimator import layer_setup

    extras = quantized.step_extras(spec, resolved.setup, layer_setup(resolved), False, 1, 2048)
    assert not any(extras)  # every addition 0, no lm_head forward moment


# -- estimate against the trace ----------------------------------------------------------------------------------
CASES = [
    (WIDE, dict(seq_len=512, method="qlora", quant_saves_input=True)),
    (WIDE, dict(seq_len=2048, method="qlora", quant_saves_input=True, grad_ckpt=True)),
    (WIDE, dict(seq_len=512, method="qlora", quant_saves_input=True, lora_targets="all-linear", lora_dropout=0.1)),
    (WIDE, dict(seq_len=256, method="qlora", quantize_lm_head=True, quant_state_dtype="fp16")),
    (WIDE, dict(seq_len=2048, method="qlora", quantize_lm_head=True, quant_saves_input=True,
                quant_state_dtype="fp16")),
    (WIDE, dict(seq_len=512, method="qlora", quant="int8")),
    (WIDE, dict(seq_len=1024, method="qlora", quant="int8", grad_ckpt=True)),
    # reentrant checkpointing builds no autograd node in forward: nothing held beyond the recomputed layer
    (WIDE, dict(seq_len=2048, method="qlora", quant_saves_input=True, grad_ckpt="reentrant")),
    (WIDE, dict(seq_len=1024, method="qlora", quant="int8", grad_ckpt="reentrant")),
    (WIDE, dict(seq_len=1024, method="lora", grad_ckpt="reentrant")),
    (WIDE, dict(seq_len=512, method="qlora", quant="int8", kbit_prep=True)),
    (WIDE, dict(seq_len=512, method="qlora", kbit_prep=True)),
    (TINY["qwen3"], dict(seq_len=512, method="qlora", quant_saves_input=True, quantize_lm_head=True)),
    (WIDE, dict(seq_len=512, method="lora", lora_targets="q_proj,v_proj,lm_head")),
    (WIDE, dict(seq_len=512, method="lora", lora_targets="q_proj,v_proj,embed_tokens")),
]


def _ids(case):
    spec, options = case
    return f"{spec.name}-" + "-".join(f"{k}={v}" for k, v in options.items())


@needs_torch
@pytest.mark.trace
@pytest.mark.parametrize("spec, options", CASES, ids=[_ids(c) for c in CASES])
def test_estimate_matches_the_trace_of_the_real_libraries(spec, options):
    from vramcalc.estimator import step_moments
    from vramcalc.tracing.runner import run_trace

    resolved = resolve_setup(spec, **options)
    estimated = max(m.tensor_bytes for m in step_moments(spec, resolved))
    traced = sum(run_trace(spec, resolved, progress=False).terms.values())
    assert abs(estimated - traced) / traced < 0.01


@needs_torch
@pytest.mark.trace
@pytest.mark.parametrize("knob", [dict(quant_saves_input=True), dict(quant="int8")])
def test_held_inputs_grow_the_trace_as_estimated(knob):
    # the knob's own effect: trace(knob) - trace(base) against estimate(knob) - estimate(base), at the same
    # backward-start peak (what the inputs held by bitsandbytes' ctx.tensors add)
    from vramcalc.estimator import step_moments
    from vramcalc.tracing.runner import run_trace

    spec = WIDE
    base = dict(seq_len=512, method="qlora", loss="fused")

    def both(options):
        resolved = resolve_setup(spec, **options)
        estimated = max(m.tensor_bytes for m in step_moments(spec, resolved))
        return estimated, sum(run_trace(spec, resolved, progress=False).terms.values())

    (est0, tr0), (est1, tr1) = both(base), both({**base, **knob})
    traced_delta = tr1 - tr0
    assert traced_delta > 0.05 * tr0  # the effect is real: bitsandbytes keeps the inputs
    assert abs((est1 - est0) - traced_delta) < 0.03 * traced_delta


@needs_torch
@pytest.mark.trace
def test_holding_emulation_keeps_the_input_until_the_graph_dies():
    # bitsandbytes 0.43.1 MatMul4Bit: ctx.tensors = (A, B) (autograd/_functions.py:516): the input outlives its own
    # node's backward and is freed with the graph; 0.50.2 keeps (None, B) and frees it at once
    import gc
    import weakref

    import torch
    from torch import nn

    from vramcalc.options import Quant
    from vramcalc.tracing.qlora import _quantized_template, fake_linear4bit_class, materialise_quant_states

    def alive_after_backward(holds: bool) -> tuple[bool, bool]:
        with torch.device("meta"):
            dense = nn.Linear(128, 256, bias=False, dtype=torch.bfloat16)
            template = _quantized_template((256, 128), torch.bfloat16, Quant.NF4.value, True)
            layer = fake_linear4bit_class()(dense, template, "nf4", True, torch.bfloat16)
        layer = layer.to_empty(device="cpu")
        materialise_quant_states(nn.Sequential(layer))
        layer.weight.data.zero_()
        layer.quant_state.absmax.zero_()
        layer.holds_input = holds
        leaf = torch.randn(64, 128, dtype=torch.bfloat16, requires_grad=True)
        x = leaf * 2  # a non-leaf input, freed when nothing holds it
        ref = weakref.ref(x)
        loss = layer(x).float().sum()
        del x
        gc.collect()
        alive_in_forward = ref() is not None
        loss.backward()
        gc.collect()
        alive_after = ref() is not None
        del loss
        gc.collect()
        return alive_in_forward and alive_after, ref() is None

    held, freed_with_graph = alive_after_backward(True)
    assert held and freed_with_graph
    not_held, _ = alive_after_backward(False)
    assert not not_held


@needs_torch
@pytest.mark.trace
@pytest.mark.parametrize("knob", [dict(quant_saves_input=True), dict(quant="int8")])
def test_reentrant_checkpointing_holds_no_ctx_inputs_where_non_reentrant_holds_every_layers(knob):
    # the same held inputs (bitsandbytes' ctx.tensors) under the two checkpoint flavours: non-reentrant keeps every
    # layer's from forward (saved-tensor hooks never see a ctx attribute), reentrant none (no grad in forward)
    from vramcalc.tracing.runner import run_trace

    spec = WIDE
    options = dict(seq_len=1024, method="qlora", **knob)
    traced = {mode: sum(run_trace(spec, resolve_setup(spec, grad_ckpt=mode, **options), progress=False)
                        .terms.values()) for mode in ("full", "reentrant")}
    assert traced["full"] > 1.05 * traced["reentrant"]
    if "quant_saves_input" in knob:  # as if bitsandbytes kept nothing, as 0.44 and later keep
        plain = sum(run_trace(spec, resolve_setup(spec, grad_ckpt="reentrant", seq_len=1024, method="qlora"),
                              progress=False).terms.values())
        assert abs(traced["reentrant"] - plain) < 0.01 * plain
