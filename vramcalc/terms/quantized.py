"""Quantized base layers beyond today's HF default (issue 11 knobs): inputs a quantized Linear holds for backward,
its dequantized-weight transients, and what a quantized lm_head adds.

Knobs (``TrainingSetup`` fields, read with their defaults so that a setup without them is today's QLoRA):
- ``quant_saves_input`` (bitsandbytes <= 0.43): ``MatMul4Bit.forward`` keeps ``ctx.tensors = (A, B)`` whenever the
  input or the weight needs a gradient (bitsandbytes 0.43.1 ``bitsandbytes/autograd/_functions.py:516``; 0.44.1 keeps
  ``(None, B)``). ``quant=int8``: ``MatMul8bitLt.forward`` keeps ``ctx.tensors = (CAt, subA, A)`` in every version
  read (0.50.2 ``_functions.py:187``; ``CAt`` is None for a frozen weight, ``subA`` the outlier columns, none counted).
  Both are plain ctx attributes, not ``save_for_backward``: saved-tensor hooks never see them, so non-reentrant
  checkpointing does not drop them, and they live as long as the autograd node, i.e. until the graph dies after
  backward, not only until that node's backward ran. Rule: per decoder layer, every *distinct* input tensor of a
  quantized Linear that requires grad, once (q/k/v share the norm output, gate/up share theirs), unless another op
  already saves that very tensor (SDPA's output under o_proj, a bf16 LoRA's lora_A input). Linear4bit passes its
  input through unchanged for fp32/bf16 inputs (``Linear4bit.set_compute_type``); an fp16 input is cast to the compute
  dtype, a private copy per Linear. o_proj reads a fresh copy under eager attention and for fused-qkv models under
  flash. Under checkpointing the layer's own saves are dropped, so every distinct held input costs its bytes, and
  the first layer's input requires grad too (traced). Under reentrant checkpointing (``GradCkpt.REENTRANT``) the
  checkpointed forward builds no autograd node, so the decoder layers hold nothing from forward (a recomputed
  layer holds its inputs during its own backward only). Traced on fake tensors: ``tests/test_quantized_knobs.py``.
- ``quantize_lm_head``: lm_head is 4-bit (or int8) too; with held inputs, its input (the final norm's output) is held.
- ``quant_state_dtype``: the dtype ``dequantize_4bit`` returns (the quant state's, i.e. the dtype of the tensor that
  was quantized: Lightning quantizes an fp16 copy, Lightning@71aed751 ``fabric/plugins/precision/bitsandbytes.py:221``)
  before ``.to(A.dtype)``: both copies exist at once, ``n·(B(quant state) + B(A))``. bitsandbytes 0.50.2 does this in
  ``MatMul4Bit.backward`` (``_functions.py:384``) for every token count; its forward above 1536 tokens dequantizes
  straight into A's dtype (``backends/cuda/ops.py::_dequant_linear_fallback``), and below uses a fused kernel.

Symbols: T tokens, n weights of one Linear, h hidden, V vocab, a = bytes of the quantized Linear's input dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

from ..facts import BNB_BLOCKSIZE, BNB_GEMM_4BIT_CUSTOM_MAX_TOKENS, half_dtype
from ..model import ModelSpec
from ..options import Attention, GradCkpt, Method
from ..units import DType, maximum, select
from .activations import LayerSetup, Saved, _LayerWalk, checkpoint_mode, first_layer_needs_grad
from .parameters import quant_is_int8

_F32 = DType.FP32.bytes
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class QuantKnobs:
    """The quantized-layer knobs of one setup, normalised (all off unless ``method`` is qlora)."""

    int8: bool = False
    saves_input: bool = False  # bitsandbytes <= 0.43 4-bit inputs, or LLM.int8 (always)
    head_quantized: bool = False
    quant_state: str | None = None  # dtype word dequantize_4bit returns; None = "auto" (today's formula)
    input_dtype: str = "bf16"  # dtype word of the quantized Linears' input A
    input_cast: bool = False  # an fp16 model's input cast to a non-fp16 compute dtype: a private copy per Linear
    double_quant: bool = True

    @property
    def is_default(self) -> bool:
        return not (self.int8 or self.saves_input or self.head_quantized or self.quant_state)


def knobs(setup) -> QuantKnobs:
    """Read the knobs from a TrainingSetup (fields missing on an older setup count as their defaults)."""
    if setup.method is not Method.QLORA:
        return QuantKnobs()
    int8 = quant_is_int8(setup)
    state = getattr(setup, "quant_state_dtype", None)
    state = getattr(state, "value", state)
    if state in (None, "auto") or int8:
        state = None
    precision = setup.precision
    if precision.param_dtype.bits == 32:  # an fp32 residual stream (kbit-prepared, or an fp32 model): Linear4bit
        a = "fp32"  # switches its compute dtype to the fp32 input (bnb nn/modules.py ``set_compute_type``)
    elif half_dtype(precision).value == "fp16" and not int8:
        a = setup.compute_dtype.value  # an fp16 input is cast to bnb_4bit_compute_dtype
    else:
        a = half_dtype(precision).value
    cast = not precision.is_mixed and half_dtype(precision).value == "fp16" and a != "fp16" and not int8
    return QuantKnobs(int8=int8, saves_input=int8 or bool(getattr(setup, "quant_saves_input", False)),
                      head_quantized=bool(getattr(setup, "quantize_lm_head", False)), quant_state=state,
                      input_dtype=a, input_cast=cast, double_quant=setup.double_quant and not int8)


# -- dequantized weights --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DequantBytes:
    layer_backward: object  # the largest decoder Linear's transient in its backward (int or numpy array)
    head_forward: object  # a quantized lm_head's forward transient (0 unless quantized)
    head_backward: object  # a quantized lm_head's backward transient, at the start of backward


def _absmax_bytes(numel: int, double_quant: bool) -> int:
    """The fp32 absmax that dequantization rebuilds from the double-quantized one (twice: ``+ offset``)."""
    return 2 * _F32 * -(-numel // BNB_BLOCKSIZE) if double_quant else 0


def _dequant_4bit_backward(numel: int, k: QuantKnobs, a_bytes: int) -> int:
    """``F.dequantize_4bit(B, state).to(A.dtype)`` (``MatMul4Bit.backward``): the quant-state copy and A's copy at
    once when the dtypes differ (the rebuilt fp32 absmax, one copy, is freed when ``dequantize_4bit`` returns);
    otherwise A's copy beside that absmax."""
    if k.quant_state and k.quant_state != k.input_dtype:
        return (_BYTES[k.quant_state] + a_bytes) * numel
    return a_bytes * numel + (_F32 * -(-numel // BNB_BLOCKSIZE) if k.double_quant else 0)


def largest_quantized_numel(model: ModelSpec, setup=None) -> int:
    """Weights of the largest 4-bit decoder Linear: with ``quantize_experts`` (transformers 4.x's per-expert
    Linears) also one expert projection, [I_e, h]."""
    largest = max(module.weight_numel for module in model.inventory.linears)
    if setup is not None and getattr(setup, "quantize_experts", False):
        largest = max(largest, model.expert_width * model.hidden_size)
    return largest


def dequant_bytes(model: ModelSpec, setup, a_bytes: int, tokens, c_bytes: int | None = None) -> DequantBytes:
    """Dequantized-weight transients of the largest quantized decoder Linear and of a quantized lm_head.

    4-bit: backward ``n·(B(state) + a)`` when the quant-state dtype differs from A's, else ``n·a`` (plus the rebuilt
    fp32 absmax with double quantization); forward only above 1536 tokens, ``n·a``. int8
    (``MatMul8bitLt.backward``): ``state.CB.to(A.dtype, copy=True)`` (n·a) and ``SCB.unsqueeze(1).mul(1/127)``
    (4·out fp32), any token count. ``a_bytes``: bytes of A's dtype (``max(r, c)`` as today's formula).
    """
    k = knobs(setup)
    c_bytes = a_bytes if c_bytes is None else c_bytes
    largest = max(model.inventory.linears, key=lambda module: module.weight_numel)
    head_numel = model.vocab_size * model.hidden_size
    above = tokens > BNB_GEMM_4BIT_CUSTOM_MAX_TOKENS
    # the estimator adds the layer transient to the MLP's backward transients c·T·(3·I + h) (down's input gradient
    # and mul's two [T, I] gradients); the largest Linear's backward (gate/up) runs with one [T, I] gradient and the
    # [T, h] one alive (traced), so only what exceeds the two others counts
    width = model.expert_width * model.experts_per_token if model.is_moe else model.intermediate_size
    others = 2 * c_bytes * tokens * width
    if k.int8:
        layer = maximum(a_bytes * largest.weight_numel + _F32 * largest.out_features - others, 0)
        head_bwd = a_bytes * head_numel + _F32 * model.vocab_size if k.head_quantized else 0
        return DequantBytes(layer, 0, head_bwd)
    numel = largest_quantized_numel(model, setup)  # (per-expert Linears under quantize_experts)
    today = select(above, a_bytes * numel + _absmax_bytes(numel, k.double_quant), 0)
    if k.quant_state:  # never less than today's formula (terms/temporaries.py::dequantized_weight_bytes)
        layer = maximum(today, maximum(_dequant_4bit_backward(numel, k, a_bytes) - others, 0))
    else:
        layer = today
    if not k.head_quantized:
        return DequantBytes(layer, 0, 0)
    head_fwd = select(above, a_bytes * head_numel + _absmax_bytes(head_numel, k.double_quant), 0)
    return DequantBytes(layer, head_fwd, _dequant_4bit_backward(head_numel, k, a_bytes))


# -- inputs held by quantized Linears -------------------------------------------------------------------------------
class _HoldingWalk(_LayerWalk):
    """The layer walk of ``activations`` with quantized Linears that hold their input (see the module docstring).

    ``held`` counts the held inputs alone. ``share``: an input another op saves costs nothing (no checkpointing);
    under checkpointing the layer's own saves are dropped, so every distinct held input costs its bytes."""

    def __init__(self, model, layer, masked, layer_requires_grad, private_bytes: int, share: bool = True,
                 cached_attention: bool = False):
        super().__init__(model, layer, masked, layer_requires_grad)
        self.private_bytes = private_bytes  # >0: each quantized Linear casts its input (fp16 -> compute dtype)
        self.share = share
        # selective checkpointing caches the SDPA kernel's output, the very tensor o_proj reads and holds
        self.cached_attention = cached_attention
        self.held = 0

    def _fresh_attention_output(self, use, x_bytes) -> bool:
        """o_proj reads a new tensor that no one else saves: eager's ``transpose(1, 2).contiguous()`` copy, or the
        copy of a fused-qkv model's flash output (``activations._LayerWalk._attention``), unless o_proj itself
        trains or the walk already counted that copy as saved (where o_proj has a LoRA; for litgpt's head-major
        query only where that LoRA saves the copy itself: with dropout it saves ``dropout(y)``)."""
        if use.name != "o_proj" or use.trains:
            return False
        m = self.m
        if self.layer.attn_used is Attention.EAGER:
            return not use.lora
        repeated = self.masked and m.num_heads > m.num_kv_heads
        kernel = self.sdpa_kernel(m.num_heads, m.num_kv_heads, m.head_dim, m.head_dim, x_bytes)
        # litgpt builds q with ``torch.cat`` as a new [b, a, s, d] tensor (stack_layers.query_head_major): the flash
        # output keeps that layout and ``y.reshape(B, T, a·d)`` copies it (litgpt 0.4.13 and 0.5.13 ``model.py``
        # CausalSelfAttention.forward); SDPA saves its output, not the copy the 4-bit proj holds (litgpt trace).
        # (transformers' partial-rotary phi holds no such copy: phi-1.5 HF trace with held inputs.)
        if self.layer.layers.query_head_major:
            return kernel == "flash" and not self._input_saved([use], x_bytes)
        return kernel == "flash" and m.traits.fused_qkv and not repeated and not use.lora

    def linears(self, uses, x_bytes, x_saved=False):
        quantized = [use for use in uses if use.quantized]
        if quantized and x_saved and self._fresh_attention_output(quantized[0], x_bytes):
            x_saved = False
        if quantized and self.grad:
            width = quantized[0].width_in
            cached = x_saved and self.cached_attention and self.attention_output_cached and (
                quantized[0].name == self.m.traits.o_name)
            if self.private_bytes:
                self.held += self.private_bytes * width * len(quantized)
            elif not (x_saved and self.share) and not cached:
                self.held += x_bytes * width
            if self.share and not self.private_bytes:
                x_saved = True  # held: a LoRA's lora_A on the same tensor adds nothing
        return super().linears(uses, x_bytes, x_saved)


def _walk(model, layer, moe, masked, requires_grad, private_bytes, holding, share=True) -> Saved:
    walk = (_HoldingWalk(model, layer, masked, requires_grad, private_bytes, share) if holding
            else _LayerWalk(model, layer, masked, requires_grad))
    walk.attention_block()
    walk.mlp_block(moe)
    if holding:
        return walk.result() + Saved(per_token=walk.held)
    return walk.result()


def _difference(a: Saved, b: Saved) -> Saved:
    return a + b * -1


@functools.lru_cache(maxsize=4096)
def layer_held(model: ModelSpec, layer: LayerSetup, k: QuantKnobs, moe: bool, masked: bool = False,
               requires_grad: bool = True, grad_ckpt: GradCkpt = GradCkpt.NONE) -> Saved:
    """Bytes one decoder layer's quantized Linears hold for backward beyond what the layer keeps anyway: without
    checkpointing, its held inputs less those the layer saves itself; with it, every distinct held input (the
    checkpoint drops the layer's saved tensors but not a ctx attribute), but under selective checkpointing not
    o_proj's input where that is the SDPA output the selective cache keeps (traced: int8 under both policies)."""
    if not k.saves_input:
        return Saved()
    private = _BYTES[k.input_dtype] if k.input_cast else 0
    if grad_ckpt:
        walk = _HoldingWalk(model, layer, masked, requires_grad, private, share=False,
                            cached_attention=grad_ckpt.caches_ops)
        walk.attention_block()
        walk.mlp_block(moe)
        return Saved(per_token=walk.held)
    return _difference(_walk(model, layer, moe, masked, requires_grad, private, True),
                       _walk(model, layer, moe, masked, requires_grad, private, False))


@functools.lru_cache(maxsize=4096)
def model_held(model: ModelSpec, layer: LayerSetup, k: QuantKnobs, masked: bool = False,
               head_input_shared: bool = False, grad_ckpt: GradCkpt = GradCkpt.NONE) -> Saved:
    """Everything quantized Linears hold from forward until the graph dies: every decoder layer's ``layer_held``
    (the first layer's inputs need a gradient only when ``first_layer_needs_grad`` or, under checkpointing, where
    the stack makes them: ``StackLayers.checkpoint_inputs_need_grad``) and, for a quantized lm_head, its input (the
    final norm's output, ``max(norm_out, r)·h`` per token) unless another op saves that tensor
    (``head_input_shared``: a bf16 LoRA on lm_head without dropout)."""
    if not k.saves_input:
        return Saved()
    total = Saved()
    if k.head_quantized and not head_input_shared:  # lm_head runs outside every checkpoint
        dt = layer.dtypes
        total += Saved(per_token=max(dt.norm_out, dt.r) * model.hidden_size)
    if grad_ckpt is GradCkpt.REENTRANT:  # no autograd node from a checkpointed forward
        return total
    first_moe = model.is_moe_layer(0)
    # transformers + peft under checkpointing: enable_input_require_grads (traced: layer 0's norm output is held)
    first_grad = ((grad_ckpt and layer.layers.checkpoint_inputs_need_grad)
                  or first_layer_needs_grad(layer.method, layer.modules_to_save))
    total += layer_held(model, layer, k, first_moe, masked, first_grad, grad_ckpt)
    dense = model.num_dense_layers - (0 if first_moe else 1)
    moe = model.num_moe_layers - (1 if first_moe else 0)
    if dense:
        total += layer_held(model, layer, k, False, masked, True, grad_ckpt) * dense
    if moe:
        total += layer_held(model, layer, k, True, masked, True, grad_ckpt) * moe
    return total


# -- what the estimator adds at its moments --------------------------------------------------------------------------
class StepExtras(NamedTuple):
    """What quantized layers add to ``estimator._moments`` (bytes; ints or numpy arrays over the batch shape)."""

    held: object  # activations held from forward until the graph dies: add to ``A`` (never released per layer)
    head_forward: object  # a quantized lm_head's forward: its dequantized weight (0: no such moment)
    head_forward_logits: object  # ... beside its output [T, V] in the input dtype
    head_backward: object  # temporaries of lm_head's backward moment: its dequantized weight
    head_forward_moment: bool = False  # lm_head is quantized: its forward is a moment of its own


def step_extras(model: ModelSpec, setup, layer: LayerSetup, masked, batch_size, seq_len,
                head_input_shared: bool = False) -> StepExtras:
    """The quantized-layer additions for one setup and batch shape (module docstring; all 0 for today's QLoRA)."""
    k = knobs(setup)
    if k.is_default:
        return StepExtras(0, 0, 0, 0, False)
    dt = layer.dtypes
    tokens = batch_size * seq_len
    held = model_held(model, layer, k, masked, head_input_shared,
                      checkpoint_mode(setup.grad_ckpt)).bytes(batch_size, seq_len)
    a = max(dt.r, dt.c)
    deq = dequant_bytes(model, setup, a, tokens, dt.c)
    head_out = max(dt.norm_out, dt.r) * tokens * model.vocab_size if k.head_quantized else 0
    head_backward = deq.head_backward
    if k.head_quantized:
        # the matmul's output (the hidden-state gradient, already in the moment) comes once only A's copy is left
        hidden = dt.c * tokens * model.hidden_size
        copy = a * model.vocab_size * model.hidden_size
        head_backward = maximum(head_backward - hidden, copy)
    return StepExtras(held, deq.head_forward, head_out, head_backward, k.head_quantized)
