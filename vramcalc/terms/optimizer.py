"""optimizer_states, and the optimizer step's scratch memory (part of temporaries).

Per trainable tensor of n elements stored at B bytes (sources in each row of ``_state_bytes``):
  adamw, adamw-foreach   2·n·B   exp_avg, exp_avg_sq = zeros_like(p)       torch/optim/adamw.py _init_group
                         + a 0-d fp32 "step" on the device for fused AdamW (CPU-side for foreach)
  adamw-8bit, paged-adamw-8bit
                         2·n (uint8 state1/2) + 2·4·ceil(n/256) (fp32 absmax1/2);  fp32 2·4·n when n < 4096 or the
                         tensor is an nn.Embedding (Trainer overrides embeddings to optim_bits=32; stacks that build
                         their own optimizer, torchtune and litgpt, do not: ``embedding_32bit``)
                                                                          bitsandbytes/optim/optimizer.py init_state
  paged-adamw            2·4·n (fp32 state1/2 whatever the parameter dtype)
  sgd                    0;  sgd-momentum  n·B (momentum_buffer = clone(grad))    torch/optim/sgd.py
  adafactor              2-D+: 4·(rows + cols) fp32 (exp_avg_sq_row/col); 1-D: 4·n     transformers/optimization.py
  adamw-8bit-torchao, adamw-4bit-torchao, adamw-fp8-torchao (torchao/optim/adam.py ``_new_buffer``, subclass_*.py)
                         when n >= 4096 and n % block == 0, per state (exp_avg, exp_avg_sq): codes (n bytes; 4-bit
                         n/2) + fp32 scale 4·n/block + its own fp32 qmap (8-bit 256 entries, 4-bit 16, fp8 none);
                         otherwise 2·n·B (``torch.zeros_like(p)``: the parameter's dtype). block:
                         facts.TORCHAO_BLOCK_SIZE, 256 for all when HF Trainer builds them (``trainer_built``).
                         "step" is a CPU tensor.
Paged optimizers take state buffers of tensors with n >= 1e5 from cudaMallocManaged: those bytes are outside
torch's allocator and are reported apart (``OptimizerBytes.paged_bytes``); vramcalc counts them in runtime_overhead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..facts import (BNB_MIN_8BIT_NUMEL, BNB_OPTIM_BLOCKSIZE, BNB_PAGED_MIN_NUMEL, TORCHAO_BLOCK_SIZE,
                     TORCHAO_CODE_BITS, TORCHAO_MIN_QUANTIZED_NUMEL, TORCHAO_QMAP_ENTRIES, TORCHAO_SCALE_BYTES,
                     TORCHAO_TRAINER_BLOCK_SIZE, torchao_step_buffers)
from ..options import Optimizer
from ..units import DType, round_up
from .stored_tensor import StoredTensor

_F32 = DType.FP32.bytes  # bytes of an fp32 element
BNB_QMAP_BYTES = 2 * round_up(256 * _F32)  # "dynamic" and "udynamic" code tables, once per optimizer
ADAM_STEP_BYTES = round_up(_F32)  # fused AdamW keeps state["step"] as a 0-d fp32 tensor on the device


@dataclass(frozen=True)
class OptimizerBytes:
    device_bytes: int  # in torch's allocator
    paged_bytes: int = 0  # bitsandbytes unified memory
    qmap_users: int = 0  # tensors whose 8-bit states read the code tables (one optimizer per tensor: a pair each)


_TORCHAO_KIND = {Optimizer.ADAMW_8BIT_TORCHAO: "8bit", Optimizer.ADAMW_4BIT_TORCHAO: "4bit",
                 Optimizer.ADAMW_FP8_TORCHAO: "fp8"}


def torchao_block_size(optimizer: Optimizer, trainer_built: bool = True) -> int:
    """The ``block_size`` a torchao low-bit AdamW quantizes its states with: 256 when HF Trainer builds it
    (``adamw_torch_8bit``/``adamw_torch_4bit``), else the class default (facts.TORCHAO_BLOCK_SIZE)."""
    return TORCHAO_TRAINER_BLOCK_SIZE if trainer_built else TORCHAO_BLOCK_SIZE[_TORCHAO_KIND[optimizer]]


def torchao_quantized(t: StoredTensor, block_size: int) -> bool:
    """torchao ``_new_buffer``: quantized states for ``numel >= 4096 and numel % block_size == 0``."""
    return t.numel >= TORCHAO_MIN_QUANTIZED_NUMEL and t.numel % block_size == 0


def _torchao_state_bytes(t: StoredTensor, optimizer: Optimizer, block_size: int) -> int:
    """exp_avg and exp_avg_sq of one tensor (module docstring)."""
    n = t.numel
    if not torchao_quantized(t, block_size):
        return 2 * round_up(n * t.bits // 8)
    kind = _TORCHAO_KIND[optimizer]
    qmap = TORCHAO_QMAP_ENTRIES[kind] * _F32
    one = (round_up(n * TORCHAO_CODE_BITS[kind] // 8) + round_up(TORCHAO_SCALE_BYTES * n // block_size)
           + round_up(qmap))
    return 2 * one


def optimizer_state_bytes(tensors: tuple[StoredTensor, ...], optimizer: Optimizer,
                          embedding_32bit: bool = True) -> OptimizerBytes:
    """``embedding_32bit``: HF Trainer built the optimizer (bitsandbytes embeddings at 32 bits, torchao's
    ``block_size=256``); stacks that build their own pass False."""
    device = paged = 0
    block_size = torchao_block_size(optimizer, embedding_32bit) if optimizer.is_torchao else 0
    qmaps_used = 0
    for t in tensors:
        if not t.trainable:
            continue
        n, elem = t.numel, t.bits // 8
        if optimizer is Optimizer.ADAMW:
            state = 2 * round_up(n * elem) + ADAM_STEP_BYTES
        elif optimizer is Optimizer.ADAMW_FOREACH:
            state = 2 * round_up(n * elem)
        elif optimizer.is_8bit:
            if n < BNB_MIN_8BIT_NUMEL or (t.kind == "embedding" and embedding_32bit):
                state = 2 * round_up(4 * n)
            else:
                qmaps_used += t.count
                state = 2 * round_up(n) + 2 * round_up(4 * -(-n // BNB_OPTIM_BLOCKSIZE))
        elif optimizer is Optimizer.PAGED_ADAMW:
            state = 2 * round_up(4 * n)
        elif optimizer is Optimizer.SGD:
            state = 0
        elif optimizer is Optimizer.SGD_MOMENTUM:
            state = round_up(n * elem)
        elif optimizer is Optimizer.ADAFACTOR:
            state = _adafactor_state_bytes(t.shape)
        elif optimizer.is_torchao:
            state = _torchao_state_bytes(t, optimizer, block_size)
        else:
            raise ValueError(f"optimizer {optimizer} has no state rule")
        if optimizer.is_paged and n >= BNB_PAGED_MIN_NUMEL:
            eight_bit = optimizer.is_8bit and not (t.kind == "embedding" and embedding_32bit)
            paged_part = 2 * round_up(n * (1 if eight_bit else 4))
            paged += paged_part * t.count
            device += (state - paged_part) * t.count
        else:
            device += state * t.count
    if qmaps_used:
        device += BNB_QMAP_BYTES
    return OptimizerBytes(device, paged, qmaps_used)


def _adafactor_state_bytes(shape: tuple[int, ...]) -> int:
    if len(shape) < 2:
        return round_up(4 * shape[0])
    rows = math.prod(shape[:-1])
    cols = math.prod(shape[:-2]) * shape[-1]
    return round_up(4 * rows) + round_up(4 * cols)


def optimizer_step_temporary_bytes(tensors: tuple[StoredTensor, ...], optimizer: Optimizer,
                                   trainer_built: bool = True) -> int:
    """Scratch memory alive during ``optimizer.step()``.

    adamw (fused ``_fused_adamw_``), SGD, bitsandbytes: update in place, 0.
    adamw-foreach: ``exp_avg_sq_sqrt = torch._foreach_sqrt(exp_avg_sqs)`` (torch/optim/adamw.py
      ``_multi_tensor_adamw``) allocates one state copy per (param group, dtype) bucket; Trainer's decay group (all but
      biases and norms) is the largest. The loop over a group's dtype buckets (``torch/optim/adam.py:638-769``) rebinds
      ``exp_avg_sq_sqrt`` only once the next bucket's is made, so two consecutive buckets of one group coexist (a
      16-bit ``modules_to_save`` copy beside fp32 adapters: both); buckets in first-appearance order of the tensors.
    adafactor: tensors are updated one at a time; for the largest, ``grad.float()``, ``p.float()`` (16-bit params
      only), ``update`` and the next ``update`` / ``-update`` coexist: (4 + 4 + 4 + 4)·n bytes for 16-bit params.
    torchao low-bit AdamW: one compiled ``single_param_adam`` per parameter (adam.py ``_AdamBase.step``); the largest
      over quantized tensors of the buffers inductor's plan holds at once (``facts.torchao_step_buffers``, each
      rounded to 512 B); a tensor with plain states updates in one pointwise kernel, in place: 0.
    """
    trainable = [t for t in tensors if t.trainable]
    if not trainable:
        return 0
    if optimizer is Optimizer.ADAMW_FOREACH:
        groups: dict[bool, dict[int, int]] = {}
        for t in trainable:
            buckets = groups.setdefault(_no_decay(t), {})
            buckets[t.bits] = buckets.get(t.bits, 0) + round_up(t.numel * t.bits // 8) * t.count
        return max(max(map(sum, zip(sizes, sizes[1:])), default=sizes[0])
                   for sizes in (list(buckets.values()) for buckets in groups.values()))
    if optimizer.is_torchao:
        kind, block_size = _TORCHAO_KIND[optimizer], torchao_block_size(optimizer, trainer_built)
        return max((sum(map(round_up, torchao_step_buffers(kind, t.shape, block_size))) for t in trainable
                    if torchao_quantized(t, block_size)), default=0)
    if optimizer is Optimizer.ADAFACTOR:
        largest = max(trainable, key=lambda t: t.numel)
        n = largest.numel
        upcasts = 2 * round_up(4 * n) if largest.bits < 32 else 0
        return upcasts + 2 * round_up(4 * n)
    return 0


def _no_decay(t: StoredTensor) -> bool:
    """Trainer.get_decay_parameter_names: biases and norm weights get no weight decay (their own param group)."""
    return t.kind == "norm" or t.name.endswith(".bias")
