"""activations: the tensors autograd saves in forward for backward (or checkpointing keeps), per token and per b·s².

The model is a walk through one decoder layer of transformers v5 (``models/<family>/modeling_<family>.py``) that adds
up what each op saves, for one token. Every saved tensor is [T, width] or [b, heads, s, s], so a layer costs
``per_token · T + per_square · b · s²`` bytes, exactly linear in the batch shape (which keeps sweeps vectorisable).

Symbols: h hidden, a heads, k kv heads, d head dim, I intermediate, V vocab; c = bytes of the compute dtype (the
autocast dtype; the parameter dtype without autocast); r = bytes of the residual stream (the embedding's dtype).
Rules, each traced on tiny real models (``tests/test_trace_accuracy.py``) and cited to the op that saves:
- RMSNorm (LlamaRMSNorm.forward): ``x.to(fp32)`` saved by ``pow`` (4h, the input itself when already fp32), the fp32
  ``rsqrt`` [T, 1] (4), ``y.to(input dtype)`` saved by ``weight *`` only when the weight trains (r·h). Gemma-2 keeps
  its fp32 ``y`` (4h) and returns a copy in the input dtype. Nothing is saved where the input needs no grad.
- nn.Linear saves its input only when its weight trains; under autocast an input of another dtype is cast per Linear
  (a private copy each: autocast caches only leaf weights). bitsandbytes 4-bit Linear saves no input.
- LoRA (peft ``lora/layer.py::Linear.forward``): ``x.to(lora_A dtype)``, then dropout (1-byte mask + output), then
  lora_A saves its (autocast-cast) input and lora_B saves A's output [T, r].
- SDPA flash: q, k, v, out and a [b, a, s] fp32 logsumexp (``_scaled_dot_product_flash_attention``); memory-efficient
  attention pads logsumexp to 32 rows; the math path keeps fp32 scores. Eager (``eager_attention_forward``): repeated
  k and v, the fp32 softmax and its cast (Gemma-2 also its tanh soft-cap), and a contiguous copy of the output.
- SwiGLU/GeGLU MLP: act saves gate's output, ``*`` saves act's output and up's output, down_proj saves the product.
- MoE (v5 ``grouped_mm_experts_forward``): fp32 router softmax, top-k, and per routed token-slot (S = T·K): the
  gathered input, gate_up output, act output and down output.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

from ..facts import adapter_bits
from ..model import ModelSpec, cached_field_hash, state_without_hash
from ..options import AdapterDtype, Attention, Method, Precision
from ..units import DType, select

_F32 = DType.FP32.bytes  # bytes of an fp32 element
SDPA_FLASH_MAX_HEAD_DIM = 256
SEED_OFFSET_BYTES = 2 * 512  # flash attention's philox seed and offset, two tiny allocations per layer


@dataclass(frozen=True)
class Saved:
    """Bytes saved per token, per b·s² (attention scores) and per sequence (constant in b), for one unit."""

    per_token: int = 0
    per_square: int = 0
    per_layer: int = 0  # fixed bytes per layer (flash seed/offset)

    def __add__(self, other: "Saved") -> "Saved":
        return Saved(self.per_token + other.per_token, self.per_square + other.per_square, self.per_layer + other.per_layer)

    def __mul__(self, n: int) -> "Saved":
        return Saved(self.per_token * n, self.per_square * n, self.per_layer * n)

    def bytes(self, batch_size, seq_len):
        return self.per_token * batch_size * seq_len + self.per_square * batch_size * seq_len * seq_len + self.per_layer


@dataclass(frozen=True)
class Dtypes:
    c: int  # compute (autocast) bytes
    r: int  # residual stream bytes
    norm_out: int  # bytes of a norm's output (promote(norm weight, residual))
    autocast: bool
    adapter: int  # LoRA adapter bytes

    __hash__ = cached_field_hash  # part of many cache keys
    __getstate__ = state_without_hash


@functools.lru_cache(maxsize=256)
def dtypes(method: Method, precision: Precision, adapter_dtype: AdapterDtype) -> Dtypes:
    """Element bytes the layer walk follows. r = the precision's parameter dtype (16 bits for QLoRA's unquantized
    parts without a ``mixed-*`` word); c = the autocast dtype, or r without autocast (fp32); the adapter's from
    ``facts.adapter_bits``. Source: transformers v5 load dtypes, torch autocast, peft ``autocast_adapter_dtype``."""
    autocast = precision is not Precision.FP32
    param = precision.param_dtype.bytes
    if method is Method.QLORA and not precision.is_mixed:
        param = 2
    c = precision.compute_dtype.bytes if autocast else param
    adapter = adapter_bits(method, precision, adapter_dtype) // 8
    return Dtypes(c=c, r=param, norm_out=param, autocast=autocast, adapter=adapter)


@dataclass(frozen=True)
class LayerSetup:
    """What one decoder layer's saved tensors depend on besides the model, the mask decision and the batch shape:
    the method (what trains), the element sizes, the attention implementation used and the LoRA modules (empty, rank
    0 and no dropout without LoRA). Checkpointing is not part of it: it changes what is kept, not what is saved."""

    method: Method
    dtypes: Dtypes
    attn_used: Attention
    lora_modules: tuple[str, ...] = ()
    lora_rank: int = 0
    lora_dropout: float = 0.0

    __hash__ = cached_field_hash
    __getstate__ = state_without_hash


class LinearUse(NamedTuple):
    """How one nn.Linear of the layer is used: width in, whether its weight trains, whether LoRA wraps it (a named
    tuple: the walk makes one per Linear)."""

    name: str
    width_in: int
    trains: bool
    lora: bool
    quantized: bool


class _LayerWalk:
    """Accumulates the saved bytes of one decoder layer for one token, following dtypes and requires_grad."""

    def __init__(self, model: ModelSpec, layer: LayerSetup, masked: bool, layer_requires_grad: bool = True):
        self.m = model
        self.layer = layer
        self.dt = layer.dtypes
        self.full = layer.method is Method.FULL
        self.lora_names = set(layer.lora_modules)
        self.quantized = layer.method is Method.QLORA
        self.gemma = model.family == "gemma2"
        self.masked = masked  # a sliding window shorter than the sequence: transformers builds a 4-D mask
        self.per_token = 0
        self.per_square = 0
        self.per_layer = 0
        self.grad = layer_requires_grad  # does the tensor flowing through the layer require grad?

    def result(self) -> Saved:
        return Saved(self.per_token, self.per_square, self.per_layer)

    # -- building blocks --------------------------------------------------------------------------
    def norm(self, width: int, x_bytes: int, rows: int = 1) -> int:
        """RMSNorm over ``width`` (``rows`` normalised rows per token); returns its output's bytes per element."""
        if self.grad:
            self.per_token += _F32 * width * rows + _F32 * rows  # fp32 input (or the fp32 input itself), rsqrt
        if self.full:
            self.per_token += (_F32 if self.gemma else x_bytes) * width * rows  # y saved for the weight gradient
        self.grad = self.grad or self.full
        return x_bytes if self.gemma else max(self.dt.norm_out, x_bytes)

    def linears(self, uses: list[LinearUse], x_bytes: int, x_saved: bool = False) -> int:
        """Linears reading one tensor of ``x_bytes`` per element; returns their output's bytes per element."""
        c, autocast = self.dt.c, self.dt.autocast
        for use in uses:
            width = use.width_in
            if use.trains and not use.quantized:
                if autocast and x_bytes != c:
                    self.per_token += c * width  # a private autocast copy per Linear
                elif not x_saved:
                    self.per_token += x_bytes * width
                    x_saved = True
            if use.lora:
                x_saved = self._lora(width, x_bytes, x_saved)
        quantized = any(use.quantized for use in uses)
        if quantized:
            out = x_bytes  # Linear4bit computes in (and returns) its input's dtype (set_compute_type)
            if any(use.lora for use in uses) and autocast:
                out = max(out, c)
        else:
            out = c if autocast else max(x_bytes, self.dt.r)
        self.grad = self.grad or any(use.trains or use.lora for use in uses)
        return out

    def _lora(self, width: int, x_bytes: int, x_saved: bool) -> bool:
        """One LoRA module on an input of ``width``; returns whether the shared input is now saved."""
        layer = self.layer
        c, adapter, autocast = self.dt.c, self.dt.adapter, self.dt.autocast
        dropout = layer.lora_dropout > 0
        if dropout and self.grad:
            self.per_token += 1 * width  # native_dropout's bool mask (CUDA)
        if autocast and adapter != c:
            self.per_token += c * width  # autocast's private copy of lora_A's input
        elif dropout or adapter != x_bytes:
            self.per_token += adapter * width  # dropout output or peft's cast, saved by lora_A
        elif not x_saved:
            self.per_token += x_bytes * width
            x_saved = True
        self.per_token += (c if autocast else adapter) * layer.lora_rank  # lora_A's output, saved by lora_B
        return x_saved

    def use(self, name: str, width_in: int) -> LinearUse:
        return LinearUse(name, width_in, self.full, name in self.lora_names, self.quantized)

    def sdpa_kernel(self, a: int, k: int, d_qk: int, d_v: int, x_bytes: int) -> str:
        """The SDPA backend a CUDA GPU picks (vramcalc.tracing.cuda_emulation): flash for 16-bit inputs with equal
        head dims <= 256 and no mask; memory-efficient for a mask, fp32 or unequal v (not GQA); else math."""
        if x_bytes == 2 and d_qk == d_v <= SDPA_FLASH_MAX_HEAD_DIM and not self.masked:
            return "flash"
        if a == k or self.masked:
            return "efficient"
        return "math"

    # -- the layer --------------------------------------------------------------------------------
    def attention_block(self) -> None:
        m = self.m
        n = self.norm(m.hidden_size, self.dt.r)
        out = self._mla(n) if m.traits.mla else self._attention(n)
        if self.gemma:
            self.norm(m.hidden_size, out)  # post_attention_layernorm on the attention output

    def _attention(self, n: int) -> int:
        m, dt = self.m, self.dt
        h, a, k, d = m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim
        c = dt.c
        uses = [self.use("qkv_proj", h)] if m.traits.fused_qkv else [self.use(x, h) for x in ("q_proj", "k_proj", "v_proj")]
        qkv = self.linears(uses, n)
        if m.qk_norm:
            qkv = max(self.norm(d, qkv, rows=a), self.norm(d, qkv, rows=k))  # q_norm, k_norm per head
        embed = max(qkv, dt.r)  # RoPE multiplies by cos/sin in the residual dtype
        o_use = self.use("o_proj", a * d)
        o_saves_input = o_use.trains or o_use.lora
        if self.layer.attn_used is Attention.EAGER:
            if self.grad:
                q_bytes = c if dt.autocast else embed
                repeat = a // k
                kv_width = a * d if repeat > 1 else k * d
                self.per_token += q_bytes * (a * d + 2 * kv_width)  # q, repeated k and v
                # fp32 softmax, and its cast to the query dtype (the same tensor when that is fp32)
                self.per_square += (_F32 + (q_bytes if q_bytes != _F32 else 0)) * a
                if self.gemma:
                    self.per_square += q_bytes * a  # tanh soft-capping output
            out_bytes = c if dt.autocast else embed
            if o_saves_input and self.grad:
                self.per_token += out_bytes * a * d  # contiguous copy of the output
        else:
            out_bytes = c if dt.autocast else embed
            kernel = self.sdpa_kernel(a, k, d, d, out_bytes)
            if self.grad:
                repeated = self.masked and a > k  # transformers' repeat_kv: k and v copied to a heads
                kv_width = a * d if repeated else k * d
                if kernel == "math":
                    self.per_square += _F32 * a
                    self.per_token += _F32 * (a * d + a * d + a * d) + out_bytes * a * d
                else:
                    self.per_token += out_bytes * (2 * a * d + 2 * kv_width) + _F32 * a
                    self.per_layer += SEED_OFFSET_BYTES
                if self.masked:
                    # SDPA converts the boolean mask to an additive one per call and the efficient kernel saves it
                    # (torch convert_boolean_attn_mask, _scaled_dot_product_efficient_attention)
                    self.per_square += out_bytes
                if m.traits.fused_qkv and not repeated:
                    # v is a view of the fused qkv output and pins all of it; the flash kernel's output keeps the
                    # query's [b, a, s, d] layout, so o_proj gets a contiguous copy
                    self.per_token += qkv * (a + k) * d
                    if kernel == "flash" and o_saves_input:
                        self.per_token += out_bytes * a * d
        return self.linears([o_use], out_bytes, x_saved=True)

    def _mla(self, n: int) -> int:
        """DeepseekV3Attention: q_a_proj -> q_a_layernorm -> q_b_proj; kv_a_proj_with_mqa -> kv_a_layernorm ->
        kv_b_proj; K is assembled in a new [b, a, s, nope+rope] tensor and V is a view of kv_b's output."""
        m, dt = self.m, self.dt
        c = dt.c
        h, a = m.hidden_size, m.num_heads
        nope, rope, v = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        q_r, kv_r = m.q_lora_rank, m.kv_lora_rank
        first = [self.use("q_a_proj" if q_r else "q_proj", h), self.use("kv_a_proj_with_mqa", h)]
        proj = self.linears(first, n)
        if q_r:
            qn = self.norm(q_r, proj)
            self.linears([self.use("q_b_proj", q_r)], qn)
        kvn = self.norm(kv_r, proj)
        kv = self.linears([self.use("kv_b_proj", kv_r)], kvn)
        qk = nope + rope
        if self.grad:
            # q with rope applied, K assembled, kv_b's output (V is a view), output and logsumexp
            self.per_token += c * a * qk + c * a * qk + kv * a * (nope + v) + c * a * v + _F32 * a
            self.per_layer += SEED_OFFSET_BYTES
        return self.linears([self.use("o_proj", a * v)], c, x_saved=True)

    def mlp_block(self, moe: bool) -> None:
        m = self.m
        n = self.norm(m.hidden_size, self.dt.r)
        out = self._moe(n) if moe else self._gated_mlp(n, m.intermediate_size, prefix="")
        if self.gemma:
            self.norm(m.hidden_size, out)  # post_feedforward_layernorm

    def _gated_mlp(self, n: int, width: int, prefix: str) -> int:
        m = self.m
        if m.traits.fused_gate_up:
            out = self.linears([self.use("gate_up_proj", m.hidden_size)], n)
        else:
            out = self.linears([self.use(f"{prefix}gate_proj", m.hidden_size), self.use(f"{prefix}up_proj", m.hidden_size)], n)
        if self.grad:
            self.per_token += 3 * out * width  # act's input, act's output, up's output (Phi-3: gate_up pinned + act)
        return self.linears([self.use(f"{prefix}down_proj", width)], out)

    def _moe(self, n: int) -> int:
        """Router (fp32 scores over E experts, top-K) and v5's grouped experts over S = T·K token slots
        (``integrations/moe.py::grouped_mm_experts_forward``)."""
        m, dt = self.m, self.dt
        c = dt.c
        h, E, K, width = m.hidden_size, m.num_experts, m.experts_per_token, m.expert_width
        # router: fp32 scores [T, E], top-k values and int64 indices, their normaliser; a trained router's input
        self.per_token += _F32 * E + (_F32 + 8) * K + _F32 + (c * h if self.full else 0)
        # per slot: gate_up output (pinned by act and *), act output, down output (the routing weight needs it),
        # and the int64 sort, permutation and gather indices
        self.per_token += K * (3 * c * width + c * h + 3 * 8)
        if self.full:
            self.per_token += K * (c * h + c * width)  # gathered input and product, for the expert weight gradients
        self.grad = True
        if m.n_shared_experts:
            self._gated_mlp(n, m.moe_intermediate_size * m.n_shared_experts, prefix="shared_experts.")
        return c


