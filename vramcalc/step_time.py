"""Time of one training step from the work it does: matmuls, attention, memory-bound kernels and communication.

Standard library only; every function takes plain numbers (the fields of ``vramcalc.ModelSpec`` and of
``vramcalc.catalogue.GpuSpec`` are the intended inputs) and returns plain numbers or frozen dataclasses.

The step is the sum of four kinds of work on one GPU (Williams et al., "Roofline", CACM 2009: each kernel is bound
either by arithmetic or by memory traffic, and the two kinds of kernel run one after another in a training step):

  step_s = max(matmul_flops / R_mm, n_gemm·h) + max(attention_flops / R_attn, n_attn·h)
           + max(memory_bytes / B, n_other·h) + exposed_comm_s

* ``h`` is the host's time to issue one kernel (Python, the dispatcher, autograd and the launch) plus its share of
  the view ops that launch nothing (``host_seconds_per_kernel``; the launched kernel's part comes from the GPU's
  ``RuntimeProfile.host_seconds_per_kernel``, calibrated per machine, default ``HOST_SECONDS_PER_KERNEL``), ``n_*``
  the kernels of each kind in the step (``kernel_counts``): the GPU cannot run a kernel before the host has issued
  it, so a kind of work takes whichever is longer (Horace He, "Making Deep Learning Go Brrrr From First Principles": compute,
  memory and *overhead* are the three regimes). It matters where kernels are small: short sequences, micro-batch 1,
  LoRA's rank-r matmuls, eager (uncompiled) models with many elementwise kernels per layer.

* ``R_mm`` is an *achievable* dense GEMM rate for the matmul dtype (measured cuBLAS/hipBLASLt rates, not the
  datasheet peak): ``data/achievable_rates.csv``, each row with its source (``achievable_rate``). Each GEMM of the
  step is timed on the roofline, max(FLOPs / R_mm, its compulsory bytes / B) (``decoder_gemms``, ``gemm_seconds``),
  so thin GEMMs (LoRA's rank-r A and B, tensor-parallel slices) run at the memory's pace.
* ``R_attn`` is the attention kernel's achievable rate (FlashAttention / SDPA measurements), same file; a rate
  measured on the forward only runs the backward at FlashAttention-2's measured backward/forward ratio
  (``attention_backward_tflops``).
* ``B`` is the GPU's *achievable* device-memory bandwidth (``achievable_bandwidth_gb_s``): the ``memory`` rows of
  ``data/achievable_rates.csv``, each with its source: a STREAM-style kernel that reads and writes device memory
  (BabelStream's triad, gpu-benches' gpu-stream triad, a vectorised copy), the mean of the sources that measured the
  GPU; a GPU without a published measurement takes its datasheet bandwidth x the median measured/datasheet ratio of
  the measured GPUs of its memory family (HBM or GDDR) and is marked ``derived``. The datasheet bandwidth
  (``GpuSpec.bandwidth_gb_s``) remains the fallback for a GPU without a row. Every memory-bound term (elementwise
  kernels, the loss, the optimizer step, dequantization, casts) and the bytes side of each GEMM's roofline run at B.
* ``exposed_comm_s`` is the part of the collectives that compute does not hide (``exposed_comm_seconds``): each
  engine's data-parallel collectives behind the compute of the phase they run in
  (``DATA_PARALLEL_OVERLAP_BY_SHARDING``), on the ring's slowest link (``ring_bus_gb_s``; the links come from
  ``vramcalc.cost.link_plan``), plus the tensor-parallel collectives whole (``TENSOR_PARALLEL_OVERLAP``: they sit
  between dependent ops; transformers' ``--tp`` bytes arrive in ``StepSetup.tp_comm_bytes``).

tokens/s = tokens in the step / step_s; MFU = model FLOPs / (step_s x datasheet dense peak) with the model FLOPs of
PaLM (Chowdhery et al. 2022, App. B): 6·N·T + 12·L·a·d·s·T for full fine-tuning, without recomputation, attention
counted non-causal, as ``vramcalc.cost`` and torchtitan count it. For LoRA the model FLOPs are 4·N·T + 6·N_a·T + the
attention, since frozen weights need no weight gradient.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from statistics import median

from .catalogue import data_dir, get_gpu

TFLOPS = 1e12
GB_PER_S = 1e9
BF16_BYTES = 2

# NCCL reaches about 80% of the unidirectional link rate in busbw: stas00/ml-engineering network/README.md
# ("The ~80% rule of thumb ... the H200 node lands on 82% when NCCL rings"; A100 node likewise), commit 744d01e.
NCCL_BUS_EFFICIENCY = 0.8

# Overlap of data-parallel collectives with compute. FSDP/ZeRO-3 prefetch the next layer's all-gather during the
# current layer's compute and DDP/ZeRO-2 launch bucketed all-reduces during backward (PyTorch FSDP paper, Zhao et
# al. 2023, §3.3-3.4; DDP paper, Li et al. 2020, §3.2.3). What stays exposed is the first all-gather and the last
# bucket, about one layer in L: assumption 0.9 for L >= 10. Tensor parallelism's collectives sit between dependent
# matmuls and are not overlapped (0.0). Async TP (torch micro-pipeline TP: the all-gather and reduce-scatter split
# into P2P chunks that overlap the decomposed matmul) hides the collectives of the forward passes only: its authors
# report "up to ~29% forward pass speedup and ~8% E2E speedup in Llama3 7B" (~20% and ~8% for 70B; PyTorch dev-discuss
# "[Distributed w/ TorchTitan] Introducing Async Tensor Parallelism in PyTorch", Sept 2024). With the forward about a
# third of a step, a 29% faster forward alone gives (1 - 1/1.29)/3 = 7.5% end to end, the reported ~8%: the
# backward's collectives stay exposed. So async TP overlaps the forward and recomputed forwards' share (1.0) and
# leaves the backward's (``ASYNC_TENSOR_PARALLEL_BACKWARD_OVERLAP`` = 0.0).
DATA_PARALLEL_OVERLAP = 0.9

# Which compute can hide each engine's data-parallel collectives (exposed comm = comm − min(overlap · comm, the
# compute of that phase), ``exposed_comm_seconds``), read from each engine's source (torch 2.13, DeepSpeed master):
#   ddp: the Reducer all-reduces each gradient bucket (bucket_cap_mb default 25 MiB, torch/nn/parallel/distributed.py
#     :825) from autograd hooks as the bucket fills in backward (Li et al. 2020, "PyTorch Distributed", §3.2.3):
#     backward compute only;
#   fsdp: FSDP2 issues the next layer's all-gather while this one computes, in forward by default
#     (torch/distributed/fsdp/_fully_shard/_fully_shard.py:513, set_modules_to_forward_prefetch: "the default
#     overlap behavior") and in backward (_fsdp_state.py:384, default backward prefetch); reduce-scatters run on
#     their own stream in backward (Zhao et al. 2023 §3.3-3.4): forward gathers under forward compute, backward
#     gathers and reduce-scatters under backward compute;
#   zero3: DeepSpeed prefetches parameters (stage3_prefetch_bucket_size) and overlap_comm defaults to True at stage
#     3 only (deepspeed/runtime/zero/config.py, overlap_comm_valid: ``self.stage == ZeroStageEnum.weights``): as fsdp;
#   zero1 / zero2: overlap_comm defaults to False below stage 3 (same validator), so the gradient reduction runs on
#     the compute stream, and the all-gather of the updated 16-bit partitions follows the optimizer step: nothing is
#     hidden (accelerate's DeepSpeedPlugin writes no overlap_comm; a config that sets it is not modelled).
# Values: (phases whose compute hides the collectives, the overlap fraction within them).
DATA_PARALLEL_OVERLAP_BY_SHARDING: dict[str, tuple[tuple[str, ...], float]] = {
    "ddp": (("backward",), DATA_PARALLEL_OVERLAP),
    "fsdp": (("forward", "backward"), DATA_PARALLEL_OVERLAP),
    "zero3": (("forward", "backward"), DATA_PARALLEL_OVERLAP),
    "zero2": ((), 0.0),
    "zero1": ((), 0.0),
    "none": ((), 0.0),
}
# transformers' tp_plan (``--tp``; transformers 5.25.0 distributed/tensor_parallel.py, re-exported by
# integrations/tensor_parallel.py) has no asynchronous TP: RowwiseParallel.transform_output_post_forward redistributes
# o/down's Partial output to Replicate (:373-374, a functional all-reduce) and hands it to the residual add at once;
# ColwiseParallel's DTensor input (:192) all-reduces its Partial gradient in backward before the norm's backward needs
# it; lm_head's gathered logits (:211-212) feed the loss. Each collective sits between two dependent ops, so its whole
# time adds to the step (Megatron-LM likewise: Shoeybi et al. 2019 §3, f and g are synchronous).
TENSOR_PARALLEL_OVERLAP = 0.0
ASYNC_TENSOR_PARALLEL_OVERLAP = 1.0
ASYNC_TENSOR_PARALLEL_BACKWARD_OVERLAP = 0.0
# Context parallelism (``--cp``; torch 2.13 ring attention, distributed/tensor/experimental/_context_parallel/
# _attention.py): each step of the ring issues the K/V exchange before its partial SDPA and waits for it at the next
# step (forward :430-439, backward :522-534, the dK/dV all-to-all :595, :625-627), so the transfers hide behind the
# attention kernels, and only those: exposed = max(0, cp comm - attention time) (``StepWork.context_parallel_s``).

# Host time to issue one eager PyTorch op on a CUDA device: "~5-25 µs of CPU-side work per op" (Python bytecode ~1,
# pybind ~1, autograd ~1-3, ATen dispatch ~1-2, backend ~1-5, cudaLaunchKernel ~1-3 µs: jiahuanglin.xyz, "From
# PyTorch op to kernel launch", gpu_kernel_serving lesson 18). 10 µs is taken, inside that range, before comparing
# with any published throughput (benchmarks/throughput.md shows the effect). It is the default of
# ``terms.runtime.RuntimeProfile.host_seconds_per_kernel``, the one the estimate uses (``StepRates.host_s_per_kernel``):
# a GPU's calibration profile replaces it with the value fitted to that machine's measured steps
# (``calibrate.fit.fit_host_seconds_per_kernel``); it is a property of the host CPU, not of the GPU.
HOST_SECONDS_PER_KERNEL = 10e-6

# View and metadata ops (view, t, transpose, _unsafe_view, slice, expand, detach, ...) launch no kernel but each
# passes through the dispatcher and autograd (a view records its base and a backward node) like any op. Counted with
# TorchDispatchMode over one training micro-step of transformers' Llama on the CPU (benchmarks/throughput_trace_ops.py;
# torch 2.13, transformers 5.25, peft 0.21; per layer = (4-layer count - 2-layer count) / 2), launched ops / view ops
# per layer: full fine-tuning, no checkpointing 111 / 116; LoRA on all linears 226 / 224; LoRA on all linears with
# dropout 0.05, fp32 adapters under bf16 autocast and reentrant checkpointing 339 / 312 (367 launched ops on the
# CPU less 28 that CUDA's fused native_dropout does not issue: bernoulli_ + div_ per dropout forward, 14 of each).
# Over the three: 652 view ops per 676 launched ops.
VIEW_OPS_PER_KERNEL = (116 + 224 + 312) / (111 + 226 + 339)
# Host time of one view op: the components of HOST_SECONDS_PER_KERNEL's per-op breakdown a view also runs, autograd
# ~1-3 µs and ATen dispatch ~1-2 µs (same source), at their midpoints: 2 + 1.5 = 3.5 µs; no backend kernel and no
# cudaLaunchKernel, and the Python/pybind share left out (many views are issued from C++ composites such as
# aten::linear's t). Set before comparing with any published throughput, not fitted.
VIEW_OP_HOST_SECONDS = 3.5e-6

# Activation offloading copies saved activations to pinned host memory on a side stream in forward and back in
# backward (torchtune ``OffloadActivations``, use_streams=True): the copies overlap compute; what exceeds compute shows.
ACTIVATION_OFFLOAD_OVERLAP = 1.0


# -- matmul FLOPs ---------------------------------------------------------------------------------------------------
def dense_matmul_params(hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int,
                        intermediate_size: int, vocab_size: int) -> int:
    """N_mm of a dense Llama-style decoder: per layer q (h x a·d), k and v (h x kv·d each), o (a·d x h) and the
    gated MLP (3 x h x I), plus the lm_head (V x h, counted even when tied: it is still a matmul). The embedding
    lookup is not a matmul. Matches ``vramcalc.cost.matmul_params`` for dense models without biases."""
    q_width = num_heads * head_dim
    kv_width = num_kv_heads * head_dim
    attention = hidden_size * q_width + 2 * hidden_size * kv_width + q_width * hidden_size
    per_layer = attention + 3 * hidden_size * intermediate_size
    return num_layers * per_layer + vocab_size * hidden_size


def lora_params(hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int,
                intermediate_size: int, rank: int,
                targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")) -> int:
    """N_a = L · Σ_targets r·(in + out): LoRA's A (r x in) and B (out x r) on each targeted linear (Hu et al. 2021)."""
    q_width = num_heads * head_dim
    kv_width = num_kv_heads * head_dim
    shapes = {"q": (hidden_size, q_width), "k": (hidden_size, kv_width), "v": (hidden_size, kv_width),
              "o": (q_width, hidden_size), "gate": (hidden_size, intermediate_size),
              "up": (hidden_size, intermediate_size), "down": (intermediate_size, hidden_size)}
    return num_layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


