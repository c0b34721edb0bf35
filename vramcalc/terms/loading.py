"""The ``load`` phase: device bytes while the weights reach the GPU, before the first training step.

``load_peak_bytes(model, resolved, quantizer)`` is the peak of that phase (tensor bytes, what
``torch.cuda.max_memory_allocated`` sees; the allocator keeps the high-water mark reserved when nothing calls
``empty_cache``). Symbols: W = the final weights (``weights.weight_bytes``), n = weights of one Linear, q(n) its
quantized bytes (codes + state), k·n the quantizer's scratch.

- ``per-tensor`` (transformers v5 ``from_pretrained``: each checkpoint tensor is read, moved and, for bitsandbytes,
  quantized on its own: ``Params4bit._quantize`` / ``Int8Params._quantize``): W plus the largest single tensor's
  16-bit copy and its quantize scratch, ``max_n (2·n + k_bnb·n)``. After loading, peft's
  ``prepare_model_for_kbit_training`` (mixed-precision QLoRA) casts each unquantized parameter on the GPU
  (``param.data = param.data.to(torch.float32)``, ``peft/utils/other.py``): its 16-bit source beside its fp32 copy,
  ``2·n`` of the largest. Without quantization every tensor is read into its place: W.
- ``per-layer`` (torchtune ``LoRALinear``/``FrozenNF4Linear`` and Lightning's ``_Linear4bit`` quantize each Linear
  in its ``__init__``, right after building it in 16 bits on the GPU: torchtune@fde0dc403
  ``torchtune/modules/peft/lora.py:87-94``, Lightning@71aed751 ``fabric/plugins/precision/bitsandbytes.py:213-214``):
  the weights built so far plus one Linear in 16 bits and the quantizer's scratch, at the Linear that maximises it:
  ``W - q(n) - (built after it) + 2·n + k·n``. The modules built after the last decoder layer (final norm, lm_head)
  are not yet there when its Linears are quantized; a quantized lm_head is the last Linear built.
- ``whole-model``: the 16-bit model on the GPU, then quantized tensor by tensor: every weight at 2 bytes plus the
  first quantized tensor's ``q(n) + k·n``.
- ``requantize`` (torchtune 0.1.x with torchao 0.1, April-August 2024): the quantized model is built on the GPU, then
  ``model.load_state_dict`` copies each checkpoint tensor into its NF4 weight through torchtune's ``aten.copy_``
  override, which moves the 16-bit tensor to the GPU and runs ``to_nf4`` there, beside the whole model and before the
  old codes are dropped: ``W + n_q/32 + r·n`` at the largest quantized Linear, r =
  ``facts.TORCHTUNE_01_REQUANTIZE_BYTES_PER_WEIGHT`` (about 70), n_q/32 the bf16 ``quantization_factor`` storage that
  torchao 0.1 keeps with every NF4 weight (``facts.TORCHAO_01_FACTOR_BYTES_PER_WEIGHT``; n_q all quantized weights).
  The checkpoint's dtype is not known to vramcalc: the cast of a non-bf16 (fp16) checkpoint is counted (2 B/weight,
  3% of r, too high for a bf16 checkpoint). The training step's weights keep vramcalc's NF4 bytes (the n_q/32 is
  left out there: docs/stacks-research.md). The build before it peaks within 0.1% of this (torchtune 0.1.1
  deep-copies one built layer per decoder layer and its NF4 ``clone`` re-quantizes too; replayed in
  ``docs/evidence/torchtune01_reserved``: 7.359 GB build, 7.361 GB load for Llama-2-7B, of which 67 MB are the
  per-layer rotary caches this rule leaves out). What the phase leaves reserved is not a formula: the whole
  sequence is generated and replayed through the caching allocator (``terms/load_reserved.py``: 9.13 GB for
  Llama-2-7B), and the estimate's reserved memory is the larger of the step's and that.

peft's ``modules_to_save`` copies (``parameters.module_copies``) are made by ``get_peft_model`` after loading
(``copy.deepcopy`` of the loaded module, peft 0.21.2 ``utils/other.py:653``, after ``prepare_model_for_kbit_training``):
the phase peaks at max(the loaded weights' peak, W).

Quantizer scratch ``k`` (``facts``): bitsandbytes ``quantize_4bit`` 4/64 B per weight with double quantization, 0
without (and 0 for int8); torchao 0.1 ``to_nf4`` 68 B per weight (docs/stacks-research.md Q4).
"""

from __future__ import annotations

from ..facts import (
    BNB_QUANTIZE_4BIT_SCRATCH_BYTES_PER_WEIGHT,
    TORCHAO_01_FACTOR_BYTES_PER_WEIGHT,
    TORCHAO_01_TO_NF4_BYTES_PER_WEIGHT,
    TORCHTUNE_01_REQUANTIZE_BYTES_PER_WEIGHT,
)
from ..gptq import is_gptq
from ..model import ModelSpec
from ..options import Method, Precision
from ..units import round_up
from .parameters import COPY_INFIX, stored_tensors
from .stored_tensor import StoredTensor
from .weights import weight_bytes

_LOAD_BYTES = 2  # checkpoints are 16-bit (bf16/fp16); transformers v5 loads dtype="auto"
QUANTIZERS = ("bnb", "torchao-0.1")


