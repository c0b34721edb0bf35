"""Stack presets (issue 11 item 1): a stack lays its documented knobs over vramcalc's defaults, explicit options win,
each knob's origin is shown, and every knob is a real option with a source."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import fields

import pytest

import vramcalc
from vramcalc.errors import VramcalcError
from vramcalc.options import GradCkpt, Method, Stack
from vramcalc.stacks import PRESETS
from vramcalc.training_setup import METHOD_SPECIFIC_OPTIONS, TrainingSetup, options_for

from .cli_helpers import run_cli

MODEL = "llama-3.1-8b"
SETUP_NAMES = {f.name for f in fields(TrainingSetup)}


def _applicable(knob, method: Method) -> bool:
    """A knob applies when it holds for the method and the method accepts its option."""
    return knob.applies_to(method) and (knob.option not in METHOD_SPECIFIC_OPTIONS
                                        or knob.option in options_for(method))


def test_every_stack_has_a_preset_and_every_knob_is_an_option_with_a_source():
    assert set(PRESETS) == set(Stack)
    for preset in PRESETS.values():
        assert preset.version
        for knob in preset.knobs:
            assert knob.option in SETUP_NAMES, (preset.stack, knob.option)
            assert len(knob.source) > 20, (preset.stack, knob.option)


@pytest.mark.parametrize("stack", list(Stack))
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_every_stack_resolves_for_every_training_method_and_shows_its_knobs_as_from_the_stack(stack, method):
    result = vramcalc.estimate(MODEL, method=method, stack=stack.value)
    origins = result.inputs["origins"]
    for knob in PRESETS[stack].knobs:
        if _applicable(knob, Method(method)):
            assert result.inputs[knob.option] == knob.value, knob
            assert origins[knob.option] == f"stack {stack.value}", knob


def test_an_explicit_option_beats_the_stack():
    by_stack = vramcalc.estimate(MODEL, method="lora", stack="trl")
    explicit = vramcalc.estimate(MODEL, method="lora", stack="trl", grad_ckpt=False)
    assert by_stack.inputs["grad_ckpt"] == "full" and by_stack.inputs["origins"]["grad_ckpt"] == "stack trl"
    assert explicit.inputs["grad_ckpt"] == "none" and explicit.inputs["origins"]["grad_ckpt"] == "user"
    assert explicit.terms_bytes != by_stack.terms_bytes  # checkpointing changes the activations


def test_a_method_specific_knob_holds_only_for_its_method():
    # TRL casts trainable params to bf16 for QLoRA only (trl/trainer/sft_trainer.py:1123-1130)
    lora = vramcalc.estimate(MODEL, method="lora", stack="trl")
    qlora = vramcalc.estimate(MODEL, method="qlora", stack="trl")
    assert lora.inputs["adapter_dtype"] == "fp32" and lora.inputs["origins"]["adapter_dtype"] == "default"
    assert qlora.inputs["adapter_dtype"] == "bf16" and qlora.inputs["origins"]["adapter_dtype"] == "stack trl"
    full = vramcalc.estimate(MODEL, method="full", stack="unsloth")  # LoRA knobs of Unsloth do not apply
    assert full.inputs["origins"]["lora_rank"] == "default" and full.inputs["lora_rank"] == 8


def test_the_hf_stack_is_the_historic_default():
    assert vramcalc.estimate(MODEL, method="qlora").terms_bytes == \
        vramcalc.estimate(MODEL, method="qlora", stack="hf").terms_bytes


def test_a_stack_changes_the_estimate_the_way_its_knobs_do():
    """A stack built on transformers is nothing but its knobs: the same knobs given by hand give the same numbers.
    torchtune and litgpt also run their own decoder (``terms/stack_layers.py``): that is not a knob."""
    from vramcalc.terms.stack_layers import HF, stack_layers

    for stack in Stack:
        if stack_layers(stack) is not HF:
            continue
        for method in (Method.FULL, Method.LORA, Method.QLORA):
            knobs = {k.option: k.value for k in PRESETS[stack].knobs if _applicable(k, method)}
            by_stack = vramcalc.estimate(MODEL, method=method.value, stack=stack.value)
            by_hand = vramcalc.estimate(MODEL, method=method.value, **knobs)
            assert by_stack.terms_bytes == by_hand.terms_bytes, (stack, method)


def test_grad_ckpt_takes_the_old_booleans_and_the_new_words():
    assert vramcalc.estimate(MODEL, grad_ckpt=True).inputs["grad_ckpt"] == "full"
    assert vramcalc.estimate(MODEL, grad_ckpt="off").inputs["grad_ckpt"] == "none"
    assert vramcalc.estimate(MODEL, grad_ckpt="selective").inputs["grad_ckpt"] == "selective"
    assert not GradCkpt.NONE and GradCkpt.FULL and GradCkpt.SELECTIVE


def test_bare_grad_ckpt_flag_means_full_and_no_grad_ckpt_means_none(capsys):
    code, out, _ = run_cli(capsys, "estimate", MODEL, "--grad-ckpt", "--format", "json")
    assert code == 0 and json.loads(out)["inputs"]["grad_ckpt"] == "full"
    code, out, _ = run_cli(capsys, "estimate", MODEL, "--grad-ckpt", "selective", "--format", "json")
    assert code == 0 and json.loads(out)["inputs"]["grad_ckpt"] == "selective"
    code, out, _ = run_cli(capsys, "estimate", MODEL, "--stack", "trl", "--no-grad-ckpt", "--format", "json")
    assert code == 0 and json.loads(out)["inputs"]["grad_ckpt"] == "none"


def test_kbit_prep_is_the_mixed_precision_qlora_with_checkpointing():
    """peft prepare_model_for_kbit_training: unquantized params to fp32 and gradient checkpointing on
    (peft/utils/other.py, use_gradient_checkpointing=True)."""
    prepared = vramcalc.estimate(MODEL, method="qlora", kbit_prep=True)
    mixed = vramcalc.estimate(MODEL, method="qlora", precision="mixed-bf16", grad_ckpt=True)
    assert prepared.terms_bytes == mixed.terms_bytes
    assert prepared.inputs["precision"] == "mixed-bf16"
    assert prepared.inputs["origins"]["grad_ckpt"] == "implied by kbit_prep"
    with pytest.raises(VramcalcError, match="drop --no-kbit-prep"):
        vramcalc.estimate(MODEL, method="qlora", precision="mixed-bf16", kbit_prep=False)


def test_optimizer_in_backward_refuses_gradient_accumulation_in_one_line(capsys):
    code, out, err = run_cli(capsys, "estimate", MODEL, "--optimizer-in-backward", "--grad-accum", "4")
    assert code == 2 and out == "" and err.count("\n") == 1 and "cannot accumulate" in err


def test_stacks_command_lists_every_knob_with_its_source(capsys):
    code, out, _ = run_cli(capsys, "stacks", "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert {row["stack"] for row in rows} == {s.value for s in Stack}
    knob_rows = [row for row in rows if row["option"] and row["option"] != "method"]
    assert len(knob_rows) == sum(len(p.knobs) for p in PRESETS.values())
    method_rows = {row["stack"]: row["value"] for row in rows if row["option"] == "method"}
    assert method_rows == {p.stack.value: "one of " + ",".join(m.value for m in p.methods)
                           for p in PRESETS.values() if p.methods}
    assert all(row["source"] for row in knob_rows)
    assert any(row["stack"] == "unsloth" and "estimate only" in row["note"] for row in rows)
    code, out, _ = run_cli(capsys, "stacks")
    assert code == 0 and "optimizer_in_backward" in out and "litgpt" in out


@pytest.mark.parametrize("stack, method", [("torchtune", "ia3"), ("torchtune", "prompt"), ("litgpt", "prompt"),
                                           ("litgpt", "dora"), ("unsloth", "vera"), ("unsloth", "prompt")])
def test_a_method_the_stacks_own_code_does_not_run_is_refused(stack, method):
    # torchtune's recipes run full, LoRA, QLoRA and DoRA; litgpt's finetune scripts full, LoRA and its adapters;
    # Unsloth's get_peft_model builds a LoraConfig: a figure for any other method would be no stack's
    with pytest.raises(VramcalcError, match=f"--stack {stack} runs --method"):
        vramcalc.estimate(MODEL, method=method, stack=stack)


def test_unknown_stack_is_one_error_line_listing_the_stacks(capsys):
    code, out, err = run_cli(capsys, "estimate", MODEL, "--stack", "megatron")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "torchtune" in err and "llama-factory" in err


# -- torchtune 0.1.x + torchao 0.1: the checkpoint re-quantized on the GPU while loading (--load requantize) --------
_TT01_ROW = dict(stack="torchtune", method="qlora", batch_size=2, seq_len=512, grad_ckpt=True, lora_rank=8,
                 lora_targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", loss="hf",
                 optimizer="adamw-foreach", lora_dropout=0.05)


def test_torchtune_01_requantize_load_holds_the_nearest_nf4_search_beside_the_whole_built_model():
    """torchtune 0.1.1 ``utils/_register_nf4_dispatch_ops.py:22-42``: ``load_state_dict`` runs
    ``to_nf4(src.to(dest.device))`` after the whole quantized model is built, and torchao 0.1's
    ``quantize_tensor_nearest`` makes two [n, 16] bf16 tensors (``nf4tensor.py:438-446``). Llama-2-7B's largest
    Linear is 11008 x 4096: at least the built weights + 64 B x 45,088,768 (2.886e9 B), and above the per-layer
    build path, whose 16-bit weight and search run before the later layers exist."""
    requantize = vramcalc.estimate("llama-2-7b", load="requantize", **_TT01_ROW)
    per_layer = vramcalc.estimate("llama-2-7b", load="per-layer", **_TT01_ROW)
    n = 11008 * 4096
    built = requantize.terms()["weights"]
    assert requantize.phase == "load"  # the tutorial: 9.13 GB reserved after init vs 9.29 GB after training
    assert requantize.peak_tensor_bytes >= built + 64 * n
    assert requantize.peak_tensor_bytes <= built + 72 * n + built // 16  # + the n/32 factors of every NF4 weight
    assert requantize.peak_tensor_bytes > per_layer.peak_tensor_bytes


def test_requantize_is_a_qlora_load_path_and_leaves_the_training_step_alone():
    """The load path changes the load phase only: the training moments of the same setup are the same."""
    requantize = vramcalc.estimate("llama-3.2-1b", load="requantize", **{**_TT01_ROW, "batch_size": 8})
    per_layer = vramcalc.estimate("llama-3.2-1b", load="per-layer", **{**_TT01_ROW, "batch_size": 8})
    if requantize.phase != "load":
        assert requantize.peak_tensor_bytes == per_layer.peak_tensor_bytes
    lora = vramcalc.estimate("llama-2-7b", load="requantize", **{**_TT01_ROW, "method": "lora"})
    assert lora.phase != "load"  # nothing is quantized: each tensor is read into its place


def test_trl_with_vramcalcs_selective_policy_is_refused_since_trl_selects_otherwise():
    # trl/models/selective_activation_checkpointing.py:51 keeps attention outputs only; the trace refuses it too
    with pytest.raises(VramcalcError, match="TRL's own selective checkpointing"):
        vramcalc.estimate(MODEL, method="lora", stack="trl", grad_ckpt="selective")


@pytest.mark.parametrize("method, loss, num_gpus, compiled", [
    ("full", "hf", 1, False),  # full_finetune_single_device.py:291-292 @1814feb17 drops compile_loss's result
    ("lora", "hf", 2, False),  # lora_finetune_distributed.py:302 @1814feb17 likewise
    ("lora", "hf", 1, True),  # lora_finetune_single_device.py:296 keeps it: self._loss_fn = training.compile_loss(...)
    ("full", "torchtune", 1, True),  # CEWithChunkedOutputLoss is compiled in place (training/_compile.py:76-79)
])
def test_torchtune_compiles_a_plain_loss_only_where_its_recipe_keeps_the_compiled_module(method, loss, num_gpus,
                                                                                        compiled):
    options = dict(method=method, stack="torchtune", compile=True, loss=loss, num_gpus=num_gpus,
                   sharding="fsdp" if num_gpus > 1 else "none")
    result = vramcalc.estimate(MODEL, **options)
    assert result.inputs["compile_loss"] is compiled
    assert result.inputs["origins"]["compile_loss"].startswith("stack torchtune" if not compiled else "default")
    # the user's word wins; an eager loss keeps the fp32 log_softmax the compiled one recomputes
    forced = vramcalc.estimate(MODEL, compile_loss=True, **options)
    assert forced.inputs["compile_loss"] is True and forced.inputs["origins"]["compile_loss"] == "user"
    if not compiled:
        assert forced.terms()["logits"] < result.terms()["logits"]
