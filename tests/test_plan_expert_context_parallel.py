"""Claims about expert (``--ep``) and context (``--cp``) parallelism in ``plan`` (issue 14, "Big models on several
GPUs"; vramcalc/planning/strategies.py): an MoE model gets an expert-parallel row where its experts do not fit, a
long sequence gets a context-parallel ring where data parallelism cannot hold its activations, a dense model never
gets --ep, and every row plan proposes is a setup ``estimate`` accepts, with the estimate's own memory and time.
Expected facts come from ``estimate`` on the same degrees or from hand arithmetic, never from the plan itself."""

from __future__ import annotations

import csv
import io

import pytest

import vramcalc as vc
from vramcalc.catalogue import get_gpu, get_model
from vramcalc.cost import link_facts, matmul_params
from vramcalc.errors import VramcalcError
from vramcalc.model import ParamKind
from vramcalc.planning import plan_rows
from vramcalc.planning.plan_rows import PLAN_COLUMNS
from vramcalc.planning.strategies import Layout, candidates
from vramcalc.units import BYTES_PER_GIB

from .cli_helpers import run_cli

KNOBS = ("num_gpus", "sharding", "tp", "ep", "cp", "device_map", "offload", "grad_ckpt")
BF16_BYTES = 2


def row_for(model, gpu, **options) -> dict:
    rows = plan_rows(model, gpus=[gpu], hosted=False, **options).rows
    assert len(rows) == 1
    return rows[0]


def setup_of(row: dict) -> dict:
    """The estimate options a plan row spells out in its own columns (what a spreadsheet user would re-run)."""
    return {knob: row[knob] for knob in KNOBS}


