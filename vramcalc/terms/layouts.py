"""Saved tensors of decoder layers whose layout is not Llama's: LayerNorm with bias, GELU MLPs and the parallel
attention + MLP block of phi, GPT-NeoX and Falcon (a mixin of ``activations._LayerWalk``, which calls it).

Symbols as in ``activations``: h hidden, a heads, k kv heads, d head dim, I intermediate, c compute bytes, r residual
bytes, x the layer input. Every rule is what the transformers 5.25 module saves for backward, traced on tiny real
models (``tests/test_families_devset.py``):
- nn.LayerNorm (``native_layer_norm``): saves its input x, the per-row mean and rstd ([T] each, fp32: the CUDA
  kernel's accumulation type) and its weight and bias, whenever its input or its weight needs a gradient. Without
  autocast its output has the input's dtype, and two LayerNorms reading the same x (GPT-NeoX input_layernorm and
  post_attention_layernorm, Falcon's ln_attn and ln_mlp) save one x between them. Under autocast CUDA runs
  layer_norm in fp32 (an fp32-policy op of ``aten/src/ATen/autocast_mode.cpp``; the trace emulates it,
  ``tracing/cuda_emulation.py``): each LayerNorm saves its own fp32 copy of a 16-bit x, returns fp32, and every
  Linear reading that output saves its own 16-bit cast (``_LayerWalk.linears``).
- Parallel block (``PhiDecoderLayer.forward`` L272-290, ``GPTNeoXLayer.forward`` L249-263 with
  use_parallel_residual, ``FalconDecoderLayer.forward`` L383-435): attention and MLP both read a norm of the layer
  input and ``attn + mlp + x`` saves nothing. Phi and Falcon's old layout share one norm output (the first Linear of
  each branch that saves it saves the same tensor); GPT-NeoX and Falcon's new layout normalise twice.
- GELU MLP (``PhiMLP`` L246-250, ``GPTNeoXMLP`` L45-49, ``FalconMLP`` L341-355): up saves its input, the activation
  saves up's output (``gelu``, ``gelu_pytorch_tanh``: ``F.gelu`` saves its input), down saves the activation's output.
  Phi's ``gelu_new`` (``activations.py::NewGELUActivation``, ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 *
  x**3)))``) is four elementwise ops that save x (for pow), tanh's output, ``0.5 * x`` and ``1 + tanh``: 4·c·I.
- QLoRA leaves Falcon's Linears in 16 bits: they are ``FalconLinear`` (an nn.Linear subclass) and transformers'
  ``replace_with_bnb_linear`` converts only ``type(module) is nn.Linear`` (``integrations/bitsandbytes.py`` L189;
  ``model.FamilyTraits.bnb_quantizable``), so they save their inputs as trained-or-LoRA Linears do.
- Falcon attention (transformers 5.25, ``FalconAttention.forward`` L282-331) is the shared attention of
  ``activations._LayerWalk._attention``: q, k and v are views of the fused query_key_value output, RoPE makes new q
  and k, and ``FalconModel.forward`` always builds the 4-D mask (``FamilyTraits.always_masked``), so CUDA runs
  memory-efficient attention. (Up to 5.24 Falcon had its own attention with reshape copies and, for multi-query, the
  math path; ``tests/constraints.txt`` pins the version these rules follow.)
"""

from __future__ import annotations

from ..options import Method
from ..units import DType

_F32 = DType.FP32.bytes  # bytes of an fp32 element
LAYER_NORM_STATS = 2  # native_layer_norm's mean and rstd, one fp32 value per row each
GELU_NEW_SAVED = 4  # NewGELUActivation: x, tanh output, 0.5·x, 1 + tanh
GELU_NEW_FAMILIES = ("phi", "gptj")  # PhiConfig.hidden_act, GPTJConfig.activation_function "gelu_new"; gpt_neox
# and falcon use "gelu", bloom its GeLUFunction (saves its input, as F.gelu)
RELU_FAMILIES = ("opt",)  # OPTConfig.activation_function "relu": F.relu saves its output, which is fc2's input


