"""``vramcalc infer``, ``max-context`` and ``serve-plan`` through main(argv): formats, answers, one error line."""

import json

import pytest

from .cli_helpers import run_cli


def test_infer_l40s_prints_breakdown_fit_largest_concurrency_and_speed(capsys):
    code, out, err = run_cli(capsys, "infer", "llama-3.1-8b", "--context", "8192", "--concurrency", "32", "--gpu", "l40s")
    assert code == 0, err
    assert "kv_cache" in out and "engine_reserved" in out
    assert "does not fit" in out  # 32 x 8192 tokens x 128 KiB = 32 GiB of KV + 15 GiB of weights > 45 GiB
    assert "largest concurrency that fits at 8192 tokens:" in out
    assert "tokens/s per sequence" in out
    assert "per million generated tokens" in out and "hosted APIs" in out  # self-hosted $ beside published API prices


def test_infer_json_carries_terms_and_answers(capsys):
    code, out, _ = run_cli(capsys, "infer", "llama-3.1-8b", "--context", "4096", "--concurrency", "8",
                           "--gpu", "h100-sxm", "--engine", "sglang", "--format", "json")
    data = json.loads(out)
    assert code == 0
    assert sum(data["terms"].values()) == data["total_bytes"]
    # 8 sequences of 4096 tokens x 131,072 bytes (32 layers x 8 KV heads x 128 x 2 x 2)
    assert data["terms"]["kv_cache"] == 8 * 4096 * 131072
    assert data["details"]["max_concurrency"] >= 8 and data["inputs"]["engine"] == "sglang"


def test_infer_csv_has_unit_suffixed_inference_columns(capsys):
    code, out, _ = run_cli(capsys, "infer", "qwen3-8b", "--context", "2048", "--format", "csv")
    header = out.splitlines()[0].split(",")
    assert code == 0 and "kv_cache_bytes" in header and "engine_reserved_bytes" in header


def test_max_context_and_serve_plan(capsys):
    code, out, _ = run_cli(capsys, "max-context", "llama-3.1-8b", "--concurrency", "4", "--gpu", "h100-sxm",
                           "--format", "json")
    assert code == 0 and json.loads(out)["max_context"] > 8192
    code, out, _ = run_cli(capsys, "serve-plan", "llama-3.1-8b", "--context", "8192", "--concurrency", "64",
                           "--gpus", "h100-sxm,l40s", "--format", "json")
    rows = json.loads(out)
    assert code == 0 and {row["gpu"] for row in rows} == {"h100-sxm", "l40s"}
    assert all(row["usd_per_million_generated_tokens"] > 0 for row in rows)
    assert all(row["usd_per_hour"] == round(row["usd_per_hour"], 4) for row in rows)
    code, out, _ = run_cli(capsys, "serve-plan", "llama-3.1-8b", "--context", "8192", "--concurrency", "64",
                           "--gpus", "l40s")
    assert code == 0 and "hosted APIs" in out


@pytest.mark.parametrize("argv, words", [
    (("infer", "llama-3.1-8b", "--context", "abc"), "context"),
    (("infer", "llama-3.1-8b", "--context", "4096", "--engine", "tgi"), "hf, vllm, sglang"),
    (("infer", "llama-3.1-8b", "--context", "4096", "--gpu", "h1000"), "h100"),
    (("infer", "lama-3.1-8b", "--context", "4096"), "llama-3.1-8b"),
    (("max-context", "llama-3.1-8b", "--concurrency", "0", "--gpu", "l40s"), "concurrency"),
])
def test_bad_input_is_one_error_line_exit_2(capsys, argv, words):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err
