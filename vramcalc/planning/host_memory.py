"""Host RAM one node needs for a setup: the checkpoint as it loads, what the setup offloads (optimizer or
parameters, and ``--activation-offload``'s saved activations), paged optimizer states, and a checkpoint save.

Two moments, never at once: loading (before the first step; the host copies are gone once the weights are on the GPU)
and training (offload buffers, paged states and offloaded activations live, and a checkpoint save adds its host copy).
The node needs the larger of the two.
"""

from __future__ import annotations

from dataclasses import dataclass

# transformers ``PreTrainedModel.save_pretrained(max_shard_size="50GB")`` (modeling_utils.py:3327 @5.25.0); "GB" is
# 10^9 bytes (huggingface_hub ``parse_size_to_int``)
SAVE_PRETRAINED_MAX_SHARD_BYTES = 50 * 10**9

from ..breakdown import MemoryBreakdown
from ..facts import GPUS_PER_NODE
from ..model import ModelSpec
from ..options import LoadPath, Method, Sharding
from ..terms.distributed import host_offload_bytes_per_node
from ..terms.parameters import stored_tensors
from ..training_setup import ResolvedSetup


@dataclass(frozen=True)
class HostRam:
    """Host memory one node needs (bytes)."""

    loading_bytes: int  # the checkpoint as loaded, once per process that loads it
    offload_bytes: int  # what the setup's --offload puts on the host (terms/distributed.py)
    paged_optimizer_bytes: int  # bitsandbytes paged states, when evicted from the GPU
    activation_offload_bytes: int = 0  # --activation-offload: saved activations (or checkpointed inputs) on the host
    saving_bytes: int = 0  # a checkpoint save: what its writers hold on the host at once

    @property
    def training_bytes(self) -> int:
        """What the node holds while it trains and saves (everything but loading)."""
        return self.offload_bytes + self.paged_optimizer_bytes + self.activation_offload_bytes + self.saving_bytes

    @property
    def total_bytes(self) -> int:
        """The node's need: the larger of loading and training (they never overlap, module docstring)."""
        return max(self.loading_bytes, self.training_bytes)


def host_ram(spec: ModelSpec, resolved: ResolvedSetup, breakdown: MemoryBreakdown) -> HostRam:
    """Host RAM per node of ``GPUS_PER_NODE`` GPUs.

    loading (``loading_bytes``), once per process that loads the full model: once per node under zero3/fsdp (rank 0
      with ``cpu_ram_efficient_loading``, ``deepspeed.zero.Init``), once per GPU otherwise (assumption).
      - A quantized base loaded tensor by tensor (``--load per-tensor``, transformers): bitsandbytes sets
        ``device_map={"": torch.cuda.current_device()}`` when none is given (``quantizers/quantizer_bnb_4bit.py:94-97``
        @5.25.0), so each checkpoint tensor is read from the memory-mapped safetensors and goes to the GPU on its
        own: the host holds the largest tensor's 16-bit copy (the file's pages are reclaimable page cache).
      - Otherwise the model is built on the host in its load dtype (``from_pretrained`` without ``device_map``; the
        Trainer then moves it, ``model.to(args.device)``; torchtune and Lightning read the full state dict): the
        whole checkpoint (16-bit; fp32 under mixed precision).
    offload: ``terms.distributed.host_offload_bytes_per_node`` for the setup's ``offload`` (DeepSpeed's own rule,
      or FSDP2's CPU shards); 0 without offload.
    paged: each GPU's paged optimizer states, all evicted at once.
    activation offload: each GPU's offloaded activations at the end of forward, the most the step puts on the host
      (``terms.activations.offloaded_saved``: the decoder layers' saved tensors, or under checkpointing each layer's
      input and rotary tables; pinned host memory, ``torch.autograd.graph.save_on_cpu(pin_memory=True)``).
    saving: ``checkpoint_save_bytes`` (one node, the most a save holds on the host).
    Not terms: data-loader workers (the Trainer's ``dataloader_num_workers`` defaults to 0; a batch of token ids is
    kilobytes) and the optimizer's own checkpoint under DDP/ZeRO-1/2 (``torch.save`` copies one storage at a time to
    the host, ``torch/serialization.py`` ``_save``).
    """
    setup = resolved.setup
    gpus_per_node = min(setup.num_gpus, GPUS_PER_NODE)
    loaders = 1 if setup.sharding in (Sharding.ZERO3, Sharding.FSDP) else gpus_per_node
    loading = loading_bytes_per_process(spec, resolved) * loaders
    offload = host_offload_bytes_per_node(spec, resolved)
    paged = breakdown.details["paged_optimizer_bytes"] * gpus_per_node
    activations_offloaded = activation_offload_bytes(spec, resolved) * gpus_per_node
    return HostRam(loading, offload, paged, activations_offloaded, checkpoint_save_bytes(spec, resolved, breakdown))


