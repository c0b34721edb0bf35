"""The memory rules of each serving engine, from their documentation and source (labelled: these reservations are
engine policy, not tensors a CPU trace can see; a GPU measurement is their ground truth).

transformers ``generate`` (``hf``): no pool. The device holds the weights, the cache (``DynamicCache`` grows by
``torch.cat``; ``StaticCache`` allocates ``max_cache_len`` slots), the forward's transients, the CUDA context and one
cuBLAS workspace (one thread), and the caching allocator's slack (``terms/runtime.py`` defaults).

vLLM (V1 engine, ``vllm/v1/worker/gpu_worker.py`` ``determine_available_memory``; docs "Conserving memory" and the
``gpu_memory_utilization`` engine argument: "The fraction of GPU memory to be used for the model executor, which can
range from 0 to 1 ... default 0.9"): the budget is ``gpu_memory_utilization`` x total memory; from it vLLM subtracts
the weights, the peak of a profiling forward of ``max_num_batched_tokens`` tokens (the largest prefill chunk) plus its
dummy sampler run, and non-torch memory (CUDA context, NCCL); CUDA-graph capture memory comes on top (measured by
vLLM since 0.11; ~0.5 GiB assumed here). What remains becomes the KV pool, in blocks of ``block_size`` = 16 tokens
(``CacheConfig.block_size``). It logs ``GPU KV cache size: N tokens`` and ``Maximum concurrency for L tokens per
request: N·16/L x`` (``v1/core/kv_cache_utils.py``, PR #13596).
Default ``max_num_batched_tokens`` (``engine/arg_utils.py``, ``vllm serve``): 8192 on GPUs with >= 70 GiB, else 2048.

SGLang (``srt/server_args.py`` ``mem_fraction_static``: "The fraction of the memory used for static allocation (model
weights and KV cache memory pool)"; ``model_executor/model_runner.py`` ``profile_max_num_token``): the token pool is
``mem_fraction_static`` x total - weights - non-torch memory, in single-token pages; 1 - fraction is left for
activations and CUDA graphs. Default fraction (server_args, v0.4): 0.88 at tp 1, 0.87 at tp 2, 0.85 at tp 4, 0.81 at 8.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..catalogue import GpuSpec
from ..terms import runtime
from ..units import BYTES_PER_GIB

VLLM_DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
VLLM_BLOCK_SIZE = 16
VLLM_CUDA_GRAPH_BYTES = BYTES_PER_GIB // 2  # assumption: "Graph capturing finished ... took 0.3-0.6 GiB" in logs
VLLM_DEFAULT_MAX_NUM_SEQS = 256  # SchedulerConfig.max_num_seqs (the sampler's dummy batch)
VLLM_LARGE_GPU_BYTES = 70 * BYTES_PER_GIB


def vllm_default_max_num_batched_tokens(gpu: GpuSpec | None) -> int:
    return 8192 if gpu is not None and gpu.memory_bytes >= VLLM_LARGE_GPU_BYTES else 2048


def sglang_default_mem_fraction(tp: int) -> float:
    if tp >= 8:
        return 0.81
    if tp >= 4:
        return 0.85
    if tp >= 2:
        return 0.87
    return 0.88


def non_torch_bytes(gpu: GpuSpec | None, tp: int, cublas_handles: int = 1) -> int:
    """CUDA context + cuBLAS workspaces + NCCL when tp > 1 (``terms/runtime.py`` defaults, same assumptions)."""
    per_handle = runtime.cublas_workspace_bytes(gpu) // runtime.CUBLAS_HANDLES
    nccl = runtime.DEFAULT_NCCL_BYTES if tp > 1 else 0
    return runtime.DEFAULT_CUDA_CONTEXT_BYTES + cublas_handles * per_handle + nccl


@dataclass(frozen=True)
class PoolRule:
    """What a paged engine leaves for the KV pool on one GPU."""

    budget_bytes: int  # what the engine may use (fraction x total)
    pool_bytes: int  # the KV pool it allocates
    reserved_bytes: int  # what it keeps outside tensors it reports (CUDA graphs, the 1 - fraction headroom)