def matmul_flops(n_matmul_params: float, tokens: float, *, train_base: bool, n_adapter_params: float = 0.0,
                 recompute_forwards: float = 0.0) -> float:
    """Executed dense matmul FLOPs of one step on ``tokens`` tokens.

    A linear y = x·Wᵀ costs 2·N·T forward, 2·N·T for the input gradient dx = dy·W and 2·N·T for the weight gradient
    dW = dyᵀ·x (Kaplan et al. 2020, §2.1; PaLM App. B): 6·N·T when W trains. A frozen W (LoRA, QLoRA, prompt tuning)
    skips dW but still passes dx back to the layers below: 4·N·T. LoRA's A and B train: 6·N_a·T.
    Recomputation (activation checkpointing) runs the forward again: + recompute_forwards · (2·N·T + 2·N_a·T),
    1.0 for full checkpointing, the recomputed fraction for selective checkpointing."""
    base = (6.0 if train_base else 4.0) * n_matmul_params * tokens
    adapter = 6.0 * n_adapter_params * tokens
    recompute = recompute_forwards * 2.0 * (n_matmul_params + n_adapter_params) * tokens
    return base + adapter + recompute


def attention_forward_flops(num_layers: int, num_heads: int, qk_head_dim: int, v_head_dim: int, seq_len: int,
                            tokens: float, *, causal: bool = True, kernel: str = "flash") -> float:
    """QKᵀ and PV of ``tokens`` tokens each attending to a sequence of ``seq_len``: 2·L·a·s·(d_qk + d_v)·T
    (PaLM App. B). A causal mask halves the work of tiled kernels (FlashAttention / SDPA flash and memory-efficient
    skip fully masked blocks: Dao 2023, FlashAttention-2 §3.1.1); the eager path computes every score and masks
    afterwards, so it keeps the full count."""
    full = 2.0 * num_layers * num_heads * seq_len * (qk_head_dim + v_head_dim) * tokens
    return full / 2.0 if causal and kernel != "eager" else full


def attention_flops(num_layers: int, num_heads: int, qk_head_dim: int, v_head_dim: int, seq_len: int, tokens: float, *,
                    causal: bool = True, kernel: str = "flash", recompute_forwards: float = 0.0) -> float:
    """Executed attention FLOPs of a step: forward F, backward 2·F for dQ, dK (via dS) and dV, dP, plus 0.5·F where the
    kernel recomputes S = QKᵀ in its backward instead of storing it (FlashAttention, Dao et al. 2022 §3.1), plus
    recompute_forwards · F under checkpointing. Flash/SDPA: 3.5·F; eager: 3·F."""
    forward = attention_forward_flops(num_layers, num_heads, qk_head_dim, v_head_dim, seq_len, tokens, causal=causal,
                                      kernel=kernel)
    backward = (2.5 if kernel != "eager" else 2.0) * forward
    return forward + backward + recompute_forwards * forward


def model_flops(n_matmul_params: float, tokens: float, num_layers: float, num_heads: int, qk_head_dim: int,
                v_head_dim: int, seq_len: int, *, train_base: bool = True, n_adapter_params: float = 0.0) -> float:
    """The MFU numerator: (6·N or 4·N + 6·N_a)·T + 3 · 2·L·a·s·(d_qk+d_v)·T (non-causal attention, no recomputation;
    PaLM App. B; ``vramcalc.cost.training_flops`` uses the same definition)."""
    matmuls = matmul_flops(n_matmul_params, tokens, train_base=train_base, n_adapter_params=n_adapter_params)
    attention = 3.0 * attention_forward_flops(num_layers, num_heads, qk_head_dim, v_head_dim, seq_len, tokens,
                                              causal=False, kernel="eager")
    return matmuls + attention


def attention_layer_work(window: int | None, seq_len: int, kernel: str) -> float:
    """One attention layer's work relative to a full causal layer's at ``seq_len``, by kernel:
    - no window, or a window not shorter than the sequence: 1;
    - ``flash`` (FlashAttention-2 with ``window_size``, transformers' flash path passes ``sliding_window``): tiles
      outside the window are skipped, so the work is the pairs each query attends, Σ_i min(i, w) =
      w(w+1)/2 + (s-w)·w, over the causal Σ_i i = s(s+1)/2;
    - ``sdpa``: a window no longer than the sequence makes transformers pass a 4-D mask tensor
      (``terms.activations.sliding_window_masked``: the mask is skipped only while the sequence is shorter than the
      window), so SDPA runs the memory-efficient kernel, which computes every tile of the s x s scores and applies
      the mask: 2 (twice the causal kernel's half);
    - ``eager``: every score is computed whatever the mask: 1 (its count is already the full s x s).
    """
    if window is None or kernel == "eager":
        return 1.0
    if kernel == "sdpa":
        return 2.0 if window <= seq_len else 1.0
    if window >= seq_len:
        return 1.0
    s, w = float(seq_len), float(window)
    return (w * (w + 1) / 2 + (s - w) * w) / (s * (s + 1) / 2)


# -- memory-bound work ----------------------------------------------------------------------------------------------
def elementwise_bytes(tokens: float, hidden_size: int, q_width: int, kv_width: int, intermediate_size: int,
                      num_layers: int, *, fused: bool, recompute_forwards: float = 0.0, qk_norm: bool = False) -> float:
    """HBM bytes of a decoder's elementwise kernels in 16-bit activations (norms, RoPE, residual adds, SwiGLU).

    Forward per layer and token, counting each kernel's reads and writes of 2-byte elements:
      fused (torch.compile, Liger): 2 RMSNorms 2·(2h) + RoPE 2·(q+kv) + 2 residual adds 2·(3h) + SwiGLU 3·I elements
        = (10h + 2(q+kv) + 3I) elements;
      eager (transformers' LlamaRMSNorm upcasts to fp32 in five kernels ≈ 18h element-equivalents per norm; RoPE's
        rotate_half/cat/mul/add ≈ 9 passes; SiLU then multiply = 5·I): (42h + 9(q+kv) + 5I) elements.
    ``qk_norm`` (Qwen3, OLMo-2, Llama-4: an RMSNorm on q and on k before RoPE) adds the same norm over q + kv
    elements per token: 18(q+kv) eager, 2(q+kv) fused.
    Backward is taken as twice the forward (each op reads its saved input and the upstream gradient and writes the
    input gradient: assumption); recomputation adds recompute_forwards forwards."""
    if fused:
        elements = 10 * hidden_size + 2 * (q_width + kv_width) + 3 * intermediate_size
    else:
        elements = 42 * hidden_size + 9 * (q_width + kv_width) + 5 * intermediate_size
    if qk_norm:
        elements += (2 if fused else 18) * (q_width + kv_width)
    forward = elements * BF16_BYTES * num_layers * tokens
    return forward * (3.0 + recompute_forwards)


# Bytes per logit per token of the loss: transformers' path writes bf16 logits (2), upcasts to fp32 (read 2, write 4),
# log-softmax (read 4, write 4), its backward (read 4 + 4, write 4) and the cast back (read 4, write 2) = 30 bytes;
# torchtune's chunked cross-entropy does the same per chunk (same traffic, smaller peak). A fused linear+CE kernel
# (Liger FusedLinearCrossEntropy) never writes the logits: ≈ 4 bytes (read the chunk's logits twice in SRAM-sized
# tiles; assumption). litgpt's loss also writes and rereads Fabric's fp32 copy of every logit (+4 +4 - the cast's own
# 4-byte write it replaces = 34); TRL's tiled log-prob kernel writes each fp32 tile and reads it back, in forward and
# again when backward recomputes it: 2 · (4 + 4) = 16 (assumption, from trl/kernels/chunked_logprob.py's structure).
# torchtune's 2024 loop and transformers 4.31-4.49 add the shifted contiguous fp32 copy (read 4, write 4) and its
# slice's backward (a zero-filled [T, V] written, then the gradient read and copied in: 4 + 4 + 4): 50. A custom loop
# that keeps ``outputs`` moves the same bytes as transformers' path: 30. A loss on the logits in their own 16-bit dtype
# (``model-dtype`` without autocast): write the logits (2), the shifted copy (2 + 2), log-softmax (2 + 2), nll's
# gradient (2), its backward (2 + 2 + 2) and the slice's (2 + 2 + 2): 24; under autocast it casts to fp32 and moves
# hf-shifted's bytes (``cost.step_for`` passes that word). Unsloth <= 2024.11.7's loss (``unsloth-2024``): lm_head
# writes the 16-bit logits (2), the Triton forward reads them (2), its backward reads them and writes the gradient in
# place (2 + 2), and accelerate's fp32 copy of the returned logits under autocast reads 2 and writes 4: 14.
LOSS_BYTES_PER_LOGIT = {"hf": 30.0, "chunked": 30.0, "torchtune": 30.0, "litgpt": 34.0, "trl": 16.0, "fused": 4.0,
                        "torchtune-2024": 50.0, "hf-shifted": 50.0, "hf-fp32-logits": 50.0, "hf-loop": 30.0,
                        "model-dtype": 24.0, "unsloth-2024": 14.0}