def sliding_window_masked(model: ModelSpec, seq_len):
    """Whether transformers builds a 4-D attention mask: the model has a sliding window shorter than the sequence
    (``masking_utils.sliding_window_causal_mask``; SDPA then leaves the flash kernel). ``seq_len`` is the padded
    sequence length (prompt tuning's virtual tokens included); elementwise when it is a numpy array."""
    window = model.sliding_window
    if not window:
        return False
    return select(seq_len > window, True, False) if hasattr(seq_len, "shape") else seq_len > window


@functools.lru_cache(maxsize=4096)
def layer_saved(model: ModelSpec, layer: LayerSetup, moe: bool, masked: bool = False,
                requires_grad: bool = True) -> Saved:
    """Saved bytes of one decoder layer (dense or MoE), without checkpointing: the attention block's then the MLP's
    (the walk in the module docstring). ``requires_grad``: whether the layer's input needs a gradient."""
    walk = _LayerWalk(model, layer, masked, layer_requires_grad=requires_grad)
    walk.attention_block()
    walk.mlp_block(moe)
    return walk.result()


@functools.lru_cache(maxsize=4096)
def attention_saved(model: ModelSpec, layer: LayerSetup, masked: bool = False) -> Saved:
    """Saved bytes of a decoder layer's attention block alone: what the layer's backward still holds once its MLP's
    backward is done (the MLP runs last in forward, first in backward)."""
    walk = _LayerWalk(model, layer, masked)
    walk.attention_block()
    return walk.result()


