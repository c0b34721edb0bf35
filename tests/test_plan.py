"""Claims about plan, max_batch_size, sweep and the procurement CSV (vramcalc/planning/; the plan and max-batch
verbs of vramcalc/cli.py)."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys

import numpy
import pandas
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vramcalc as vc
from vramcalc.catalogue import data_dir, get_model, gpus
from vramcalc.errors import VramcalcError
from vramcalc.planning import (
    PLAN_COLUMNS,
    catalogue_stamp,
    frame_csv,
    gpu_counts,
    host_ram,
    max_batch_size,
    plan,
    plan_rows,
    smallest_gpu_count,
    sweep,
    write_csv,
)
from vramcalc.training_setup import resolve_setup
from vramcalc.units import BYTES_PER_GIB

from .cli_helpers import run_cli

UNIT_SUFFIXES = ("_gib", "_usd", "_hours", "_kwh", "_bytes", "_per_s", "_per_token", "_usd_per_kwh",
                 "_per_gpu_hour", "_per_hour", "_per_million_tokens", "_years", "_seconds", "_usd_per_gpu")
# counts, a fraction and a ratio (PUE: facility power / IT power)
UNITLESS = {"rank", "seq_len", "num_gpus", "tp", "ep", "cp", "micro_batch", "train_tokens", "epochs", "mfu", "pue"}


@pytest.fixture(scope="module")
def lora_plan():
    return plan("llama-3.1-8b", tokens=1e8, method="lora")


def catalogue_csv_row(name: str) -> dict:
    """A GPU's row of data/gpus.csv as text, read with the csv module (not through the catalogue loader)."""
    with open(data_dir() / "gpus.csv", newline="", encoding="utf-8") as f:
        return next(row for row in csv.DictReader(f) if row["name"] == name)


# -- the plan -----------------------------------------------------------------------------------------------------
def test_plan_has_one_row_per_catalogue_gpu_in_the_stable_column_order(lora_plan):
    gpu_rows = lora_plan[lora_plan["offer"] == "gpu"]
    assert sorted(gpu_rows["gpu"]) == sorted(g.name for g in gpus())
    assert tuple(lora_plan.columns) == PLAN_COLUMNS


def test_every_numeric_column_names_its_unit(lora_plan):
    for column in lora_plan.columns:
        if pandas.api.types.is_numeric_dtype(lora_plan[column]) and lora_plan[column].dtype != "boolean":
            assert column in UNITLESS or column.endswith(UNIT_SUFFIXES), column


def test_plan_memory_figures_are_the_estimators(lora_plan):
    row = lora_plan[lora_plan["gpu"] == "h100-sxm"].iloc[0]
    b = vc.estimate("llama-3.1-8b", method="lora", gpu="h100-sxm", batch_size=int(row["micro_batch"]),
                    num_gpus=int(row["num_gpus"]), sharding=row["sharding"])
    assert row["device_gib"] == pytest.approx(b.total_bytes / BYTES_PER_GIB)
    assert row["activations_gib"] == pytest.approx(b.terms()["activations"] / BYTES_PER_GIB)


def test_smallest_gpu_count_is_minimal_and_shards_with_fsdp_above_one():
    count, breakdown = smallest_gpu_count("llama-3.1-8b", "rtx-4090", method="full")
    assert count > 1 and breakdown.inputs["sharding"] == "fsdp" and breakdown.fits()
    smaller = [n for n in gpu_counts(512) if n < count][-1]
    sharding = "fsdp" if smaller > 1 else "none"
    assert not vc.estimate("llama-3.1-8b", method="full", gpu="rtx-4090", num_gpus=smaller, sharding=sharding).fits()


def test_a_moe_model_that_fits_few_gpus_but_not_many_is_found_on_the_few():
    # FSDP2 pads Mixtral's 8 stacked experts to one per rank above 8 ranks: memory per GPU rises again with the count,
    # so a search that bisects the counts would miss 2 GPUs (it said "does not fit on 512 x h100-sxm")
    fits = {n: vc.estimate("mixtral-8x7b", method="lora", gpu="h100-sxm", num_gpus=n,
                           sharding="fsdp" if n > 1 else "none").fits() for n in (1, 2, 512)}
    assert fits == {1: False, 2: True, 512: False}
    count, breakdown = smallest_gpu_count("mixtral-8x7b", "h100-sxm", method="lora")
    assert count == 2 and breakdown.fits()
    # --ep 1: the data-parallel search alone (EP over FSDP on 4 GPUs is cheaper, and plan would rank it first)
    row = plan("mixtral-8x7b", tokens=1e8, method="lora", gpus=["h100-sxm"], hosted=False, ep=1).iloc[0]
    assert bool(row["fits"]) and row["num_gpus"] == 2


