"""QLoRA base layers for the trace: bitsandbytes' own quantization and matmul on fake tensors.

bitsandbytes' ``Params4bit`` cannot wrap a FakeTensor (``Tensor._make_subclass`` refuses a tensor that is already a
subclass), so ``FakeLinear4bit`` is a ``bnb.nn.Linear4bit`` whose weight is a plain frozen Parameter carrying the
same attributes. Everything that allocates is bitsandbytes' own code: ``bnb.functional.quantize_4bit`` makes the packed
uint8 weight, the absmax and the double-quantization state (its fake kernels give the exact shapes);
``Linear4bit.forward`` and ``MatMul4Bit`` run unchanged. peft wraps the layer with its own bnb LoRA layer only when
the model is marked as loaded in 4 or 8 bits, which the trace does under ``kbit_prep``; otherwise peft's generic
LoRA wrapper is used (the difference is a transient output copy, not saved memory). The layer is assembled on the meta
device (peft wraps it there too) and materialised with the model. The one CUDA effect that fake kernels cannot show,
the dequantized weight that the CUDA ``gemm_4bit`` kernel allocates above 1536 tokens, is added by
``cuda_emulation.cuda_kernel_emulation``.
``tests/test_trace_qlora.py`` checks this layer against a real ``bnb.nn.Linear4bit`` on real CPU tensors.

Issue 11 knobs, each with the real bitsandbytes code:
- ``quant_state_dtype``: the weight is quantized from a tensor of that dtype, so the QuantState records it and
  ``dequantize_4bit`` returns it (bitsandbytes' own quantize_4bit on a fake tensor of that dtype);
- ``quant_storage``: the dtype the codes are packed in (bitsandbytes' own ``quantize_4bit(quant_storage=)``); bf16
  lets FSDP2 shard the packed weight (``tracing/distributed.py``), whose layer then re-attaches its quantization state;
- ``quantize_lm_head``: lm_head is replaced too (Lightning's plugin replaces every ``torch.nn.Linear``);
- ``quant_saves_input`` (VERSION EMULATION of bitsandbytes <= 0.43): ``MatMul4BitHoldingInput`` runs 0.50.2's own
  ``MatMul4Bit`` and then keeps the input the way 0.43.1 did, ``ctx.tensors = (A, B)``
  (bitsandbytes 0.43.1 ``bitsandbytes/autograd/_functions.py:516``); nothing else of the old version is reproduced;
- ``quant=int8`` (LLM.int8, ``load_in_8bit``): ``FakeLinear8bitLt`` is a ``bnb.nn.Linear8bitLt`` with an int8 weight
  and fp32 SCB whose forward takes the CUDA route, ``MatMul8bitLt`` (on CPU ``bnb.matmul`` picks ``MatMul8bitFp``),
  with ``llm_int8_threshold=6.0``. Two CUDA kernels are emulated (fake tensors have no values, so their
  data-dependent outlier count cannot exist): ``int8_vectorwise_quant`` allocates what the CUDA kernel does
  (``backends/cuda/ops.py``: row stats, int8 rows, ``A.abs() >= threshold``) and finds no outlier column;
  ``int8_mixed_scaled_mm`` then takes the default kernel's no-outlier path (an empty ``subA``, ``int8_scaled_mm``).
"""

from __future__ import annotations

import torch
from torch import nn

import contextlib
import logging
import sys

from torch.utils._python_dispatch import TorchDispatchMode

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