def first_layer_needs_grad(method: Method) -> bool:
    """Does the first layer's input require grad? Only when the embedding trains (full) or a prompt is prepended."""
    return method in (Method.FULL, Method.PROMPT)


@functools.lru_cache(maxsize=4096)
def shared_saved(model: ModelSpec, dt: Dtypes, attn_used: Attention, grad_ckpt: bool, masked: bool = False) -> Saved:
    """Tensors every layer reads and backward keeps to the end: rotary cos and sin (r·d_rope each per token, made
    once per forward by ``*RotaryEmbedding``) and the int64 position ids. Under checkpointing the 4-D attention
    masks are checkpoint inputs too (memory-math.md 5.3): eager's [b, 1, s, s] in the compute dtype, one per mask
    kind (Gemma-2 builds a full and a sliding one), or SDPA's boolean sliding-window mask (``masked``)."""
    rope_dim = model.qk_rope_head_dim if model.traits.mla else model.head_dim
    saved = Saved(per_token=2 * dt.r * rope_dim + 8)
    if grad_ckpt:
        mask_kinds = 2 if model.family == "gemma2" else 1
        if attn_used is Attention.EAGER:
            saved += Saved(per_square=mask_kinds * (dt.c if dt.autocast else dt.r))
        elif masked:
            saved += Saved(per_square=1)
    return saved