# -- expert parallelism --------------------------------------------------------------------------------------------
# --sharding none: no data-parallel engine, so of the expert-parallel layouts only one group (EP over FSDP needs fsdp)
@pytest.mark.parametrize("model, gpu, options", [
    ("mixtral-8x7b", "h100-sxm", {"method": "full", "sharding": "none"}),  # 46.7B bf16 weights: 93 GB > 80 GB
    ("qwen3-30b-a3b", "rtx-4090", {"method": "lora", "sharding": "none"}),  # 30.5B bf16 frozen: 61 GB on 24 GB
])
def test_an_moe_whose_experts_overflow_one_gpu_gets_an_ep_row_with_the_estimates_per_rank_peak(model, gpu, options):
    spec, device = get_model(model), get_gpu(gpu)
    assert spec.params * BF16_BYTES > device.memory_bytes  # hand arithmetic: the weights alone overflow one GPU
    row = row_for(model, gpu, **options)
    assert row["fits"] and row["ep"] > 1, row.get("parallelism")
    ep = row["ep"]
    # the layout the estimate models: one group of ep GPUs sharing one batch, n/ep whole experts each
    assert (row["num_gpus"], row["sharding"], row["tp"], row["cp"]) == (ep, "none", 1, 1)
    assert spec.num_experts % ep == 0
    assert row["parallelism"].startswith(f"ep {ep}") and "ep" in row["plan_chose"].split(",")
    rank = vc.estimate(model, gpu=gpu, batch_size=row["micro_batch"], **dict(options, **setup_of(row)))
    assert rank.total_bytes / BYTES_PER_GIB == pytest.approx(row["device_gib"], rel=1e-12) and rank.fits()
    assert rank.details["experts_per_rank"] == spec.num_experts // ep
    # on its fewest GPUs: half the group does not hold it, even one sequence at a time
    half = dict(options, **dict(setup_of(row), ep=ep // 2, num_gpus=ep // 2))
    assert not vc.estimate(model, gpu=gpu, batch_size=1, **half).fits()


@pytest.mark.parametrize("model, options", [
    ("llama-3.1-8b", {"method": "lora"}),
    ("llama-3.1-70b", {"method": "full"}),
    ("qwen3-8b", {"method": "lora", "seq_len": 65536}),
])
def test_a_dense_model_never_gets_expert_parallelism(model, options):
    assert not get_model(model).is_moe
    rows = plan_rows(model, gpus=["h100-sxm", "rtx-4090", "a100-40gb"], hosted=False, **options).rows
    assert all(row.get("ep") in (None, 1) for row in rows)
    for gpu in ("h100-sxm", "rtx-4090"):
        found = candidates(get_model(model), get_gpu(gpu), dict(options), 512)
        assert not any(candidate.strategy.layout in (Layout.EXPERT_PARALLEL, Layout.EXPERT_OVER_FSDP)
                       for candidate in found)


def test_ep_one_group_candidates_are_exactly_ep_gpus_without_sharding():
    spec = get_model("qwen3-30b-a3b")
    for gpu in ("rtx-4090", "l40s", "a100-40gb"):
        for candidate in candidates(spec, get_gpu(gpu), {"method": "lora"}, 512):
            if candidate.strategy.layout == Layout.EXPERT_PARALLEL:
                options = candidate.options
                assert options["ep"] == options["num_gpus"] == candidate.count > 1
                assert options["sharding"] == "none" and spec.num_experts % options["ep"] == 0


# -- expert parallelism over FSDP ranks ----------------------------------------------------------------------------
DEEPSEEK_FULL = dict(method="full", grad_ckpt="full", batch_size=1)


def test_deepseek_v3_full_fits_nowhere_as_one_ep_group_or_plain_fsdp_but_gets_an_ep_over_fsdp_row():
    spec = get_model("deepseek-v3")
    # one group shares one batch and holds the dense layers whole on every rank: even the largest (256 GPUs, one
    # expert each), checkpointed, one sequence, overflows an H100; plain FSDP over 512 GPUs gathers a layer's 256
    # experts at once and overflows too (the estimate's own figures)
    assert not vc.estimate(spec, gpu="h100-sxm", ep=256, num_gpus=256, sharding="none", **DEEPSEEK_FULL).fits()
    assert not vc.estimate(spec, gpu="h100-sxm", num_gpus=512, sharding="fsdp", **DEEPSEEK_FULL).fits()
    row = row_for("deepseek-v3", "h100-sxm", method="full")
    assert row["fits"], row.get("note")
    ep, n = row["ep"], row["num_gpus"]
    assert 1 < ep <= 8 and n > ep and n % ep == 0 and spec.num_experts % n == 0 and row["sharding"] == "fsdp"
    assert row["parallelism"].startswith(f"ep {ep} over fsdp x{n}")
    assert {"ep", "sharding", "num_gpus"} <= set(row["plan_chose"].split(","))
    rank = vc.estimate(spec, gpu="h100-sxm", method="full", batch_size=row["micro_batch"], **setup_of(row))
    assert rank.total_bytes / BYTES_PER_GIB == pytest.approx(row["device_gib"], rel=1e-12) and rank.fits()
    assert not [w for w in rank.warnings if "pads each rank's expert shard" in w]  # no padded expert shards
    assert row["step_seconds"] == pytest.approx(rank.details["step_seconds"], rel=1e-9)


def test_qwen3_full_on_a100s_gets_ep_over_fsdp_where_it_is_cheaper_than_fsdp_alone():
    # plain FSDP gathers all 128 experts of a layer; EP over FSDP only its group's n/E: fewer bytes per step
    with_ep = row_for("qwen3-30b-a3b", "a100-80gb", method="full")
    without = row_for("qwen3-30b-a3b", "a100-80gb", method="full", ep=1)  # --ep 1: no expert parallelism
    assert without["ep"] == 1 and with_ep["ep"] > 1 and with_ep["num_gpus"] > with_ep["ep"]
    assert with_ep["usd_per_million_tokens"] < without["usd_per_million_tokens"]
    rank = vc.estimate("qwen3-30b-a3b", gpu="a100-80gb", method="full", batch_size=with_ep["micro_batch"],
                       **setup_of(with_ep))
    assert rank.total_bytes / BYTES_PER_GIB == pytest.approx(with_ep["device_gib"], rel=1e-12) and rank.fits()
    assert with_ep["throughput_tokens_per_s"] == pytest.approx(rank.details["tokens_per_second"], rel=1e-9)


@pytest.mark.parametrize("model, method", [("qwen3-30b-a3b", "full"), ("mixtral-8x7b", "full"),
                                           ("mixtral-8x7b", "lora"), ("deepseek-v3", "full")])
@pytest.mark.parametrize("gpu", ["h100-sxm", "a100-40gb", "t4"])
def test_ep_over_fsdp_candidates_are_a_multiple_of_ep_dividing_the_experts_within_a_node(model, method, gpu):
    spec, device = get_model(model), get_gpu(gpu)
    node = link_facts(device).node_gpus  # t4: nodes of 4 (data/gpu_links.csv)
    over = [candidate for candidate in candidates(spec, device, {"method": method}, 512)
            if candidate.strategy.layout == Layout.EXPERT_OVER_FSDP]
    assert over or model != "qwen3-30b-a3b"  # qwen3 full fits EP over FSDP on each of these (not vacuous)
    for candidate in over:
        options = candidate.options
        ep, n = options["ep"], options["num_gpus"]
        assert n == candidate.count and n > ep and n % ep == 0 and 2 <= ep <= node
        assert spec.num_experts % n == 0 and options["sharding"] == "fsdp"
        warnings = vc.estimate(spec, gpu=device, **options).warnings
        assert not [w for w in warnings if "pads each rank's expert shard" in w]  # no FSDP2 padding of the experts


@pytest.mark.parametrize("limit", [{"max_gpus": 4}, {"num_gpus": 4}])
def test_a_smaller_ep_over_fsdp_is_tried_where_a_larger_has_no_count_under_the_limit(limit):
    # Mixtral's 8 experts: ep 4 over FSDP needs 8 GPUs or more, so on 4 only ep 2 is left, and it fits there
    assert vc.estimate("mixtral-8x7b", gpu="h100-sxm", method="lora", ep=2, num_gpus=4, sharding="fsdp",
                       batch_size=1).fits()
    options = {"method": "lora", **{k: v for k, v in limit.items() if k != "max_gpus"}}
    found = candidates(get_model("mixtral-8x7b"), get_gpu("h100-sxm"), options, limit.get("max_gpus", 512))
    over = [c.options for c in found if c.strategy.layout == Layout.EXPERT_OVER_FSDP]
    assert [(o["ep"], o["num_gpus"]) for o in over] == [(2, 4)]


def test_the_csv_of_an_ep_over_fsdp_row_carries_sharding_fsdp_and_the_ep_degree(tmp_path, capsys):
    path = tmp_path / "deepseek.csv"
    code, _, err = run_cli(capsys, "plan", "deepseek-v3", "--method", "full", "--gpus", "h100-sxm", "--no-hosted",
                           "--output", str(path))
    assert code == 0, err
    (cells,) = list(csv.DictReader(io.StringIO(path.read_text())))
    ep, n = int(cells["ep"]), int(cells["num_gpus"])
    assert (cells["sharding"], cells["tp"], cells["cp"], cells["device_map"]) == ("fsdp", "1", "1", "none")
    assert ep > 1 and n % ep == 0 and n > ep
    assert cells["parallelism"] == f"ep {ep} over fsdp x{n}, grad ckpt full (plan)"
    rank = vc.estimate("deepseek-v3", gpu="h100-sxm", method="full", ep=ep, num_gpus=n, sharding="fsdp",
                       grad_ckpt=cells["grad_ckpt"], batch_size=int(cells["micro_batch"]))
    assert rank.total_bytes / BYTES_PER_GIB == pytest.approx(float(cells["device_gib"]), rel=1e-9)


@pytest.mark.parametrize("given", [{"ep": 4, "sharding": "fsdp"}, {"ep": 4, "num_gpus": 16, "sharding": "fsdp"},
                                   {"ep": 4, "num_gpus": 16}])
def test_a_given_ep_over_fsdp_is_kept(given):
    row = row_for("qwen3-30b-a3b", "h100-sxm", method="lora", **given)
    assert row["fits"], row.get("note")
    assert (row["ep"], row["sharding"]) == (4, "fsdp") and row["num_gpus"] % 4 == 0 and row["num_gpus"] > 4
    assert row["num_gpus"] == given.get("num_gpus", row["num_gpus"])
    assert "ep" not in (row["plan_chose"] or "").split(",")
    assert vc.estimate("qwen3-30b-a3b", gpu="h100-sxm", method="lora", batch_size=row["micro_batch"],
                       **setup_of(row)).fits()


# -- context parallelism -------------------------------------------------------------------------------------------
def test_a_128k_job_on_8_gpus_gets_a_cp_row_that_fits_where_data_parallel_alone_does_not():
    job = dict(method="lora", seq_len=131072)
    # data parallel alone: FSDP over 8 H100s, checkpointed, one sequence per GPU, does not fit (each GPU holds a
    # whole 128k-token sequence's activations and logits); nor does it on 512
    for n in (8, 512):
        assert not vc.estimate("llama-3.1-8b", gpu="h100-sxm", num_gpus=n, sharding="fsdp", grad_ckpt="full",
                               batch_size=1, **job).fits()
    row = row_for("llama-3.1-8b", "h100-sxm", num_gpus=8, **job)
    assert row["fits"] and row["num_gpus"] == 8 and row["cp"] > 1, row.get("note")
    cp = row["cp"]
    assert (row["sharding"], row["tp"], row["ep"]) == ("fsdp", 1, 1)  # accelerate runs cp under FSDP2 only
    assert 131072 % (2 * cp) == 0  # torch's head-tail load balancer: 2 x cp equal chunks
    assert row["parallelism"].startswith(f"cp {cp}") and "cp" in row["plan_chose"].split(",")
    rank = vc.estimate("llama-3.1-8b", gpu="h100-sxm", batch_size=row["micro_batch"], **dict(job, **setup_of(row)))
    assert rank.total_bytes / BYTES_PER_GIB == pytest.approx(row["device_gib"], rel=1e-12) and rank.fits()
    assert rank.details["cp_tokens_per_rank"] == 131072 // cp


def test_a_ring_the_larger_rings_cannot_split_the_sequence_for_is_still_tried():
    # 65,540 = 4 x 16,385: two ranks split it in 2 x 2 chunks; 4 and 8 need 8 and 16 equal chunks and are refused
    job = dict(method="lora", seq_len=65540)
    for cp in (4, 8):
        with pytest.raises(VramcalcError, match="load balancer"):
            vc.estimate("llama-3.1-8b", cp=cp, **job)
    assert not vc.estimate("llama-3.1-8b", gpu="h100-sxm", num_gpus=8, sharding="fsdp", grad_ckpt="full",
                           batch_size=1, **job).fits()
    assert vc.estimate("llama-3.1-8b", gpu="h100-sxm", cp=2, grad_ckpt="full", batch_size=1, **job).fits()
    row = row_for("llama-3.1-8b", "h100-sxm", **job)
    assert (row["cp"], row["num_gpus"], row["parallelism"]) == (2, 2, "cp 2 (fsdp), grad ckpt full (plan)")


@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "gemma-2-9b"])
def test_no_ring_for_a_model_whose_attention_the_ring_does_not_cover(model):
    # MoE and sliding-window layers: check_context_parallel refuses them, so plan never proposes one
    with pytest.raises(VramcalcError):
        vc.estimate(model, cp=2, seq_len=32768)
    rows = plan_rows(model, gpus=["h100-sxm", "rtx-4090"], hosted=False, method="lora", seq_len=32768).rows
    assert all(row.get("cp") in (None, 1) for row in rows)


