"""One rank of a context-parallel job (``--cp C``), traced through torch's own ring attention on a fake process group.

What runs is what transformers' Trainer runs with accelerate's ``ParallelismConfig(dp_shard_size=D, cp_size=C)``
(transformers 5.25.0, accelerate 1.16, torch 2.13; ``--num-gpus`` N = D x C, D = 1 when N = C):
- the device mesh (``device_meshes``): with D = 1, the trace's original one-ring setup: FSDP2 over a one-dimensional
  mesh of the whole world and a one-dimensional ``cp`` mesh for the ring (accelerate's ``dp_shard_cp`` is then the
  ``cp`` dimension, the whole world). With D > 1, accelerate's own ``ParallelismConfig.build_device_mesh``
  (parallelism_config.py:210-240) on the fake group: ``init_device_mesh("cpu", (D, C), mesh_dim_names=("dp_shard",
  "cp"))`` in the canonical order of ``_get_mesh`` (:256-268: dp_replicate, dp_shard, cp, sp, tp), with ``dp_shard``
  and ``cp`` flattened into ``dp_shard_cp`` (:235-236, dimension names :134-142);
- the model is FSDP2-sharded (``tracing/distributed.py``) over ``mesh[fsdp_dim_names]`` = ``dp_shard_cp``
  (parallelism_config.py:156-163, as ``fsdp2_prepare_model`` passes it, utils/fsdp_utils.py:769): D x C ranks, so a
  rank holds 1/(D·C) of the parameters, gradients and optimizer states; and accelerate's
  ``_attach_context_parallel_hooks`` (big_modeling.py:768-815) drops every ``self_attn``'s attention mask for
  ``is_causal=True``, as ``Accelerator._prepare_cp`` does (accelerator.py:1628-1641);
- each micro-batch, forward and backward, runs inside torch's ``context_parallel`` context manager
  (_context_parallel/_attention.py:1515-1601) on the ``cp`` mesh dimension only (``mesh=self.torch_device_mesh["cp"]``,
  accelerator.py:1635): the ring's all-gathers and all-to-alls span C ranks, not the world; with the rotate method
  accelerate sets from ``cp_comm_strategy`` (default "allgather", ``set_rotate_method``), and with Trainer's buffers
  (``_prepare_context_parallel_inputs``, trainer.py:2438-2530): ``input_ids`` and the ``position_ids`` it builds
  (``arange(s).expand(b, -1)``), sharded in place by the head-tail load balancer and not restored; each of the D
  data-parallel rings runs its own batch (accelerate data_loader.py:1143-1152), so a rank's batch is ``--batch-size``;
- inside it, torch replaces ``F.scaled_dot_product_attention`` with a wrapper that makes q, k, v ``Shard(2)``
  DTensors, and DTensor dispatches the CUDA flash kernel that the trace's CUDA emulation calls
  (``cuda_emulation.cuda_sdpa``: ``aten._scaled_dot_product_flash_attention``) to ``_sdpa_handler`` (:897-934), i.e.
  the real ``_templated_ring_attention`` and its backward: their all-gathers, all-to-alls (``ft_c`` functional
  collectives on the fake group: outputs allocated, no data moved), fp32 merges and accumulators are traced as a GPU
  rank allocates them. The CPU SDPA op (``aten._scaled_dot_product_flash_attention_for_cpu``) would not be
  dispatched: it is not in ``_sdpa_handler``'s table ("CP only supports flash attention and memory efficient
  attention now").

The ring runs inside DTensor's own dispatch, below the tracker's dispatch mode: the tracker wraps DTensor's custom
handlers to count what they allocate (``tracker.AllocationTracker._see_dtensor_handlers``; before session 35 it saw
the SDPA op's output only, not the all-gathered K/V, the fp32 accumulators or the all-to-all buffers).

One adaptation: torch patches the function it finds under ``F.scaled_dot_product_attention`` by its ``__name__``
(``_distribute_function``, :958-989: ``setattr(fn_module, fn.__name__, wrapper_fn)``); the CUDA emulation's function
is named ``cuda_sdpa``, so the tracer puts it there under the builtin's name for the duration of the context.
Departures: the fake group makes every rank rank 0, so the traced rank is the first of the ring and of the mesh (for
i > 0 it runs the second half of its queries, _attention.py:451-473); the model's loss shifts the sharded ``labels``
itself where Trainer passes pre-shifted ``shift_labels`` (the same [b, s/C, V] logits; one [b, s/C + 1] index tensor
less).
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import VramcalcError

ROTATE_METHOD = "allgather"  # accelerate TorchContextParallelConfig.cp_comm_strategy default (utils/dataclasses.py:2098-2107)


def dp_shard_degree(setup) -> int:
    """D: the data-parallel ranks beside each ring (accelerate's ``dp_shard_size``; N = D x C x tp)."""
    return setup.num_gpus // (setup.cp * setup.tp)


def check_traceable(spec, resolved) -> None:
    """The context-parallel setups the trace runs: dp_shard x cp (``--num-gpus`` = D x C), without --tp."""
    setup = resolved.setup
    if setup.tp > 1:
        raise VramcalcError(f"--cp {setup.cp} with --tp {setup.tp} is estimated, not traced: the trace runs "
                            "dp_shard x cp meshes (--num-gpus a multiple of --cp, no --tp)")


def device_meshes(setup):
    """(FSDP2's mesh or None for the whole world's, the ring's ``cp`` mesh), built on the current process group as
    accelerate builds them (module docstring). D = 1: FSDP2 over the world (``fully_shard_model``'s own mesh) and a
    one-dimensional ``cp`` mesh. D > 1: accelerate's ``ParallelismConfig(dp_shard_size=D, cp_size=C)`` 2-D mesh,
    FSDP2 over its flattened ``dp_shard_cp``, the ring over its ``cp``."""
    import warnings

    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.device_mesh import init_device_mesh

    dp_shard = dp_shard_degree(setup)
    with unset_fake_temporarily():  # the mesh's rank table is a real tensor
        if dp_shard == 1:
            return None, init_device_mesh("cpu", (setup.cp,), mesh_dim_names=("cp",))
        from accelerate.parallelism_config import ParallelismConfig

        config = ParallelismConfig(dp_shard_size=dp_shard, cp_size=setup.cp)
        mesh = config.build_device_mesh("cpu")
        with warnings.catch_warnings():  # torch 2.13: "Slicing a flattened dim from root mesh will be deprecated"
            warnings.simplefilter("ignore", UserWarning)
            return mesh[tuple(config.fsdp_dim_names)], mesh["cp"]


@contextlib.contextmanager
def _builtin_named_sdpa():
    """The current ``F.scaled_dot_product_attention`` (the CUDA emulation's) under the builtin's ``__name__``, so
    that torch's ``_distribute_function`` patches and restores ``F.scaled_dot_product_attention`` itself."""
    import torch.nn.functional as F

    emulated = F.scaled_dot_product_attention

    def scaled_dot_product_attention(*args, **kwargs):
        return emulated(*args, **kwargs)

    F.scaled_dot_product_attention = scaled_dot_product_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = emulated


def ring_tracer(base):
    """``base`` (a ``StepTracer`` class) whose micro-batches run inside torch's ``context_parallel``."""

    class ContextParallelTracer(base):
        def run(self, steps: int = 2, progress=None) -> None:
            from accelerate.big_modeling import _attach_context_parallel_hooks

            if getattr(self, "cp_mesh", None) is None:  # the engine sets the job's (device_meshes); alone: D = 1
                self.cp_mesh = device_meshes(self.setup)[1]
            _attach_context_parallel_hooks(self.model)
            outer = self.accumulation
            self.accumulation = lambda last: self._ring_micro_batch(outer(last))
            super().run(steps, progress)

        @contextlib.contextmanager
        def _ring_micro_batch(self, synchronised):
            from torch.distributed.tensor.experimental import context_parallel
            from torch.distributed.tensor.experimental._attention import set_rotate_method

            set_rotate_method(ROTATE_METHOD)
            setup = self.setup
            ids = torch.zeros(setup.batch_size, setup.seq_len, dtype=torch.long)
            positions = torch.arange(setup.seq_len).expand(setup.batch_size, -1)  # trainer.py:2472-2474
            self._cp_inputs = (ids, positions)
            with synchronised, _builtin_named_sdpa(), context_parallel(
                    self.cp_mesh, buffers=[ids, positions], buffer_seq_dims=[1, 1],
                    no_restore_buffers={ids, positions}):
                yield
            self._cp_inputs = None

        def _loss(self, input_ids, position_ids=None):
            ids, positions = self._cp_inputs  # the rank's shard of Trainer's buffers
            return super()._loss(ids, positions)

    ContextParallelTracer.__name__ = f"ContextParallel{base.__name__}"
    return ContextParallelTracer
