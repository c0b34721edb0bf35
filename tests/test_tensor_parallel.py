"""Tensor parallelism (``--tp``): transformers' tp_plan="auto" per rank, estimated and traced on a fake process group."""

import dataclasses
import json

import pytest

import vramcalc as vc
from vramcalc.cli import main
from vramcalc.errors import VramcalcError
from vramcalc.estimator import step_moments
from vramcalc.terms import tensor_parallel
from vramcalc.terms.parameters import stored_tensors
from vramcalc.training_setup import resolve_setup

from .conftest import needs_torch
from .tiny_models import TINY

TOLERANCE = 0.05  # issue 14: per-rank estimates within 5% of the trace

# tiny llama with 4 key/value heads, so that 4 ranks hold whole heads (transformers' get_kv_heads_per_rank refuses
# k % T != 0); the second one with a 512-token vocabulary, so that activations, not logits, hold the peak
LLAMA_4KV = dataclasses.replace(TINY["llama"], name="tiny-llama-4kv", num_heads=8, num_kv_heads=4, head_dim=32)
LLAMA_4KV_V512 = dataclasses.replace(LLAMA_4KV, name="tiny-llama-4kv-v512", vocab_size=512)
QWEN3_4KV = dataclasses.replace(TINY["qwen3"], name="tiny-qwen3-4kv", num_kv_heads=4, vocab_size=512)


def _rank_peak(spec, **options) -> int:
    resolved = resolve_setup(spec, **options)
    rank_spec, rank_resolved = tensor_parallel.rank_view(spec, resolved)
    return max(m.tensor_bytes for m in step_moments(rank_spec, rank_resolved))


# -- the estimate ------------------------------------------------------------------------------------------------------
def test_tp_shards_every_attention_and_mlp_matrix_and_the_vocabulary_but_not_the_norms():
    spec = vc.get_model("llama-3.1-8b")
    whole = {t.name: t for t in stored_tensors(spec, resolve_setup(spec))}
    resolved = resolve_setup(spec, tp=4)
    rank_spec, rank_resolved = tensor_parallel.rank_view(spec, resolved)
    rank = {t.name: t for t in stored_tensors(rank_spec, rank_resolved)}
    assert set(rank) == set(whole)
    for name, tensor in whole.items():
        ratio = rank[name].numel / tensor.numel
        if tensor.kind == "norm":
            assert ratio == 1, name
        else:  # q/k/v/o, gate/up/down and the [V, h] embedding and lm_head (V = 128256 divides by 4)
            assert ratio == pytest.approx(1 / 4), name


