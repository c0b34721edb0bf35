"""Claims about the parallel setups ``plan`` searches per GPU type (issue 14 item 5; vramcalc/planning/strategies.py):
data parallel with FSDP-QLoRA, gradient checkpointing, tensor parallelism, device_map and, when nothing else fits,
offload; the cheapest setup that fits is the row, spelled out in its columns; a knob the user gives is kept."""

from __future__ import annotations

import csv
import io
import json

import pytest

import vramcalc as vc
from vramcalc.catalogue import get_gpu, get_model
from vramcalc.planning import max_batch_size, plan_rows
from vramcalc.planning.strategies import PLAN_HOST_RAM_BYTES_PER_NODE, candidates
from vramcalc.units import BYTES_PER_GIB

from .cli_helpers import run_cli

KNOBS = ("num_gpus", "sharding", "tp", "device_map", "offload", "grad_ckpt")


def row_for(model, gpu, **options) -> dict:
    rows = plan_rows(model, gpus=[gpu], hosted=False, **options).rows
    assert len(rows) == 1
    return rows[0]


def setup_of(row: dict) -> dict:
    """The estimate options a plan row spells out in its own columns (what a spreadsheet user would re-run)."""
    options = {knob: row[knob] for knob in KNOBS}
    if row.get("quant_storage"):
        options["quant_storage"] = row["quant_storage"]
    return options


