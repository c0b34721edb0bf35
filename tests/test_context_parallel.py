"""Context parallelism (``--cp``): a rank's s/C positions under accelerate's cp_size with torch's ring attention,
estimated and traced through torch's own ``context_parallel`` on a fake process group."""

import dataclasses
import json

import pytest

import vramcalc as vc
from .cli_helpers import assert_one_error_line
from vramcalc.cli import main
from vramcalc.errors import VramcalcError
from vramcalc.terms import context_parallel

from .conftest import needs_torch
from .tiny_models import TINY

TOLERANCE = 0.03  # the brief: per-rank estimates within 3% of the trace

# tiny models whose attention backward holds the peak (vocabulary and MLP small beside 4 heads x 4096 positions), so
# that the ring's buffers, not the logits, decide it
LLAMA_ATTN = dataclasses.replace(TINY["llama"], name="tiny-llama-v256-i128", vocab_size=256, intermediate_size=128)
QWEN3_V256 = dataclasses.replace(TINY["qwen3"], name="tiny-qwen3-v256", vocab_size=256)

# (spec, options): llama and qwen3, cp 2 and 4, full and LoRA, with and without checkpointing
CASES = [
    (TINY["llama"], dict(cp=2, seq_len=4096)),
    (TINY["llama"], dict(cp=4, seq_len=4096, grad_ckpt=True)),
    (LLAMA_ATTN, dict(cp=4, seq_len=4096)),
    (LLAMA_ATTN, dict(cp=4, seq_len=4096, grad_ckpt=True)),
    (LLAMA_ATTN, dict(cp=2, seq_len=4096, method="lora", lora_targets="all-linear")),
    (TINY["qwen3"], dict(cp=2, seq_len=2048, method="lora", grad_ckpt=True)),
    (QWEN3_V256, dict(cp=4, seq_len=4096)),
    (QWEN3_V256, dict(cp=2, seq_len=4096, method="lora", grad_ckpt=True)),
]


# -- the estimate ------------------------------------------------------------------------------------------------------
def test_cp_alone_runs_on_cp_gpus_under_fsdp_as_accelerate_requires():
    b = vc.estimate("llama-3.1-8b", cp=4, seq_len=32768)
    assert b.inputs["num_gpus"] == 4 and b.inputs["origins"]["num_gpus"] == "implied by cp"
    assert b.inputs["sharding"] == "fsdp" and b.inputs["origins"]["sharding"] == "implied by cp"
    assert b.details["cp_tokens_per_rank"] == 8192 and b.details["fsdp_shard_ranks"] == 4


def test_model_states_are_those_of_fsdp_over_dp_shard_times_cp():
    """accelerate shards over the flattened dp_shard_cp dimension: the states of 16 GPUs, whatever cp is."""
    cp = vc.estimate("llama-3.1-8b", cp=4, num_gpus=16, seq_len=8192)
    fsdp = vc.estimate("llama-3.1-8b", num_gpus=16, sharding="fsdp", seq_len=2048)
    for term in (vc.Term.WEIGHTS, vc.Term.OPTIMIZER_STATES):
        assert cp.terms_bytes[term] == fsdp.terms_bytes[term]


@pytest.mark.parametrize("model, options", [
    ("llama-3.1-8b", dict(seq_len=32768, grad_ckpt=True)),
    ("llama-3.1-8b", dict(seq_len=16384)),
    ("qwen2.5-7b", dict(seq_len=16384, method="lora", grad_ckpt=True)),
])
def test_per_rank_activations_and_logits_fall_about_one_over_cp(model, options):
    """Every saved activation, the logits and the loss are the rank's s/C positions: C times fewer per rank (the
    peak may move between the loss's moments as the FSDP units gathered there change, so the logits fall at least
    as fast)."""
    base = vc.estimate(model, cp=2, **options)
    sequence_terms = (vc.Term.ACTIVATIONS, vc.Term.LOGITS, vc.Term.TEMPORARIES)
    for cp in (4, 8):
        b = vc.estimate(model, cp=cp, **options)
        assert b.terms_bytes[vc.Term.ACTIVATIONS] * cp / 2 == pytest.approx(
            base.terms_bytes[vc.Term.ACTIVATIONS], rel=0.02), cp
        assert sum(b.terms_bytes[t] for t in sequence_terms) * cp / 2 <= 1.02 * sum(
            base.terms_bytes[t] for t in sequence_terms), cp
    whole = vc.estimate(model, num_gpus=8, sharding="fsdp", **options)
    eight = vc.estimate(model, cp=8, **options)
    assert eight.peak_tensor_bytes < whole.peak_tensor_bytes


