"""LoRA on a GPTQ int4 base (``--method qlora --quant int4-gptq``): the estimate's terms (``vramcalc/terms/gptq.py``)
against the trace of the real step, whose decoder Linears are auto-gptq 0.7.1's own QuantLinear
(``vramcalc/tracing/gptq.py``), and the options' errors."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import re

import pytest

import vramcalc as vc
from tests.cli_helpers import run_cli
from tests.tiny_models import TINY
from vramcalc.errors import VramcalcError

# auto-gptq's packing needs in and out multiples of 32 (tiny llama's 688-wide MLP is not): the families' tiny models
# with a packable MLP, quantized in groups of 32
MODELS = {"llama": dataclasses.replace(TINY["llama"], intermediate_size=512, name="tiny-llama-gptq"),
          "qwen2": TINY["qwen2"], "mistral": TINY["mistral"]}
GPTQ = dict(method="qlora", quant="int4-gptq", precision="fp16", gptq_group_size=32, seq_len=512,
            lora_targets="all-linear")
# the trace imports the installed auto-gptq's qlinear files (README's test command: pip install --no-deps
# auto-gptq==0.7.1); without it the trace tests skip and the estimate tests run
needs_auto_gptq = pytest.mark.skipif(importlib.util.find_spec("auto_gptq") is None,
                                     reason="pip install --no-deps auto-gptq==0.7.1")


@needs_auto_gptq
def test_the_trace_runs_the_installed_auto_gptq_0_7_1_quant_linear():
    from importlib import metadata

    from vramcalc.tracing.gptq import quant_linear_class

    assert metadata.version("auto-gptq") == "0.7.1"
    for desc_act, name in ((False, "qlinear_cuda_old.py"), (True, "qlinear_cuda.py")):
        source = importlib.util.find_spec("auto_gptq").submodule_search_locations[0]
        assert quant_linear_class(desc_act).__module__.endswith(name[:-3])
        assert (pathlib.Path(source) / "nn_modules" / "qlinear" / name).exists()


@needs_auto_gptq
@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_estimate_is_within_half_a_percent_of_the_auto_gptq_trace(family, grad_ckpt):
    pytest.importorskip("peft")
    spec = MODELS[family]
    traced = vc.trace(spec, grad_ckpt=grad_ckpt, **GPTQ)
    estimated = vc.estimate(spec, grad_ckpt=grad_ckpt, **GPTQ)
    assert abs(estimated.peak_tensor_bytes / traced.peak_tensor_bytes - 1) <= 0.005


@needs_auto_gptq
@pytest.mark.parametrize("family", sorted(MODELS))
def test_stored_quantlinear_buffers_are_the_weights_term(family):
    """qweight, qzeros, scales, g_idx, bias and wf of every QuantLinear, as the trace registers them."""
    pytest.importorskip("peft")
    spec = MODELS[family]
    traced = vc.trace(spec, **GPTQ)
    estimated = vc.estimate(spec, **GPTQ)
    assert abs(estimated.terms()["weights"] - traced.terms()["weights"]) <= 1024  # within two 512-byte blocks


@needs_auto_gptq
def test_without_checkpointing_every_dequantized_weight_is_saved_for_backward():
    """torch.matmul saves the d·n dequantized weight of every Linear whose input requires grad (all but the first
    layer's q/k/v, whose input is the frozen embedding's): the activations match the trace to the byte."""
    pytest.importorskip("peft")
    spec = MODELS["qwen2"]
    traced = vc.trace(spec, grad_ckpt=False, **GPTQ)
    estimated = vc.estimate(spec, grad_ckpt=False, **GPTQ)
    assert estimated.terms()["activations"] == traced.terms()["activations"]
    without = vc.estimate(spec, grad_ckpt=False, **dict(GPTQ, quant="nf4", gptq_group_size=128))
    assert estimated.terms()["activations"] > without.terms()["activations"]


def test_checkpointing_drops_the_saved_dequantized_weights():
    spec = MODELS["llama"]
    plain = vc.estimate(spec, grad_ckpt=False, **GPTQ)
    ckpt = vc.estimate(spec, grad_ckpt=True, **GPTQ)
    assert ckpt.terms()["activations"] < plain.terms()["activations"]


def test_a_gptq_checkpoint_loads_without_a_16_bit_peak():
    """Loaded already packed: the load phase holds the stored tensors and nothing more (nf4 quantizes a 16-bit copy)."""
    from vramcalc.terms.loading import load_peak_bytes
    from vramcalc.terms.parameters import stored_tensors
    from vramcalc.terms.weights import weight_bytes
    from vramcalc.training_setup import resolve_setup

    spec = MODELS["llama"]
    resolved = resolve_setup(spec, **GPTQ)
    assert load_peak_bytes(spec, resolved) == weight_bytes(stored_tensors(spec, resolved))
    nf4 = resolve_setup(spec, **dict(GPTQ, quant="nf4", gptq_group_size=128))
    assert load_peak_bytes(spec, nf4) > weight_bytes(stored_tensors(spec, nf4))


def test_group_size_changes_the_quantization_state():
    small = vc.estimate("qwen2.5-0.5b", **dict(GPTQ, gptq_group_size=32))
    large = vc.estimate("qwen2.5-0.5b", **dict(GPTQ, gptq_group_size=128))
    assert small.terms()["weights"] > large.terms()["weights"]


def test_gptq_weights_are_about_half_a_byte_per_quantized_weight():
    b = vc.estimate("qwen2.5-7b", **dict(GPTQ, gptq_group_size=128))
    nf4 = vc.estimate("qwen2.5-7b", **dict(GPTQ, quant="nf4", gptq_group_size=128))
    assert 0.9 < b.terms()["weights"] / nf4.terms()["weights"] < 1.1


@pytest.mark.parametrize("options, words", [
    (dict(method="lora", quant="int4-gptq"), "--quant does not apply to --method lora"),
    (dict(method="full", quant="int4-gptq"), "--quant does not apply to --method full"),
    (dict(method="dora", quant="int4-gptq"), "--method qlora"),
    (dict(method="qlora", quant="int4-gptq", precision="mixed-fp16"), "16 bits"),
    (dict(method="qlora", quant="int4-gptq", sharding="fsdp", num_gpus=2), "--gptq-kernel triton-v2"),
    (dict(method="qlora", quant="int4-gptq", sharding="fsdp", num_gpus=2, gptq_kernel="triton-v2",
          offload="params"), "--sharding fsdp with --offload"),
    (dict(method="qlora", quant="int4-gptq", sharding="zero3", num_gpus=2), "--sharding zero3"),
    (dict(method="qlora", quant="int4-gptq", gptq_kernel="triton-v2", ep=2, num_gpus=2), "--ep"),
    (dict(method="qlora", quant="nf4", gptq_kernel="triton-v2"), "int4-gptq only"),
    (dict(method="qlora", quant="int4-gptq", gptq_kernel="triton-v3"), "gptq kernel"),
    (dict(method="qlora", quant="int4-gptq", gptq_group_size=0), "positive integer or -1"),
    (dict(method="qlora", quant="nf4", gptq_group_size=64), "int4-gptq only"),
    (dict(method="qlora", quant="int4-gptq", gptq_group_size=96), "cannot be packed"),
])
def test_invalid_gptq_combinations_say_why(options, words):
    with pytest.raises(VramcalcError, match=re.escape(words)):
        vc.estimate("qwen2.5-0.5b", **options)


def test_deepspeed_zero2_keeps_the_gptq_base_whole_and_shards_the_adapters_fp32_states():
    # Qwen's finetune_qlora_single_gpu.sh: ZeRO-2 on one GPU in fp16; the QuantLinear buffers are not parameters,
    # so DeepSpeed leaves them alone; the LoRA parameters get DeepSpeed's fp32 master copy and fp32 Adam states
    common = dict(method="qlora", quant="int4-gptq", precision="fp16", seq_len=512)
    plain = vc.estimate("qwen2.5-0.5b", **common)
    one, two = (vc.estimate("qwen2.5-0.5b", sharding="zero2", num_gpus=n, **common) for n in (1, 2))
    trainable = plain.details["trainable_params"]
    assert one.terms()["weights"] == two.terms()["weights"]  # ZeRO-2 partitions no weight
    # DeepSpeed casts the module, adapters included, to fp16; peft alone keeps them fp32 (autocast_adapter_dtype)
    assert plain.terms()["weights"] - one.terms()["weights"] == pytest.approx(2 * trainable, rel=0.01)
    assert one.terms()["optimizer_states"] == pytest.approx(12 * trainable, rel=0.01)  # master + two moments
    assert two.terms()["optimizer_states"] == pytest.approx(6 * trainable, rel=0.01)


def test_cli_estimate_takes_the_gptq_flags(capsys):
    code, out, err = run_cli(capsys, "estimate", "qwen2.5-0.5b", "--method", "qlora", "--quant", "int4-gptq",
                             "--precision", "fp16", "--gptq-group-size", "64", "--gptq-desc-act", "--format", "json")
    assert code == 0, err
    inputs = json.loads(out)["inputs"]
    assert inputs["quant"] == "int4-gptq" and inputs["gptq_group_size"] == 64 and inputs["gptq_desc_act"] is True


def test_cli_rejects_gptq_with_lora_in_one_line(capsys):
    code, out, err = run_cli(capsys, "estimate", "qwen2.5-0.5b", "--method", "lora", "--quant", "int4-gptq")
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1


# -- FSDP (fms-acceleration's autogptq plugin) and mixtures of experts ------------------------------------------------
FMS = dict(method="qlora", quant="int4-gptq", precision="fp16", gptq_kernel="triton-v2", seq_len=4096, batch_size=2,
           lora_targets="q_proj,k_proj,v_proj,o_proj", lora_rank=16, grad_ckpt="full", attn="flash")


def _resolved(model, **options):
    from vramcalc.training_setup import resolve_setup

    spec = vc.get_model(model)
    return spec, resolve_setup(spec, **options)


def test_fsdp_shards_qweight_and_qzeros_as_16_bit_elements_by_hand():
    # Mistral-7B q_proj [4096 -> 4096], group 128: qweight int32 [4096/8, 4096] = 8,388,608 B, qzeros int32
    # [4096/128, 4096/8] = 65,536 B (qlinear_tritonv2.py:67-80); the plugin views both as fp16 parameters
    # (autogptq_utils.py:74-77): (8,388,608 + 65,536) / 2 = 4,227,072 elements, 2,113,536 per rank on two ranks
    from vramcalc.terms import distributed

    spec, resolved = _resolved("mistral-7b-v0.1", sharding="fsdp", num_gpus=2, **FMS)
    engine = {t.name: t for t in distributed.engine_tensors(spec, resolved)}
    q = engine["q_proj.weight"]
    assert (q.kind, q.shape, q.bits, q.trainable) == (distributed.PACKED_4BIT, (4_227_072, 1), 16, False)
    assert distributed.sharded(q, 2).numel == 2_113_536
    # the buffers stay whole: scales fp16 [32, 4096] 262,144 B, g_idx int32 [4096] 16,384 B, bias fp16 [4096]
    # 8,192 B (optimum's bias=True, kept), wf int32 [1, 8] -> one 512-B block
    from vramcalc.terms import gptq as gptq_terms

    assert gptq_terms.buffer_bytes(4096, 4096, 128, 2) == 262_144 + 16_384 + 8_192 + 512
    assert gptq_terms.fsdp_packed_bytes(4096, 4096, 128) == 8_388_608 + 65_536


def test_fsdp_rank_weights_are_half_the_packed_codes_plus_the_whole_buffers():
    from vramcalc.terms import distributed
    from vramcalc.terms.parameters import stored_tensors

    spec, one = _resolved("mistral-7b-v0.1", **FMS)
    _, two = _resolved("mistral-7b-v0.1", sharding="fsdp", num_gpus=2, **FMS)
    quantized = [t for t in stored_tensors(spec, one) if t.kind == "quantized"]
    packed = sum((t.shape[1] // 8 * t.shape[0] + -(-t.shape[1] // 128) * t.shape[0] // 8) * 4 * t.count
                 for t in quantized)
    buffers = sum((round_up_512(2 * -(-t.shape[1] // 128) * t.shape[0]) + round_up_512(4 * t.shape[1])
                   + round_up_512(2 * t.shape[0]) + 512) * t.count for t in quantized)
    whole = sum(t.total_bytes for t in quantized)
    assert whole == pytest.approx(packed + buffers, rel=1e-3)  # the stored QuantLinears: qweight + qzeros + buffers
    states = distributed.rank_states(spec, two)
    others = states.weights - packed // 2 - buffers  # embedding, norms, lm_head halves, fp32 adapter shards
    h, kv, r = 4096, 1024, 16
    adapters = 32 * r * (4 * h + h + kv + kv + h)  # A [r, in] and B [out, r] of q, k, v, o in 32 layers
    # half of the fp16 embedding and lm_head [V, h] each, half of the adapters upcast to fp32 (accelerate), norms
    expected = spec.vocab_size * h * 2 + adapters * 4 // 2 + (2 * 32 + 1) * h * 2 // 2
    assert others == pytest.approx(expected, rel=0.005)


def round_up_512(n: int) -> int:
    return -(-n // 512) * 512


def test_fsdp_gathers_one_layer_of_packed_codes_per_unit():
    from vramcalc.terms import distributed

    spec, resolved = _resolved("mistral-7b-v0.1", sharding="fsdp", num_gpus=2, **FMS)
    unit = distributed.gathering(spec, resolved).dense
    h, kv, i = 4096, 1024, 14336
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # (in, out): q k v o gate up down
    packed = sum(4 * (n_in // 8) * out + 4 * (n_in // 128) * (out // 8) for n_in, out in linears)
    assert unit.buffer_bytes >= packed  # the unit's flat all-gather holds the layer's 4-bit buffers ...
    assert unit.buffer_bytes - packed < 64 * 2**20  # ... plus its norms and fp16 adapters (a few MB)


def test_mixtral_gptq_stores_one_quantlinear_per_expert_projection():
    # transformers 4.48 MixtralBlockSparseTop2MLP: w1, w3 [14336, 4096] and w2 [4096, 14336] per expert, 8 experts,
    # 32 layers; qweight int32 [4096/8, 14336] = 29,360,128 B (w1/w3), [14336/8, 4096] the same for w2
    from vramcalc.terms.parameters import stored_tensors

    spec, resolved = _resolved("mixtral-8x7b", **FMS)
    experts = {t.name: t for t in stored_tensors(spec, resolved) if "experts" in t.name}
    gate_up, down = experts["mlp.experts.gate_up_proj"], experts["mlp.experts.down_proj"]
    assert (gate_up.kind, gate_up.shape, gate_up.count) == ("quantized", (14336, 4096), 32 * 16)
    assert (down.kind, down.shape, down.count) == ("quantized", (4096, 14336), 32 * 8)
    assert gate_up.bytes_each - gate_up.metadata_bytes == 29_360_128
    router = [t for t in stored_tensors(spec, resolved) if t.name == "mlp.gate.weight"][0]
    assert (router.kind, router.bits) == ("router", 16)  # gptqmodel's mixtral.py lists no gate: fp16


def test_triton_v2_saves_no_dequantized_weight_and_dequantizes_again_in_backward():
    from vramcalc.terms import gptq as gptq_terms

    spec = vc.get_model("mistral-7b-v0.1")
    assert gptq_terms.backward_dequant_bytes(spec) == 2 * 4096 * 14336  # the largest Linear in fp16
    mixtral = vc.get_model("mixtral-8x7b")
    assert gptq_terms.backward_dequant_bytes(mixtral) == 2 * 4096 * 14336  # one expert projection
    cuda_old = vc.estimate("qwen2.5-0.5b", method="qlora", quant="int4-gptq", precision="fp16", seq_len=512,
                           grad_ckpt="none")
    triton = vc.estimate("qwen2.5-0.5b", method="qlora", quant="int4-gptq", precision="fp16", seq_len=512,
                         grad_ckpt="none", gptq_kernel="triton-v2")
    assert triton.terms()["activations"] < cuda_old.terms()["activations"]


def test_gptq_on_a_moe_with_dense_layers_says_why():
    # DeepSeek-V3's first three layers are dense (first_k_dense_replace): not modelled
    with pytest.raises(VramcalcError, match="has dense layers or dense experts"):
        vc.estimate("deepseek-v3", **dict(FMS, lora_targets="o_proj"))


def test_trace_refuses_triton_v2_in_one_line():
    with pytest.raises(VramcalcError, match="estimate only"):
        vc.trace("qwen2.5-0.5b", method="qlora", quant="int4-gptq", precision="fp16", seq_len=64,
                 gptq_kernel="triton-v2")


def test_a_moe_whose_expert_width_is_its_hidden_size_counts_only_down_proj_as_down():
    # gpt-oss-20b: intermediate_size = hidden_size = 2880, so gate_up's per-expert Linears [I, h] and down's [h, I]
    # have the same out features; per layer gate_up holds 2E of them and down E, so down is a third of the MLP's
    from vramcalc.terms import gptq as gptq_terms

    spec = vc.get_model("gpt-oss-20b")
    assert spec.hidden_size == 2880
    layer = gptq_terms.layer_dequantized(spec, 2)
    assert layer.down > 0 and layer.mlp == 3 * layer.down