def quantizer_scratch_bytes(numel: int, quantizer: str, bits: int, double_quant: bool) -> int:
    """Bytes a quantizer allocates beyond its input and its final output while quantizing one weight of ``numel``."""
    if quantizer == "torchao-0.1":
        return TORCHAO_01_TO_NF4_BYTES_PER_WEIGHT * numel
    if quantizer != "bnb":
        raise ValueError(f"unknown quantizer {quantizer!r}; choose one of: {', '.join(QUANTIZERS)}")
    if bits == 4 and double_quant:
        return round_up(int(BNB_QUANTIZE_4BIT_SCRATCH_BYTES_PER_WEIGHT * numel))
    return 0


def _sixteen_bit(numel: int) -> int:
    return round_up(_LOAD_BYTES * numel)


def _load_copy_bytes(numel: int, setup) -> int:
    """A Linear's checkpoint tensor on the GPU before bitsandbytes quantizes it: in the dtype ``from_pretrained``
    loads (transformers v5 ``core_model_loading.py``: a tensor quantized on load keeps the model's ``dtype``,
    ``_materialize_copy`` casts it on the host): fp32 under ``--precision fp32``, else 16 bits."""
    return round_up(4 * numel) if setup.precision is Precision.FP32 else _sixteen_bit(numel)


def _upcast_transient(tensors: tuple[StoredTensor, ...]) -> int:
    """A parameter kept in fp32 but read from a 16-bit checkpoint: its 16-bit source beside it (the largest one)."""
    return max((_sixteen_bit(t.numel) for t in tensors if t.kind != "quantized" and t.bits == 32
                and t.kind not in ("adapter", "prompt")), default=0)


def requantize_transient_bytes(quantized: list[StoredTensor]) -> int:
    """``--load requantize`` beyond the built model W: torchao 0.1's n/32 factor storage of every NF4 weight, plus
    torchtune 0.1's on-GPU re-quantization of the largest one (module docstring, ``facts``)."""
    factors = sum(round_up(int(TORCHAO_01_FACTOR_BYTES_PER_WEIGHT * t.numel)) * t.count for t in quantized)
    largest = max(t.numel for t in quantized)
    return factors + round_up(int(TORCHTUNE_01_REQUANTIZE_BYTES_PER_WEIGHT * largest))


def load_peak_bytes(model: ModelSpec, resolved, quantizer: str = "bnb") -> int:
    """Peak tensor bytes of the ``load`` phase for ``resolved.setup.load`` (module docstring).

    ``quantizer``: who quantizes under ``per-layer`` (``bnb``: Lightning's plugin; ``torchao-0.1``: torchtune's
    ``to_nf4`` of April 2024); ``per-tensor`` and ``whole-model`` are bitsandbytes (transformers)."""
    setup = resolved.setup
    every = stored_tensors(model, resolved)
    tensors = tuple(t for t in every if COPY_INFIX not in t.name)  # what from_pretrained loads
    peak = _loaded_peak_bytes(setup, tensors, quantizer)
    return max(peak, weight_bytes(every)) if len(tensors) < len(every) else peak


def _loaded_peak_bytes(setup, tensors: tuple[StoredTensor, ...], quantizer: str) -> int:
    """``load_peak_bytes`` of the tensors ``from_pretrained`` and the kbit preparation make."""
    total = weight_bytes(tensors)
    path = getattr(getattr(setup, "load", None), "value", "per-tensor")
    quantized = [t for t in tensors if t.kind == "quantized"]
    double_quant = setup.double_quant
    if setup.method is not Method.QLORA or not quantized or is_gptq(setup):  # GPTQ: loaded already packed
        return total  # each tensor is read into its place (a dtype change happens before it reaches the GPU)
    # peft prepare_model_for_kbit_training casts on the GPU, after loading (``param.data = param.data.to(fp32)``)
    upcast = _upcast_transient(tensors) if setup.precision.is_mixed else 0
    if path == "whole-model":
        sixteen = sum(_sixteen_bit(t.numel) * t.count if t.kind == "quantized" or t.bits == 32 else t.total_bytes
                      for t in tensors if t.kind not in ("adapter", "prompt"))
        first = max(t.bytes_each + quantizer_scratch_bytes(t.numel, "bnb", t.bits, double_quant) for t in quantized)
        return max(sixteen + first, total + upcast)
    if path == "requantize":
        return total + requantize_transient_bytes(quantized)
    if path == "per-layer":
        tail = sum(t.total_bytes for t in tensors if t.kind in ("lm_head", "norm") and t.scope == "model")
        best = 0
        for t in quantized:
            built_after = 0 if t.name.startswith("lm_head") else tail
            peak = (total - t.bytes_each - built_after + _sixteen_bit(t.numel)
                    + quantizer_scratch_bytes(t.numel, quantizer, t.bits, double_quant))
            best = max(best, peak)
        return max(best, total + upcast)
    per_tensor = max(_load_copy_bytes(t.numel, setup) + quantizer_scratch_bytes(t.numel, "bnb", t.bits, double_quant)
                     for t in quantized)
    return total + max(per_tensor, upcast)