def _quantized_template(shape: tuple[int, int], dtype: torch.dtype, quant_type: str, double_quant: bool,
                        quant_storage: torch.dtype = torch.uint8):
    """bitsandbytes' own ``quantize_4bit`` run on a fake tensor of the weight's shape: the packed weight (in
    ``quant_storage``: ``[(n + 1) // (2·itemsize), 1]``) and the QuantState (absmax, double-quantization state,
    code, offset) with their exact shapes and dtypes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.device("cpu"):  # the model itself is being built under torch.device("meta")
        bnb = _bnb()
        with FakeTensorMode(allow_non_fake_inputs=True):
            return bnb.functional.quantize_4bit(
                    torch.empty(shape, dtype=dtype),
                blocksize=BNB_BLOCKSIZE,
                compress_statistics=double_quant,
                quant_type=quant_type,
                quant_storage=quant_storage,
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
            self.quant_storage = packed.dtype
            self.support_avx512bf16_for_cpu = False
            self.holds_input = False  # quant_saves_input: bitsandbytes <= 0.43 (see the module docstring)

        def forward(self, x):
            self._reattach_quant_state()
            if not self.holds_input:
                return super().forward(x)
            with _matmul_4bit_holding_input():
                return super().forward(x)

        def _reattach_quant_state(self):
            """FSDP2 hands the layer a gathered weight without bitsandbytes' attributes; bitsandbytes' own
            ``fix_4bit_weight_quant_state_from_module`` (``bitsandbytes/nn/modules.py:487``) wraps it in a
            ``Params4bit`` sharing its storage and hangs the module's whole ``quant_state`` on it. A FakeTensor cannot
            be subclassed, so the attributes go on the gathered Parameter itself (no allocation either way)."""
            weight = self.weight
            if getattr(weight, "quant_state", None) is not None or self.quant_state is None:
                return
            weight.quant_state = self.quant_state
            weight.quant_type = self.quant_state.quant_type
            weight.compress_statistics = self.quant_state.state2 is not None
            weight.blocksize = BNB_BLOCKSIZE
            weight.bnb_quantized = True

        # peft reads a quantized weight through ``dequantize_module_weight`` (``peft/utils/integrations.py:79``:
        # a module with ``W_q`` is dequantized by its own ``dequantize()``), as DoRA's weight norm does: the weight
        # here is a plain Parameter, not a ``Params4bit``, so it answers through that hook with bitsandbytes' own
        # dequantize_4bit, the call peft makes for a Params4bit (``dequantize_bnb_weight``)
        @property
        def W_q(self):
            return self.weight

        def dequantize(self):
            return _bnb().functional.dequantize_4bit(self.weight, self.weight.quant_state)

    return FakeLinear4bit


def _functions_module():
    _bnb()
    return sys.modules["bitsandbytes.autograd._functions"]


def matmul_4bit_holding_input_class():
    """bitsandbytes 0.50.2's ``MatMul4Bit`` keeping its input as bitsandbytes <= 0.43 did (version emulation)."""
    functions = _functions_module()
    base = functions.MatMul4Bit

    class MatMul4BitHoldingInput(base):
        @staticmethod
        def forward(ctx, A, B, out=None, bias=None, quant_state=None):
            output = base.forward(ctx, A, B, out, bias, quant_state)
            if any(ctx.needs_input_grad[:2]):
                ctx.tensors = (A, ctx.tensors[1])  # bitsandbytes 0.43.1 _functions.py:516: ctx.tensors = (A, B)
            return output

    return MatMul4BitHoldingInput


@contextlib.contextmanager
def _matmul_4bit_holding_input():
    """``bnb.matmul_4bit`` looks ``MatMul4Bit`` up in its module at call time: point it at the holding class for
    one layer's forward."""
    functions = _functions_module()
    original = functions.MatMul4Bit
    functions.MatMul4Bit = matmul_4bit_holding_input_class()
    try:
        yield
    finally:
        functions.MatMul4Bit = original


