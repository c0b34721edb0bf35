"""Host RAM one node needs for a setup: the checkpoint as it loads, what the setup offloads, and paged optimizer
states."""

from __future__ import annotations

from dataclasses import dataclass

from ..breakdown import MemoryBreakdown
from ..facts import GPUS_PER_NODE
from ..model import ModelSpec
from ..options import Method, Sharding
from ..terms.distributed import host_offload_bytes_per_node
from ..training_setup import ResolvedSetup


@dataclass(frozen=True)
class HostRam:
    """Host memory one node needs (bytes)."""

    loading_bytes: int  # the checkpoint as loaded, once per process that loads it
    offload_bytes: int  # what the setup's --offload puts on the host (terms/distributed.py)
    paged_optimizer_bytes: int  # bitsandbytes paged states, when evicted from the GPU

    @property
    def total_bytes(self) -> int:
        return self.loading_bytes + self.offload_bytes + self.paged_optimizer_bytes


def host_ram(spec: ModelSpec, resolved: ResolvedSetup, breakdown: MemoryBreakdown) -> HostRam:
    """Host RAM per node of ``GPUS_PER_NODE`` GPUs.

    loading: the checkpoint in its load dtype (16-bit for QLoRA, which quantizes on the GPU) passes through host
      memory (page cache of the memory-mapped safetensors, then the tensors themselves): counted once per process
      that loads the full model: once per node under zero3/fsdp (rank 0 with ``cpu_ram_efficient_loading``,
      ``deepspeed.zero.Init``), once per GPU otherwise (assumption; an upper bound that keeps the node out of swap).
    offload: ``terms.distributed.host_offload_bytes_per_node`` for the setup's ``offload`` (DeepSpeed's own rule,
      or FSDP2's CPU shards); 0 without offload.
    paged: each GPU's paged optimizer states, all evicted at once.
    """
    setup = resolved.setup
    gpus_per_node = min(setup.num_gpus, GPUS_PER_NODE)
    load_bytes_per_param = 2 if setup.method is Method.QLORA else setup.precision.param_dtype.bits // 8
    loaders = 1 if setup.sharding in (Sharding.ZERO3, Sharding.FSDP) else gpus_per_node
    loading = spec.params * load_bytes_per_param * loaders
    offload = host_offload_bytes_per_node(spec, resolved)
    paged = breakdown.details["paged_optimizer_bytes"] * gpus_per_node
    return HostRam(loading, offload, paged)
