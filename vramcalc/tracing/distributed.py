"""One rank of a data-parallel job, traced on torch.distributed: FSDP2 (``fully_shard``) and DDP, as accelerate wraps
them for ``transformers.Trainer``.

Without GPUs or other processes the rank joins a *fake* process group (``torch.testing._internal.distributed.fake_pg``:
a ``FakeProcessGroup`` of any size whose collectives complete at once and move no data), so an 8-, 64- or 512-rank job
is traced in one CPU process: rank 0's shards have the sizes every rank's have (dim-0 shards are padded to
``ceil(rows / ranks)``, ``_fsdp_param.py``). Under ``torchrun`` (gloo on CPU) the same code runs on the real process
group and real tensors. There each collective hands the rank tensors that gloo's worker thread does not hold
(``MainThreadCollectives``), so they die when the rank drops them.

FSDP2, as ``accelerate.utils.fsdp_utils.fsdp2_prepare_model`` (accelerate 1.15) applies it:
- every decoder layer (the model's ``_no_split_modules``) is a unit; the input embedding is one; the final norm and
  lm_head (and the embedding when tied) form the tail unit, kept unsharded after forward
  (``reshard_after_forward=False``); the root unit takes what is left;
- QLoRA with ``--quant-storage bf16``: the packed 4-bit weights are frozen bf16 parameters and are sharded like any
  other; their quantization state stays a whole module attribute on every rank (``options.QuantStorage``); no fp32
  upcast of trainable parameters (accelerate skips it for a model holding ``Params4bit``);
- full-shard: ``reshard_after_forward=True``; shard-grad-op: ``False`` (parameters stay gathered from forward to
  backward, as FSDP1's SHARD_GRAD_OP);
- with mixed precision on (Trainer ``bf16=True``/``fp16=True``: every precision but fp32) trainable parameters are
  upcast to fp32 and ``MixedPrecisionPolicy(param_dtype=16-bit, reduce_dtype=16-bit, output_dtype=16-bit)`` gathers
  and reduces in 16 bits.
What the tracker sees of it (``AllocationTracker.attributing``):
- weights: the sharded parameters; everything ``foreach_all_gather`` and ``foreach_all_gather_copy_out`` allocate:
  the flat all-gather buffer of a unit (also the one prefetched for backward) and its unsharded parameters (freed
  and re-allocated in place by ``UntypedStorage.resize_``);
- gradients: the unsharded gradients autograd produced for a unit, and everything ``foreach_reduce`` allocates: the
  flat reduce-scatter input (kept until the next unit's reduce-scatter, ``reduce_scatter_states``), its output and
  the sharded gradients.

DDP, as accelerate's ``DistributedDataParallelKwargs`` defaults build it: ``bucket_cap_mb=25``,
``gradient_as_bucket_view=False``, ``find_unused_parameters=False``. The reducer's flat buckets (one copy of every
gradient, allocated at construction) are gradients. On the fake group: the parameter checks and the broadcast at
construction are skipped (they read tensor data), a comm hook stands in for the in-place all-reduce, and the buckets
are not rebuilt after the first step (rebuilding reorders them, at the same total size).

Gradient accumulation follows ``Accelerator.accumulate``: micro-batches before the last run in ``no_sync``
(DDP ``no_sync()``, FSDP2 ``set_requires_gradient_sync(False)``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..errors import VramcalcError
from ..facts import DDP_BUCKET_CAP_MB, half_dtype  # accelerate DistributedDataParallelKwargs.bucket_cap_mb
from ..options import FsdpShard, Method, Offload, Precision, QuantStorage, Sharding, Term
from ..training_setup import ResolvedSetup
from ..units import DType
from .step import base_model, decoder_layers
from .tracker import AllocationTracker

TRACED_SHARDINGS = (Sharding.DDP, Sharding.FSDP)



def upcast_trainable(params) -> None:
    """Trainable parameters to fp32 before ``fully_shard``, as accelerate does under mixed precision ("FSDP upcast of
    low precision parameters to fp32") and as torchtitan's fp32-built model has them; FSDP2's
    ``MixedPrecisionPolicy`` then gathers them in 16 bits."""
    for param in params:
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)


def check_traceable(resolved: ResolvedSetup) -> None:
    """The distributed setups the trace can run, or a one-line reason why not."""
    setup = resolved.setup
    if setup.sharding not in TRACED_SHARDINGS:
        raise VramcalcError(
            f"sharding {setup.sharding.value!r} is estimated, not traced: the trace runs torch's own engines "
            "(ddp, fsdp); DeepSpeed ZeRO needs DeepSpeed and a GPU (fsdp is ZeRO-3's torch counterpart)"
        )
    if setup.offload is not Offload.NONE:
        raise VramcalcError("offload is estimated, not traced: a CPU trace cannot tell host memory from GPU memory")
    if getattr(setup, "fsdp1_frozen_units", False):
        raise VramcalcError("--fsdp1-frozen-units is estimated, not traced: the trace runs FSDP2 (fully_shard), "
                            "whose hooks do not keep the recomputed inputs FSDP1's do")
    if setup.sharding is Sharding.FSDP and setup.method is Method.QLORA and setup.quant_storage is QuantStorage.UINT8:
        raise VramcalcError("qlora under fsdp with --quant-storage uint8 is estimated, not traced: accelerate leaves "
                            "non-floating Params4bit out of fully_shard; --quant-storage bf16 is traced")


@contextlib.contextmanager
def process_group(world_size: int):
    """The rank's process group: the one torchrun started, or a fake one of ``world_size`` ranks. Yields the rank."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() != world_size:
            raise VramcalcError(
                f"--num-gpus {world_size} does not match the process group's {dist.get_world_size()} ranks"
            )
        yield dist.get_rank()
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield 0
    finally:
        dist.destroy_process_group()


def is_fake_group() -> bool:
    return dist.get_backend() == "fake"


# -- a real process group's collectives: released by the rank's own thread ---------------------------------------
# (namespace, op): what each collective writes. "result": a functional collective's new output tensor(s);
# "first": a c10d collective's first argument (its output, or its in-place tensors), returned with a Work.
_COLLECTIVES = {
    **{("_c10d_functional", name): "result" for name in (
        "all_reduce", "all_reduce_coalesced", "all_gather_into_tensor", "all_gather_into_tensor_coalesced",
        "reduce_scatter_tensor", "reduce_scatter_tensor_coalesced", "all_to_all_single", "broadcast")},
    **{("c10d", name): "first" for name in (
        "allreduce_", "allreduce_coalesced_", "allgather_", "_allgather_base_", "allgather_coalesced_",
        "allgather_into_tensor_coalesced_", "reduce_scatter_", "_reduce_scatter_base_",
        "reduce_scatter_tensor_coalesced_", "broadcast_", "alltoall_", "alltoall_base_", "reduce_")},
}


class MainThreadCollectives(TorchDispatchMode):
    """Collectives on a real process group (gloo on CPU) that hold none of the rank's tensors once they return.

    gloo runs a collective on a worker thread (``ProcessGroupGloo::runLoop``): the thread completes the Work, which
    wakes the rank's thread, and only afterwards drops its own reference to the Work and with it to the collective's
    input and output tensors. When the rank's thread has dropped its references first, the tensors die whenever the
    worker thread next gets the CPU: later than the program frees them, by as many allocations as the scheduler lets
    the rank run meanwhile, on one rank and not the other. Seen in the two-rank TP trace: all-reduce outputs freed on
    the worker thread, up to tens of allocations late; and once, under load, one rank's peak of 14,187,520 bytes
    against 13,946,880: the live bytes right after step 0's log-softmax (12,614,656) plus that step's logits
    all-gather, its 1 MiB output and 512 KiB local input, still held by the worker. NCCL leaves these frees to the
    user's thread (``ProcessGroupNCCL::workEnqueue``: the watchdog's copy of a Work holds no outputs).

    So each collective runs on untracked copies of its tensors and is waited for, and its results are copied into
    the tensors the program sees, which only the program's own references hold: every rank's tracker counts the same
    allocations and frees at the same moments. Enter it outside (before) the tracker, so that the tracker sees a
    collective's results as its allocations and never the copies. Point-to-point ops (send/recv) run unchanged:
    waiting for a send before the peer posts its receive could deadlock.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        writes = _COLLECTIVES.get((func.namespace, func.__name__.split(".")[0]))
        if writes is None:
            return func(*args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        copies = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        copy_args, copy_kwargs = tree_unflatten(copies, spec)
        out = func(*copy_args, **copy_kwargs)
        if writes == "result":  # new tensors: wait, then hand over copies that no Work holds
            return tree_map(lambda t: torch.ops._c10d_functional.wait_tensor(t).clone()
                            if isinstance(t, torch.Tensor) else t, out)
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, torch.ScriptObject):  # the c10d Work
                dist.distributed_c10d.Work.unbox(leaf).wait()
        written, _ = tree_flatten(args[0])
        copied, _ = tree_flatten(copy_args[0])
        for original, copy in zip(written, copied):
            if isinstance(original, torch.Tensor):
                original.copy_(copy)
        originals = {id(copy): leaf for copy, leaf in zip(copies, leaves) if isinstance(leaf, torch.Tensor)}
        return tree_map(lambda t: originals.get(id(t), t) if isinstance(t, torch.Tensor) else t, out)


def main_thread_collectives():
    """``MainThreadCollectives`` on a real process group; nothing on the fake one (its collectives move no data and
    hold nothing)."""
    return contextlib.nullcontext() if is_fake_group() else MainThreadCollectives()


@dataclass
class DataParallel:
    """A wrapped model: what runs the forward, how a micro-batch skips synchronisation, and how the tracker
    attributes the engine's buffers while the step runs."""

    forward_module: nn.Module
    accumulation: Callable[[bool], contextlib.AbstractContextManager]
    attribution: Callable[[AllocationTracker], contextlib.AbstractContextManager] = field(
        default=lambda tracker: contextlib.nullcontext())


def wrap(model: nn.Module, resolved: ResolvedSetup, tracker: AllocationTracker, mesh=None) -> DataParallel:
    """Shard (FSDP2) or wrap (DDP) the model for the setup's engine. For DDP, call inside the tracker. ``mesh``:
    FSDP2's device mesh when it is not the whole world (``context_parallel.device_meshes``: ``dp_shard_cp``)."""
    if resolved.setup.sharding is Sharding.FSDP:
        return fully_shard_model(model, resolved, mesh)
    return wrap_ddp(model, tracker)


# -- FSDP2 --------------------------------------------------------------------------------------------------------
def mixed_precision_policy(resolved: ResolvedSetup):
    """accelerate ``FullyShardedDataParallelPlugin.set_mixed_precision``: 16-bit gather, reduce and output when
    Trainer's bf16/fp16 is on (the precision words that autocast); none under mixed precision "no" (fp32,
    bf16-true, fp16-true); QLoRA with a bf16 storage: transformers' override."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    setup = resolved.setup
    precision = setup.precision
    if setup.method is Method.QLORA and setup.quant_storage is QuantStorage.BF16:
        # transformers' update_fsdp_plugin_peft (5.25.0 distributed/fsdp.py:280-286): set_mixed_precision(storage
        # dtype, override=True), i.e. accelerate's MixedPrecisionPolicy(param_dtype, reduce_dtype), no output dtype
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    if not precision.autocast:
        return MixedPrecisionPolicy()
    dtype = torch.float16 if half_dtype(precision) is DType.FP16 else torch.bfloat16
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype, output_dtype=dtype)


def fully_shard_model(model: nn.Module, resolved: ResolvedSetup, mesh=None) -> DataParallel:
    """``fully_shard`` per decoder layer, the input embedding, the tail (final norm, lm_head) and the root, over
    ``mesh`` (default: a one-dimensional mesh of the whole world)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    setup = resolved.setup
    if mesh is None:
        with unset_fake_temporarily():  # the mesh's rank table is a real tensor
            mesh = init_device_mesh("cpu", (setup.num_gpus,))
    # accelerate: "FSDP upcast of low precision parameters to fp32" under mixed precision, skipped in a model
    # holding Params4bit (accelerate 1.16 utils/fsdp_utils.py:801: ``if accelerator.mixed_precision != "no" and not
    # model_has_params4bit``)
    if setup.precision.autocast and setup.method is not Method.QLORA:
        upcast_trainable(model.parameters())
    kwargs = dict(mesh=mesh, mp_policy=mixed_precision_policy(resolved),
                  reshard_after_forward=setup.fsdp_shard is FsdpShard.FULL_SHARD)
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    inner = base_model(model)
    embed, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    tied = embed is not None and head is not None and embed.weight is head.weight
    if not tied:
        fully_shard(embed, **kwargs)
    tail = [inner.model.norm] + ([embed] if tied else []) + [head]
    fully_shard(tail, **{**kwargs, "reshard_after_forward": False})
    fully_shard(model, mesh=mesh, mp_policy=kwargs["mp_policy"])

    def accumulation(last: bool):
        return _gradient_sync(model, last)

    return DataParallel(model, accumulation, fsdp_attribution)


def sharded_at_load(model: nn.Module) -> DataParallel:
    """A model transformers already sharded with FSDP2 at load time (``DistributedConfig`` with ``fsdp_size > 1``,
    ``apply_fully_sharded_data_parallelism``, distributed/fsdp.py:178-243): Trainer neither wraps nor shards it again
    (trainer.py:467-469, :1767-1772) and defers its gradient reduction with ``set_requires_gradient_sync(False)``
    (``_defer_fsdp_gradient_reduction``, :2655-2667). The FSDP2 root is the model under peft's wrappers."""
    from torch.distributed.fsdp import FSDPModule

    root = next(m for m in model.modules() if isinstance(m, FSDPModule))

    def accumulation(last: bool):
        return _gradient_sync(root, last)

    return DataParallel(model, accumulation, fsdp_attribution)


@contextlib.contextmanager
def _gradient_sync(model, last: bool):
    model.set_requires_gradient_sync(last)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@contextlib.contextmanager
def fsdp_attribution(tracker: AllocationTracker):
    """While the step runs, FSDP2's collectives allocate under the terms named in the module docstring."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group

    originals = {name: getattr(group, name) for name in ("foreach_all_gather", "foreach_all_gather_copy_out",
                                                           "foreach_reduce")}

    def gathering(function):
        def gather(*args, **kwargs):
            with tracker.attributing(Term.WEIGHTS):
                return function(*args, **kwargs)
        return gather

    def reduce(fsdp_params, unsharded_grads, *args, **kwargs):
        for grad in unsharded_grads:
            tracker.retag(grad, Term.GRADIENTS)
        with tracker.attributing(Term.GRADIENTS):
            return originals["foreach_reduce"](fsdp_params, unsharded_grads, *args, **kwargs)

    group.foreach_all_gather = gathering(originals["foreach_all_gather"])
    group.foreach_all_gather_copy_out = gathering(originals["foreach_all_gather_copy_out"])
    group.foreach_reduce = reduce
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(group, name, function)


# -- DDP ----------------------------------------------------------------------------------------------------------
class _Reducer:
    """The DDP reducer, with bucket rebuilding attributed to gradients (real group) or skipped (fake group)."""

    def __init__(self, reducer, tracker: AllocationTracker, fake: bool):
        object.__setattr__(self, "_reducer", reducer)
        object.__setattr__(self, "_tracker", tracker)
        object.__setattr__(self, "_fake", fake)

    def __getattr__(self, name):
        return getattr(self._reducer, name)

    def _rebuild_buckets(self) -> bool:
        if self._fake:
            return False  # sync_bucket_indices reads an index tensor's data
        with self._tracker.attributing(Term.GRADIENTS):
            return self._reducer._rebuild_buckets()


def _in_place_all_reduce(state, bucket):
    """Stands in for NCCL's in-place all-reduce on the fake group: the bucket is its own result."""
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def wrap_ddp(model: nn.Module, tracker: AllocationTracker) -> DataParallel:
    from torch.nn.parallel import DistributedDataParallel
    from torch.nn.parallel import distributed as ddp_module

    fake = is_fake_group()
    skipped = ("_verify_param_shape_across_processes", "_sync_module_states")
    originals = {name: getattr(ddp_module, name) for name in skipped}
    try:
        if fake:
            for name in skipped:
                setattr(ddp_module, name, lambda *args, **kwargs: None)
        with tracker.attributing(Term.GRADIENTS):
            wrapped = DistributedDataParallel(model, bucket_cap_mb=DDP_BUCKET_CAP_MB, gradient_as_bucket_view=False,
                                              find_unused_parameters=False)
    finally:
        for name, function in originals.items():
            setattr(ddp_module, name, function)
    if fake:
        wrapped.register_comm_hook(None, _in_place_all_reduce)
    wrapped.reducer = _Reducer(wrapped.reducer, tracker, fake)

    def accumulation(last: bool):
        return contextlib.nullcontext() if last else wrapped.no_sync()

    return DataParallel(wrapped, accumulation)
