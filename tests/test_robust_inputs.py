"""Hostile and odd inputs end in the right answer or one `error:` line, never a traceback (issue 10, items 6 and 9).

The reproductions are the issue's own; the property tests feed random JSON values into every config field a
family reads and random values into every numeric option of ``estimate()``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vramcalc as vc
from vramcalc.breakdown import MemoryBreakdown
from vramcalc.cli import main
from vramcalc.errors import VramcalcError
from vramcalc.facts import DEEPSPEED_HOST_BUFFER_FACTOR, DEEPSPEED_HOST_BYTES_PER_PARAM_OPTIMIZER
from vramcalc.hf_config import config_fields, spec_from_config

from .test_hf_config import CONFIGS as HF_CONFIGS

# Public config.json values of four families (their sources are in test_hf_config.py)
CONFIGS = {family: HF_CONFIGS[family] for family in ("llama", "qwen3_moe", "deepseek_v3", "gemma2")}


def run(*argv) -> tuple[int, str, str]:
    """``vramcalc ARGV`` in-process: (exit code, stdout, stderr); argparse's own exits count as their code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(arg) for arg in argv])
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def assert_one_error_line(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]


def write_config(tmp_path, config, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(config) if not isinstance(config, str) else config)
    return path


# -- item 6: oddly typed or impossible configs ----------------------------------------------------------------------
ODD_LLAMA = [
    ({"num_key_value_heads": "8"}, "'num_key_value_heads' must be an integer, got '8'"),
    ({"head_dim": 64.5}, "'head_dim' must be an integer, got 64.5"),
    ({"max_position_embeddings": "lots"}, "'max_position_embeddings' must be an integer"),
    ({"model_type": ["llama"]}, "'model_type' must be a string"),
    ({"hidden_size": True}, "'hidden_size' must be an integer, got true"),
    ({"vocab_size": -5}, "'vocab_size'"),
    ({"num_hidden_layers": 0}, "'num_hidden_layers'"),
    ({"intermediate_size": 10**30}, "'intermediate_size'"),
    ({"num_hidden_layers": 10**12}, "'num_hidden_layers'"),
    ({"num_key_value_heads": 5}, "num_key_value_heads (5) must divide num_attention_heads (32)"),
    ({"tie_word_embeddings": "yes"}, "'tie_word_embeddings' must be true or false"),
]
ODD_MOE = [
    ({"decoder_sparse_step": 0}, "'decoder_sparse_step'"),
    ({"mlp_only_layers": 5}, "'mlp_only_layers' must be a list of layer indices"),
    ({"mlp_only_layers": [0, 48]}, "'mlp_only_layers'"),
    ({"num_experts_per_tok": 129}, "num_experts_per_tok (129) must be at most the number of experts (128)"),
]


@pytest.mark.parametrize("change, words", ODD_LLAMA + [(c, w) for c, w in ODD_MOE])
def test_odd_config_field_is_one_error_line_naming_it(tmp_path, capsys, change, words):
    family = "qwen3_moe" if (change, words) in ODD_MOE else "llama"
    path = write_config(tmp_path, {**CONFIGS[family], **change})
    start = time.perf_counter()
    code, _, err = run("estimate", path)
    assert time.perf_counter() - start < 5  # 10**12 layers is refused at once, not looped over
    assert_one_error_line(code, err, words)


def test_nan_in_config_is_refused(tmp_path):
    text = json.dumps(CONFIGS["llama"])[:-1] + ', "head_dim": NaN}'
    code, _, err = run("estimate", write_config(tmp_path, text))
    assert_one_error_line(code, err, "'head_dim' must be an integer, got nan")


def test_integral_float_is_accepted_as_the_integer(tmp_path):
    """64.0 is 64 (documented in hf_config): the estimate equals the one from the integer config."""
    as_int = vc.estimate(str(write_config(tmp_path, {**CONFIGS["llama"], "head_dim": 128}, "a.json")))
    as_float = vc.estimate(str(write_config(tmp_path, {**CONFIGS["llama"], "head_dim": 128.0}, "b.json")))
    assert as_float.total_bytes == as_int.total_bytes


@pytest.mark.parametrize("text, words", [
    ("[" * 200_000 + "]" * 200_000, "nests JSON too deeply"),
    ("[1, 2]", "is not a JSON object"),
    ("hello", "is not valid JSON"),
])
def test_config_that_is_not_an_object_is_one_error_line(tmp_path, text, words):
    code, _, err = run("estimate", write_config(tmp_path, text))
    assert_one_error_line(code, err, words)


def test_binary_config_is_one_error_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(bytes(range(256)))
    code, _, err = run("estimate", path)
    assert_one_error_line(code, err, "not a text file")


@pytest.mark.parametrize("name", ["a" * 5000, "/tmp/" + "a" * 5000 + "/config.json"])
def test_file_name_too_long_is_one_short_error_line(name):
    code, _, err = run("estimate", name)
    assert_one_error_line(code, err)
    assert len(err) < 2000  # the 5000-character name is cut


