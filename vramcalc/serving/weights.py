"""Served weight bytes per format, with the quantization metadata each format stores, per GPU under tensor parallelism.

Which tensors a format quantizes: every decoder ``nn.Linear`` weight (attention and MLP projections) and, except
bitsandbytes NF4, the 3-D MoE expert tensors (vLLM's fused-MoE quantization methods cover them; bitsandbytes does not
reach transformers v5 ``*Experts`` parameters, bitsandbytes #1849). Embeddings, lm_head, norms, biases and routers stay
16-bit (``_keep_in_fp32_modules_strict`` tensors fp32). Per weight matrix [out, in] (g = 128, the AWQ/GPTQ group):

- fp8   (vLLM ``Fp8LinearMethod``): out·in bytes of e4m3 + one fp32 per-tensor scale;
- int8  (W8A8/W8A16 per-channel, bitsandbytes ``Int8Params.SCB``): out·in bytes + one fp32 scale per output row;
- int4-awq (AutoAWQ GEMM ``WQLinear_GEMM``): qweight int32 [in, out/8] (= out·in/2 B), qzeros int32 [in/g, out/8],
  scales fp16 [in/g, out];
- int4-gptq (``QuantLinear``): qweight int32 [in/8, out], qzeros int32 [in/g, out/8], scales fp16 [in/g, out],
  g_idx int32 [in];
- nf4 (bitsandbytes ``quantize_4bit``, double quantization): ceil(n/2) codes, uint8 absmax per 64, fp32 absmax per 256
  absmax blocks, the 256-entry fp32 nested code, an fp32 offset and the 16-entry fp32 NF4 code.
Each stored tensor is one allocation, rounded up to 512 B. Under tensor parallelism (Megatron layout, as vLLM shards)
linears, experts, the embedding and lm_head are split ``tp`` ways (vocab-parallel); norms and routers are replicated.
"""

from __future__ import annotations

import math

from ..facts import BNB_4BIT_CODE_ENTRIES, BNB_BLOCKSIZE, BNB_DQ_BLOCKSIZE, BNB_DQ_CODE_ENTRIES
from ..model import ModelSpec, ParamKind
from ..units import round_up
from .terms import Weights

AWQ_GPTQ_GROUP = 128


def _matrix_bytes(out: int, inp: int, fmt: Weights) -> int:
    """Bytes of one quantized [out, in] weight and its metadata, each allocation rounded."""
    n = out * inp
    if fmt is Weights.FP8:
        return round_up(n) + round_up(4)
    if fmt is Weights.INT8:
        return round_up(n) + round_up(4 * out)
    if fmt in (Weights.INT4_AWQ, Weights.INT4_GPTQ):
        groups = -(-inp // AWQ_GPTQ_GROUP)
        total = round_up(-(-n // 2)) + round_up(groups * -(-out // 8) * 4) + round_up(groups * out * 2)
        if fmt is Weights.INT4_GPTQ:
            total += round_up(4 * inp)
        return total
    if fmt is Weights.NF4:
        blocks = -(-n // BNB_BLOCKSIZE)
        outer = -(-blocks // BNB_DQ_BLOCKSIZE)
        return (round_up(-(-n // 2)) + round_up(blocks) + round_up(4 * outer) + round_up(4 * BNB_DQ_CODE_ENTRIES)
                + round_up(4) + round_up(4 * BNB_4BIT_CODE_ENTRIES))
    return round_up(2 * n)


def weight_bytes(spec: ModelSpec, fmt: Weights, tp: int = 1) -> int:
    """Per-GPU bytes of the served weights (module docstring)."""
    total = 0
    for t in spec.inventory.tensors:
        split = t.kind in (ParamKind.LINEAR, ParamKind.EXPERTS, ParamKind.EMBEDDING, ParamKind.LM_HEAD)
        ways = tp if split else 1
        quantizable = (t.kind is ParamKind.LINEAR and len(t.shape) == 2) or (
            t.kind is ParamKind.EXPERTS and fmt is not Weights.NF4)
        if t.keep_fp32:
            each = round_up(4 * -(-t.numel // ways))
        elif fmt.is_16bit or not quantizable:
            each = round_up(2 * -(-t.numel // ways))
        else:
            *experts, out, inp = t.shape
            per = _matrix_bytes(-(-out // ways), inp, fmt)
            each = per * (math.prod(experts) if experts else 1)
        total += each * t.count
    return total


def hf_buffer_bytes(spec: ModelSpec) -> int:
    """Non-parameter buffers a transformers 5.x model registers: the rotary ``inv_freq`` and ``original_inv_freq``
    (fp32, rope_dim / 2 each; ``modeling_rope_utils``), and Gemma's and Gemma-2's 16-bit ``embed_tokens.embed_scale``
    scalar (a buffer of their scaled word embedding)."""
    rope = spec.qk_rope_head_dim if spec.traits.mla else spec.head_dim
    out = 2 * round_up(4 * (rope // 2))
    if spec.family in ("gemma", "gemma2"):
        out += round_up(2)
    return out


def engine_rope_cache_bytes(spec: ModelSpec, element_bytes: int = 2) -> int:
    """vLLM's (and SGLang's, which adapted it) rotary table, a buffer every GPU holds beside the weights and counts in
    "Loading model weights took": ``RotaryEmbedding._compute_cos_sin_cache`` registers ``cos_sin_cache``
    [max_position_embeddings, rotary_dim] (cos and sin halves side by side) in the model dtype
    (vllm/model_executor/layers/rotary_embedding). Llama-3.1-8B: 131,072 x 128 x 2 = 32 MiB, the gap between its
    bf16 parameters (14.9575 GiB) and vLLM's logged 14.9888 GiB (benchmarks/serving_published.md). Models without
    ``max_position_embeddings`` get none."""
    return round_up((spec.max_position_embeddings or 0) * spec.rope_dim * element_bytes)


def lora_bytes(spec: ModelSpec, rank: int, tp: int = 1, element_bytes: int = 2) -> int:
    """One LoRA adapter of ``rank`` on every decoder linear (A [r, in], B [out, r]) in 16 bits, per GPU. vLLM
    preallocates ``max_loras`` such slots at ``max_lora_rank`` (``LoRAModelManager``); one slot is counted."""
    if rank <= 0:
        return 0
    total = 0
    for module in spec.inventory.linears:
        total += module.count * (round_up(rank * module.in_features * element_bytes)
                                 + round_up(-(-module.out_features // tp) * rank * element_bytes))
    return total


def active_weight_bytes(spec: ModelSpec, fmt: Weights, tp: int, batch: int) -> int:
    """Weight bytes one decode step reads: everything but the routed experts, plus the fraction of experts the batch
    touches, 1 - (1 - K/E)^batch (uniform routing), for a MoE model."""
    total = weight_bytes(spec, fmt, tp)
    if not spec.is_moe:
        return total
    experts = sum(t.total_numel for t in spec.inventory.tensors if t.kind is ParamKind.EXPERTS)
    fraction_all = experts / spec.inventory.total_numel
    touched = 1 - (1 - spec.experts_per_token / spec.num_experts) ** max(1, batch)
    return int(total * (1 - fraction_all + fraction_all * touched))
