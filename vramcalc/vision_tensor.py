"""VisionTensor: one kind of parameter tensor of a vision tower or projector (``vision.py`` and the family modules
that list their towers, ``vision_qwen.py``, ``vision_mllama.py``)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class VisionTensor:
    """``count`` parameter tensors of one shape; ``linear``: the weight or bias of an nn.Linear named ``module``
    (what LoRA can target: ``q_proj``, ``fc1``, ``modality_projection.proj``...)."""

    name: str
    shape: tuple[int, ...]
    count: int = 1
    module: str = ""  # the nn.Linear's peft target name, when the tensor belongs to one
    in_features: int = 0
    out_features: int = 0
    part: str = "tower"  # tower | projector

    @property
    def numel(self) -> int:
        return math.prod(self.shape) * self.count
