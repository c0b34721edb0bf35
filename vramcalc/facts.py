"""Library facts: the constants and small rules of torch, bitsandbytes, peft, accelerate, DeepSpeed and NCCL that the
estimate, the trace and the calibration harness must agree on. Each is stated once, here, with the library file and
function it comes from (versions: torch 2.13, transformers v5, peft 0.21, bitsandbytes 0.50, accelerate 1.15);
``terms/``, ``tracing/`` and ``calibrate/`` import them, so a library change is one edit.

Standard library only: ``import vramcalc`` stays light.
"""

from __future__ import annotations

import math

from .options import AdapterDtype, Method, Precision
from .units import DType, maximum, next_power_of_two

# -- bitsandbytes: 4-bit weights (bitsandbytes/functional.py::quantize_4bit) --------------------------------------
BNB_BLOCKSIZE = 64  # quantize_4bit default blocksize: one absmax per 64 weights
BNB_DQ_BLOCKSIZE = 256  # double quantization: quantize_blockwise(absmax, blocksize=256)
BNB_DQ_CODE_ENTRIES = 256  # the "dynamic" code of the nested quantization, fp32
BNB_4BIT_CODE_ENTRIES = 16  # the nf4/fp4 code table, fp32
# backends/cuda/ops.py::_gemm_4bit_custom_max_m: above this many rows gemm_4bit dequantizes the whole weight and
# calls F.linear (``_dequant_linear_fallback``); at or below it a fused kernel needs no dequantized copy
BNB_GEMM_4BIT_CUSTOM_MAX_TOKENS = 1536

# -- bitsandbytes: 8-bit and paged optimizers (bitsandbytes/optim/optimizer.py) --------------------------------------
BNB_MIN_8BIT_NUMEL = 4096  # Optimizer8bit min_8bit_size: smaller tensors keep fp32 state
BNB_OPTIM_BLOCKSIZE = 256  # blockwise 8-bit state: one fp32 absmax per 256 elements
BNB_PAGED_MIN_NUMEL = 100_000  # get_state_buffer: ``if not self.is_paged or p.numel() < 1e5`` -> a torch tensor

# -- torch DistributedDataParallel as accelerate builds it -----------------------------------------------------------
DDP_BUCKET_CAP_MB = 25  # accelerate DistributedDataParallelKwargs.bucket_cap_mb (torch's default too)
DDP_BUCKET_CAP_BYTES = DDP_BUCKET_CAP_MB * 2**20
DDP_FIRST_BUCKET_BYTES = 2**20  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES: the first bucket is 1 MiB

# -- DeepSpeed through transformers' "auto" config (transformers/integrations/deepspeed.py) ---------------------------
DEEPSPEED_PERSISTENCE_PER_HIDDEN = 10  # stage3_param_persistence_threshold = 10·h
DEEPSPEED_PREFETCH_FRACTION = 0.9  # stage3_prefetch_bucket_size = 0.9·h²
# runtime/zero/stage3.py::estimate_zero3_model_states_mem_needs: host bytes per trainable parameter with the
# optimizer offloaded (fp32 master, gradients, two Adam moments) and with the parameters too, times
# additional_buffer_factor 1.5 (pinned staging buffers)
DEEPSPEED_HOST_BYTES_PER_PARAM_OPTIMIZER = 16
DEEPSPEED_HOST_BYTES_PER_PARAM_PARAMS = 18
DEEPSPEED_HOST_BUFFER_FACTOR = 1.5

# -- hardware ------------------------------------------------------------------------------------------------------
GPUS_PER_NODE = 8  # an HGX/DGX node; more GPUs are counted in nodes of eight

# -- losses --------------------------------------------------------------------------------------------------------
CHUNKED_LOSS_CHUNKS = 8  # torchtune CEWithChunkedOutputLoss default num_output_chunks


def fused_chunk_tokens(tokens, vocab: int, hidden: int):
    """Liger ``LigerFusedLinearCrossEntropyFunction``'s chunk: next_power_of_2(ceil(T / ceil(V / h))), at most T
    (``ops/fused_linear_cross_entropy.py``). Elementwise when ``tokens`` is a numpy array."""
    inc_factor = math.ceil(vocab / hidden)
    chunk = next_power_of_two(-(-tokens // inc_factor))
    return tokens - maximum(tokens - chunk, 0)  # min(tokens, chunk), array-safe


# -- shared dtype rules ------------------------------------------------------------------------------------------
def adapter_bits(method: Method, precision: Precision, adapter_dtype: AdapterDtype) -> int:
    """Bits of a LoRA / prompt-tuning parameter: fp32 under peft's ``get_peft_model(autocast_adapter_dtype=True)``
    (``AdapterDtype.FP32``), fp32 too in an fp32 model (the adapter takes the base layer's dtype), else the model's
    16 bits. A QLoRA model is 16-bit whatever the precision word (its unquantized parts compute in 16 bits)."""
    if adapter_dtype is AdapterDtype.FP32:
        return 32
    if precision.param_dtype.bits == 32 and method is not Method.QLORA:
        return 32
    return 16


def half_dtype(precision: Precision) -> DType:
    """The 16-bit dtype a precision computes in: fp16 for fp16 and mixed-fp16, else bf16 (accelerate's
    ``mixed_precision``; FSDP2 ``MixedPrecisionPolicy.param_dtype``)."""
    return DType.FP16 if precision in (Precision.FP16, Precision.MIXED_FP16) else DType.BF16