def loss_bytes(tokens: float, vocab_size: int, loss: str = "hf") -> float:
    """HBM bytes of the lm_head output and the cross-entropy: T · V · LOSS_BYTES_PER_LOGIT[loss]."""
    if loss not in LOSS_BYTES_PER_LOGIT:
        raise ValueError(f"unknown loss {loss!r}; expected one of {sorted(LOSS_BYTES_PER_LOGIT)}")
    return tokens * vocab_size * LOSS_BYTES_PER_LOGIT[loss]


def optimizer_step_bytes(trainable_params: float, *, param_bytes: float, grad_bytes: float, state_bytes: float,
                         num_states: int = 2) -> float:
    """HBM bytes of one AdamW step over the trainable parameters held by this GPU: read p, g and each state, write p
    and each state: P · (2·param + grad + 2·states·state_bytes) (torch.optim.AdamW's foreach/fused update is a
    stream over these tensors). 8-bit Adam: state_bytes = 1; SGD: num_states = 0 or 1."""
    return trainable_params * (2 * param_bytes + grad_bytes + 2 * num_states * state_bytes)


def dequantize_bytes(quantized_params: float, passes: float, *, bits: int = 4) -> float:
    """HBM bytes of dequantizing k-bit weights to bf16 before each matmul (bitsandbytes ``dequantize_4bit``,
    torchao NF4Tensor): read bits/8 bytes and write 2 bytes per weight, once per pass over the weights. Passes per
    optimizer step = forward + backward (the input gradient needs W) + recomputed forwards, per micro-batch."""
    return quantized_params * (bits / 8.0 + BF16_BYTES) * passes


# Dequantization kernels of a k-bit base: HBM bytes per quantized weight and pass, and whether the backward
# dequantizes again (True) or reuses the dequantized weight autograd saved in forward (False).
#   "bnb": bitsandbytes ``dequantize_4bit`` before each matmul (MatMul4Bit.forward) and again in MatMul4Bit.backward
#     for dX = dY·W; torchao's NF4Tensor (torchtune QLoRA) likewise dequantizes in its linear's forward and backward:
#     read bits/8, write 2 bytes (``dequantize_bytes``).
#   "gptq-torch": auto-gptq ``qlinear_cuda_old.QuantLinear.forward`` (the kernel transformers' GPTQConfig with
#     disable_exllama=True loads for desc_act=False) takes a pure-torch path once the input has
#     >= kernel_switch_threshold = 128 rows (every training micro-batch): bitwise_right_shift of the expanded int32
#     qweight (read 0.5, write 4 B per weight), .to(int8) (read 4, write 1), bitwise_and in place (1 + 1),
#     weight - zeros (1 + 1), scales * (...) to fp16 (read 1, write 2) = 16.5 B per weight and pass in fp16
#     (auto-gptq's setting: Qwen's finetune_qlora_single_gpu.sh, "use --fp16 instead of --bf16 due to autogptq",
#     with DeepSpeed's fp16 engine); "gptq-torch-bf16": under bf16 autocast torch.matmul(x.half(), weight) also casts the fp16 weight to
#     bf16 (read 2, write 2): 20.5 B (AutoGPTQ/AutoGPTQ auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py, forward).
#     Autograd saves the dequantized weight for dX, so the backward does not dequantize: passes = forward +
#     recomputed forwards.
DEQUANT_KERNELS: dict[str, tuple[float | None, bool]] = {"bnb": (None, True), "gptq-torch": (16.5, False),
                                                         "gptq-torch-bf16": (20.5, False)}


def dequant_bytes_per_weight(kernel: str, bits: int) -> float:
    """HBM bytes per quantized weight and pass of ``kernel`` (``DEQUANT_KERNELS``); "bnb": bits/8 + 2."""
    if kernel not in DEQUANT_KERNELS:
        raise ValueError(f"unknown dequantization kernel {kernel!r}; expected one of {sorted(DEQUANT_KERNELS)}")
    fixed = DEQUANT_KERNELS[kernel][0]
    return fixed if fixed is not None else bits / 8.0 + BF16_BYTES


# -- one GEMM on the roofline -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gemm:
    """``calls`` GEMMs of one shape in a step: FLOPs (at the bf16 rate's equivalent) and HBM bytes of each call."""

    flops: float
    nbytes: float
    calls: float


def linear_gemm(m: float, k: float, n: float, calls: float, *, in_bytes: float = BF16_BYTES,
                out_bytes: float = BF16_BYTES, rate_ratio: float = 1.0) -> Gemm:
    """A [m, k] x [k, n] GEMM: 2·m·k·n FLOPs; it reads both operands and writes the result once:
    (m·k + k·n)·in_bytes + m·n·out_bytes (Williams et al., "Roofline", CACM 2009: the compulsory traffic). The two
    backward GEMMs of a linear (dX = dY·W: [m, n] x [n, k]; dW = dYᵀ·X: [n, m] x [m, k]) touch the same three
    matrices, so a linear's forward, dX and dW each cost one such call. ``rate_ratio`` = R_bf16 / R_dtype converts the
    FLOPs of an fp8 GEMM to the bf16 rate's equivalent."""
    return Gemm(2.0 * m * k * n * rate_ratio, (m * k + k * n) * in_bytes + m * n * out_bytes, calls)


def gemm_seconds(gemm: Gemm, matmul_tflops: float, bandwidth_gb_s: float) -> float:
    """calls · max(FLOPs / R_mm, bytes / B): a GEMM is bound by its arithmetic or by its compulsory HBM traffic,
    whichever is longer (roofline), both at achievable rates (R_mm and B: ``achievable_rate``,
    ``achievable_bandwidth_gb_s``). Large LLM GEMMs sit far right of the ridge point (A100: 271.2 TFLOP/s / 1.73 TB/s
    = 157 FLOP/B; H100 SXM: 794.5 / 2.97 = 268); a thin one (tensor parallelism's [T, h] x [h, kv/tp], LoRA's rank-r
    A and B with arithmetic intensity ≈ r FLOP/B) falls left of it and runs at the memory's pace."""
    return gemm.calls * max(gemm.flops / (matmul_tflops * TFLOPS), gemm.nbytes / (bandwidth_gb_s * GB_PER_S))


def lora_elementwise_bytes(tokens: float, in_features: int, out_features: int, *, act_bytes: float = BF16_BYTES,
                           adapter_bytes: float = BF16_BYTES, dropout: bool = False, fused: bool = False,
                           recompute_forwards: float = 0.0) -> float:
    """HBM bytes of one LoRA-adapted linear's non-GEMM kernels on ``tokens`` tokens (peft
    ``tuners/lora/layer.py`` Linear.forward: result = base(x); x = cast(x, lora_A.dtype);
    result = result + lora_B(lora_A(dropout(x))) * scaling; torchtune ``LoRALinear.forward`` is the same chain).
    The rank-r GEMMs themselves are ``linear_gemm`` calls. Per token, with e = act_bytes, a = adapter_bytes:
      forward: the cast of x to the adapter dtype when a != e (read e·in, write a·in); dropout when p > 0 (read a·in,
        write a·in and a 1-byte mask); the scaling multiply (read, write e·out) and the add into the base output
        (read 2·e·out, write e·out); fused (torch.compile) the multiply and add are one kernel
        (read 2·e·out, write e·out);
      backward: the scaling's backward (read, write e·out), dropout's (read a·in + mask, write a·in), the cast's
        (read a·in, write e·in) and the sum of the LoRA and base input gradients (read 2·e·in, write e·in).
    Recomputation (checkpointing) repeats the forward."""
    cast = (act_bytes + adapter_bytes) * in_features if adapter_bytes != act_bytes else 0.0
    drop = (2 * adapter_bytes + 1) * in_features if dropout else 0.0
    scale_add = (3 if fused else 5) * act_bytes * out_features
    forward = cast + drop + scale_add
    backward = 2 * act_bytes * out_features + drop + cast + 3 * act_bytes * in_features
    return tokens * (forward * (1.0 + recompute_forwards) + backward)


def float8_cast_bytes(tokens: float, linear_in_out_sum: float, n_matmul_params: float, *,
                      recompute_forwards: float = 0.0) -> float:
    """Extra HBM bytes of dynamic tensorwise float8 training (torchao.float8): every fp8 GEMM operand is first
    reduced to its amax (read 2 bytes) and cast (read 2, write 1): 5 bytes per element. Per linear that is the input
    activation (T x in) in forward, the output gradient (T x out) in backward, and the weight in each pass.
    linear_in_out_sum = Σ over the decoder's linears of (in + out)."""
    activations = 5.0 * tokens * linear_in_out_sum * (1.0 + recompute_forwards)
    weights = 5.0 * n_matmul_params * (2.0 + recompute_forwards)
    return activations + weights


def memory_seconds(nbytes: float, bandwidth_gb_s: float) -> float:
    """Time of memory-bound work at the GPU's achievable memory bandwidth (``achievable_bandwidth_gb_s``):
    bytes / (GB/s · 1e9)."""
    return nbytes / (bandwidth_gb_s * GB_PER_S)


# -- communication --------------------------------------------------------------------------------------------------
def collective_bytes(payload_bytes: float, ranks: int, kind: str) -> float:
    """Bytes each rank sends in a ring collective (NCCL PERFORMANCE.md, "bus bandwidth"): all-reduce 2·(n-1)/n ·
    payload; all-gather and reduce-scatter (n-1)/n · payload (payload = the full, unsharded tensor)."""
    factors = {"all_reduce": 2.0, "all_gather": 1.0, "reduce_scatter": 1.0}
    if kind not in factors:
        raise ValueError(f"unknown collective {kind!r}; expected one of {sorted(factors)}")
    if ranks <= 1:
        return 0.0
    factor = factors[kind]
    return factor * (ranks - 1) / ranks * payload_bytes