def test_a_short_sequence_keeps_plain_fsdp_since_a_ring_would_not_save_gpus():
    # 8B full fine-tuning at 2,048 tokens on H100s: FSDP fits two; a ring of two splits the activations but does a
    # data-parallel rank's work plus the ring's traffic, so it is not a candidate (strategies module docstring)
    found = candidates(get_model("llama-3.1-8b"), get_gpu("h100-sxm"),
                       {"method": "full", "precision": "mixed-bf16"}, 512)
    assert min(candidate.count for candidate in found) == 2
    assert not any(candidate.strategy.layout == Layout.CONTEXT_PARALLEL for candidate in found)


# -- timing, pinned degrees, the CSV -------------------------------------------------------------------------------
@pytest.mark.parametrize("model, gpu, options", [
    ("mixtral-8x7b", "h100-sxm", {"method": "full"}),
    ("llama-3.1-8b", "h100-sxm", {"method": "lora", "seq_len": 131072}),
])
def test_ep_and_cp_rows_have_the_estimates_own_step_time_and_throughput(model, gpu, options):
    # --ep: the group's E GPUs share its tokens; --cp: a rank is timed on its s/C positions (estimate's rank_view)
    row = row_for(model, gpu, **options)
    assert row["ep"] > 1 or row["cp"] > 1
    details = vc.estimate(model, gpu=gpu, batch_size=row["micro_batch"], **options, **setup_of(row)).details
    assert row["throughput_tokens_per_s"] == pytest.approx(details["tokens_per_second"], rel=1e-9)
    assert row["step_seconds"] == pytest.approx(details["step_seconds"], rel=1e-9)
    assert row["interconnect"] == "nvlink"
    assert row["exposed_comm_seconds"] > 0


