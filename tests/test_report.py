"""Claims about ``vramcalc report`` (vramcalc/report.py): every figure comes from the estimator and the cost model."""

from __future__ import annotations

import csv

import pandas
import pytest

import vramcalc as vc
from vramcalc.catalogue import get_model
from vramcalc.cli import main
from vramcalc.errors import VramcalcError
from vramcalc.planning import catalogue_stamp
from vramcalc.report import (
    BUDGETS,
    REPORT_METHODS,
    SIZE_CLASSES,
    TECHNIQUES,
    budget_bands,
    report,
    size_class,
    techniques_table,
)
from vramcalc.units import BYTES_PER_GIB


@pytest.fixture(scope="module")
def result():
    return report(["qwen3-30b-a3b"], tokens=5e8)


@pytest.mark.parametrize("cls", SIZE_CLASSES, ids=lambda c: c.label)
def test_each_size_class_representative_falls_in_its_class(cls):
    assert size_class(get_model(cls.representative).params) == cls.label


def test_hardware_table_covers_every_class_method_and_gpu(result):
    hardware = result.tables["hardware"]
    models = [cls.representative for cls in SIZE_CLASSES] + ["qwen3-30b-a3b"]
    assert list(dict.fromkeys(hardware["model"])) == models
    assert set(hardware["method"]) == set(REPORT_METHODS)
    assert len(hardware) == len(models) * len(REPORT_METHODS) * len(vc.gpus())


def test_hardware_figures_are_the_estimators_and_the_cost_models(result):
    hardware = result.tables["hardware"]
    row = hardware[(hardware["model"] == "llama-3.1-8b") & (hardware["method"] == "qlora")
                   & (hardware["gpu"] == "h100-sxm")].iloc[0]
    assert row["grad_ckpt"] == "full"  # REPORT_METHOD_DEFAULTS: QLoRA checkpoints, as peft's kbit preparation does
    b = vc.estimate("llama-3.1-8b", method="qlora", gpu="h100-sxm", batch_size=int(row["micro_batch"]),
                    num_gpus=int(row["num_gpus"]), sharding=row["sharding"], grad_ckpt="full")
    assert row["device_gib"] == pytest.approx(b.total_bytes / BYTES_PER_GIB)
    assert row["rent_usd"] == pytest.approx(row["rent_usd_per_hour"] * row["train_hours"])


def test_techniques_compare_the_estimators_totals(result):
    techniques = result.tables["techniques"]
    lora = techniques[techniques["technique"] == "LoRA"].iloc[0]
    assert lora["without_gib"] == pytest.approx(vc.estimate("qwen3-30b-a3b").total_bytes / BYTES_PER_GIB)
    assert lora["with_gib"] == pytest.approx(vc.estimate("qwen3-30b-a3b", method="lora").total_bytes / BYTES_PER_GIB)
    assert list(techniques["technique"]) == [t.name for t in TECHNIQUES]


@pytest.mark.parametrize("model", ["llama-3.1-8b", "qwen3-30b-a3b", "gemma-2-9b"])
def test_no_technique_increases_memory_and_lora_trains_faster_than_full(model):
    table = techniques_table(model)
    assert (table["saved_gib"] >= 0).all()
    assert table.set_index("technique").loc["LoRA", "speed_ratio"] > 1
    assert table.set_index("technique").loc["gradient checkpointing", "speed_ratio"] < 1


def test_budget_rows_are_affordable_at_the_bands_spend(result):
    budgets = result.tables["budgets"]
    priced = budgets[budgets["model"] != "nothing in the catalogue"]
    assert (priced["buy_usd"].dropna() <= priced.loc[priced["buy_usd"].notna(), "spend_usd"]).all()
    rented = priced[priced["rent_tokens"].notna()]
    spent = rented["rent_tokens"] * rented["rent_usd_per_million_tokens"] / 1e6
    assert (spent <= rented["spend_usd"] * (1 + 1e-9)).all()
    assert list(dict.fromkeys(budgets["budget"])) == [band.label for band in BUDGETS]


def test_a_budget_too_small_for_any_gpu_buys_nothing():
    result = report([], tokens=1e12, budgets=budget_bands([1]))
    budgets = result.tables["budgets"]
    assert budgets["buy_config"].isna().all()
    # $1 still rents some tokens, never more than $1 buys at the row's own rate
    assert (budgets["rent_tokens"] * budgets["rent_usd_per_million_tokens"] / 1e6 <= 1 + 1e-9).all()


def test_markdown_has_the_three_tables_the_stamp_and_the_unit(result):
    text = result.markdown
    for heading in ("## Hardware by model size", "## Techniques: memory saved and speed",
                    "## What a budget buys or rents"):
        assert heading in text
    stamp = catalogue_stamp()
    assert stamp.version in text and stamp.date in text and "GiB = 2^30 bytes" in text
    assert "500,000,000 tokens" in text


