"""GPTQ int4 bases (``--quant int4-gptq``, ``vramcalc/gptq.py``): what auto-gptq's ``QuantLinear`` stores, what its
forward saves for backward and what it allocates while it dequantizes.

Sources: auto-gptq 0.7.1 ``auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py`` (``desc_act=False``) and
``qlinear_cuda.py`` (``desc_act=True``), chosen by ``utils/import_utils.py:96-99``; optimum 1.16.1
``optimum/gptq/quantizer.py:281-293`` (the replacement). auto-gptq 0.5.1 (Nov 2023) has the same buffers and the same
torch path (it masks the zeros before adding 1, ``qlinear_cuda_old.py`` 0.5.1; 0.7.1 adds 1 first: the same tensors).

Stored, per quantized Linear [out, in], group size g (g = in for -1), 4 bits (``qlinear_cuda_old.py:50-79``):
  qweight int32 [in/8, out]        n/2 bytes (``infeatures // 32 * bits`` rows)
  qzeros  int32 [in/g, out/8]      (``outfeatures // 32 * bits`` columns)
  scales  load dtype [in/g, out]   (optimum passes ``weight_dtype=layer.weight.dtype``)
  g_idx   int32 [in]
  bias    load dtype [out]         always (optimum passes ``bias=True``: ``quantizer.py:285``)
  wf      int32 [1, 8]             a plain attribute, moved to the GPU by the first forward (``:86``, ``:292``)
each its own allocation (rounded to 512 B). Which modules: every nn.Linear inside the decoder blocks
(``get_layers(model, prefix=block_name)``, ``quantizer.py:217-220``); the embedding, norms and lm_head stay in the
load dtype. The checkpoint is loaded already packed: no 16-bit copy of a quantized weight reaches the GPU.

Forward (``qlinear_cuda_old.py:291-355``; on CUDA with >= ``kernel_switch_threshold`` = 128 rows, every CPU call;
below 128 rows the CUDA kernel runs, which autograd cannot differentiate), n = in·out, d = bytes of the load dtype:
  ``bitwise_right_shift(qweight.unsqueeze(1).expand(-1, 8, -1), wf)``  int32 [in/8, 8, out]  4n
  ``.to(torch.int8)``                                                 int8                 n   (the int32 freed)
  ``bitwise_and(weight, 15)``                                          int8                 n   (the cast freed)
  ``scales * (weight - zeros)``                                        int8 n, then d·n   (``:348``)
  ``torch.matmul(x, weight)``: mm saves its second operand whenever x requires grad (autograd's
  ``mm: self: mm_mat1_backward(grad, mat2, ...)``), so the d·n dequantized weight lives until that Linear's backward.
Transient peak: the int32 shift output beside its int8 cast, 5n (``desc_act``, ``qlinear_cuda.py:302``:
``scales[g_idx] * (weight - zeros[g_idx])`` gathers a d·n scale copy beside the int8 weight, the difference and
the d·n product, (2 + 2d)·n). Backward needs no dequantization (mm's backward multiplies by the saved weight).
Without checkpointing every quantized Linear whose input requires grad holds its d·n weight from forward to its
backward (all layers at the end of forward); with it, the recomputed layer's (non-reentrant checkpointing drops them
in forward). Traced with auto-gptq's own code on fake tensors: ``tests/test_gptq.py``.

Mixture of experts (``expert_linears``): a GPTQ checkpoint of a transformers 4.x MoE holds one QuantLinear per
expert projection, as 4.x built them (modeling_mixtral.py ``MixtralBlockSparseTop2MLP``: w1 [I, h], w3 [I, h],
w2 [h, I] per expert in a ``ModuleList``); the quantizer packs each (fms-acceleration@24bdadb
``plugins/accelerated-peft/src/fms_acceleration_peft/gptqmodel/models/mixtral.py:24-55``: ``layer_modules`` lists
``block_sparse_moe.experts.{0..7}.w1/w3/w2``; the router ``block_sparse_moe.gate`` is not listed and stays in the
load dtype). v5's fused ``gate_up_proj`` [E, 2I, h] is read as 2E Linears [I, h], ``down_proj`` [E, h, I] as E.
With cuda-old each expert's matmul saves its dequantized weight like a dense Linear's (every expert receives tokens:
T·k >= E); its input is the expert's ``ceil(T·k/E)`` routed rows. Not traced (v5 builds no per-expert nn.Linear).

FSDP (``fsdp_packed_bytes``, ``buffer_bytes``): fms-acceleration's autogptq plugin turns ``qweight`` and
``qzeros`` into frozen ``nn.Parameter`` views in the load dtype so that FSDP flattens and shards them
(``autogptq_utils.py:34`` ``PATCH_FOR_FSDP_TRITON_V2 = ["qweight", "qzeros"]``, ``:68-85``
``torch.nn.Parameter(attr.view(torch_dtype), requires_grad=False)``; the forward views them back to int32,
``:174-214``; registered when ``world_size > 1`` and ``ACCELERATE_USE_FSDP``, ``framework_plugin_autogptq.py:205-
218``). ``scales``, ``g_idx`` (and a bias) stay buffers, which FSDP moves to the device whole on every rank. So a
decoder layer's unit gathers and shards the packed codes and zeros; the rest is replicated. The units, flat
all-gather buffers and stream pools are ``terms/distributed.py``'s (``packed_gptq``, ``shards_gptq``); accelerate
upcasts the trainable (adapter) flat parameters to fp32 under fp16 mixed precision. Not modelled: gptqmodel's
tritonv2 QuantLinear registers a bias only where the checkpoint has one and keeps no ``wf`` (``qlinear_tritonv2.py:
94-99``); the stored tensors keep optimum's bias and ``wf`` (a few MB). Estimate only: triton-v2 needs a GPU.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from ..model import ModelSpec
from ..units import DType, round_up
from ..gptq import moe_expert_linears  # the checkpoint's per-expert Linears
from .stored_tensor import StoredTensor

GPTQ_BITS = 4
_INT32 = DType.FP32.bytes  # int32 elements: 4 bytes
_PACK = 32 // GPTQ_BITS  # int4 values per int32
_WF_BYTES = _INT32 * _PACK  # wf: int32 [1, 8]
# the largest transient of one dequantization, in units of n (module docstring): the int32 shift output beside its
# int8 cast (cuda_old); desc_act (qlinear_cuda.py:302) takes (2 + 2d)·n in ``forward_dequant_bytes``
_DEQUANT_TRANSIENT_INT = 5  # 4n + n, qlinear_cuda_old.py:311-314


def group_rows(in_features: int, group_size: int) -> int:
    """Quantization groups along the input: ``ceil(in / g)``, one for g = -1 (``qlinear_cuda_old.py:47,58``)."""
    g = in_features if group_size == -1 else group_size
    return -(-in_features // g)


def metadata_bytes(in_features: int, out_features: int, group_size: int, dtype_bytes: int) -> int:
    """qzeros, scales, g_idx, bias and wf of one QuantLinear, each rounded to 512 B (module docstring)."""
    return (round_up(qzeros_bytes(in_features, out_features, group_size))
            + buffer_bytes(in_features, out_features, group_size, dtype_bytes))


def buffer_bytes(in_features: int, out_features: int, group_size: int, dtype_bytes: int) -> int:
    """scales, g_idx, bias and wf of one QuantLinear, each its own allocation rounded to 512 B: the buffers, which
    stay whole on every FSDP rank (module docstring, FSDP)."""
    scales = round_up(dtype_bytes * group_rows(in_features, group_size) * out_features)
    return scales + round_up(_INT32 * in_features) + round_up(dtype_bytes * out_features) + round_up(_WF_BYTES)


def stored_linear(name: str, shape: tuple[int, int], count: int, group_size: int, dtype_bytes: int,
                  scope: str) -> StoredTensor:
    """One QuantLinear: qweight (4 bits per weight, n/2 bytes) plus ``metadata_bytes``."""
    out_features, in_features = shape
    return StoredTensor(name, "quantized", shape, count, GPTQ_BITS, False,
                        metadata_bytes(in_features, out_features, group_size, dtype_bytes), scope)


def qweight_bytes(in_features: int, out_features: int) -> int:
    """qweight int32 [in·4/32, out]: 4·(in/8)·out bytes, n/2 (``qlinear_cuda_old.py:50``, ``qlinear_tritonv2.py:67-70``)."""
    return _INT32 * (in_features // _PACK) * out_features


def qzeros_bytes(in_features: int, out_features: int, group_size: int) -> int:
    """qzeros int32 [ceil(in/g), out·4/32] (``qlinear_tritonv2.py:71-80``)."""
    return _INT32 * group_rows(in_features, group_size) * (out_features // _PACK)


def fsdp_packed_bytes(in_features: int, out_features: int, group_size: int) -> int:
    """What FSDP flattens and shards of one QuantLinear (module docstring, FSDP): ``qweight`` and ``qzeros`` viewed
    as load-dtype parameters, the same bytes: 4·(in/8)·out + 4·ceil(in/g)·(out/8)."""
    return qweight_bytes(in_features, out_features) + qzeros_bytes(in_features, out_features, group_size)


class LayerDequantized(NamedTuple):
    """Bytes of one decoder layer's dequantized weights that its matmuls save for backward (d·n each)."""

    attention: int  # q, k, v (or fused qkv) and o
    inputs: int  # q, k, v alone: saved only when the layer's input requires grad
    mlp: int  # the MLP's Linears
    down: int  # the MLP's last Linear (its backward runs first)

    @property
    def whole(self) -> int:
        return self.attention + self.mlp


