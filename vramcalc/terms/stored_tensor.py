"""One tensor as the GPU stores it (a parameter, adapter, prompt or quantized weight, with its quantization state):
the unit the parameter inventory (``parameters``), the peft methods' tensors (``peft_methods``), the states and the
temporaries count in."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..model import state_without_hash
from ..units import round_up


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
    # derived once at construction (``dataclasses.replace`` recomputes them): elements, and bytes of one tensor as
    # the allocator holds it, round512(ceil(numel * bits / 8)) + metadata
    numel: int = field(init=False, repr=False, compare=False)
    bytes_each: int = field(init=False, repr=False, compare=False)

    def __hash__(self) -> int:  # tuples of stored tensors are cache keys (``states.model_states``): hash once
        try:
            return self.__dict__["_field_hash"]
        except KeyError:
            cached = hash((self.name, self.kind, self.shape, self.count, self.bits, self.trainable,
                           self.metadata_bytes, self.scope))
            object.__setattr__(self, "_field_hash", cached)
            return cached

    __getstate__ = state_without_hash

    def __post_init__(self) -> None:
        numel = math.prod(self.shape)
        object.__setattr__(self, "numel", numel)
        object.__setattr__(self, "bytes_each", round_up(-(-numel * self.bits // 8)) + self.metadata_bytes)

    @property
    def total_bytes(self) -> int:
        return self.bytes_each * self.count
