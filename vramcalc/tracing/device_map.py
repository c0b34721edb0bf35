"""Trace a ``--device-map auto`` step: the single-device step on fake tensors, each allocation charged to a GPU.

The placement is ``terms/device_map.placement`` (checked against transformers' ``_get_device_map``). Every storage
is charged to the GPU of the module that made it: a forward pre-hook on each placed module (embedding, decoder
layers, final norm, rotary embedding, lm_head) makes its GPU the current one, and a hook on the module's output
makes it current again when that output's gradient arrives (its backward). Parameters belong to their module's GPU
and optimizer states to their parameter's. The same pre-hook emulates accelerate's ``AlignDevicesHook.pre_forward``
(accelerate 1.16.0 ``hooks.py``: ``send_to_device(args, execution_device)``): every tensor argument that lives on
another GPU is cloned onto the module's (a copy, as ``.to(device)`` is), so the hidden state entering a GPU and the
rotary tables each layer receives are counted where the real run holds them.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch.utils._pytree import tree_map

from ..options import Phase
from ..terms import device_map as dm
from .tracker import AllocationTracker, storages_of


class DeviceTracker(AllocationTracker):
    """An ``AllocationTracker`` that also keeps each GPU's live bytes and its peak."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.current = 0
        self.storage_device = {}  # id(record) -> GPU
        self.fixed_device = torch.utils.weak.WeakIdKeyDictionary()  # storage -> GPU (parameters, states)
        self.device_live: dict[int, int] = defaultdict(int)
        self.device_peak: dict[int, int] = defaultdict(int)
        self.device_peak_phase: dict[int, Phase] = {}
        self._inputs_device = None

    def device_of(self, tensor: torch.Tensor):
        record = self.record_of(tensor)
        return None if record is None else self.storage_device.get(id(record))

    def _add(self, storage, term, region, weight_copy=False, op=""):
        record = super()._add(storage, term, region, weight_copy, op)
        if record.paged or record.host:
            return record
        device = self.fixed_device.get(storage, self._inputs_device if self._inputs_device is not None
                                       else self.current)
        self.storage_device[id(record)] = device
        self.device_live[device] += record.nbytes
        if self.device_live[device] > self.device_peak[device]:
            self.device_peak[device] = self.device_live[device]
            self.device_peak_phase[device] = self.phase
        return record

    def _free(self, record):
        device = self.storage_device.pop(id(record), None)
        if device is not None:
            self.device_live[device] -= record.nbytes
        super()._free(record)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.in_optimizer:  # an optimizer's new tensor (a state) lives where its parameter does
            devices = [self.device_of(t) for t in torch.utils._pytree.tree_leaves((args, kwargs))
                       if isinstance(t, torch.Tensor)]
            known = [d for d in devices if d is not None]
            self._inputs_device = known[0] if known else None
            try:
                return super().__torch_dispatch__(func, types, args, kwargs)
            finally:
                self._inputs_device = None
        return super().__torch_dispatch__(func, types, args, kwargs)


def _placed_modules(model, spec, where: dm.Placement) -> list[tuple[torch.nn.Module, int]]:
    from .step import base_model, decoder_layers

    causal = base_model(model)
    inner = causal.model
    out = [(inner.embed_tokens, where.embed), (inner.norm, where.norm), (inner.rotary_emb, where.rotary)]
    out += [(layer, where.layers[i]) for i, layer in enumerate(decoder_layers(model))]
    out.append((causal.lm_head, where.head))
    return out


def _install(model, spec, where, tracker: DeviceTracker) -> list:
    handles = []
    for module, gpu in _placed_modules(model, spec, where):
        for tensor in list(module.parameters()) + list(module.buffers()):
            for storage in storages_of(tensor):
                tracker.fixed_device[storage] = gpu

        def pre(mod, args, kwargs, gpu=gpu):
            tracker.current = gpu

            def move(t):
                if isinstance(t, torch.Tensor) and tracker.device_of(t) not in (None, gpu):
                    return t.clone()  # accelerate's send_to_device: a copy on this GPU
                return t

            return tree_map(move, args), tree_map(move, kwargs)

        def post(mod, args, output, gpu=gpu):
            first = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", output)
            if isinstance(first, torch.Tensor) and first.requires_grad:
                def arrive(grad, gpu=gpu):
                    tracker.current = gpu

                first.register_hook(arrive)

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post))
    return handles


def trace_device_map(spec, resolved, steps: int = 2) -> dict[int, int]:
    """Each GPU's peak tensor bytes (GPU -> bytes) over ``steps`` training steps on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .build import build_model
    from .cuda_emulation import cuda_kernel_emulation
    from .qlora import quant_state_tensors
    from .step import StepTracer

    setup = resolved.setup
    where = dm.placement(spec, setup.precision, dm.method_quant(setup.method, setup.quant), setup.num_gpus)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    tracker = DeviceTracker()
    model = build_model(spec, resolved, fake_mode)
    with fake_mode:
        handles = _install(model, spec, where, tracker)
        tracker.register_weights(list(model.parameters()) + list(model.buffers()) + quant_state_tensors(model))
        tracer = StepTracer(model, spec, resolved, tracker)
        with torch.device("cpu"), tracker, cuda_kernel_emulation(sdpa=True), contextlib.ExitStack():
            tracker.current = where.embed
            tracer.run(steps)
    for handle in handles:
        handle.remove()
    return {gpu: tracker.device_peak.get(gpu, 0) for gpu in range(setup.num_gpus)}
