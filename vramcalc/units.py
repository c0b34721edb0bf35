"""Units and element sizes. Everything inside vramcalc counts integer bytes; GiB only at the edges."""

from __future__ import annotations

from enum import Enum

BYTES_PER_GIB = 2**30  # GiB, as torch.cuda and nvidia-smi ("MiB") count
BYTES_PER_GB = 10**9  # GB, as datasheets count

# CUDA caching allocator rounds every block up to a multiple of 512 bytes
# (c10/cuda/CUDACachingAllocator.cpp: kMinBlockSize = 512). The trace counts storages the same way.
CUDA_ALLOCATION_GRANULE_BYTES = 512


class DType(str, Enum):
    """Element types that occupy memory in a fine-tuning step, with their width in bits."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    FP8 = "fp8"
    INT8 = "int8"
    NF4 = "nf4"
    FP4 = "fp4"
    INT64 = "int64"
    BOOL = "bool"

    @property
    def bits(self) -> int:
        return _BITS[self]

    @property
    def bytes(self) -> int:
        """Whole bytes per element; sub-byte types are counted in bits and rounded once by the caller."""
        if self.bits % 8:
            raise ValueError(f"{self.value} is sub-byte: count it in bits")
        return self.bits // 8


_BITS = {
    DType.FP32: 32,
    DType.BF16: 16,
    DType.FP16: 16,
    DType.FP8: 8,  # e4m3 / e5m2 (torch.float8_*)
    DType.INT8: 8,
    DType.NF4: 4,  # bitsandbytes packs two 4-bit codes per uint8
    DType.FP4: 4,
    DType.INT64: 64,
    DType.BOOL: 8,  # torch.bool is one byte per element
}


def gib(n_bytes: int | float) -> float:
    """Bytes to GiB (2^30 bytes)."""
    return n_bytes / BYTES_PER_GIB


def round_up(n_bytes: int, granule: int = CUDA_ALLOCATION_GRANULE_BYTES) -> int:
    """Round an allocation up to the allocator's granule (512 B for CUDA)."""
    return -(-n_bytes // granule) * granule


def maximum(a, b):
    """max() of two byte counts that may also be numpy arrays (sweeps evaluate one setup over many batch shapes)."""
    if a.__class__ is int and b.__class__ is int:  # the scalar estimate: no attribute probing
        return a if a >= b else b
    if hasattr(a, "shape") or hasattr(b, "shape"):
        import numpy

        return numpy.maximum(a, b)
    return a if a >= b else b


def minimum(a, b):
    """min() of two byte counts that may also be numpy arrays (see ``maximum``)."""
    if a.__class__ is int and b.__class__ is int:
        return a if a <= b else b
    if hasattr(a, "shape") or hasattr(b, "shape"):
        import numpy

        return numpy.minimum(a, b)
    return a if a <= b else b


def select(condition, if_true, if_false):
    """``if_true if condition else if_false``, elementwise when ``condition`` is a numpy array."""
    if hasattr(condition, "shape"):
        import numpy

        return numpy.where(condition, if_true, if_false)
    return if_true if condition else if_false


def next_power_of_two(n):
    """Smallest power of two >= n (n >= 1), elementwise for numpy arrays."""
    if hasattr(n, "shape"):
        import numpy

        return (2 ** numpy.ceil(numpy.log2(numpy.maximum(n, 1)))).astype(numpy.int64)
    return 1 << (int(n) - 1).bit_length()
