"""MemoryBreakdown: totals, fit, and the notebook views."""

import pytest

from vramcalc import catalogue, estimate


def test_fits_compares_the_total_with_the_memory_the_driver_reports():
    result = estimate("llama-3.1-8b", method="qlora", seq_len=1024)
    small = catalogue.get_gpu("t4")
    big = catalogue.get_gpu("h200")
    assert result.fits(big) and result.headroom_bytes(big) == big.memory_bytes - result.total_bytes
    assert not estimate("llama-3.1-70b", seq_len=1024).fits(small)


def test_estimate_with_gpu_reports_fit_and_headroom_in_its_dict():
    data = estimate("mistral-7b", method="lora", gpu="l4").to_dict()
    assert data["gpu"]["name"] == "l4" and isinstance(data["gpu"]["fits"], bool)
    assert data["gpu"]["headroom_bytes"] == data["gpu"]["memory_bytes"] - data["total_bytes"]


def test_dataframe_view_has_one_row_per_term_and_the_totals():
    pytest.importorskip("pandas")
    frame = estimate("qwen3-8b").to_dataframe()
    assert list(frame.index[:8]) == list(estimate("qwen3-8b").terms())
    assert frame.loc["total", "bytes"] == estimate("qwen3-8b").total_bytes


def test_notebook_html_names_every_term_in_gib():
    html = estimate("qwen3-8b")._repr_html_()
    assert "<table>" in html and "GiB = 2^30 bytes" in html and "optimizer_states" in html


@pytest.mark.parametrize("bad", [-1, 1.5, 2.0], ids=["negative", "fractional", "float"])
def test_a_breakdown_rejects_negative_or_fractional_terms(bad):
    result = estimate("qwen3-8b")
    terms = dict(result.terms_bytes)
    terms[next(iter(terms))] = bad
    with pytest.raises(ValueError, match="non-negative integer"):
        type(result)(result.model, terms, result.phase, result.inputs)


def test_inputs_are_a_fresh_copy_each_time():
    # inputs are built on first access from a cache: changing one answer's inputs must not reach the next answer
    first = estimate("qwen3-8b", method="lora")
    first.inputs["seq_len"] = -7
    first.inputs["defaults"].append("nonsense")
    second = estimate("qwen3-8b", method="lora")
    assert second.inputs["seq_len"] == 2048 and "nonsense" not in second.inputs["defaults"]
    assert first.inputs["seq_len"] == -7  # the first answer keeps its own (now edited) copy
