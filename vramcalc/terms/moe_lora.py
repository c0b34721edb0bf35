"""peft 0.21's LoRA target conversion for MoE models whose experts transformers v5 fused into 3-D parameters.

``BaseTuner.inject_adapter`` (peft/tuners/tuners_utils.py L832-849) calls ``convert_peft_config_for_transformers``
on every transformers v5 model; ``_convert_peft_config_moe`` (peft/utils/transformers_weight_conversion.py
L402-482) rewrites the LoRA config of the model types that ``_MODEL_TO_CONVERSION_PATTERN`` maps to ``qwen2_moe``
(transformers 5.25 conversion_mapping.py: qwen3_moe, deepseek_v2, deepseek_v3, ...; ``qwen2_moe`` itself is not a
key) or to ``mixtral`` (peft adds ``mixtral`` itself, transformers_weight_conversion.py L45). Each target name that
equals or ends with ``.<old>`` for an ``old`` of ``_MOE_TARGET_MODULE_MAPPING`` (L332-345) is removed from
target_modules and its new name added to target_parameters: gate_proj/up_proj (mixtral w1/w3) -> the experts'
``gate_up_proj``, down_proj (w2) -> ``down_proj``, ``gate`` -> the router's ``gate.weight``. So the dense MLP
layers and the shared experts lose the adapters of those names. A string target_modules is resolved first
(``_resolve_string_target_modules``, L355-399): ``all-linear`` to the nn.Linear leaf names plus every key of the
mapping, so LoRA all-linear adapts the experts and the router (``training_setup._lora_modules``).
``_MOE_FUSED_TARGETS`` (L348-352): gate and up must be targeted together (else ValueError) and ``gate_up_proj`` then
gets rank 2r and alpha 2·alpha (``rank_pattern``, ``alpha_pattern``).

Adapter shapes (peft/tuners/lora/layer.py ``ParamWrapper._get_in_out_features`` L2386-2410 and ``update_layer``
L2430-2450): a 3-D parameter [E, d1, d2] (not ``is_transposed``) is read as in = d2, out = d1 after the swap, and
gets lora_A = Linear(in, r·E) -> weight [r·E, in] and lora_B = Linear(r·E, out) -> weight [out, r·E]; a 2-D
parameter [out, in] (the router) is one expert: A [r, in], B [out, r].
"""

from __future__ import annotations

from typing import NamedTuple

from ..errors import VramcalcError
from ..model import ModelSpec