# -- 70B QLoRA on RTX 4090s (issue 14's "done when") ---------------------------------------------------------------
def test_70b_qlora_fits_rtx_4090s_where_plan_used_to_find_nothing():
    # before: "does not fit on 512 x rtx-4090": the default setup (no checkpointing) holds 44 GiB of activations
    assert not vc.estimate("llama-3.3-70b", method="qlora", gpu="rtx-4090", num_gpus=512, sharding="fsdp",
                           quant_storage="bf16").fits()
    row = row_for("llama-3.3-70b", "rtx-4090", method="qlora")
    assert row["fits"] and row["sharding"] == "fsdp" and row["quant_storage"] == "bf16"
    assert row["grad_ckpt"] == "full" and "grad_ckpt" in row["plan_chose"].split(",")
    assert "4-bit storage bf16" in row["parallelism"] and "plan turned on gradient checkpointing" in row["note"]
    assert row["offload"] == "none"  # something fits without offload, so offload is not tried
    # the row's own columns re-run as an estimate give its memory, and it fits; one power of two fewer does not
    b = vc.estimate("llama-3.3-70b", method="qlora", gpu="rtx-4090", batch_size=row["micro_batch"], **setup_of(row))
    assert b.total_bytes / BYTES_PER_GIB == pytest.approx(row["device_gib"]) and b.fits()
    fewer = dict(setup_of(row), num_gpus=row["num_gpus"] // 2)
    assert not vc.estimate("llama-3.3-70b", method="qlora", gpu="rtx-4090", **fewer).fits()


def test_70b_qlora_on_two_rtx_4090s_is_fsdp_qlora_with_offload_as_answer_ai_runs_it():
    # AnswerDotAI/fsdp_qlora README (commit 02fe695), "Finetune Llama-2 70B on Dual 24GB GPUs": --train_type qlora
    # --context_length 2048 --use_gradient_checkpointing true --use_cpu_offload true, "roughly 55GB of CPU RAM"
    row = row_for("llama-3.3-70b", "rtx-4090", method="qlora", num_gpus=2)
    assert row["fits"] and row["num_gpus"] == 2
    assert (row["sharding"], row["quant_storage"], row["offload"], row["grad_ckpt"]) == ("fsdp", "bf16", "params",
                                                                                          "full")
    assert row["parallelism"].startswith("fsdp x2, 4-bit storage bf16, offload params")
    assert 0 < row["host_ram_gib"] * BYTES_PER_GIB <= PLAN_HOST_RAM_BYTES_PER_NODE
    b = vc.estimate("llama-3.3-70b", method="qlora", gpu="rtx-4090", batch_size=row["micro_batch"], **setup_of(row))
    assert b.fits()
    # offload only because nothing fits two cards without it: FSDP-QLoRA checkpointed, or the layers split
    no_offload = dict(setup_of(row), offload="none")
    assert not vc.estimate("llama-3.3-70b", method="qlora", gpu="rtx-4090", **no_offload).fits()
    assert not vc.estimate("llama-3.3-70b", method="qlora", gpu="rtx-4090", num_gpus=2, device_map="auto",
                           grad_ckpt="full").fits()


# -- the choice is the cheapest candidate --------------------------------------------------------------------------
def usd_per_million_tokens(model, gpu, options: dict) -> float:
    """$ per million training tokens of a setup at its largest micro-batch, from estimate()'s own step time:
    on-demand $/GPU-hour x GPUs / (tokens/s x 3600 s/h) x 1e6."""
    device = get_gpu(gpu)
    batch = max_batch_size(model, gpu, **options)
    details = vc.estimate(model, gpu=gpu, batch_size=batch, **options).details
    return device.cloud_usd_per_gpu_hour * options["num_gpus"] / (details["tokens_per_second"] * 3600) * 1e6


@pytest.mark.parametrize("model, gpu, options", [
    ("llama-3.1-70b", "rtx-4090", {"method": "lora"}),  # FSDP checkpointed on 16 vs device_map on 8
    ("llama-3.1-8b", "rtx-4090", {"method": "full"}),
])
def test_the_row_is_the_cheapest_candidate_that_fits(model, gpu, options):
    found = candidates(get_model(model), get_gpu(gpu), dict(options), 512)
    assert len(found) >= 2  # a real choice
    costs = [(usd_per_million_tokens(model, gpu, candidate.options), candidate.count) for candidate in found]
    for candidate in found:
        assert candidate.breakdown.fits()
    row = row_for(model, gpu, **options)
    assert row["usd_per_million_tokens"] == pytest.approx(min(costs)[0], rel=1e-9)
    assert row["num_gpus"] == min(costs)[1]


def test_each_later_candidate_saves_gpus_over_the_ones_before():
    # the chain of data parallel, tensor parallel and device_map; expert and context parallelism are searched
    # beside it (strategies.beside_chain), each on its own fewest GPUs
    found = candidates(get_model("llama-3.1-70b"), get_gpu("rtx-4090"), {"method": "lora"}, 512)
    chain = [candidate for candidate in found if candidate.strategy.layout not in ("expert parallel",
                                                                                 "context parallel")]
    assert found[:len(chain)] == chain
    counts = [candidate.count for candidate in chain]
    assert counts == sorted(counts, reverse=True) and len(set(counts)) == len(counts)


def test_8b_full_fine_tuning_picks_plain_fsdp_on_h100s():
    # fp32 master weights, gradients and Adam moments: 16 B/parameter, 128 GB for 8B: more than one 80 GB H100
    assert not vc.estimate("llama-3.1-8b", method="full", precision="mixed-bf16", gpu="h100-sxm").fits()
    row = row_for("llama-3.1-8b", "h100-sxm", method="full", precision="mixed-bf16")
    assert (row["sharding"], row["tp"], row["device_map"], row["offload"]) == ("fsdp", 1, "none", "none")
    assert row["parallelism"] == f"fsdp x{row['num_gpus']}" and row["grad_ckpt"] == "none"
    # in bf16 (transformers v5's default load) it fits one H100: no parallelism at all
    one = row_for("llama-3.1-8b", "h100-sxm", method="full")
    assert (one["num_gpus"], one["parallelism"], one["sharding"]) == (1, "1 GPU", "none")


# -- a knob the user gives is kept ---------------------------------------------------------------------------------
@pytest.mark.parametrize("given, expected", [
    ({"method": "full", "sharding": "zero3"}, {"sharding": "zero3", "tp": 1, "device_map": "none"}),
    ({"method": "lora", "tp": 2}, {"tp": 2, "device_map": "none"}),
    ({"method": "lora", "device_map": "auto"}, {"device_map": "auto", "sharding": "none"}),
    ({"method": "full", "offload": "optimizer"}, {"offload": "optimizer", "sharding": "zero3"}),
    ({"method": "full", "grad_ckpt": "none"}, {"grad_ckpt": "none"}),
    ({"method": "lora", "num_gpus": 4}, {"num_gpus": 4, "sharding": "fsdp"}),
    ({"method": "qlora", "num_gpus": 4, "quant_storage": "uint8"}, {"quant_storage": "uint8", "num_gpus": 4}),
])
def test_a_pinned_strategy_knob_is_kept(given, expected):
    row = row_for("llama-3.1-8b", "rtx-4090", **given)
    assert row["fits"], row.get("note")
    assert {key: row[key] for key in expected} == expected
    chose = (row["plan_chose"] or "").split(",")
    assert not set(given) & set(chose)
    assert vc.estimate("llama-3.1-8b", gpu="rtx-4090", batch_size=row["micro_batch"],
                       **dict(given, **setup_of(row))).fits()


def test_plan_never_turns_checkpointing_on_against_no_grad_ckpt(capsys):
    code, out, err = run_cli(capsys, "plan", "llama-3.3-70b", "--method", "qlora", "--gpus", "rtx-4090",
                             "--no-hosted", "--no-grad-ckpt", "--format", "json")
    assert code == 0, err
    row = json.loads(out)["rows"][0]
    assert row["grad_ckpt"] == "none" and "grad_ckpt" not in (row["plan_chose"] or "")


# -- model-parallel rows are timed as estimate() times them ---------------------------------------------------------
@pytest.mark.parametrize("given", [{"tp": 2}, {"device_map": "auto", "num_gpus": 2}])
def test_a_model_parallel_row_has_the_estimates_own_throughput(given):
    # --tp: the rank is timed on its 1/tp slice; device_map: one GPU computes at a time, so 2 GPUs do not double it
    row = row_for("llama-3.1-8b", "h100-sxm", method="lora", **given)
    details = vc.estimate("llama-3.1-8b", method="lora", gpu="h100-sxm", batch_size=row["micro_batch"],
                          **setup_of(row)).details
    assert row["throughput_tokens_per_s"] == pytest.approx(details["tokens_per_second"], rel=1e-9)
    assert row["step_seconds"] == pytest.approx(details["step_seconds"], rel=1e-9)
    assert row["interconnect"] == "nvlink"


def test_device_map_costs_more_per_token_than_one_gpu_of_the_same_work():
    one = row_for("llama-3.1-8b", "h100-sxm", method="lora", batch_size=1)
    split = row_for("llama-3.1-8b", "h100-sxm", method="lora", batch_size=1, device_map="auto", num_gpus=2)
    assert split["throughput_tokens_per_s"] <= one["throughput_tokens_per_s"]
    assert split["usd_per_million_tokens"] > 1.9 * one["usd_per_million_tokens"]


# -- what a spreadsheet gets ----------------------------------------------------------------------------------------
def test_the_csv_spells_out_the_chosen_parallelism_in_columns(tmp_path, capsys):
    path = tmp_path / "plan.csv"
    code, _, err = run_cli(capsys, "plan", "llama-3.3-70b", "--method", "qlora", "--gpus", "rtx-4090,h100-sxm",
                           "--num-gpus", "2", "--no-hosted", "--output", str(path))
    assert code == 0, err
    rows = {row["gpu"]: row for row in csv.DictReader(io.StringIO(path.read_text()))}
    small = rows["rtx-4090"]
    assert (small["parallelism"], small["sharding"], small["tp"], small["device_map"], small["offload"],
            small["quant_storage"], small["grad_ckpt"]) == (
        "fsdp x2, 4-bit storage bf16, offload params, grad ckpt full (plan)", "fsdp", "1", "none", "params", "bf16",
        "full")
    assert rows["h100-sxm"]["offload"] == "none"  # two H100s hold it without offload
