"""bitsandbytes optimizers for the trace, built as Trainer builds them.

``Trainer.create_optimizer`` registers every nn.Embedding for 32-bit states when the optimizer is 8-bit
(``trainer.py``: ``manager.register_module_override(module, "weight", {"optim_bits": 32})``). On CUDA a paged
optimizer takes each state buffer of a tensor with at least 1e5 elements from ``cudaMallocManaged``
(``optim/optimizer.py::get_state_buffer`` -> ``F.get_paged``): unified memory that torch's allocator never sees.
On CPU bitsandbytes falls back to ordinary buffers, so the trace hands those buffers to the tracker as paged.
"""

from __future__ import annotations

import contextlib
import warnings

from torch import nn

from ..options import Optimizer

from ..facts import BNB_PAGED_MIN_NUMEL as PAGED_MIN_NUMEL  # bitsandbytes get_state_buffer


def make_bnb_optimizer(model: nn.Module, groups, optimizer: Optimizer, lr: float, paged_context=None):
    import bitsandbytes as bnb

    cls = {
        Optimizer.ADAMW_8BIT: bnb.optim.AdamW8bit,  # adamw_bnb_8bit
        Optimizer.PAGED_ADAMW: bnb.optim.PagedAdamW32bit,  # paged_adamw_32bit
        Optimizer.PAGED_ADAMW_8BIT: bnb.optim.PagedAdamW8bit,  # paged_adamw_8bit
    }[optimizer]
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():  # bitsandbytes builds its quantization maps with .tolist(): real CPU tensors
        instance = cls(groups, lr=lr)
    if optimizer.is_8bit:
        manager = bnb.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    if optimizer.is_paged and paged_context is not None:
        get_state_buffer = instance.get_state_buffer

        def paged_state_buffer(p, *args, **kwargs):
            context = paged_context() if p.numel() >= PAGED_MIN_NUMEL else contextlib.nullcontext()
            with context, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return get_state_buffer(p, *args, **kwargs)

        instance.get_state_buffer = paged_state_buffer
    return instance