@functools.lru_cache(maxsize=4096)
def head_saved(model: ModelSpec, layer: LayerSetup) -> Saved:
    """The final norm's saved tensors and, when lm_head trains (full fine-tuning), its input."""
    walk = _LayerWalk(model, layer, masked=False)
    n = walk.norm(model.hidden_size, layer.dtypes.r)
    if layer.method is Method.FULL:
        walk.linears([LinearUse("lm_head", model.hidden_size, True, False, False)], n)
    return walk.result()


def layer_kept(model: ModelSpec, layer: LayerSetup, grad_ckpt: bool, moe: bool, masked: bool = False) -> Saved:
    """What one layer keeps from forward to its backward: its saved tensors, or under HF gradient checkpointing
    (non-reentrant, transformers ``GradientCheckpointingLayer``) only its input hidden states (r·h per token)."""
    if grad_ckpt:
        return Saved(per_token=layer.dtypes.r * model.hidden_size)
    return layer_saved(model, layer, moe, masked)


@functools.lru_cache(maxsize=4096)
def model_saved(model: ModelSpec, layer: LayerSetup, grad_ckpt: bool, masked: bool = False) -> Saved:
    """Saved bytes of the whole model at the end of forward, logits excluded (see ``logits``): the shared tensors,
    the head's, the first layer's (its input needs a gradient only when ``first_layer_needs_grad``) and what every
    other layer keeps (``layer_kept``), dense and MoE layers each once per kind times their count."""
    total = shared_saved(model, layer.dtypes, layer.attn_used, grad_ckpt, masked) + head_saved(model, layer)
    first_moe = model.is_moe_layer(0)
    if grad_ckpt:
        first = layer_kept(model, layer, grad_ckpt, first_moe, masked)
    else:
        first = layer_saved(model, layer, first_moe, masked, first_layer_needs_grad(layer.method))
    total += first
    dense = model.num_dense_layers - (0 if first_moe else 1)
    moe = model.num_moe_layers - (1 if first_moe else 0)
    if dense:
        total += layer_kept(model, layer, grad_ckpt, False, masked) * dense
    if moe:
        total += layer_kept(model, layer, grad_ckpt, True, masked) * moe
    return total