# -- LLM.int8 ---------------------------------------------------------------------------------------------------
class _Int8CudaKernels(TorchDispatchMode):
    """The CUDA kernels of ``MatMul8bitLt`` whose fake kernels need a data-dependent size (see the module docstring)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ops = torch.ops.bitsandbytes
        if func is ops.int8_vectorwise_quant.default:
            A = args[0]
            threshold = kwargs.get("threshold", args[1] if len(args) > 1 else 0.0)
            rows = A.numel() // A.shape[-1]
            row_stats = torch.empty(rows, device=A.device, dtype=torch.float32)
            out_row = torch.empty(A.shape, device=A.device, dtype=torch.int8)
            outlier_cols = None
            if threshold > 0.0:
                outliers = A.abs() >= threshold  # noqa: F841 (the CUDA kernel's [T, in] mask, alive until it returns)
                outlier_cols = torch.empty(0, device=A.device, dtype=torch.int64)  # no outlier column (no values)
            return out_row, row_stats, outlier_cols
        if func is ops.int8_mixed_scaled_mm.default:
            A, CA, CB, SCA, SCB = args[:5]
            bias = kwargs.get("bias", args[6] if len(args) > 6 else None)
            subA = torch.empty(0, device=A.device, dtype=A.dtype)
            return ops.int8_scaled_mm.default(CA, CB, SCA, SCB, bias=bias, dtype=A.dtype), subA
        return func(*args, **kwargs)


@contextlib.contextmanager
def _int8_cuda_route():
    """``bnb.matmul`` picks ``MatMul8bitFp`` for CPU tensors in training; CUDA runs ``MatMul8bitLt``."""
    functions = _functions_module()
    original = functions.MatMul8bitFp
    functions.MatMul8bitFp = functions.MatMul8bitLt
    try:
        with _Int8CudaKernels():
            yield
    finally:
        functions.MatMul8bitFp = original


def fake_linear8bit_class():
    bnb = _bnb()
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)  # "inputs will be cast" per call

    class FakeLinear8bitLt(bnb.nn.Linear8bitLt):
        """A Linear8bitLt standing where an nn.Linear was: int8 weight (CB) and fp32 row scales (SCB), as
        transformers' ``load_in_8bit`` leaves them (``has_fp16_weights=False``, ``llm_int8_threshold``)."""

        def __init__(self, linear: nn.Linear, threshold: float):
            nn.Module.__init__(self)
            self.in_features = linear.in_features
            self.out_features = linear.out_features
            weight = nn.Parameter(torch.empty(linear.weight.shape, dtype=torch.int8, device="meta"),
                                  requires_grad=False)
            self.weight = weight
            self.bias = linear.bias
            if self.bias is not None:
                self.bias.requires_grad_(False)
            self.state = bnb.MatmulLtState()
            self.state.threshold = threshold
            self.state.has_fp16_weights = False
            self.state.use_pool = threshold > 0.0
            self.index = None
            self.scb = torch.empty(linear.out_features, dtype=torch.float32, device="meta")
            self._set_state()

        def _set_state(self):
            self.weight.CB = None
            self.weight.SCB = None
            self.state.CB = self.weight.data
            self.state.SCB = self.scb

        def forward(self, x):
            with _int8_cuda_route():
                return super().forward(x)

    return FakeLinear8bitLt


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def quantize_linears(model: nn.Module, setup: TrainingSetup) -> None:
    """Replace every nn.Linear but the output embedding (on the meta device), as
    ``integrations/bitsandbytes.py::replace_with_bnb_linear`` does (``type(module) is nn.Linear``;
    ``get_keys_to_not_convert`` keeps lm_head). v5's 3-D expert tensors are not nn.Linear and stay in the load dtype
    (bitsandbytes issue #1849). ``quantize_lm_head`` replaces lm_head too (a tied one gets its own weight);
    ``quant=int8`` makes ``FakeLinear8bitLt`` layers; ``quant_state_dtype`` is the dtype quantized from."""
    from ..facts import BNB_LLM_INT8_THRESHOLD

    from ..errors import VramcalcError
    from ..options import Loss

    quant = getattr(setup.quant, "value", setup.quant)
    output = model.get_output_embeddings()
    if output is None:  # a sequence classifier (--task reward): its score holds the last parameter, which
        output = getattr(model, "score", None)  # get_keys_to_not_convert keeps too (quantizers/base.py:49-50)
    head_too = bool(getattr(setup, "quantize_lm_head", False))
    if head_too and setup.loss is not Loss.HF:
        raise VramcalcError(f"trace: --quantize-lm-head with --loss {setup.loss.value} is not traced (the chunked and "
                            "fused losses multiply by lm_head's weight themselves, which a 4-bit layer does not hold "
                            "in 16 bits); use --loss hf")
    compute_dtype = _DTYPES[setup.compute_dtype.value]
    state_word = getattr(getattr(setup, "quant_state_dtype", None), "value", None)
    storage = _DTYPES.get(getattr(getattr(setup, "quant_storage", None), "value", None), torch.uint8)
    replacements = []
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if type(child) is nn.Linear and (child is not output or head_too):
                replacements.append((parent, child_name, child))
    if quant == "int8":
        linear8bit = fake_linear8bit_class()
        for parent, child_name, child in replacements:
            setattr(parent, child_name, linear8bit(child, BNB_LLM_INT8_THRESHOLD))
        return
    linear4bit = fake_linear4bit_class()
    holds = bool(getattr(setup, "quant_saves_input", False))
    templates = {}
    for parent, child_name, child in replacements:
        dtype = _DTYPES[state_word] if state_word and state_word != "auto" else child.weight.dtype
        key = (tuple(child.weight.shape), dtype)
        if key not in templates:
            templates[key] = _quantized_template(key[0], key[1], quant, setup.double_quant, storage)
        layer = linear4bit(child, templates[key], quant, setup.double_quant, compute_dtype)
        layer.holds_input = holds
        setattr(parent, child_name, layer)


def materialise_quant_states(model: nn.Module, device: str = "cpu") -> None:
    """``to_empty`` makes new weight Parameters (without bitsandbytes' attributes) and leaves the quantization state,
    a plain attribute, on the meta device: re-create the state on the CPU (fake inside a FakeTensorMode) and hang it
    on the new weight again."""

    def moved(t):
        return torch.empty_like(t, device=device) if isinstance(t, torch.Tensor) and t.device.type == "meta" else t

    for module in model.modules():
        if hasattr(module, "scb") and isinstance(module, _bnb().nn.Linear8bitLt):
            module.scb = moved(module.scb)
            module._set_state()
            continue
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
        if hasattr(module, "qweight") and isinstance(getattr(module, "wf", None), torch.Tensor):
            tensors.append(module.wf)  # auto-gptq's shift table (tracing/gptq.py)
        scb = getattr(module, "scb", None)
        if isinstance(scb, torch.Tensor):
            tensors.append(scb)
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None:  # FSDP2 replaced the weight by its shard: the Linear4bit keeps the whole state
            state = getattr(module, "quant_state", None)  # (no bitsandbytes import here: a LoRA trace has none)
        if state is None or not hasattr(state, "absmax"):
            continue
        for value in (state.absmax, state.code, state.offset):
            if isinstance(value, torch.Tensor):
                tensors.append(value)
        if state.state2 is not None:
            tensors += [t for t in (state.state2.absmax, state.state2.code) if isinstance(t, torch.Tensor)]
    return tensors
