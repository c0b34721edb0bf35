"""Host RAM one node needs for a setup: the checkpoint as it loads, what the setup offloads (optimizer or
parameters, and ``--activation-offload``'s saved activations), and paged optimizer states."""

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
    activation_offload_bytes: int = 0  # --activation-offload: saved activations (or checkpointed inputs) on the host

    @property
    def total_bytes(self) -> int:
        return self.loading_bytes + self.offload_bytes + self.paged_optimizer_bytes + self.activation_offload_bytes


def host_ram(spec: ModelSpec, resolved: ResolvedSetup, breakdown: MemoryBreakdown) -> HostRam:
    """Host RAM per node of ``GPUS_PER_NODE`` GPUs.

    loading: the checkpoint in its load dtype (16-bit for QLoRA, which quantizes on the GPU) passes through host
      memory (page cache of the memory-mapped safetensors, then the tensors themselves): counted once per process
      that loads the full model: once per node under zero3/fsdp (rank 0 with ``cpu_ram_efficient_loading``,
      ``deepspeed.zero.Init``), once per GPU otherwise (assumption; an upper bound that keeps the node out of swap).
    offload: ``terms.distributed.host_offload_bytes_per_node`` for the setup's ``offload`` (DeepSpeed's own rule,
      or FSDP2's CPU shards); 0 without offload.
    paged: each GPU's paged optimizer states, all evicted at once.
    activation offload: each GPU's offloaded activations at the end of forward, the most the step puts on the host
      (``terms.activations.offloaded_saved``: the decoder layers' saved tensors, or under checkpointing each layer's
      input and rotary tables; pinned host memory, ``torch.autograd.graph.save_on_cpu(pin_memory=True)``).
    """
    setup = resolved.setup
    gpus_per_node = min(setup.num_gpus, GPUS_PER_NODE)
    load_bytes_per_param = 2 if setup.method is Method.QLORA else setup.precision.param_dtype.bits // 8
    loaders = 1 if setup.sharding in (Sharding.ZERO3, Sharding.FSDP) else gpus_per_node
    loading = spec.params * load_bytes_per_param * loaders
    offload = host_offload_bytes_per_node(spec, resolved)
    paged = breakdown.details["paged_optimizer_bytes"] * gpus_per_node
    activations_offloaded = activation_offload_bytes(spec, resolved) * gpus_per_node
    return HostRam(loading, offload, paged, activations_offloaded)


def activation_offload_bytes(spec: ModelSpec, resolved: ResolvedSetup) -> int:
    """One GPU's ``--activation-offload`` host bytes at the end of forward (0 without the option)."""
    setup = resolved.setup
    if not getattr(setup, "activation_offload", False):
        return 0
    from ..estimator import layer_setup
    from ..terms import activations

    b, s = setup.batch_size, setup.padded_seq_len
    sequences = b
    if setup.packing:
        b, s = 1, b * s
    masked = activations.attention_masked(spec, s, resolved.attn_used, setup.packing, sequences)
    return activations.offloaded_saved(spec, layer_setup(resolved), setup.grad_ckpt, masked).bytes(b, s)
