"""Make a CPU trace allocate what the CUDA kernels of a real run allocate.

On CPU, ``F.scaled_dot_product_attention`` picks CPU kernels (a CPU flash kernel, or the math path for DeepSeek's
192/128 head dims) and bitsandbytes' fake ``gemm_4bit`` allocates no dequantized weight. A GPU run differs in both, so
while a trace runs:

1. SDPA takes the backend CUDA would (torch 2.5-2.13, ``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp``
   ``select_sdp_backend``, priority flash -> efficient -> math): flash for 16-bit inputs without a mask and with
   equal q/k/v head dims <= 256 (GQA natively); else memory-efficient attention, which takes a mask, fp32 and a v
   head dim unlike q/k's (DeepSeek-V3 MLA) but not GQA; else the math path, which repeats k and v to all heads and
   keeps fp32 [b, a, s, s] scores (fp32 training of a GQA model lands there). The CUDA ops are called directly; their
   meta kernels give the exact saved tensors (output, logsumexp, philox state). cuDNN attention, preferred on sm90
   by newer builds, keeps the same tensors as flash.
2. Dropout takes CUDA's fused ``native_dropout`` (ATen ``Dropout.cpp::is_fused_kernel_acceptable`` is CUDA-only):
   a one-byte bool mask is saved, where the CPU path would save a noise tensor in the input's dtype.
3. bitsandbytes ``gemm_4bit`` above 1536 tokens runs the CUDA dequantize-then-``F.linear`` fallback
   (``backends/cuda/ops.py::_dequant_linear_fallback``), whose dequantized weight is the big QLoRA transient.
4. ``torch._grouped_mm`` (transformers' ``grouped_mm`` experts, ``integrations/moe.py::_grouped_mm``) accepts fp32
   and fp16 as the CUDA kernel does. Its meta kernel (``torch/_meta_registrations.py::_meta_grouped_mm_common``)
   demands bf16, but the CUDA op checks only "Float32, BFloat16 or Float16"
   (``aten/src/ATen/native/GroupedMMUtils.h::_grouped_mm_validate_inputs``) and runs any other than bf16 through
   ``_grouped_mm_fallback``: one ``mm_out`` per expert into the output tensor, so the output is the only allocation.
   transformers calls it for fp32 experts on any CUDA GPU of sm80 or newer (``_can_use_grouped_mm``), in fp32
   training and in mixed precision alike (the op is not autocast-enabled, and the input is cast to the weights'
   dtype), so a real GPU trains these setups.

5. ``F.layer_norm`` under autocast runs in fp32 as CUDA autocast's fp32 op list has it (CPU autocast leaves it in
   the input dtype): nn.LayerNorm saves an fp32 copy of its input and returns fp32 (phi, gpt_neox, falcon).

6. ``F.softmax`` without a dtype under autocast returns fp32 as CUDA autocast runs it: softmax is one of its
   ``fp32_set_opt_dtype`` ops (``aten/src/ATen/autocast_mode.cpp``), so a 16-bit input gets ``dtype=float32``, and
   ATen's ``softmax`` then runs fp16 through ``_softmax(x, dim, half_to_float=True)`` (no fp32 copy; its backward
   returns fp16) and bf16 through an fp32 copy of the input (``aten/src/ATen/native/SoftMax.cpp::softmax``). CPU
   autocast leaves it in the input's dtype. BERT's ``eager_attention_forward`` calls it so.

Kernel-internal workspaces (FA2's fp32 ``dq_accum``, cuBLAS) are not tensors of the step: calibration measures them.
"""

from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import TorchDispatchMode

from ..facts import BNB_GEMM_4BIT_CUSTOM_MAX_TOKENS  # bitsandbytes backends/cuda/ops.py
SIXTEEN_BIT = (torch.bfloat16, torch.float16)


