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

Activation knobs (issue 11; each rule checked against the trace in ``tests/test_activation_knobs.py``):
- ``--grad-ckpt selective``: torch's selective checkpointing (``create_selective_checkpoint_contexts``) with a
  policy that saves every matmul's and attention kernel's output (``tracing/step.py::selective_policy``, after
  torchtitan's op-level ``_save_list``). One rule per saved op, walked beside the saved tensors (``cache``): each
  Linear's output (``mm``/``addmm``/bitsandbytes ``gemm_4bit``: c·out, the Linear's output dtype), each LoRA A and B
  output (c·r, c·out), SDPA's output, logsumexp and philox state (c·a·d + 4·a, + seed and offset), and eager
  attention's two bmm outputs (scores c·a per b·s², output c·a·d). A layer
  keeps its input and that cache until its backward; the recompute then makes the rest of its saved tensors
  (``layer_saved - cache``, the cache's entries being consumed as the recompute reaches them). DoRA's two matmuls on
  an identity (``get_lora_weight``: [in, r] and [in, out] per layer) and MLA's attention output are matmul and
  attention ops too.
- ``--grad-ckpt selective-op``: torchtitan's policy (``torchtitan/distributed/activation_checkpoint.py``: "Saves
  output of all compute ops, except every second mm"; ``tracing/step.py::selective_op_contexts``). The walk lists
  the layer's matmul ops in call order (``_LayerWalk.cached_ops``: a base Linear, then its lora_A and lora_B; MLA's
  q_a, q_b, kv_a, kv_b, o; the MoE router); of the ``aten.mm`` ones the 1st, 3rd, ... are cached, and the attention
  kernel's output; ``addmm`` (a biased Linear), bitsandbytes' ``gemm_4bit`` and LLM.int8 matmuls, eager attention's
  ``bmm`` and the experts' ``_grouped_mm`` are not on torchtitan's list, neither cached nor counted.
- ``--kernels liger`` (Liger-Kernel 0.8.5, estimate only: Triton kernels): ``LigerRMSNormFunction`` saves its input
  as is and a [T] fp32 rstd (``ops/rms_norm.py``: ``ctx.save_for_backward(X, W, RSTD)``; no fp32 copy, no y);
  ``LigerSiLUMulFunction`` saves gate's and up's outputs (``ops/swiglu.py``: ``ctx.save_for_backward(a, b)``) and
  recomputes silu; ``LigerRopeFunction`` rotates q and k in place and saves only cos and sin (``ops/rope.py``), so
  SDPA saves the same q and k.
- ``--compile``: what AOTAutograd's min-cut partitioner (``torch/_functorch/partitioners.py``, inductor's settings)
  keeps, as traced on Llama, Qwen3 and Mistral layers (``tracing/compiled.py``): matmul outputs and inputs as eager
  saves them, SDPA's tensors, and for the pointwise chains only their inputs: an RMSNorm keeps its input in its own
  dtype and the rsqrt (the fp32 copy and y are recomputed), SwiGLU keeps gate's and up's outputs (silu recomputed),
  eager attention's 16-bit softmax keeps the 16-bit scores and the fp32 row max and sum (the fp32 probabilities
  recomputed; checked with ``aot_function`` on ``eager_attention_forward``'s ops).
  The second norm's input (x + attention output) is kept as the o_proj output beside the layer input.
  Under ``--cp`` the partitioner also keeps the ring's all-gathered K/V (``compiled_ring_saved_bytes``).
- ``--activation-offload``: tensors autograd saves live in host memory (``torch.autograd.graph.save_on_cpu``);
  under checkpointing only the checkpoint's inputs (transformers ``activation_checkpointing_enable(offload=True)``),
  which backward brings back one layer at a time before its recompute; the selective cache stays on the device.
- ``--loss hf-loop`` without checkpointing: the model runs with ``use_cache`` and transformers' ``DynamicCache``
  keeps copies of every layer's k and v (``kv_cache``), saved by the attention as they are or beside what it saves.
- ``--grad-ckpt wrapper``: torch's ``checkpoint_wrapper`` around each layer from outside, transformers' own
  checkpointing off, so the model keeps its cache in any loop (``runs_with_cache``): every layer's copies are extra
  to its kept input, and under transformers 5.25 each layer's recompute appends a second copy that holds the
  recompute's graph (``checkpointed_kv_cache``, ``cache_history_saved``); the first layer's input needs no gradient
  (``first_layer_recomputes_gradless``).
- ``--packing``: one row of b·s tokens; FlashAttention-2 needs no mask (varlen), sdpa and eager get transformers'
  block-diagonal [1, 1, T, T] mask (``attention_masked``).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import VramcalcError
from ..facts import adapter_bits, qlora_unquantized_bits
from ..model import ModelSpec, cached_field_hash, state_without_hash
from ..options import AdapterDtype, Attention, GradCkpt, Kernels, Loss, Method, Precision
from ..units import DType, select
from . import layouts
from .layouts import ParallelBlockWalk, residual_bytes
from .short_conv import ShortConvWalk
from . import expert_parallel, moe_lora, stack_layers
from .context_parallel import compiled_ring_saved_bytes
from .stack_layers import HF as HF_LAYERS
from .stack_layers import StackLayers
from ..peft_methods import IA3_FEEDFORWARD
from .peft_methods import (delta_weight_saved, dora_dropout_weight_saved_bytes, dora_per_layer_bytes,
                           dora_saved_per_token, ia3_saved, oft_block_size,
                           oft_saved,
                           vera_saved)

_F32 = DType.FP32.bytes  # bytes of an fp32 element
SDPA_FLASH_MAX_HEAD_DIM = 256
SEED_OFFSET_BYTES = 2 * 512  # flash attention's philox seed and offset, two tiny allocations per layer


@dataclass(frozen=True)
class Saved:
    """Bytes saved per token, per b·s² (attention scores) and per sequence (constant in b), for one unit."""

    per_token: int = 0
    per_square: int = 0
    per_layer: int = 0  # fixed bytes per layer (flash seed/offset)
    # bytes per sequence position, constant in b: [1, s, ...] tensors (the per-layer RoPE copies of glm4, ernie4_5:
    # transformers' position ids are [1, s] unless passed)
    per_position: int = 0
    # bytes per token that a batch of one sequence saves beyond ``per_token`` (negative where it saves less): eager
    # attention's views that matmul's reshape to bmm's [b·a, ...] copies unless the batch dim is 1, where it merges
    # (``_attention``: a multi-query k and v; a fused qkv's v, which then pins the whole qkv output)
    per_token_delta_at_batch_one: int = 0

    def __add__(self, other: "Saved") -> "Saved":
        return Saved(self.per_token + other.per_token, self.per_square + other.per_square,
                     self.per_layer + other.per_layer, self.per_position + other.per_position,
                     self.per_token_delta_at_batch_one + other.per_token_delta_at_batch_one)

    def __mul__(self, n: int) -> "Saved":
        return Saved(self.per_token * n, self.per_square * n, self.per_layer * n, self.per_position * n,
                     self.per_token_delta_at_batch_one * n)

    def bytes(self, batch_size, seq_len):
        return (self.per_token * batch_size * seq_len + self.per_square * batch_size * seq_len * seq_len
                + self.per_layer + self.per_position * seq_len
                + self.per_token_delta_at_batch_one * seq_len * (batch_size == 1))


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
    """Element bytes the layer walk follows. r = the precision's parameter dtype (QLoRA's unquantized parts:
    ``facts.qlora_unquantized_bits``); c = the autocast dtype, or r without autocast (fp32); the adapter's from
    ``facts.adapter_bits``. Source: transformers v5 load dtypes, torch autocast, peft ``autocast_adapter_dtype``."""
    autocast = precision.autocast  # every word but fp32 and bf16-true
    param = qlora_unquantized_bits(precision) // 8 if method is Method.QLORA else precision.param_dtype.bytes
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
    kernels: Kernels = Kernels.NONE  # Liger's RMSNorm / SwiGLU / RoPE
    compiled: bool = False  # torch.compile: the min-cut partitioner's saved set
    offload: bool = False  # --activation-offload: saved tensors in host memory
    layers: StackLayers = HF_LAYERS  # the stack's own decoder traits (terms/stack_layers.py)
    ep: int = 1  # --ep: the rank's experts run 1/ep of the routed slots (terms/expert_parallel.py ``slot_share``)
    lora_experts: tuple[str, ...] = ()  # peft's ParamWrapper LoRA on the fused experts (terms/moe_lora.py)
    ep_dispatch: bool = False  # --ep: tokens reach the experts through AllToAllEP (terms/expert_parallel.py)
    modules_to_save: tuple[str, ...] = ()  # peft modules_to_save: embed_tokens, lm_head trained whole (parameters.py)
    repeat_kv: bool = False  # transformers < 4.54's SDPA path: k and v repeated to all heads (TrainingSetup.repeat_kv)
    # the base Linears are bitsandbytes Linear4bit under a method estimated on the 16-bit base (QDoRA:
    # ``ResolvedSetup.base_4bit``): their matmul is ``gemm_4bit``, not ``aten.mm``, in the selective cache's op list
    base_4bit: bool = False
    # --cp C under --compile: the compiled layer keeps the ring's all-gathered K/V of its C ranks for backward
    # (terms/context_parallel.py ``compiled_ring_saved_bytes``); 1 otherwise
    ring_ranks: int = 1
    # --tp-plan torchtitan on T ranks: the norms run sequence-parallel on the rank's [b, s/T, h] shard (their saved
    # tensors, and under checkpointing the layer input, are 1/T of a token's); 1 otherwise
    sequence_shards: int = 1
    # a stack's RoPE indexes its fp32 rotary buffer with the batch's position ids (torchtune under --packing:
    # ``self.cache[input_pos]``), a gathered [b, s, d/2, 2] copy per call (``_attention``); False: a slice or view
    rope_gathered: bool = False

    __hash__ = cached_field_hash
    __getstate__ = state_without_hash


class CachedOp(NamedTuple):
    """An op of a decoder layer whose output selective checkpointing may cache (``_LayerWalk._cached``)."""

    token: int  # bytes per token
    square: int  # bytes per b·s²
    layer: int  # bytes per layer
    kind: str  # "mm", "matmul" or "attention"
    module: str  # the Linear it belongs to ("" for none)


class LinearUse(NamedTuple):
    """How one nn.Linear of the layer is used: width in, whether its weight trains, whether LoRA wraps it (a named
    tuple: the walk makes one per Linear)."""

    name: str
    width_in: int
    trains: bool
    lora: bool
    quantized: bool