@pytest.mark.parametrize("model, method", [("mixtral-8x7b", "lora"), ("qwen3-30b-a3b", "full"), ("llama-3.1-8b", "full")])
def test_the_smallest_count_is_the_first_count_that_fits_scanning_one_by_one(model, method):
    counts = [1, 2, 4, *range(8, 129, 8)]
    for gpu in gpus():
        scanned = next((n for n in counts if vc.estimate(model, method=method, gpu=gpu, num_gpus=n,
                                                         sharding="fsdp" if n > 1 else "none").fits()), None)
        found = smallest_gpu_count(model, gpu, max_gpus=128, method=method)
        assert (found[0] if found else None) == scanned, gpu.name


def test_given_sharding_is_used_above_one_gpu():
    count, breakdown = smallest_gpu_count("llama-3.1-8b", "rtx-4090", method="full", sharding="zero3")
    assert count > 1 and breakdown.inputs["sharding"] == "zero3"


@pytest.mark.parametrize("model, gpu, options", [
    ("llama-3.1-8b", "h100-sxm", {"method": "lora"}),
    ("qwen3-8b", "a100-80gb", {"method": "qlora", "grad_ckpt": True, "seq_len": 4096}),
    ("smollm2-135m", "rtx-4090", {}),
    ("gemma-2-9b", "h200", {"method": "lora", "attn": "eager"}),
])
def test_max_batch_size_is_the_largest_micro_batch_that_fits(model, gpu, options):
    batch = max_batch_size(model, gpu, **options)
    assert batch >= 1
    assert vc.estimate(model, gpu=gpu, batch_size=batch, **options).fits()
    assert not vc.estimate(model, gpu=gpu, batch_size=batch + 1, **options).fits()


def test_max_batch_size_is_zero_when_one_sequence_does_not_fit():
    assert max_batch_size("llama-3.3-70b", "rtx-4090") == 0


def test_nothing_fits_is_said_plainly():
    frame = plan("deepseek-r1", tokens=1e9, method="full", max_gpus=8)
    assert frame.attrs["summary"].startswith("nothing in the catalogue fits deepseek-r1")
    gpu_rows = frame[frame["offer"] == "gpu"]
    assert not gpu_rows["fits"].any() and gpu_rows["rank"].isna().all()
    assert gpu_rows["note"].str.startswith("does not fit on 8 x").all()


def test_a_gpu_without_a_price_shows_no_cost_never_zero(lora_plan):
    row = lora_plan[lora_plan["gpu"] == "rtx-3090"].iloc[0]
    assert bool(row["fits"]) and pandas.isna(row["rent_usd"]) and pandas.isna(row["cost_usd"])
    assert "no cloud price" in row["note"]
    cells = next(r for r in csv.DictReader(io.StringIO(frame_csv(lora_plan))) if r["gpu"] == "rtx-3090")
    list_price_usd = float(catalogue_csv_row("rtx-3090")["list_price_usd"])  # one card, from the CSV row
    assert cells["rent_usd"] == "" and cells["cost_usd"] == ""
    assert float(cells["buy_usd"]) == list_price_usd * int(cells["num_gpus"])


def test_a_gpu_lacking_the_dtype_gets_no_time_rather_than_a_wrong_one():
    # checkpointing: without it the unsharded activations and FSDP's gathered lm_head outgrow a 16 GB T4
    frame = plan("llama-3.1-8b", tokens=1e8, method="lora", grad_ckpt=True, gpus=["t4"], hosted=False)
    row = frame[frame["gpu"] == "t4"].iloc[0]
    assert bool(row["fits"]) and pandas.isna(row["train_hours"]) and "no bf16 matmuls" in row["note"]


@pytest.mark.parametrize("rank_by, column", [("cost", "cost_usd"), ("time", "train_hours")])
def test_ranked_rows_come_first_in_order_of_the_chosen_figure(lora_plan, rank_by, column):
    frame = plan("llama-3.1-8b", tokens=1e8, method="lora", rank_by=rank_by)
    ranked = frame[frame["rank"].notna()]
    assert list(ranked["rank"]) == list(range(1, len(ranked) + 1))
    assert ranked[column].is_monotonic_increasing
    assert frame.index[frame["rank"].notna()].max() < frame.index[frame["rank"].isna()].min()