def test_ring_traffic_is_c_minus_1_kv_chunks_per_layer_and_pass_and_c_fp32_dkv_chunks_in_backward():
    b = vc.estimate("llama-3.1-8b", cp=4, seq_len=32768, grad_ckpt=True)
    L, k, d, c, cp, s = 32, 8, 128, 2, 4, 32768
    chunk = 2 * (s // cp) * k * d  # K and V of the rank's positions, elements
    forward = L * 2 * (cp - 1) * chunk * c  # the forward and its recompute
    backward = L * (cp - 1) * chunk * c + L * cp * chunk * 4
    assert b.details["cp_communication_bytes_per_step"] == forward + backward


def test_ring_transfers_hide_behind_attention_on_nvlink_but_not_on_ethernet():
    """Attention grows as s², the ring's bytes as s: 16 ranks of 512 positions over 100 GB/s Ethernet NICs expose
    the ring, 4 ranks of 8192 positions on NVLink do not."""
    nvlink = vc.estimate("llama-3.1-8b", cp=4, seq_len=32768, gpu="h100-sxm")
    assert nvlink.details["cp_exposed_communication_seconds_per_step"] == 0.0
    ether = vc.estimate("llama-3.1-8b", cp=16, seq_len=8192, gpu="h100-sxm", interconnect="ethernet")
    assert ether.details["cp_exposed_communication_seconds_per_step"] > 0.0


def test_estimates_without_cp_are_those_of_cp_1():
    assert vc.estimate("qwen2.5-7b", method="lora").terms_bytes == vc.estimate("qwen2.5-7b", method="lora",
                                                                                 cp=1).terms_bytes


@pytest.mark.parametrize("options, message", [
    (dict(model="llama-3.1-8b", cp=4, num_gpus=6), "not a multiple"),
    (dict(model="llama-3.1-8b", cp=2, sharding="ddp"), "FSDP2"),
    (dict(model="llama-3.1-8b", cp=2, sharding="zero3", num_gpus=2), "FSDP2"),
    (dict(model="llama-3.1-8b", cp=2, attn="eager"), "sdpa"),
    (dict(model="llama-3.1-8b", cp=2, attn="flash"), "sdpa"),
    (dict(model="mistral-7b-v0.1", cp=2), "sliding-window"),
    (dict(model="gemma-2-9b", cp=2), "no sdpa"),
    (dict(model="llama-3.1-8b", cp=4, seq_len=2052), "2 x cp"),
    (dict(model="llama-3.1-8b", cp=2, method="qlora"), "full and lora"),
    (dict(model="llama-3.1-8b", cp=2, packing=True), "causal"),
    (dict(model="qwen3-30b-a3b", cp=2), "MoE"),
    (dict(model="llama-3.1-8b", cp=0), "context-parallel degree"),
])
def test_bad_context_parallel_setups_get_one_line_errors(options, message, capsys):
    model = options.pop("model")
    assert_one_error_line(capsys, model, options, message)


def test_cli_takes_cp_and_reports_the_ring_in_json(capsys):
    assert main(["estimate", "llama-3.1-8b", "--cp", "2", "--seq-len", "8192", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["inputs"]["cp"] == 2 and out["inputs"]["num_gpus"] == 2


# -- estimate vs trace: torch's real ring attention on a fake process group --------------------------------------------
# dp_shard x cp: D rings of C ranks beside each other (accelerate's 2-D ("dp_shard", "cp") mesh), FSDP2 over D x C
DP_SHARD_CASES = [
    (TINY["llama"], dict(cp=2, num_gpus=4, seq_len=4096)),
    (LLAMA_ATTN, dict(cp=4, num_gpus=8, seq_len=4096, grad_ckpt=True)),
    (LLAMA_ATTN, dict(cp=2, num_gpus=8, seq_len=4096, method="lora", lora_targets="all-linear")),
]


@needs_torch
@pytest.mark.parametrize("spec, options", CASES + DP_SHARD_CASES, ids=lambda x: x.name if hasattr(x, "name") else
                         ",".join(f"{k}={v}" for k, v in x.items()))
def test_estimate_matches_the_fake_group_trace_of_torchs_ring_attention(spec, options):
    """One ring over the world, and D rings of C ranks beside each other (``DP_SHARD_CASES``)."""
    estimate = vc.estimate(spec, **options)
    trace = vc.trace(spec, progress=False, **options)
    assert estimate.peak_tensor_bytes == pytest.approx(trace.peak_tensor_bytes, rel=TOLERANCE)


@needs_torch
def test_what_the_ring_adds_to_one_fsdp_rank_of_s_over_c_positions_is_what_the_trace_adds():
    """The cp mechanism alone, apart from the single-GPU estimate's own error: cp=4 on s positions minus plain FSDP on
    4 ranks of s/4 positions, estimated and traced, on an attention-bound tiny Llama whose plain FSDP estimate is
    within 1% of its trace (the ring's buffers, o_proj's copy of the merged output)."""
    spec = LLAMA_ATTN
    ring, plain = dict(cp=4, seq_len=4096, grad_ckpt=True), dict(num_gpus=4, sharding="fsdp", seq_len=1024,
                                                                   grad_ckpt=True)
    estimated = vc.estimate(spec, **ring).peak_tensor_bytes - vc.estimate(spec, **plain).peak_tensor_bytes
    traced = (vc.trace(spec, progress=False, **ring).peak_tensor_bytes
              - vc.trace(spec, progress=False, **plain).peak_tensor_bytes)
    assert traced > 0 and estimated == pytest.approx(traced, rel=0.1)


def test_the_ring_backward_peak_is_the_traced_one():
    """``ring_backward_bytes`` against the ring's backward as the trace sees it (the tracker inside DTensor's
    ``_sdpa_handler``; session 35): the largest live total above the handler's entry, on rank 0 of a tiny Llama
    (a = 4, k = 2, d = 64, bf16), 1024 local tokens: cp 4 peaks at step 1's K/V concatenation, 8,912,896 bytes;
    tiny Qwen3 (a = 8), cp 2, 2048 local tokens, at the last step's partial dq update, 19,955,712 bytes (32,768 of
    them the sliced logsumexp's contiguous copy, not modelled)."""
    llama = context_parallel.ring_backward_bytes(LLAMA_ATTN, 1024, 4, 2)
    qwen3 = context_parallel.ring_backward_bytes(QWEN3_V256, 2048, 2, 2)
    assert llama == 8_912_896
    assert qwen3 == 19_955_712 - 32_768


def test_a_compiled_layer_keeps_the_rings_gathered_kv():
    """Under --compile the layer's partitioned graph returns the all-gathered K/V of all C ranks for backward (one
    all-gather, CSE'd with the backward's): C·2·T·k·d·c more per layer than eager's ring keeps, and its backward
    gathers nothing again."""
    from vramcalc.step_moment import layer_setup
    from vramcalc.terms import activations
    from vramcalc.training_setup import resolve_setup

    spec = vc.get_model("llama-3.1-8b")
    k, d, c = 8, 128, 2

    def layer_bytes(cp):
        resolved = resolve_setup(spec, cp=cp, seq_len=8192, compile=True)
        return activations.layer_saved(spec, layer_setup(resolved, spec.family), False).per_token

    assert layer_bytes(4) - layer_bytes(2) == (4 - 2) * 2 * k * d * c
    eager, compiled = (context_parallel.ring_backward_bytes(spec, 4096, 4, c, compiled=flag) for flag in (False, True))
    assert compiled < eager


@needs_torch
@pytest.mark.parametrize("spec, ring, plain", [
    (TINY["llama"], dict(cp=2, seq_len=512, batch_size=2, compile=True),
     dict(num_gpus=2, sharding="fsdp", seq_len=256, batch_size=2, compile=True)),
    (TINY["qwen3"], dict(cp=2, seq_len=512, compile=True),
     dict(num_gpus=2, sharding="fsdp", seq_len=256, compile=True)),
    (LLAMA_ATTN, dict(cp=4, seq_len=4096, compile=True), dict(num_gpus=4, sharding="fsdp", seq_len=1024, compile=True)),
    (TINY["llama"], dict(cp=2, seq_len=512, compile=True, compile_loss=False, grad_ckpt=True, precision="fp8"),
     dict(num_gpus=2, sharding="fsdp", seq_len=256, compile=True, compile_loss=False, grad_ckpt=True,
          precision="fp8")),
], ids=["llama-b2", "qwen3", "llama-attention-bound-cp4", "llama-fp8-ckpt-block-compile"])
def test_compile_with_cp_adds_to_compile_with_fsdp_what_the_trace_adds(spec, ring, plain):
    """--cp under --compile (and fp8), traced: torch's ring attention inside the layer's AOTAutograd graph on the
    fake group. The compiled FSDP base's own error (the trace runs the compiled backward op by op) is left out: the
    ring's rank, estimated, is within 3% of its trace wherever the base is within 3% of its own, and the two errors
    differ by under 1.5 points."""
    errors = []
    for options in (ring, plain):
        estimate = vc.estimate(spec, **options).peak_tensor_bytes
        errors.append(estimate / vc.trace(spec, progress=False, **options).peak_tensor_bytes - 1)
    assert abs(errors[0]) < TOLERANCE and abs(errors[1]) < TOLERANCE, errors
    assert abs(errors[0] - errors[1]) < 0.015, errors


@needs_torch
def test_the_tracker_sees_inside_the_rings_dtensor_handler():
    """DTensor dispatches the SDPA op to torch's ring (``_sdpa_handler``) below the tracker's dispatch mode: the
    tracker used to see the op's output only. It now counts what the handler allocates on the local tensors (the
    all-gathered K/V, the dK/dV all-to-all), and a functional collective's ``wait_tensor`` returns the tensor it
    waited on, as on a GPU (FakeTensorMode's own result is a second storage)."""
    from vramcalc.tracing import tracker

    ops = []
    original = tracker.AllocationTracker._add_all

    def recording(self, storages, term, region, weight_copy, op):
        ops.append(op)
        return original(self, storages, term, region, weight_copy, op)

    tracker.AllocationTracker._add_all = recording
    try:
        vc.trace(TINY["llama"], cp=2, seq_len=256, progress=False)
    finally:
        tracker.AllocationTracker._add_all = original
    steps, layers = 2, TINY["llama"].num_layers
    assert ops.count("all_gather_into_tensor.default") == 2 * steps * layers  # forward and backward ring
    assert ops.count("all_to_all_single.default") >= steps * layers
    assert "wait_tensor.default" not in ops


@needs_torch
def test_the_trace_runs_torchs_ring_attention_not_the_cpu_kernel(monkeypatch):
    """The trace dispatches SDPA to ``_templated_ring_attention`` and its backward (_attention.py), once per layer and
    pass; a CPU SDPA would never reach them."""
    from torch.distributed.tensor.experimental._context_parallel import _attention

    calls = []
    for name in ("_scaled_dot_product_ring_flash_attention", "_scaled_dot_product_ring_flash_attention_backward"):
        original = getattr(_attention, name)
        monkeypatch.setattr(_attention, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    spec = TINY["llama"]
    vc.trace(spec, cp=2, seq_len=256, progress=False)
    steps = 2
    assert calls.count("_scaled_dot_product_ring_flash_attention") == steps * spec.num_layers
    assert calls.count("_scaled_dot_product_ring_flash_attention_backward") == steps * spec.num_layers




@needs_torch
def test_the_traced_rank_holds_one_over_dp_shard_times_cp_of_every_parameter(monkeypatch):
    """FSDP2 shards over accelerate's flattened dp_shard_cp (2 x 4 = 8 ranks), not over the ring's 4: every
    parameter's local shard has ceil(rows / 8) rows."""
    import math

    from vramcalc.tracing import distributed

    sharded = []
    original = distributed.fully_shard_model
    monkeypatch.setattr(distributed, "fully_shard_model",
                        lambda model, *a, **k: sharded.append(model) or original(model, *a, **k))
    vc.trace(LLAMA_ATTN, cp=4, num_gpus=8, seq_len=1024, progress=False)
    (model,) = sharded
    params = list(model.parameters())
    assert params and all(p.device_mesh.size() == 8 for p in params)
    for p in params:
        assert p.to_local().shape[0] == math.ceil(p.shape[0] / 8), p.shape
    total = sum(p.numel() for p in params)
    assert sum(p.to_local().numel() for p in params) == pytest.approx(total / 8, rel=0.01)


@needs_torch
def test_the_ring_communicates_over_cp_ranks_not_the_world(monkeypatch):
    """torch's ring attention gets the cp mesh dimension's group (2 ranks of 8), and its all-gathered K/V is that of
    2 ranks: a ring over the world would gather 8 chunks."""
    import torch.distributed as dist
    from torch.distributed._functional_collectives import all_gather_single
    from torch.distributed.tensor.experimental._context_parallel import _attention

    ring_sizes, gathered = [], []
    rotater = _attention._create_rotater

    def recording_rotater(pg, *args, **kwargs):
        ring_sizes.append((dist.get_world_size(pg), dist.get_world_size()))
        return rotater(pg, *args, **kwargs)

    def recording_gather(tensor, gather_dim, group):
        out = all_gather_single(tensor, gather_dim, group)
        gathered.append(out.shape[0] // tensor.shape[0])
        return out

    monkeypatch.setattr(_attention, "_create_rotater", recording_rotater)
    monkeypatch.setattr(_attention.ft_c, "all_gather_single", recording_gather)
    vc.trace(TINY["llama"], cp=2, num_gpus=8, seq_len=256, progress=False)
    assert ring_sizes and set(ring_sizes) == {(2, 8)}
    assert gathered and set(gathered) == {2}


def test_cp_composes_with_compile_and_fp8_as_torchtitan_runs_them():
    """torchtitan's Table 2 setup (FSDP over dp_shard x cp, torch.compile per block, Float8, full AC) is estimated:
    the rank's s/C positions, the compiled blocks' checkpointed inputs; the loss holds the peak at every cp."""
    options = dict(model="llama-3.1-8b", precision="fp8", optimizer="adamw-foreach", seq_len=65536, grad_ckpt="full",
                   num_gpus=8, sharding="fsdp", compile=True, compile_loss=False, repeat_kv=True)
    model = options.pop("model")
    b = vc.estimate(model, cp=2, **options)
    assert b.details["cp_tokens_per_rank"] == 32768 and b.details["fsdp_shard_ranks"] == 8
    one = vc.estimate(model, **dict(options, seq_len=32768))
    assert b.phase == one.phase == vc.Phase.BACKWARD_START
    assert b.terms_bytes[vc.Term.LOGITS] == one.terms_bytes[vc.Term.LOGITS]


@needs_torch
def test_a_ring_beside_tensor_parallel_ranks_is_estimated_not_traced():
    with pytest.raises(VramcalcError, match="estimated, not traced"):
        vc.trace(TINY["llama"], cp=2, tp=2, num_gpus=4, seq_len=256, progress=False)


def test_ring_backward_buffers_grow_with_cp_through_the_all_gather():
    spec = vc.get_model("llama-3.1-8b")
    two, eight = (context_parallel.ring_backward_bytes(spec, 4096, cp, 2) for cp in (2, 8))
    kv = 2 * 4096 * 8 * 128 * 2  # one rank's K and V in bf16
    assert eight - two == 6 * kv