def comm_seconds(bytes_per_rank: float, link_gb_s_per_direction: float, *,
                 efficiency: float = NCCL_BUS_EFFICIENCY) -> float:
    """Time to send ``bytes_per_rank`` over a link of ``link_gb_s_per_direction`` at NCCL's bus efficiency.
    NVLink figures in the catalogue are bidirectional: pass nvlink_bidir_gb_s / 2."""
    if bytes_per_rank <= 0:
        return 0.0
    return bytes_per_rank / (link_gb_s_per_direction * GB_PER_S * efficiency)


def multi_node_ring_gb_s(nvlink_gb_s_per_direction: float, nic_gb_s_per_gpu: float, ranks_per_node: int) -> float:
    """Per-GPU bus bandwidth of a ring collective that spans nodes whose GPUs each have their own NIC, with
    ``ranks_per_node`` members of the ring in each node: min(NVLink per direction, NIC x ranks per node). NCCL runs
    one ring channel per NIC, each entering and leaving a node once (NCCL's topology search pairs channels with
    distinct NICs; nccl-tests PERFORMANCE.md defines bus bandwidth per GPU), so each channel's inter-node hop carries
    only that channel's share of the data and the ring's NICs in a node together set the pace: a data-parallel ring
    over all 8 GPUs of HGX H100/H200 nodes runs at min(450, 8 x 50) = 400 GB/s; a ring with one member per node
    (the data-parallel groups beside tensor parallelism of 8) has one NIC: 50 GB/s."""
    ranks_per_node = max(ranks_per_node, 1)
    if nvlink_gb_s_per_direction <= 0 or ranks_per_node == 1:
        return nic_gb_s_per_gpu * ranks_per_node
    return min(nvlink_gb_s_per_direction, nic_gb_s_per_gpu * ranks_per_node)


def ring_bus_gb_s(node_link_gb_s: float, ranks: int, ranks_per_node: int, nic_gb_s: float = 0.0,
                  nics_per_node: int = 1) -> float:
    """Per-GPU bus bandwidth of a ring collective over ``ranks`` GPUs, ``ranks_per_node`` of them in each node: the
    slowest link of the ring sets its pace (NCCL's ring passes every chunk through every link; nccl-tests
    doc/PERFORMANCE.md: algbw = S / t, busbw = algbw · 2(n−1)/n for all-reduce and (n−1)/n for all-gather and
    reduce-scatter, which makes busbw comparable with the link's own bandwidth). Inside one node that is the node
    link (NVLink per direction, or PCIe); across nodes NCCL runs one ring channel per NIC, each entering and leaving
    a node once, so the node's NICs together carry the ring's inter-node hop (``multi_node_ring_gb_s``):
    min(node link, NIC x min(NICs per node, ranks per node)); with one member per node there is no intra-node hop.
    This is the flat ring; NCCL's tree and NVLS algorithms can beat it across nodes (not modelled)."""
    if ranks <= ranks_per_node:
        return node_link_gb_s
    network = nic_gb_s * max(min(nics_per_node, ranks_per_node), 1)
    if ranks_per_node <= 1:
        return network
    return min(node_link_gb_s, network)


def data_parallel_phase_bytes(param_count: float, trainable_count: float, ranks: int, sharding: str, *,
                              param_bytes: float = BF16_BYTES,
                              grad_bytes: float = BF16_BYTES) -> tuple[float, float, float]:
    """``data_parallel_bytes`` split by when the bytes move: (in forward, in backward, after backward).
    fsdp / zero3: the forward all-gather of the parameters, then the backward all-gather and the gradient
    reduce-scatter; ddp: the gradient all-reduce in backward; zero1 / zero2: the reduction and the all-gather of the
    updated partitions, neither overlapped (``DATA_PARALLEL_OVERLAP_BY_SHARDING``)."""
    grads = trainable_count * grad_bytes
    if sharding in ("fsdp", "zero3"):
        gather = collective_bytes(param_count * param_bytes, ranks, "all_gather")
        return gather, gather + collective_bytes(grads, ranks, "reduce_scatter"), 0.0
    if sharding == "ddp":
        return 0.0, collective_bytes(grads, ranks, "all_reduce"), 0.0
    if sharding in ("zero1", "zero2"):
        return 0.0, 0.0, collective_bytes(grads, ranks, "all_reduce")
    return 0.0, 0.0, 0.0


def data_parallel_bytes(param_count: float, trainable_count: float, ranks: int, sharding: str, *,
                        param_bytes: float = BF16_BYTES, grad_bytes: float = BF16_BYTES) -> float:
    """Bytes each data-parallel rank sends per optimizer step.
    ddp / zero1 / zero2: all-reduce (or reduce-scatter + all-gather) of the trainable gradients: 2·(n-1)/n · G.
    fsdp / zero3: all-gather of the parameters in forward and again in backward, reduce-scatter of the trainable
    gradients: (n-1)/n · (2·P + G). LoRA's frozen base under DDP sends only the adapter gradients: the ~1000x
    communication saving of LoRA that ``cost.py`` noted is this formula with G = N_a."""
    grads = trainable_count * grad_bytes
    if sharding in ("fsdp", "zero3"):
        gathers = collective_bytes(2 * param_count * param_bytes, ranks, "all_gather")
        return gathers + collective_bytes(grads, ranks, "reduce_scatter")
    if sharding in ("ddp", "zero1", "zero2"):
        return collective_bytes(grads, ranks, "all_reduce")
    return 0.0


def tensor_parallel_bytes(tokens: float, hidden_size: int, num_layers: int, ranks: int, *,
                          recompute_forwards: float = 0.0, act_bytes: float = BF16_BYTES) -> float:
    """Bytes each tensor-parallel rank sends per step (Megatron-LM, Shoeybi et al. 2019 §3; with sequence
    parallelism the all-reduce becomes reduce-scatter + all-gather, same volume: Korthikanti et al. 2022 §4.2.2):
    two all-reduces of the [T, h] activation per layer in forward, two in backward, two more per recomputed forward."""
    payload = tokens * hidden_size * act_bytes
    per_pass = 2 * collective_bytes(payload, ranks, "all_reduce") * num_layers
    return per_pass * (2.0 + recompute_forwards)


def pipeline_transfer_seconds(tokens: float, hidden_size: int, boundaries: int, link_gb_s: float, *,
                              act_bytes: float = BF16_BYTES, recompute_forwards: float = 0.0) -> float:
    """``--device-map auto`` (a naive pipeline: accelerate's hooks run one GPU at a time, so its compute time is the
    single-GPU step's): the serial copies of the hidden state between consecutive GPUs. Per boundary and micro-batch,
    one [T, h] activation forward, its gradient backward, and again in each recomputed forward (the hook's copy runs
    inside the checkpointed forward): T·h·act_bytes·(2 + rc) bytes at the link's rate, nothing overlapped
    (``AlignDevicesHook.pre_forward`` copies synchronously before the layer runs). ``tokens``: all micro-batches'."""
    if boundaries <= 0 or not link_gb_s:
        return 0.0
    return comm_seconds(tokens * hidden_size * act_bytes * (2.0 + recompute_forwards) * boundaries, link_gb_s)


def exposed_comm_seconds(comm_s: float, compute_s: float, overlap: float) -> float:
    """The communication time compute does not hide: comm_s − min(overlap · comm_s, compute_s)."""
    return comm_s - min(overlap * comm_s, compute_s)


# -- the step -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelCounts:
    """Kernels the host issues in one optimizer step, by kind (``kernel_counts``)."""

    gemm: float = 0.0  # the base model's matmuls
    attention: float = 0.0
    other: float = 0.0  # elementwise, norms, casts, LoRA's rank-r matmuls, dequantization, loss, optimizer
    views: float = 0.0  # view and metadata ops that launch nothing but cost host time (``view_ops``)


@dataclass(frozen=True)
class StepWork:
    """The work of one optimizer step on one GPU."""

    tokens: float  # tokens this GPU's step trains on (all micro-batches), padding excluded
    matmul_flops: float
    attention_flops: float
    memory_bytes: float
    model_flops: float  # MFU numerator for those tokens
    comm_s: float = 0.0  # overlappable collective time at the link's bandwidth (data parallel), before overlap
    comm_overlap: float = 0.0
    # The part of comm_s issued in forward passes (FSDP/ZeRO-3 all-gathers), and the share of the compute in backward
    # and recomputation: comm_forward_s hides under the forward's compute, the rest under the backward's. None: comm_s
    # may hide under the whole step's compute.
    comm_forward_s: float = 0.0
    backward_share: float | None = None
    serial_s: float = 0.0  # time nothing hides: blocking tensor-parallel collectives, paged-optimizer PCIe traffic
    tensor_parallel_s: float = 0.0  # the tensor-parallel collectives' part of serial_s
    kernels: KernelCounts = KernelCounts()
    side_stream_s: float = 0.0  # copies on a side stream (activation offload): exposed past the compute only
    # The matmuls one by one (``linear_gemm``), each timed on the roofline; empty: matmul_flops at R_mm.
    gemms: tuple[Gemm, ...] = ()
    attention_backward_flops: float = 0.0  # the part of attention_flops run by the backward kernel
    context_parallel_s: float = 0.0  # the cp ring's transfers at the link's bandwidth, before the attention hides them


@dataclass(frozen=True)
class StepRates:
    """Achievable rates of one GPU (TFLOP/s, GB/s), its datasheet dense peak for MFU, and the host's time per kernel."""

    matmul_tflops: float
    attention_tflops: float
    bandwidth_gb_s: float  # achievable device-memory bandwidth (``achievable_bandwidth_gb_s``), not the datasheet's
    peak_tflops: float
    host_s_per_kernel: float = HOST_SECONDS_PER_KERNEL
    host_s_per_view: float = VIEW_OP_HOST_SECONDS
    attention_backward_tflops: float | None = None  # the attention backward's rate; None: attention_tflops


@dataclass(frozen=True)
class StepTime:
    """How long the step takes and what it achieves. ``host_s`` is the time the GPU waits for the host to issue
    kernels (the part of each kind of work where n·h exceeds the GPU time); it is included in ``step_s``."""

    matmul_s: float
    attention_s: float
    memory_s: float
    exposed_comm_s: float
    step_s: float
    tokens_per_s: float  # this GPU's tokens per second
    mfu: float
    host_s: float = 0.0
    tensor_parallel_comm_s: float = 0.0  # the tensor-parallel collectives' part of exposed_comm_s

    def breakdown_s(self) -> dict[str, float]:
        """The step's seconds by kind: matmul, attention, memory, host overhead, exposed communication (sum = step_s)."""
        return {"matmul": self.matmul_s, "attention": self.attention_s, "memory": self.memory_s,
                "host_overhead": self.host_s, "exposed_communication": self.exposed_comm_s}


def view_ops(launched_ops: float, views_per_kernel: float = VIEW_OPS_PER_KERNEL) -> float:
    """View and metadata ops issued beside ``launched_ops`` kernels: launched_ops · VIEW_OPS_PER_KERNEL (the traced
    ratio of an eager transformers decoder step, about one view per kernel)."""
    return launched_ops * views_per_kernel


