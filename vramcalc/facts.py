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

# -- torchao: low-bit AdamW (torchao/optim/, torchao 0.18; torchao/prototype/low_bit_optim/ before 0.10) ------------
# ``_AdamBase._new_buffer`` (adam.py): a state is a quantized tensor subclass only when
# ``local_p.numel() >= 4096 and local_p.numel() % self.block_size == 0`` ("follow bitsandbytes, only quantize tensors
# >= 4096 values"); otherwise ``torch.zeros_like(local_p)``: the parameter's own dtype (bitsandbytes uses fp32).
TORCHAO_MIN_QUANTIZED_NUMEL = 4096
# Default ``block_size`` of each class (adam.py ``AdamW8bit``/``AdamWFp8``: 256, ``AdamW4bit``: 128; 8-bit and fp8
# were 2048 until ao#927, 2024-09-25). HF Trainer's ``adamw_torch_8bit``/``adamw_torch_4bit`` pass
# ``block_size=optim_args.get("block_size", 256)`` to both (transformers trainer_optimizer.py
# ``_get_torchao_optimizer``).
TORCHAO_BLOCK_SIZE = {"8bit": 256, "4bit": 128, "fp8": 256}
TORCHAO_TRAINER_BLOCK_SIZE = 256
# Per state tensor (``OptimState*.zeros``): codes (8-bit: uint8, one per element; 4-bit: uint8, two per byte,
# ``n_elems // 2``; fp8: float8_e4m3fn, one per element), ``scale = torch.zeros(numel // block_size)`` in the default
# dtype (fp32), and for 8-bit and 4-bit its own fp32 code table ``qmap``
# (``torch.tensor(get_qmap_signed() or get_qmap_unsigned(), dtype=torch.float32)``: 256 entries for 8-bit,
# ``create_dynamic_map(True, 3, 4)`` / ``linspace(0, 1, 17)[1:]``: 16 for 4-bit; fp8 has none).
TORCHAO_CODE_BITS = {"8bit": 8, "4bit": 4, "fp8": 8}
TORCHAO_QMAP_ENTRIES = {"8bit": 256, "4bit": 16, "fp8": 0}
TORCHAO_SCALE_BYTES = 4


def torchao_step_buffers(kind: str, shape: tuple[int, ...], block_size: int) -> tuple[int, ...]:
    """Bytes of each intermediate buffer alive at the peak of torchao's compiled step of one quantized parameter.

    ``_AdamBase.step`` calls ``torch.compile(single_param_adam, fullgraph=True, dynamic=False)`` per parameter
    (adam.py): the states are dequantized to fp32 (``dequant_with_qmap``), updated with ``lerp``, requantized per
    block of ``block_size`` (``scale_tensor``: ``input.view(-1, block_size).abs().amax(-1)``, then
    ``quantize_8bit_with_qmap`` / ``quantize_4bit_with_qmap`` / ``quantize_fp8``) and written back by the subclass's
    ``aten.copy_``. Which intermediates inductor realizes is its scheduler's choice; the buffers below are those its
    generated wrapper allocates with the Triton scheduler (torch 2.13, triton 3.9; ``benchmarks/torchao_step_plan.py``
    compiles the real step and parses ``call()``: ``benchmarks/torchao_step_plan.csv``). n elements, L = last dim,
    B = block_size, s = 4·n/B (one fp32 scale per block); two states, so every buffer comes in a pair:
      8-bit  L == B (2-D and up): none (everything written in place by one fused reduction kernel);
             1-D, or L above B and not a multiple of it: the new scales (s, s); otherwise the new scales and the
             new codes before their copy into the state: (s, s, n, n), the codes' pair fp32 (4·n, 4·n: the
             updated moments) for 3-D and up with L < B.
      4-bit  the unpacked codes re-stacked (``torch.stack([codes >> 4, codes & 0b1111], -1)``, an extern ``cat``:
             n, n), the scaled fp32 input (4·n, 4·n) and the int64 binary-search codes (8·n, 8·n) that the packing
             kernel (``(codes[::2] << 4) | codes[1::2]``) reads, and the scales (s, s) unless L == B: 26·n + 2·s.
      fp8    L == B (2-D and up): none; 2-D and up with L < B: the scales and the fp8 codes (s, s, n, n);
             otherwise the scales (s, s).
    What departs from the GPU: the plan was generated for a CPU device with inductor's Triton backend, the code path
    CUDA takes through the same scheduler; not yet checked against a CUDA run."""
    n = math.prod(shape)
    last = shape[-1]
    scales = (TORCHAO_SCALE_BYTES * n // block_size,) * 2
    if kind == "4bit":
        return (n, n, 4 * n, 4 * n, 8 * n, 8 * n) + (() if len(shape) > 1 and last == block_size else scales)
    if len(shape) > 1 and last == block_size:
        return ()
    if len(shape) == 1:
        return scales
    if kind == "8bit":
        if last > block_size and last % block_size:
            return scales
        code = 4 * n if len(shape) > 2 and last < block_size else n
        return scales + (code, code)
    return scales + ((n, n) if last < block_size else ())


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
# Unsloth 2024.x ``kernels/cross_entropy_loss.py`` MAX_FUSED_SIZE: the columns of one vocabulary chunk of
# ``Fast_CrossEntropyLoss`` (a [T, ceil(V / 65536)] logsumexp above it)
UNSLOTH_CE_MAX_FUSED_SIZE = 65536
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