@functools.lru_cache(maxsize=1024)
def layer_dequantized(model: ModelSpec, dtype_bytes: int) -> LayerDequantized:
    """``LayerDequantized`` of one dense decoder layer (module docstring: mm saves the dequantized weight)."""
    traits = model.traits
    mlp_names = set(traits.mlp_names)
    attention = inputs = mlp = down = 0
    for module in model.inventory.linears:
        nbytes = dtype_bytes * module.weight_numel
        if module.name in mlp_names:
            mlp += nbytes
            down += nbytes if module.name == traits.mlp_names[-1] else 0
        else:
            attention += nbytes
            inputs += nbytes if module.name in traits.qkv_names else 0
    if model.is_moe:  # every expert's matmul saves its dequantized weight (module docstring, Mixture of experts)
        for expert in moe_expert_linears(model):
            nbytes = dtype_bytes * expert.in_features * expert.out_features * expert.per_layer
            mlp += nbytes
            down += nbytes if expert.is_down else 0
    return LayerDequantized(attention, inputs, mlp, down)


def forward_dequant_bytes(model: ModelSpec, dtype_bytes: int, c: int, tokens, desc_act: bool, saved: bool,
                          triton: bool = False):
    """Beyond the saved activations, while the largest quantized Linear dequantizes in forward: the transient
    (5n, or (2 + 2d)·n with desc_act: module docstring) less the d·n product the activations already count when
    ``saved`` (the layer's matmuls save their weights: no checkpointing, or its recompute), beside the Linear's input [T, in] in the
    compute dtype (which a frozen matmul does not save: counted here). The Linear with the largest sum wins (the
    MLP's last, with in = I, on the gated families). ``triton`` (``--gptq-kernel triton-v2``): the kernel writes
    the fp16 [in, out] weight at once and the matmul saves nothing, 2n (``triton_dequant_bytes``)."""
    if triton:
        peak, held = TRITON_DEQUANT_BYTES_PER_WEIGHT, 0
    else:
        peak = (2 + 2 * dtype_bytes) if desc_act else _DEQUANT_TRANSIENT_INT
        held = dtype_bytes if saved else 0
    dense = max((peak - held) * module.weight_numel + c * tokens * module.in_features
                for module in model.inventory.linears)
    if not model.is_moe:
        return dense
    # an expert's input is its routed rows, ceil(T·k/E) (module docstring, Mixture of experts)
    rows = -(-tokens * model.experts_per_token // model.num_experts)
    return max([dense] + [(peak - held) * i * o + c * rows * i for _, i, o, _ in moe_expert_linears(model)])


TRITON_DEQUANT_BYTES_PER_WEIGHT = 2  # dequant248's output: torch.empty((in, out), dtype=torch.float16)


def triton_dequant_bytes(in_features: int, out_features: int) -> int:
    """``--gptq-kernel triton-v2``: one QuantLinear's dequantized weight, 2·in·out bytes, made for one matmul and
    freed after it, in forward and again in backward (fms-acceleration@24bdadb ``plugins/accelerated-peft/src/
    fms_acceleration_peft/gptqmodel/nn_modules/triton_utils/dequant.py:103-129`` ``dequant248``: ``out =
    torch.empty((infeatures, outfeatures), device="cuda", dtype=torch.float16)``; ``:132-138`` ``quant_matmul_248``
    returns ``input @ W`` or ``input @ W.t()``; ``:141-161`` ``QuantLinearFunction`` saves ``qweight, scales,
    qzeros, g_idx`` only and calls ``quant_matmul_248(grad_output, ..., transpose=True)`` in backward)."""
    return TRITON_DEQUANT_BYTES_PER_WEIGHT * in_features * out_features


def backward_dequant_bytes(model: ModelSpec) -> int:
    """``--gptq-kernel triton-v2``: the largest QuantLinear's backward dequantization (``triton_dequant_bytes``),
    beside the layer's backward gradients (the per-expert Linears' of a mixture of experts included)."""
    shapes = [(m.in_features, m.out_features) for m in model.inventory.linears]
    if model.is_moe:
        shapes += [(e.in_features, e.out_features) for e in moe_expert_linears(model)]
    return max(triton_dequant_bytes(i, o) for i, o in shapes)


def with_saved_weights(plan, model: ModelSpec, layer, ckpt: bool, first_needs_grad: bool):
    """The estimator's saved-tensor plan (``step_moment.SavedPlan``) with each layer's dequantized weights
    (``layer_dequantized``, d = the load dtype's bytes, ``layer.dtypes.r``): kept from forward to the layer's
    backward without checkpointing (in every layer; the first layer's q/k/v only when its input needs a gradient),
    recomputed with it; the MLP's backward frees them first (down's before mul's gradients), so the attention block
    is left holding its own."""
    from .activations import BackwardFreed, Saved

    w = layer_dequantized(model, layer.dtypes.r)
    whole, attention = Saved(per_layer=w.whole), Saved(per_layer=w.attention)
    freed = {kind: BackwardFreed(f.mlp + Saved(per_layer=w.down), *f[1:]) for kind, f in plan.freed.items()}
    if ckpt:
        recompute = {kind: saved + whole for kind, saved in plan.recompute.items()}
        attention_left = {kind: saved + attention for kind, saved in plan.attention_left.items()}
        first = plan.first
        if first is not None:  # the first layer's own recompute (its input needing no gradient) has them too
            first = (first[0] + whole, first[1] + attention, BackwardFreed(first[2].mlp + Saved(per_layer=w.down),
                                                                          *first[2][1:]))
        return plan._replace(recompute=recompute, attention_left=attention_left, freed=freed, first=first)
    kept = {kind: saved + whole for kind, saved in plan.kept.items()}
    attention_left = {kind: saved + Saved(per_layer=-w.mlp) for kind, saved in plan.attention_left.items()}
    first = w.whole - (0 if first_needs_grad else w.inputs)
    model_saved = plan.model + Saved(per_layer=w.whole * (model.num_layers - 1) + first)
    return plan._replace(model=model_saved, kept=kept, attention_left=attention_left, freed=freed)
