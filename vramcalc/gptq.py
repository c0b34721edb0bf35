"""``--quant int4-gptq``: LoRA on a GPTQ int4 checkpoint (auto-gptq's QuantLinear), the options and what is modelled.

The setup is QwenLM/Qwen ``finetune.py``'s Q-LoRA (Qwen@e8e15962 ``finetune.py``: ``GPTQConfig(bits=4,
disable_exllama=True)``, ``torch_dtype`` fp16 or bf16, ``prepare_model_for_kbit_training``, gradient checkpointing):
transformers + optimum + auto-gptq load the checkpoint already quantized into auto-gptq's ``QuantLinear`` (memory
terms: ``terms/gptq.py``; trace: ``tracing/gptq.py``). ``--gptq-group-size`` is ``GPTQConfig(group_size=)``
(default 128; -1 one group per input column), ``--gptq-desc-act`` is ``desc_act`` (act-order checkpoints, which
select auto-gptq's ``qlinear_cuda`` instead of ``qlinear_cuda_old``: a larger dequantization transient).
``--gptq-kernel triton-v2`` is fms-acceleration's ``accelerated-peft-autogptq`` plugin (gptqmodel's ``tritonv2``
QuantLinear, ``options.GptqKernel``), which also runs under FSDP (``terms/gptq.py``, FSDP); estimate only: its
Triton kernel does not run on the trace's CPU tensors.

Standard library only (imported by ``training_setup``).
"""

from __future__ import annotations

from typing import NamedTuple

from .errors import VramcalcError
from .model import ModelSpec, ParamKind
from .options import GptqKernel, Method, Precision, Quant, Sharding, Stack, Task

GPTQ_DEFAULT_GROUP_SIZE = 128  # transformers GPTQConfig(group_size=128) (utils/quantization_config.py)
# precisions whose load dtype is the compute dtype: the dequantized weight (``scales``' dtype, the load dtype:
# optimum ``quantizer.py:289`` ``weight_dtype=layer.weight.dtype``) meets an input of the same dtype in
# ``torch.matmul``; under ``mixed-*`` the fp32-loaded scales would dequantize to fp32 and autocast copy them again
GPTQ_PRECISIONS = (Precision.FP16, Precision.BF16, Precision.BF16_TRUE, Precision.FP16_TRUE)


def is_gptq(setup) -> bool:
    """Whether the setup's base is a GPTQ checkpoint."""
    return getattr(setup, "quant", None) is Quant.INT4_GPTQ


def saves_dequantized(setup) -> bool:
    """Whether the GPTQ QuantLinear's matmul saves its dequantized weight for backward (auto-gptq's cuda-old torch
    path, ``torch.matmul``); the triton-v2 kernel's autograd function saves only the packed buffers
    (``options.GptqKernel``)."""
    return is_gptq(setup) and getattr(setup, "gptq_kernel", GptqKernel.CUDA_OLD) is GptqKernel.CUDA_OLD


