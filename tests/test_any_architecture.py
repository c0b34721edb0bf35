"""An architecture vramcalc has no formulas for (issue 13 item 3): the estimate says so in one line and names the trace;
the trace builds what ``AutoModelForCausalLM.from_config`` builds from the config.json and traces every term.

The expected figures are counted here on the model transformers builds from the same config, independently of
vramcalc's tracer (``sum(p.numel())``, ``element_size()``), or follow from peft's LoRA shapes (A [r, in], B [out, r]).
"""

import json

import pytest

import vramcalc

from .cli_helpers import run_cli
from .conftest import needs_torch

# tiny configs of three families with no formulas (keys as their config.json files write them)
TINY_CONFIGS = {
    "mpt": {"model_type": "mpt", "d_model": 64, "n_heads": 4, "n_layers": 2, "vocab_size": 128, "max_seq_len": 64,
            "expansion_ratio": 4},
    # (bloom and opt, examples here until session 34 gave them formulas: tests/test_families_legacy.py)
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 128, "n_positions": 64},
    "gpt_bigcode": {"model_type": "gpt_bigcode", "n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 128,
                    "n_positions": 64},
}
SETUP = dict(batch_size=1, seq_len=16, progress=False)


def _write(tmp_path, family: str):
    folder = tmp_path / family
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_CONFIGS[family]))
    return folder


def _built(family: str, dtype):
    """The model transformers builds from the tiny config, on the meta device (independent of vramcalc)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in TINY_CONFIGS[family].items() if k != "model_type"}
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **fields), dtype=dtype)


def test_estimate_of_a_family_with_no_formulas_is_one_line_naming_the_trace(tmp_path, capsys):
    folder = _write(tmp_path, "mpt")
    code, out, err = run_cli(capsys, "estimate", folder, "--method", "lora", "--seq-len", "512")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: unsupported architecture 'mpt'")
    assert "no formulas" in err
    assert f"vramcalc trace {folder} --method lora --seq-len 512" in err


@needs_torch
@pytest.mark.trace
@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_trace_counts_the_parameters_of_the_model_transformers_builds(tmp_path, family):
    import torch

    model = _built(family, torch.bfloat16)
    unique = {id(p): p for p in model.parameters()}.values()
    result = vramcalc.trace(str(_write(tmp_path, family)), method="full", precision="bf16", **SETUP)
    assert result.details["params"] == sum(p.numel() for p in unique)
    assert result.details["trainable_params"] == result.details["params"]
    assert any("no formulas" in warning for warning in result.warnings)
    # full bf16: the weights are every parameter and buffer the built model holds, at its element size, each rounded
    # up to CUDA's 512-byte allocation granule (PyTorch c10/cuda/CUDACachingAllocator.cpp kMinBlockSize)
    stored = [t.numel() * t.element_size() for t in [*unique, *model.buffers()]]
    assert result.terms()["weights"] == sum(-(-n // 512) * 512 for n in stored)


@needs_torch
@pytest.mark.trace
def test_full_fine_tuning_holds_more_optimizer_state_than_lora(tmp_path):
    folder = str(_write(tmp_path, "gpt_bigcode"))
    full = vramcalc.trace(folder, method="full", **SETUP)
    lora = vramcalc.trace(folder, method="lora", lora_targets="all-linear", **SETUP)
    assert full.terms()["optimizer_states"] > lora.terms()["optimizer_states"] > 0
    assert lora.details["trainable_params"] < full.details["trainable_params"]


@needs_torch
@pytest.mark.trace
def test_lora_on_named_modules_trains_exactly_their_adapters(tmp_path):
    """MPT's fused Wqkv is Linear(d, 3d): LoRA adds A [r, d] and B [3d, r] per layer."""
    d, layers, r = 64, 2, 4
    result = vramcalc.trace(str(_write(tmp_path, "mpt")), method="lora", lora_targets="Wqkv", lora_rank=r, **SETUP)
    assert result.details["trainable_params"] == layers * r * (d + 3 * d)
    assert result.inputs["lora_modules"] == "Wqkv"


@needs_torch
@pytest.mark.trace
def test_lora_target_that_is_not_a_module_names_the_linear_layers(tmp_path):
    with pytest.raises(vramcalc.VramcalcError, match="not a module of this 'mpt' model; its linear layers: Wqkv"):
        vramcalc.trace(str(_write(tmp_path, "mpt")), method="lora", lora_targets="q_proj", **SETUP)


@needs_torch
@pytest.mark.trace
def test_qlora_stores_the_linear_weights_in_fewer_bytes_than_lora(tmp_path):
    """QLoRA comes through build.py's bitsandbytes path unchanged: the 4-bit linears make the weights smaller."""
    folder = str(_write(tmp_path, "gpt_bigcode"))
    lora = vramcalc.trace(folder, method="lora", lora_targets="all-linear", precision="bf16", **SETUP)
    qlora = vramcalc.trace(folder, method="qlora", lora_targets="all-linear", precision="bf16", **SETUP)
    assert qlora.terms()["weights"] < lora.terms()["weights"]
    assert qlora.details["trainable_params"] == lora.details["trainable_params"]


@needs_torch
@pytest.mark.trace
def test_a_model_type_transformers_does_not_know_is_one_error_line(tmp_path, capsys):
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no_such_family", "hidden_size": 64}))
    code, out, err = run_cli(capsys, "trace", folder)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: unsupported architecture 'no_such_family': vramcalc has no formulas for it and "
                          "transformers has no class for it")


@needs_torch
@pytest.mark.trace
def test_the_parameter_inventory_names_each_tensor_with_its_layers_summed(tmp_path):
    """MPT's fused Wqkv is [3d, d] in each of its layers; the inventory adds up to the parameter count."""
    d, layers = 64, 2
    result = vramcalc.trace(str(_write(tmp_path, "mpt")), method="full", **SETUP)
    inventory = result.details["param_inventory"]
    assert inventory["transformer.blocks.*.attn.Wqkv.weight"] == layers * 3 * d * d
    assert sum(inventory.values()) == result.details["params"]
    assert f"{result.details['params']:,}-parameter model" in result.warnings[0]