def host_seconds_per_kernel(kernels: KernelCounts, kernel_s: float = HOST_SECONDS_PER_KERNEL,
                            view_s: float = VIEW_OP_HOST_SECONDS) -> float:
    """Host time per launched kernel, its share of the view ops included: h + (n_views / n_kernels) · h_view. The
    views go with the kernels they feed (a linear's t with its GEMM, a reshape with an elementwise op), so each kind
    of work carries its share of them; without views this is h."""
    launched = kernels.gemm + kernels.attention + kernels.other
    if not kernels.views or launched <= 0:
        return kernel_s
    return kernel_s + kernels.views / launched * view_s


def step_time(work: StepWork, rates: StepRates) -> StepTime:
    """step_s = Σ over kinds max(GPU time, kernels·h) + exposed communication + serial time (module docstring);
    the matmuls' GPU time is Σ over ``work.gemms`` of their roofline time (``gemm_seconds``) when they are listed;
    tokens_per_s = tokens/step_s; mfu = model_flops / (step_s · peak)."""
    if work.gemms:
        matmul_s = sum(gemm_seconds(g, rates.matmul_tflops, rates.bandwidth_gb_s) for g in work.gemms)
    else:
        matmul_s = work.matmul_flops / (rates.matmul_tflops * TFLOPS)
    backward_rate = rates.attention_backward_tflops or rates.attention_tflops
    attention_s = ((work.attention_flops - work.attention_backward_flops) / rates.attention_tflops
                   + work.attention_backward_flops / backward_rate) / TFLOPS
    memory_s = memory_seconds(work.memory_bytes, rates.bandwidth_gb_s)
    h = host_seconds_per_kernel(work.kernels, rates.host_s_per_kernel, rates.host_s_per_view)
    host_s = (max(0.0, work.kernels.gemm * h - matmul_s) + max(0.0, work.kernels.attention * h - attention_s)
              + max(0.0, work.kernels.other * h - memory_s))
    compute_s = matmul_s + attention_s + memory_s + host_s
    if work.backward_share is None:
        exposed = exposed_comm_seconds(work.comm_s, compute_s, work.comm_overlap)
    else:  # each phase's collectives behind that phase's compute (``DATA_PARALLEL_OVERLAP_BY_SHARDING``)
        backward_s = compute_s * work.backward_share
        exposed = (exposed_comm_seconds(work.comm_forward_s, compute_s - backward_s, work.comm_overlap)
                   + exposed_comm_seconds(work.comm_s - work.comm_forward_s, backward_s, work.comm_overlap))
    exposed += work.serial_s + exposed_comm_seconds(work.side_stream_s, compute_s, ACTIVATION_OFFLOAD_OVERLAP)
    if work.context_parallel_s:  # --cp: the ring's exchanges run under its partial SDPA calls
        exposed += max(0.0, work.context_parallel_s - attention_s)
    step_s = compute_s + exposed
    return StepTime(matmul_s, attention_s, memory_s, exposed, step_s, work.tokens / step_s,
                    work.model_flops / (step_s * rates.peak_tflops * TFLOPS), host_s, work.tensor_parallel_s)


# -- a power cap below the board's TDP ----------------------------------------------------------------------------
# Share of a GPU's board power that does not scale with the clock (leakage and the rest of the static power): about
# 30% of an H100's 700 W (fridayswithfaraday.com, "GPU Power Efficiency: Performance per Watt", H100 power breakdown:
# static ~210 W of 700 W). Assumption for other GPUs.
STATIC_POWER_FRACTION = 0.3


def power_capped_clock_ratio(cap_w: float, tdp_w: float, static_fraction: float = STATIC_POWER_FRACTION) -> float:
    """The SM clock a power cap leaves, as a fraction of the clock at TDP, for compute-bound kernels.

    Dynamic power P_dyn = α·C·V²·f, and DVFS lowers the voltage with the clock (V ∝ f), so P_dyn ∝ f³ (the CMOS
    dynamic-power law; Horowitz et al., "Scaling, power, and the future of CMOS", IEDM 2005). With a static share
    s of the TDP that the clock does not change: f_cap / f_tdp = ((cap − s·TDP) / (TDP − s·TDP))^(1/3), at most 1.
    Matmul and attention rates scale with the clock; the memory bandwidth does not (the memory clock is separate), so
    a capped GPU keeps its achievable bandwidth (``achievable_bandwidth_gb_s``)."""
    if cap_w >= tdp_w:
        return 1.0
    static = static_fraction * tdp_w
    if cap_w <= static:
        raise ValueError(f"a power cap of {cap_w} W leaves no dynamic power above the static {static:.0f} W")
    return ((cap_w - static) / (tdp_w - static)) ** (1.0 / 3.0)


# -- achievable rates ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AchievableRate:
    """One row of data/achievable_rates.csv: a compute rate (``tflops``, kinds "matmul" and "attention") or a
    device-memory bandwidth (``gb_s``, kind "memory", dtype "any"); the other figure is None."""

    gpu: str
    kind: str  # "matmul", "attention" or "memory"
    dtype: str  # "bf16", "fp16", "fp8"; "any" for memory
    tflops: float | None
    basis: str  # "measured" or "derived"
    source: str
    passes: str = ""  # attention: "forward" (a forward-only measurement) or "forward+backward"
    gb_s: float | None = None  # memory: sustained read + write bandwidth, GB/s (10^9 B/s)


def _number(cell: str | None) -> float | None:
    return float(cell) if cell else None


@lru_cache(maxsize=4)
def _read_rates(path: str) -> tuple[AchievableRate, ...]:
    with open(path, newline="", encoding="utf-8") as handle:
        return tuple(AchievableRate(r["gpu"], r["kind"], r["dtype"], _number(r["tflops"]), r["basis"], r["source"],
                                    r.get("passes") or "", _number(r.get("gb_s")))
                     for r in csv.DictReader(handle))


# Catalogue data, loaded on first use and kept for the process like the GPU catalogue itself (not a per-setup cache).
_RATES_BY_PATH: dict[str | None, dict[tuple[str, str, str], AchievableRate]] = {}


def _rates_by_key(path: str | None) -> dict[tuple[str, str, str], AchievableRate]:
    if path not in _RATES_BY_PATH:
        rows = _read_rates(path or str(data_dir() / "achievable_rates.csv"))
        _RATES_BY_PATH[path] = {(r.gpu, r.kind, r.dtype): r for r in rows}
    return _RATES_BY_PATH[path]


def load_achievable_rates(path: Path | None = None) -> dict[tuple[str, str, str], AchievableRate]:
    """Read data/achievable_rates.csv (once per path) into {(gpu, kind, dtype): AchievableRate} (a new dict each
    call; the file is read and indexed once)."""
    return dict(_rates_by_key(str(path) if path else None))


def rates_index(path: Path | None = None) -> dict[tuple[str, str, str], AchievableRate]:
    """The cached index itself, for callers that only read it (``vramcalc.cost.step_for``)."""
    return _rates_by_key(str(path) if path else None)


# FlashAttention-2's backward runs below its forward rate (five GEMMs per tile against two, dS in registers, atomic dQ
# accumulation: Dao 2023 §3.1.2): flash_attn on an RTX 4090, sequence 2k, head dim 128, non-causal: forward 169.28,
# backward 124.57 TFLOP/s (apache/tvm tl_doc/flash_perf.md @bd6f95705749439fea3600bf078bccc26b780cd9, "Flash_attn"
# column): 124.57 / 169.28 = 0.736. Applied to attention rates measured on the forward only.
FLASH_BACKWARD_TO_FORWARD = 124.57 / 169.28


def attention_backward_tflops(rate: AchievableRate) -> float:
    """The backward's rate for an attention rate: ``rate.tflops`` x FLASH_BACKWARD_TO_FORWARD when the rate was measured
    on the forward only (``passes`` "forward"), the rate itself when it already covers forward and backward."""
    return rate.tflops * FLASH_BACKWARD_TO_FORWARD if rate.passes == "forward" else rate.tflops


def achievable_rate(gpu: str, kind: str, dtype: str,
                    rates: dict[tuple[str, str, str], AchievableRate] | None = None) -> AchievableRate | None:
    """The achievable rate of ``gpu`` for ``kind`` ("matmul"/"attention"/"memory") and ``dtype`` ("bf16"/"fp8";
    "any" for memory), or None."""
    rates = rates if rates is not None else load_achievable_rates()
    return rates.get((gpu, kind, dtype))


MEMORY_DTYPE = "any"  # a memory row's dtype: the bandwidth does not depend on the element type


def achievable_bandwidth_gb_s(gpu: str, datasheet_gb_s: float,
                              rates: dict[tuple[str, str, str], AchievableRate] | None = None,
                              memory_type: str = "") -> float:
    """B of the module docstring: the ``memory`` row of data/achievable_rates.csv for ``gpu`` (sustained read + write
    bandwidth, measured or derived, with its source); where the file has no row for it (a GPU outside the
    catalogue), ``datasheet_gb_s`` times its memory family's measured ratio (``measured_memory_efficiency``, as the
    file's derived rows take it) when ``memory_type`` names an HBM or GDDR part, the datasheet's figure otherwise."""
    row = achievable_rate(gpu, "memory", MEMORY_DTYPE, rates)
    if row is not None and row.gb_s:
        return row.gb_s
    try:
        return datasheet_gb_s * measured_memory_efficiency(memory_family(memory_type), rates)
    except ValueError:  # no memory type, or one of neither family
        return datasheet_gb_s


def memory_family(memory_type: str) -> str:
    """The family of a catalogue ``memory_type``, the grouping the derived memory rows use: "hbm" (HBM2, HBM2e, HBM3,
    HBM3e: stacked, wide and slow) or "gddr" (GDDR6, GDDR6X, GDDR7: narrow and fast)."""
    kind = memory_type.strip().lower()
    if kind.startswith("hbm"):
        return "hbm"
    if kind.startswith("gddr"):
        return "gddr"
    raise ValueError(f"unknown memory type {memory_type!r}; expected HBM* or GDDR*")


def measured_memory_efficiency(family: str,
                               rates: dict[tuple[str, str, str], AchievableRate] | None = None) -> float:
    """The median of measured / datasheet bandwidth over the ``measured`` memory rows whose GPU's memory is of
    ``family`` (``memory_family``): the ratio a GPU of that family without a measurement takes (its ``derived`` row;
    and a GPU outside the catalogue, such as benchmarks/throughput.py's 96 GB HBM2e H100)."""
    rates = rates if rates is not None else load_achievable_rates()
    measurements = set()  # each measurement once: two boards of one memory interface share it (V100 16 / 32 GB)
    for (gpu, kind, _), row in rates.items():
        if kind != "memory" or row.basis != "measured" or not row.gb_s:
            continue
        spec = get_gpu(gpu)
        if spec.bandwidth_gb_s and memory_family(spec.memory_type or "") == family:
            measurements.add((row.gb_s, spec.bandwidth_gb_s, row.source.split(" (")[0]))
    if not measurements:
        raise ValueError(f"no measured memory bandwidth for the {family!r} family in data/achievable_rates.csv")
    return median(gb_s / datasheet for gb_s, datasheet, _ in measurements)