_QWEN2_MOE = {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}
_MIXTRAL = {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"}
# vramcalc's families among transformers 5.25 ``_MODEL_TO_CONVERSION_PATTERN`` values qwen2_moe / mixtral, plus
# peft's own ``mixtral`` entry: peft ``_MOE_TARGET_MODULE_MAPPING`` of the pattern each maps to
CONVERTED: dict[str, dict[str, str]] = {"qwen3_moe": _QWEN2_MOE, "deepseek_v2": _QWEN2_MOE,
                                        "deepseek_v3": _QWEN2_MOE, "mixtral": _MIXTRAL}
# peft ``_MOE_FUSED_TARGETS``: the old names fused into one parameter (rank and alpha times their number)
_FUSED = {"qwen3_moe": ("gate_proj", "up_proj"), "deepseek_v2": ("gate_proj", "up_proj"),
          "deepseek_v3": ("gate_proj", "up_proj"), "mixtral": ("w1", "w3")}


def _mapped(family: str, target: str) -> str | None:
    """The v5 parameter a target name moves to (``target == old or target.endswith('.' + old)``), else None."""
    for old, new in CONVERTED.get(family, {}).items():
        if target == old or target.endswith(f".{old}"):
            return new
    return None


def old_names(family: str) -> tuple[str, ...]:
    """The v4 names a converted family accepts as LoRA targets though no v5 nn.Linear carries them."""
    return tuple(CONVERTED.get(family, {}))


def linear_targets(family: str, lora_modules: tuple[str, ...]) -> tuple[str, ...]:
    """The target_modules left after the conversion: the nn.Linear (and lm_head/embed_tokens) targets peft adapts."""
    return tuple(name for name in lora_modules if _mapped(family, name) is None)


def target_parameters(family: str, lora_modules: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """peft's new target_parameters with each one's rank multiplier: (``gate_up_proj``, 2) when gate and up are both
    targeted, (``down_proj``, 1), (``gate.weight``, 1). Raises as peft does when only one of a fused pair is named."""
    if family not in CONVERTED:
        return ()
    old = {name.rsplit(".", 1)[-1] for name in lora_modules if _mapped(family, name) is not None}
    new = {CONVERTED[family][name] for name in old}
    fused = _FUSED[family]
    present = [name for name in fused if name in old]
    if 0 < len(present) < len(fused):
        missing = ", ".join(name for name in fused if name not in old)
        raise VramcalcError(f"peft cannot convert LoRA target {', '.join(present)} of {family} without {missing}: "
                            f"they are fused into the experts' gate_up_proj (peft transformers_weight_conversion.py "
                            f"L466-472); target both or neither")
    order = ("gate.weight", "gate_up_proj", "down_proj")
    return tuple((name, len(fused) if name == "gate_up_proj" else 1) for name in order if name in new)


def expert_adapter_shapes(model: ModelSpec, lora_modules: tuple[str, ...],
                          rank: int) -> tuple[tuple[str, tuple[int, int], tuple[int, int]], ...]:
    """(parameter, lora_A shape, lora_B shape) per MoE layer for each converted target parameter (module docstring):
    gate_up_proj [E, 2·I_m, h]: A [2r·E, h], B [2·I_m, 2r·E]; down_proj [E, h, I_m]: A [r·E, I_m], B [h, r·E];
    the router gate.weight [E, h]: A [r, h], B [E, r]."""
    E, h, I_m = model.num_experts, model.hidden_size, model.expert_width
    out = []
    for name, times in target_parameters(model.family, lora_modules):
        r = rank * times
        if name == "gate.weight":
            out.append((name, (r, h), (E, r)))
        elif name == "gate_up_proj":
            out.append((name, (r * E, h), (2 * I_m, r * E)))
        else:
            out.append((name, (r * E, I_m), (h, r * E)))
    return tuple(out)


class WrapperSaved(NamedTuple):
    per_token: int  # bytes per token (summed over the K slots)
    per_layer: int  # bytes per MoE layer


def ungraded_routing_saved_per_slot(expert_bytes: int, act_widths: int) -> int:
    """Bytes per routed slot that ``grouped_mm_experts_forward`` saves with LoRA'd experts when the layer's input
    needs no gradient (measured with saved-tensor hooks on tiny qwen3_moe, layer 0): the gate_up output and act's
    output (``act_widths``·``expert_bytes``, as in a graded layer), the int64 sort permutation (8) and the routing
    weights [S, 1] saved by ``proj_out * sample_weights`` (``expert_bytes``); not the down output (the routing
    weights need no gradient), not the router's scores (its input needs none)."""
    return act_widths * expert_bytes + 8 + expert_bytes


def param_wrapper_saved(model: ModelSpec, lora_experts: tuple[str, ...], weight_bytes: int, expert_bytes: int,
                        input_grad: bool = True) -> WrapperSaved:
    """What one MoE layer saves for backward beyond the frozen experts when peft's ParamWrapper adapts them.

    ``ParamWrapper._activate_lora`` (peft/tuners/lora/layer.py L2524-2548) registers ``_LoraFactorsProxy``
    (L2305-2323) as a torch parametrization for the experts' forward: ``W' = baddbmm(W, lhs, rhs, alpha=scaling)``,
    a new tensor of W's shape and dtype (``weight_bytes``), computed once under ``parametrize.cached()``. The grouped
    matmul (``integrations/moe.py::grouped_mm_experts_forward``) saves W' for its input gradient (gate_up_proj's
    only when the layer's input needs one, ``input_grad``), and since W' now requires grad also its input for W''s
    gradient: per slot the gathered input (``expert_bytes``·h) for gate_up_proj, the act·up product
    (``expert_bytes``·I_m) for down_proj, the same tensors full fine-tuning saves. baddbmm saves lhs and rhs:
    views of the adapter weights when they share W's dtype, else their ``.to(W.dtype)`` copies, one per adapter
    weight for the whole step: ``temporaries.weight_copy_bytes`` counts those already (as the trace does).
    Per layer: ``weight_bytes``·E·2·I_m·h (gate_up_proj) + ``weight_bytes``·E·h·I_m (down_proj);
    per token: K·``expert_bytes``·(h + I_m). Checked with saved-tensor hooks on tiny qwen3_moe (bf16, r=8, 512
    tokens): 1,900,544 bytes per graded layer beyond the frozen experts' saves (+159,744 of fp32 adapters' bf16
    factor copies), and in layer 0 (input needs no gradient) no gate_up W'. The router's 2-D wrapper
    (``gate.weight``) is not counted here: it makes the router train, whose saved input ``activations._moe`` counts."""
    E, K, h, I_m = model.num_experts, model.experts_per_token, model.hidden_size, model.expert_width
    per_token = per_layer = 0
    if "gate_up_proj" in lora_experts:
        per_token += K * expert_bytes * h
        per_layer += weight_bytes * E * 2 * I_m * h if input_grad else 0
    if "down_proj" in lora_experts:
        per_token += K * expert_bytes * I_m
        per_layer += weight_bytes * E * h * I_m
    return WrapperSaved(per_token, per_layer)


def first_graded_layer(model: ModelSpec, lora_experts: tuple[str, ...], linear_targets: tuple[str, ...]) -> int:
    """The first decoder layer whose input needs a gradient is 0 but for experts-only LoRA: with the experts adapted
    (``lora_experts``) and no decoder Linear left in the targets (``linear_targets``: lm_head does not count, the
    embedding's adapter does), autograd records nothing before the first MoE layer's experts, so that layer and
    the ones before it run without a graded input (deepseek's ``first_k_dense_replace`` dense layers)."""
    if not lora_experts or any(name != "lm_head" for name in linear_targets):
        return 0
    return next((i for i in range(model.num_layers) if model.is_moe_layer(i)), 0)


_LANDING = {"gate_up_proj": "the experts' gate_up_proj", "down_proj": "the experts' down_proj",
            "gate.weight": "the router's gate.weight"}


def conversion_warning(model: ModelSpec, lora_modules: tuple[str, ...], rank: int) -> str | None:
    """One line for the user when peft moves LoRA targets of ``model`` onto its fused experts (module docstring), else
    None: which target names moved, onto which v5 parameter and at what rank (``gate_up_proj`` at ``2·rank``), and
    which nn.Linear layers of those names (deepseek's dense MLPs and shared experts) are left without an adapter.
    The estimate already counts what peft builds; the warning says why it differs from a per-Linear reading of the
    targets. Source: peft 0.21.2 ``_convert_peft_config_moe`` (peft/utils/transformers_weight_conversion.py
    L402-482), called for LoRA only (``convert_peft_config_for_transformers`` L494-496)."""
    moved = [name for name in lora_modules if _mapped(model.family, name) is not None]
    if not moved:
        return None
    times = dict(target_parameters(model.family, lora_modules))
    parts = []
    for parameter, count in times.items():
        names = ", ".join(name for name in moved if _mapped(model.family, name) == parameter)
        at_rank = f" at rank {rank * count} ({count}r)" if count > 1 else ""
        parts.append(f"{names} -> {_LANDING[parameter]}{at_rank}")
    linears = {module.name for module in model.inventory.linears}
    bare = [name for name in moved if name in linears]
    left = ("" if not bare else "; the nn.Linear layers of those names get no adapter" if bare == moved
            else f"; the nn.Linear layers {', '.join(bare)} get no adapter")
    onto = "fused experts and router" if "gate.weight" in times else "fused experts"
    return (f"peft 0.21 moves LoRA targets onto {model.family}'s {onto}: {'; '.join(parts)}{left} "
            f"(peft/utils/transformers_weight_conversion.py _convert_peft_config_moe); estimated as peft builds them")
