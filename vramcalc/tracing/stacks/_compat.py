"""Import torchtune 0.6.1 next to the torchao this environment has (torchao >= 0.13, for the fp8 trace).

torchtune 0.6.1 (April 2025) was written against torchao 0.10: it imports ``torchao.dtypes.nf4tensor`` and, from
``torchtune/training/__init__.py:76``, ``torchtune.training.quantization`` (QAT quantizers and
``TensorCoreTiledLayout``), both moved or removed in later torchao. Two aliases, installed only if the import
would fail, let the real code run:

- ``torchao.dtypes.nf4tensor`` -> ``torchao.quantization.quantize_.workflows.nf4.nf4_tensor`` (the same
  ``NF4Tensor``, ``to_nf4``, ``linear_nf4`` and ``implements``, moved in torchao 0.13);
- ``torchtune.training.quantization``: a stand-in with ``get_quantizer_mode`` returning None. That module only serves
  the QAT recipes and ``quantize.py``; the single-device LoRA/QLoRA/full recipes never call it with a quantizer.

So the NF4 code the torchtune trace runs is torchao's current one, not torchao 0.10's (its ``to_nf4`` and
``linear_nf4`` dequantize the same way since torchao 0.2: ``LinearNF4.forward`` = ``F.linear(x, w.to(x.dtype))``).
"""

from __future__ import annotations

import importlib
import sys
import types

_NF4_HOME = "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"


def install() -> None:
    """Make ``import torchtune`` work; a no-op when torchao still has the old module."""
    try:
        importlib.import_module("torchao.dtypes.nf4tensor")
    except ImportError:
        module = importlib.import_module(_NF4_HOME)
        sys.modules["torchao.dtypes.nf4tensor"] = module
        import torchao.dtypes

        torchao.dtypes.nf4tensor = module
    if "torchtune.training.quantization" not in sys.modules:
        try:
            from torchao.dtypes import TensorCoreTiledLayout  # noqa: F401  (torchao <= 0.12 has it)
        except ImportError:
            stand_in = types.ModuleType("torchtune.training.quantization")
            stand_in.get_quantizer_mode = lambda quantizer: None
            stand_in.__doc__ = "vramcalc stand-in: torchtune's QAT quantizers need torchao <= 0.12"
            sys.modules["torchtune.training.quantization"] = stand_in