# -- item 9: numbers that overflow ----------------------------------------------------------------------------------
def test_sweep_past_int64_is_an_error_row_not_a_negative_total():
    pandas = pytest.importorskip("pandas")
    frame = vc.sweep({"model": ["llama-3.1-8b"], "seq_len": [2048, 2**40], "gpu": ["h100-sxm"]})
    ok, huge = frame.iloc[0], frame.iloc[1]
    assert ok["total_bytes"] == vc.estimate("llama-3.1-8b", seq_len=2048, gpu="h100-sxm").total_bytes
    assert huge["total_bytes"] is pandas.NA and huge["fits"] is pandas.NA
    assert "2**62" in huge["error"]


def test_sweep_of_a_product_past_the_bound_is_refused_per_row():
    """Each of batch 2**16 and seq_len 2**22 is allowed alone; together with eager attention's b·a·s² scores they
    pass 2**62 bytes (1 x 32 heads x 2**44 x 32 layers x 2 bytes is 2**55 per batch row, x 2**16 rows)."""
    pandas = pytest.importorskip("pandas")
    frame = vc.sweep({"model": ["llama-3.1-8b"], "batch_size": [1, 2**16], "seq_len": [2**22], "attn": ["eager"]})
    assert pandas.isna(frame.iloc[0]["error"])
    assert frame.iloc[0]["total_bytes"] == vc.estimate("llama-3.1-8b", seq_len=2**22, attn="eager").total_bytes
    assert "2**62" in frame.iloc[1]["error"]


@pytest.mark.parametrize("grid", [{}, None, 5, "llama-3.1-8b", {"model": []}])
def test_sweep_of_a_malformed_grid_is_a_vramcalc_error(grid):
    pytest.importorskip("pandas")
    with pytest.raises(VramcalcError):
        vc.sweep(grid)


@pytest.mark.parametrize("options, words", [
    (dict(seq_len=10**400), "sequence length must be at most"),
    (dict(seq_len=10**5000), "sequence length must be at most"),
    (dict(batch_size=1e18), "batch size must be at most"),
    (dict(seq_len=2**29, batch_size=2**20), "2**62"),
    (dict(method="lora", lora_targets=5), "LoRA targets must be a string"),
    (dict(method="lora", lora_targets=["q_proj", 5]), "LoRA targets must be a string"),
    (dict(method="lora", lora_dropout=10**400), "LoRA dropout"),
    (dict(precision=["bf16"]), "unknown precision"),
    (dict(grad_ckpt=10**5000), "choose one of: none, full, selective"),
])
def test_api_overflow_and_type_errors_are_vramcalc_errors(options, words):
    with pytest.raises(VramcalcError, match=words.replace("*", r"\*").replace("(", r"\(")):
        vc.estimate("llama-3.1-8b", **options)


def test_exact_python_ints_are_not_rounded_through_float():
    from vramcalc.errors import positive_int

    assert positive_int(2**53 + 1, "n") == 2**53 + 1  # float(2**53 + 1) is 2**53
    assert positive_int("2048", "n") == 2048 and positive_int(64.0, "n") == 64
    with pytest.raises(VramcalcError, match="must be at most"):
        positive_int(10**400, "n", maximum=2**30)  # float(10**400) raises OverflowError


def test_trace_with_a_batch_of_1e18_is_one_error_line():
    code, _, err = run("trace", "llama-3.1-8b", "--batch-size", "1e18")
    assert_one_error_line(code, err, "batch size must be at most")


# -- setup rules: flash needs 16 bits; ZeRO-Offload on one GPU ------------------------------------------------------
def test_flash_attention_with_fp32_is_refused():
    code, _, err = run("estimate", "llama-3.1-8b", "--attn", "flash", "--precision", "fp32")
    assert_one_error_line(code, err, "FlashAttention-2 has no fp32 kernel")
    assert vc.estimate("llama-3.1-8b", attn="flash", precision="mixed-bf16").total_bytes > 0


def test_zero_offload_on_one_gpu_keeps_the_states_on_the_host():
    """ZeRO-2 + offload_optimizer on one GPU (ZeRO-Offload's single-GPU case): no optimizer state and no fp32
    master on the GPU; the host holds DeepSpeed's estimate_zero3_model_states_mem_needs figure, 16 bytes per
    trainable parameter x 1.5 (runtime/zero/stage3.py)."""
    offloaded = vc.estimate("llama-3.1-8b", num_gpus=1, sharding="zero2", offload="optimizer", grad_ckpt=True)
    plain = vc.estimate("llama-3.1-8b", grad_ckpt=True)
    assert offloaded.terms()["optimizer_states"] == 0
    assert offloaded.terms()["weights"] == plain.terms()["weights"]  # the bf16 model stays on the GPU
    assert offloaded.total_bytes < plain.total_bytes
    params = offloaded.details["trainable_params"]
    assert offloaded.details["host_offload_bytes_per_node"] == pytest.approx(
        params * DEEPSPEED_HOST_BYTES_PER_PARAM_OPTIMIZER * DEEPSPEED_HOST_BUFFER_FACTOR, rel=0.01)