def test_hosted_services_sit_beside_the_gpus_for_the_same_tokens(lora_plan):
    hosted = lora_plan[lora_plan["offer"] == "hosted"]
    assert set(hosted["provider"]) == {"fireworks", "together"}
    for _, row in hosted.iterrows():
        assert row["cost_usd"] == pytest.approx(row["hosted_usd_per_million_tokens"] * 100)
        assert row["price_date"] and row["price_source"]


def test_a_pinned_batch_size_and_gpu_count_are_kept():
    frame = plan("llama-3.1-8b", tokens=1e8, method="lora", batch_size=2, num_gpus=4, gpus=["h100-sxm"],
                 hosted=False)
    row = frame.iloc[0]
    assert (row["micro_batch"], row["num_gpus"], row["sharding"]) == (2, 4, "fsdp")


def test_more_epochs_take_proportionally_longer():
    one = plan("llama-3.1-8b", tokens=1e8, method="lora", gpus=["h100-sxm"], hosted=False).iloc[0]
    three = plan("llama-3.1-8b", tokens=1e8, epochs=3, method="lora", gpus=["h100-sxm"], hosted=False).iloc[0]
    assert three["train_hours"] == pytest.approx(3 * one["train_hours"])
    assert three["rent_usd"] == pytest.approx(3 * one["rent_usd"])


# -- host RAM -----------------------------------------------------------------------------------------------------
def test_host_ram_holds_the_16_bit_checkpoint_once_per_loading_process():
    spec = get_model("llama-3.1-8b")
    single = vc.estimate(spec, method="lora")
    assert host_ram(spec, resolve_setup(spec, method="lora"), single).loading_bytes == spec.params * 2
    ddp = vc.estimate(spec, method="lora", num_gpus=4, sharding="ddp")
    assert host_ram(spec, resolve_setup(spec, method="lora", num_gpus=4, sharding="ddp"), ddp).loading_bytes == \
        4 * spec.params * 2
    fsdp = vc.estimate(spec, num_gpus=16, sharding="fsdp")
    assert host_ram(spec, resolve_setup(spec, num_gpus=16, sharding="fsdp"), fsdp).loading_bytes == spec.params * 2


def _host(model, **options):
    spec = get_model(model)
    return host_ram(spec, resolve_setup(spec, **options), vc.estimate(spec, **options))


def test_a_quantized_base_streams_to_the_gpu_so_the_host_holds_its_largest_tensor_only():
    # bitsandbytes sets device_map={"": cuda} (transformers quantizer_bnb_4bit.py:94-97): each checkpoint tensor goes
    # to the GPU on its own. Llama-3.1-8B's largest is embed_tokens (= lm_head), 128256 x 4096 (its config.json).
    assert _host("llama-3.1-8b", method="qlora").loading_bytes == 2 * 128256 * 4096
    # the same model without a quantizer is built on the host: the whole 16-bit checkpoint
    assert _host("llama-3.1-8b", method="lora").loading_bytes == get_model("llama-3.1-8b").params * 2


def test_a_checkpoint_save_holds_what_save_pretrained_writes_at_most_one_shard():
    lora = _host("llama-3.1-8b", method="lora")
    full = _host("llama-3.1-8b", method="full")
    assert 0 < lora.saving_bytes < 100 * 2**20  # r=8 qv adapters: a few MiB
    assert full.saving_bytes == pytest.approx(get_model("llama-3.1-8b").params * 2, rel=0.01)  # every bf16 weight
    # 70B in bf16 is 141 GB: save_pretrained's 50 GB shards bound what one save holds (transformers max_shard_size)
    assert _host("llama-3.3-70b", method="full").saving_bytes == 50 * 10**9


def test_fsdp_checkpoints_copy_every_ranks_shard_and_optimizer_states_to_the_host():
    spec = get_model("llama-3.1-8b")
    options = dict(method="full", num_gpus=2, sharding="fsdp")
    breakdown = vc.estimate(spec, **options)
    saving = _host("llama-3.1-8b", **options).saving_bytes
    # two ranks on one node: the whole model once plus both ranks' optimizer shards
    assert saving == pytest.approx(spec.params * 2 + 2 * breakdown.terms()["optimizer_states"], rel=0.01)
    # a peft model saves its adapter only (the Trainer's adapter_only=True): the frozen base is not copied
    lora = _host("llama-3.1-8b", method="lora", num_gpus=2, sharding="fsdp")
    assert lora.saving_bytes < 100 * 2**20


def test_host_ram_is_the_larger_of_loading_and_training_never_their_sum():
    host = _host("llama-3.1-8b", method="full", optimizer="paged-adamw-8bit")
    assert host.total_bytes == max(host.loading_bytes, host.offload_bytes + host.paged_optimizer_bytes
                                   + host.activation_offload_bytes + host.saving_bytes)


