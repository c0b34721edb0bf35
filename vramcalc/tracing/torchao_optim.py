"""torchao's low-bit AdamW (``torchao.optim.AdamW8bit``, ``AdamW4bit``, ``AdamWFp8``) for the trace.

The real classes run on the trace's fake tensors: ``_AdamBase.step`` (``torchao/optim/adam.py``, torchao 0.18)
creates each parameter's states with its own ``_new_buffer`` (``OptimState8bit.zeros`` etc.: codes, scale, qmap, or
``torch.zeros_like(p)`` below 4096 elements or off the block size), so the state bytes are torchao's own.

Two things a GPU does differently, which the trace supplies:

- ``state["step"] = torch.tensor(0.0)`` and the param groups' ``lr`` tensor are CPU tensors on a GPU too: made here
  under the tracker's ``host`` flag, out of the device count.
- The update itself is ``torch.compile(single_param_adam, fullgraph=True, dynamic=False)``: one inductor graph per
  parameter, whose kernels cannot run on fake tensors. In its place the trace allocates, on the device, the buffers
  inductor's generated wrapper holds at its peak for that parameter (``facts.torchao_step_buffers``: read from the
  Triton plan of the real step, ``benchmarks/torchao_step_plan.py``), and frees them when the call returns; the
  states and the parameter are updated in place (no bytes). So the step's scratch is the plan's, charged the same
  way as the estimate's; the trace checks the states and where the scratch falls in the step (which parameter,
  beside which gradients), not the plan.
"""

from __future__ import annotations

import contextlib

import torch

from ..facts import torchao_step_buffers
from ..options import Optimizer
from ..terms.optimizer import torchao_block_size

_KIND = {Optimizer.ADAMW_8BIT_TORCHAO: "8bit", Optimizer.ADAMW_4BIT_TORCHAO: "4bit",
         Optimizer.ADAMW_FP8_TORCHAO: "fp8"}


def _classes():
    try:
        from torchao.optim import AdamW4bit, AdamW8bit, AdamWFp8
    except ImportError as error:  # torchao < 0.10 keeps them in the prototype namespace
        try:
            from torchao.prototype.low_bit_optim import AdamW4bit, AdamW8bit, AdamWFp8
        except ImportError:
            raise error from None
    return {Optimizer.ADAMW_8BIT_TORCHAO: AdamW8bit, Optimizer.ADAMW_4BIT_TORCHAO: AdamW4bit,
            Optimizer.ADAMW_FP8_TORCHAO: AdamWFp8}


def _fill_code_tables() -> None:
    """torchao 0.18 builds each code table once, lazily (``subclass_8bit.get_qmap_signed``, ``lru_cache``), with
    ``.tolist()`` of torch ops: on the trace's fake tensors that is data-dependent, so they are built here on real
    CPU tensors (the values only; every state still makes its own device copy)."""
    import importlib

    for name in ("subclass_8bit", "subclass_4bit"):
        try:
            module = importlib.import_module(f"torchao.optim.{name}")
        except ImportError:
            continue
        for table in ("get_qmap_signed", "get_qmap_unsigned"):
            if hasattr(module, table):
                getattr(module, table)()


@contextlib.contextmanager
def _on_device(tracker):
    """Allocations inside count on the device even within the tracker's ``host`` flag."""
    outer, tracker.in_host = tracker.in_host, False
    try:
        yield
    finally:
        tracker.in_host = outer


def make_torchao_optimizer(params, optimizer: Optimizer, tracker, *, lr: float, weight_decay: float | None = None,
                           trainer_built: bool = True) -> torch.optim.Optimizer:
    """The torchao optimizer over ``params`` (a list of tensors or of param groups), with the block size HF Trainer
    passes (``trainer_built``: 256) or the class default, its step run as the module docstring says."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    cls = _classes()[optimizer]
    block_size = torchao_block_size(optimizer, trainer_built)
    kwargs = {} if weight_decay is None else {"weight_decay": weight_decay}
    with unset_fake_temporarily():  # the lr tensor (``add_param_group``): a real CPU tensor
        instance = cls(params, lr=lr, block_size=block_size, **kwargs)
        _fill_code_tables()
    if tracker is None:  # a real step on a device (the calibration harness): torchao as it is
        return instance
    kind = _KIND[optimizer]
    new_buffer = instance._new_buffer

    def device_buffer(p, signed):
        with _on_device(tracker):
            return new_buffer(p, signed)

    def compiled_step(p, grad, step, exp_avg, exp_avg_sq, *args):
        if type(exp_avg) is torch.Tensor:  # plain states: one pointwise kernel, in place
            return
        with _on_device(tracker):
            held = [torch.empty(nbytes, dtype=torch.uint8, device=p.device)
                    for nbytes in torchao_step_buffers(kind, tuple(p.shape), block_size)]
        del held

    original_step = instance.step
    compile_ = torch.compile

    def compile_single_param_adam(fn=None, *args, **kwargs):
        if getattr(fn, "__name__", "") == "single_param_adam":
            return compiled_step
        return compile_(fn, *args, **kwargs)

    def step(closure=None):
        torch.compile = compile_single_param_adam
        try:
            with tracker.host():
                return original_step(closure)
        finally:
            torch.compile = compile_

    instance._new_buffer = device_buffer
    instance.step = step
    return instance
