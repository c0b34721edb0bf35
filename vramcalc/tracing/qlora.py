"""QLoRA base layers for the trace: bitsandbytes' own quantization and matmul on fake tensors.

bitsandbytes' ``Params4bit`` cannot wrap a FakeTensor (``Tensor._make_subclass`` refuses a tensor that is already a
subclass), so ``FakeLinear4bit`` is a ``bnb.nn.Linear4bit`` whose weight is a plain frozen Parameter carrying the
same attributes. Everything that allocates is bitsandbytes' own code: ``bnb.functional.quantize_4bit`` makes the packed
uint8 weight, the absmax and the double-quantization state (its fake kernels give the exact shapes);
``Linear4bit.forward`` and ``MatMul4Bit`` run unchanged, and peft wraps the layer with its own bnb LoRA layer because
it is an ``isinstance`` of ``bnb.nn.Linear4bit``. The layer is assembled on the meta device (peft wraps it there too) and materialised with the model. The one CUDA
effect that fake kernels cannot show, the dequantized
weight that the CUDA ``gemm_4bit`` kernel allocates above 1536 tokens, is added by ``cuda_emulation.cuda_kernel_emulation``.
``tests/test_trace_qlora.py`` checks this layer against a real ``bnb.nn.Linear4bit`` on real CPU tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from ..training_setup import TrainingSetup

from ..facts import BNB_BLOCKSIZE  # bitsandbytes quantize_4bit default blocksize


def _bnb():
    import bitsandbytes as bnb

    # quantize_blockwise builds its "dynamic" code table with .tolist(): build it once on real CPU tensors
    # before any fake tensor reaches it.
    functional = bnb.functional
    if "dynamic" not in functional.name2qmap:
        with torch.device("cpu"):
            functional.name2qmap["dynamic"] = functional.create_dynamic_map()
    return bnb


def _meta_like(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta") if isinstance(t, torch.Tensor) else t


def _quantized_template(shape: tuple[int, int], dtype: torch.dtype, quant_type: str, double_quant: bool):
    """bitsandbytes' own ``quantize_4bit`` run on a fake tensor of the weight's shape: the packed weight and the
    QuantState (absmax, double-quantization state, code, offset) with their exact shapes and dtypes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.device("cpu"):  # the model itself is being built under torch.device("meta")
        bnb = _bnb()
        with FakeTensorMode(allow_non_fake_inputs=True):
            return bnb.functional.quantize_4bit(
                    torch.empty(shape, dtype=dtype),
                blocksize=BNB_BLOCKSIZE,
                compress_statistics=double_quant,
                quant_type=quant_type,
            )


def _meta_quant_state(template):
    """A fresh QuantState with meta tensors shaped like the template's (each layer owns its own)."""
    import copy

    state = copy.copy(template)
    state.absmax, state.code, state.offset = _meta_like(template.absmax), _meta_like(template.code), _meta_like(template.offset)
    if template.state2 is not None:
        state.state2 = copy.copy(template.state2)
        state.state2.absmax, state.state2.code = _meta_like(template.state2.absmax), _meta_like(template.state2.code)
    return state


def fake_linear4bit_class():
    bnb = _bnb()

    class FakeLinear4bit(bnb.nn.Linear4bit):
        """A Linear4bit standing where an nn.Linear was, with bitsandbytes' packed weight and quantization state."""

        def __init__(self, linear: nn.Linear, template, quant_type: str, double_quant: bool, compute_dtype: torch.dtype):
            nn.Module.__init__(self)
            self.in_features = linear.in_features
            self.out_features = linear.out_features
            packed, template_state = template
            weight = nn.Parameter(_meta_like(packed), requires_grad=False)
            weight.quant_state = _meta_quant_state(template_state)
            weight.quant_type = quant_type
            weight.compress_statistics = double_quant
            weight.blocksize = BNB_BLOCKSIZE
            weight.bnb_quantized = True
            self.weight = weight
            self.bias = linear.bias
            if self.bias is not None:
                self.bias.requires_grad_(False)
            self.compute_dtype = compute_dtype
            self.compute_type_is_set = False
            self.quant_state = weight.quant_state
            self.quant_storage = torch.uint8
            self.support_avx512bf16_for_cpu = False

    return FakeLinear4bit


def quantize_linears(model: nn.Module, setup: TrainingSetup) -> None:
    """Replace every nn.Linear but the output embedding (on the meta device), as
    ``integrations/bitsandbytes.py::replace_with_bnb_linear`` does (``type(module) is nn.Linear``;
    ``get_keys_to_not_convert`` keeps lm_head). v5's 3-D expert tensors are not nn.Linear and stay in the load dtype
    (bitsandbytes issue #1849)."""
    linear4bit = fake_linear4bit_class()
    output = model.get_output_embeddings()
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[setup.compute_dtype.value]
    replacements = []
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if type(child) is nn.Linear and child is not output:
                replacements.append((parent, child_name, child))
    templates = {}
    for parent, child_name, child in replacements:
        key = (tuple(child.weight.shape), child.weight.dtype)
        if key not in templates:
            templates[key] = _quantized_template(key[0], key[1], setup.quant.value, setup.double_quant)
        layer = linear4bit(child, templates[key], setup.quant.value, setup.double_quant, compute_dtype)
        setattr(parent, child_name, layer)


def materialise_quant_states(model: nn.Module, device: str = "cpu") -> None:
    """``to_empty`` makes new weight Parameters (without bitsandbytes' attributes) and leaves the quantization state,
    a plain attribute, on the meta device: re-create the state on the CPU (fake inside a FakeTensorMode) and hang it
    on the new weight again."""

    def moved(t):
        return torch.empty_like(t, device=device) if isinstance(t, torch.Tensor) and t.device.type == "meta" else t

    for module in model.modules():
        state = getattr(module, "quant_state", None)
        if state is None or not isinstance(module, _bnb().nn.Linear4bit):
            continue
        state.absmax, state.code, state.offset = moved(state.absmax), moved(state.code), moved(state.offset)
        if state.state2 is not None:
            state.state2.absmax, state.state2.code = moved(state.state2.absmax), moved(state.state2.code)
        weight = module.weight
        weight.quant_state = state
        weight.quant_type = state.quant_type
        weight.compress_statistics = state.state2 is not None
        weight.blocksize = BNB_BLOCKSIZE
        weight.bnb_quantized = True


def quant_state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """absmax, double-quantization state, code and offset of every 4-bit weight: weights' metadata."""
    tensors = []
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None:
            continue
        for value in (state.absmax, state.code, state.offset):
            if isinstance(value, torch.Tensor):
                tensors.append(value)
        if state.state2 is not None:
            tensors += [t for t in (state.state2.absmax, state.state2.code) if isinstance(t, torch.Tensor)]
    return tensors