def test_lora_keeps_the_unsharded_factor_whole_as_peft_does():
    """peft shards lora_B of a colwise layer and lora_A of a rowwise one (tuners/lora/model.py:402-440)."""
    spec = vc.get_model("llama-3.1-8b")
    resolved = resolve_setup(spec, tp=4, method="lora", lora_targets="all-linear", lora_rank=16)
    rank = {t.name: t.shape for t in stored_tensors(*tensor_parallel.rank_view(spec, resolved)) if t.kind == "adapter"}
    h, q, kv, inter = 4096, 4096, 1024, 14336
    expected = {"q_proj": ((16, h), (q // 4, 16)), "k_proj": ((16, h), (kv // 4, 16)),
                "o_proj": ((16, q // 4), (h, 16)), "down_proj": ((16, inter // 4), (h, 16)),
                "up_proj": ((16, h), (inter // 4, 16))}
    for module, (a, b) in expected.items():
        assert {shape for name, shape in rank.items() if module in name} == {a, b}, module


def test_more_tensor_parallel_ranks_need_less_memory_per_rank_but_never_less_than_the_logits():
    peaks = [vc.estimate("llama-3.1-8b", tp=tp, seq_len=4096) for tp in (1, 2, 4, 8)]
    assert all(a.peak_tensor_bytes > b.peak_tensor_bytes for a, b in zip(peaks, peaks[1:]))
    logits = {p.terms_bytes[vc.Term.LOGITS] for p in peaks[1:]}  # gathered to [b, s, V] on every rank
    assert len(logits) == 1


def test_estimates_without_tp_are_those_of_tp_1():
    assert vc.estimate("qwen2.5-7b", method="lora").terms_bytes == vc.estimate("qwen2.5-7b", method="lora",
                                                                                 tp=1).terms_bytes


def test_tp_composes_with_data_parallel_ranks_over_the_rest_of_the_gpus():
    alone = vc.estimate("llama-3.1-8b", tp=2)
    fsdp = vc.estimate("llama-3.1-8b", tp=2, num_gpus=8, sharding="fsdp")
    assert alone.inputs["num_gpus"] == 2 and alone.inputs["origins"]["num_gpus"] == "implied by tp"
    assert fsdp.details["data_parallel_ranks"] == 4
    # FSDP2 shards the rank's slice again over 4 ranks, after accelerate's fp32 upcast: 2 Adam moments x 4 B / 4
    # per parameter of the slice, against 2 x 2 B in bf16 with the slice alone: half
    assert fsdp.terms_bytes[vc.Term.OPTIMIZER_STATES] == pytest.approx(
        alone.terms_bytes[vc.Term.OPTIMIZER_STATES] / 2, rel=0.01)


def test_tp_traffic_is_two_forward_and_five_backward_all_reduces_of_b_s_h_per_layer():
    b = vc.estimate("llama-3.1-8b", tp=4, seq_len=1024)
    L, h, V, tokens, c = 32, 4096, 128256, 1024, 2
    reduces = L * (2 + 5) + 2
    assert b.details["tp_all_reduces_per_micro_batch"] == reduces
    expected = 2 * 3 / 4 * reduces * tokens * h * c + 3 / 4 * tokens * V * c
    assert b.details["tp_communication_bytes_per_step"] == pytest.approx(expected, rel=1e-6)
    ckpt = vc.estimate("llama-3.1-8b", tp=4, seq_len=1024, grad_ckpt=True)
    assert ckpt.details["tp_all_reduces_per_micro_batch"] == reduces + 2 * L  # the recompute reduces again


@pytest.mark.parametrize("options, message", [
    (dict(model="llama-3.1-8b", tp=3), "does not divide"),  # 32 heads, 8 kv heads
    (dict(model="llama-3.1-8b", tp=16), "key/value heads"),
    (dict(model="llama-3.1-8b", tp=2, num_gpus=3), "not a multiple"),
    (dict(model="llama-3.1-8b", tp=2, num_gpus=4), "--sharding"),
    (dict(model="llama-3.1-8b", tp=2, num_gpus=2, sharding="fsdp"), "one data-parallel rank"),
    (dict(model="llama-3.1-8b", tp=2, num_gpus=4, sharding="zero3"), "DeepSpeed"),
    (dict(model="llama-3.1-8b", tp=2, num_gpus=4, sharding="ddp"), "does not wrap"),
    (dict(model="llama-3.1-8b", tp=2, method="qlora"), "bitsandbytes"),
    (dict(model="qwen3-30b-a3b", tp=2), "MoE"),
    (dict(model="llama-3.1-8b", tp=0), "tensor-parallel degree"),
])
def test_bad_tensor_parallel_setups_get_one_line_errors(options, message):
    model = options.pop("model")
    with pytest.raises(VramcalcError, match=message):
        vc.estimate(model, **options)


def test_cli_takes_tp_and_json_shows_it(capsys):
    assert main(["estimate", "llama-3.1-8b", "--tp", "4", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["inputs"]["tp"] == 4 and out["inputs"]["num_gpus"] == 4
    assert main(["estimate", "llama-3.1-8b", "--tp", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


# -- against the trace -------------------------------------------------------------------------------------------------
TRACE_CASES = [
    (TINY["llama"], dict(tp=2, seq_len=256)),
    (LLAMA_4KV, dict(tp=4, seq_len=256)),
    (LLAMA_4KV, dict(tp=2, seq_len=256, grad_ckpt=True)),
    (LLAMA_4KV_V512, dict(tp=2, seq_len=512, grad_ckpt=True)),
    (LLAMA_4KV_V512, dict(tp=4, seq_len=256, batch_size=2, optimizer="sgd")),
    (LLAMA_4KV, dict(tp=2, seq_len=256, method="lora")),
    (LLAMA_4KV, dict(tp=4, seq_len=256, method="lora", lora_targets="all-linear", grad_ckpt=True)),
    (LLAMA_4KV_V512, dict(tp=2, seq_len=512, method="lora", grad_ckpt=True)),
    (LLAMA_4KV_V512, dict(tp=4, seq_len=512, method="lora")),
    (QWEN3_4KV, dict(tp=4, seq_len=256)),
]


@needs_torch
@pytest.mark.trace
@pytest.mark.parametrize("spec, options", TRACE_CASES,
                         ids=[f"{s.name}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for s, o in TRACE_CASES])
def test_estimated_tp_rank_peak_is_within_5_percent_of_the_fake_group_trace(spec, options):
    from vramcalc.tracing.runner import run_trace

    traced = sum(run_trace(spec, resolve_setup(spec, **options), progress=False).terms.values())
    assert abs(_rank_peak(spec, **options) - traced) / traced < TOLERANCE


@needs_torch
@pytest.mark.trace
def test_the_traced_rank_holds_dtensor_shards_of_transformers_own_plan():
    """The trace's parameters are transformers' DTensors: a 1/T shard of q/k/v/o, the MLP, embedding and lm_head."""
    from vramcalc.options import Term
    from vramcalc.tracing.runner import run_trace

    spec = LLAMA_4KV
    one = run_trace(spec, resolve_setup(spec, seq_len=64), progress=False).terms[Term.WEIGHTS]
    four = run_trace(spec, resolve_setup(spec, seq_len=64, tp=4), progress=False).terms[Term.WEIGHTS]
    norms = (2 * spec.num_layers + 1) * spec.hidden_size * 2  # bf16, whole on every rank
    assert four - norms == pytest.approx((one - norms) / 4, rel=0.01)


@needs_torch
@pytest.mark.trace
def test_the_trace_runs_one_tensor_parallel_group_only():
    from vramcalc.tracing.runner import run_trace

    with pytest.raises(VramcalcError, match="one tensor-parallel group"):
        run_trace(LLAMA_4KV, resolve_setup(LLAMA_4KV, tp=2, num_gpus=4, sharding="fsdp"), progress=False)


@needs_torch
@pytest.mark.trace
@pytest.mark.parametrize("options", [dict(seq_len=256), dict(seq_len=256, method="lora", lora_targets="all-linear")],
                         ids=["full", "lora-all-linear"])
def test_two_gloo_ranks_of_a_tp_group_each_peak_within_5_percent_of_the_estimate(options):
    """Real CPU tensors over gloo: transformers' DTensor TP with real all-reduces and the logits' all-gather."""
    from .test_distributed import run_gloo_ranks

    peaks = run_gloo_ranks("llama", dict(tp=2, **options))
    estimated = _rank_peak(TINY["llama"], num_gpus=2, tp=2, **options)
    # heads and vocabulary split evenly, and each rank frees a collective's tensors when it drops them, not when
    # gloo's worker thread does (tracing/distributed.py MainThreadCollectives): the same peak, byte for byte
    assert sorted(peaks) == [0, 1] and peaks[0] == peaks[1]
    for rank, peak in peaks.items():
        assert abs(estimated - peak) / peak < TOLERANCE, (rank, peak, estimated)


# -- torchtitan's plan: sequence parallelism and loss parallelism (--tp-plan torchtitan) ---------------------------
def test_torchtitan_plan_keeps_a_sequence_shard_between_blocks_and_a_vocabulary_shard_in_the_loss():
    """torchtitan's ``apply_tp`` (parallelize_llama.py @9dec370): ``SequenceParallel`` norms and ``Shard(1)`` block
    outputs, so a checkpointed layer keeps [b, s/T, h] (transformers' plan keeps the replicated [b, s, h]); the
    output layer's logits stay ``Shard(-1)`` under ``loss_parallel``, [b, s, V/T] on each rank, whose DTensor
    log_softmax/nll handlers peak at 16 bytes per logit in backward (the saved fp32 result, the zeros, exp and their
    sum: torch ``distributed/tensor/parallel/loss.py`` ``_nll_loss_and_log_softmax_backward``)."""
    from vramcalc.step_moment import layer_setup
    from vramcalc.terms import activations

    spec = vc.get_model("llama-3.1-8b")
    T, s, h, V, L = 4, 8192, 4096, 128256, 32
    common = dict(tp=T, seq_len=s, grad_ckpt=True)
    hf, titan = (resolve_setup(spec, **common, tp_plan=plan) for plan in ("hf", "torchtitan"))
    (hf_spec, hf_rank), (tt_spec, tt_rank) = (tensor_parallel.rank_view(spec, r) for r in (hf, titan))
    assert tt_spec.vocab_size == V // T and hf_spec.vocab_size == V
    tt_layer = activations.layer_kept(tt_spec, layer_setup(tt_rank, spec.family), True, False)
    hf_layer = activations.layer_kept(hf_spec, layer_setup(hf_rank, spec.family), True, False)
    assert tt_layer.bytes(1, s) == hf_layer.bytes(1, s) // T == 2 * s * h // T  # bf16 layer inputs
    b = vc.estimate(spec, **common, tp_plan="torchtitan")
    assert b.phase == vc.Phase.BACKWARD_START
    assert b.terms_bytes[vc.Term.LOGITS] == 16 * s * (V // T) + 8 * s  # + the int64 labels
    same_stored = {t.name: t.shape for t in stored_tensors(hf_spec, hf_rank)}
    assert {t.name: t.shape for t in stored_tensors(tt_spec, tt_rank)} == same_stored  # the same shards stored
    assert b.peak_tensor_bytes < vc.estimate(spec, **common).peak_tensor_bytes
    assert L * 2 * s * h // T < b.terms_bytes[vc.Term.ACTIVATIONS]


@pytest.mark.parametrize("options, message", [
    (dict(tp=1, tp_plan="torchtitan"), "--tp 2 or more"),
    (dict(tp=2, tp_plan="torchtitan", method="lora"), "--method full"),
    # with --cp the rank's s/C positions are sharded T ways: 4100 / 2 = 2050 is not a multiple of 4
    (dict(tp=4, tp_plan="torchtitan", cp=2, num_gpus=16, sharding="fsdp", seq_len=4100), "multiple of 8"),
    (dict(tp=4, tp_plan="torchtitan", seq_len=2046), "multiple of 4"),
    (dict(tp=2, tp_plan="torchtitan", loss="chunked"), "loss_parallel"),
    (dict(tp=2, tp_plan="torchtitan", grad_ckpt="selective-op"), "full or none"),
    (dict(tp=2, tp_plan="megatron"), "tensor-parallel plan"),
    (dict(tp=2, compile=True), "--compile"),  # transformers' plan under torch.compile: not modelled
])
def test_bad_torchtitan_plan_setups_get_one_line_errors(options, message, capsys):
    with pytest.raises(VramcalcError, match=message):
        vc.estimate("llama-3.1-8b", **options)
    argv = ["estimate", "llama-3.1-8b"] + [f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')}={v}"
                                          for k, v in options.items()]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


def test_torchtitan_70b_2d_row_is_expressible_with_compile_and_fp8():
    """torchtitan's Table 4 (Llama 3.1 70B, FSDP 32 x TP 8, compile, Float8, full AC, local batch 16 x 8192)."""
    b = vc.estimate("llama-3.1-70b", method="full", precision="fp8", optimizer="adamw-foreach", batch_size=16,
                    seq_len=8192, grad_ckpt="full", num_gpus=256, sharding="fsdp", compile=True, compile_loss=False,
                    tp=8, tp_plan="torchtitan", repeat_kv=True)
    assert b.details["tp"] == 8 and b.details["data_parallel_ranks"] == 32
    assert b.inputs["tp_plan"] == "torchtitan"


def test_cli_takes_the_tp_plan(capsys):
    assert main(["estimate", "llama-3.1-8b", "--tp", "2", "--tp-plan", "torchtitan", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["inputs"]["tp_plan"] == "torchtitan" and out["inputs"]["origins"]["tp_plan"] == "user"


TORCHTITAN_TRACE_CASES = [
    (TINY["llama"], dict(tp=2, seq_len=256)),
    (TINY["llama"], dict(tp=2, seq_len=512, grad_ckpt=True)),
    (LLAMA_4KV_V512, dict(tp=4, seq_len=512, batch_size=2)),
    (LLAMA_4KV_V512, dict(tp=2, seq_len=1024, grad_ckpt=True)),
    (QWEN3_4KV, dict(tp=2, seq_len=512)),
    (TINY["llama"], dict(tp=2, seq_len=256, compile=True, compile_loss=False)),
    (TINY["llama"], dict(tp=2, seq_len=512, grad_ckpt=True, compile=True, compile_loss=False)),
]


@needs_torch
@pytest.mark.trace
@pytest.mark.parametrize("spec, options", TORCHTITAN_TRACE_CASES,
                         ids=[f"{s.name}-{'-'.join(f'{k}={v}' for k, v in o.items())}"
                              for s, o in TORCHTITAN_TRACE_CASES])
def test_torchtitan_plan_rank_peak_is_within_3_percent_of_the_fake_group_trace(spec, options):
    """torch's own parallel styles on the transformers model as torchtitan lays them (``tracing/tensor_parallel.py``
    ``distribute_torchtitan``), every micro-batch under ``loss_parallel()``, the tracker inside DTensor's loss
    handlers; with --compile each block through AOTAutograd on its DTensors."""
    from vramcalc.tracing.runner import run_trace

    options = dict(options, tp_plan="torchtitan")
    traced = sum(run_trace(spec, resolve_setup(spec, **options), progress=False).terms.values())
    assert abs(_rank_peak(spec, **options) - traced) / traced < 0.03
