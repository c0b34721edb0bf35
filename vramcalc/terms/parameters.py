"""What the training step stores per parameter tensor: its dtype, whether it trains, how it is quantized.

One ``StoredTensor`` stands for ``count`` tensors of one shape. The list is the shared input of the weights,
gradients and optimizer-state terms (and of the trace's cross-checks): it is built once per (model, setup).

Dtype rules (transformers v5, peft 0.21, bitsandbytes 0.50):
- the model loads in the precision's parameter dtype; ``_keep_in_fp32_modules_strict`` tensors stay fp32;
- QLoRA replaces every decoder nn.Linear by a 4-bit ``Linear4bit``: packed 4-bit codes (``ceil(n/2)`` uint8), the
  absmax per 64-block (fp32, or uint8 with double quantization plus an fp32 absmax per 256 blocks, a 256-entry fp32
  code and an fp32 offset) and a 16-entry fp32 code (``bitsandbytes/functional.py::quantize_4bit``). Embeddings,
  norms, lm_head, routers and v5's 3-D experts are not nn.Linear and stay unquantized (bitsandbytes #1849);
  with ``mixed-*`` precision ``peft.prepare_model_for_kbit_training`` casts them to fp32;
- LoRA adds A [r, in] and B [out, r] per targeted module, in fp32 (peft ``autocast_adapter_dtype=True``) or in the
  model's 16-bit dtype; prompt tuning adds one [virtual_tokens, h] embedding.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from ..model import ModelSpec, ParamKind
from ..options import AdapterDtype, Method
from ..training_setup import ResolvedSetup
from ..units import round_up

BNB_BLOCKSIZE = 64  # quantize_4bit default blocksize
BNB_DQ_BLOCKSIZE = 256  # double quantization: quantize_blockwise(absmax, blocksize=256)
BNB_DQ_CODE_ENTRIES = 256  # the "dynamic" code of the nested quantization, fp32
BNB_4BIT_CODE_ENTRIES = 16  # the nf4/fp4 code table, fp32


@dataclass(frozen=True)
class StoredTensor:
    name: str
    kind: str  # a ParamKind value, or "adapter", "prompt", "quantized"
    shape: tuple[int, ...]
    count: int
    bits: int  # bits per element as stored
    trainable: bool
    metadata_bytes: int = 0  # per tensor: quantization state allocations, each rounded to 512 B
    scope: str = "model"  # model | layer | dense | moe: which decoder layers hold one (see model.ParamTensor)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bytes_each(self) -> int:
        return round_up(-(-self.numel * self.bits // 8)) + self.metadata_bytes

    @property
    def total_bytes(self) -> int:
        return self.bytes_each * self.count


def quantized_metadata_bytes(numel: int, double_quant: bool) -> int:
    """Bytes of a 4-bit weight's quantization state, each tensor rounded to 512 B as the allocator does."""
    blocks = -(-numel // BNB_BLOCKSIZE)
    code = round_up(4 * BNB_4BIT_CODE_ENTRIES)
    if not double_quant:
        return round_up(4 * blocks) + code
    outer_blocks = -(-blocks // BNB_DQ_BLOCKSIZE)
    return round_up(blocks) + round_up(4 * outer_blocks) + round_up(4 * BNB_DQ_CODE_ENTRIES) + round_up(4) + code


@functools.lru_cache(maxsize=4096)
def stored_tensors(model: ModelSpec, resolved: ResolvedSetup) -> tuple[StoredTensor, ...]:
    setup = resolved.setup
    method = setup.method
    base_bits = setup.precision.param_dtype.bits
    if method is Method.QLORA and not setup.precision.is_mixed:
        base_bits = 16
    quantized_linears = method is Method.QLORA
    linear_names = {module.name for module in model.inventory.linears}
    out = []
    for tensor in model.inventory.tensors:
        bits = 32 if tensor.keep_fp32 else base_bits
        module = tensor.name.rsplit(".", 1)[0]
        is_linear_weight = tensor.kind is ParamKind.LINEAR and tensor.name.endswith(".weight") and module in linear_names
        if quantized_linears and is_linear_weight:
            out.append(StoredTensor(tensor.name, "quantized", tensor.shape, tensor.count, 4, False,
                                    quantized_metadata_bytes(tensor.numel, setup.double_quant), tensor.scope))
            continue
        out.append(StoredTensor(tensor.name, tensor.kind.value, tensor.shape, tensor.count, bits, method is Method.FULL,
                                scope=tensor.scope))
    if method.uses_lora:
        bits = adapter_bits(resolved)
        linears = {module.name: module for module in model.inventory.linears}
        for name in resolved.lora_modules:
            module = linears[name]
            r = setup.lora_rank
            out.append(StoredTensor(f"{name}.lora_A", "adapter", (r, module.in_features), module.count, bits, True,
                                    scope=module.scope))
            out.append(StoredTensor(f"{name}.lora_B", "adapter", (module.out_features, r), module.count, bits, True,
                                    scope=module.scope))
    if method is Method.PROMPT:
        out.append(StoredTensor("prompt_encoder.embedding", "prompt", (setup.virtual_tokens, model.hidden_size), 1,
                                adapter_bits(resolved), True))
    return tuple(out)


def adapter_bits(resolved: ResolvedSetup) -> int:
    """fp32 adapters (peft default), or the model's 16-bit dtype."""
    setup = resolved.setup
    if setup.adapter_dtype is AdapterDtype.FP32:
        return 32
    if setup.precision.param_dtype.bits == 32 and setup.method is not Method.QLORA:
        return 32
    return 16


def trainable(tensors: tuple[StoredTensor, ...]) -> list[StoredTensor]:
    return [t for t in tensors if t.trainable]