class ParallelBlockWalk:
    """Mixed into ``activations._LayerWalk``: ``layer_norm``, ``parallel_attention_block``, ``parallel_mlp_block``.
    Uses the walk's ``m``, ``dt``, ``full``, ``grad``, ``per_token``, ``per_square``, ``linears``, ``use`` and
    ``_attention``."""

    _x_saved = False  # the layer input already saved by a LayerNorm of this layer
    _shared_norm = None  # (bytes per element, saved by attention's first Linear?) of the norm output
    _grad_in = False  # whether the layer input needs a gradient (both branches start from it)

    def layer_norm(self, width: int, x_bytes: int) -> int:
        """nn.LayerNorm over ``width``: x (once per layer), mean and rstd when its input or weight needs a gradient.
        Under autocast CUDA runs it in fp32: a 16-bit x is cast to an fp32 copy per LayerNorm (saved in place of x)
        and the output is fp32, which each following Linear casts back for itself."""
        cast = self.dt.autocast and x_bytes != _F32
        if self.grad or self.full:
            if cast:
                self.per_token += _F32 * width  # this LayerNorm's own fp32 copy of x
            elif not self._x_saved:
                self.per_token += x_bytes * width
                self._x_saved = True
            self.per_token += LAYER_NORM_STATS * _F32
        self.grad = self.grad or self.full
        return _F32 if self.dt.autocast else x_bytes

    def parallel_attention_block(self) -> None:
        """The norm(s) and attention of a parallel block (the MLP's norm too, when both branches share one)."""
        m = self.m
        self._grad_in = self.grad
        # a layer's input needs a gradient in every layer but the first (QLoRA: first_layer_needs_grad is False),
        # which is the one whose input is the embedding's r bytes (``residual_bytes``)
        x_bytes = residual_bytes(m, self.layer) if self.grad else self.dt.r
        n = self.norm(m.hidden_size, x_bytes)
        self._shared_norm = (n, self._input_saved([self.use(name, m.hidden_size) for name in m.traits.qkv_names], n))
        self._attention(n)

    def parallel_mlp_block(self) -> None:
        """The MLP branch: on the shared norm output, or on its own norm of the layer input (saved x not again)."""
        m = self.m
        if m.norms_per_layer == 2:
            self.grad = self._grad_in
            n = self.norm(m.hidden_size, residual_bytes(m, self.layer) if self._grad_in else self.dt.r)
            n_saved = False
        else:
            n, n_saved = self._shared_norm
            self.grad = self._grad_in or self.full
        if m.traits.gated_mlp:  # cohere2: a SwiGLU MLP beside attention
            self._gated_mlp(n, m.mlp_width, prefix="", x_saved=n_saved)
        else:
            self._plain_mlp(n, n_saved)

    def _input_saved(self, uses, x_bytes: int) -> bool:
        """Whether ``linears(uses, x_bytes)`` saves the input tensor itself (not a cast copy): the rule of
        ``_LayerWalk.linears`` and ``_lora``."""
        c, autocast, adapter = self.dt.c, self.dt.autocast, self.dt.adapter
        for use in uses:
            if use.trains and not use.quantized and not (autocast and x_bytes != c):
                return True
            if use.lora and not (autocast and adapter != c) and not (self.layer.lora_dropout > 0 or adapter != x_bytes):
                return True
        return False

    def _plain_mlp(self, n: int, n_saved: bool) -> int:
        """up -> GELU -> down (``gated_mlp`` False)."""
        m = self.m
        up, down = m.traits.mlp_names
        width = m.mlp_width
        out = self.linears([self.use(up, m.hidden_size)], n, x_saved=n_saved)
        self.mlp_element_bytes = out  # (QLoRA's Linear4bit returns fp32 after an fp32 LayerNorm: see residual_bytes)
        if self.grad and m.family in RELU_FAMILIES:
            # threshold_backward reads relu's output: the tensor down saves when it saves its input as it is
            self.per_token += out * width
            return self.linears([self.use(down, width)], out, x_saved=True)
        if self.grad:
            eager_gelu = m.family in GELU_NEW_FAMILIES and not self.layer.layers.fused_gelu  # (stack_layers.py)
            self.per_token += (GELU_NEW_SAVED if eager_gelu else 1) * out * width
        before = self.per_token
        out = self.linears([self.use(down, width)], out)
        if m.traits.alibi:  # BLOOM: down's input, freed by its backward before GeLUFunction's backward runs
            self.mlp_freed_token = self.per_token - before
        return out


