"""stack_layers: where a stack's own decoder differs from transformers' (the layer walk's reference), as traits.

``terms/activations.py`` walks a transformers v5 decoder layer. torchtune 0.6.1 and litgpt 0.5.13 build their own
Llama-style decoders, which save a few tensors differently; each difference is one trait of ``StackLayers``, read
by the walk at the one op it changes, so no rule is written twice and no ``if stack ==`` is scattered. Each trait was
found on the stack's own trace (``vramcalc/tracing/stacks/``, the tensors alive at the end of forward by the op that
made them) and is cited to the stack's source (line numbers of the installed wheels).

Symbols: T tokens, h hidden, a heads, k kv heads, d head dim, c compute bytes, s the sequence length.

- ``norm_fp32_product``: the RMSNorm upcasts its input and multiplies by the weight in fp32, so when the weight
  trains its fp32 product ``x_normed`` (4h per token, not the 16-bit y transformers saves) is saved for the weight's
  gradient. torchtune ``modules/rms_norm.py:38-43`` (``F.rms_norm(x.float(), weight=self.scale).to(x.dtype)``: a
  dtype mismatch, so torch runs the composite ``x * rsqrt(...) * weight``); litgpt ``model.py:1315-1322``
  (``(x_normed * weight.float()).to(dtype)``).
- ``kv_expanded``: k and v are copied to all a heads before SDPA whenever k < a (no mask needed), and SDPA saves the
  copies (2·c·a·d per token instead of 2·c·k·d). torchtune ``modules/attention.py:285-291``
  (``k.unsqueeze(2).expand(...).flatten(1, 2)``: flatten of an expanded view copies); litgpt ``model.py:147-150``
  (``repeat_interleave``).
- ``fused_qkv``: one qkv Linear whose output v is a view of (litgpt ``model.py:83-90``): without the expansion SDPA
  saves that view and pins the whole fused output (c·(a+2k)·d), as for transformers' fused-qkv families.
- ``query_head_major``: q reaches SDPA as a new contiguous [b, a, s, d] tensor (litgpt ``model.py:123``
  ``torch.cat((q_roped, q[..., rope_n_elem:]))``), so the flash kernel's output keeps that layout and
  ``y.reshape(B, T, a·d)`` (``model.py:182``) copies it: c·a·d per token, saved when o_proj saves its input.
- ``rotary_per_forward``: transformers computes cos and sin (and position ids) in every forward, which every layer
  saves (``activations.shared_saved``); torchtune and litgpt index a buffer built once (views, nothing saved).
- ``rope_buffer``: that buffer, a weight-like tensor alive all step (``rope_buffer_bytes``).
- ``fused_gelu``: the plain MLP's GELU is one ``F.gelu(x, approximate=...)`` that saves its input only (litgpt
  ``model.py:812-815`` ``GptNeoxMLP``), where transformers' phi runs ``NewGELUActivation`` as eager pointwise ops that
  save four [T, I] tensors (``layouts.GELU_NEW_SAVED``).
- ``fp32_unembed``: without chunked output the model itself returns fp32 logits (torchtune
  ``modules/transformer.py:651-661``: ``self.output(h).float()``), so a compiled loss receives, and saves, fp32
  logits (``logits.logits_bytes``).
- ``packed_block_mask``: a packed batch is attended with flex attention and a ``BlockMask`` (torchtune
  ``modules/attention_utils.py:132-160`` ``packed_block_causal_mask`` on a CUDA GPU of compute capability >= 7.5,
  ``_import_guard.py:12-14``), so no dense [T, T] mask is built or saved (``activations.attention_masked``).
- ``fused_qkv_lora``: LoRA on q, k and v is one adapter on the fused projection (``fused_qkv_lora_linears``).
- ``stable_embedding``: QLoRA swaps the embedding for bitsandbytes' ``StableEmbedding`` after the optimizer is built
  (litgpt ``finetune/lora.py:218-228``), so it trains without being stepped (``stable_embedding_*``).
- ``trainer_optimizer``: transformers' Trainer builds the optimizer, and with a bitsandbytes optimizer overrides
  every ``nn.Embedding`` to 32-bit states (``Trainer.create_optimizer``: ``manager.register_module_override(module,
  "weight", {"optim_bits": 32})``); torchtune and litgpt instantiate bitsandbytes directly: 8-bit embedding states.
- ``torchao_nf4``: QLoRA's base weights are torchao ``NF4Tensor``s dequantized in eager PyTorch by every forward and
  backward matmul, at any token count (``nf4_dequant_bytes``), not bitsandbytes' kernels
  (``temporaries.dequantized_weight_bytes``). Under FSDP2 an ``NF4Tensor`` is sharded whole, codes and scalers
  (``distributed.shards_4bit_state``).
- ``fsdp_keeps_dtype``: under FSDP the parameters are sharded, gathered and stepped in the dtype the model was built
  in (bf16), with no fp32 upcast of the trainable ones (accelerate's ``fsdp2_prepare_model`` upcasts; memory-math
  F1 in docs/stacks-research.md). torchtune 0.6.1 ``training/_distributed.py:550-568`` (``fully_shard`` with no
  ``mp_policy``; the 2024 recipes wrapped FSDP1 with ``mixed_precision=None``, ``full_finetune_distributed.py`` at
  fde0dc403); litgpt through Lightning Fabric's ``FSDPPrecision("bf16-true")``: param, reduce and buffer dtype bf16
  on a module built in bf16 (pytorch-lightning@71aed751 ``src/lightning/fabric/plugins/precision/fsdp.py:92-93``,
  @f5d82504da ``:88-89``).
- ``fsdp_flat_params``: FSDP1 with ``use_orig_params=True`` (Lightning Fabric's default, pytorch-lightning@71aed751
  ``src/lightning/fabric/strategies/fsdp.py:175``; @f5d82504da ``:174``), one ``FlatParameter`` per wrapped Block.
  The flat parameter requires grad when any of its tensors does (torch ``distributed/fsdp/_flat_param.py:804-836``:
  the OR over the tensors), so in a LoRA job autograd makes a gradient for the whole Block, frozen base weights
  included, and FSDP keeps it: unsharded and accumulated through every ``no_sync`` micro-batch
  (``_runtime_utils.py:743-746``; ``fully_sharded_data_parallel.py:1037-1044``: "accumulate the full model
  gradients"; litgpt's loops enter ``fabric.no_backward_sync`` on every accumulating micro-batch), sharded after the
  reduce-scatter (``distributed.gathering_units``' ``flat_grads``).
- ``ties_lm_head``: lm_head shares the embedding's weight where the checkpoint ties them. litgpt's ``GPT`` builds
  lm_head as its own ``nn.Linear`` with no tying (``model.py`` ``GPT.__init__``), and its checkpoint converter copies
  the embedding into ``lm_head.weight`` for a tied checkpoint (``scripts/convert_hf_checkpoint.py:205-206``, the same
  in 0.4.10), which ``load_state_dict`` copies into that separate parameter (``utils.py`` ``load_checkpoint``), so
  the model holds two [V, h] matrices (``built_model``). torchtune ties them (``TiedLinear``).
- ``plain_modules``: every layer is the stack's own module over plain ``torch.nn.Linear`` with causal SDPA and no
  mask in training (litgpt ``model.py`` ``CausalSelfAttention``: ``is_causal=mask is None``), so transformers'
  per-family quirks do not apply (``built_model``): Lightning's ``BitsandbytesPrecision`` quantizes every
  ``torch.nn.Linear`` (``lightning/fabric/plugins/precision/bitsandbytes.py`` ``_convert_layers``), Falcon's too,
  where transformers' ``FalconLinear`` subclass stays 16-bit (``FamilyTraits.bnb_quantizable``), and no family
  gets transformers' always-built 4-D mask (``FamilyTraits.always_masked``).
- ``dynamic_cache``: the model builds transformers' ``DynamicCache`` when run with ``use_cache``
  (``activations.kv_cache``); torchtune's and litgpt's decoders keep no cache unless one is set up for generation
  (torchtune ``modules/transformer.py`` ``setup_caches``, litgpt ``model.py`` ``set_kv_cache``).
- ``checkpoint_inputs_need_grad``: under checkpointing the first decoder layer's input requires grad even where the
  embedding is frozen: transformers' ``gradient_checkpointing_enable`` calls ``enable_input_require_grads`` on a peft
  model (``modeling_utils.py``), so that layer's 4-bit Linears hold their inputs too (``quantized.model_held``).
  litgpt adds no such hook: its first layer's norm output needs no gradient, in the forward or the recompute
  (traced). Nor does torchtune: ``training.set_activation_checkpointing`` is torch's ``apply_activation_checkpointing``
  with a non-reentrant ``checkpoint_wrapper`` (``training/memory.py:26-45``, ``training/activations.py:24`` @1814feb17;
  the same in 0.6.1), and a LoRA recipe's frozen embedding gives the first layer an input that needs no gradient
  (under ``--activation-offload`` no leaf of it stays on the device).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from enum import Enum

from ..model import ModelSpec
from ..options import Method, Stack
from ..units import CUDA_ALLOCATION_GRANULE_BYTES, DType, maximum

_F32 = DType.FP32.bytes


class RopeBuffer(str, Enum):
    """How a stack stores its rotary tables (``rope_buffer_bytes``)."""

    NONE = "none"  # transformers: an inv_freq of d/2 fp32 values (in the weights already counted), cos/sin per forward
    TORCHTUNE = "torchtune"  # one fp32 cache [max_seq_len, d/2, 2] and theta [d/2]
    LITGPT = "litgpt"  # fp32 cos and sin [s, d] each, rebuilt for the longest sequence (fit: model.max_seq_length)


@dataclass(frozen=True)
class StackLayers:
    """The traits of one stack's decoder (module docstring); ``HF`` is transformers' own."""

    name: str
    norm_fp32_product: bool = False
    kv_expanded: bool = False
    fused_qkv: bool = False
    query_head_major: bool = False
    rotary_per_forward: bool = True
    rope_buffer: RopeBuffer = RopeBuffer.NONE
    torchao_nf4: bool = False
    stable_embedding: bool = False
    fused_qkv_lora: bool = False
    trainer_optimizer: bool = True
    fused_gelu: bool = False
    fp32_unembed: bool = False
    packed_block_mask: bool = False
    fsdp_keeps_dtype: bool = False
    fsdp_flat_params: bool = False
    checkpoint_inputs_need_grad: bool = True
    dynamic_cache: bool = True
    ties_lm_head: bool = True
    plain_modules: bool = False


HF = StackLayers("hf")
TORCHTUNE = StackLayers("torchtune", norm_fp32_product=True, trainer_optimizer=False, kv_expanded=True, rotary_per_forward=False,
                        rope_buffer=RopeBuffer.TORCHTUNE, torchao_nf4=True, fp32_unembed=True,
                        packed_block_mask=True, fsdp_keeps_dtype=True, dynamic_cache=False,
                        checkpoint_inputs_need_grad=False)
LITGPT = StackLayers("litgpt", norm_fp32_product=True, trainer_optimizer=False, kv_expanded=True, fused_qkv=True, query_head_major=True,
                     rotary_per_forward=False, rope_buffer=RopeBuffer.LITGPT, stable_embedding=True,
                     fused_qkv_lora=True, fused_gelu=True, fsdp_keeps_dtype=True, fsdp_flat_params=True,
                     checkpoint_inputs_need_grad=False, dynamic_cache=False, ties_lm_head=False, plain_modules=True)

# the stacks that build their own decoder; every other stack runs transformers' modeling code
_OWN_DECODER = {Stack.TORCHTUNE: TORCHTUNE, Stack.LITGPT: LITGPT}


def stack_layers(stack: Stack) -> StackLayers:
    """The decoder traits of ``stack`` (transformers' for the stacks built on it: hf, trl, axolotl, ...)."""
    return _OWN_DECODER.get(stack, HF)


@functools.lru_cache(maxsize=256)
def built_model(model: ModelSpec, stack: Stack) -> ModelSpec:
    """The model as ``stack`` builds it: a tied checkpoint's lm_head untied where the stack never ties
    (``StackLayers.ties_lm_head``), plain Linears and no always-built mask where the stack builds its own modules
    (``StackLayers.plain_modules``); else the model as given."""
    layers = stack_layers(stack)
    if model.tie_word_embeddings and not layers.ties_lm_head:
        model = dataclasses.replace(model, tie_word_embeddings=False)
    if layers.plain_modules and not model.plain_modules:
        model = dataclasses.replace(model, plain_modules=True)
    return model


def _granule(n: int) -> int:
    return -(-n // CUDA_ALLOCATION_GRANULE_BYTES) * CUDA_ALLOCATION_GRANULE_BYTES


def rope_buffer_bytes(model: ModelSpec, layers: StackLayers, seq_len: int) -> int:
    """Bytes of the rotary buffers a stack's model holds beside its parameters (each rounded to CUDA's granule).

    torchtune ``modules/position_embeddings.py:45-67`` (``RotaryPositionalEmbeddings.rope_init``/``build_rope_cache``):
    ``theta`` d/2 fp32 and ``cache = stack([cos, sin], -1)`` of ``idx_theta.float()``, [max_seq_len, d/2, 2] fp32:
    4·max_seq_len·d + 2·d bytes, one module shared by every layer (``_component_builders.llama3_1``).
    litgpt ``model.py:54-59`` (``max_seq_length`` setter: ``cos``, ``sin`` from ``rope_cache()``, fp32
    ``build_rope_cache``) at the longest sequence ``fit`` sets (finetune/lora.py): 2·4·s·d_rope bytes.
    transformers: none beyond the parameters (0 here)."""
    d = model.rope_dim
    if layers.rope_buffer is RopeBuffer.TORCHTUNE:
        max_seq_len = model.max_position_embeddings or 4096  # torchtune builders' max_seq_len
        return _granule(_F32 * max_seq_len * d) + _granule(_F32 * (d // 2))
    if layers.rope_buffer is RopeBuffer.LITGPT:
        return 2 * _granule(_F32 * seq_len * d)
    return 0


def nf4_dequant_bytes(model: ModelSpec, c: int, compiled: bool = False) -> int:
    """The transient of dequantizing the largest torchao ``NF4Tensor`` decoder weight (n elements) for one matmul.

    torchao 0.17 ``quantization/quantize_/workflows/nf4/nf4_tensor.py``: ``LinearNF4.forward`` (:1065-1069) runs
    ``F.linear(input, weight.to(input.dtype))`` and ``backward`` (:1071-1075) ``grad_output @ weight.to(...)``; the
    ``to`` is ``get_original_weight`` (:855-891), whose locals are all alive at its final ``torch.stack``: the two
    nibble index tensors ``(quantized_data >> 4).to(torch.long)`` and ``(quantized_data & 0b1111).to(torch.long)``
    (int64, n/2 each: 8n bytes), their lookups ``nf4[value]`` (c·n/2 each), the two scaled halves (c·n/2 each) and the
    stacked weight (c·n): 8n + 3·c·n bytes, the weight's c·n staying until the matmul ends. The scalers' own
    dequantization (n/64 values) is left out. torchtune quantizes every decoder Linear (``FrozenNF4Linear`` or
    ``LoRALinear(quantize_base=True)``, ``models/llama3_1/_component_builders.py``), not the output head.
    ``compiled`` (``--compile``: torchtune compiles each layer): inductor fuses the unpacking, lookups and scaling
    into one kernel that writes the c·n weight only (an assumption: not traced, the torchtune trace runs eagerly)."""
    largest = max(module.weight_numel for module in model.inventory.linears)
    if compiled:
        return c * largest
    return 8 * largest + 3 * c * largest


def nf4_forward_moment_bytes(model: ModelSpec, c: int, tokens, checkpointed: bool, compiled: bool = False):
    """Forward's counterpart of ``nf4_dequant_moment_bytes``: the last decoder layer's down projection dequantizes
    its weight while the layers' saved tensors are all alive, beside the forward values live there: the attention
    output and the residual (``TransformerSelfAttentionLayer.forward`` locals, 2·c·T·h) and down's input (c·T·I, not
    saved by ``LinearNF4``); under checkpointing nothing inside the layer is saved, so gate's, up's and silu's outputs
    (3·c·T·I) and the MLP norm's output (c·T·h) are live values too."""
    width, h = model.mlp_width, model.hidden_size
    live = c * tokens * (2 * h + width)
    if checkpointed:
        live += c * tokens * (h + 3 * width)
    return live + nf4_dequant_bytes(model, c, compiled)


def nf4_dequant_moment_bytes(model: ModelSpec, c: int, tokens, recomputing: bool, compiled: bool = False):
    """What a decoder layer's backward holds beside its saved (or recomputed) tensors while torchao dequantizes its
    largest weight (``nf4_dequant_bytes``). In backward, up's and gate's ``grad_output @ weight.to(...)`` run while
    two [T, I] gradients are alive (mul's two input gradients, then silu's output gradient beside up's): 2·c·T·I.
    Under checkpointing the recompute dequantizes too, with the gradient arriving at the layer (c·T·h) and the forward
    values live at the MLP's last matmul: the attention output and the residual ``h`` (torchtune
    ``modules/transformer.py`` ``TransformerSelfAttentionLayer.forward`` keeps ``attn_out`` and ``h`` as locals until
    it returns: 2·c·T·h) and down's input, which ``LinearNF4`` does not save (c·T·I). Traced on
    ``tracing/stacks/torchtune.py``: the peak of a small-vocabulary QLoRA step is this moment."""
    width = model.mlp_width
    live = 2 * c * tokens * width
    if recomputing:
        live = maximum(live, c * tokens * (3 * model.hidden_size + width))
    return live + nf4_dequant_bytes(model, c, compiled)

def has_stable_embedding(layers: StackLayers, method: Method) -> bool:
    """litgpt QLoRA (finetune/lora.py:218-228): ``transformer.wte`` becomes a bitsandbytes ``StableEmbedding`` *after*
    the optimizer was built over ``model.parameters()``; the new module's weight and LayerNorm require grad (made
    after ``mark_only_lora_as_trainable``) but no optimizer steps or zeroes them."""
    return layers.stable_embedding and method is Method.QLORA


def stable_embedding_grad_bytes(model: ModelSpec, c: int) -> int:
    """The StableEmbedding's gradients, alive at every moment from the first backward on (never freed): the [V, h]
    weight's and its LayerNorm's weight and bias [h], in the model dtype c (``fabric.init_module``)."""
    return _granule(c * model.vocab_size * model.hidden_size) + 2 * _granule(c * model.hidden_size)


def stable_embedding_backward_bytes(model: ModelSpec, c: int, tokens):
    """The embedding's backward: the incoming [T, h] gradient and ``embedding_dense_backward``'s new [V, h] gradient,
    which AccumulateGrad adds in place into the standing one (``stable_embedding_grad_bytes``)."""
    return c * tokens * model.hidden_size + c * model.vocab_size * model.hidden_size


def stable_embedding_saved_per_token(model: ModelSpec, c: int) -> int:
    """What the StableEmbedding saves per token: ``self.norm(emb.to(torch.get_default_dtype()))`` (bitsandbytes
    ``nn/modules.py:117-131``) runs inside Fabric's forward context, whose default dtype is the model's (bf16-true:
    the ``to`` is a no-op), so ``native_layer_norm`` saves the c·h embedding output and its mean and rstd (fp32 on
    CUDA: 8 bytes). Its output needs a gradient, so the first decoder layer saves as every other
    (``activations.first_layer_needs_grad``)."""
    return c * model.hidden_size + 2 * _F32


def fused_qkv_lora_linears(walk, uses, x_bytes: int) -> int:
    """litgpt's ``LoRAQKVLinear`` (``lora.py:175-416``) on the fused qkv projection, for the layer walk ``walk``
    (``activations._LayerWalk``; returns the output's bytes per element as ``walk.linears`` does).

    One adapter serves the N enabled slices of q, k, v: ``F.linear(self.lora_dropout(x), self.lora_A)`` (:411) makes
    one dropout (one mask and one output, or x itself without dropout) and one A output [T, N·r]; ``conv1d`` applies
    the N slices of B; when N < 3, ``zero_pad`` (:288-327) scatters B's output into the fused width with
    ``index_copy_``, and B's output [T, sum of the enabled widths] stays saved (traced: the ``convolution`` or the GQA
    ``cat`` of ``conv1d``'s outputs). So the walk counts the first enabled slice as a peft LoRA module (dropout, its
    input, r of A's output) and each other slice only as its r more of A's output; then B's output when N < 3."""
    lora_uses = [use for use in uses if use.lora]
    if not lora_uses:
        return walk.linears(uses, x_bytes)
    first = lora_uses[0]
    out = walk.linears([use if use is first or not use.lora else use._replace(lora=False) for use in uses], x_bytes)
    dt = walk.dt
    rank_bytes = dt.c if dt.autocast else dt.adapter
    walk.per_token += rank_bytes * walk.layer.lora_rank * (len(lora_uses) - 1)
    if len(lora_uses) < 3:
        walk.per_token += rank_bytes * sum(walk.width_out(use.name) for use in lora_uses)
    return out
