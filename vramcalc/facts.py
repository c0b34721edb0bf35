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
# ZeRO-3 steps its partition one sub-group at a time, a sub-group closing at the first parameter that brings it to
# sub_group_size elements (runtime/zero/config.py:175 ``sub_group_size = 1e9``, which transformers leaves as is;
# stage3.py ``_create_fp16_sub_groups``, ``step``: ``_prepare_sub_group`` -> ``_optimizer_step`` ->
# ``_release_sub_group``). DeepSpeed@edaa72212.
DEEPSPEED_SUB_GROUP_SIZE = 10**9
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
# litgpt finetune/lora.py and full.py: ``model(input_ids, lm_head_chunk_size=128)``: lm_head in 128-position chunks
LITGPT_LM_HEAD_CHUNK_POSITIONS = 128


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
    16 bits. A QLoRA model's adapters follow ``qlora_unquantized_bits`` only in an fp32 model: under ``mixed-*``
    its unquantized parts compute in 16 bits."""
    if adapter_dtype is AdapterDtype.FP32:
        return 32
    if precision.param_dtype.bits == 32 and (method is not Method.QLORA or precision is Precision.FP32):
        return 32
    return 16


def qlora_unquantized_bits(precision: Precision) -> int:
    """Bits of a QLoRA model's unquantized parameters (embeddings, norms, lm_head): 32 when the model ends up in fp32
    (``--precision fp32``: ``from_pretrained(dtype=torch.float32)``; ``mixed-*``: peft's
    ``prepare_model_for_kbit_training`` casts every 16-bit one to fp32), else the 16 bits it was loaded in."""
    return 32 if precision.param_dtype.bits == 32 else 16


def half_dtype(precision: Precision) -> DType:
    """The 16-bit dtype a precision computes in: fp16 for fp16 and mixed-fp16, else bf16 (accelerate's
    ``mixed_precision``; FSDP2 ``MixedPrecisionPolicy.param_dtype``)."""
    return DType.FP16 if precision in (Precision.FP16, Precision.MIXED_FP16, Precision.FP16_TRUE) else DType.BF16


# -- bitsandbytes: versions and LLM.int8 (issue 11 knobs) -----------------------------------------------------------
# bitsandbytes <= 0.43 kept a 4-bit Linear's input for backward: MatMul4Bit.forward ``ctx.tensors = (A, B)``
# (bitsandbytes 0.43.1 bitsandbytes/autograd/_functions.py:516; 0.41.1 :522-523, 0.42.0 :523); 0.44.1 (:516) and
# later keep ``(None, B)``. A plain ctx attribute, not ``save_for_backward``: it bypasses saved-tensor hooks (so
# non-reentrant checkpointing does not drop it) and lives until the autograd graph dies, not until the node's backward.
# (``TrainingSetup.quant_saves_input``; the rule is ``terms/quantized.py``, the trace's emulation ``tracing/qlora.py``.)
# transformers ``BitsAndBytesConfig(llm_int8_threshold=6.0)`` (utils/quantization_config.py): outlier threshold of
# Linear8bitLt / MatMul8bitLt. Outlier columns are data-dependent; vramcalc counts none (subA [T, n_outliers] in the
# input dtype is a few columns in practice, LLM.int8 paper: Dettmers et al. 2022, section 4).
BNB_LLM_INT8_THRESHOLD = 6.0
# Int8Params.SCB: one fp32 absmax per output row (bitsandbytes nn/modules.py Int8Params._quantize)
BNB_INT8_SCB_BITS = 32

# -- model loading (the ``load`` phase) ------------------------------------------------------------------------------
# Transient bytes per weight of one Linear while a quantizer turns its 16-bit copy into 4 bits (on top of the 16-bit
# copy itself). torchao 0.1 ``to_nf4`` -> ``quantize_tensor_nearest`` (torchao@v0.1 torchao/dtypes/nf4tensor.py:438-446)
# materialises ``(value.unsqueeze(-1) - nf4).abs()`` [n, 16] bf16 twice, plus the scaled blocks: 2n + 2n + 32n + 32n
# = 68 bytes per weight (docs/stacks-research.md Q4). bitsandbytes quantize_4bit writes straight into its packed
# output and absmax (its final storage): the only scratch is double quantization's ``absmax - mean`` fp32 copy,
# 4 bytes per 64 weights (bitsandbytes/functional.py::quantize_4bit).
TORCHAO_01_TO_NF4_BYTES_PER_WEIGHT = 68
# (torchao 0.18 ``to_nf4`` quantizes in 1 Mi-element chunks, ``quantize_/workflows/nf4/nf4_tensor.py``
# ``CHUNK_SIZE = 1024**2``: traced on fake bf16 weights, peak scratch 9.0 B/weight at 4096x4096 and 6.2 B/weight at
# 14336x4096 (about 4.5·n plus a fixed ~70 MB); not a vramcalc option yet.)
BNB_QUANTIZE_4BIT_SCRATCH_BYTES_PER_WEIGHT = 4 / 64
# torchtune 0.1.x re-quantizes every NF4 weight while loading the checkpoint (``--load requantize``): its own
# ``aten.copy_`` override for NF4Tensor (torchtune 0.1.1 wheel ``torchtune/utils/_register_nf4_dispatch_ops.py:22-42``;
# the same at the rows' commits 0914d5cfb, 20747cd87, fde0dc403, 0217d44c2; deleted by #1294, 3d7ca3869, 2024-08-23)
# runs ``to_nf4(args[0][1].to(dest_tensor.device))`` while the whole quantized model is already built
# (``recipes/lora_finetune_single_device.py:254-269``: build under ``self._device``, then ``load_state_dict``).
# Bytes per weight of the largest Linear, torchao 0.1 (wheel ``torchao/dtypes/nf4tensor.py``): the checkpoint tensor
# moved to the GPU in its own dtype (2; Llama-2-7b-hf ships fp16), ``to_nf4``'s ``tensor.to(torch.bfloat16)`` (2, for a
# non-bf16 checkpoint; :598), the scaled blocks ``blocks / scales`` (2; :394) with their bf16 absmax (2/64),
# ``quantize_tensor_nearest``'s ``(value - nf4)`` and ``.abs()`` [n, 16] bf16 (32 + 32; :438-446), and the new
# tensor's double-quantized scalers made before (int8 1/64 + the factor's 2/64, below). Measured with
# vramcalc's AllocationTracker on the wheel's own code (CPU tensors, [2752, 1024], fp16 source): 70.075 B/weight.
TORCHTUNE_01_REQUANTIZE_BYTES_PER_WEIGHT = 2 + 2 + 2 + 2 / 64 + 32 + 32 + 1 / 64 + 2 / 64
# torchao 0.1 ``double_quantize_scalers`` (nf4tensor.py:333-349) keeps ``quantization_factor[:, 0]``, a strided view
# of the [n/64/256, 256] bf16 tensor ``256 / (2 * scaler_absmax)``: every NF4 weight holds n/64 bf16 (1/32 B per
# weight) beside its codes, where torchao 0.18 stores n/16384 values (``.contiguous()``). Measured as above:
# ``quantization_factor.untyped_storage().nbytes() / n`` = 0.03125 (0.1), 0.000122 (0.18).
TORCHAO_01_FACTOR_BYTES_PER_WEIGHT = 2 / 64