_NOT_LOADED = ("adapter", "prompt")  # created by peft, not read from the checkpoint


def loading_bytes_per_process(spec: ModelSpec, resolved: ResolvedSetup) -> int:
    """Host bytes one loading process holds (``host_ram`` docstring): the largest checkpoint tensor in 16 bits when
    a quantized base streams to the GPU tensor by tensor, else the whole checkpoint in its load dtype."""
    setup = resolved.setup
    tensors = stored_tensors(spec, resolved)
    streams = setup.load is LoadPath.PER_TENSOR and any(t.kind == "quantized" for t in tensors)
    if streams:
        return max(2 * t.numel for t in tensors if t.kind not in _NOT_LOADED)
    load_bytes_per_param = 2 if setup.method is Method.QLORA else setup.precision.param_dtype.bits // 8
    return spec.params * load_bytes_per_param


def checkpoint_save_bytes(spec: ModelSpec, resolved: ResolvedSetup, breakdown: MemoryBreakdown) -> int:
    """Host bytes one node holds while a checkpoint is written (HF Trainer ``save_model`` / ``_save_checkpoint``).

    none/ddp/zero1/zero2: the main process calls ``save_pretrained`` on the trained weights (peft: the adapter only;
      full fine-tuning: every weight as stored). Each shard's tensors are copied to the host
      (``safetensors.torch._to_ndarray``: ``tensor.to("cpu")``, safetensors 0.8.0) and held until the shard is
      written (transformers ``modeling_utils.py:3600-3630`` @5.25.0): min(saved bytes, ``max_shard_size`` 50 GB).
    zero3: ``Trainer.save_model`` gathers a consolidated 16-bit state dict on rank 0's host
      (``_zero3_consolidated_16bit_state_dict``; with peft only the trainable tensors,
      ``exclude_frozen_parameters=True``; transformers ``trainer.py:4155-4165`` @5.25.0): 2 bytes per saved weight.
    fsdp (FSDP2 through accelerate): the default ``SHARDED_STATE_DICT`` sets ``ShardedStateDictConfig(offload_to_cpu
      =True)`` (``accelerate/utils/dataclasses.py:1914-1933`` @1.16.0), so each rank copies its shard of the weights
      and of the optimizer states to the host for ``torch.distributed.checkpoint`` (``save_fsdp_model`` /
      ``save_fsdp_optimizer``, transformers ``trainer.py:3606-3614`` @5.25.0): per GPU, the saved weights / the
      GPUs plus its ``optimizer_states`` term, times the node's GPUs. The Trainer passes ``adapter_only=True``
      (``distributed/fsdp.py:252-264``), so a peft model saves its adapter only (accelerate ``_get_model_state_dict``).
    """
    setup = resolved.setup
    saved = [t for t in stored_tensors(spec, resolved) if t.trainable]
    if setup.sharding is Sharding.FSDP:
        weights_shard = sum(t.total_bytes for t in saved) // setup.num_gpus
        optimizer_shard = breakdown.terms()["optimizer_states"]
        return (weights_shard + optimizer_shard) * min(setup.num_gpus, GPUS_PER_NODE)
    if setup.sharding is Sharding.ZERO3:
        return sum(2 * t.numel * t.count for t in saved)
    return min(sum(t.total_bytes for t in saved), SAVE_PRETRAINED_MAX_SHARD_BYTES)


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
    return activations.offloaded_saved(spec, layer_setup(resolved, spec.family), setup.grad_ckpt, masked).bytes(b, s)