def test_a_given_mfu_counts_an_ep_group_as_the_gpus_whose_flops_are_the_jobs():
    # FLOP-count time (--mfu): every rank of the group multiplies the dense layers' P_dense parameters on all tokens
    # and its experts on 1/E of the routed pairs, so E GPUs do the work of P / (P_dense + P_routed / E) of them
    spec = get_model("qwen3-30b-a3b")
    setup = dict(method="lora", grad_ckpt="full", batch_size=1, mfu=0.4, sharding="none")  # one group, not over fsdp
    one = row_for(spec, "h200", num_gpus=1, **setup)
    group = row_for(spec, "h200", ep=4, **setup)
    assert (one["parallelism"], group["parallelism"]) == ("1 GPU", "ep 4")
    routed = spec.inventory.numel(ParamKind.EXPERTS) * spec.experts_per_token / spec.num_experts
    whole = matmul_params(spec)
    expected = whole / (whole - routed + routed / 4)
    assert 1 < expected < 4
    assert group["throughput_tokens_per_s"] / one["throughput_tokens_per_s"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("model, given, expected", [
    ("qwen3-30b-a3b", {"method": "lora", "ep": 4, "sharding": "none"},
     {"ep": 4, "num_gpus": 4, "sharding": "none", "cp": 1}),
    ("llama-3.1-8b", {"method": "lora", "cp": 4, "seq_len": 32768}, {"cp": 4, "sharding": "fsdp", "ep": 1}),
])
def test_a_given_ep_or_cp_is_kept(model, given, expected):
    row = row_for(model, "h100-sxm", **given)
    assert row["fits"], row.get("note")
    assert {key: row[key] for key in expected} == expected
    assert not {"ep", "cp"} & set((row["plan_chose"] or "").split(","))
    assert vc.estimate(model, gpu="h100-sxm", batch_size=row["micro_batch"], **dict(given, **setup_of(row))).fits()


def test_a_given_ep_the_estimate_refuses_is_one_error_line(capsys):
    code, out, err = run_cli(capsys, "plan", "qwen3-30b-a3b", "--method", "lora", "--ep", "3", "--gpus",
                             "h100-sxm", "--no-hosted")
    assert code == 2 and err.startswith("error: ") and "128 experts" in err and len(err.strip().splitlines()) == 1


def test_the_csv_has_the_degree_columns_and_spells_out_ep_and_cp(tmp_path, capsys):
    assert PLAN_COLUMNS.index("ep") == PLAN_COLUMNS.index("tp") + 1 == PLAN_COLUMNS.index("cp") - 1
    cells = {}
    for name, args in (("moe", ("mixtral-8x7b", "--method", "full", "--sharding", "none")),
                       ("long", ("llama-3.1-8b", "--method", "lora", "--seq-len", "131072", "--num-gpus", "8"))):
        path = tmp_path / f"{name}.csv"
        code, _, err = run_cli(capsys, "plan", *args, "--gpus", "h100-sxm", "--no-hosted", "--output", str(path))
        assert code == 0, err
        text = path.read_text()
        assert {"tp", "ep", "cp"} <= set(next(csv.reader(io.StringIO(text))))
        (cells[name],) = list(csv.DictReader(io.StringIO(text)))
    moe, long = cells["moe"], cells["long"]
    assert (moe["ep"], moe["cp"], moe["tp"], moe["num_gpus"], moe["parallelism"]) == ("8", "1", "1", "8", "ep 8")
    assert (long["cp"], long["ep"], long["num_gpus"], long["sharding"]) == ("8", "1", "8", "fsdp")
    assert long["parallelism"] == "cp 8 (fsdp), grad ckpt full (plan)"