def test_paged_optimizer_states_need_host_ram():
    spec = get_model("llama-3.1-8b")
    resolved = resolve_setup(spec, optimizer="paged-adamw-8bit")
    breakdown = vc.estimate(spec, optimizer="paged-adamw-8bit")
    assert breakdown.details["paged_optimizer_bytes"] > 0
    assert host_ram(spec, resolved, breakdown).paged_optimizer_bytes == breakdown.details["paged_optimizer_bytes"]


def test_optimizer_offload_moves_the_states_from_the_gpu_to_the_host():
    spec = get_model("llama-3.1-8b")
    frame = plan(spec, tokens=1e8, gpus=["h100-sxm"], offload="optimizer", hosted=False)
    row = frame.iloc[0]
    # FSDP offloads parameters with the optimizer; an optimizer-only offload runs on DeepSpeed ZeRO-3
    assert bool(row["fits"]) and row["sharding"] == "zero3"
    count, batch = int(row["num_gpus"]), int(row["micro_batch"])
    # on one GPU (ZeRO-Offload's single-GPU case) the comparison is the unsharded run: ZeRO needs offload there
    on_gpu = vc.estimate(spec, gpu="h100-sxm", num_gpus=count, sharding="zero3" if count > 1 else "none",
                         batch_size=batch)
    offloaded = vc.estimate(spec, gpu="h100-sxm", num_gpus=count, sharding="zero3", batch_size=batch,
                            offload="optimizer")
    assert row["device_gib"] == pytest.approx(offloaded.total_bytes / BYTES_PER_GIB)
    assert on_gpu.terms()["optimizer_states"] > 0 and offloaded.terms()["optimizer_states"] == 0
    assert offloaded.total_bytes < on_gpu.total_bytes
    # DeepSpeed's host rule (estimate_zero3_model_states_mem_needs): 16 B per trainable parameter x 1.5 per node
    nodes = -(-count // 8)
    assert row["host_offload_gib"] * BYTES_PER_GIB == pytest.approx(16 * spec.params * 1.5 / nodes, rel=1e-9)


def test_cli_plan_offloads_through_the_setups_offload_option(capsys):
    code, out, err = run_cli(capsys, "plan", "llama-3.1-8b", "--tokens", "1e8", "--gpus", "h100-sxm",
                             "--offload", "optimizer", "--no-hosted", "--format", "json")
    assert code == 0, err
    row = json.loads(out)["rows"][0]
    assert row["sharding"] == "zero3" and row["host_offload_gib"] > 0


def test_paged_optimizers_cannot_also_be_offloaded():
    with pytest.raises(VramcalcError, match="cannot be offloaded"):
        plan("llama-3.1-8b", tokens=1e8, optimizer="paged-adamw-8bit", offload="optimizer")


# -- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"tokens": 0}, "token count must be a positive number"),
    ({"tokens": -1e6}, "token count must be a positive number"),
    ({"tokens": 1e6, "epochs": 0}, "number of epochs must be a positive number"),
    ({"tokens": 1e6, "usd_per_kwh": 0}, r"electricity price \(\$/kWh\) must be a positive number"),
    ({"tokens": 1e6, "amortisation_years": -3}, "amortisation horizon"),
    ({"tokens": 1e6, "max_gpus": 0}, "maximum number of GPUs must be a positive number"),
    ({"tokens": 1e6, "rank_by": "price"}, "unknown ranking 'price'"),
    ({"tokens": 1e6, "gpus_to_try": ["h1000"]}, "unknown GPU 'h1000'; closest"),
    ({"tokens": 1e6, "method": "full", "lora_rank": 8}, "--lora-rank does not apply"),
])
def test_bad_plan_input_is_a_one_line_error(kwargs, message):
    with pytest.raises(VramcalcError, match=message) as err:
        plan("llama-3.1-8b", **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("argv", [
    ["plan", "llama-3.1-8b", "--tokens", "0"],
    ["plan", "llama-3.1-8b", "--tokens", "-5"],
    ["plan", "llama-3.1-8b", "--tokens", "1e6", "--usd-per-kwh", "-0.1"],
    ["plan", "llama-3.1-8b", "--tokens", "1e6", "--amortisation-years", "0"],
    ["max-batch", "llama-3.1-8b", "--gpu", "h100-sxm", "--batch-size", "2"],
    ["max-batch", "llama-3.1-8b"],
])
def test_cli_bad_input_exits_2_with_one_error_line(argv, capsys):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1


# -- the CSV ------------------------------------------------------------------------------------------------------
def test_plan_csv_opens_in_pandas_with_the_same_rows_and_stamp(lora_plan, tmp_path):
    path = tmp_path / "plan.csv"
    write_csv(lora_plan, path)
    back = pandas.read_csv(path)
    assert list(back.columns) == list(PLAN_COLUMNS) and len(back) == len(lora_plan)
    stamp = catalogue_stamp()
    assert (back["catalogue_version"] == stamp.version).all() and (back["catalogue_date"] == stamp.date).all()
    assert back["device_gib"].dropna().tolist() == pytest.approx(lora_plan["device_gib"].dropna().tolist(), rel=1e-8)


def test_catalogue_stamp_names_the_version_and_newest_price_date():
    stamp = catalogue_stamp()
    assert stamp.version.startswith(vc.__version__ + "+")
    dates = [g.cloud_price_date for g in gpus() if g.cloud_price_date]
    assert stamp.date >= max(dates)


@pytest.mark.parametrize("name", ["=HYPERLINK(\"evil.example\",\"y\")", "+cmd", "-2+3", "@SUM(A1)"])
def test_formula_like_model_names_from_a_users_config_are_escaped(name, tmp_path, capsys):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 512, "vocab_size": 1000,
    }))
    out_csv = tmp_path / "plan.csv"
    code, out, err = run_cli(capsys, "plan", str(folder), "--tokens", "1e6", "--output", str(out_csv))
    assert code == 0, err
    for row in csv.DictReader(out_csv.open()):
        assert row["model"] == "'" + name
        for cell in row.values():
            assert not cell.startswith(("=", "+", "@")) and not (cell.startswith("-") and not _is_number(cell))


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def test_cli_plan_prints_the_summary_and_writes_the_csv(tmp_path, capsys):
    # The count, derived apart from the plan's bisection: a GPU type fits when any count it tries (1, 2, 4, then
    # nodes of 8 up to 512; FSDP above one) fits, scanned one by one; the types are the rows of data/gpus.csv.
    # (Memory per GPU is not monotone in the count for MoE models: FSDP pads 128 experts over 512 ranks.)
    # Sharding, checkpointing and offload are pinned, so that plan searches the GPU count only
    # (tests/test_plan_parallelism.py covers the strategies it searches otherwise).
    with open(data_dir() / "gpus.csv", newline="", encoding="utf-8") as f:
        names = [row["name"] for row in csv.DictReader(f)]
    counts = [1, 2, 4, *range(8, 513, 8)]
    fitting = [name for name in names
               if any(vc.estimate("qwen3-30b-a3b", method="lora", gpu=name, num_gpus=n,
                                  sharding="fsdp" if n > 1 else "none").fits() for n in counts)]
    assert 0 < len(fitting) < len(names)  # both sides of the claim are exercised
    path = tmp_path / "plan.csv"
    code, out, err = run_cli(capsys, "plan", "qwen3-30b-a3b", "--method", "lora", "--tokens", "5e8",
                             "--sharding", "fsdp", "--no-grad-ckpt", "--offload", "none", "--output", str(path))
    assert code == 0
    assert out.splitlines()[0].startswith(f"{len(fitting)} of {len(names)} GPU types fit qwen3-30b-a3b")
    assert "never 0" in out and f"wrote {path}" in err and "wrote" not in out
    assert len(pandas.read_csv(path)) >= len(names)


