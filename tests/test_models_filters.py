"""``vramcalc models`` filters: --family, --max-params, a search word (positional or --search)."""

import json

import pytest

from vramcalc import catalogue

from .cli_helpers import run_cli


def listed(capsys, *argv) -> list[str]:
    code, out, err = run_cli(capsys, "models", *argv, "--format", "json")
    assert code == 0, err
    return [row["name"] for row in json.loads(out)]


@pytest.mark.parametrize("limit, count", [("2e9", 2e9), ("2B", 2e9), ("2000000000", 2e9), ("500M", 5e8),
                                          ("1.5b", 1.5e9)])
def test_max_params_keeps_exactly_the_models_at_or_under_the_limit(capsys, limit, count):
    names = listed(capsys, "--max-params", limit)
    assert names == [m.name for m in catalogue.models() if m.params <= count]
    assert names  # smollm2-135m (134,515,008 parameters) is under every limit here


def test_family_lists_every_model_of_that_family_and_no_other(capsys):
    names = listed(capsys, "--family", "qwen3_moe")
    assert {"qwen3-30b-a3b", "qwen3-235b-a22b"} <= set(names)
    assert all(catalogue.get_model(name).family == "qwen3_moe" for name in names)


def test_search_words_all_match_case_insensitively_and_ignore_separators(capsys):
    assert listed(capsys, "qwen3", "8b") == ["qwen3-8b"]
    assert listed(capsys, "--search", "SmolLM2") == listed(capsys, "smollm2") == [
        m.name for m in catalogue.models() if m.hf_repo.startswith("HuggingFaceTB/SmolLM2")]
    assert "deepseek-r1-distill-llama-8b" in listed(capsys, "deepseek-ai")  # the Hub id is searched too


def test_filters_combine(capsys):
    names = listed(capsys, "--family", "llama", "--max-params", "9B", "--search", "r1")
    assert "deepseek-r1-distill-llama-8b" in names
    assert all(catalogue.get_model(n).family == "llama" and catalogue.get_model(n).params <= 9e9 for n in names)


@pytest.mark.parametrize("argv, words", [
    (("--family", "lama"), "unknown family 'lama'; closest: llama"),
    (("--max-params", "eight"), "--max-params must be a parameter count such as 8e9, 8B or 500M, got 'eight'"),
    (("--max-params=-1B",), "--max-params must be a parameter count"),
    (("--max-params", "0"), "--max-params must be a parameter count"),
    (("--max-params", "1e9", "--family", "deepseek_v3"), "no catalogue model matches those filters"),
    (("no-such-model",), "no catalogue model matches those filters"),
])
def test_bad_or_empty_filters_are_one_error_line(capsys, argv, words):
    code, out, err = run_cli(capsys, "models", *argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err


def test_the_table_shows_only_the_matches(capsys):
    code, out, _ = run_cli(capsys, "models", "--family", "gemma2")
    assert code == 0
    rows = [line.split()[0] for line in out.splitlines()[1:] if line and not line.startswith("(")]
    assert rows == [m.name for m in catalogue.models() if m.family == "gemma2"]
