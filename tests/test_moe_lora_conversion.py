"""peft 0.21's LoRA target conversion for MoE models with fused experts (terms/moe_lora.py): gate/up/down_proj
(mixtral w1/w3/w2) leave target_modules for target_parameters on the 3-D experts, and the string ``all-linear`` is
resolved first to the nn.Linear names plus those (and the router ``gate``). The adapter count equals peft's
``get_nb_trainable_parameters`` on the meta-built tiny model given the user's targets (the literal string for
all-linear), and the estimate is within 3% of the trace."""

import json
import re

import pytest

from vramcalc.errors import VramcalcError
from vramcalc.estimator import estimate, step_moments
from vramcalc.terms.moe_lora import conversion_warning
from vramcalc.terms.parameters import stored_tensors
from vramcalc.training_setup import resolve_setup

from .cli_helpers import run_cli
from .conftest import needs_torch
from .test_families_moe_2026 import TINY as TINY_2026
from .tiny_models import TINY

SPECS = {**TINY, **TINY_2026}
TOLERANCE = 0.03
# (family, targets): experts only, and all-linear (attention Linears stay Linear targets; peft adds the experts and
# the router, _resolve_string_target_modules)
CASES = [("qwen3_moe", "gate_proj,up_proj,down_proj"), ("qwen3_moe", "all-linear"),
         ("deepseek_v2", "gate_proj,up_proj,down_proj"), ("deepseek_v2", "all-linear"),
         ("deepseek_v3", "gate_proj,up_proj,down_proj"), ("deepseek_v3", "all-linear"),
         ("mixtral", "w1,w2,w3"), ("mixtral", "q_proj,v_proj,gate,w1,w3,w2"), ("mixtral", "all-linear")]
IDS = [f"{family}-{targets}" for family, targets in CASES]


def _trainable(spec, resolved) -> int:
    return sum(t.numel * t.count for t in stored_tensors(spec, resolved) if t.trainable)


