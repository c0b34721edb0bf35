"""A dispatch-level allocation tracker: every storage an ATen op creates, while it lives, attributed to a term.

It follows torch's own ``torch.distributed._tools.mem_tracker.MemTracker``: a ``TorchDispatchMode`` sees each op's
outputs, keys new ``UntypedStorage`` objects in a weak dictionary, and a weakref callback subtracts them when they die.
Sizes are rounded up to CUDA's 512-byte granule (``_PYTORCH_MIN_ALLOCATE``). It runs on fake tensors (no memory) and on
real ones alike.

Attribution (the same terms as the estimate):
- ``weights``: parameters, buffers and quantization state registered before the step;
- ``gradients``: a parameter's ``.grad`` (found by a post-accumulate-grad hook and after backward);
- ``optimizer_states``: tensors the optimizer holds in ``optimizer.state`` after a step;
- ``logits``: anything allocated from lm_head's forward to the loss, and in backward until lm_head's gradient is done;
- ``activations``: forward allocations still alive when forward ends (autograd saved them, or checkpointing kept
  them), and decoder-layer recomputation under checkpointing;
- ``temporaries``: everything else: forward and backward transients, optimizer scratch, and casts or dequantized copies
  of parameters (autocast weight copies, bitsandbytes dequantized weights) even when autograd saves them.

A record's term can change after it is allocated (a backward tensor becomes a ``.grad``, a forward tensor becomes an
activation when forward ends); the peak snapshot keeps references to the live records, so the peak is reported
with each tensor's final role.

Distributed steps (``tracing/distributed.py``) add three things: tensor subclasses (DTensor parameters, gradients and
optimizer states of FSDP2) are counted by the plain tensors they wrap; ``attributing(term)`` gives everything a
collective's code allocates one role (FSDP2's all-gather buffers: weights; its reduce-scatter buffers: gradients;
DDP's gradient buckets: gradients); and with ``track_resizes`` a storage grown or freed in place by
``UntypedStorage.resize_`` (how FSDP2 frees and re-allocates unsharded parameters, ``_fsdp_param.py``
``free_storage``/``alloc_storage``) changes the live count, as torch's ``mem_tracker.MemTracker._track_resize`` does.

Host memory: allocations inside ``host()`` are the host copies of offloaded activations (``--activation-offload``,
``torch.autograd.graph.save_on_cpu``): kept out of the device count and counted in ``host_bytes`` (and its peak,
``host_peak_bytes``), as pinned host tensors are invisible to ``torch.cuda.max_memory_allocated``.

With ``events`` (``alloc_events.AllocationEvents``) it also reports every device storage it registers, and every
in-place resize, in order: the sequence ``caching_allocator.replay`` turns into the reserved memory.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _pop_mode, _push_mode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from ..options import Phase, Term
from ..units import CUDA_ALLOCATION_GRANULE_BYTES

TENSOR_TERMS = tuple(term for term in Term if term.is_tensor)

# Ops whose output, when their input is a parameter, is a copy of the weight rather than an activation.
_WEIGHT_COPY_OPS = {torch.ops.aten._to_copy.default, torch.ops.aten.clone.default}


try:  # (a torch built without distributed has no functional collectives)
    _WAIT_TENSOR = torch.ops._c10d_functional.wait_tensor.default
except (AttributeError, RuntimeError):
    _WAIT_TENSOR = None


def _dtensor_handler_tables() -> list[dict]:
    """The tables of DTensor's custom op handlers that the contexts which use them install from (read when entered):
    torch's ring attention (``context_parallel``: ``_context_parallel/_attention.py`` ``custom_ops``, installed by
    ``_enable_cp_dtensor_dispatcher``) and loss parallelism (``loss_parallel``: ``tensor/parallel/loss.py``
    ``customized_loss_ops``). Empty without torch.distributed."""
    tables = []
    try:
        from torch.distributed.tensor.experimental._context_parallel import _attention

        tables.append(_attention.custom_ops)
    except (ImportError, AttributeError):
        pass
    try:
        from torch.distributed.tensor.parallel import loss

        tables.append(loss.customized_loss_ops)
    except (ImportError, AttributeError):
        pass
    return tables


class _Record:
    """One live storage."""

    __slots__ = ("nbytes", "term", "region", "weight_copy", "paged", "host", "op")

    def __init__(self, nbytes: int, term: Term, region: str, weight_copy: bool = False, op: str = ""):
        self.nbytes = nbytes
        self.op = op  # the ATen op that allocated it (for diagnostics)
        self.term = term
        self.region = region  # "forward", "backward", "optimizer", "setup"
        self.weight_copy = weight_copy
        self.paged = False  # in CUDA unified memory, outside torch's allocator
        self.host = False  # an offloaded activation's host copy (pinned CPU memory)


def storages_of(tensor: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages a tensor holds: its own, or those of the plain tensors inside a subclass (DTensor)."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        inner = [getattr(tensor, name) for name in names]
        return [storage for t in inner if isinstance(t, torch.Tensor) for storage in storages_of(t)]
    return [tensor.untyped_storage()]


@dataclass
class PeakSnapshot:
    total_bytes: int = 0
    phase: Phase = Phase.FORWARD
    step: int = 0
    terms: dict[Term, int] = field(default_factory=lambda: {term: 0 for term in TENSOR_TERMS})


class AllocationTracker(TorchDispatchMode):
    """Counts live storage bytes by term, and the peak over everything it saw.

    The driver tells it where the step is: ``phase``, ``step``, ``in_logits``, ``in_recompute``, ``in_optimizer``,
    and calls ``end_forward()``, ``mark_gradients()``, ``mark_optimizer_states()`` at those moments.
    """

    def __init__(self, round_to: int = CUDA_ALLOCATION_GRANULE_BYTES, track_resizes: bool = False, events=None):
        super().__init__()
        self.round_to = round_to
        self.track_resizes = track_resizes
        self.events = events  # an alloc_events.AllocationEvents: the device allocations in order, for the replay
        self._role: Term | None = None  # attributing(): the term of every new allocation
        self._original_resize = None
        self._records: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._live: dict[int, _Record] = {}  # id(record) -> record, for snapshots
        self.live_bytes = 0
        self.live_by_term = {term: 0 for term in TENSOR_TERMS}
        self.peak = PeakSnapshot()
        self._peak_records: list[tuple[_Record, int]] | None = None
        self._peak_pending = False
        self.phase = Phase.FORWARD
        self.step = 0
        self.in_logits = False
        self.in_recompute = False
        self.in_optimizer = False
        self.after_previous = False  # a forward beside what the loop still holds of the micro-batch before (litgpt)
        self._param_storages: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.step_peaks: dict[int, int] = {}
        self.phase_peaks: dict[Phase, int] = {}  # the largest live total seen in each phase
        self.paged_bytes = 0
        self.in_paged = False
        self.host_bytes = 0  # offloaded activations in host memory now
        self.host_peak_bytes = 0
        self.in_host = False
        self._handler_tables: list = []  # (table, original entries) of the DTensor handlers seen through
        self._propagating = False  # inside DTensor's sharding propagation (``_see_dtensor_handlers``)
        self._entered = 0  # ``with tracker`` depth: the handlers are wrapped from the first entry to the last exit

    # -- bookkeeping -------------------------------------------------------------------------------
    def _size(self, storage: torch.UntypedStorage) -> int:
        n = storage.nbytes()
        if self.round_to > 1:
            n = -(-n // self.round_to) * self.round_to
        return n

    def _add(self, storage: torch.UntypedStorage, term: Term, region: str, weight_copy: bool = False,
             op: str = "") -> _Record:
        record = _Record(self._size(storage), term, region, weight_copy, op)
        self._records[storage] = record
        if self.in_host:
            record.host = True
            record.term = Term.ACTIVATIONS
            self.host_bytes += record.nbytes
            self.host_peak_bytes = max(self.host_peak_bytes, self.host_bytes)
            weakref.finalize(storage, self._free, record)
            return record
        if self.in_paged:
            record.paged = True
            record.term = Term.OPTIMIZER_STATES
            self.paged_bytes += record.nbytes
            weakref.finalize(storage, self._free, record)
            return record
        self._live[id(record)] = record
        weakref.finalize(storage, self._free, record)
        if self.events is not None:
            self.events.allocated(storage, op)
        self.live_bytes += record.nbytes
        self.live_by_term[term] += record.nbytes
        self._grown()
        return record

    @property
    def reported_phase(self) -> Phase:
        """``phase``, but a forward that runs beside the previous micro-batch's leftovers is ``NEXT_FORWARD``."""
        return Phase.NEXT_FORWARD if self.phase is Phase.FORWARD and self.after_previous else self.phase

    def _grown(self) -> None:
        """Update the peaks after the live total rose."""
        phase = self.reported_phase
        if self.live_bytes > self.peak.total_bytes:
            self.peak.total_bytes = self.live_bytes
            self.peak.phase = phase
            self.peak.step = self.step
            self._peak_pending = True
        if self.live_bytes > self.step_peaks.get(self.step, 0):
            self.step_peaks[self.step] = self.live_bytes
        if self.live_bytes > self.phase_peaks.get(phase, 0):
            self.phase_peaks[phase] = self.live_bytes

    def _free(self, record: _Record) -> None:
        if record.host:
            self.host_bytes -= record.nbytes
            return
        if record.paged:
            self.paged_bytes -= record.nbytes
            return
        if self._peak_pending:
            self._take_snapshot()
        self._live.pop(id(record), None)
        self.live_bytes -= record.nbytes
        self.live_by_term[record.term] -= record.nbytes

    def _take_snapshot(self) -> None:
        self._peak_records = [(record, record.nbytes) for record in self._live.values()]
        self._peak_pending = False

    def _resized(self, storage: torch.UntypedStorage) -> None:
        """A storage changed size in place: count its new size (a known storage only)."""
        record = self._records.get(storage)
        if record is None or record.paged or record.host:
            return
        delta = self._size(storage) - record.nbytes
        if self.events is not None:
            self.events.resized(storage)
        if delta < 0 and self._peak_pending:
            self._take_snapshot()
        record.nbytes += delta
        self.live_bytes += delta
        self.live_by_term[record.term] += delta
        if delta > 0:
            self._grown()

    def _retag(self, record: _Record, term: Term) -> None:
        if record.term is not term and not record.paged and not record.host:
            self.live_by_term[record.term] -= record.nbytes
            self.live_by_term[term] += record.nbytes
            record.term = term

    def record_of(self, tensor: torch.Tensor) -> _Record | None:
        return self._records.get(storages_of(tensor)[0])

    def retag(self, tensor: torch.Tensor, term: Term) -> None:
        """Give a tensor's storage its final role (registering it if the tracker never saw it)."""
        for storage in storages_of(tensor):
            record = self._records.get(storage)
            if record is None:
                self._add(storage, term, "setup")
            else:
                self._retag(record, term)

    @contextlib.contextmanager
    def attributing(self, term: Term):
        """Everything allocated inside belongs to ``term`` (a collective's buffers), whatever the phase."""
        outer, self._role = self._role, term
        try:
            yield
        finally:
            self._role = outer

    def _see_dtensor_handlers(self) -> None:
        """DTensor dispatches an op with a custom handler (torch's ring attention, loss parallelism) below this mode:
        the tracker sees the op's DTensor output only, not what the handler allocates on the local tensors on its
        way (the ring's all-gathered K/V and fp32 accumulators, the loss's fp32 [T, V/T] steps), since a dispatch
        mode is off while its own ``__torch_dispatch__`` runs the op. Each handler is wrapped to run with the
        tracker pushed again, so those allocations are counted like any other op's (its final output is then
        known already, and not counted twice)."""
        tracker = self

        def seen(handler):
            def handler_under_tracker(op_call, args, kwargs):
                _push_mode(tracker)
                try:
                    return handler(op_call, args, kwargs)
                finally:
                    _pop_mode()

            handler_under_tracker.vramcalc_original = handler
            return handler_under_tracker

        for table in _dtensor_handler_tables():
            original = dict(table)
            table.update({op: seen(handler) for op, handler in original.items()
                          if not hasattr(handler, "vramcalc_original")})
            self._handler_tables.append((table, original))
        # a handler propagates shardings (``_sharding_prop.py`` ``_propagate_tensor_meta_non_cached``) by running the
        # op on fake tensors of the global shapes (``gen_fake_args``: ``empty_strided``), which hold no device memory
        # on a GPU: the tracker ignores what is made there
        try:
            from torch.distributed.tensor._sharding_prop import ShardingPropagator
        except ImportError:
            return
        propagate = ShardingPropagator._propagate_tensor_meta_non_cached

        def propagate_untracked(propagator, *args, **kwargs):
            outer, tracker._propagating = tracker._propagating, True
            try:
                return propagate(propagator, *args, **kwargs)
            finally:
                tracker._propagating = outer

        ShardingPropagator._propagate_tensor_meta_non_cached = propagate_untracked
        self._handler_tables.append((ShardingPropagator, propagate))

    def _restore_dtensor_handlers(self) -> None:
        for table, original in reversed(self._handler_tables):
            if isinstance(table, dict):
                table.update(original)
            else:
                table._propagate_tensor_meta_non_cached = original
        self._handler_tables = []

    def __enter__(self):
        self._entered += 1
        if self._entered == 1:
            self._see_dtensor_handlers()
        if self.track_resizes:
            original = self._original_resize = torch.UntypedStorage.resize_
            tracker = self

            def resize_(storage, size):
                out = original(storage, size)
                tracker._resized(storage)
                return out

            torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        self._entered -= 1
        if self._entered == 0:
            self._restore_dtensor_handlers()
        try:
            return super().__exit__(*exc)
        finally:
            if self._original_resize is not None:
                torch.UntypedStorage.resize_ = self._original_resize
                self._original_resize = None

    @contextlib.contextmanager
    def paged(self):
        """Allocations inside are CUDA unified memory (bitsandbytes paged optimizer state): outside torch's
        allocator, so out of the live count; they are counted in ``paged_bytes``."""
        self.in_paged = True
        try:
            yield
        finally:
            self.in_paged = False

    @contextlib.contextmanager
    def host(self):
        """Allocations inside are host memory (an offloaded activation's copy): out of the device count, counted
        in ``host_bytes``."""
        outer, self.in_host = self.in_host, True
        try:
            yield
        finally:
            self.in_host = outer

    def is_weight(self, tensor: torch.Tensor) -> bool:
        """Is the tensor (or a view of it) a parameter, buffer or quantization state registered as a weight?"""
        return any(storage in self._param_storages for storage in storages_of(tensor))

    # -- the moments the driver reports ---------------------------------------------------------------
    def register_weights(self, tensors) -> None:
        for tensor in tensors:
            self.retag(tensor, Term.WEIGHTS)
            for storage in storages_of(tensor):
                self._param_storages[storage] = True

    def end_forward(self) -> None:
        """Forward allocations still alive now are activations (autograd or checkpointing holds them)."""
        for record in self._live.values():
            if record.region == "forward" and record.term is Term.TEMPORARIES and not record.weight_copy:
                self._retag(record, Term.ACTIVATIONS)
            record.region = "kept" if record.region == "forward" else record.region

    def mark_gradients(self, params) -> None:
        for param in params:
            if param.grad is not None:
                self.retag(param.grad, Term.GRADIENTS)

    def mark_optimizer_states(self, optimizer: torch.optim.Optimizer) -> None:
        leaves, _ = tree_flatten([dict(state) for state in optimizer.state.values()])
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                self.retag(leaf, Term.OPTIMIZER_STATES)

    def live_records(self) -> list[_Record]:
        return list(self._live.values())

    def peak_terms(self) -> dict[Term, int]:
        """Bytes per term at the peak, each tensor under its final role."""
        if self._peak_pending:
            self._take_snapshot()
        terms = {term: 0 for term in TENSOR_TERMS}
        for record, nbytes in self._peak_records or []:
            if not record.paged and not record.host:
                terms[record.term] += nbytes
        return terms

    # -- dispatch ------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if _WAIT_TENSOR is not None and func is _WAIT_TENSOR and isinstance(args[0], torch.Tensor):
            # a functional collective's wait returns the tensor it waited on (``wait_tensor`` in
            # ``_c10d_functional``: the same storage on CUDA and gloo); FakeTensorMode's own result is a new fake
            # tensor, which would hold the collective's output twice until the waited one is dropped
            return args[0]
        outputs, _ = tree_flatten(out)
        # (a meta tensor holds no memory: transformers' TP builds one to read a stride, tensor_parallel.py:126)
        if self._propagating:
            return out
        new = [s for t in outputs if isinstance(t, torch.Tensor) and t.device.type != "meta" for s in storages_of(t)
               if s not in self._records]
        if not new:
            return out
        if self._role is not None:
            self._add_all(new, self._role, "collective", False, func.__name__)
            return out
        if self.in_optimizer:
            region, term = "optimizer", Term.TEMPORARIES
        elif self.phase is Phase.FORWARD:
            region, term = "forward", Term.LOGITS if self.in_logits else Term.TEMPORARIES
        else:
            region = "backward"
            term = Term.LOGITS if self.in_logits else Term.ACTIVATIONS if self.in_recompute else Term.TEMPORARIES
        weight_copy = func in _WEIGHT_COPY_OPS and self._touches_param(args)
        if weight_copy:
            term = Term.TEMPORARIES
        self._add_all(new, term, region, weight_copy, func.__name__)
        return out

    def _add_all(self, storages, term: Term, region: str, weight_copy: bool, op: str) -> None:
        for storage in storages:
            if storage not in self._records:
                self._add(storage, term, region, weight_copy, op)

    def _touches_param(self, args) -> bool:
        leaves, _ = tree_flatten(args)
        return any(isinstance(t, torch.Tensor) and any(s in self._param_storages for s in storages_of(t))
                   for t in leaves)
