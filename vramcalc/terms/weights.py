"""weights: every stored parameter and buffer, with quantization metadata."""

from __future__ import annotations

from .stored_tensor import StoredTensor


def weight_bytes(tensors: tuple[StoredTensor, ...]) -> int:
    """W = sum over stored tensors of round512(ceil(numel * bits / 8)) + quantization state.

    Frozen and trainable alike; 4-bit weights count their packed codes plus absmax / double-quantization state
    (``parameters.quantized_metadata_bytes``). Source: transformers v5 parameter dtypes; bitsandbytes quantize_4bit.
    """
    return sum(t.total_bytes for t in tensors)
