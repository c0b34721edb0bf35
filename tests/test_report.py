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
    b = vc.estimate("llama-3.1-8b", method="qlora", gpu="h100-sxm", batch_size=int(row["micro_batch"]),
                    num_gpus=int(row["num_gpus"]), sharding=row["sharding"])
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
    assert (priced["rent_usd"].dropna() <= priced.loc[priced["rent_usd"].notna(), "spend_usd"]).all()
    assert list(dict.fromkeys(budgets["budget"])) == [band.label for band in BUDGETS]


def test_a_budget_that_buys_and_rents_nothing_says_so():
    result = report([], tokens=1e12, budgets=budget_bands([1]))
    assert result.tables["budgets"]["model"].tolist() == ["nothing in the catalogue"]
    assert "nothing in the catalogue" in result.markdown


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
    assert [p.name for p in written] == ["report.md", "hardware.csv", "techniques.csv", "budgets.csv"]
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