# -- one training step from its setup -------------------------------------------------------------------------------
# Forwards recomputed per activation-checkpointing mode, as (matmuls, attention, elementwise). Full checkpointing
# reruns each layer's forward. "selective" is torch's op-level policy as vramcalc's GradCkpt.SELECTIVE defines it:
# matmul and SDPA outputs are saved, every other op is recomputed. torchtitan's "op" selective AC saves every other
# matmul output and the SDPA output and recomputes the rest (torchtitan activation-checkpoint policy, _save_list with
# mm_count % 2): GradCkpt.SELECTIVE_OP, "selective-op".
RECOMPUTE_BY_MODE: dict[str, tuple[float, float, float]] = {
    "none": (0.0, 0.0, 0.0),
    "full": (1.0, 1.0, 1.0),
    "selective": (0.0, 0.0, 1.0),
    "selective-op": (0.5, 0.0, 1.0),
}

# Kernels of one decoder layer's forward, counted from the modules (transformers LlamaDecoderLayer, eager):
#   LlamaRMSNorm: to(fp32), pow, mean, add eps, rsqrt, mul, to(bf16), mul weight = 8, twice = 16;
#   q, k, v, o projections = 4 GEMMs; RoPE per q and k: mul cos, neg, cat (rotate_half), mul sin, add = 5, twice = 10;
#   SDPA = 1 (+ 1 contiguous copy of its output for o_proj); 2 residual adds; MLP gate, up, down = 3 GEMMs, act, mul = 2.
# Compiled (torch.compile / Liger): the GEMMs and SDPA stay, the elementwise chains fuse into one kernel each
# (norm, RoPE, SwiGLU, the residual add into the next norm): 4 kernels (torch._inductor fuses pointwise chains between
# GEMMs; Liger ships exactly these four: LigerRMSNorm, liger_rotary_pos_emb, LigerSiLUMulFunction, fused add).
GEMMS_PER_LAYER = 7
OTHER_KERNELS_PER_LAYER = {False: 16 + 10 + 1 + 2 + 2, True: 4}
# Qwen3's attention normalises q and k per head before RoPE: ``self.q_norm(self.q_proj(x).view(...))`` and k_norm
# likewise, each a Qwen3RMSNorm with LlamaRMSNorm's forward (to fp32, pow, mean, add eps, rsqrt, mul, to, mul weight:
# 8 kernels), so 16 more per layer eager (transformers 5.25 models/qwen3/modeling_qwen3.py:229-230, 245-246; OLMo-2's
# q_norm/k_norm over the whole width are the same kernels, Llama-4's weightless L2 norm one fewer each). Compiled:
# one fused kernel per norm.
QK_NORM_KERNELS_PER_LAYER = {False: 16, True: 2}
# peft LoRA per adapted linear: lora_dropout (a kernel when p > 0; Identity otherwise), A, B, the scaling mul and the
# add into the base output (peft/tuners/lora/layer.py Linear.forward). Compiled: A and B stay, the rest fuses.
LORA_KERNELS_PER_LINEAR = {False: 4, True: 2}
# More per adapted linear in eager mode: lora_dropout with p > 0 (one native_dropout kernel), and with adapters in a
# wider dtype than the activations the cast of x to it and of the sum back (peft ``_cast_input_dtype`` and
# ``result.to(torch_result_dtype)``): 2.
LORA_DROPOUT_KERNELS = 1
LORA_CAST_KERNELS = 2
# bitsandbytes Linear4bit / Linear8bitLt: dequantize_4bit (or the int8 row quantization and dequantization) before
# the GEMM, per quantized linear and pass (bitsandbytes/autograd/_functions.py MatMul4Bit, MatMul8bitLt).
QUANT_KERNELS_PER_LINEAR = {4: 1, 8: 3}
# auto-gptq's pure-torch dequantization (``DEQUANT_KERNELS["gptq-torch"]``): shift, cast, and on the zeros and the
# codes (6), the + 1 on the zeros, the subtraction and the scale multiply: 9 kernels per pass (10 with the bf16 cast
# of "gptq-torch-bf16"; the count keeps 9).
GPTQ_TORCH_KERNELS_PER_LINEAR = 9
# Backward launches about two kernels per forward kernel (an elementwise op's backward reads the saved input and the
# upstream gradient: one or two kernels; a trained GEMM runs dX and dW, a frozen one dX only): assumption, the same
# factor ``elementwise_bytes`` takes for bytes.
BACKWARD_KERNELS_PER_FORWARD = 2.0
# Once per micro-batch outside the layers: embedding, final norm, lm_head, loss (hf: the fp32 upcast, log-softmax,
# nll; each with its backward): about 20 kernels (assumption, a small share of any step).
HEAD_KERNELS = 20
# DeepSpeed ZeRO-1/2 (deepspeed/runtime/zero/stage_1_and_2.py @v0.12.4) registers a hook on every trainable tensor's
# AccumulateGrad node (create_reduce_and_remove_grad_hooks, :854-867). With contiguous_gradients (HF/DeepSpeed
# configs' default, Qwen's finetune/ds_config_zero2.json) the hook copies the gradient into the bucket buffer
# (reduce_independent_p_g_buckets_and_remove_grads, :912-914: narrow, view(-1), copy_, view_as) and, when the
# bucket is reduced, into the rank's partition buffer (reduce_ipg_grads -> copy_grads_in_partition, :1302-1305: view,
# narrow, view(-1), copy_, view_as): 2 copy kernels and 7 view ops per trainable tensor. ZeRO-2 runs the hook in every
# micro-batch's backward (reduce_ready_partitions_and_remove_grads, :1375-1377: ``partition_gradients or
# is_gradient_accumulation_boundary``); ZeRO-1 only in the last micro-batch of the step. The per-bucket div_ and
# all-reduce are a few kernels per 2e8 elements and are left out, as is the hook's pure-Python bookkeeping.
ZERO_HOOK_KERNELS_PER_TENSOR = 2
ZERO_HOOK_VIEWS_PER_TENSOR = 7
# Micro-batches per step whose backward runs the hook, by sharding: "all" or "last".
ZERO_HOOK_MICRO_BATCHES = {"zero2": "all", "zero1": "last"}


def kernel_counts(num_layers: int, *, micro_batches: int, fused: bool, train_base: bool, adapted_linears: float,
                  quant_bits: int, recompute: tuple[float, float, float], quant_kernel: str = "bnb",
                  lora_dropout: bool = False, lora_cast: bool = False, qk_norm: bool = False,
                  sharding: str = "none", trainable_tensors: float = 0.0) -> KernelCounts:
    """Kernels the host issues per optimizer step: per micro-batch, L layers x (forward + backward + recomputed
    forward) of GEMMS_PER_LAYER, one SDPA and OTHER_KERNELS_PER_LAYER (and QK_NORM_KERNELS_PER_LAYER with ``qk_norm``),
    plus LoRA's and dequantization's kernels per adapted or quantized linear, plus HEAD_KERNELS. The optimizer step
    (fused or foreach AdamW: a few kernels per step) is left out. Frozen GEMMs run one backward GEMM (dX), trained ones
    two (dX, dW). Eager steps also issue ``view_ops`` beside these (``views``); the per-layer count of the eager LoRA
    layer with dropout, fp32 adapters and full checkpointing (344) is within 2% of the traced 339
    (``VIEW_OPS_PER_KERNEL``'s trace); the profiled eager SmolLM2-135M LoRA step on an H200 issues 4,351 CUDA events
    where this counts 4,370 (benchmarks/throughput_measured.md).
    DeepSpeed ZeRO-1/2 (``sharding`` "zero1"/"zero2") add their gradient hooks' copies and views per trainable
    tensor (``ZERO_HOOK_KERNELS_PER_TENSOR``), in every micro-batch (zero2) or the last one (zero1); the hooks are
    eager autograd hooks, so their views count in compiled steps too."""
    rc_mm, rc_attn, rc_elem = recompute
    gemm_backward = 2.0 if train_base else 1.0
    gemm = GEMMS_PER_LAYER * (1.0 + gemm_backward + rc_mm)
    attention = 1.0 + 1.0 + rc_attn  # FlashAttention backward is one kernel (plus a small preprocess)
    other_per_layer = OTHER_KERNELS_PER_LAYER[fused] + (QK_NORM_KERNELS_PER_LAYER[fused] if qk_norm else 0)
    other = other_per_layer * (1.0 + BACKWARD_KERNELS_PER_FORWARD + rc_elem)
    per_layer_adapters = adapted_linears / max(num_layers, 1)
    lora_kernels = LORA_KERNELS_PER_LINEAR[fused]
    if not fused:
        lora_kernels += LORA_DROPOUT_KERNELS * lora_dropout + LORA_CAST_KERNELS * lora_cast
    other += per_layer_adapters * lora_kernels * (1.0 + BACKWARD_KERNELS_PER_FORWARD + rc_mm)
    if quant_bits and quant_kernel.startswith("gptq-torch"):
        other += GEMMS_PER_LAYER * GPTQ_TORCH_KERNELS_PER_LINEAR * (1.0 + rc_mm)
    elif quant_bits:
        other += GEMMS_PER_LAYER * QUANT_KERNELS_PER_LINEAR.get(quant_bits, 1) * (2.0 + rc_mm)
    n = num_layers * micro_batches
    launched = (gemm + attention + other) * n + HEAD_KERNELS * micro_batches
    # compiled regions issue no view ops: inductor folds views into its kernels' indexing (reinterpret_tensor in the
    # generated wrapper, no dispatcher call)
    views = 0.0 if fused else view_ops(launched)
    hooked = ZERO_HOOK_MICRO_BATCHES.get(sharding)
    hook_passes = 0.0 if hooked is None else (float(micro_batches) if hooked == "all" else 1.0)
    hook_kernels = ZERO_HOOK_KERNELS_PER_TENSOR * trainable_tensors * hook_passes
    views += ZERO_HOOK_VIEWS_PER_TENSOR * trainable_tensors * hook_passes
    return KernelCounts(gemm * n, attention * n, other * n + HEAD_KERNELS * micro_batches + hook_kernels, views)


# Weight tensors of a dense Llama-style layer (q, k, v, o, gate, up, down and two RMSNorm weights) and outside the
# layers (embedding, final norm, lm_head): what full fine-tuning trains, tensor by tensor.
TENSORS_PER_LAYER = GEMMS_PER_LAYER + 2
TENSORS_OUTSIDE_LAYERS = 3