def residual_bytes(model, layer) -> int:
    """Bytes of a decoder layer's input hidden states: the residual dtype r, except under QLoRA with autocast in the
    bitsandbytes-quantized LayerNorm families (phi, gpt_neox), where every layer after the first gets fp32: the
    fp32 LayerNorm output makes the MLP's ``Linear4bit`` layers compute and return fp32 (bitsandbytes
    ``Linear4bit.forward``: ``.to(inp_dtype)``), and ``attn + mlp + x`` promotes to fp32. (Falcon's FalconLinear
    stays 16-bit, so its residual does too.)"""
    dt = layer.dtypes
    if model.traits.embedding_norm and dt.autocast:  # BLOOM: the embedding LayerNorm's fp32 output, then fp32 adds
        return _F32
    if (layer.method is Method.QLORA and model.traits.layer_norm and model.bnb_quantizable and dt.autocast
            and dt.r != _F32):
        return _F32
    return dt.r


def shared_norm_grad_bytes(model, batch_size, seq_len):
    """Parallel blocks whose two branches read one norm output (phi, Falcon's old layout): while attention's backward
    runs, the MLP branch's gradient of that output waits in autograd's input buffer for attention's share. It has
    the norm output's dtype, fp32 under autocast too (CUDA runs layer_norm in fp32): 4·T·h."""
    if not (model.traits.parallel_block and model.norms_per_layer == 1):
        return 0
    return _F32 * batch_size * seq_len * model.hidden_size


def down_weight_grad_bytes(model, layer) -> int:
    """BLOOM in full fine-tuning: dense_4h_to_h's weight and bias gradients, made by its backward, exist when
    GeLUFunction's backward peaks (one GPU; the dtype of the parameters, ``Dtypes.r``). 0 otherwise (where the walk
    does not model the order)."""
    if not model.traits.alibi or layer.method is not Method.FULL:
        return 0
    down = next(module for module in model.inventory.linears if module.name == model.traits.mlp_names[-1])
    return layer.dtypes.r * (down.weight_numel + (down.out_features if down.bias else 0))


def bloom_forward_transient_bytes(model, layer, batch_size, seq_len):
    """BLOOM's decoder layer under checkpointing (its forward runs without grad, saving nothing), at its widest, beside
    the checkpointed inputs: the attention's (``BloomAttention.forward`` L256-290: every local lives to the return)
    input_layernorm output (fp32 under autocast), the fused qkv output [T, 3h] (q, k and v are views of it at
    batch 1 and reshape copies beyond), and per [b, a, s, s] element the baddbmm scores (c), the scores + the 4-D mask
    (in the embedding's dtype r), softmax's fp32 copy of a 16-bit input, its fp32 output and the cast back to c; or
    the MLP's (``bloom_gelu_forward``): dense_h_to_4h's output and four eager temporaries [T, I], beside
    post_attention_layernorm's output and the attention block's output [T, h]."""
    dt = layer.dtypes
    h, a, width = model.hidden_size, model.num_heads, model.mlp_width
    c = dt.c if dt.autocast else dt.r
    norm = _F32 if dt.autocast else dt.r
    residual = residual_bytes(model, layer)
    tokens = batch_size * seq_len
    added = max(c, dt.r)
    square = c + added + (_F32 if added != _F32 else 0) + _F32 + (c if c != _F32 else 0)
    qkv = c * 3 * h * (1 if batch_size == 1 else 2)
    attention = tokens * (norm * h + qkv) + square * batch_size * a * seq_len * seq_len
    mlp = tokens * (BLOOM_GELU_FORWARD_LIVE * c * width + (norm + residual) * h)
    return max(attention, mlp)


BLOOM_GELU_FORWARD_LIVE = 5  # bloom_gelu_forward: x, 0.5·x, 0.79788456·x, 0.044715·x and its product with x