def cuda_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` as a CUDA GPU would run it."""
    aten = torch.ops.aten
    if torch.is_autocast_enabled("cpu"):
        # CUDA autocast lists scaled_dot_product_attention as lower-precision: q, k, v are cast first
        dtype = torch.get_autocast_dtype("cpu")
        query, key, value = (t.to(dtype) if t.is_floating_point() else t for t in (query, key, value))
    head_dims_equal = query.shape[-1] == key.shape[-1] == value.shape[-1]
    if query.dtype in SIXTEEN_BIT and attn_mask is None and head_dims_equal and query.shape[-1] <= 256:
        return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False, scale=scale)[0]
    if query.shape[1] == key.shape[1]:
        bias = None if attn_mask is None else _additive_bias(attn_mask, query, key)
        grad = query.requires_grad or key.requires_grad or value.requires_grad
        return aten._scaled_dot_product_efficient_attention(
            query, key, value, bias, grad, dropout_p, is_causal and attn_mask is None, scale=scale
        )[0]
    return aten._scaled_dot_product_attention_math(
        query, key, value, attn_mask, dropout_p, is_causal, None, scale=scale, enable_gqa=True
    )[0]


def cuda_dropout(input, p=0.5, training=True, inplace=False):
    """``F.dropout`` as CUDA runs it: the fused kernel with a bool mask."""
    if training and 0.0 < p < 1.0 and input.numel() > 0:
        return torch.native_dropout(input, p, True)[0]
    return _original_dropout(input, p, training, inplace)


_original_dropout = torch.nn.functional.dropout
_original_layer_norm = torch.nn.functional.layer_norm


def cuda_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``F.layer_norm`` under autocast as CUDA runs it: CUDA autocast lists layer_norm as an fp32 op
    (``aten/src/ATen/autocast_mode.cpp``; CPU autocast does not), so its input, weight and bias are cast to fp32 and
    it returns fp32. Only nn.LayerNorm families (phi, gpt_neox, falcon) call it."""
    if not torch.is_autocast_enabled("cpu"):
        return _original_layer_norm(input, normalized_shape, weight, bias, eps)
    def fp32(t):
        return t.float() if t is not None and t.is_floating_point() else t
    with torch.autocast(device_type="cpu", enabled=False):
        return _original_layer_norm(fp32(input), normalized_shape, fp32(weight), fp32(bias), eps)


original_softmax = torch.nn.functional.softmax


def cuda_softmax(input, dim=None, _stacklevel=3, dtype=None):
    """``F.softmax`` as CUDA autocast runs it (module docstring, item 6): a 16-bit input without a dtype returns fp32,
    fp16 by ``_softmax``'s half_to_float (on fake tensors; real CPU ones take the fp32 copy, the same result)."""
    if dtype is not None or not torch.is_autocast_enabled("cpu") or input.dtype not in SIXTEEN_BIT:
        return original_softmax(input, dim, _stacklevel, dtype)
    with torch.autocast(device_type="cpu", enabled=False):
        if input.dtype is torch.float16 and is_fake(input):
            return torch.ops.aten._softmax(input, dim if dim >= 0 else dim + input.dim(), True)
        return original_softmax(input, dim, _stacklevel, torch.float32)


def _additive_bias(mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """SDPA turns a boolean mask into an additive one of the query's dtype before the efficient kernel."""
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
        bias = bias.masked_fill(mask.logical_not(), float("-inf"))
    else:
        bias = mask.to(query.dtype)
    return bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])


def grouped_mm_cuda_output(mat_a, mat_b, offs=None, bias=None, out_dtype=None):
    """The output ``torch._grouped_mm`` allocates on CUDA for fp32/fp16 operands (its fallback path).

    Shape and strides as ``GroupedMMUtils.h::create_grouped_gemm_output_tensor``: (S, N) for a 2-D input and 3-D
    weights; (G, M, N) for 2-D x 2-D (the weight gradient) or 3-D x 3-D; the last dimension's stride padded to 16
    bytes for TMA. The dtype is ``mat_a``'s (``_resolve_grouped_mm_out_dtype``)."""
    a_2d, b_2d = mat_a.dim() == 2, mat_b.dim() == 2
    if a_2d and b_2d:
        size = [offs.size(0), mat_a.size(0), mat_b.size(1)]
    elif a_2d:
        size = [mat_a.size(0), mat_b.size(-1)]
    elif b_2d:
        size = [mat_a.size(1), mat_b.size(1)]
    else:
        size = [mat_a.size(0), mat_a.size(1), mat_b.size(-1)]
    dtype = out_dtype or mat_a.dtype
    alignment = 16 // dtype.itemsize
    padded = -(-size[-1] // alignment) * alignment
    stride = [padded, 1] if len(size) == 2 else [size[1] * padded, padded, 1]
    return torch.empty_strided(size, stride, dtype=dtype, device=mat_a.device)


def _grouped_mm_needs_cuda_rule(args, kwargs) -> bool:
    """Fake fp32 or fp16 operands of one dtype, no bias, output in the operands' dtype: what CUDA runs and the meta
    kernel refuses. Real tensors (the tracker's self-check, the CPU harness) keep torch's own CPU kernel."""
    mat_a, mat_b = args[0], args[1]
    if not (is_fake(mat_a) or mat_a.device.type == "meta"):
        return False
    out_dtype = kwargs.get("out_dtype", args[4] if len(args) > 4 else None)
    bias = kwargs.get("bias", args[3] if len(args) > 3 else None)
    return (mat_a.dtype in _GROUPED_MM_FALLBACK_DTYPES and mat_b.dtype == mat_a.dtype and bias is None
            and out_dtype in (None, mat_a.dtype))


_GROUPED_MM_FALLBACK_DTYPES = (torch.float32, torch.float16)  # bf16 keeps torch's own meta kernel


def _grouped_mm_op():
    return getattr(torch.ops.aten, "_grouped_mm", None) and torch.ops.aten._grouped_mm.default


class _CudaKernels(TorchDispatchMode):
    """Route ``bitsandbytes::gemm_4bit`` with more than 1536 rows to the dequantize + linear path CUDA takes, and
    give ``aten._grouped_mm`` on fp32/fp16 the output the CUDA kernel allocates."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _grouped_mm_op() and _grouped_mm_needs_cuda_rule(args, kwargs):
            offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
            return grouped_mm_cuda_output(args[0], args[1], offs, None, kwargs.get("out_dtype"))
        if func is torch.ops.aten._local_scalar_dense.default and _is_fake(args[0]):
            return _fake_scalar(args[0])
        if func is _gemm_4bit():
            a = args[0]
            tokens = a.numel() // a.shape[-1]
            if tokens > BNB_GEMM_4BIT_CUSTOM_MAX_TOKENS:
                from bitsandbytes.backends.default.ops import _gemm_4bit_default_impl

                return _gemm_4bit_default_impl(*args, **kwargs)
        return func(*args, **kwargs)


def _is_fake(tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


def _fake_scalar(tensor):
    """A fake tensor has no value to read (``.item()``, ``bool()``): the scalar a random draw takes in the common
    case. peft's module dropout (``loha/layer.py``, ``lokr/layer.py``: ``torch.rand(1) > module_dropout``) keeps the
    module: True; an integer draw is 0, a float 1.0. What is allocated does not depend on which value it is."""
    if tensor.dtype is torch.bool:
        return True
    return 1.0 if tensor.dtype.is_floating_point else 0


def _unpacked(position_ids):
    return None


def _gemm_4bit():
    try:
        return torch.ops.bitsandbytes.gemm_4bit.default
    except (AttributeError, RuntimeError):
        return None


@contextlib.contextmanager
def cuda_kernel_emulation(sdpa: bool = True):
    """SDPA and bitsandbytes behave as on a CUDA GPU inside this block (enter it inside the tracker).

    ``sdpa=False`` keeps the CPU attention kernels: real CPU tensors cannot run CUDA ops (self-checks, CPU harness).
    """
    from transformers import masking_utils

    original = torch.nn.functional.scaled_dot_product_attention
    find_packed = masking_utils.find_packed_sequence_indices
    if sdpa:
        torch.nn.functional.scaled_dot_product_attention = cuda_sdpa
    torch.nn.functional.dropout = cuda_dropout
    torch.nn.functional.layer_norm = cuda_layer_norm
    torch.nn.functional.softmax = cuda_softmax
    # transformers cannot read fake position ids, so it would assume packed sequences and build a 4-D mask; the
    # traced batch is unpacked (one sequence per row), as find_packed_sequence_indices finds on real ids.
    masking_utils.find_packed_sequence_indices = _unpacked
    try:
        with _CudaKernels():
            yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
        torch.nn.functional.dropout = _original_dropout
        torch.nn.functional.layer_norm = _original_layer_norm
        torch.nn.functional.softmax = original_softmax
        masking_utils.find_packed_sequence_indices = find_packed
