"""runtime_overhead and allocator_slack: what a GPU holds beyond the step's tensors. Calibrated per GPU model.

runtime_overhead = CUDA context (+ kernel images) + cuBLAS workspaces + NCCL communicator buffers
                   + bitsandbytes paged optimizer state resident on the device.
  The context is ~287 MB with CUDA lazy loading (torch's default since 1.13, pytorch#86509), 400-500 MiB seen on
  recent GPUs (pytorch#109888, unsloth-zoo#1053). cuBLAS keeps one workspace per (handle, stream), and training uses
  two threads (forward and autograd's backward): 32 MiB each on sm90+ (``:4096:8``), 8.125 MiB before
  (ATen ``CublasHandlePool.cpp``). NCCL: ~0.5-0.7 GB per communicator on A100s (nccl#964). Paged optimizer state
  lives in cudaMallocManaged memory that torch's allocator never sees; vramcalc counts it here, at its full size
  (resident, before any eviction to host RAM).
allocator_slack = reserved - allocated: the caching allocator rounds blocks (2 MiB segments below 1 MiB, 20 MiB up to
  10 MiB, 2 MiB multiples above; ``CUDACachingAllocator.cpp``) and fragments. Default: a fraction of the tensor peak.
  Where an engine allocates on streams of its own (FSDP's collectives), reserved reads more while the GPU has room:
  a cached block serves only requests of the stream it was allocated on (``stream_pool_bytes``, reported beside the
  terms, not in ``total``: those blocks are whole free segments, which a failing ``cudaMalloc`` releases first).
host_seconds_per_kernel = the host's time to issue one launched kernel of an eager step (Python, dispatcher,
  autograd, the launch), the step-time model's ``h`` (``vramcalc.step_time``; view ops keep their own
  ``step_time.VIEW_OP_HOST_SECONDS``). It belongs to the host CPU and the Python stack, not to the GPU: the same
  H200 type ran the same host-bound step 1.7x apart on two machines (calibration/runs/h200/step_timing/). Default
  ``step_time.HOST_SECONDS_PER_KERNEL`` (10 us, cited there); the calibration fits it from measured step times
  (``calibrate.fit.fit_host_seconds_per_kernel``).
All defaults are assumptions until ``python -m vramcalc.calibrate`` fits them for a GPU; a fitted profile under
``calibration/profiles/`` replaces them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..catalogue import GpuSpec
from ..step_time import HOST_SECONDS_PER_KERNEL
from ..units import maximum

MIB = 2**20
DEFAULT_CUDA_CONTEXT_BYTES = 500 * MIB  # assumption (see module docstring); refit by calibration
CUBLAS_WORKSPACE_SM90_BYTES = 32 * MIB  # CUBLAS_WORKSPACE_CONFIG :4096:8
CUBLAS_WORKSPACE_BYTES = 8 * MIB + 128 * 1024  # :4096:2:16:8
CUBLAS_HANDLES = 2  # forward thread + autograd backward thread
DEFAULT_NCCL_BYTES = 600 * MIB  # assumption: one communicator (nccl#964); refit by calibration
DEFAULT_ALLOCATOR_SLACK_FRACTION = 0.05  # assumption: reserved/allocated 1.05; refit by calibration


@dataclass(frozen=True)
class RuntimeProfile:
    """Coefficients the trace cannot see, for one GPU model (defaults, or fitted by the calibration harness)."""

    cuda_context_bytes: int = DEFAULT_CUDA_CONTEXT_BYTES
    workspace_bytes: int | None = None  # None: cuBLAS workspaces from the compute capability
    nccl_bytes: int = DEFAULT_NCCL_BYTES
    allocator_slack_fraction: float = DEFAULT_ALLOCATOR_SLACK_FRACTION
    host_seconds_per_kernel: float = HOST_SECONDS_PER_KERNEL  # the step-time model's h (module docstring)
    source: str = "default"


def cublas_workspace_bytes(gpu: GpuSpec | None) -> int:
    """Two handles' cuBLAS workspaces; sm90+ when the GPU is unknown."""
    major = 9
    if gpu is not None:
        try:
            major = int(str(gpu.compute_capability).split(".")[0])
        except ValueError:
            major = 9
    per_handle = CUBLAS_WORKSPACE_SM90_BYTES if major >= 9 else CUBLAS_WORKSPACE_BYTES
    return CUBLAS_HANDLES * per_handle


def workspace_bytes(profile: RuntimeProfile, gpu: GpuSpec | None) -> int:
    """The cuBLAS workspaces: the profile's fitted ``workspace_bytes``, else two handles' from the compute capability."""
    return profile.workspace_bytes if profile.workspace_bytes is not None else cublas_workspace_bytes(gpu)


def runtime_overhead_bytes(profile: RuntimeProfile, gpu: GpuSpec | None, num_gpus: int, paged_bytes: int) -> int:
    """Context + workspaces + NCCL (when more than one GPU) + resident paged optimizer state."""
    workspace = workspace_bytes(profile, gpu)
    nccl = profile.nccl_bytes if num_gpus > 1 else 0
    return profile.cuda_context_bytes + workspace + nccl + paged_bytes


def allocator_slack_bytes(profile: RuntimeProfile, peak_tensor_bytes: int) -> int:
    """Reserved minus allocated at the peak: a calibrated fraction of the tensor peak."""
    return int(profile.allocator_slack_fraction * peak_tensor_bytes)


def stream_pool_bytes(default_stream_peak_bytes: int, side_stream_peak_bytes: tuple[int, ...],
                      peak_tensor_bytes: int) -> int:
    """What side streams add to the reserved memory beyond the tensor peak:
    max(0, D + sum(S_i) - P), with D the default stream's largest live bytes over the step, S_i each side stream's
    and P the largest live bytes of all streams together.

    The caching allocator hands a cached block only to a request of the stream it was allocated on: ``get_free_block``
    searches from ``(stream, size)`` and gives up when the block found belongs to another stream
    (``c10/cuda/CUDACachingAllocator.cpp``, ``BlockComparatorSize`` orders by stream first), and a freed block
    returns to its own stream's pool. So each stream's pool grows to that stream's own peak, and reserved is at
    least the sum of the streams' peaks, whereas the tensors peak at P <= that sum (FSDP's gradient shards, cached on
    the reduce-scatter stream, cannot hold the next forward's activations). That is reserved while the GPU has room:
    when a ``cudaMalloc`` fails, ``DeviceCachingAllocator::malloc`` releases every free cached segment, of any stream
    (``release_cached_blocks``), and retries (``num_alloc_retries``), so these bytes do not decide whether a job fits;
    they cost a synchronising free and re-allocation each step where the device is short."""
    return maximum(default_stream_peak_bytes + sum(side_stream_peak_bytes) - peak_tensor_bytes, 0)