class _LayerWalk(ParallelBlockWalk, ShortConvWalk):
    """Accumulates the saved bytes of one decoder layer for one token, following dtypes and requires_grad."""

    def __init__(self, model: ModelSpec, layer: LayerSetup, masked: bool, layer_requires_grad: bool = True):
        self.m = model
        self.layer = layer
        self.dt = layer.dtypes
        self.full = layer.method is Method.FULL
        self.norms_train = self.full or layer.method is Method.LN_TUNING  # ln-tuning: a trained copy of each norm
        self.lora_names = set(layer.lora_modules)
        self.quantized = layer.method is Method.QLORA and model.bnb_quantizable
        self.gemma = model.family == "gemma2"
        self.gemma_norm = gemma_norm(model)
        self.masked = masked  # a sliding window shorter than the sequence: transformers builds a 4-D mask
        self.per_token = 0
        self.per_square = 0
        self.per_layer = 0
        self.per_position = 0
        self.per_token_delta_at_batch_one = 0
        # selective checkpointing's cache: the outputs of the matmul and attention ops (see the module docstring)
        self.cached_ops: list[CachedOp] = []  # the ops a selective policy may cache, in call order (``_cached``)
        # Liger's kernels, or compile's partitioner, keep a norm's input and a SwiGLU's two inputs only; Unsloth's
        # norm too, its SwiGLU inside the fused LoRA MLP only (``unsloth_fused``)
        self.lean = layer.kernels is Kernels.LIGER or layer.compiled
        self.lean_norm = layer.kernels.saves_norm_input or layer.compiled
        self.grad = layer_requires_grad  # does the tensor flowing through the layer require grad?
        # what a layer's backward frees before its transients peak (``backward_freed``)
        self.mlp_freed_token = 0
        self.mlp_element_bytes = 0  # the dense MLP's intermediate [T, I] tensors (and so their gradients)
        self.attention_freed = Saved()
        self.eager_softmax = False
        # transformers' DynamicCache, where the model runs with use_cache (``kv_cache``): one layer's cached K and V
        # copies, and what they change in the layer's saved tensors (0 where the attention saves the copies)
        self.kv_held = 0
        self.kv_forward = 0
        self.gradless_linears: list[str] = []  # Linears called on an input that needs no gradient
        self.kv_forward_delta_at_batch_one = 0
        self.o_input_copy = 0  # o_proj's own contiguous copy of the attention output, where it saves one

    def result(self) -> Saved:
        return Saved(self.per_token, self.per_square, self.per_layer, self.per_position,
                     self.per_token_delta_at_batch_one)

    def cache(self, mode: GradCkpt = GradCkpt.SELECTIVE) -> Saved:
        """What selective checkpointing caches: every matmul and attention op's output (``selective``), or
        torchtitan's attention kernels' and the ``aten.mm`` outputs whose position among the layer's mm calls is odd
        (``selective-op``: ``mm_count % 2``, the 1st, 3rd, ...)."""
        ops = self.cached_ops
        if mode is GradCkpt.SELECTIVE_OP:
            ops = [op for op in ops if op.kind == "attention"] + [op for op in ops if op.kind == "mm"][::2]
        return Saved(sum(op.token for op in ops), sum(op.square for op in ops), sum(op.layer for op in ops))

    def _cached(self, kind: str, token: int = 0, square: int = 0, layer: int = 0, module: str = "") -> None:
        """One op whose output a selective policy may cache (bytes per token, per b·s², per layer): ``kind`` "mm"
        (``aten.mm``), "matmul" (another matmul op: ``addmm``, ``bmm``, ``gemm_4bit``, LLM.int8's, ``_grouped_mm``)
        or "attention" (an SDPA kernel: output, logsumexp, philox state); ``module``: the Linear it belongs to."""
        self.cached_ops.append(CachedOp(token, square, layer, kind, module))

    @property
    def attention_output_cached(self) -> bool:
        """Whether the attention kernel's output is among the cached ops (both policies keep it)."""
        return any(op.kind == "attention" for op in self.cached_ops)

    def _runs_after(self, module: str, after: str) -> None:
        """Put ``module``'s ops behind ``after``'s: Linears the walk takes as one group (they read one input) that
        the model calls apart."""
        moved = [op for op in self.cached_ops if op.module == module]
        rest = [op for op in self.cached_ops if op.module != module]
        last = max(i for i, op in enumerate(rest) if op.module == after)
        self.cached_ops = rest[:last + 1] + moved + rest[last + 1:]

    def _base_matmul(self, use: LinearUse) -> str:
        """The op kind of a decoder Linear's own matmul in the selective cache (``_cached``): "mm" for ``aten.mm``,
        "matmul" for ``addmm`` (a bias) or bitsandbytes' ``gemm_4bit`` (a 4-bit weight). bitsandbytes 0.50
        ``MatMul4Bit.forward`` (``bitsandbytes/autograd/_functions.py:324-345``) calls
        ``torch.ops.bitsandbytes.gemm_4bit``, never ``aten.mm``, so under torchtitan's call-order policy a 4-bit base
        shifts which of its adapter's mm calls are odd. A peft method on a --quant base (QDoRA) is walked on the
        16-bit base (``estimator._quantized_base_moments``): ``LayerSetup.base_4bit`` keeps its op kind 4-bit, so
        peft's DoRA calls (``lora/dora.py:97-98, 155``: lora_A and lora_B on an identity, then on x; four mm per
        target) keep their parity, and only [in, r] and [T, r] outputs are cached, as the trace shows."""
        if use.quantized or (self.layer.base_4bit and self.m.bnb_quantizable) or self._biased(use.name):
            return "matmul"
        return "mm"

    def _biased(self, name: str) -> bool:
        """Does the decoder Linear ``name`` carry a bias (its matmul is then ``addmm``, not ``mm``)?"""
        return next((module.bias for module in self.m.inventory.linears if module.name == name), False)

    def width_out(self, name: str) -> int:
        """Output features of a decoder Linear, by its module name (for the selective cache)."""
        m = self.m
        a, k, d = m.num_heads, m.num_kv_heads, m.head_dim
        base = name.rsplit(".", 1)[-1]
        if m.traits.mla:
            qk = m.qk_nope_head_dim + m.qk_rope_head_dim
            widths = {"q_a_proj": m.q_lora_rank, "q_proj": a * qk, "q_b_proj": a * qk,
                      "kv_a_proj_with_mqa": m.kv_lora_rank + m.qk_rope_head_dim,
                      "kv_b_proj": a * (m.qk_nope_head_dim + m.v_head_dim)}
            if base in widths:
                return widths[base]
        width = m.shared_expert_width if name.startswith(m.traits.shared_expert_prefix) else m.intermediate_size
        widths = {"q_proj": a * d, "k_proj": k * d, "v_proj": k * d, "qkv_proj": (a + 2 * k) * d,
                  "gate_proj": width, "up_proj": width, "gate_up_proj": 2 * width}
        if base in widths:
            return widths[base]
        # other layouts' names (query_key_value, fc1, dense_h_to_4h, c_attn, w1, ...): the module inventory's
        return next((module.out_features for module in m.inventory.linears if module.name == name), m.hidden_size)

    # -- building blocks --------------------------------------------------------------------------
    def norm(self, width: int, x_bytes: int, rows: int = 1, residual: bool = False) -> int:
        """RMSNorm over ``width`` (``rows`` normalised rows per token); returns its output's bytes per element.
        ``residual``: a norm of the residual stream (a block's input and post norms, the final norm), which runs
        sequence-parallel under ``LayerSetup.sequence_shards`` T > 1 (torchtitan's ``SequenceParallel`` norms) on the
        rank's [b, s/T, h] shard, so it saves 1/T of its bytes per token of the sequence (``sequence_sharded_bytes``);
        q/k norms run on the rank's heads over the whole sequence."""
        before = self.per_token
        out = self._norm(width, x_bytes, rows)
        if residual and self.layer.sequence_shards > 1:
            self.per_token = before + sequence_sharded_bytes(self.per_token - before, self.layer.sequence_shards)
        return out

    def _norm(self, width: int, x_bytes: int, rows: int = 1) -> int:
        if self.m.traits.layer_norm:
            return self.layer_norm(width, x_bytes)
        if self.lean_norm:
            # Liger / Unsloth / compile: the input as is and a [T] fp32 rstd, whenever a gradient flows or the weight
            # trains
            if self.grad or self.norms_train:
                self.per_token += x_bytes * width * rows + _F32 * rows
            self.grad = self.grad or self.norms_train
            return x_bytes if self.layer.kernels.saves_norm_input else max(self.dt.norm_out, x_bytes)
        if self.grad:
            self.per_token += _F32 * width * rows + _F32 * rows  # fp32 input (or the fp32 input itself), rsqrt
            if self.m.traits.centered_norm:  # cohere2 (Cohere2LayerNorm.forward L96-102): a second x - mean
                self.per_token += _F32 * width * rows
                self.per_layer += (_F32 * width) if self.dt.r != _F32 else 0  # weight.to(fp32), saved by the product
        if self.norms_train:  # y saved for the weight gradient (fp32: Gemma, or a stack's fp32 product, stack_layers.py)
            fp32_y = self.gemma_norm or self.layer.layers.norm_fp32_product
            self.per_token += (_F32 if fp32_y else x_bytes) * width * rows
        self.grad = self.grad or self.norms_train
        return x_bytes if self.gemma_norm else max(self.dt.norm_out, x_bytes)

    def linears(self, uses: list[LinearUse], x_bytes: int, x_saved: bool = False) -> int:
        """Linears reading one tensor of ``x_bytes`` per element; returns their output's bytes per element."""
        c, autocast = self.dt.c, self.dt.autocast
        self.cast_saved = False  # compile: one cast of the shared input for every LoRA module reading it
        if unsloth_fused(self.m, self.layer, [use.name for use in uses]):
            # Unsloth's LoRA_QKV / LoRA_W (kernels/fast_lora.py): ``ctx.save_for_backward(X, A, B, ...)``, the input
            # once; the X @ A products are recomputed in backward
            if not x_saved:
                self.per_token += x_bytes * uses[0].width_in
            self.grad = True
            return x_bytes
        if not self.grad:  # F.linear saves neither this input nor the weight (or its autocast copy) for them
            self.gradless_linears += [use.name for use in uses]
        quantized = any(use.quantized for use in uses)
        if quantized:
            out = x_bytes  # Linear4bit computes in (and returns) its input's dtype (set_compute_type)
            base_out = out
            if any(use.lora for use in uses) and autocast:
                out = max(out, c)
        else:
            out = c if autocast else max(x_bytes, self.dt.r)
            base_out = out
        for use in uses:  # in call order: the base Linear's matmul, then its adapter's
            width = use.width_in
            # selective caches: the base matmul's output (``aten.mm``; ``addmm`` with a bias, bitsandbytes'
            # ``gemm_4bit`` for a quantized weight, also under a method estimated on the 16-bit base:
            # ``_base_matmul``)
            self._cached(self._base_matmul(use), base_out * self.width_out(use.name), module=use.name)
            if use.trains and not use.quantized:
                if autocast and x_bytes != c:
                    self.per_token += c * width  # a private autocast copy per Linear
                elif not x_saved:
                    self.per_token += x_bytes * width
                    x_saved = True
            if use.lora:
                x_saved = self._lora(use, x_bytes, x_saved)
        self.grad = self.grad or any(use.trains or use.lora for use in uses)
        return out

    def _lora(self, use: LinearUse, x_bytes: int, x_saved: bool) -> bool:
        """One LoRA module on an input of ``width``; returns whether the shared input is now saved."""
        width = use.width_in
        layer = self.layer
        if layer.method is Method.IA3:  # terms/peft_methods.py
            return ia3_saved(self, width, self.width_out(use.name), use.name.split(".")[-1] in IA3_FEEDFORWARD,
                             x_bytes, x_saved)
        if layer.method in (Method.LOHA, Method.LOKR):
            return delta_weight_saved(self, width, self.width_out(use.name), x_bytes, x_saved,
                                      kron=layer.method is Method.LOKR, rank=layer.lora_rank)
        if layer.method is Method.VERA:
            vera_saved(self, width, self.width_out(use.name), layer.lora_rank)
            return x_saved
        if layer.method is Method.OFT:
            return oft_saved(self, width, x_bytes, x_saved, oft_block_size(width, layer.lora_rank))
        c, adapter, autocast = self.dt.c, self.dt.adapter, self.dt.autocast
        dropout = layer.lora_dropout > 0
        if dropout and self.grad:
            self.per_token += 1 * width  # native_dropout's bool mask (CUDA)
        shared_cast = self.layer.compiled and not dropout  # the partitioner's graph computes the cast once (CSE)
        if autocast and adapter != c:
            if not (shared_cast and self.cast_saved):
                self.per_token += c * width  # autocast's private copy of lora_A's input
                self.cast_saved = True
        elif dropout or adapter != x_bytes:
            if not (shared_cast and self.cast_saved):
                self.per_token += adapter * width  # dropout output or peft's cast, saved by lora_A
                self.cast_saved = True
        elif not x_saved:
            self.per_token += x_bytes * width
            x_saved = True
        self.per_token += (c if autocast else adapter) * layer.lora_rank  # lora_A's output, saved by lora_B
        if layer.method is Method.DORA:  # the base output and lora_B's output, saved by the magnitude's products
            out = self.width_out(use.name)
            # with dropout the base output is F.linear(dropout(x), W) in x's (the adapter's) dtype, not the base
            # Linear's own result
            base_out = c if autocast else adapter if dropout else max(x_bytes, self.dt.r)
            self.per_token += dora_saved_per_token(out, base_out, c if autocast else adapter)
            self.per_layer += dora_per_layer_bytes(out, adapter)
            if dropout and self.grad:  # (saved for the dropped input's gradient: none in a no-grad first layer)
                self.per_layer += dora_dropout_weight_saved_bytes(width, out, c, adapter, self.dt.r, autocast,
                                                                  use.quantized)
        if layer.method is Method.DORA:
            # peft DoraLinearLayer.get_lora_weight: lora_B(lora_A(eye(in))), two mm on an [in, in] identity whose
            # outputs are [in, r] and [in, out], each layer's, before the adapter runs on x
            eye_bytes = c if autocast else adapter
            self._cached("mm", layer=eye_bytes * width * layer.lora_rank, module=use.name)
            self._cached("mm", layer=eye_bytes * width * self.width_out(use.name), module=use.name)
        # selective caches: lora_A's and lora_B's matmul outputs (two ``aten.mm``)
        self._cached("mm", (c if autocast else adapter) * layer.lora_rank, module=use.name)
        self._cached("mm", (c if autocast else adapter) * self.width_out(use.name), module=use.name)
        if layer.method is Method.DORA and dropout:  # DoRA's own F.linear(dropout(x), W) for the base output
            self._cached("mm", (c if autocast else adapter) * self.width_out(use.name), module=use.name)
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
        if m.traits.parallel_block:
            return self.parallel_attention_block()  # layouts.py
        # the layer input: r, or fp32 after the first layer under QLoRA in LayerNorm layouts (``residual_bytes``)
        self._x_in = residual_bytes(m, self.layer) if self.grad or m.traits.embedding_norm else self.dt.r
        n = self.norm(m.hidden_size, self._x_in, residual=True) if m.traits.pre_norms else self.dt.r
        if self.conv:  # a hybrid's convolution layer (short_conv.py)
            out = self.short_conv(n)
        else:
            out = self._mla(n) if m.traits.mla else self._attention(n)
        if m.traits.post_norms:
            self.norm(m.hidden_size, out, residual=True)  # post_attention_layernorm on the attention output

    def _attention(self, n: int) -> int:
        m, dt = self.m, self.dt
        h, a, k, d = m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim
        c = dt.c
        uses = [self.use(name, h) for name in m.traits.qkv_names]
        grad_in = self.grad
        if self.layer.layers.fused_qkv_lora:  # litgpt: one adapter on the fused qkv (stack_layers.py)
            qkv = stack_layers.fused_qkv_lora_linears(self, uses, n)
        else:
            qkv = self.linears(uses, n)
        v_bytes = qkv  # v_proj's output, which no norm or rotation touches
        if m.qk_norm and m.traits.weightless_qk_norm:
            # Llama-4's L2 norm after RoPE (``_norm(x.float()).type_as(x)``): the fp32 input and rsqrt of q and k
            # (NoPE layers have none: counted in every layer, an overestimate on one layer in four)
            if self.grad:
                self.per_token += _F32 * (a + k) * d + _F32 * (a + k)
        elif m.qk_norm:
            qkv = self._qk_norms(uses, qkv, grad_in)
        if m.traits.rope_copies_per_layer and self.grad:
            # glm4, ernie4_5: cos[..., :d/2].repeat_interleave(2) and sin's, new in every layer, saved by q·cos and
            # rotate_half(q)·sin (and k's products: the same tensors), [1, 1, s, d_rope] each
            self.per_position += 2 * (_F32 if m.traits.rope_fp32 else dt.r) * m.rope_dim
        embed = max(qkv, dt.r)  # RoPE multiplies by cos/sin in the residual dtype
        o_use = self.use(m.traits.o_name, a * d)
        if self.layer.method is Method.PREFIX:  # the trained key/value prefix: every attention needs a gradient
            self.grad = True  # (its n extra positions: terms/peft_methods.py::prefix_saved_bytes)
        kv_saved = kv_pinned = 0  # ``_cached_kv``: the element bytes the attention saves k and v in, if it saves them
        cache_delta_at_batch_one = 0  # what the cache's copies change at batch 1 (eager: ``_cached_kv``)
        # which of q, k and v needs a gradient (in the first layer under LoRA on q and v, k does not): q @ kᵀ saves q
        # for k's gradient and k for q's, probs @ v saves v for the probabilities' (eager and the math kernel)
        q_grad, k_grad, _ = self._qkv_grads(uses, grad_in)
        scores_grad = q_grad or k_grad
        if m.traits.rope_copies_per_projection:
            # GPT-J's apply_rotary_pos_emb, called for k and then q: sin and cos repeat-interleaved to [1, s, 1, d_rope]
            # each time, saved by tensor·cos and rotate_every_two(tensor)·sin where that tensor needs a gradient
            self.per_position += 2 * dt.r * m.rope_dim * (q_grad + k_grad)
        if self.layer.rope_gathered:
            # torchtune's RoPE under packing (``Llama3ScaledRoPE.forward`` / ``RotaryPositionalEmbeddings.forward``,
            # ``rope_cache = self.cache[input_pos]``, the same at 1814feb17 and 0.6.1): each call for q and for k
            # gathers an fp32 [b, s, 1, d/2, 2] copy (4·d per token) that ``xshaped[..., i] * rope_cache[..., j]``
            # saves where its tensor needs a gradient. Compiled, the layer's graph gathers once for both (CSE: one
            # ``index`` whose two ``select``s are saved; checked with torch 2.13's and 2.5.1's partitioners on
            # torchtune's layer)
            gathers = (q_grad or k_grad) if self.layer.compiled else q_grad + k_grad
            self.per_token += _F32 * m.rope_dim * gathers
        fused_qkv = m.traits.fused_qkv or self.layer.layers.fused_qkv
        if self.layer.attn_used is Attention.EAGER:
            if self.grad:
                q_bytes = c if dt.autocast else embed
                repeat = a // k
                kv_width = a * d if repeat > 1 else k * d
                # q, the repeated k and v (bmm saves v for the probabilities' gradient, k for q's); at batch 1 a
                # multi-query k and v stay repeat_kv's expanded views (the stride-0 head dim merges with b = 1), k·d
                # wide, and a fused qkv's v stays a view of the qkv output, which it pins whole
                self.per_token += q_bytes * (a * d * k_grad + kv_width * (q_grad + scores_grad))
                if m.traits.eager_fp32_scores and not dt.autocast and q_bytes != _F32:
                    # GPT-J: matmul(query.to(fp32), key.to(fp32)ᵀ) saves fp32 copies of q and k instead
                    self.per_token += (_F32 - q_bytes) * (a * d * k_grad + kv_width * q_grad)
                k_delta = q_bytes * (k * d - kv_width) if k == 1 else 0
                v_delta = k_delta
                # (BLOOM's q, k and v are reshape copies of its fused output, never views that pin it)
                if repeat == 1 and fused_qkv and qkv == q_bytes and not m.traits.alibi:
                    v_delta = qkv * (a + 2 * k) * d - q_bytes * kv_width
                self.per_token_delta_at_batch_one += k_delta * q_grad + v_delta * scores_grad
                # with a DynamicCache the attention gets the cache's copies: at batch 1 a multi-query k and v are
                # views of them (nothing beyond the cache), and a fused qkv's v no longer pins the qkv output
                cache_delta_at_batch_one = -v_delta * scores_grad if v_delta > 0 else 0
                if k == 1:
                    cache_delta_at_batch_one -= q_bytes * k * d * (q_grad * (embed == q_bytes)
                                                                   + scores_grad * (v_bytes == q_bytes))
                kv_saved = q_bytes if repeat == 1 else 0  # the matmuls save the cache's own k and v
                if m.traits.attention_sinks or m.traits.softmax_in_dtype:
                    self._sink_softmax(q_bytes)
                else:
                    # fp32 softmax, and its cast to the query dtype (the same tensor when that is fp32)
                    probs_copy = q_bytes if q_bytes != _F32 else 0
                    if self.layer.compiled and probs_copy:
                        # compile's partition keeps the 16-bit scores (bmm's output) and the softmax's fp32 row max
                        # and sum, [b, a, s, 1] each, and recomputes the fp32 softmax from them
                        self.per_square += (q_bytes + probs_copy) * a
                        self.per_token += 2 * _F32 * a
                    else:
                        self.per_square += (_F32 + probs_copy) * a
                    # probs @ v saves the cast probabilities and the (repeated) v: its backward frees them before
                    # the softmax's backward runs
                    self.eager_softmax = True
                    self.attention_freed = Saved(per_token=q_bytes * kv_width * scores_grad,
                                                 per_square=probs_copy * a,
                                                 per_token_delta_at_batch_one=v_delta * scores_grad)
                if self.gemma:
                    self.per_square += q_bytes * a  # tanh soft-capping output
            # selective cache: the two matmuls (bmm, which selective-op recomputes): scores [b, a, s, s] and the
            # output [b, a, s, d]
            scores_bytes = c if dt.autocast else embed
            self._cached("matmul", square=scores_bytes * a)
            self._cached("matmul", scores_bytes * a * d)
            out_bytes = c if dt.autocast else embed
            # the output's contiguous copy, saved only where o_proj saves its input as it is (not an adapter's cast
            # copy of it), in the first layer too, whose attention needs no gradient when o_proj alone is adapted
            if self._input_saved([o_use], out_bytes):
                self.per_token += out_bytes * a * d
                if self.eager_softmax:  # freed by o_proj's backward, the first of the block's
                    self.attention_freed += Saved(per_token=out_bytes * a * d)
        else:
            out_bytes = c if dt.autocast else embed
            # transformers < 4.54 repeats k and v to all heads before SDPA (``repeat_kv``; for one kv head an
            # expand + reshape view), so the kernel sees a = k heads: fp32 takes the efficient kernel, not math
            hf_repeated = self.layer.repeat_kv and self.layer.attn_used is Attention.SDPA and a > k > 1
            kernel = self.sdpa_kernel(a, a if hf_repeated else k, d, d, out_bytes)
            if self.grad:
                # transformers' repeat_kv copies k and v to a heads, but for one kv head (multi-query) its expand +
                # reshape is a view (a size-1 dim merges with the stride-0 one): SDPA gets the k*d tensors
                # (integrations/sdpa_attention.py repeat_kv; use_gqa_in_sdpa is False with a mask); or a stack that
                # always expands (stack_layers.kv_expanded)
                repeated = (self.masked and a > k > 1) or (self.layer.layers.kv_expanded and a > k) or hf_repeated
                kv_width = a * d if repeated else k * d
                pinned = fused_qkv and not repeated and not (m.traits.layer_norm and qkv != out_bytes)
                kv_saved = out_bytes if kernel != "math" and not repeated else 0  # SDPA saves the cache's k, v
                kv_pinned = qkv * (a + k) * d if pinned else 0  # (the cache's v copy releases the fused output)
                if kernel == "math":
                    # the math kernel (``_scaled_dot_product_attention_math``, decomposed under autograd) saves its
                    # scaled q and k, its fp32 probabilities and the repeated v, not its output: o_proj's contiguous
                    # copy of it is saved only when o_proj saves its input. Its backward is eager's: probs @ v's
                    # backward frees v, then the softmax's runs on [b, a, s, s] fp32 gradients
                    o_input = out_bytes * a * d if self._input_saved([o_use], out_bytes) else 0
                    self.per_square += _F32 * a
                    self.per_token += _F32 * a * d * (k_grad + q_grad + scores_grad) + o_input
                    self.eager_softmax = True
                    self.attention_freed = Saved(per_token=_F32 * a * d * scores_grad + o_input)
                    # selective cache: its two bmm outputs, the fp32 scores and the output (the kernel is
                    # CompositeImplicit: a policy sees the bmm calls, not the kernel)
                    self._cached("matmul", square=_F32 * a)
                    self._cached("matmul", _F32 * a * d)
                else:
                    self.per_token += out_bytes * (2 * a * d + 2 * kv_width) + _F32 * a
                    self.per_layer += SEED_OFFSET_BYTES
                    if self.layer.compiled and self.layer.ring_ranks > 1:  # --cp: the ring's gathered K/V
                        self.per_token += compiled_ring_saved_bytes(self.layer.ring_ranks, kv_width, out_bytes)
                    # selective cache: the kernel's output, logsumexp and philox seed and offset
                    self._cached("attention", out_bytes * a * d + _F32 * a, layer=SEED_OFFSET_BYTES)
                if self.masked:
                    # SDPA converts the boolean mask to an additive one per call and the efficient kernel saves it
                    # (torch convert_boolean_attn_mask, _scaled_dot_product_efficient_attention)
                    self.per_square += out_bytes
                if pinned:
                    # (LayerNorm families under autocast: an fp32 qkv reaches SDPA as a 16-bit cast copy, no view)
                    # v is a view of the fused qkv output and pins all of it; the flash kernel's output keeps the
                    # query's [b, a, s, d] layout, so o_proj gets a contiguous copy, kept only where o_proj saves
                    # its input itself (``_input_saved``): a LoRA o_proj whose adapter casts (an fp32 adapter,
                    # dropout) saves the cast, and the copy dies after o_proj (peft lora/layer.py Linear.forward:
                    # ``x = self._cast_input_dtype(x, lora_A.weight.dtype)``)
                    self.per_token += qkv * (a + k) * d
                    if kernel == "flash" and self._input_saved([o_use], out_bytes):
                        self.per_token += out_bytes * a * d
                elif ((m.rotary_dim or self.layer.layers.query_head_major) and kernel == "flash"
                      and not m.traits.rope_copies_per_projection  # GPT-J concatenates before the transpose
                      and self._input_saved([o_use], out_bytes)):
                    # (litgpt: q = torch.cat(...) is a new [b, a, s, d] tensor too, stack_layers.query_head_major)
                    # partial rotary: q = cat(q_rot, q_pass) is a new [b, a, s, d] tensor, the flash output keeps
                    # that layout, so o_proj (dense) gets a contiguous copy (modeling_phi.py L212, L233)
                    self.per_token += out_bytes * a * d
                    self.o_input_copy = out_bytes * a * d
        self._cached_kv((k * d, embed, kv_saved == embed), (k * d, v_bytes, kv_saved == v_bytes), kv_pinned,
                        cache_delta_at_batch_one)
        before = self.per_token
        # the attention saved o_proj's input already (an SDPA kernel's output, or the copy counted above), except
        # where no gradient flows through it (the first layer with o_proj alone adapted): o_proj saves it then
        counted = self.grad or self.layer.attn_used is Attention.EAGER
        out = self.linears([o_use], out_bytes, x_saved=counted)
        if self.eager_softmax:  # o_proj's own saved inputs (an adapter's cast or dropout copies)
            self.attention_freed += Saved(per_token=self.per_token - before)
        return out

    def _cached_kv(self, k: tuple[int, int, bool], v: tuple[int, int, bool], pinned: int = 0,
                   delta_at_batch_one: int = 0) -> None:
        """One layer's DynamicCache entry (``kv_cache``): its two copies, each (elements per token, element bytes,
        whether autograd saves the copy itself), and what they add to the layer's saved tensors: nothing for a
        copy saved as it is (the original it replaces dies), the whole copy otherwise (what is saved is a cast or
        repeated copy, or nothing); ``pinned``: what the copies release (a fused qkv output v was a view of);
        ``delta_at_batch_one``: what they change beyond that at batch 1 (eager attention's views,
        ``Saved.per_token_delta_at_batch_one``). Offloaded (``--activation-offload``): the saved tensors go to the
        host, the cache's stay: every copy adds."""
        held = sum(width * size for width, size, _ in (k, v))
        self.kv_forward_delta_at_batch_one = 0
        if self.layer.offload:
            self.kv_held, self.kv_forward = held, held
            return
        shared = sum(width * size for width, size, saved in (k, v) if saved)
        self.kv_held, self.kv_forward = held, held - shared - pinned
        self.kv_forward_delta_at_batch_one = delta_at_batch_one

    def _qkv_grads(self, uses: list[LinearUse], grad_in: bool) -> tuple[bool, bool, bool]:
        """Whether q, k and v each need a gradient: the layer input does, or their projection trains or carries an
        adapter; one fused projection (or litgpt's one adapter on all of qkv) gives the three the same answer."""
        if len(uses) == 3 and not self.layer.layers.fused_qkv_lora:
            return tuple(grad_in or use.trains or use.lora for use in uses)
        return (self.grad,) * 3

    def _qk_norms(self, uses: list[LinearUse], qkv: int, grad_in: bool) -> int:
        """q_norm and k_norm, per head over d (Qwen3, Gemma-3) or over the whole a·d and k·d (olmo2). Each saves
        only where its own projection's output needs a gradient: the layer input does, or that projection trains
        or carries an adapter (in the first layer under LoRA on q and v, k_proj's output needs none, so k_norm saves
        nothing: ``Qwen3RMSNorm`` autograd records nothing for a tensor without grad)."""
        m = self.m
        a, k, d = m.num_heads, m.num_kv_heads, m.head_dim
        whole = m.traits.qk_norm_whole
        after = self.grad  # whether any of q, k, v needs a gradient
        grads = self._qkv_grads(uses, grad_in)[:2]
        out = 0
        for grad, heads in zip(grads, (a, k)):
            self.grad = grad
            out = max(out, self.norm(heads * d, qkv) if whole else self.norm(d, qkv, rows=heads))
        self.grad = after or self.norms_train
        return out

    def _sink_softmax(self, q_bytes: int) -> None:
        """The eager softmax in the scores' dtype (Llama-4's ``softmax(attn_weights, dim=-1)``, modeling_llama4.py
        L266-272; gpt-oss's with sinks). gpt-oss's eager attention (modeling_gpt_oss.py L237-253): the scores plus the 4-D mask (in the residual
        dtype r) are concatenated with the per-head sink logit into [b, a, s, s + 1]; ``max(dim=-1)`` saves its int64
        indices (8·a per token); the softmax runs in that dtype, max(q, r), and saves its output (s + 1 columns);
        when that is not the value dtype, the cast copy of the s score columns is what the second matmul saves.
        Llama-4's softmax has no dtype, so under CUDA autocast it runs in fp32 whatever its input (softmax is one of
        autocast's ``fp32_set_opt_dtype`` ops, ``aten/src/ATen/autocast_mode.cpp``; ``tracing/cuda_emulation.py``
        item 6); gpt-oss passes its dtype."""
        a = self.m.num_heads
        softmax = max(q_bytes, self.dt.r)
        if self.m.traits.softmax_in_dtype and self.dt.autocast:
            softmax = _F32
        self.per_square += softmax * a + (q_bytes * a if softmax != q_bytes else 0)
        if self.m.traits.attention_sinks:
            self.per_token += softmax * a + 8 * a

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
            self._runs_after("kv_a_proj_with_mqa", "q_b_proj")  # q_b_proj(q_a_layernorm(q_a_proj(x))) runs first
        kvn = self.norm(kv_r, proj)
        kv = self.linears([self.use("kv_b_proj", kv_r)], kvn)
        qk = nope + rope
        o_use = self.use("o_proj", a * v)
        if self.layer.attn_used is Attention.EAGER:
            # eager_attention_forward (a = k: repeat_kv is a no-op): q and K saved by the first matmul, the fp32
            # softmax and its cast (saved by the second matmul, with V, a view of kv_b's output), and the output's
            # contiguous copy when o_proj saves its input
            if self.grad:
                q_bytes = c if dt.autocast else max(c, dt.r)
                self.per_token += q_bytes * a * qk * 2 + kv * a * (nope + v)
                self.per_square += (_F32 + (q_bytes if q_bytes != _F32 else 0)) * a
                if o_use.trains or o_use.lora:
                    self.per_token += q_bytes * a * v
            self._mla_cache(proj, kvn)
            return self.linears([o_use], c, x_saved=True)
        if self.grad:
            # q with rope applied, K assembled, kv_b's output (V is a view), output and logsumexp
            self.per_token += c * a * qk + c * a * qk + kv * a * (nope + v) + c * a * v + _F32 * a
            self.per_layer += SEED_OFFSET_BYTES
        # selective caches: the memory-efficient kernel's output, logsumexp and philox seed and offset
        self._cached("attention", c * a * v + _F32 * a, layer=SEED_OFFSET_BYTES)
        self._mla_cache(proj, kvn)
        return self.linears([o_use], c, x_saved=True)

    def _mla_cache(self, proj: int, kvn: int) -> None:
        """MLA's DynamicCache entry: the compressed latents, kv_a_layernorm's output [b, 1, s, kv_lora_rank] and the
        rotated shared k_rot [b, 1, s, rope] (transformers 5.25 DeepseekV3Attention.forward L442-444 and
        DeepseekV2Attention.forward L378-380: ``cache.update(kv_nope, k_rot)`` before ``expand_kv``). kv_b_proj then
        reads the latent's copy: saved as it is where kv_b_proj saves its input itself (``_input_saved``: the norm's
        output then dies); k_rot's copy is expanded into a new K, never saved."""
        m, dt = self.m, self.dt
        rope_bytes = proj if m.traits.rope_complex else max(proj, dt.r)  # RoPE by cos, sin in the residual dtype
        latent_saved = self.grad and self._input_saved([self.use("kv_b_proj", m.kv_lora_rank)], kvn)
        self._cached_kv((m.kv_lora_rank, kvn, latent_saved), (m.qk_rope_head_dim, rope_bytes, False))

    def mlp_block(self, moe: bool) -> None:
        m = self.m
        if m.traits.parallel_block:
            return self.parallel_mlp_block()  # layouts.py
        self._x_saved = False  # starcoder2: the MLP's LayerNorm reads x + attention, not the layer input
        n = self.norm(m.hidden_size, self._x_in, residual=True) if m.traits.pre_norms else self.dt.r
        if moe or m.traits.gated_mlp:
            out = self._moe(n) if moe else self._gated_mlp(n, m.mlp_width, prefix="")
        else:
            out = self._plain_mlp(n, False)  # layouts.py: up -> GELU -> down
        if m.traits.post_norms:
            self.norm(m.hidden_size, out, residual=True)  # post_feedforward_layernorm

    def _gated_mlp(self, n: int, width: int, prefix: str, x_saved: bool = False, extra: list = ()) -> int:
        """``x_saved``: the input is already saved by another Linear reading it (cohere2's parallel block);
        ``extra``: more Linears reading the same input (Qwen2-MoE's shared_expert_gate)."""
        m = self.m
        if not prefix and not extra and unsloth_fused(m, self.layer, m.traits.mlp_names):
            # Unsloth's LoRA_MLP (kernels/fast_lora.py:69-112): saves X, e (gate's output) and g (up's) only; the
            # SwiGLU product h and the X @ A products are recomputed in backward, which then works in place
            if not x_saved:
                self.per_token += n * m.hidden_size
            self.per_token += 2 * n * width
            self.mlp_element_bytes = n
            self.grad = True
            return n
        grad_in = self.grad
        if m.traits.fused_gate_up:
            out = self.linears([self.use("gate_up_proj", m.hidden_size)], n, x_saved=x_saved)
            saved = 3  # act's input, act's output, up's output (Phi-3: gate_up pinned + act)
        else:
            gate, up = (f"{prefix}gate_proj", f"{prefix}up_proj") if prefix else m.traits.mlp_names[:2]  # Qwen: w1, w2
            uses = [self.use(gate, m.hidden_size), self.use(up, m.hidden_size)]
            out = self.linears([*uses, *extra], n, x_saved=x_saved)
            # act's input if gate's output needs a gradient, and then up's output (mul saves it for act's); act's
            # output if up's output needs one (in the first layer under LoRA on gate alone, up's needs none)
            gate_grad, up_grad = (grad_in or use.trains or use.lora for use in uses)
            saved = 2 * gate_grad + up_grad
        if self.grad:
            # Liger's SiLUMul and compile's partition keep gate's and up's outputs only (silu recomputed)
            self.per_token += (2 if self.lean else saved) * out * width
        down = f"{prefix}down_proj" if prefix else m.traits.mlp_names[-1]
        if not prefix:  # QLoRA's Linear4bit computes in its input's dtype: fp32 under mixed precision
            self.mlp_element_bytes = out
        before = self.per_token
        out = self.linears([self.use(down, width)], out)
        if not prefix and not self.lean:  # the dense MLP's down input, freed by its backward before mul's runs
            self.mlp_freed_token = self.per_token - before
        return out

    def _moe(self, n: int) -> int:
        """Router (fp32 scores over E experts, top-K) and v5's grouped experts over S = T·K token slots
        (``integrations/moe.py::grouped_mm_experts_forward``)."""
        m, dt = self.m, self.dt
        c = dt.c
        h, E, K, width = m.hidden_size, m.num_experts, m.experts_per_token, m.expert_width
        if m.traits.dense_experts:
            return self._dense_experts(n)
        router_lora = "gate.weight" in self.layer.lora_experts and not self.full  # peft's ParamWrapper on the router
        if m.traits.moe_biases:
            # gpt-oss router (GptOssTopKRouter.forward): top-k of the logits (topk saves its int64 indices), then a
            # softmax in the logits' dtype over the K values (saves its output); a trained router's input
            self.per_token += 8 * K + c * K + (c * h if self.full else 0)
        elif self.grad or not self.layer.lora_experts or router_lora:
            # router: fp32 scores [T, E], top-k values and int64 indices, their normaliser; a trained router's input
            # (peft's LoRA on gate.weight, terms/moe_lora.py, trains it too: F.linear saves its input, c bytes wide,
            # DeepSeek's fp32 copy included, on tiny deepseek_v2/v3 and qwen3_moe, mixtral traces)
            self.per_token += _F32 * E + (_F32 + 8) * K + _F32 + (c * h if self.full or router_lora else 0)
        # torch._grouped_mm has no autocast kernel: the experts compute in their input's dtype (fp32 under mixed
        # precision; tests/test_trace_moe.py)
        e = n if dt.autocast else c
        # per slot: gate_up output (pinned by act and *), act output, down output (the routing weight needs it),
        # and the int64 sort, permutation and gather indices
        # gpt-oss's clamped SwiGLU (GptOssExperts._apply_gate): gate_up output (pinned by the two clamps), the clamped
        # gate, sigmoid's output, up + 1 and glu: 6 widths in place of 3
        act = 6 if m.traits.clamped_swiglu else 3
        if self.layer.compiled and not m.traits.clamped_swiglu:
            # compile's partition keeps the gate_up output only and recomputes silu(gate) in backward, as for a dense
            # SwiGLU (``_gated_mlp``): traced on qwen3-30b-a3b and tiny qwen3_moe, the act output [S, I] is not among
            # the compiled layer's saved tensors (``tracing/compiled.py``: min_cut_rematerialization_partition)
            act = 2
        ep = self.layer.ep  # --ep: the rank's experts get T·K/ep slots, top-1 (uniform routing, terms/expert_parallel)
        if self.layer.lora_experts and not self.full and not self.grad and not router_lora:
            # peft's ParamWrapper LoRA on the experts of a layer whose input needs no gradient (the first layer, no
            # adapter before it): the router saves nothing, the routed output only the routing weights (terms/moe_lora)
            self.per_token += K * moe_lora.ungraded_routing_saved_per_slot(e, act * width) // ep
        else:
            self.per_token += K * (act * e * width + e * h + 3 * 8) // ep
        if self.full:
            self.per_token += K * (e * h + e * width) // ep  # gathered input and product, for the weight gradients
        elif self.layer.lora_experts:
            saved = moe_lora.param_wrapper_saved(m, self.layer.lora_experts, dt.r, e, self.grad)
            self.per_token += saved.per_token // ep
            self.per_layer += saved.per_layer // ep
        if self.layer.ep_dispatch:
            self.per_token += K * expert_parallel.dispatch_saved_per_slot() // ep
        # selective caches: the router's matmul output [T, E] (fp32 where the router runs in fp32) and, for
        # ``selective`` only, the grouped experts' two matmul outputs per slot, gate_up [S, 2I] and down [S, h]
        # (``_grouped_mm``, a matmul op of ``tracing/step.py::_selective_ops``, not an ``aten.mm``)
        self._cached("mm", (_F32 if m.traits.router_fp32 else c) * E)  # the router's aten.mm
        self._cached("matmul", K * (2 * width + h) * e // ep)  # the experts' two _grouped_mm
        # the shared expert reads the layer's input: with LoRA'd experts its gradient need is the input's
        self.grad = self.grad if self.layer.lora_experts and not self.full else True
        if m.n_shared_experts:
            self._shared_expert(n)
        self.grad = True
        return c

    def _dense_experts(self, n: int) -> int:
        """Llama4TextMoe.forward (modeling_llama4.py L145-177): the router (an nn.Linear) saves its input when it
        trains, top-k its int64 indices, the fp32 sigmoid its output [T, E] and the cast scores column [E·T, 1]
        (c) is saved by the scaling product, with the repeated input [E·T, h] (n bytes, the norm output's dtype);
        each expert's bmm then runs on all T tokens: the gate_up output [E·T, 2I] (pinned by silu and *) and act's
        output (c); with trained experts also bmm's inputs (the scaled input, cast to c under autocast, and the
        product). Then the shared expert on the same input (``_shared_expert``)."""
        m, dt = self.m, self.dt
        c = dt.c
        h, E, K, width = m.hidden_size, m.num_experts, m.experts_per_token, m.expert_width
        self.per_token += 8 * K + _F32 * E + c * E + n * E * h + (c * h if self.full else 0)
        self.per_token += E * 3 * c * width
        if self.full:
            self.per_token += E * (c * h + c * width)
        self.grad = True
        if m.n_shared_experts:
            self._shared_expert(n)
        return c

    def _shared_expert(self, n: int) -> None:
        """The shared expert MLP beside the routed ones. Qwen2-MoE (``Qwen2MoeSparseMoeBlock.forward``) reads the
        router's own input and gates its output: ``sigmoid(shared_expert_gate(x)) * shared_expert(x)`` saves the
        [T, 1] sigmoid output and the shared expert's [T, h] output (c each); DeepSeek's router reads an fp32 copy,
        so its shared experts save their input themselves."""
        m = self.m
        t = m.traits
        trained_router = self.full or "gate.weight" in self.layer.lora_experts
        shares_router_input = trained_router and not t.router_fp32  # the trained router saved the same x
        gate = [self.use("shared_expert_gate", m.hidden_size)] if t.shared_expert_gate else []
        out = self._gated_mlp(n, m.shared_expert_width, prefix=t.shared_expert_prefix, x_saved=shares_router_input,
                              extra=gate)
        if gate and self.grad:
            self.per_token += out * (1 + m.hidden_size)


def gemma_norm(model: ModelSpec) -> bool:
    """GemmaRMSNorm's layout: an fp32 (1 + w) product, then the cast (Gemma-2, and the families whose trait says so)."""
    return model.family == "gemma2" or model.traits.gemma_norm


def unsloth_fused(model: ModelSpec, layer: LayerSetup, names) -> bool:
    """Does Unsloth replace this group of Linears (q/k/v, o, or the gated MLP's three) by its manual-autograd LoRA
    function? ``unsloth/models/llama.py`` ``patch_peft_model``: only when the adapter's dropout is 0 and its bias
    "none", and every Linear of the group has a LoRA adapter (plain LoRA, no DoRA magnitude) and no bias."""
    if (layer.kernels is not Kernels.UNSLOTH or layer.method not in (Method.LORA, Method.QLORA)
            or layer.lora_dropout > 0):
        return False
    names = [name.rsplit(".", 1)[-1] for name in names]
    if not names or not all(name in layer.lora_modules for name in names):
        return False
    traits = model.traits
    if names == list(traits.mlp_names):
        return traits.gated_mlp and not traits.fused_gate_up and len(names) == 3 and not model.mlp_bias
    if names == list(traits.qkv_names):
        return len(names) == 3 and not model.qkv_bias
    return names == [traits.o_name] and not model.o_bias


def sliding_window_masked(model: ModelSpec, seq_len):
    """Whether transformers builds a 4-D attention mask: the model has a sliding window no longer than the sequence
    (``masking_utils.sliding_window_causal_mask``; ``_ignore_causal_mask_sdpa`` skips it only while kv_length <
    sliding_window, transformers 5.25 L356; SDPA then leaves the flash kernel). ``seq_len`` is the padded
    sequence length (prompt tuning's virtual tokens included); elementwise when it is a numpy array."""
    window = model.sliding_window
    if not window:
        return False
    return select(seq_len >= window, True, False) if hasattr(seq_len, "shape") else seq_len >= window


@functools.lru_cache(maxsize=1024)
def layer_masks(model: ModelSpec, masked: bool) -> tuple[bool, ...]:
    """Per decoder layer, whether its attention gets the 4-D mask (``masked``, the model's decision). A model with
    sliding and full layers (``layer_types``: gemma3_text, cohere2) builds one mask per kind
    (``create_sliding_window_causal_mask`` and ``create_causal_mask``, transformers 5.25 modeling_gemma3.py L527-534,
    modeling_cohere2.py L387-390; Llama-4's chunked layers likewise get ``create_chunked_causal_mask``): at a sequence
    reaching the window only the windowed one exists (masking_utils.py L356; the full one is skipped for SDPA's
    is_causal), so only the sliding or chunked layers are masked. A hybrid's convolution layers (``layer_types``
    "conv": LFM2) have no attention and get no 4-D mask (``layer_operators``). Gemma-2's config states no
    ``layer_types`` here but alternates sliding and full layers (``ModelSpec.layer_slides``): on SDPA (transformers
    before 5.21) its full layers take ``is_causal`` likewise."""
    if len(set(model.layer_types)) < 2:
        slides = model.layer_slides
        if masked and not model.layer_types and any(slides) and not all(slides):
            return slides
        return (masked,) * model.num_layers
    return tuple(masked and kind not in ("full_attention", "conv") for kind in model.layer_types)


def layer_operators(model: ModelSpec) -> tuple[bool, ...]:
    """Per decoder layer, whether its token mixer is a short convolution (``ModelSpec.layer_is_conv``: LFM2's "conv"
    layers) rather than attention: the third part of a layer's kind (moe, masked, conv) beside ``layer_masks``."""
    return model.layer_is_conv


def attention_masked(model: ModelSpec, seq_len, attn_used: Attention, packing: bool, sequences=2):
    """Whether the attention gets a 4-D mask: always in Falcon (``FamilyTraits.always_masked``) but under
    FlashAttention-2 (no mask tensor). Without packing: ``sliding_window_masked``. With packing (one row of
    ``sequences`` sequences, position ids restarting at each; ``seq_len`` is then the row's length): FlashAttention-2
    takes their bounds from the position ids (``flash_attn_varlen_func``, a sliding window in the kernel's
    ``window_size``) and has no mask; for sdpa and eager transformers v5 finds the sequences
    (``masking_utils.find_packed_sequence_indices``) and builds a block-diagonal [1, 1, T, T] mask
    (``create_causal_mask``: ``packed_sequence_mask_function``, ``allow_is_causal_skip = False``), unless the row
    holds one sequence (then the unpacked rule). ``sequences`` may be a numpy array (sweeps)."""
    if packing and attn_used is Attention.FLASH:
        return False
    if model.always_masked and attn_used is not Attention.FLASH:
        return True  # Falcon: FalconModel.forward's create_causal_mask(..., allow_is_causal_skip=False)
    unpacked = sliding_window_masked(model, seq_len)
    if not packing:
        return unpacked
    if hasattr(sequences, "shape"):
        return select(sequences > 1, True, unpacked)
    return True if sequences > 1 else unpacked


def sequence_sharded_bytes(per_token: int, shards: int) -> int:
    """Bytes per token of the sequence of a tensor held on the rank's [b, s/T, h] shard: per_token / T, rounded up to
    a whole byte (the [s/T] fp32 rstd of a norm, 4/T bytes per token: under a byte a token, < 1e-4 of a layer)."""
    return -(-per_token // shards)


def checkpoint_mode(grad_ckpt) -> GradCkpt:
    """``grad_ckpt`` as a GradCkpt (True/False from callers of the on/off option: full/none)."""
    return grad_ckpt if isinstance(grad_ckpt, GradCkpt) else GradCkpt.parse(grad_ckpt, "grad_ckpt")


@functools.lru_cache(maxsize=4096)
def layer_saved(model: ModelSpec, layer: LayerSetup, moe: bool, masked: bool = False,
                requires_grad: bool = True, conv: bool = False) -> Saved:
    """Saved bytes of one decoder layer (dense or MoE), without checkpointing: the attention block's then the MLP's
    (the walk in the module docstring). ``requires_grad``: whether the layer's input needs a gradient; ``conv``: a
    hybrid's convolution layer in place of attention (``short_conv.py``)."""
    walk = _LayerWalk(model, layer, masked, layer_requires_grad=requires_grad)
    walk.conv = conv
    walk.attention_block()
    walk.mlp_block(moe)
    return walk.result()


@functools.lru_cache(maxsize=4096)
def layer_cache(model: ModelSpec, layer: LayerSetup, moe: bool, masked: bool = False, conv: bool = False,
                mode: GradCkpt = GradCkpt.SELECTIVE) -> Saved:
    """What selective checkpointing (``mode``) caches for one layer: the outputs of its matmul and attention ops, or
    torchtitan's choice of them (computed whether or not a gradient flows: the policy saves by op,
    ``tracing/step.py::selective_policy`` and ``selective_op_contexts``)."""
    walk = _LayerWalk(model, layer, masked)
    walk.conv = conv
    walk.attention_block()
    walk.mlp_block(moe)
    return walk.cache(mode)


class BackwardFreed(NamedTuple):
    """Saved tensors of one layer that its backward frees before its transients peak."""

    mlp: Saved  # the dense gated MLP's down input: down's backward frees it before mul's makes its two gradients
    attention: Saved  # eager attention: o_proj's input, the cast probabilities and v, freed before the softmax's
    eager_softmax: bool  # whether the layer runs transformers' eager softmax attention (``eager_attention_forward``)
    mlp_element_bytes: int  # bytes per element of the dense MLP's [T, I] tensors and gradients (0: no dense MLP)


@functools.lru_cache(maxsize=4096)
def backward_freed(model: ModelSpec, layer: LayerSetup, moe: bool, masked: bool = False,
                   conv: bool = False, requires_grad: bool = True) -> BackwardFreed:
    """What a decoder layer's backward has freed when its MLP's and its attention's transients peak: autograd frees
    a node's saved tensors once the node has run (torch ``Node::release_variables``), and the nodes run in reverse
    order of creation (``engine.cpp``, highest sequence number first). The MLP: ``down(act(gate) * up)``: down's
    backward runs first and frees its saved input before ``MulBackward0`` makes its two [T, I] gradients. Eager
    attention (transformers ``eager_attention_forward``): o_proj's backward, then ``probs @ v``'s, free o_proj's
    input, the cast probabilities and v before ``_softmax_backward_data`` runs. Zero where the walk does not model
    the order (MoE experts, parallel blocks, MLA, fused kernels). ``conv``: a hybrid's convolution layer;
    ``requires_grad``: whether the layer's input needs a gradient."""
    walk = _LayerWalk(model, layer, masked, layer_requires_grad=requires_grad)
    walk.conv = conv
    walk.attention_block()
    walk.mlp_block(moe)
    return BackwardFreed(Saved(per_token=walk.mlp_freed_token), walk.attention_freed, walk.eager_softmax,
                         walk.mlp_element_bytes)


@functools.lru_cache(maxsize=4096)
def attention_output_copy(model: ModelSpec, layer: LayerSetup, masked: bool = False) -> Saved:
    """o_proj's saved contiguous copy of the attention output, where the output keeps the query's [b, a, s, d]
    layout and o_proj saves its input (``query_head_major``: ``--cp``'s merged output, litgpt, partial rotary): its
    backward frees it before the attention's backward runs."""
    walk = _LayerWalk(model, layer, masked)
    walk.attention_block()
    return Saved(per_token=walk.o_input_copy)


@functools.lru_cache(maxsize=4096)
def attention_saved(model: ModelSpec, layer: LayerSetup, masked: bool = False, conv: bool = False,
                    requires_grad: bool = True) -> Saved:
    """Saved bytes of a decoder layer's attention block (or a hybrid's convolution block) alone: what the layer's
    backward still holds once its MLP's backward is done (the MLP runs last in forward, first in backward).
    ``requires_grad``: whether the layer's input needs a gradient."""
    walk = _LayerWalk(model, layer, masked, layer_requires_grad=requires_grad)
    walk.conv = conv
    walk.attention_block()
    return walk.result()


class KvCache(NamedTuple):
    """One decoder layer's entry in transformers' KV cache (``kv_cache``, ``checkpointed_kv_cache``)."""

    held: Saved  # its k and v copies, alive while the cache is
    forward: Saved  # what they add to the layer's saved tensors while those live (negative: what they release)
    # what the entry adds beside the layer's recomputed saved tensors in its backward (checkpointing only)
    recompute: Saved
    after: Saved  # what the entry holds once the layer's backward is done


def loop_keeps_outputs(setup) -> bool:
    """Whether the training loop keeps the model's ``outputs`` (its logits and cache) through backward, the step and
    the next forward: ``--loss hf-loop`` or ``--loop-keeps-outputs``."""
    return setup.loss is Loss.HF_LOOP or getattr(setup, "loop_keeps_outputs", False)


def runs_with_cache(setup) -> bool:
    """Whether the step runs the model with its KV cache (``kv_cache``, ``checkpointed_kv_cache``): the model
    uses its config's ``use_cache`` (True for most models) in a custom loop (``--loss hf-loop``,
    ``--loop-keeps-outputs``) or transformers 4.x's Trainer (``--trainer-use-cache``, whose ``outputs`` die before
    backward: the forward's moments only) without checkpointing, and in any loop under checkpointing applied from
    outside the model (``--grad-ckpt wrapper``: transformers turns the cache off only under its own checkpointing,
    ``GradientCheckpointingLayer`` in 5.25 ``modeling_layers.py:96-116`` and ``merge_with_config_defaults``
    ``utils/generic.py:1179-1191``; 4.31 ``modeling_llama.py:658-663``); never under transformers' own checkpointing
    or a stack's own decoder (``StackLayers.dynamic_cache``). (transformers 5.25's Trainer sets
    ``model.config.use_cache = args.use_cache``, False by default, ``trainer.py:646``: a Trainer run under an
    outside checkpoint wrapper is ``--grad-ckpt full``.)"""
    if not stack_layers.stack_layers(setup.stack).dynamic_cache:
        return False
    if checkpoint_mode(setup.grad_ckpt) is GradCkpt.WRAPPER:
        return True
    return (loop_keeps_outputs(setup) or getattr(setup, "trainer_use_cache", False)) and not setup.grad_ckpt


def cache_in_backward(setup, attn_used: Attention) -> bool:
    """Whether the KV cache (``runs_with_cache``) is still alive when backward starts: the loop keeps ``outputs``
    (``loop_keeps_outputs``), or, under ``--grad-ckpt wrapper`` with the cache object handed to the layers
    (``cache_object_in_layers``), every checkpointed layer's recompute closure holds it: torch's non-reentrant
    checkpoint keeps the call's args and kwargs (``cache=`` the DynamicCache) for the recompute
    (``utils/checkpoint.py`` ``_checkpoint_without_reentrant_generator``'s ``recompute_fn``), and the frame lives as
    long as the layer's saved-tensor holders, so the cache dies only once the first layer's backward is done
    (traced: a weakref to the cache of a dropped ``outputs`` is alive until then). transformers <= 4.35's tuple
    cache (eager attention) dies with ``outputs``: ``loss = model(**batch).loss`` frees it after the forward."""
    if loop_keeps_outputs(setup):
        return True
    return checkpoint_mode(setup.grad_ckpt) is GradCkpt.WRAPPER and cache_object_in_layers(attn_used)


def cache_object_in_layers(attn_used: Attention) -> bool:
    """Whether, under ``--grad-ckpt wrapper``, the layers get the cache object and update it in place (transformers
    >= 4.36's ``DynamicCache``; 5.25 ``LlamaAttention.forward``: ``cache.update(key_states, value_states, ...)``), or
    return a fresh ``(key, value)`` tuple the model collects (<= 4.35: 4.31 ``modeling_llama.py:324`` and
    ``:704-705``). Eager attention always gets a 4-D mask, which the recompute's doubled keys
    (``checkpointed_kv_cache``) no longer fit: transformers 5.25 raises in backward (traced: ``RuntimeError: The size
    of tensor a (32) must match the size of tensor b (16)``), so eager attention under the wrapper is the tuple era
    (the llama-recipes rows: transformers 4.31, eager); sdpa and flash are DynamicCache."""
    return attn_used is not Attention.EAGER


@functools.lru_cache(maxsize=4096)
def kv_cache(model: ModelSpec, layer: LayerSetup, masked: bool = False, conv: bool = False,
             requires_grad: bool = True) -> KvCache:
    """The keys and values one decoder layer leaves in transformers' ``DynamicCache`` when the model runs with
    ``use_cache`` and no checkpointing (``--loss hf-loop``'s ``outputs.past_key_values``: the estimator keeps them
    through backward, the step and the next forward).

    held = (b_k + b_v)·k·d per token, 2·b·s·k·d·c bytes a layer for k and v of c bytes (MLA: the compressed
    latents, (kv_lora_rank + rope)·c per token: ``_mla_cache``). Source: transformers 5.25 ``cache_utils.py``
    ``DynamicLayer.update`` (``self.keys = torch.cat([self.keys, key_states], dim=-2)``: a copy, the empty
    initial tensor holding nothing), ``DynamicCache.__init__`` (one layer per ``layer_types`` entry); a sliding or
    chunked layer (``DynamicSlidingWindowLayer.update``) keeps ``full_key_states[:, :, -sliding_window + 1:, :]``,
    a view that holds the whole copy's storage: the same bytes. The attention then gets the copies: where it saves
    them as they are (SDPA's flash and efficient kernels without a repeat or a cast, eager attention with a = k)
    the originals die and ``forward`` is 0; where it saves repeated or cast copies (a mask with 1 < k < a, autocast
    casting fp32 rotated keys, the math kernel) the cache's are extra, ``forward`` = held. A fused qkv output (phi3,
    gpt_neox, falcon) that v was a view of is released by v's copy (``forward`` < 0).
    Left out: a hybrid's convolution layers (``LinearAttentionLayer``: a [b, h, L_cache] conv state, no per-token
    entry; 0 here), and the int64 sliding-window scalar each sliding layer moves to the device (one 512-byte block).
    ``requires_grad``: whether the layer's input needs a gradient (what the attention saves of the copies).
    """
    walk = _LayerWalk(model, layer, masked, layer_requires_grad=requires_grad)
    walk.conv = conv
    walk.attention_block()
    held = Saved(per_token=walk.kv_held)
    return KvCache(held, Saved(per_token=walk.kv_forward,
                               per_token_delta_at_batch_one=walk.kv_forward_delta_at_batch_one), Saved(), held)


@functools.lru_cache(maxsize=4096)
def checkpointed_kv_cache(model: ModelSpec, layer: LayerSetup, masked: bool = False, conv: bool = False,
                          requires_grad: bool = True) -> KvCache:
    """One decoder layer's KV cache entry under ``--grad-ckpt wrapper``: torch's non-reentrant ``checkpoint_wrapper``
    around the layer, the model run with ``use_cache`` (``runs_with_cache``).

    held = (b_k + b_v)·k·d per token, 2·b·s·k·d·c bytes a layer, as ``kv_cache`` (transformers 4.31
    ``modeling_llama.py:324`` ``past_key_value = (key_states, value_states)``: the post-rotary keys and the view of
    v_proj's output, collected into ``next_decoder_cache`` at :704-705; 5.25 ``DynamicLayer.update``'s copies).
    forward = held: the checkpointed layer keeps only its input (the checkpoint's saved-tensor hooks hold none of
    its tensors), so no saved tensor is one of the copies; they are all extra.
    In backward the recompute calls the layer with the same arguments (``utils/checkpoint.py`` ``recompute_fn``):
    - the cache object in the layers (``cache_object_in_layers``: transformers 5.25, sdpa or flash): the recompute's
      ``DynamicLayer.update`` appends a second copy (``self.keys = torch.cat([self.keys, key_states], dim=-2)``,
      ``cache_utils.py:136-137``: [b, k, 2s, d], the s-long entry freed), and ``sdpa_attention_forward`` slices its
      keys and values back to the query length (``integrations/sdpa_attention.py:170-172``, no mask, is_causal),
      so the kernel saves views of the new copies in place of the k and v it would save: in its backward the layer
      holds its recomputed tensors beside an entry of 2·held, which is ``kv_cache``'s forward delta
      (held - what the attention saves of the copies - a fused qkv output they release) beyond the entry counted
      in forward (``recompute``), and keeps 2·held after (``after``). A mask (sliding window, padding) no longer fits
      the doubled keys: transformers 5.25 raises in backward (traced), an error here.
    - a fresh (k, v) tuple (eager attention: transformers <= 4.35): the recompute's tuple is dropped with its
      outputs; recompute = 0, after = held.
    The second copies are made by the recompute with grad enabled, so each holds the recompute's autograd graph
    (``grad_fn``) up to the layer's input, a graph no backward ever runs: its nodes keep the recomputed tensors they
    saved on the way to k and v (``cache_history_saved``) as long as the cache lives; ``after`` counts them too
    (``requires_grad``: whether the layer's input needs a gradient, ``first_layer_recomputes_gradless``).
    Left out: the moment of the second ``torch.cat`` itself (the s-long and 2s-long copies of one layer beside the
    layer's partly recomputed tensors), below the layer's backward peak.
    """
    held = kv_cache(model, layer, masked, conv, requires_grad).held
    if not cache_object_in_layers(layer.attn_used):
        return KvCache(held, held, Saved(), held)
    if masked and layer.attn_used is Attention.SDPA:
        raise VramcalcError("--grad-ckpt wrapper with the model's KV cache and a 4-D attention mask (a sliding window "
                            "no longer than the sequence, or a family that always builds one): the recompute appends "
                            "a second copy to transformers 5.25's DynamicCache and its keys no longer fit the mask, "
                            "so backward raises; use --grad-ckpt full (use_cache off) or --attn eager (transformers "
                            "<= 4.35's tuple cache)")
    history = cache_history_saved(model, layer, masked, conv, requires_grad)
    return KvCache(held, held, kv_cache(model, layer, masked, conv, requires_grad).forward, held * 2 + history)


def cache_history_tables(model: ModelSpec, dt: Dtypes, layers: StackLayers = HF_LAYERS) -> Saved:
    """The rotary cos and sin the recompute histories of ``cache_history_saved`` keep beside the cache once backward
    is done: RoPE's ``k * cos`` and ``rotate_half(k) * sin`` save the tables where k needs a gradient (every layer
    whose input needs one), the model's one [1, s, d_rope] pair (``shared_saved``'s per-position part), whose other
    holders (the checkpointed layers' arguments) die with the graph. Families that make per-layer copies
    (``rope_copies_per_layer``, ``rope_copies_per_projection``) are left out (0)."""
    if model.traits.rope_copies_per_layer or model.traits.rope_copies_per_projection:
        return Saved()
    return Saved(per_position=shared_saved(model, dt, Attention.SDPA, False, False, layers).per_position)


@functools.lru_cache(maxsize=4096)
def cache_history_saved(model: ModelSpec, layer: LayerSetup, masked: bool = False, conv: bool = False,
                        requires_grad: bool = True) -> Saved:
    """What a layer's second KV cache copies keep alive of its recompute under ``--grad-ckpt wrapper`` with
    transformers 5.25's DynamicCache (``checkpointed_kv_cache``): torch's non-reentrant checkpoint reruns the layer
    under ``torch.autograd.enable_grad()`` (``utils/checkpoint.py`` ``_checkpoint_hook.unpack_hook``) on inputs that
    carry their ``grad_fn``, so ``torch.cat([self.keys, key_states])`` records a graph whose nodes hold the tensors
    the recompute saved (the recomputation hook hands each node the tensor it also gives the real graph) from the
    layer's input to k and v. No backward runs that graph, so they stay as long as the cache.

    The walk of those ops (the layer walk's own rules, per token): the input norm (fp32 input and rsqrt where the
    input needs a gradient, y where its weight trains), the k and v projections (a trained weight's input or its
    autocast copy; an adapter's cast, dropout and lora_A output; a fused qkv projection whole) and k's q/k norm.
    The autocast copies of their weights are the estimator's (``temporaries.LayerCopies.kv``). Traced: at the
    optimizer step of ``--loss hf-loop`` the second layer's input norm fp32 input and rsqrt and each layer's v
    adapter input cast and lora_A output are alive beside the cache. 0 for a hybrid's convolution layer; MLA and
    parallel-block layouts are not modelled (an error)."""
    m = model
    if conv:
        return Saved()
    if m.traits.mla or m.traits.parallel_block:
        raise VramcalcError(f"--grad-ckpt wrapper with the model's KV cache is not modelled for {m.family}'s "
                            "attention layout (MLA or a parallel block); use --grad-ckpt full")
    walk = _LayerWalk(model, layer, masked, layer_requires_grad=requires_grad)
    x_in = residual_bytes(m, layer) if walk.grad or m.traits.embedding_norm else walk.dt.r
    n = walk.norm(m.hidden_size, x_in) if m.traits.pre_norms else walk.dt.r
    names = m.traits.qkv_names
    fused = len(names) == 1 or layer.layers.fused_qkv
    uses = [walk.use(name, m.hidden_size) for name in (names if fused else names[1:])]
    grad_in = walk.grad
    out = walk.linears(uses, n)
    if m.qk_norm and not m.traits.weightless_qk_norm:  # k_norm, where k's projection output needs a gradient
        k_use = uses[0]
        walk.grad = grad_in or k_use.trains or k_use.lora
        d, k = m.head_dim, m.num_kv_heads
        if m.traits.qk_norm_whole:
            walk.norm(k * d, out)
        else:
            walk.norm(d, out, rows=k)
    return walk.result()


@functools.lru_cache(maxsize=4096)
def passes_gradient(model: ModelSpec, layer: LayerSetup, moe: bool, masked: bool = False, conv: bool = False) -> bool:
    """Whether a layer whose input needs no gradient hands the next layer one: it has a trained or adapted module
    (a hybrid's convolution layer under LoRA on q and v has none)."""
    walk = _LayerWalk(model, layer, masked, layer_requires_grad=False)
    walk.conv = conv
    walk.attention_block()
    walk.mlp_block(moe)
    return walk.grad


def gradless_layers_saved(model: ModelSpec, layer: LayerSetup, masks: tuple[bool, ...]) -> Saved:
    """Without checkpointing, a hybrid's leading layers that pass no gradient (``passes_gradient``: LFM2's first
    convolution layers under LoRA on q and v) leave the next layers' inputs without one too, so those save only
    what their own adapters need: the difference from ``layer_saved`` with a gradient, which ``model_saved``
    counts for every layer after the first, for each such layer after the first."""
    total = Saved()
    kinds = list(zip(model.layer_is_moe, masks, model.layer_is_conv))
    for index in range(1, model.num_layers):
        if passes_gradient(model, layer, *kinds[index - 1]):
            break
        moe, masked, conv = kinds[index]
        total += layer_saved(model, layer, moe, masked, False, conv) + layer_saved(model, layer, moe, masked,
                                                                                    True, conv) * -1
    return total


def first_layer_needs_grad(method: Method, modules_to_save: tuple[str, ...] = ()) -> bool:
    """Does the first layer's input require grad? Only when the embedding trains (full, or its copy in peft's
    ``modules_to_save``: the copy's output requires grad) or a prompt is prepended."""
    return method in (Method.FULL, Method.PROMPT, Method.P_TUNING) or "embed_tokens" in modules_to_save


def first_layer_recomputes_gradless(layer: LayerSetup, grad_ckpt) -> bool:
    """Whether, under checkpointing, the first decoder layer's input needs no gradient, so its recompute saves only
    what its own trained modules need: the stack makes no input require grad (``StackLayers.
    checkpoint_inputs_need_grad``: litgpt; torch's checkpoint_wrapper from outside, where transformers'
    ``gradient_checkpointing_enable`` and its ``enable_input_require_grads`` never run, and peft calls that only on a
    model already checkpointing, peft 0.21 ``peft_model.py:184``) and nothing before the layer trains."""
    return (bool(grad_ckpt) and not layer.layers.checkpoint_inputs_need_grad
            and not first_layer_needs_grad(layer.method, layer.modules_to_save)
            and not stack_layers.has_stable_embedding(layer.layers, layer.method))


def head_trains(layer: LayerSetup) -> bool:
    """Does lm_head's weight train? In full fine-tuning, and with ``lm_head`` in peft's ``modules_to_save`` (its
    trained copy is what forward calls: ``ModulesToSaveWrapper._forward_wrapped``, peft 0.21.2
    ``utils/other.py:614-617``)."""
    return layer.method is Method.FULL or "lm_head" in layer.modules_to_save


def positions_saved(model, dt, grad_ckpt: bool):
    """The position tensors every layer reads, in the families without rotary tables: the int64 ids (8 per token, as
    with RoPE), and under checkpointing BLOOM's ALiBi bias, [b·a, 1, s] in the hidden states' dtype (fp32 under
    autocast: the embedding LayerNorm's output), a checkpointed layers' argument (``BloomModel.forward`` L502-510;
    baddbmm saves none of it)."""
    alibi = model.num_heads * (_F32 if dt.autocast else dt.r) if model.traits.alibi and grad_ckpt else 0
    return Saved(per_token=8 + alibi)


def embedding_saved(model, layer, grad_ckpt: bool):
    """What the embedding stage of OPT and BLOOM saves beyond the token embedding's ids.
    OPT (``OPTDecoder.forward`` L354-375): a trained position table saves its int64 ids + 2 (8 per token).
    BLOOM (``BloomModel.forward`` L500): word_embeddings_layernorm saves its input x (an fp32 copy of a 16-bit x under
    autocast), mean and rstd when x needs a gradient or the norm trains; under checkpointing with peft
    (transformers' ``enable_input_require_grads``) x is a leaf that requires grad, which autograd's AccumulateGrad
    node holds beside a cast copy."""
    t, dt, h = model.traits, layer.dtypes, model.hidden_size
    if t.learned_positions:
        return Saved(per_token=8 if layer.method is Method.FULL else 0)
    if not t.embedding_norm:
        return Saved()
    leaf = grad_ckpt and layer.method.uses_lora and "embed_tokens" not in layer.modules_to_save
    trains = layer.method in (Method.FULL, Method.LN_TUNING)
    if not (leaf or trains or first_layer_needs_grad(layer.method, layer.modules_to_save)):
        return Saved()
    cast = dt.autocast and dt.r != _F32
    return Saved(per_token=(_F32 if cast else dt.r) * h + layouts.LAYER_NORM_STATS * _F32 + (dt.r * h if leaf and cast else 0))


@functools.lru_cache(maxsize=4096)
def shared_saved(model: ModelSpec, dt: Dtypes, attn_used: Attention, grad_ckpt: bool, masked: bool = False,
                 layers: StackLayers = HF_LAYERS) -> Saved:
    """Tensors every layer reads and backward keeps to the end: rotary cos and sin (r·d_rope each per
    position, 4·d_rope in olmo2; made once per forward by ``*RotaryEmbedding`` from the model's own [1, s] position
    ids, ``cache_position.unsqueeze(0)`` in v5's ``*Model.forward`` when the batch carries none, as Trainer's and
    TRL's collators do by default (TRL ``sft_trainer.py`` ``return_position_ids=False``): [1, s, d_rope], whatever
    the batch; a packed batch is one row anyway) and the int64 position ids. Under
    checkpointing the 4-D attention masks are checkpoint inputs too (memory-math.md 5.3): eager's [b, 1, s, s] in
    the compute dtype, one per mask kind (Gemma-2 builds a full and a sliding one), or SDPA's boolean sliding-window
    mask (``masked``). A stack whose decoder indexes a rotary buffer (``stack_layers.rotary_per_forward`` False)
    saves none of these. Where every layer makes its own interleaved copies (``rope_copies_per_layer``: glm4,
    ernie4_5) no op saves the table itself: it lives to the end of forward only, or under checkpointing as the
    checkpointed layers' argument, [1, s, d_rope] (per position)."""
    if not layers.rotary_per_forward:
        return Saved()
    rope = _F32 if model.traits.rope_fp32 else dt.r
    if model.traits.learned_positions or model.traits.alibi:
        # no rotary tables (positions_saved: OPT's learned positions, BLOOM's ALiBi)
        saved = positions_saved(model, dt, grad_ckpt)
    elif model.traits.rope_copies_per_projection:
        # GPT-J: one [1, s, rotary_dim] sin|cos table in the hidden dtype, which no op saves (each layer makes its
        # own copies): a checkpointed layers' argument under checkpointing only
        saved = Saved(per_token=8, per_position=dt.r * model.rope_dim if grad_ckpt else 0)
    elif model.traits.rope_copies_per_layer:
        saved = Saved(per_token=8, per_position=2 * rope * model.rope_dim if grad_ckpt else 0)
    elif model.traits.rope_complex:  # one complex64 freqs_cis of rope/2 pairs (8 bytes each), whatever the dtype
        saved = Saved(per_token=8, per_position=_F32 * model.rope_dim * model.rope_tables)
    elif model.traits.rope_half_table:  # gpt-oss: cos and sin of width d/2
        saved = Saved(per_token=8, per_position=rope * model.rope_dim * model.rope_tables)
    else:
        saved = Saved(per_token=8, per_position=2 * rope * model.rope_dim * model.rope_tables)
    if grad_ckpt:
        mask_kinds = model.mask_kinds
        if attn_used is Attention.EAGER:
            saved += Saved(per_square=mask_kinds * (dt.c if dt.autocast else dt.r))
        elif masked:
            saved += Saved(per_square=1)
    return saved


def loss_hidden_bytes(model: ModelSpec, layer: LayerSetup, in_model_loss: bool, tokens):
    """The final norm's output while a loss the model computes runs (transformers' ``*ForCausalLM.forward`` keeps
    ``hidden_states`` bound until ``self.loss_function`` returns): lm_head's input, [T, h] in the norm's output dtype,
    counted here unless a trained lm_head saves that very tensor (it saves autocast's 16-bit copy of an fp32 one).
    An adapted lm_head is left out."""
    dt = layer.dtypes
    hidden = max(dt.norm_out, dt.r)
    # sequence-parallel (``sequence_shards``): the norm's output is the rank's [T/T_p, h] shard, and lm_head saves
    # the all-gathered [T, h] instead
    saved_as_is = head_trains(layer) and not (dt.autocast and hidden != dt.c) and layer.sequence_shards == 1
    if not in_model_loss or saved_as_is or "lm_head" in layer.lora_modules:
        return 0
    return hidden * tokens * model.hidden_size // layer.sequence_shards


def head_input_saved(model: ModelSpec, layer: LayerSetup) -> Saved:
    """lm_head's saved input (when it trains, ``head_trains``: its weight gradient needs it), freed by lm_head's
    backward before the final norm's backward runs."""
    if not head_trains(layer):
        return Saved()
    frozen = dataclasses.replace(layer, method=Method.LORA if layer.method is Method.FULL else layer.method,
                                 modules_to_save=tuple(n for n in layer.modules_to_save if n != "lm_head"))
    return head_saved(model, layer) + head_saved(model, frozen) * -1


@functools.lru_cache(maxsize=4096)
def head_saved(model: ModelSpec, layer: LayerSetup) -> Saved:
    """The final norm's saved tensors and, when lm_head trains (``head_trains``), its input. ``--compile``
    compiles the decoder layers only (torchtune, torchtitan): the final norm runs eagerly."""
    if layer.compiled:
        layer = dataclasses.replace(layer, compiled=False)
    walk = _LayerWalk(model, layer, masked=False)
    n = walk.norm(model.hidden_size, layer.dtypes.r, residual=True)
    if head_trains(layer):
        walk.linears([LinearUse("lm_head", model.hidden_size, True, False, False)], n)
    return walk.result()


def layer_kept(model: ModelSpec, layer: LayerSetup, grad_ckpt: bool, moe: bool, masked: bool = False,
               conv: bool = False) -> Saved:
    """What one layer keeps on the device from forward to its backward: its saved tensors, or under HF gradient
    checkpointing (non-reentrant, transformers ``GradientCheckpointingLayer``) only its input hidden states (r·h per
    token), plus under selective checkpointing its cache (``layer_cache``). With ``--activation-offload`` the saved
    tensors, or the checkpointed inputs, are in host memory instead (``offloaded_saved``); the selective cache is not
    a saved tensor and stays."""
    mode = checkpoint_mode(grad_ckpt)
    if not mode:
        return Saved() if layer.offload else layer_saved(model, layer, moe, masked, conv=conv)
    # (sequence-parallel: the rank's [b, s/T, h] shard of the residual stream)
    kept = Saved() if layer.offload else Saved(per_token=sequence_sharded_bytes(
        residual_bytes(model, layer) * model.hidden_size, layer.sequence_shards))
    if mode.caches_ops:
        kept += layer_cache(model, layer, moe, masked, conv, mode)
    return kept


def layer_recomputed(model: ModelSpec, layer: LayerSetup, grad_ckpt, moe: bool, masked: bool = False,
                     conv: bool = False, requires_grad: bool = True) -> Saved:
    """What a layer's backward holds beside what the layer kept (``layer_kept``), once its MLP's backward starts:
    nothing without checkpointing; its recomputed saved tensors under full checkpointing; under selective the saved
    tensors minus the cache (``layer_saved - layer_cache``: the cache's entries are given to the recompute, which
    releases those it does not save). With offload, plus the checkpointed input brought back (r·h).
    ``requires_grad``: whether the layer's input needs a gradient (the first layer's, where nothing makes the
    embedding's output require one: ``first_layer_recomputes_gradless``)."""
    mode = checkpoint_mode(grad_ckpt)
    if not mode:
        return Saved()
    saved = layer_saved(model, layer, moe, masked, requires_grad, conv=conv)
    if mode.caches_ops:
        saved += layer_cache(model, layer, moe, masked, conv, mode) * -1
    if layer.offload:
        saved += Saved(per_token=layer.dtypes.r * model.hidden_size)
    elif requires_grad and _norm_saves_checkpoint(model, layer):  # the recomputed input norm saves the input itself
        saved += Saved(per_token=-sequence_sharded_bytes(_F32 * model.hidden_size, layer.sequence_shards))
    return saved


def _norm_saves_checkpoint(model: ModelSpec, layer: LayerSetup) -> bool:
    """Does a layer's first RMSNorm save the layer's checkpointed input itself? With an fp32 residual stream (mixed
    precision) ``hidden_states.to(torch.float32)`` returns the tensor unchanged (``Tensor.to`` with the same dtype),
    so the recomputed norm's saved fp32 input is the checkpoint's own input, not a copy."""
    m = model.traits
    lean = layer.kernels.saves_norm_input or layer.compiled
    if (m.layer_norm and (m.learned_positions or m.embedding_norm or m.rope_copies_per_projection) and not lean
            and residual_bytes(model, layer) == _F32):
        # OPT, BLOOM, GPT-J: an fp32 input reaches native_layer_norm as it is (no autocast copy), so the recomputed
        # LayerNorm saves the checkpointed input itself (BLOOM's residual is fp32 under autocast too)
        return True
    return (layer.dtypes.r == _F32 and m.pre_norms and not m.layer_norm and not m.parallel_block and not lean
            and layer.layers.rotary_per_forward)


def attention_left(model: ModelSpec, layer: LayerSetup, grad_ckpt, moe: bool, masked: bool = False,
                   conv: bool = False, requires_grad: bool = True) -> Saved:
    """What a layer's backward holds beside what the layer kept, once its MLP's backward is done: the attention
    block's saved tensors (recomputed under checkpointing), i.e. without checkpointing ``attention - kept`` (the MLP's
    saved tensors are freed), under full checkpointing ``attention``, under selective ``attention - layer_cache``.
    With offload and no checkpointing nothing is kept, and backward brings each node's tensors back as it runs.
    ``requires_grad``: whether the layer's input needs a gradient (``layer_recomputed``)."""
    mode = checkpoint_mode(grad_ckpt)
    attention = attention_saved(model, layer, masked, conv, requires_grad)
    if not mode:
        return Saved() if layer.offload else attention + layer_saved(model, layer, moe, masked, conv=conv) * -1
    if mode.caches_ops:
        attention += layer_cache(model, layer, moe, masked, conv, mode) * -1
    if layer.offload:
        attention += Saved(per_token=layer.dtypes.r * model.hidden_size)
    return attention


def offloaded_saved(model: ModelSpec, layer: LayerSetup, grad_ckpt, masked: bool = False) -> Saved:
    """Host bytes of ``--activation-offload`` at the end of forward (per the whole model): every decoder layer's
    saved tensors without checkpointing (``layer_saved``; save_on_cpu copies a tensor once per op that saves it, so
    a tensor several ops save, q/k/v's shared input, is counted once here: a lower bound), or its checkpointed input
    (r·h; transformers passes cos, sin and the mask in the checkpointed function's keywords, not as checkpoint
    inputs) with checkpointing. 0 without offload."""
    if not layer.offload:
        return Saved()
    mode = checkpoint_mode(grad_ckpt)
    if not mode:
        dense = layer_saved(model, layer, False, masked) * model.num_dense_layers
        moe = layer_saved(model, layer, True, masked) * model.num_moe_layers if model.num_moe_layers else Saved()
        return dense + moe
    return Saved(per_token=layer.dtypes.r * model.hidden_size * model.num_layers)


@functools.lru_cache(maxsize=4096)
def first_layer_gradless_linears(model: ModelSpec, layer: LayerSetup, masked: bool = False) -> tuple[str, ...]:
    """The first decoder layer's Linears whose input needs no gradient (its input needs none unless
    ``first_layer_needs_grad`` or a stack's trained embedding, and no adapter or trained Linear precedes them in the
    layer: under LoRA on q and v, k_proj's and v_proj's input is the layer's normed input). F.linear saves neither
    their input nor their weight, so an fp32 frozen weight's autocast copy dies at once
    (``temporaries.weight_copy_bytes``)."""
    stable = stack_layers.has_stable_embedding(layer.layers, layer.method)
    if first_layer_needs_grad(layer.method, layer.modules_to_save) or stable:
        return ()
    walk = _LayerWalk(model, layer, layer_masks(model, masked)[0], layer_requires_grad=False)
    walk.conv = model.layer_is_conv[0]
    walk.attention_block()
    walk.mlp_block(model.is_moe_layer(0))
    return tuple(dict.fromkeys(walk.gradless_linears))


@functools.lru_cache(maxsize=4096)
def model_saved(model: ModelSpec, layer: LayerSetup, grad_ckpt: bool, masked: bool = False) -> Saved:
    """Saved bytes of the whole model at the end of forward, logits excluded (see ``logits``): the shared tensors,
    the head's, the first layer's (its input needs a gradient only when ``first_layer_needs_grad``) and what every
    other layer keeps (``layer_kept``), dense and MoE layers each once per kind times their count."""
    total = shared_saved(model, layer.dtypes, layer.attn_used, grad_ckpt, masked, layer.layers)
    total += head_saved(model, layer)
    first_moe = model.is_moe_layer(0)
    masks = layer_masks(model, masked)
    masked = masks[0]  # the first layer's
    first_conv = model.layer_is_conv[0]
    if layer.offload and not grad_ckpt and layer.layers.rotary_per_forward and not model.traits.rope_copies_per_layer:
        # the rotary cos and sin are saved by the layers' RoPE products only: offloaded, the device copies die. They
        # are [1, s, d_rope] whatever the batch (``shared_saved``): per position, never per token
        rope_tables = shared_saved(model, layer.dtypes, layer.attn_used, False, False, layer.layers).per_position
        total += Saved(per_position=-rope_tables)
    if (grad_ckpt and layer.method.uses_lora and layer.layers.checkpoint_inputs_need_grad
            and (layer.offload or model.traits.embedding_multiplier or model.traits.learned_positions)
            and "embed_tokens" not in layer.modules_to_save):  # a trained embedding's output is no leaf
        # transformers' enable_input_require_grads (checkpointing with peft) makes the embedding's output a leaf
        # that requires grad: autograd's AccumulateGrad node holds it on the device, offloaded or not, and beside
        # the first layer's input when that is a scaled copy (granite: ``inputs_embeds * embedding_multiplier``) or a
        # sum (OPT: ``inputs_embeds + pos_embeds``)
        first = Saved(per_token=layer.dtypes.r * model.hidden_size) + layer_kept(model, layer, grad_ckpt, first_moe,
                                                                                 masked, first_conv)
    elif grad_ckpt or layer.offload:
        first = layer_kept(model, layer, grad_ckpt, first_moe, masked, first_conv)
    else:
        stable = stack_layers.has_stable_embedding(layer.layers, layer.method)  # litgpt QLoRA: the embedding trains
        first_grad = first_layer_needs_grad(layer.method, layer.modules_to_save) or stable
        first = layer_saved(model, layer, first_moe, masked, first_grad, first_conv)
        if model.num_conv_layers and not first_grad:
            first += gradless_layers_saved(model, layer, masks)
    total += first
    if stack_layers.has_stable_embedding(layer.layers, layer.method):
        total += Saved(per_token=stack_layers.stable_embedding_saved_per_token(model, layer.dtypes.r))
    if model.qk_norm and model.traits.weightless_qk_norm and not grad_ckpt and not layer.offload:
        # Llama-4's NoPE layers have no q/k norm, which the layer walk counts in every layer (the first layer saves
        # none when its input needs no gradient)
        a, k, d = model.num_heads, model.num_kv_heads, model.head_dim
        first_grad = first_layer_needs_grad(layer.method, layer.modules_to_save)
        nope = sum(1 for i in model.nope_layers if i > 0 or first_grad)
        total += Saved(per_token=-nope * (_F32 * (a + k) * d + _F32 * (a + k)))
    if grad_ckpt and not layer.offload and not model.traits.embedding_norm:
        # the first layer's input is the embedding's r bytes (layouts.residual_bytes; BLOOM's is its norm's output)
        total += Saved(per_token=sequence_sharded_bytes((layer.dtypes.r - residual_bytes(model, layer))
                                                        * model.hidden_size, layer.sequence_shards))
    total += embedding_saved(model, layer, grad_ckpt)
    # every other layer, by kind (dense or MoE, masked or not: ``layer_masks``, attention or convolution:
    # ``layer_operators``)
    counts: dict[tuple[bool, bool, bool], int] = {}
    for kind in zip(model.layer_is_moe[1:], masks[1:], layer_operators(model)[1:]):
        counts[kind] = counts.get(kind, 0) + 1
    for (moe, layer_masked, conv), count in counts.items():
        total += layer_kept(model, layer, grad_ckpt, moe, layer_masked, conv) * count
    if not grad_ckpt and not layer.offload and not first_layer_needs_grad(layer.method, layer.modules_to_save):
        # peft's ParamWrapper LoRA on the experts and no decoder Linear adapter (terms/moe_lora.py): the layers up to
        # the first MoE layer's experts see no input that needs a gradient (deepseek's first_k_dense_replace)
        conv_of = layer_operators(model)
        for i in range(1, moe_lora.first_graded_layer(model, layer.lora_experts, layer.lora_modules) + 1):
            moe, layer_masked = model.is_moe_layer(i), masks[i]
            total += layer_saved(model, layer, moe, layer_masked, False, conv_of[i])
            total += layer_kept(model, layer, grad_ckpt, moe, layer_masked, conv_of[i]) * -1
    return total