def _peft_model(family: str, targets: str, **lora):
    """Real peft on the meta-built tiny model, given the targets as the user writes them: the literal string
    ``all-linear`` (peft resolves it), else the list of names."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from vramcalc.tracing.build import hf_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(SPECS[family]))
    target_modules = targets if targets == "all-linear" else targets.split(",")
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=target_modules, **lora))


def test_converted_targets_leave_the_dense_and_shared_expert_linears():
    spec = SPECS["deepseek_v2"]
    names = {t.name for t in stored_tensors(spec, resolve_setup(spec, method="lora", lora_targets="all-linear"))
             if t.kind == "adapter"}
    assert not any(name.split(".lora_")[0].endswith(("gate_proj", "up_proj", "down_proj"))
                   and not name.startswith("mlp.experts.") for name in names)
    assert {"mlp.experts.gate_up_proj.lora_A", "mlp.experts.down_proj.lora_B", "q_b_proj.lora_A"} <= names


def test_the_fused_gate_up_adapter_has_twice_the_rank():
    spec = SPECS["qwen3_moe"]
    tensors = {t.name: t for t in stored_tensors(spec, resolve_setup(spec, method="lora", lora_rank=8,
                                                                      lora_targets="gate_proj,up_proj,down_proj"))}
    E, h, I_m = spec.num_experts, spec.hidden_size, spec.expert_width
    assert tensors["mlp.experts.gate_up_proj.lora_A"].shape == (16 * E, h)
    assert tensors["mlp.experts.down_proj.lora_A"].shape == (8 * E, I_m)


def test_half_of_a_fused_pair_is_refused_as_peft_refuses_it():
    with pytest.raises(VramcalcError, match="gate_up_proj"):
        resolve_setup(SPECS["qwen3_moe"], method="lora", lora_targets="gate_proj,down_proj")


@pytest.mark.parametrize("options", [dict(method="dora"), dict(method="lora", lora_dropout=0.05)])
@pytest.mark.parametrize("family, targets", [("mixtral", "w1,w2,w3"), ("mixtral", "all-linear"),
                                             ("qwen3_moe", "all-linear")])
def test_what_peft_param_wrapper_refuses_is_refused(family, targets, options):
    with pytest.raises(VramcalcError, match="fused experts"):
        resolve_setup(SPECS[family], lora_targets=targets, **options)


@needs_torch
@pytest.mark.parametrize("lora", [dict(use_dora=True), dict(lora_dropout=0.05)], ids=["dora", "dropout"])
def test_peft_refuses_dora_and_dropout_for_all_linear_on_fused_experts(lora):
    with pytest.raises(ValueError, match="ParamWrapper does not work with"):
        _peft_model("qwen3_moe", "all-linear", **lora)


@pytest.mark.parametrize("stack, experts", [("hf", True), ("trl", True), ("axolotl", False),
                                           ("llama-factory", False), ("torchtune", False)])
def test_only_stacks_that_hand_peft_the_string_put_all_linear_on_the_experts(stack, experts):
    # axolotl, LLaMA-Factory expand all-linear to Linear leaf names first; torchtune has its own LoRA layers
    resolved = resolve_setup(SPECS["qwen3_moe"], method="lora", stack=stack, lora_targets="all-linear")
    assert ("gate" in resolved.lora_modules) is experts


def test_other_peft_methods_keep_all_linear_on_the_nn_linear_layers():
    spec = SPECS["qwen3_moe"]  # convert_peft_config_for_transformers converts LoRA configs only (L494-496)
    resolved = resolve_setup(spec, method="adalora", lora_targets="all-linear")
    assert resolved.lora_modules == ("q_proj", "k_proj", "v_proj", "o_proj")


def test_families_peft_does_not_convert_keep_linear_targets():
    spec = SPECS["qwen2_moe"]  # qwen2_moe is a pattern, not a key, of _MODEL_TO_CONVERSION_PATTERN
    names = {t.name for t in stored_tensors(spec, resolve_setup(spec, method="lora", lora_targets="all-linear"))}
    assert "gate_proj.lora_A" in names and not any(name.startswith("mlp.experts.") and "lora" in name
                                                   for name in names)


@needs_torch
@pytest.mark.parametrize("family, targets", CASES, ids=IDS)
def test_adapter_count_equals_peft_trainable_count_on_the_meta_model(family, targets):
    spec = SPECS[family]
    resolved = resolve_setup(spec, method="lora", lora_targets=targets, lora_rank=8)
    assert _trainable(spec, resolved) == _peft_model(family, targets).get_nb_trainable_parameters()[0]


@needs_torch
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v2"])
def test_all_linear_trains_the_experts_and_router_as_peft_resolves_the_string(family):
    spec = SPECS[family]
    resolved = resolve_setup(spec, method="lora", lora_targets="all-linear", lora_rank=8)
    peft_model = _peft_model(family, "all-linear")
    converted = peft_model.peft_config["default"]
    assert set(converted.target_parameters) == {"gate.weight", "gate_up_proj", "down_proj"}
    assert _trainable(spec, resolved) == peft_model.get_nb_trainable_parameters()[0]
    assert any("fused experts and router" in text for text in resolved.warnings)


def _named(name: str, text: str) -> bool:
    """``name`` appears in ``text`` as a whole target name (``up_proj`` not inside ``gate_up_proj``)."""
    return re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", text) is not None


@needs_torch
@pytest.mark.parametrize("family, targets", CASES, ids=IDS)
def test_the_warning_names_the_targets_peft_moves_and_where_to(family, targets):
    spec = SPECS[family]
    resolved = resolve_setup(spec, method="lora", lora_targets=targets, lora_rank=8)
    # after peft's convert_peft_config_for_transformers (all-linear: the literal string, resolved by peft)
    converted = _peft_model(family, targets).peft_config["default"]
    moved = set(resolved.lora_modules) - set(converted.target_modules)
    warnings = [text for text in resolved.warnings if text.startswith("peft 0.21 moves LoRA targets")]
    assert len(warnings) == (1 if moved else 0)
    if not moved:
        return
    listed = warnings[0].split(": ", 1)[1].split(" (peft/")[0].split("; the nn.Linear")[0]
    assert all(_named(name, listed) for name in moved)
    assert not any(_named(name, listed) for name in converted.target_modules)
    assert all(_named(name, listed) for name in converted.target_parameters)


@pytest.mark.parametrize("family, targets", [("llama", "all-linear"), ("llama", "gate_proj,up_proj,down_proj"),
                                             ("qwen3_moe", "q_proj,k_proj,v_proj,o_proj"), ("qwen3_moe", "qv"),
                                             ("deepseek_v2", "qv"), ("qwen2_moe", "all-linear")])
def test_no_conversion_warning_when_peft_moves_nothing(family, targets):
    resolved = resolve_setup(SPECS[family], method="lora", lora_targets=targets)
    assert conversion_warning(SPECS[family], resolved.lora_modules, 8) is None
    assert not any("fused experts" in text for text in resolved.warnings)


def test_the_warning_says_which_linears_lose_their_adapter():
    spec = SPECS["deepseek_v2"]  # a dense first layer and shared experts: nn.Linear gate/up/down_proj peft skips
    (warning,) = [text for text in resolve_setup(spec, method="lora", lora_targets="all-linear").warnings
                  if "fused experts" in text]
    assert "gate_up_proj at rank 16 (2r)" in warning and "gate -> the router's gate.weight" in warning
    assert "the nn.Linear layers gate_proj, up_proj, down_proj, shared_experts.gate_proj" in warning  # not the router


def test_the_estimate_carries_the_conversion_warning():
    result = estimate(SPECS["mixtral"], method="lora", lora_targets="w1,w2,w3")
    assert any("mixtral's fused experts" in text for text in result.warnings)
    assert result.warnings == tuple(result.to_dict()["warnings"])


def test_the_cli_prints_the_conversion_warning(capsys):
    code, out, err = run_cli(capsys, "estimate", "qwen3-30b-a3b", "--method", "lora", "--lora-targets",
                             "gate_proj,up_proj,down_proj", "--format", "json")
    assert code == 0
    assert err.startswith("warning: peft 0.21 moves LoRA targets onto qwen3_moe's fused experts: gate_proj, up_proj ->")
    assert any("qwen3_moe's fused experts" in text for text in json.loads(out)["warnings"])


TRACE_CASES = [(family, dict(lora_targets=targets)) for family, targets in CASES
               if targets != "q_proj,v_proj,gate,w1,w3,w2"]
TRACE_CASES += [("qwen3_moe", dict(lora_targets="gate_proj,up_proj,down_proj", precision="mixed-bf16")),
                ("qwen3_moe", dict(lora_targets="gate_proj,up_proj,down_proj", grad_ckpt=True)),
                ("deepseek_v3", dict(lora_targets="all-linear", method="qlora"))]


@needs_torch
@pytest.mark.trace
@pytest.mark.parametrize("family, options", TRACE_CASES,
                         ids=[f"{family}-{'-'.join(f'{k}={v}' for k, v in options.items())}"
                              for family, options in TRACE_CASES])
def test_estimated_peak_is_within_3_percent_of_the_trace(family, options):
    from vramcalc.tracing.runner import run_trace

    spec = SPECS[family]
    resolved = resolve_setup(spec, **{"method": "lora", "seq_len": 128, **options})
    estimated = max(m.tensor_bytes for m in step_moments(spec, resolved))
    traced = sum(run_trace(spec, resolved, progress=False).terms.values())
    assert abs(estimated - traced) / traced < TOLERANCE, (estimated, traced)


@needs_torch
def test_llama4_all_linear_is_estimated_for_its_linears_and_warns_that_peft_wraps_the_router():
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear
    from transformers import AutoModelForCausalLM

    from vramcalc.tracing.build import hf_config

    spec = SPECS["llama4_text"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(spec))
    wrapped = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    assert any(name.endswith("feed_forward.router") and isinstance(module, LoraLinear)
               for name, module in wrapped.named_modules())  # Llama4Router is an nn.Linear returning a tuple
    resolved = resolve_setup(spec, method="lora", lora_targets="all-linear")
    assert "router" not in resolved.lora_modules
    assert any("Llama4Router" in text and "--lora-targets q_proj," in text for text in resolved.warnings)
