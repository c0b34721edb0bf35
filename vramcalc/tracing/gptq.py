"""GPTQ int4 base layers for the trace (``--quant int4-gptq``): auto-gptq's own ``QuantLinear`` on fake tensors.

What transformers + optimum + auto-gptq build for ``from_pretrained(quantization_config=GPTQConfig(bits=4,
disable_exllama=True))`` (QwenLM/Qwen ``finetune.py``'s Q-LoRA): optimum 1.16.1 ``gptq/quantizer.py:256-263`` picks
the class with auto-gptq's ``dynamically_import_QuantLinear`` (auto-gptq 0.7.1 ``utils/import_utils.py:96-99``:
``qlinear_cuda_old`` for ``desc_act=False``, ``qlinear_cuda`` for ``desc_act=True``), and ``_replace_by_quant_layers``
(``quantizer.py:281-293``) puts one in place of every nn.Linear of the decoder blocks (``get_layers(model,
prefix=block_name)``: not the embedding, not lm_head) with ``bias=True`` whatever the Linear had and
``weight_dtype=layer.weight.dtype`` (the load dtype). The class's code runs unchanged: its file is imported by path
from the installed ``auto_gptq`` (``pip install --no-deps auto-gptq==0.7.1``; the package's ``__init__`` is not run:
it imports the whole package, built for transformers 4). Its ``import autogptq_cuda_64`` fails inside its
``try`` on a machine without the extension, and a CPU tensor takes the torch path anyway
(``qlinear_cuda_old.py:206-210``: the CUDA kernel only for ``x.device.type == "cuda"`` and fewer than
``kernel_switch_threshold`` = 128 rows).

peft 0.21 wraps only gptqmodel's layers (``peft/tuners/lora/gptq.py:126-131``, ``dispatch_gptq``); the trace hands
auto-gptq's class to peft's own ``GPTQLoraLinear`` (the same wrapper) through peft's custom-module registry
(``LoraConfig._register_custom_module``, ``tuners/lora/model.py:504-522``). peft <= 0.9 did the same with
``is_auto_gptq_available`` (peft 0.7.1 ``tuners/lora/gptq.py``).

Built on the meta device: the buffers (qweight, qzeros, scales, g_idx, bias) become fake CPU tensors with the model;
``wf``, a plain tensor attribute (not a buffer) that ``forward`` moves to qzeros' device (``qlinear_cuda_old.py:292``),
is made on the trace's device here (its 32 bytes are counted as a weight: one 512-byte block per layer).
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib

import torch
from torch import nn

from ..errors import VramcalcError

GPTQ_BITS = 4  # --quant int4-gptq
_FILES = {False: "qlinear_cuda_old.py", True: "qlinear_cuda.py"}  # by desc_act


def _source_dir() -> pathlib.Path:
    """Where the installed auto-gptq's qlinear files are (found without running its ``__init__``)."""
    spec = importlib.util.find_spec("auto_gptq")
    if spec is not None and spec.submodule_search_locations:
        installed = pathlib.Path(list(spec.submodule_search_locations)[0]) / "nn_modules" / "qlinear"
        if (installed / _FILES[False]).exists():
            return installed
    raise VramcalcError("trace --quant int4-gptq runs auto-gptq's own QuantLinear: pip install --no-deps "
                        "auto-gptq==0.7.1")


@functools.lru_cache(maxsize=2)
def quant_linear_class(desc_act: bool):
    """auto-gptq's ``QuantLinear`` for ``desc_act`` (module docstring), imported by file path."""
    import logging

    path = _source_dir() / _FILES[bool(desc_act)]
    name = f"vramcalc_auto_gptq_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    logging.getLogger(name).setLevel(logging.ERROR)  # "CUDA extension not installed."
    spec.loader.exec_module(module)
    return module.QuantLinear


def quantize_linears_gptq(model: nn.Module, setup) -> None:
    """Replace every nn.Linear of the decoder blocks by auto-gptq's QuantLinear (4 bits, the setup's group size),
    as optimum's ``_replace_by_quant_layers`` does (module docstring), on the meta device. lm_head (outside the
    blocks) and the embedding stay in the load dtype."""
    if any(name.endswith("experts") for name, _ in model.named_modules()):
        raise VramcalcError("trace --quant int4-gptq of a mixture of experts is estimate only: transformers 5 "
                            "builds the experts as fused 3-D parameters, not the per-expert nn.Linear a GPTQ "
                            "checkpoint quantizes; use vramcalc estimate")
    desc_act = bool(getattr(setup, "gptq_desc_act", False))
    group_size = int(getattr(setup, "gptq_group_size", 128))
    quant_linear = quant_linear_class(desc_act)
    output = model.get_output_embeddings()
    replacements = []
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Linear) and child is not output:
                replacements.append((parent, child_name, child))
    for parent, child_name, child in replacements:
        _check_shape(child, group_size)
        with torch.device("meta"):
            layer = quant_linear(GPTQ_BITS, group_size, child.in_features, child.out_features, True,
                                 weight_dtype=child.weight.dtype)
        setattr(parent, child_name, layer)


def _check_shape(linear: nn.Linear, group_size: int) -> None:
    """auto-gptq packs 32 bits per int32 column and regroups ``weight.reshape(-1, group_size, out)``
    (``qlinear_cuda_old.py:52,59,316``): in and out must be multiples of 32 and in a multiple of the group size."""
    g = linear.in_features if group_size == -1 else group_size
    if linear.in_features % 32 or linear.out_features % 32 or linear.in_features % g:
        raise VramcalcError(f"trace --quant int4-gptq: a Linear of {linear.in_features} -> {linear.out_features} "
                            f"cannot be packed by auto-gptq with group size {group_size} (in and out multiples of 32, "
                            "in a multiple of the group size)")


def materialise_gptq(model: nn.Module, device: str = "cpu") -> None:
    """``wf`` (the shift amounts, ``qlinear_cuda_old.py:86``) on the trace's device, as ``forward`` would move it
    (call inside the FakeTensorMode: a fake tensor)."""
    for module in model.modules():
        wf = getattr(module, "wf", None)
        if isinstance(wf, torch.Tensor) and hasattr(module, "qweight") and wf.device.type == "meta":
            module.wf = torch.tensor(list(range(0, 32, module.bits)), dtype=torch.int32, device=device).unsqueeze(0)


def gptq_wf_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Each QuantLinear's ``wf``: device memory from its first forward on (a weight)."""
    return [module.wf for module in model.modules()
            if hasattr(module, "qweight") and isinstance(getattr(module, "wf", None), torch.Tensor)]


def register_gptq_lora(config, desc_act: bool) -> None:
    """peft's own GPTQ LoRA layer for auto-gptq's QuantLinear (module docstring)."""
    from peft.tuners.lora.gptq import GPTQLoraLinear

    config._register_custom_module({quant_linear_class(desc_act): GPTQLoraLinear})
