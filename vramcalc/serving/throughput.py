"""Decode tokens/s from memory bandwidth, prefill time from compute: the roofline of one serving step.

decode step time  = max(bytes read / achievable bandwidth, flops / (peak x COMPUTE_EFFICIENCY))
  bytes read      = the weights one step touches (all dense weights; for MoE the experts the batch routes to)
                    + every sequence's KV cache at the full context (the worst step)
  flops           = 2 x active params x batch + 4 x layers x heads x head_dim x context x batch (QK^T and PV)
prefill time      = (2 x active params x prompt + 2 x layers x heads x head_dim x prompt^2) / (peak x COMPUTE_EFFICIENCY)
The achievable bandwidth is the training step-time model's (``step_time.achievable_bandwidth_gb_s``, one source for
both): the GPU's ``memory`` row of data/achievable_rates.csv, a measured STREAM triad / vectorized-copy bandwidth where
one is published (e.g. H100 SXM 2970 of 3350 GB/s, 88.7%: BabelStream in Azure/AI-benchmarking-guide; A100 80GB
1729.5 of 2039), else the datasheet times the median measured ratio of its memory family (HBM 88.6%, GDDR 92.2%),
with each row's source in the file; a GPU without a row (one built outside the catalogue) keeps its datasheet
figure. A decode step streams the weights and the cache once, the access pattern those benchmarks time; small
batches' GEMV kernels may reach less of it (kernel launch gaps, the all-reduces under tp: not modelled). The compute
efficiency is an assumption (not calibrated): prefill ~50% of dense bf16 peak. Tensor parallelism multiplies
bandwidth and compute by tp and ignores the all-reduces. fp8 weights use the fp8 peak for the matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..catalogue import GpuSpec
from ..model import ModelSpec
from ..step_time import achievable_bandwidth_gb_s, rates_index
from .kv_cache import kv_bytes_per_token
from .terms import Weights
from .weights import active_weight_bytes

COMPUTE_EFFICIENCY = 0.5  # assumption


@dataclass(frozen=True)
class Throughput:
    decode_step_s: float
    decode_tokens_per_s_per_sequence: float
    decode_tokens_per_s: float  # aggregate over the batch
    prefill_s: float  # one prompt
    bound: str  # "memory" or "compute"

    def to_dict(self) -> dict:
        return {"decode_step_s": round(self.decode_step_s, 6),
                "decode_tokens_per_s_per_sequence": round(self.decode_tokens_per_s_per_sequence, 2),
                "decode_tokens_per_s": round(self.decode_tokens_per_s, 1),
                "prefill_s": round(self.prefill_s, 4), "bound": self.bound}


def _peak_flops(gpu: GpuSpec, weights: Weights) -> float:
    tflops = gpu.fp8_dense_tflops if weights is Weights.FP8 and gpu.fp8_dense_tflops else None
    tflops = tflops or gpu.bf16_dense_tflops or gpu.fp16_dense_tflops or gpu.fp32_tflops or 0.0
    return tflops * 1e12


def throughput(spec: ModelSpec, gpu: GpuSpec, *, weights: Weights, kv_element_bytes: int, batch: int, context: int,
               prompt: int, tp: int = 1) -> Throughput | None:
    """None when the GPU's bandwidth or compute is unknown."""
    if not gpu.bandwidth_gb_s:
        return None
    peak = _peak_flops(gpu, weights) * tp
    bandwidth = achievable_bandwidth_gb_s(gpu.name, gpu.bandwidth_gb_s, rates_index(), gpu.memory_type) * 1e9 * tp
    read = active_weight_bytes(spec, weights, tp, batch) * tp + batch * context * kv_bytes_per_token(spec, kv_element_bytes)
    attention_width = spec.num_layers * spec.num_heads * (spec.qk_head_dim if spec.traits.mla else spec.head_dim)
    flops = 2 * spec.active_params * batch + 4 * attention_width * context * batch
    memory_s = read / bandwidth
    compute_s = flops / (peak * COMPUTE_EFFICIENCY) if peak else 0.0
    step = max(memory_s, compute_s)
    prefill_flops = 2 * spec.active_params * prompt + 2 * attention_width * prompt * prompt
    prefill = prefill_flops / (peak * COMPUTE_EFFICIENCY) if peak else float("nan")
    return Throughput(step, 1 / step, batch / step, prefill, "memory" if memory_s >= compute_s else "compute")


def usd_per_million_tokens(gpu: GpuSpec, gpus: int, tokens_per_s: float) -> float | None:
    """GPU rent per million generated tokens: hourly price x GPUs / (tokens/s x 3600) x 1e6 (data/gpus.csv
    ``cloud_usd_per_gpu_hour``, with its date and basis)."""
    if not gpu.cloud_usd_per_gpu_hour or tokens_per_s <= 0:
        return None
    return gpu.cloud_usd_per_gpu_hour * gpus / (tokens_per_s * 3600) * 1e6