def group_size(value) -> int:
    """``--gptq-group-size``: a positive number of input rows per quantization group, or -1 (one group)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise VramcalcError(f"--gptq-group-size must be a positive integer or -1, not {value!r}") from None
    if isinstance(value, bool) or str(value).strip() not in (str(number), f"+{number}") or not (number >= 1 or number == -1):
        raise VramcalcError(f"--gptq-group-size must be a positive integer or -1, not {value!r}")
    return number


def check_setup(setup) -> None:
    """One-line errors for what ``--quant int4-gptq`` does not model (or what GPTQ cannot do)."""
    if not is_gptq(setup):
        if setup.method is Method.QLORA and (setup.gptq_group_size != GPTQ_DEFAULT_GROUP_SIZE or setup.gptq_desc_act
                                             or setup.gptq_kernel is not GptqKernel.CUDA_OLD):
            raise VramcalcError("--gptq-group-size, --gptq-desc-act and --gptq-kernel apply to --quant int4-gptq only")
        return
    if setup.method is not Method.QLORA:
        raise VramcalcError(f"--quant int4-gptq is modelled with --method qlora (peft's GPTQ LoRA layer), not "
                            f"--method {setup.method.value}: a GPTQ base cannot be fully fine-tuned and peft's "
                            "GPTQLoraLinear supports neither DoRA nor other methods")
    if setup.precision not in GPTQ_PRECISIONS:
        raise VramcalcError(f"--quant int4-gptq with --precision {setup.precision.value}: a GPTQ model is loaded in "
                            "16 bits (its scales in the load dtype; peft's prepare_model_for_kbit_training casts "
                            "nothing to fp32 for GPTQ); use --precision fp16 (Qwen's Q-LoRA), bf16 or bf16-true")
    given = []
    if setup.quantize_lm_head:
        given.append("--quantize-lm-head (optimum quantizes the decoder blocks only)")
    if setup.quant_saves_input:
        given.append("--quant-saves-input (a bitsandbytes knob)")
    if getattr(setup.quant_state_dtype, "value", "auto") != "auto":
        given.append("--quant-state-dtype (a bitsandbytes knob)")
    if getattr(setup.quant_storage, "value", "uint8") != "uint8":
        given.append("--quant-storage (a bitsandbytes knob)")
    # DDP and ZeRO-1/2 replicate the frozen base and shard only the adapters' states (the QuantLinear buffers are
    # buffers, not parameters); FSDP shards qweight and qzeros as fms-acceleration's autogptq plugin registers them
    # (terms/gptq.py, FSDP); ZeRO-3 would partition them otherwise (not modelled)
    if setup.sharding is Sharding.ZERO3 or setup.tp > 1 or setup.cp > 1 or setup.ep > 1:
        given.append("--sharding zero3, --tp, --cp or --ep")
    if setup.sharding is Sharding.FSDP and getattr(setup.offload, "value", "none") != "none":
        given.append("--sharding fsdp with --offload")
    if setup.sharding is Sharding.FSDP and setup.gptq_kernel is not GptqKernel.TRITON_V2:
        given.append("--sharding fsdp with --gptq-kernel cuda-old (FSDP is modelled as fms-acceleration's plugin "
                     "registers the triton-v2 QuantLinear's qweight and qzeros: --gptq-kernel triton-v2)")
    if getattr(setup.device_map, "value", "none") != "none":
        given.append("--device-map")
    if setup.stack is not Stack.HF:
        given.append(f"--stack {setup.stack.value}")
    if setup.task is not Task.SFT:
        given.append(f"--task {setup.task.value}")
    if setup.compile or setup.activation_offload or setup.optimizer_in_backward or setup.packing:
        given.append("--compile, --activation-offload, --optimizer-in-backward or --packing")
    if getattr(setup.kernels, "value", "none") != "none":
        given.append(f"--kernels {setup.kernels.value}")
    if setup.grad_ckpt.caches_ops:
        given.append(f"--grad-ckpt {setup.grad_ckpt.value}")
    if given:
        raise VramcalcError(f"--quant int4-gptq is modelled with the hf stack, --task sft and DDP, ZeRO-1/2 or FSDP; "
                            f"not with {given[0]}")


def check_packable(model: ModelSpec, group_size: int) -> None:
    """auto-gptq packs 8 weights per int32 and regroups ``weight.reshape(-1, g, out)`` (``qlinear_cuda_old.py:52,
    59,316``): every quantized Linear needs in and out multiples of 32 and in a multiple of g. A mixture of experts
    is modelled as a GPTQ checkpoint of transformers 4.x's per-expert Linears (``terms/gptq.py``, Mixture of
    experts) when every decoder layer routes its tokens to experts (no dense layers, no dense experts such as
    Llama-4's, which 4.x did not build as per-expert Linears). Checked once, when the setup is resolved."""
    linears = [(m.name, m.in_features, m.out_features) for m in model.inventory.linears]
    if model.is_moe:
        if model.traits.dense_experts or model.num_dense_layers:
            raise VramcalcError(f"--quant int4-gptq is modelled for dense models and for mixtures of experts whose "
                                f"every layer routes to per-expert Linears; {model.name} has dense layers or dense "
                                "experts")
        linears += [(e.name, e.in_features, e.out_features) for e in moe_expert_linears(model)]
    for name, in_features, out_features in linears:
        g = in_features if group_size == -1 else group_size
        if in_features % 32 or out_features % 32 or in_features % g:
            raise VramcalcError(f"--quant int4-gptq: {name} of {model.name} ({in_features} -> "
                                f"{out_features}) cannot be packed with group size {group_size} (auto-gptq "
                                "needs in and out multiples of 32 and in a multiple of the group size)")


def expert_linears(name: str, shape: tuple[int, ...]) -> tuple[tuple[str, tuple[int, int], int], ...]:
    """The per-expert QuantLinears (name, (out, in), Linears per layer) of one v5 expert tensor [E, out, in]
    (``terms/gptq.py`` module docstring, Mixture of experts): a fused ``gate_up_proj`` [E, 2I, h] is w1 and w3,
    2E Linears [I, h]."""
    experts, out_features, in_features = shape
    if name.endswith("gate_up_proj"):
        return ((name, (out_features // 2, in_features), 2 * experts),)
    return ((name, (out_features, in_features), experts),)


class ExpertLinear(NamedTuple):
    """One per-expert QuantLinear shape of a MoE layer (``moe_expert_linears``)."""

    name: str  # the v5 expert tensor it comes from: ``mlp.experts.gate_up_proj`` or ``mlp.experts.down_proj``
    in_features: int
    out_features: int
    per_layer: int  # Linears of this shape per MoE layer

    @property
    def is_down(self) -> bool:
        return self.name.endswith("down_proj")


def moe_expert_linears(model: ModelSpec) -> tuple[ExpertLinear, ...]:
    """Every per-expert QuantLinear of ``model`` (``expert_linears``), named by its expert tensor."""
    out = []
    for tensor in model.inventory.tensors:
        if tensor.kind is ParamKind.EXPERTS and len(tensor.shape) == 3:
            for name, (o, i), per_layer in expert_linears(tensor.name, tensor.shape):
                out.append(ExpertLinear(name, i, o, per_layer))
    return tuple(out)