def test_zero_on_one_gpu_is_estimated_but_fsdp_and_ddp_on_one_gpu_are_refused():
    # DeepSpeed runs any ZeRO stage with a world size of 1 (its fp32 master copy costs memory there: QwenLM/Qwen's
    # finetune_ds.sh trains Qwen-1.8B so); FSDP and DDP over one rank are a mistake on the command line
    code, out, err = run("estimate", "llama-3.1-8b", "--sharding", "zero2", "--format", "json")
    assert code == 0, err
    plain = vc.estimate("llama-3.1-8b")
    assert json.loads(out)["peak_tensor_bytes"] > plain.peak_tensor_bytes  # the fp32 master copy and states
    for sharding in ("fsdp", "ddp"):
        code, _, err = run("estimate", "llama-3.1-8b", "--sharding", sharding)
        assert_one_error_line(code, err, "needs --num-gpus")


# -- property tests -------------------------------------------------------------------------------------------------
json_scalars = st.one_of(
    st.none(), st.booleans(),
    st.sampled_from([0, 1, 2, 3, 7, 8, 16, 64, 128, 4096, 2**20, 2**31, -1, 10**12]),
    st.integers(), st.integers(min_value=-10**400, max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([64.0, 128.0, 0.5, -0.0]),
    st.text(max_size=8), st.sampled_from(["8", "llama", "qwen3_moe", "", "lots"]),
)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)


def assert_sane(breakdown) -> None:
    assert isinstance(breakdown, MemoryBreakdown)
    for name, value in breakdown.terms().items():
        assert isinstance(value, int) and not isinstance(value, bool), (name, value)
        assert value >= 0, (name, value)
    assert breakdown.total_bytes == sum(breakdown.terms().values())
    assert not math.isnan(breakdown.total_bytes)


@pytest.mark.parametrize("family", sorted(CONFIGS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_json_in_config_fields_is_an_estimate_or_a_vramcalc_error(family, data):
    config = dict(CONFIGS[family])
    changes = data.draw(st.dictionaries(st.sampled_from(config_fields(family)), json_values, min_size=1, max_size=3))
    config.update(changes)
    for key in data.draw(st.lists(st.sampled_from(config_fields(family)), max_size=1)):
        config.pop(key, None)
    try:
        spec = spec_from_config(config, name=family)
        breakdown = vc.estimate(spec, seq_len=data.draw(st.sampled_from([16, 1024])))
    except VramcalcError:
        return
    assert_sane(breakdown)
    assert spec.active_params <= spec.params


numeric_options = st.one_of(
    st.integers(min_value=-3, max_value=2**12), st.integers(), st.integers(min_value=-10**400, max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.text(max_size=6), st.sampled_from(["1e18", "2048", "0x10", " 8 ", "nan", "-1"]),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(["full", "lora", "prompt"]), batch_size=numeric_options, seq_len=numeric_options,
       lora_rank=numeric_options, lora_dropout=numeric_options, virtual_tokens=numeric_options,
       grad_accum=numeric_options, num_gpus=numeric_options, global_batch_size=numeric_options,
       precision=st.sampled_from(["bf16", "fp8", "fp32"]))
def test_random_numeric_options_give_an_estimate_or_a_vramcalc_error(method, batch_size, seq_len, lora_rank,
                                                                    lora_dropout, virtual_tokens, grad_accum,
                                                                    num_gpus, global_batch_size, precision):
    options = dict(batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum, num_gpus=num_gpus,
                   global_batch_size=global_batch_size, precision=precision)
    if method == "lora":
        options.update(lora_rank=lora_rank, lora_dropout=lora_dropout)
    if method == "prompt":
        options.update(virtual_tokens=virtual_tokens)
    try:
        breakdown = vc.estimate("smollm2-135m", method=method, **options)
    except VramcalcError:
        return
    assert_sane(breakdown)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flag=st.sampled_from(["--batch-size", "--seq-len", "--grad-accum", "--num-gpus", "--lora-rank",
                             "--lora-dropout"]),
       value=st.one_of(st.integers(min_value=-10, max_value=10**30).map(str), st.floats().map(repr),
                       st.text(alphabet="0123456789e.-+nainfx ", min_size=1, max_size=8)))
def test_random_numeric_flag_exits_0_or_2_with_one_error_line(flag, value):
    method = ["--method", "lora"] if flag.startswith("--lora") else []
    code, out, err = run("estimate", "smollm2-135m", *method, flag + "=" + value, "--format", "json")
    assert code in (0, 2), err
    if code == 2:
        assert_one_error_line(code, err)
    else:
        result = json.loads(out)
        assert all(isinstance(v, int) and v >= 0 for v in result["terms"].values())