def test_a_gpu_without_a_price_reads_no_price_not_zero(result):
    line = next(line for line in result.markdown.splitlines() if line.startswith("| rtx-3090 |"))
    assert "no price" in line and "$0" not in line


def test_report_writes_markdown_and_csv_tables_with_the_stamp(result, tmp_path):
    written = result.write(tmp_path)
    assert [p.name for p in written] == ["report.md", "hardware.csv", "techniques.csv", "budgets.csv",
                                         "open_vs_closed.csv"]
    stamp = catalogue_stamp()
    for path in written[1:]:
        frame = pandas.read_csv(path)
        assert (frame["catalogue_version"] == stamp.version).all() and (frame["catalogue_date"] == stamp.date).all()
    header = next(csv.reader(open(tmp_path / "hardware.csv")))
    assert {"device_gib", "host_ram_gib", "rent_usd_per_hour", "rent_usd", "train_hours"} <= set(header)


@pytest.mark.parametrize("amounts", [[0], [-5000], ["lots"]])
def test_zero_negative_or_non_numeric_budgets_are_errors(amounts):
    with pytest.raises(VramcalcError, match=r"budget \(\$\) must be a positive number"):
        budget_bands(amounts)


@pytest.mark.parametrize("kwargs, message", [
    ({"tokens": 0}, "token count must be a positive number"),
    ({"epochs": -1}, "number of epochs must be a positive number"),
    ({"method": "lora"}, "report covers full, lora and qlora"),
])
def test_bad_report_input_is_a_one_line_error(kwargs, message):
    with pytest.raises(VramcalcError, match=message):
        report([], **kwargs)


