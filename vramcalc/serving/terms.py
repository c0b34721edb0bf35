"""The words of a serving breakdown: its terms, its phases, the engines, the weight and KV-cache formats.

A serving breakdown is a ``MemoryBreakdown`` keyed by ``InferenceTerm`` (training breakdowns are keyed by
``options.Term``; the two enums share the names they have in common, so ``b.terms()["weights"]`` means the same in
both). ``kv_cache`` and ``engine_reserved`` are the two inference-only terms (DESIGN.md "Serving").
"""

from __future__ import annotations

from enum import Enum

from ..options import Choice
from ..units import DType


class InferenceTerm(str, Enum):
    """Bytes at the peak moment of serving. The first four are tensors (what max_memory_allocated sees)."""

    WEIGHTS = "weights"  # parameters, incl. quantization metadata (scales, zeros, absmax)
    KV_CACHE = "kv_cache"  # the key/value (or MLA latent) cache of every sequence in flight
    ACTIVATIONS = "activations"  # transients of the largest forward (prefill chunk or decode step)
    LOGITS = "logits"  # lm_head output of the sampled positions and the sampler's fp32 copies
    RUNTIME_OVERHEAD = "runtime_overhead"  # CUDA context, cuBLAS workspaces, NCCL
    ALLOCATOR_SLACK = "allocator_slack"  # reserved minus allocated
    ENGINE_RESERVED = "engine_reserved"  # memory the engine keeps from the KV pool (vLLM/SGLang rules)

    @property
    def is_tensor(self) -> bool:
        return self in (InferenceTerm.WEIGHTS, InferenceTerm.KV_CACHE, InferenceTerm.ACTIVATIONS, InferenceTerm.LOGITS)

    def __str__(self) -> str:
        return self.value


TENSOR_TERMS = tuple(term for term in InferenceTerm if term.is_tensor)


class InferencePhase(str, Enum):
    """Moments of serving at which the live set is assembled."""

    PREFILL = "prefill"  # the forward over the prompt (or the largest prefill chunk)
    DECODE = "decode"  # a one-token step with every sequence's cache at its full context

    def __str__(self) -> str:
        return self.value


class Engine(Choice):
    HF = "hf"  # transformers generate (DynamicCache by default, StaticCache with --cache static)
    VLLM = "vllm"  # vLLM V1: paged KV blocks inside gpu_memory_utilization
    SGLANG = "sglang"  # SGLang: static pool inside mem_fraction_static


class HfCache(Choice):
    DYNAMIC = "dynamic"  # transformers DynamicCache: grows by torch.cat each step
    STATIC = "static"  # transformers StaticCache: max_cache_len slots allocated at the first forward


class Weights(Choice):
    """Stored weight format of the served model."""

    BF16 = "bf16"
    FP16 = "fp16"
    FP8 = "fp8"  # per-tensor (or per-channel) e4m3 weights, fp32 scales (vLLM/compressed-tensors FP8)
    INT8 = "int8"  # 8-bit weights with one fp16/fp32 scale per output channel (W8A16/W8A8, bitsandbytes LLM.int8)
    INT4_AWQ = "int4-awq"  # AutoAWQ GEMM: 4-bit packed in int32, fp16 scales and packed zeros per 128-group
    INT4_GPTQ = "int4-gptq"  # GPTQ: 4-bit packed in int32, fp16 scales and packed zeros per 128-group, g_idx
    NF4 = "nf4"  # bitsandbytes NF4, 64-blocks, double-quantized absmax

    @property
    def is_16bit(self) -> bool:
        return self in (Weights.BF16, Weights.FP16)

    @property
    def compute_dtype(self) -> DType:
        return DType.FP16 if self is Weights.FP16 else DType.BF16


class KvDtype(Choice):
    AUTO = "auto"  # the model's compute dtype (bf16/fp16): 2 bytes
    FP8 = "fp8"  # vLLM/SGLang --kv-cache-dtype fp8 (e4m3): 1 byte

    def element_bytes(self, weights: Weights) -> int:
        return 1 if self is KvDtype.FP8 else weights.compute_dtype.bytes