def test_cli_plan_json_has_the_summary_and_null_for_missing_values(capsys):
    code, out, _ = run_cli(capsys, "plan", "llama-3.1-8b", "--method", "qlora", "--tokens", "1e7",
                           "--gpus", "rtx-3090,h100-sxm", "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["summary"] and data["catalogue_date"]
    row = next(r for r in data["rows"] if r["gpu"] == "rtx-3090")
    list_price_usd = float(catalogue_csv_row("rtx-3090")["list_price_usd"])
    assert row["rent_usd"] is None and row["buy_usd"] == list_price_usd * row["num_gpus"]


@pytest.mark.parametrize("argv, expected", [
    (["max-batch", "llama-3.1-8b", "--gpu", "h100-sxm", "--method", "lora"], "largest micro-batch"),
    (["max-batch", "llama-3.3-70b", "--gpu", "rtx-4090"], "does not fit on one rtx-4090 even at micro-batch 1"),
])
def test_cli_max_batch_answers_in_one_line(argv, expected, capsys):
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0 and expected in out and out.count("\n") == 1


@pytest.mark.skipif(shutil.which("soffice") is None, reason="LibreOffice (soffice) is not installed")
def test_libreoffice_converts_the_plan_csv_without_error(lora_plan, tmp_path):
    path = tmp_path / "plan.csv"
    write_csv(lora_plan, path)
    result = subprocess.run(["soffice", "--headless", "--convert-to", "xlsx", "--outdir", str(tmp_path), str(path)],
                            capture_output=True, text=True, timeout=180,
                            env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "Error" not in result.stderr
    assert (tmp_path / "plan.xlsx").stat().st_size > 0


# -- sweep --------------------------------------------------------------------------------------------------------
GRID = {"model": ["llama-3.1-8b", "qwen3-30b-a3b", "gemma-2-9b", "deepseek-r1", "phi-4"],
        "method": ["full", "lora", "qlora", "prompt"], "optimizer": ["adamw", "adamw-8bit", "paged-adamw-8bit"],
        "grad_ckpt": [False, True], "lora_rank": [16], "batch_size": list(range(1, 33)),
        "seq_len": [256, 512, 1024, 2048, 4096, 8192, 16384], "gpu": ["h100-sxm", "rtx-4090", "a100-80gb", "b200"]}


def test_sweep_evaluates_over_100k_setups_vectorised():
    frame = sweep(GRID)
    assert len(frame) >= 100_000 and frame["error"].isna().all()
    assert frame["fits"].any() and not frame["fits"].all()


SWEEP_MODELS = ["phi-3-mini", "gemma-2-2b", "gemma-2-9b", "mistral-7b", "llama-3.1-8b", "qwen3-30b-a3b", "phi-4",
                "deepseek-r1", "smollm2-135m"]  # phi-3 and gemma-2 attend through a sliding window
# around the windows (phi-3-mini 2047, gemma-2 4096): a group's rows fall on both sides of them
SEQ_LENS = st.one_of(st.sampled_from([1000, 2046, 2047, 2048, 4095, 4096, 4097, 8192]), st.integers(1, 8192))
SWEEP_COLUMNS = ("peak_tensor_bytes", "runtime_overhead_bytes", "allocator_slack_bytes", "total_bytes")


def _distinct(strategy, most: int):
    return st.lists(strategy, min_size=1, max_size=most, unique=True)


@given(models=_distinct(st.sampled_from(SWEEP_MODELS), 3),
       methods=_distinct(st.sampled_from(["full", "lora", "qlora", "prompt"]), 2),
       optimizer=st.sampled_from(["adamw", "adamw-foreach", "adamw-8bit", "paged-adamw-8bit", "adafactor"]),
       grad_ckpt=_distinct(st.booleans(), 2), attn=st.sampled_from(["sdpa", "flash", "eager"]),
       batch_sizes=_distinct(st.integers(1, 16), 3), seq_lens=_distinct(SEQ_LENS, 3),
       gpus=_distinct(st.sampled_from(["h100-sxm", "rtx-4090", "mi300x", "v100-32gb"]), 2),
       parallel=st.sampled_from([(1, "none"), (4, "fsdp"), (4, "zero2")]))
@settings(max_examples=40, deadline=None)
def test_sweep_agrees_with_estimate_on_every_row_of_a_grid(models, methods, optimizer, grad_ckpt, attn, batch_sizes,
                                                           seq_lens, gpus, parallel):
    num_gpus, sharding = parallel
    grid = {"model": models, "method": methods, "optimizer": [optimizer], "grad_ckpt": grad_ckpt, "attn": [attn],
            "batch_size": batch_sizes, "seq_len": seq_lens, "gpu": gpus, "num_gpus": [num_gpus],
            "sharding": [sharding]}
    frame = sweep(grid)
    assert len(frame) == numpy.prod([len(values) for values in grid.values()])
    for row in frame.itertuples(index=False):
        options = dict(method=row.method, optimizer=row.optimizer, grad_ckpt=row.grad_ckpt, attn=row.attn,
                       num_gpus=row.num_gpus, sharding=row.sharding)
        try:
            b = vc.estimate(row.model, gpu=row.gpu, batch_size=row.batch_size, seq_len=row.seq_len, **options)
        except VramcalcError as err:
            assert row.error == str(err)
            continue
        terms = b.terms()
        expected = (b.peak_tensor_bytes, terms["runtime_overhead"], terms["allocator_slack"], b.total_bytes)
        assert tuple(getattr(row, column) for column in SWEEP_COLUMNS) == expected, row
        assert (row.phase, bool(row.fits), row.error) == (b.phase.value, b.fits(), None), row


def test_sweep_resolves_the_sliding_window_of_each_row_not_of_its_group():
    # issue 9, item 3: phi-3-mini (window 2047) at 1024 and 4096 in one group; before the fix the sweep's 4096 row
    # took the 1024 row's mask decision and differed from estimate()
    frame = sweep({"model": ["phi-3-mini"], "seq_len": [1024, 4096], "gpu": ["h100-sxm"]})
    alone = vc.estimate("phi-3-mini", seq_len=4096, gpu="h100-sxm")
    assert frame.loc[frame["seq_len"] == 4096, "total_bytes"].item() == alone.total_bytes
    assert frame.loc[frame["seq_len"] == 1024, "total_bytes"].item() == \
        vc.estimate("phi-3-mini", seq_len=1024, gpu="h100-sxm").total_bytes


def test_sweep_reports_a_bad_setup_on_its_row_and_evaluates_the_rest():
    frame = sweep({"model": ["llama-3.1-8b"], "method": ["qlora", "full"], "precision": ["fp8", "bf16"],
                   "batch_size": [0, 2]})
    bad_precision = frame[(frame["method"] == "qlora") & (frame["precision"] == "fp8") & (frame["batch_size"] == 2)]
    assert "qlora with precision fp8" in bad_precision["error"].iloc[0] and bad_precision["total_bytes"].isna().all()
    assert (frame[frame["batch_size"] == 0]["error"] == "batch size must be a positive integer").all()
    good = frame[frame["error"].isna()]
    assert len(good) == 3 and good["total_bytes"].notna().all()


def test_sweep_ignores_options_foreign_to_a_rows_method():
    frame = sweep({"model": ["llama-3.1-8b"], "method": ["full", "lora"], "lora_rank": [64]})
    assert frame["error"].isna().all()
    full = frame[frame["method"] == "full"].iloc[0]
    assert full["total_bytes"] == vc.estimate("llama-3.1-8b").total_bytes


@pytest.mark.parametrize("grid, message", [
    ({"method": ["lora"]}, "needs a 'model' column"),
    ({"model": ["llama-3.1-8b"], "batch": [1]}, "unknown sweep column 'batch'"),
    ({"model": []}, "sweep axis 'model' has no values"),
])
def test_a_malformed_grid_is_a_one_line_error(grid, message):
    with pytest.raises(VramcalcError, match=message):
        sweep(grid)


def test_sweep_without_a_gpu_reports_memory_without_a_verdict():
    frame = sweep({"model": ["llama-3.1-8b"], "seq_len": numpy.array([512, 1024])})
    assert "fits" not in frame.columns
    assert frame["total_bytes"].tolist() == [vc.estimate("llama-3.1-8b", seq_len=s).total_bytes for s in (512, 1024)]


# -- import weight ------------------------------------------------------------------------------------------------
def test_importing_vramcalc_and_the_planning_modules_loads_no_pandas_numpy_or_matplotlib():
    code = ("import sys, vramcalc, vramcalc.planning, vramcalc.cost, vramcalc.report, vramcalc.plotting;"
            "heavy = [m for m in ('pandas', 'numpy', 'matplotlib', 'torch') if m in sys.modules];"
            "print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


# -- plan without --tokens, throughput and prices (issue 16 phase 2) ----------------------------------------------
@pytest.fixture(scope="module")
def per_million():
    return plan_rows("llama-3.1-8b", method="lora", gpus=["h100-sxm", "a100-80gb", "rtx-4090", "t4"]).rows


def test_a_plan_without_tokens_has_speed_and_cost_per_million_but_no_totals(per_million):
    fitting = [r for r in per_million if r["offer"] == "gpu" and r.get("fits")]
    timed = [r for r in fitting if "no bf16 matmuls" not in (r.get("note") or "")]
    assert len(timed) == len(fitting) - 1  # the T4 fits (checkpointed) but has no bf16 matmuls: no time
    for row in timed:
        assert row["throughput_tokens_per_s"] > 0 and row["step_seconds"] > 0 and row["host_ram_gib"] > 0
        assert row.get("train_hours") is None and row.get("rent_usd") is None and row.get("cost_usd") is None
        # $/GPU-hour x GPUs / (tokens/s x 3600 s/h) x 1e6 tokens
        expected = row["rent_usd_per_gpu_hour"] * row["num_gpus"] / (row["throughput_tokens_per_s"] * 3600) * 1e6
        assert row["usd_per_million_tokens"] == pytest.approx(expected)


def test_a_plan_without_tokens_ranks_by_cost_per_million_tokens(per_million):
    ranked = [r["usd_per_million_tokens"] for r in sorted((r for r in per_million if r.get("rank")),
                                                          key=lambda r: r["rank"])]
    assert ranked == sorted(ranked) and len(ranked) >= 3


def test_the_total_is_the_cost_per_million_tokens_times_the_tokens():
    rows = plan_rows("llama-3.1-8b", tokens=3e8, epochs=2, method="lora", gpus=["h100-sxm"], hosted=False).rows
    row = rows[0]
    assert row["cost_usd"] == pytest.approx(row["usd_per_million_tokens"] * 600)  # 3e8 tokens x 2 epochs = 600 M
    assert row["train_hours"] == pytest.approx(6e8 / row["throughput_tokens_per_s"] / 3600)


def test_the_step_time_model_gives_the_plans_throughput():
    row = plan_rows("llama-3.1-8b", method="lora", gpus=["h100-sxm"], hosted=False).rows[0]
    details = vc.estimate("llama-3.1-8b", method="lora", gpu="h100-sxm", batch_size=row["micro_batch"]).details
    assert row["throughput_tokens_per_s"] == pytest.approx(details["tokens_per_second"])
    assert row["mfu"] == pytest.approx(details["mfu"]) and "step-time" in row["mfu_source"]


def test_the_plan_carries_every_price_with_its_date_and_source(per_million):
    row = next(r for r in per_million if r["gpu"] == "h100-sxm")
    for kind in ("ondemand", "spot", "reserved"):
        assert row[f"{kind}_usd_per_gpu_hour"] > 0
        assert row[f"{kind}_provider"] and row[f"{kind}_region"] and row[f"{kind}_source"]
        assert row[f"{kind}_price_date"][:4].isdigit()
    assert row["list_price_usd"] > 0 and row["list_price_source"] and row["list_price_basis"]
    assert row["server_usd_per_gpu"] > 0 and row["server_price_source"] and row["server_price_date"]
    assert row["buy_total_usd"] == pytest.approx((row["list_price_usd"] + row["server_usd_per_gpu"]) * row["num_gpus"])
    assert row["pue"] > 1 and row["pue_source"]


def test_buy_columns_use_the_list_price_column_and_amortise_the_whole_purchase():
    # B200's only unit price is data/gpu_list_prices.csv's analyst $40,000 (data/gpus.csv leaves it blank): the buy
    # columns use the same figure as list_price_usd, and the amortised share covers GPUs, servers and network
    row = plan_rows("llama-3.1-8b", tokens=1e9, method="lora", gpus=["b200"], hosted=False).rows[0]
    assert row["list_price_usd"] == 40_000 and row["buy_usd"] == 40_000 * row["num_gpus"]
    share = row["train_hours"] / (row["amortisation_years"] * 365 * 24)
    assert row["buy_amortised_usd"] == pytest.approx(row["buy_total_usd"] * share)


def test_electricity_and_network_prices_carry_their_source_in_the_csv():
    rows = plan_rows("llama-3.1-70b", method="full", gpus=["h100-sxm"], hosted=False).rows
    row = rows[0]
    assert row["usd_per_kwh_source"].startswith("EIA") and row["pue_source"]
    assert row["num_gpus"] > 8  # spans servers: buy_total_usd adds one switch port per GPU, priced with its source
    assert row["buy_total_usd"] == pytest.approx(
        (row["list_price_usd"] + row["server_usd_per_gpu"] + row["network_port_usd"]) * row["num_gpus"])
    assert row["network_port_usd"] == pytest.approx(562.5) and row["network_price_date"]
    assert "InfiniBand" in row["network_price_source"]
    given = plan_rows("llama-3.1-8b", method="lora", gpus=["h100-sxm"], hosted=False, usd_per_kwh=0.3).rows[0]
    assert given["usd_per_kwh"] == 0.3 and given["usd_per_kwh_source"] == "given (usd_per_kwh)"


def test_cli_plan_without_tokens_prints_a_table_and_writes_the_csv(tmp_path, capsys):
    out_file = tmp_path / "plan.csv"
    code, out, err = run_cli(capsys, "plan", "llama-3.1-8b", "--method", "lora", "--gpus", "h100-sxm,rtx-4090",
                             "--output", str(out_file))
    assert code == 0 and "per million training tokens" in out
    rows = list(csv.DictReader(open(out_file, newline="", encoding="utf-8")))
    h100 = next(r for r in rows if r["gpu"] == "h100-sxm")
    assert float(h100["usd_per_million_tokens"]) > 0 and h100["train_hours"] == "" and h100["cost_usd"] == ""
    # spreadsheet-clean: no cell a spreadsheet would read as a formula
    for row in rows:
        for value in row.values():
            assert not value.startswith(("=", "+", "@")) and not (value.startswith("-") and not _is_number(value))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