def trainable_tensor_count(num_layers: int, *, train_base: bool, adapted_linears: float,
                           adapter_params: float = 0.0) -> float:
    """Trainable tensors the optimizer and any per-tensor gradient hook see: full fine-tuning every weight
    (TENSORS_PER_LAYER·L + TENSORS_OUTSIDE_LAYERS); LoRA an A and a B per adapted linear (peft ``lora_A``/``lora_B``);
    other adapters without shapes (prompt tuning's embedding) one."""
    if train_base:
        return float(TENSORS_PER_LAYER * num_layers + TENSORS_OUTSIDE_LAYERS)
    if adapted_linears:
        return 2.0 * adapted_linears
    return 1.0 if adapter_params else 0.0


def saved_activation_bytes(tokens: float, hidden_size: int, q_width: int, kv_width: int, intermediate_size: int,
                           num_layers: int, grad_ckpt: str) -> float:
    """Bytes of saved activations an offload moves to the host (16-bit): full checkpointing saves each layer's input
    (T·h); otherwise the inputs of the norms (2h), of the linears (h for q/k/v, q for o, h for gate/up, I for down),
    the attention output and RoPE'd q, k (q + 2kv) and the SwiGLU inputs (2I) per token and layer (Korthikanti et al.
    2022 §4.1 count the same tensors). Selective checkpointing keeps the matmul outputs only (q + 2kv + h + 3I);
    torchtitan's every other one (q, v, gate, down: q + kv + I + h)."""
    if grad_ckpt == "full":
        per_token = hidden_size
    elif grad_ckpt == "selective":
        per_token = q_width + 2 * kv_width + hidden_size + 3 * intermediate_size
    elif grad_ckpt == "selective-op":
        per_token = q_width + kv_width + intermediate_size + hidden_size
    else:
        per_token = 5 * hidden_size + 2 * q_width + 2 * kv_width + 3 * intermediate_size
    return BF16_BYTES * per_token * num_layers * tokens


@dataclass(frozen=True)
class DecoderShape:
    """The fields of ``vramcalc.ModelSpec`` a decoder's step needs. MoE: ``active_matmul_params`` (the matmul
    parameters one token uses); MLA: ``qk_head_dim`` and ``v_head_dim`` when they differ from ``head_dim``."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    active_matmul_params: int | None = None
    qk_head_dim: int | None = None
    v_head_dim: int | None = None
    # Every stored parameter (MoE: all experts, not the K a token uses): what the optimizer step streams and FSDP
    # gathers. None: the matmul parameters plus the embedding.
    total_params: int | None = None
    # The lm_head output columns this GPU computes when they differ from the vocabulary: one rank of transformers'
    # tensor-parallel plan ("colwise_gather_output": [h, ceil(V/T)] locally, then the [b, s, V] logits all-gathered,
    # so the loss keeps vocab_size). None: vocab_size. ``active_matmul_params`` then counts these columns.
    lm_head_columns: int | None = None
    # One entry per attention layer: its sliding window in tokens, or None for full attention. A hybrid's convolution
    # layers have no entry (they run no attention). None: num_layers full-attention layers.
    attention_windows: tuple[int | None, ...] | None = None
    # An RMSNorm on q and on k before RoPE (Qwen3, OLMo-2, Llama-4: ``ModelSpec.qk_norm``): its kernels and bytes.
    qk_norm: bool = False

    @property
    def num_attention_layers(self) -> int:
        return self.num_layers if self.attention_windows is None else len(self.attention_windows)

    def attention_layers(self, seq_len: int, kernel: str) -> float:
        """The attention work of the layers in full causal layers' worth (``attention_layer_work``)."""
        if self.attention_windows is None:
            return float(self.num_layers)
        return sum(attention_layer_work(w, seq_len, kernel) for w in self.attention_windows)

    def attended_layers(self, seq_len: int) -> float:
        """The MFU numerator's attention layers in full layers' worth: a token of a sliding layer attends at most its
        window, so that layer counts min(w, s)/s (the numerator counts the keys a query needs, whatever the kernel
        computes; counting s would put MFU above 1 at long sequences)."""
        if self.attention_windows is None:
            return float(self.num_layers)
        return sum(1.0 if w is None else min(w, seq_len) / seq_len for w in self.attention_windows)

    @property
    def lm_head_width(self) -> int:
        return self.lm_head_columns if self.lm_head_columns is not None else self.vocab_size

    @property
    def matmul_params(self) -> int:
        if self.active_matmul_params is not None:
            return self.active_matmul_params
        return dense_matmul_params(self.hidden_size, self.num_layers, self.num_heads, self.num_kv_heads,
                                   self.head_dim, self.intermediate_size, self.vocab_size)

    @property
    def linear_in_out_sum(self) -> int:
        """Σ over the decoder's linears of (in + out): q, k, v, o and the gated MLP, per layer times L."""
        h, q, kv, inter = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, \
            self.intermediate_size
        return self.num_layers * ((h + q) + 2 * (h + kv) + (q + h) + 3 * (h + inter))


@dataclass(frozen=True)
class StepSetup:
    """How one data-parallel rank's step runs. tokens = micro-batch x seq_len x micro_batches of that rank."""

    tokens: int
    seq_len: int
    train_base: bool = True  # False for LoRA / QLoRA / prompt tuning
    adapter_params: int = 0
    grad_ckpt: str = "none"  # a key of RECOMPUTE_BY_MODE
    fused_elementwise: bool = False  # torch.compile or Liger kernels
    loss: str = "hf"  # a key of LOSS_BYTES_PER_LOGIT
    quant_bits: int = 0  # 4 for NF4/FP4 QLoRA bases, 8 for LLM.int8: dequantized every pass
    fp8_linears: bool = False  # torchao float8 on the decoder's linears (lm_head stays 16-bit)
    optimizer_bytes_per_param: float = 14.0  # optimizer_step_bytes per trainable parameter (bf16 AdamW: 14)
    dp: int = 1
    sharding: str = "none"  # none / ddp / zero1 / zero2 / zero3 / fsdp
    tp: int = 1
    cp: int = 1
    async_tp: bool = False
    # Bytes one rank sends per step in a transformers ``tp_plan`` group (``terms.tensor_parallel``'s traffic, which the
    # caller computes on the rank's slice: shape and tokens are then one rank's, tp stays 1), on ``tp_link_gb_s``.
    # They sit on the critical path (``TENSOR_PARALLEL_OVERLAP``); the ``tp`` field above is the Megatron-style
    # count of ``tensor_parallel_bytes`` (torchtitan, Megatron-LM rows of benchmarks/throughput.py).
    tp_comm_bytes: float = 0.0
    # Bytes one rank sends per step in its context-parallel ring (``terms.context_parallel``'s traffic), on
    # ``cp_link_gb_s``; hidden behind the attention kernels only (module constants above ``HOST_SECONDS_PER_KERNEL``).
    cp_comm_bytes: float = 0.0
    param_bytes_on_wire: float = BF16_BYTES  # FSDP all-gather dtype
    grad_bytes_on_wire: float = BF16_BYTES  # reduce dtype
    serial_extra_s: float = 0.0  # e.g. paged optimizer states over PCIe (caller computes it)
    micro_batches: int = 1  # forward/backward passes per optimizer step (gradient accumulation)
    adapted_linears: int = 0  # linears carrying a LoRA adapter, over all layers (for the kernel count)
    # flash (tiled, causal and window skipping), sdpa (flash's count, but a 4-D mask on sliding layers makes it compute
    # every tile: ``attention_layer_work``) or eager (materialised scores)
    attention_kernel: str = "flash"
    activation_offload: bool = False  # saved activations copied to the host and back (side stream)
    pcie_gb_s: float = 0.0  # host link per direction, for the activation offload
    padding_fraction: float = 0.0  # share of the tokens that are padding (0 with packing): computed, not counted
    # LoRA adapters one by one for their rank-r GEMMs and elementwise kernels: (in, out, count over the model) of each
    # adapted linear, the rank, dropout p > 0, and the adapters' dtype bytes (peft casts x to it: 4 for fp32 adapters).
    # Empty: the adapters' FLOPs (adapter_params) at the matmul rate and no elementwise bytes.
    lora_linears: tuple[tuple[int, int, int], ...] = ()
    lora_rank: int = 0
    lora_dropout: bool = False
    adapter_bytes: float = BF16_BYTES
    quant_kernel: str = "bnb"  # a key of DEQUANT_KERNELS


# Eager attention's materialised [b, a, s, s] scores: 24 bytes per score in forward (``vramcalc.cost``
# EAGER_SCORE_FORWARD_BYTES: QKᵀ out, scale, mask, fp32 softmax, cast, PV read), twice that in backward.
EAGER_SCORE_BYTES_FORWARD = 24


# The decoder's base GEMMs are listed one by one (``decoder_gemms``) when the shape's matmul parameters are the dense
# Llama layout's within this tolerance; otherwise (MoE experts, MLA projections) the aggregate FLOPs run at R_mm.
DENSE_LAYOUT_TOLERANCE = 0.02


def decoder_gemms(shape: DecoderShape, setup: StepSetup, *, recompute_forwards: float,
                  fp8_rate_ratio: float | None = None) -> tuple[Gemm, ...] | None:
    """The step's GEMMs on one GPU, or None when ``shape`` is not a dense Llama-style decoder.

    Per micro-batch of m = tokens / (micro_batches · cp) tokens and per layer: q, k, v, gate, up split their outputs
    across the tp ranks (column-parallel) and o, down their inputs (row-parallel) (Megatron-LM, Shoeybi et al. 2019
    §3); each runs forward, dX, dW when the base trains (forward, dX when frozen) and recompute_forwards more
    forwards. The lm_head ([m, h] x [h, V/tp]) runs outside the checkpointed layers: forward, dX and dW if trained.
    fp8 linears read 1-byte operands and write 2-byte outputs, their FLOPs at ``fp8_rate_ratio`` = R_bf16 / R_fp8.
    LoRA's A ([m, in] x [in, r]) and B ([m, r] x [r, out]) each run forward, dX, dW and the recomputed forwards, their
    input at the adapters' dtype (``setup.adapter_bytes``)."""
    h, q_w = shape.hidden_size, shape.num_heads * shape.head_dim
    kv_w, inter = shape.num_kv_heads * shape.head_dim, shape.intermediate_size
    dense = dense_matmul_params(h, shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.head_dim, inter,
                                shape.vocab_size) - (shape.vocab_size - shape.lm_head_width) * h
    if abs(shape.matmul_params / dense - 1.0) > DENSE_LAYOUT_TOLERANCE:
        return None
    tp, mb = setup.tp, setup.micro_batches
    m = setup.tokens / (mb * setup.cp)
    base_calls = (1.0 + (2.0 if setup.train_base else 1.0) + recompute_forwards) * shape.num_layers * mb
    in_b, ratio = (1.0, fp8_rate_ratio) if fp8_rate_ratio else (BF16_BYTES, 1.0)
    linears = [(h, q_w / tp), (h, kv_w / tp), (h, kv_w / tp), (q_w / tp, h), (h, inter / tp), (h, inter / tp),
               (inter / tp, h)]
    gemms = [linear_gemm(m, k, n, base_calls, in_bytes=in_b, rate_ratio=ratio) for k, n in linears]
    gemms.append(linear_gemm(m, h, shape.lm_head_width / tp, (1.0 + (2.0 if setup.train_base else 1.0)) * mb))
    a = setup.adapter_bytes
    lora_calls = (3.0 + recompute_forwards) * mb
    for k, n, count in setup.lora_linears:
        gemms.append(linear_gemm(m, k, setup.lora_rank, lora_calls * count, in_bytes=a, out_bytes=a))
        gemms.append(linear_gemm(m, setup.lora_rank, n, lora_calls * count, in_bytes=a))
    if setup.adapter_params and not setup.lora_linears:  # adapters without their shapes: FLOPs at R_mm
        t = setup.tokens / setup.cp
        gemms.append(Gemm((6.0 + 2.0 * recompute_forwards) * setup.adapter_params * t, 0.0, 1.0))
    return tuple(gemms)


