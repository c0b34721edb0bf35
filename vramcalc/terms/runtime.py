"""runtime_overhead and allocator_slack: what a GPU holds beyond the step's tensors. Calibrated per GPU model.

runtime_overhead = CUDA context (+ kernel images) + cuBLAS workspaces + NCCL communicator buffers
                   + bitsandbytes paged optimizer state resident on the device.
  The context is ~287 MB with CUDA lazy loading (torch's default since 1.13, pytorch#86509), 400-500 MiB seen on
  recent GPUs (pytorch#109888, unsloth-zoo#1053). cuBLAS keeps one workspace per (handle, stream), and training uses
  two threads (forward and autograd's backward): 32 MiB each on sm90+ (``:4096:8``), 8.125 MiB before
  (ATen ``CublasHandlePool.cpp``). NCCL: ~0.5-0.7 GB per communicator on A100s (nccl#964). Paged optimizer state
  lives in cudaMallocManaged memory that torch's allocator never sees; vramcalc counts it here, at its full size
  (resident, before any eviction to host RAM).
allocator_slack = reserved - allocated: the caching allocator's cached free blocks at the peak
  (``CUDACachingAllocator.cpp``: a request is served only by a free block of its own pool and stream at least as large,
  best fit, split if the rest is over 1 MiB; otherwise a new segment of the request's size, 2 MiB multiples, 20 MiB for
  requests under 10 MiB; nothing goes back to the device without ``empty_cache``). The peak's request is nearly always
  the largest of the step so far, so it gets a segment of its own and every block freed before it stays behind
  (``step_reserved_bytes``: the loss's 16-bit logits block, too small for its backward's fp32 request, and the blocks
  a decoder layer's forward cut; weight gradients no cached block can hold). Checked against the allocator replay of
  full-size traces (43 + 8 setups: median 1.2% and 2.2%, max 20.1% and 12.3% of reserved) and 12 H200 measurements
  (median 0.8%, max 5.9%; docs/allocator-slack.md). A calibrated
  fraction of the tensor peak adds what a GPU's runs show beyond it (0 by default).
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
from ..units import maximum, minimum, select

MIB = 2**20
DEFAULT_CUDA_CONTEXT_BYTES = 500 * MIB  # assumption (see module docstring); refit by calibration
CUBLAS_WORKSPACE_SM90_BYTES = 32 * MIB  # CUBLAS_WORKSPACE_CONFIG :4096:8
CUBLAS_WORKSPACE_BYTES = 8 * MIB + 128 * 1024  # :4096:2:16:8
CUBLAS_HANDLES = 2  # forward thread + autograd backward thread
DEFAULT_NCCL_BYTES = 600 * MIB  # assumption: one communicator (nccl#964); refit by calibration
DEFAULT_ALLOCATOR_SLACK_FRACTION = 0.0  # beyond step_reserved_bytes' stranded blocks; refit by calibration
# transformers' generate (serving, hf engine) has no training step's blocks to strand: reserved/allocated 1.05
# (assumption, not calibrated; the training default before the stranded-block rule)
INFERENCE_SLACK_FRACTION = 0.05


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


def allocator_slack_bytes(profile: RuntimeProfile, peak_tensor_bytes: int, stranded_bytes: int = 0) -> int:
    """Reserved minus allocated at the peak: the cached blocks the peak's request could not use (``stranded_bytes``,
    ``step_reserved_bytes`` less the peak) plus the profile's calibrated fraction of the tensor peak."""
    return int(stranded_bytes) + int(profile.allocator_slack_fraction * peak_tensor_bytes)


def step_reserved_bytes(step_peak_bytes, backward_start_bytes, stranded_head_bytes, layer_bytes,
                        fresh_gradient_bytes=0):
    """The caching allocator's reserved bytes over a training step:

        reserved = max(M_H + S_head + G_fresh, M_peak) + S_body

    M_peak the step's largest moment, M_H its backward-start moment (the loss's backward), S_head what the loss
    strands (``stranded_head_bytes``). A later peak reuses those blocks first. S_body: the blocks one decoder layer's
    forward cut for its intermediates (its saved bytes, ``layer_bytes``), free and far smaller than any [rows, V]
    request (under checkpointing every one is freed at the layer's end; without it, the holes the saved tensors
    leave). G_fresh: the weight gradients that need segments of their own (``fresh_gradient_segment_bytes``), made
    after the loss's backward beside what it stranded. Byte counts may be numpy arrays (a sweep's batch shapes).
    At a peak inside a checkpointed layer's backward its recompute refills those blocks: the caller passes no
    S_body there (``estimator._with_reserved``). Not modelled: the first optimizer step's states placed in a freed
    logits block, 20 MiB segments' rounding holes (docs/allocator-slack.md)."""
    return maximum(backward_start_bytes + stranded_head_bytes + fresh_gradient_bytes, step_peak_bytes) + layer_bytes


def stranded_head_bytes(backward_start_bytes, forward_peak_bytes, head_request_bytes):
    """S_head = max(0, M_fwd - (M_H - X)): M_fwd the step's largest forward moment, M_H its backward-start moment, X
    the last [rows, V] gradient the loss's backward requests (0 for a loss that makes none: nothing strands).
    Reserved never falls below the forward's high-water mark, and when X arrives only M_H - X is live: the rest of
    M_fwd is cached, and none of it can hold X, the largest request so far (for transformers' loss, lm_head's 16-bit
    logits block c·T·V against log_softmax's fp32 gradient 4·T·V)."""
    return select(head_request_bytes > 0,
                  maximum(0, forward_peak_bytes - (backward_start_bytes - head_request_bytes)), 0)


def segment_bytes(request_bytes):
    """The segment a request that no cached block can serve gets (``CUDACachingAllocator.cpp``
    ``get_allocation_size``): 2 MiB for a small request (up to 1 MiB), 20 MiB (``kLargeBuffer``) below 10 MiB,
    else rounded up to 2 MiB. Elementwise on numpy arrays."""
    rounded = -(-request_bytes // (2 * MIB)) * (2 * MIB)
    return select(request_bytes <= MIB, 2 * MIB, select(request_bytes < 10 * MIB, 20 * MIB, rounded))


def fresh_gradient_segment_bytes(gradients, largest_layer_request, head_request_bytes, head_blocks_bytes):
    """G_fresh: the weight gradients (``gradients``: (bytes of one, how many), in the order backward makes them)
    that neither a decoder layer's cached blocks nor the loss's freed [rows, V] blocks can hold, each in a segment of
    its own (``segment_bytes``). A layer's blocks are at most ``segment_bytes(largest_layer_request)``; the loss left
    ``head_blocks_bytes`` of blocks of ``head_request_bytes`` each, which gradients no larger take first. Full
    fine-tuning on short sequences: a Llama-3.1-8B step at 1 x 256 makes 155 new 112 and 32 MiB segments beside the
    activations' 20 MiB ones (allocator replay, docs/allocator-slack.md). Elementwise on numpy arrays."""
    block = segment_bytes(largest_layer_request)
    capacity = head_blocks_bytes
    fresh = 0
    for each, count in gradients:  # a group of ``count`` equal gradients: the loss's blocks take what they can hold
        reused = select(each <= head_request_bytes, minimum(count, maximum(0, capacity) // each), 0)
        reused = select(each > block, reused, 0)
        capacity = capacity - reused * each
        fresh = fresh + select(each > block, (count - reused) * segment_bytes(each), 0)
    return fresh


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
