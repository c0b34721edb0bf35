"""The order in which a trace allocates and frees device storages, for ``caching_allocator.replay``.

``AllocationEvents`` keeps one event per allocation and free, in program order: ``("alloc", key, nbytes)`` with the
storage's own size (the replay rounds it as the allocator does), ``("free", key)`` when the storage dies (a weakref
callback, as the tracker counts it), and the harness' ``("empty_cache",)`` / ``("reset_peak",)`` where the driver
marks them. Two ways in:

- the ``AllocationTracker`` reports each device storage it registers (``AllocationTracker(events=...)``): the step;
- entered as a dispatch mode itself, it records every new storage (the model build, which runs before the tracker is
  entered); a storage it has seen is never recorded twice, so the tracker's later registration of the weights adds
  nothing.

Each allocation names its stream: the one current when it was made (``torch.cpu.current_stream()``: the trace runs
on CPU, where FSDP2's ``device_handle.stream(...)`` selects ``torch.cpu`` streams around its collectives, as it
selects CUDA streams on a GPU). The default stream is ``DEFAULT_STREAM`` (the event keeps three fields); any other is
numbered from 1 in order of first use, and the replay keeps a free pool per stream.

Host copies (offloaded activations) and paged optimizer state are outside torch's CUDA allocator and are not
recorded (the tracker does not report them). A storage resized in place (``track_resizes``) is a free and a new
allocation, as ``UntypedStorage.resize_`` is on CUDA.

The cuBLAS workspace: ``workspace_bytes`` is allocated once, right after the output of the first matmul (``mm``,
``addmm``, ``bmm``, ``baddbmm``), and never freed: ATen allocates it through the caching allocator when the first
cuBLAS call gets its handle (``aten/src/ATen/cuda/CublasHandlePool.cpp``, ``getCurrentCUDABlasHandle``), after the
output tensor, and keeps it for the handle's life.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from .caching_allocator import ALLOC, DEFAULT_STREAM, EMPTY_CACHE, FREE, RESET_PEAK

MATMUL_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm"})  # OpOverload.__name__ up to the first dot


class _Entry:
    """The key a live storage is recorded under (a resize or a rebind gives it a new one)."""

    __slots__ = ("key",)

    def __init__(self, key):
        self.key = key


class AllocationEvents(TorchDispatchMode):
    """Device allocation and free events in program order (module docstring)."""

    def __init__(self, workspace_bytes: int = 0):
        super().__init__()
        self.events: list[tuple] = []
        self.ops: dict = {}  # key -> the ATen op that allocated it (diagnostics)
        self.workspace_bytes = workspace_bytes
        self.workspace_key = None
        self._entries: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._next_key = 0
        self._streams: list = [torch.cpu.current_stream()]  # index = the stream's number; 0: the default stream

    # -- recording -------------------------------------------------------------------------------------------
    def new_key(self) -> int:
        key = self._next_key
        self._next_key += 1
        return key

    def allocated(self, storage, op: str = "") -> None:
        """A device storage came to life (ignored if already recorded)."""
        if storage in self._entries:
            return
        entry = _Entry(self.new_key())
        self._entries[storage] = entry
        self.events.append(self._alloc_event(entry.key, storage.nbytes()))
        self.ops[entry.key] = op
        weakref.finalize(storage, self._died, entry)
        if self.workspace_bytes and self.workspace_key is None and op.split(".")[0] in MATMUL_OPS:
            self.workspace_key = self.new_key()
            self.events.append((ALLOC, self.workspace_key, self.workspace_bytes))
            self.ops[self.workspace_key] = "cublas workspace"

    def resized(self, storage) -> None:
        """A recorded storage changed size in place: its old block is freed, a new one allocated (if not empty)."""
        entry = self._entries.get(storage)
        if entry is None:
            return
        if entry.key is not None:
            self.events.append((FREE, entry.key))
            entry.key = None
        nbytes = storage.nbytes()
        if nbytes:
            entry.key = self.new_key()
            self.events.append(self._alloc_event(entry.key, nbytes))
            self.ops[entry.key] = "resize_"

    def _alloc_event(self, key, nbytes: int) -> tuple:
        """``(ALLOC, key, nbytes)`` on the default stream, ``(ALLOC, key, nbytes, stream)`` on another."""
        current = torch.cpu.current_stream()
        for number, stream in enumerate(self._streams):
            if stream is current:
                break
        else:
            number = len(self._streams)
            self._streams.append(current)
        return (ALLOC, key, nbytes) if number == DEFAULT_STREAM else (ALLOC, key, nbytes, number)

    def key_of(self, storage):
        """The key a live storage is recorded under, or None."""
        entry = self._entries.get(storage)
        return None if entry is None else entry.key

    def rebind(self, storage, key) -> None:
        """From now on ``storage`` stands for the allocation ``key`` (its own block was freed by the caller): how a
        driver replaces a stand-in by what a real run allocates in its place."""
        self._entries[storage].key = key

    def mark(self, event: str) -> None:
        """``"empty_cache"`` or ``"reset_peak"`` at this point of the sequence."""
        if event not in (EMPTY_CACHE, RESET_PEAK):
            raise ValueError(f"unknown mark {event!r}: expected {EMPTY_CACHE} or {RESET_PEAK}")
        self.events.append((event,))

    def _died(self, entry: _Entry) -> None:
        if entry.key is not None:
            self.events.append((FREE, entry.key))
            entry.key = None

    # -- as a dispatch mode (the model build) ------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from .tracker import storages_of

        out = func(*args, **(kwargs or {}))
        outputs, _ = tree_flatten(out)
        for tensor in outputs:
            if hasattr(tensor, "untyped_storage") and tensor.device.type != "meta":
                for storage in storages_of(tensor):
                    self.allocated(storage, func.__name__)
        return out