def test_cli_report_prints_markdown_and_writes_files(tmp_path, capsys):
    code = main(["report", "--model", "qwen3-30b-a3b", "--tokens", "1e8", "--budget", "10000", "--output",
                 str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0 and out.startswith("# vramcalc reference tables")
    assert f"wrote {tmp_path / 'budgets.csv'}" in err and "wrote" not in out  # Markdown on stdout stays clean
    assert (tmp_path / "report.md").read_text().startswith("# vramcalc reference tables")


@pytest.mark.parametrize("argv", [["report", "--budget", "-1"], ["report", "--tokens", "0"],
                                  ["report", "--method", "full"]])
def test_cli_report_bad_input_exits_2(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1


# -- stack-aware defaults, stated settings, techniques, budgets, open vs closed (issue 16 phase 2) ------------------
def test_qlora_rows_checkpoint_by_default_and_follow_a_given_grad_ckpt():
    from vramcalc.report import hardware_rows

    default = hardware_rows(["llama-3.1-8b"], tokens=1e8, max_gpus=8)
    assert {r["grad_ckpt"] for r in default if r["method"] == "qlora"} == {"full"}
    # full fine-tuning checkpoints only where plan turned it on: without it the row's GPUs do not hold the job
    full = [r for r in default if r["method"] == "full" and r["fits"]]
    assert any(r["grad_ckpt"] == "none" for r in full)
    for r in full:
        if r["grad_ckpt"] == "full":
            assert "grad ckpt full (plan)" in r["parallelism"]
            assert not vc.estimate("llama-3.1-8b", gpu=r["gpu"], num_gpus=r["num_gpus"], sharding=r["sharding"],
                                   grad_ckpt="none").fits()
    given = hardware_rows(["llama-3.1-8b"], tokens=1e8, max_gpus=8, grad_ckpt="none")
    assert {r["grad_ckpt"] for r in given} == {"none"}


def test_qlora_70b_fits_one_h100_as_the_recipes_run_it(result):
    # peft's prepare_model_for_kbit_training checkpoints; without it the 70B QLoRA row did not fit an H100 (issue 16)
    hardware = result.tables["hardware"]
    row = hardware[(hardware["model"] == "llama-3.3-70b") & (hardware["method"] == "qlora")
                   & (hardware["gpu"] == "h100-sxm")].iloc[0]
    assert bool(row["fits"]) and int(row["num_gpus"]) == 1


def test_the_header_states_the_settings_really_used():
    checkpointed = report([], tokens=1e8, max_gpus=8, grad_ckpt="full").markdown.split("## Hardware")[0]
    assert "no checkpointing" not in checkpointed and "full checkpointing" in checkpointed
    default = report([], tokens=1e8, max_gpus=8).markdown.split("## Hardware")[0]
    assert "no checkpointing" in default and "QLoRA r=8 on qv (nf4 base), bf16, adamw" in default


def test_techniques_include_peft_and_prompt_rows_at_the_users_batch_and_sequence():
    table = techniques_table("llama-3.1-8b", batch_size=2, seq_len=1024)
    assert {"LoRA", "QLoRA", "prompt tuning"} <= set(table["technique"])
    assert (table["batch_size"] == 2).all() and (table["seq_len"] == 1024).all()
    lora = table.set_index("technique").loc["LoRA"]
    assert lora["baseline"].startswith("full fine-tuning") and "batch 2 x seq_len 1024" in lora["baseline"]
    # checkpointing at batch 2 x 1024 saves activations and costs a recomputed forward
    ckpt = table.set_index("technique").loc["gradient checkpointing"]
    assert ckpt["speed_ratio"] < 1 and ckpt["change"] == "grad_ckpt none -> full"


def test_budget_tiers_differ_and_a_bigger_tier_never_buys_a_slower_cluster(result):
    budgets = result.tables["budgets"]
    by_band = {band: frame.set_index(["model", "method"]) for band, frame in budgets.groupby("budget", sort=False)}
    labels = [band.label for band in BUDGETS]
    answers = [tuple(by_band[label]["buy_config"].fillna("-")) + tuple(by_band[label]["rent_tokens"].round())
               for label in labels]
    assert len(set(answers)) == len(labels)
    for small, big in zip(labels, labels[1:]):
        both = by_band[small].join(by_band[big], lsuffix="_small", rsuffix="_big", how="inner")
        bought = both.dropna(subset=["buy_tokens_per_s_small", "buy_tokens_per_s_big"])
        assert (bought["buy_tokens_per_s_big"] >= bought["buy_tokens_per_s_small"]).all()
        assert (both["rent_tokens_big"] > both["rent_tokens_small"]).all()


def test_bought_clusters_are_capped_and_priced_with_servers(result):
    from vramcalc.report import MAX_BUY_GPUS

    bought = result.tables["budgets"].dropna(subset=["buy_config"])
    for _, row in bought.iterrows():
        count, gpu = row["buy_config"].split(" x ")
        assert int(count) <= MAX_BUY_GPUS
        if gpu == "h100-sxm":  # GPU + server share per GPU from data/gpu_list_prices.csv: $30,000 + $9,625
            assert row["buy_usd"] >= int(count) * 39_625


def test_open_vs_closed_puts_hosted_apis_beside_rent_and_buy(result):
    rows = result.tables["open_vs_closed"]
    kinds = set(rows["kind"])
    assert {"hosted, closed model", "rent (on demand)", "buy"} <= kinds
    # every row prices the same job: cost = $ per million tokens x 500 M tokens (the fixture's tokens, 1 epoch)
    assert (rows["cost_usd"] - rows["usd_per_million_tokens"] * 500).abs().max() < 1e-6
    assert "## Open vs closed" in result.markdown


def test_open_vs_closed_lists_every_closed_model_api_in_the_price_table(result):
    # each closed-model row of data/hosted_finetuning.csv (OpenAI, Google Vertex, AWS Bedrock) appears once per model
    from vramcalc.cost import hosted_prices

    rows = result.tables["open_vs_closed"]
    closed = rows[rows["kind"] == "hosted, closed model"]
    published = [p for p in hosted_prices() if p.model_access == "closed"]
    assert {"vertex", "bedrock"} <= {p.provider for p in published}
    for model in set(rows["model"]):
        shown = closed[closed["model"] == model]
        assert sorted(shown["usd_per_million_tokens"]) == sorted(p.usd_per_million_tokens for p in published)
        assert {p.provider for p in published} == set(shown["option"])


def test_every_open_vs_closed_row_and_hardware_price_names_its_date(result):
    rows = result.tables["open_vs_closed"]
    assert rows["price_date"].notna().all() and (rows["price_date"].str.len() > 0).all()
    hardware = result.tables["hardware"]
    priced = hardware[hardware["rent_usd_per_hour"].notna()]
    assert priced["price_date"].notna().all() and priced["price_source"].notna().all()
    bought = hardware[hardware["list_price_usd"].notna()]
    assert bought["list_price_date"].notna().all() and bought["list_price_source"].notna().all()


def test_report_defaults_follow_the_chosen_stacks_preset():
    # axolotl leaves gradient checkpointing unset (src/axolotl/utils/schemas/config.py:600-602): its QLoRA rows run
    # without it, and the header says so; unsloth checkpoints every method (unsloth/models/llama.py:3079)
    from vramcalc.report import method_options, settings_sentence

    assert "grad_ckpt" not in method_options({"stack": "axolotl"}, "qlora")
    axolotl = settings_sentence({"stack": "axolotl"})
    qlora_part = axolotl.split("; ")[2]
    assert qlora_part.startswith("QLoRA") and "no checkpointing" in qlora_part
    unsloth = settings_sentence({"stack": "unsloth"})
    assert all("full checkpointing" in part for part in unsloth.split("; "))