def step_work(shape: DecoderShape, setup: StepSetup, *, matmul_tflops: float, fp8_matmul_tflops: float | None = None,
              dp_link_gb_s: float = 0.0, tp_link_gb_s: float = 0.0, cp_link_gb_s: float = 0.0) -> StepWork:
    """The work of one optimizer step on one GPU: every formula above applied to one setup. Compute is shared by the
    tp·cp GPUs of a data-parallel rank; fp8 matmuls enter as bf16-rate-equivalent FLOPs (R_bf16 / R_fp8 each).
    Per micro-batch (x ``micro_batches``): dequantization of a k-bit base and the host's kernels; per step: the
    optimizer and the data-parallel collectives."""
    if setup.grad_ckpt not in RECOMPUTE_BY_MODE:
        raise ValueError(f"unknown grad_ckpt mode {setup.grad_ckpt!r}; expected one of {sorted(RECOMPUTE_BY_MODE)}")
    rc_mm, rc_attn, rc_elem = RECOMPUTE_BY_MODE[setup.grad_ckpt]
    s, t = setup.seq_len, setup.tokens
    split = setup.tp * setup.cp
    n_mm = shape.matmul_params
    n_linear = n_mm - shape.lm_head_width * shape.hidden_size  # the decoder's linears, without the lm_head
    flops = matmul_flops(n_mm, t, train_base=setup.train_base, n_adapter_params=setup.adapter_params,
                         recompute_forwards=rc_mm)
    # the forward passes' share of the matmuls; the rest (input and weight gradients, recomputation) runs in backward
    backward_share = 1.0 - 2.0 * (n_mm + setup.adapter_params) * t / flops if flops > 0 else 2.0 / 3.0
    if setup.fp8_linears:
        if not fp8_matmul_tflops:
            raise ValueError("fp8_linears needs fp8_matmul_tflops")
        fp8 = matmul_flops(n_linear, t, train_base=setup.train_base, recompute_forwards=rc_mm)
        flops = flops - fp8 + fp8 * matmul_tflops / fp8_matmul_tflops
    eager = setup.attention_kernel == "eager"
    qk_d, v_d = shape.qk_head_dim or shape.head_dim, shape.v_head_dim or shape.head_dim
    attention_layers = shape.attention_layers(s, setup.attention_kernel)  # sliding windows, no convolution layers
    attn = attention_flops(attention_layers, shape.num_heads, qk_d, v_d, s, t, causal=True,
                           kernel="eager" if eager else "flash", recompute_forwards=rc_attn)
    attn_backward = (2.5 if not eager else 2.0) * attention_forward_flops(
        attention_layers, shape.num_heads, qk_d, v_d, s, t, causal=True, kernel="eager" if eager else "flash")
    q_w, kv_w = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    nbytes = elementwise_bytes(t, shape.hidden_size, q_w, kv_w, shape.intermediate_size, shape.num_layers,
                               fused=setup.fused_elementwise, recompute_forwards=rc_elem, qk_norm=shape.qk_norm)
    nbytes += loss_bytes(t, shape.vocab_size, setup.loss)
    if eager:
        nbytes += attention_layers * shape.num_heads * s * t * EAGER_SCORE_BYTES_FORWARD * (3.0 + rc_attn)
    if setup.fp8_linears:
        nbytes += float8_cast_bytes(t, shape.linear_in_out_sum, n_linear, recompute_forwards=rc_mm)
    if setup.quant_bits:
        again_in_backward = DEQUANT_KERNELS[setup.quant_kernel][1] if setup.quant_kernel in DEQUANT_KERNELS else True
        passes = (1.0 + (1.0 if again_in_backward else 0.0) + rc_mm) * setup.micro_batches
        if setup.quant_kernel == "bnb":
            nbytes += dequantize_bytes(n_linear, passes=passes, bits=setup.quant_bits)
        else:
            nbytes += n_linear * dequant_bytes_per_weight(setup.quant_kernel, setup.quant_bits) * passes
        if setup.quant_bits == 8:  # LLM.int8 also quantizes each linear's input row-wise: read 2, write 1 byte
            nbytes += 3.0 * t * shape.linear_in_out_sum / 2 * (1.0 + rc_mm)
    for k, n, count in setup.lora_linears:
        nbytes += count * lora_elementwise_bytes(t, k, n, adapter_bytes=setup.adapter_bytes,
                                                 dropout=setup.lora_dropout, fused=setup.fused_elementwise,
                                                 recompute_forwards=rc_mm)
    nbytes /= split
    # every stored parameter: the optimizer steps all of them and FSDP gathers all of them (MoE: every expert)
    all_params = shape.total_params or n_mm + shape.vocab_size * shape.hidden_size
    trainable = all_params if setup.train_base else setup.adapter_params
    shards = setup.dp * setup.tp if setup.sharding in ("fsdp", "zero3", "zero2", "zero1") else setup.tp
    nbytes += trainable / shards * setup.optimizer_bytes_per_param
    forward_b, backward_b, after_b = data_parallel_phase_bytes(
        all_params / setup.tp, trainable / setup.tp, setup.dp if setup.dp > 1 else 1, setup.sharding,
        param_bytes=setup.param_bytes_on_wire, grad_bytes=setup.grad_bytes_on_wire)
    phases, dp_overlap = DATA_PARALLEL_OVERLAP_BY_SHARDING.get(setup.sharding, ((), 0.0))
    # bytes in a phase whose compute cannot hide them are exposed after it
    hidden_forward_b = forward_b if "forward" in phases else 0.0
    hidden_backward_b = backward_b if "backward" in phases else 0.0
    after_b += forward_b - hidden_forward_b + backward_b - hidden_backward_b
    dp_forward_s = comm_seconds(hidden_forward_b, dp_link_gb_s) if hidden_forward_b else 0.0
    dp_s = dp_forward_s + (comm_seconds(hidden_backward_b, dp_link_gb_s) if hidden_backward_b else 0.0)
    dp_after_s = comm_seconds(after_b, dp_link_gb_s) if after_b else 0.0
    tp_s = comm_seconds(tensor_parallel_bytes(t / setup.cp, shape.hidden_size, shape.num_layers, setup.tp,
                                              recompute_forwards=rc_mm), tp_link_gb_s) if setup.tp > 1 else 0.0
    if setup.async_tp:  # forward + recomputed forwards hidden, backward (one pass in 2 + rc_mm) as measured
        forward_share = (1.0 + rc_mm) / (2.0 + rc_mm)
        tp_overlap = (forward_share * ASYNC_TENSOR_PARALLEL_OVERLAP
                      + (1.0 - forward_share) * ASYNC_TENSOR_PARALLEL_BACKWARD_OVERLAP)
    else:
        tp_overlap = TENSOR_PARALLEL_OVERLAP
    if setup.tp_comm_bytes and not tp_link_gb_s:
        raise ValueError("tp_comm_bytes needs tp_link_gb_s")
    if setup.cp_comm_bytes and not cp_link_gb_s:
        raise ValueError("cp_comm_bytes needs cp_link_gb_s")
    # transformers' tp_plan: no async TP, every collective between dependent ops (``TENSOR_PARALLEL_OVERLAP``)
    tp_exposed_s = (tp_s * (1 - tp_overlap)
                    + comm_seconds(setup.tp_comm_bytes, tp_link_gb_s) * (1 - TENSOR_PARALLEL_OVERLAP))
    model = model_flops(n_mm, t, shape.attended_layers(s), shape.num_heads, qk_d, v_d, s,
                        train_base=setup.train_base, n_adapter_params=setup.adapter_params)
    kernels = kernel_counts(shape.num_layers, micro_batches=setup.micro_batches, fused=setup.fused_elementwise,
                            train_base=setup.train_base, adapted_linears=setup.adapted_linears,
                            quant_bits=setup.quant_bits, recompute=(rc_mm, rc_attn, rc_elem),
                            quant_kernel=setup.quant_kernel, lora_dropout=setup.lora_dropout,
                            lora_cast=setup.adapter_bytes != BF16_BYTES, qk_norm=shape.qk_norm,
                            sharding=setup.sharding,
                            trainable_tensors=trainable_tensor_count(shape.num_layers, train_base=setup.train_base,
                                                                     adapted_linears=setup.adapted_linears,
                                                                     adapter_params=setup.adapter_params))
    gemms = decoder_gemms(shape, setup, recompute_forwards=rc_mm,
                          fp8_rate_ratio=matmul_tflops / fp8_matmul_tflops if setup.fp8_linears else None)
    side_s = 0.0
    if setup.activation_offload and setup.pcie_gb_s:
        saved = saved_activation_bytes(t / split, shape.hidden_size, q_w, kv_w, shape.intermediate_size,
                                       shape.num_layers, setup.grad_ckpt)
        side_s = comm_seconds(2 * saved, setup.pcie_gb_s, efficiency=1.0)  # to the host in forward, back in backward
    counted = t * (1.0 - setup.padding_fraction)
    return StepWork(tokens=counted / split, matmul_flops=flops / split, attention_flops=attn / split,
                    memory_bytes=nbytes, model_flops=model * (1.0 - setup.padding_fraction) / split, comm_s=dp_s,
                    comm_overlap=dp_overlap, comm_forward_s=dp_forward_s, backward_share=backward_share,
                    serial_s=tp_exposed_s + setup.serial_extra_s + dp_after_s, tensor_parallel_s=tp_exposed_s,
                    kernels=kernels, side_stream_s=side_s, gemms=gemms or (),
                    attention_backward_flops=attn_backward / split,
                    context_parallel_s=comm_seconds(setup.cp_comm_bytes, cp_link_gb_s) if setup.cp_comm_bytes else 0.0)
