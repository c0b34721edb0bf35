"""What one GPU (rank) holds under data parallelism, what it sends per step, and what the host keeps under offload.

N data-parallel ranks; a trainable tensor of shape [rows, ...] with n elements; B(x) bytes of dtype x.

Engines (Rajbhandari et al. 2020, "ZeRO", for the stages; memory-math.md section 7 for the library facts):

ddp    torch ``DistributedDataParallel`` as accelerate builds it (``bucket_cap_mb=25``,
       ``gradient_as_bucket_view=False``): every rank holds the full weights, gradients and optimizer states, and the
       reducer's flat buckets, one more copy of every gradient, allocated when the model is wrapped
       (``torch/nn/parallel/distributed.py``, ``Reducer::initialize_buckets``).
fsdp   torch FSDP2 ``fully_shard`` as accelerate 1.15 applies it (``utils/fsdp_utils.py::fsdp2_prepare_model``): one
       unit per decoder layer, one for the input embedding, a tail (final norm, lm_head, the embedding when tied) kept
       gathered from forward to backward. Each parameter is cut in dim 0: every rank stores ``ceil(rows / N)`` rows
       (``_fsdp_param.py::FSDPParam._init_sharded_param`` pads to that). With mixed precision on (every precision
       word but fp32) accelerate upcasts trainable parameters to fp32 and gathers and reduces in 16 bits
       (``MixedPrecisionPolicy(param_dtype, reduce_dtype)``): sharded weights, gradients and optimizer states are
       fp32, compute sees 16-bit weights. A unit being computed holds, per rank:
         gathered parameters   sum over its tensors of ceil(rows/N)·N·(n/rows)·B(gather)   (one storage each)
         all-gather buffer     the same bytes in one flat tensor: freed after the copy-out in forward (kept until
                               the next unit's), prefetched one unit ahead in backward (``_backward_prefetch``)
         unsharded gradients   n·B(gather) per trainable tensor, until the unit's reduce-scatter
         reduce-scatter input  sum of ceil(rows/N)·N·(n/rows)·B(reduce) in one flat tensor, kept until the next
                               unit's reduce-scatter (``reduce_scatter_states``)
       full-shard re-gathers each unit in backward; shard-grad-op keeps every unit gathered from forward to backward.
zero1-3  DeepSpeed through accelerate, config values "auto" (``transformers/integrations/deepspeed.py``:
       ``reduce_bucket_size = h²``, ``stage3_prefetch_bucket_size = 0.9·h²``,
       ``stage3_param_persistence_threshold = 10·h``). With bf16/fp16 the engine casts the module to 16 bits and
       keeps an fp32 master copy beside fp32 optimizer states (DeepSpeed's own estimators count "2 grads16 + 4
       grads32 + 4 params32 + 8 states", ``runtime/zero/stage_1_and_2.py::estimate_zero2_model_states_mem_needs``).
       Stage 1 partitions the master and states, stage 2 also the gradients, each with one reduce bucket of 16-bit
       gradients from the start of backward (two under ``overlap_comm``: ``zero_reduce_buckets_bytes``), stage 3
       also the 16-bit parameters (one module gathered and one prefetch bucket ahead; tensors
       below the persistence threshold stay whole). Not traced: DeepSpeed needs a GPU.
Offload: ``optimizer`` moves the states, the fp32 master and the fp32 gradient partition to the host (DeepSpeed
ZeRO-Offload, CPU Adam); ``params`` also the parameters at rest (ZeRO-3 ``offload_param``; FSDP2
``CPUOffloadPolicy``, which keeps sharded parameters, gradients and the optimizer step on the host).

Where sharding is applied once and where it cannot be:
- one GPU and DDP: the term functions' results as they stand (``states.model_states``), plus DDP's buckets.
- ZeRO-1/2/3: DeepSpeed flattens every trainable tensor into one buffer and partitions that buffer, so the rank's
  master copy, optimizer states and (stage 2-3) gradients are the whole-model terms, computed once on the module
  after DeepSpeed's cast, divided by N and rounded up once (``_deepspeed_states``). Only ZeRO-3's parameters look
  at single tensors: those under the persistence threshold (10·h elements) stay whole on every rank.
- FSDP2: per tensor, by necessity. ``fully_shard`` makes each parameter its own DTensor cut in dim 0 and padded to
  ceil(rows/N) rows, each shard its own allocation; a rank's bytes are
  sum_t count_t·round512(ceil(rows_t/N)·(n_t/rows_t)·B), which no function of the whole-model total
  sum_t round512(n_t·B) gives: the padding depends on each tensor's row count (a [V, h] embedding and an [h] norm
  pad differently) and the 512-B rounding applies per shard. The optimizer term is worse: its rules read each
  tensor's own size (8-bit AdamW keeps fp32 states below 4096 elements and blocks of 256, Adafactor factors the
  shard's rows and columns, paged state starts at 1e5 elements), and after sharding those are the shard's sizes, not
  the tensor's, so O(shard) is not O(tensor)/N. Hence ``_fsdp_states`` shards the stored tensors first and then
  runs the same term functions (``optimizer_state_bytes``, ``optimizer_step_temporary_bytes``) on the shards; the
  padded shards are checked in tests/test_distributed.py (``test_fsdp_shards_fp32_states_dim_zero_padded_per_rank``)
  and the rank's peak against FSDP2 traced on a fake process group.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

from .. import facts
from ..facts import (DDP_BUCKET_CAP_BYTES, DDP_FIRST_BUCKET_BYTES, DEEPSPEED_HOST_BUFFER_FACTOR,
                     DEEPSPEED_PERSISTENCE_PER_HIDDEN, DEEPSPEED_PREFETCH_FRACTION, DEEPSPEED_SUB_GROUP_SIZE,
                     GPUS_PER_NODE)
from ..model import ModelSpec
from ..options import AdapterDtype, FsdpShard, GradCkpt, Method, Offload, Precision, QuantStorage, Sharding
from ..parallel_degrees import shard_rows
from ..training_setup import ResolvedSetup
from ..units import DType, maximum, round_up
from .gradients import gradient_bytes, layer_gradient_bytes
from .optimizer import optimizer_state_bytes, optimizer_step_temporary_bytes
from .parameters import stored_tensors
from .stack_layers import stack_layers
from .stored_tensor import StoredTensor
from .states import RankStates, head_gradient_bytes, model_states
from .weights import weight_bytes
from . import gptq
from ..gptq import is_gptq
from .expert_parallel import expert_fsdp_ranks, fsdp_by_transformers

# DeepSpeed's host bytes per trainable parameter under each offload (``facts``)
DEEPSPEED_HOST_BYTES_PER_PARAM = {Offload.OPTIMIZER: facts.DEEPSPEED_HOST_BYTES_PER_PARAM_OPTIMIZER,
                                  Offload.PARAMS: facts.DEEPSPEED_HOST_BYTES_PER_PARAM_PARAMS}


def ranks(resolved: ResolvedSetup) -> int:
    return resolved.setup.num_gpus


def casts_to_half(resolved: ResolvedSetup) -> bool:
    """FSDP2's mixed-precision policy and DeepSpeed's bf16/fp16 engine compute in 16 bits (all but fp32). Not
    transformers' own FSDP2 under --ep (``expert_parallel.fsdp_by_transformers``): ``DistributedConfig``'s
    ``fsdp_mixed_precision`` defaults to False (distributed/configuration_utils.py:96, fsdp.py:75-79), so units
    gather in the dtype they were loaded in and Trainer's autocast computes as on one GPU."""
    setup = resolved.setup
    if fsdp_by_transformers(resolved):
        return False
    return (setup.sharding is Sharding.FSDP or setup.sharding.is_deepspeed) and setup.precision is not Precision.FP32


def compute_setup(resolved: ResolvedSetup) -> ResolvedSetup:
    """The setup as the kernels see it. FSDP2 hands every layer 16-bit copies of its parameters (adapters too) and
    DeepSpeed casts the module to 16 bits: the activations are those of a 16-bit model with 16-bit adapters and no
    autocast weight copies. Under DeepSpeed's bf16 engine accelerate also leaves autocast off (``native_amp`` stays
    False for ``DistributedType.DEEPSPEED``, accelerate 1.16 ``accelerator.py:536-567``, so no ``autocast`` and no
    ``convert_outputs_to_fp32``): bf16-true, fp16-true. DDP and one GPU compute as the setup says."""
    if not casts_to_half(resolved):
        return resolved
    setup = resolved.setup
    precision = {Precision.MIXED_BF16: Precision.BF16, Precision.MIXED_FP16: Precision.FP16}.get(setup.precision,
                                                                                           setup.precision)
    if setup.sharding.is_deepspeed:
        precision = {Precision.BF16: Precision.BF16_TRUE, Precision.FP16: Precision.FP16_TRUE}.get(precision,
                                                                                                precision)
    adapter = AdapterDtype.BF16 if setup.method.uses_lora or setup.method is Method.PROMPT else setup.adapter_dtype
    return dataclasses.replace(resolved, setup=dataclasses.replace(setup, precision=precision, adapter_dtype=adapter))


def fsdp1_retains_recompute_inputs(setup) -> bool:
    """FSDP1 with frozen decoder-layer units under reentrant checkpointing from outside the unit: each layer keeps
    its checkpointed input and that input's gradient from its backward until the whole backward ends. Per rank, once
    k layers are through their backward: k·T·h·B(r) inputs that would have been freed, and k·T·h·B(c) gradients
    (the last of them being the incoming gradient the next layer's backward holds anyway); the estimator adds this
    to every layer-backward moment (``estimator._layer_backward_moments`` ``inputs_retained``), so the backward's
    peak moves to its last layer. Llama-2-70B, 2 x 4096 tokens: 80 x 2 x 128 MiB = 20 GiB by the end of the
    backward, of which 10 GiB are the inputs a checkpointed run keeps anyway at its start.

    Source (torch 2.4.1 wheel; 2.2.1 the same code at the lines in brackets):
    * A frozen unit: peft's ``fsdp_auto_wrap_policy`` (peft 0.13.2 ``utils/other.py:482-526``) wraps every leaf
      whose weight requires grad (the LoRA A/B Linears) in its own unit, beside the decoder-layer units, so a
      layer's own FlatParameter (the 4-bit codes, the norms) has ``requires_grad=False``. transformers' Trainer
      sets it for any PeftModel with a LoraConfig (4.48.1 ``trainer.py:5131-5138`` ``_fsdp_qlora_plugin_updates``,
      from ``_inner_training_loop`` :2318; 4.39.0 :4310-4317).
    * Such a unit gets no post-backward hook on an AccumulateGrad; ``_pre_forward`` (``fsdp/_runtime_utils.py:401``
      [:400]) calls ``_register_post_backward_reshard_only_hook`` (:1461-1503), which, when grad is enabled, puts a
      ``register_multi_grad_hook`` on the forward's inputs that require grad and stores its handle in
      ``flat_param._post_backward_hook_state``, removed only in ``_finalize_params`` (:1157-1179 [:1118-1133]) from
      the root's ``_post_backward_final_callback``, after the whole backward.
    * ``register_multi_grad_hook`` (``autograd/graph.py:404-498`` [:361-460]) closes over ``grad_fns``, each
      input's ``_get_grad_fn_or_grad_acc`` (:159-164): for a leaf, its AccumulateGrad node, which holds the leaf
      itself; the closure sits in that leaf's own hook dict. Python's collector cannot see the C++ reference, so
      the leaf, and the ``.grad`` its AccumulateGrad writes, live until the handle is removed.
    * Under reentrant checkpointing the unit's forward that runs with grad is the recompute in backward, and its
      inputs are ``CheckpointFunction.backward``'s ``detach_variable`` leaves (``utils/checkpoint.py:290``
      [:295]) aliasing the saved checkpoint input; the backward reads their ``.grad`` (:315 [:321]). transformers
      checkpoints ``decoder_layer.__call__``, the FSDP unit itself (4.48.1 ``modeling_llama.py:577-578``), with
      ``use_reentrant=True`` unless told otherwise (``modeling_utils.py`` ``gradient_checkpointing_enable``).
    Not under non-reentrant checkpointing (the hooked inputs are the previous layer's outputs, non-leaves: the
    closure holds their grad_fn, not them), nor under a checkpoint inside the unit (torch's ``checkpoint_wrapper``
    applied after wrapping, accelerate's ``activation_checkpointing``, fsdp_qlora's ``train.py``), nor for units
    that require grad (full fine-tuning), nor FSDP2, whose post-backward is an autograd Function over the inputs
    that keeps only its param group (torch 2.13 ``_fully_shard/_fsdp_param_group.py:903,1110-1122``).
    Checked on the CPU with torch 2.13 (FSDP1 over a fake 2-rank group, 6 frozen layers, each with its own LoRA
    units): when the first layer's input gradient arrives, 10.0 more [T, h] are alive under reentrant than under
    non-reentrant checkpointing, 2 per layer already through its backward; without FSDP the two are equal."""
    return (setup.sharding is Sharding.FSDP and getattr(setup, "fsdp1_frozen_units", False)
            and setup.grad_ckpt is GradCkpt.REENTRANT and setup.method is not Method.FULL)


# -- one tensor, sharded ---------------------------------------------------------------------------------------------
def sharded(tensor: StoredTensor, n_ranks: int, bits: int | None = None) -> StoredTensor:
    """The tensor's dim-0 shard as one rank stores it (``bits`` to store it in another dtype)."""
    rows = shard_rows(tensor.shape[0], n_ranks)
    return dataclasses.replace(tensor, shape=(rows, *tensor.shape[1:]), bits=tensor.bits if bits is None else bits)


def _padded_numel(tensor: StoredTensor, n_ranks: int) -> int:
    """Elements of the tensor gathered from N padded shards: ceil(rows/N)·N·(n/rows)."""
    return sharded(tensor, n_ranks).numel * n_ranks


def _state_bits(tensor: StoredTensor, fp32_trainable: bool) -> int:
    """Bits a rank stores a tensor in: trainable tensors are fp32 under FSDP2's mixed precision (``fp32_trainable``:
    accelerate's upcast; DeepSpeed's master copy lives in the optimizer and is counted there)."""
    return 32 if tensor.trainable and fp32_trainable else tensor.bits


def state_shard(tensor: StoredTensor, n_ranks: int, fp32_trainable: bool) -> StoredTensor:
    """The dim-0 shard a rank stores of ``tensor``, in the bits ``_state_bits`` gives it."""
    return sharded(tensor, n_ranks, _state_bits(tensor, fp32_trainable))


def _gather_bytes(tensor: StoredTensor, half_bytes: int | None) -> int:
    """Bytes per element of a gathered (compute) copy: ``half_bytes`` under the engines' 16-bit casts (None: none)."""
    return half_bytes if half_bytes is not None else tensor.bits // 8


def _half_bytes(resolved: ResolvedSetup) -> int | None:
    """The 16-bit element size the engine computes and communicates in, or None when it keeps the stored dtypes."""
    return facts.half_dtype(resolved.setup.precision).bytes if casts_to_half(resolved) else None


def shards_trainable_in_fp32(resolved: ResolvedSetup) -> bool:
    """accelerate upcasts trainable parameters to fp32 before ``fully_shard`` under mixed precision, except in a
    model holding ``Params4bit`` (accelerate 1.16 ``utils/fsdp_utils.py:801``: ``if accelerator.mixed_precision !=
    "no" and not model_has_params4bit``), where they keep peft's dtype; applied here with ``--quant-storage bf16``
    (the uint8 estimate predates it). A GPTQ base holds no ``Params4bit``: its trainable (adapter) units are upcast
    (accelerate's FSDP1 ``prepare_model`` upcasts every flat parameter that ``requires_grad`` when mixed precision
    is on, "Upcasted low precision parameters in ..."; the frozen packed codes are not). Without autocast
    (``bf16-true``, ``fp16-true``: Trainer's mixed precision "no") the parameters keep the dtype they were loaded in. A stack that keeps the built dtype does not upcast
    (``stack_layers.StackLayers.fsdp_keeps_dtype``: torchtune, litgpt)."""
    setup = resolved.setup
    return (casts_to_half(resolved) and setup.sharding is Sharding.FSDP and setup.precision.autocast
            and not stack_layers(setup.stack).fsdp_keeps_dtype
            and not shards_4bit(resolved))


def tensor_ranks(resolved: ResolvedSetup):
    """The ranks FSDP2 shards a stored tensor over, or None for one it does not manage: N for every tensor (an int),
    but under
    transformers' own FSDP2 with --ep (``fsdp_by_transformers``) the experts (already n/E per rank) over
    efsdp = N/E (``expert_parallel.expert_fsdp_ranks``) and peft's adapters, attached after ``fully_shard``, None
    (whole on every rank; Trainer all-reduces their gradients, trainer.py:2669-2697)."""
    n = ranks(resolved)
    if not fsdp_by_transformers(resolved):
        return n  # one count for every tensor (accelerate's FSDP2: the experts are in their layer's unit)
    efsdp = expert_fsdp_ranks(resolved)
    return lambda tensor: None if tensor.kind == "adapter" else efsdp if tensor.kind == "experts" else n


# -- 4-bit weights under sharding (--quant-storage) ------------------------------------------------------------------
PACKED_4BIT = "packed-4bit"  # StoredTensor.kind of a 4-bit weight's packed codes alone, as FSDP2 / ZeRO-3 hold them


def shards_4bit(resolved: ResolvedSetup) -> bool:
    """The engine shards the 4-bit weights: QLoRA with a floating storage (``QuantStorage.BF16``) under FSDP2 or
    ZeRO-3, or a stack whose 4-bit weights are torchao ``NF4Tensor``s under FSDP2 (``shards_4bit_state``). With
    bitsandbytes' uint8 storage accelerate leaves them out of ``fully_shard`` (whole on every rank)."""
    setup = resolved.setup
    return setup.method is Method.QLORA and (
        (getattr(setup, "quant_storage", QuantStorage.UINT8) is QuantStorage.BF16
         and setup.sharding in (Sharding.FSDP, Sharding.ZERO3)) or shards_4bit_state(resolved))


def shards_gptq(resolved: ResolvedSetup) -> bool:
    """FSDP shards a GPTQ base's ``qweight`` and ``qzeros``: fms-acceleration's autogptq plugin registers them as
    load-dtype parameters so that FSDP can flatten them (``terms/gptq.py``, FSDP); ``scales`` and ``g_idx`` stay
    buffers, whole on every rank (``gptq_replicated_bytes``)."""
    setup = resolved.setup
    return setup.method is Method.QLORA and setup.sharding is Sharding.FSDP and is_gptq(setup)


def packed_gptq(tensor: StoredTensor, group_size: int) -> StoredTensor:
    """A GPTQ QuantLinear [out, in] as FSDP holds it: its ``qweight`` and ``qzeros`` bytes as 16-bit elements
    (``gptq.fsdp_packed_bytes`` / 2, dim 0 split); the buffers are left out (``gptq_replicated_bytes``)."""
    out_features, in_features = tensor.shape
    elements = gptq.fsdp_packed_bytes(in_features, out_features, group_size) // 2
    return StoredTensor(tensor.name, PACKED_4BIT, (elements, 1), tensor.count, 16, False, 0, tensor.scope)


def gptq_replicated_bytes(tensors, group_size: int) -> int:
    """Every GPTQ QuantLinear's buffers (``scales``, ``g_idx``, bias, ``wf``), whole on every FSDP rank
    (``gptq.buffer_bytes``: the stored metadata less ``qzeros``)."""
    return sum(t.metadata_bytes * t.count - round_up(gptq.qzeros_bytes(t.shape[1], t.shape[0], group_size))
               * t.count for t in tensors if t.kind == "quantized")


def shards_4bit_state(resolved: ResolvedSetup) -> bool:
    """FSDP2 shards a torchao ``NF4Tensor`` whole, its scalers with its codes: the subclass splits every inner tensor
    on dim 0 (``nf4_split`` over ``_INNER_TENSOR_NAMES_FOR_SHARDING``) and all-gathers ``quantized_scalers``,
    ``quantization_factor`` and ``quantized_data`` together (``fsdp_pre_all_gather``; torchao 0.18
    ``quantize_/workflows/nf4/nf4_tensor.py:236-268, 986-1008``), and torchtune ``fully_shard``s every decoder layer
    of its QLoRA model (0.6.1 ``training/_distributed.py::shard_model``). bitsandbytes keeps the state as a module
    attribute, whole on every rank."""
    setup = resolved.setup
    return (setup.method is Method.QLORA and setup.sharding is Sharding.FSDP
            and stack_layers(setup.stack).torchao_nf4)


def packed_4bit(tensor: StoredTensor, with_state: bool = False) -> StoredTensor:
    """A 4-bit weight of n elements as the sharding engine holds it, as 16-bit elements (dim 0 is what is split):
    bitsandbytes with bf16 storage ``[(n + 1) // 4, 1]`` bf16 (bitsandbytes 0.50.2 ``_ops.py:235``:
    ``((n + 1) // (quant_storage.itemsize * 2), 1)``), without its quantization state, which is a module attribute
    and stays whole on every rank (``options.QuantStorage``); ``with_state``: a torchao ``NF4Tensor``, its codes and
    its quantization state (the stored tensor's ``metadata_bytes``) split alike (``shards_4bit_state``)."""
    if with_state:
        elements = -(-(-(-tensor.numel * tensor.bits // 8) + tensor.metadata_bytes) // 2)
        return StoredTensor(tensor.name, PACKED_4BIT, (elements, 1), tensor.count, 16, False, 0, tensor.scope)
    return StoredTensor(tensor.name, PACKED_4BIT, ((tensor.numel + 1) // 4, 1), tensor.count, 16, False, 0,
                        tensor.scope)


def quant_state_bytes(tensors) -> int:
    """Every 4-bit weight's quantization state (absmax, nested absmax and code, offset, code): replicated."""
    return sum(t.metadata_bytes * t.count for t in tensors if t.kind == "quantized")


def engine_tensors(spec: ModelSpec, resolved: ResolvedSetup) -> tuple[StoredTensor, ...]:
    """The stored tensors as the sharding engine sees its parameters: 4-bit weights replaced by their packed codes
    (``packed_4bit``) when it shards them (``shards_4bit``), GPTQ QuantLinears by their packed buffers
    (``packed_gptq``) under FSDP (``shards_gptq``), else ``stored_tensors`` unchanged."""
    tensors = stored_tensors(spec, resolved)
    if shards_gptq(resolved):
        return tuple(packed_gptq(t, resolved.setup.gptq_group_size) if t.kind == "quantized" else t for t in tensors)
    if not shards_4bit(resolved):
        return tensors
    with_state = shards_4bit_state(resolved)
    return tuple(packed_4bit(t, with_state) if t.kind == "quantized" else t for t in tensors)


# -- units -----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """One FSDP2 unit (or ZeRO-3 module) while it computes, on one rank (bytes)."""

    params_bytes: int = 0  # its gathered parameters
    buffer_bytes: int = 0  # the flat all-gather output (FSDP2); 0 when parameters are gathered in place (ZeRO-3)
    grads_bytes: int = 0  # autograd's unsharded gradients of its trainable parameters
    reduce_buffer_bytes: int = 0  # flat reduce-scatter input, kept until the next unit's reduce-scatter
    sharded_grads_bytes: int = 0  # what its reduce-scatter leaves on the rank
    # the part of ``buffer_bytes`` that is an FSDP2 unit of its own nested in this one: the experts under
    # transformers' plan with --ep (fsdp.py:197-205, ``fully_shard(experts, mesh=efsdp)`` before the layer's)
    nested_buffer_bytes: int = 0
    nested_reduce_bytes: int = 0  # the part of ``reduce_buffer_bytes`` that the nested unit reduces on its own

    @property
    def prefetch_bytes(self) -> int:
        """What backward prefetches of the unit ahead of its own backward: its flat buffer, but for a nested unit,
        whose turn in FSDP2's reversed post-forward order comes only once the layer's backward has started
        (``FSDPState._pre_backward`` prefetches the next state in ``post_forward_order``: layer i, its experts,
        layer i-1, ...)."""
        return self.buffer_bytes - self.nested_buffer_bytes


NO_UNIT = Unit()


@dataclass(frozen=True)
class Gathering:
    """How parameters are gathered around the compute (FSDP2 and ZeRO-3)."""

    embed: Unit  # the input embedding's unit (NO_UNIT when tied: it is in the tail)
    dense: Unit  # one dense decoder layer
    moe: Unit  # one MoE decoder layer
    tail: Unit  # final norm + lm_head (+ the embedding when tied)
    keep_gathered: bool  # shard-grad-op: units stay gathered from forward until their backward
    tied: bool
    # FSDP2's tied tail is not resharded until its post-backward, after the embedding's backward; ZeRO-3 releases a
    # parameter by its reuse distance instead (not modelled: False)
    tail_kept_through_backward: bool = False

    def layer(self, moe: bool) -> Unit:
        return self.moe if moe else self.dense


def _unit_of(tensor: StoredTensor, tied: bool) -> str:
    if tensor.scope in ("layer", "dense", "moe"):
        return "layer"
    if tensor.kind == "embedding":
        return "tail" if tied else "embed"
    if tensor.kind in ("lm_head", "norm"):
        return "tail"
    return "root"


def _unit(tensors: list[tuple[StoredTensor, int]], n, half_bytes: int | None, fp32_trainable: bool,
          zero3_prefetch_bytes: int | None, flat_grads: bool = False) -> Unit:
    """The unit holding ``count`` of each tensor (the rank's view of one layer, or of the embedding or tail) over
    ``n`` ranks; gathered copies in ``half_bytes`` (None: the stored dtype), sharded trainable states in fp32 when
    ``fp32_trainable`` (FSDP2's upcast). Per rank, for each tensor of n_t elements in rows_t rows:
    gathered params round512(ceil(rows_t/N)·N·(n_t/rows_t)·B(gather)), unsharded gradients round512(n_t·B(gather)),
    reduce-scatter input ceil(rows_t/N)·N·(n_t/rows_t)·B(gather), sharded gradients
    ceil(rows_t/N)·(n_t/rows_t)·B(state).

    ZeRO-3 (``zero3_prefetch_bytes`` given) gathers into the parameters' own storage (no flat buffer of its own);
    its "buffer" is the prefetch bucket ahead of the compute, at most the unit itself, and its gradients go
    through the reduce bucket (``RankStates.backward_buffers``) rather than a per-unit reduce-scatter input.
    ``flat_grads`` (FSDP1 ``use_orig_params`` flat parameters, ``stack_layers.StackLayers.fsdp_flat_params``): a
    unit with any trainable tensor gets gradients for all of its tensors. ``n``: the rank count, or a function
    giving each tensor's (``tensor_ranks``: None for one FSDP2 does not manage, left out of the unit).
    """
    params = flat = grads = reduce_in = grad_state = nested = nested_reduce = 0
    ranks_of = n if callable(n) else (lambda tensor: n)
    flat_trainable = flat_grads and any(t.trainable for t, c in tensors if c and t.kind != "quantized")
    for tensor, count in tensors:
        if count == 0 or tensor.kind == "quantized" or ranks_of(tensor) is None:
            continue  # 4-bit Params4bit are left out of fully_shard (accelerate ignored_params): replicated
        n_t = ranks_of(tensor)
        gather = _gather_bytes(tensor, half_bytes)
        padded = _padded_numel(tensor, n_t)
        params += round_up(padded * gather) * count
        flat += padded * gather * count
        in_nested = callable(n) and tensor.kind == "experts"  # their own unit (``tensor_ranks``, transformers' FSDP2)
        if in_nested:
            nested += padded * gather * count
        if tensor.trainable or flat_trainable:
            grads += round_up(tensor.numel * gather) * count
            reduce_in += padded * gather * count
            nested_reduce += padded * gather * count if in_nested else 0
            grad_state += sharded(tensor, n_t).numel * _state_bits(tensor, fp32_trainable) // 8 * count
    if zero3_prefetch_bytes is not None:
        return Unit(params, min(zero3_prefetch_bytes, params), grads, 0, round_up(grad_state))
    return Unit(params, round_up(flat), grads, round_up(reduce_in), round_up(grad_state),
                round_up(nested) if nested else 0, round_up(nested_reduce) if nested_reduce else 0)


def _layer_tensors(spec: ModelSpec, tensors, moe: bool) -> list[tuple[StoredTensor, int]]:
    layers = {"layer": spec.num_layers, "dense": spec.num_dense_layers, "moe": spec.num_moe_layers}
    wanted = ("layer", "moe" if moe else "dense")
    # a tensor of only some layers (a hybrid's attention or convolution tensors, ``ModelSpec.layer_is_conv``) counts
    # once: the unit is then the union of both layer kinds, an upper bound on either (for every other tensor
    # count = layers · k, exactly k)
    return [(t, -(-t.count // layers[t.scope])) for t in tensors
            if t.scope in wanted and layers[t.scope]]


@functools.lru_cache(maxsize=1024)
def gathering(spec: ModelSpec, resolved: ResolvedSetup) -> Gathering | None:
    """The units of an FSDP2 or ZeRO-3 job; None for engines that keep whole parameters on every rank."""
    setup = resolved.setup
    if setup.sharding not in (Sharding.FSDP, Sharding.ZERO3):
        return None
    prefetch = None
    if setup.sharding is Sharding.ZERO3:  # "auto" stage3_prefetch_bucket_size = 0.9·h² elements, 16-bit
        prefetch = int(DEEPSPEED_PREFETCH_FRACTION * spec.hidden_size**2) * facts.half_dtype(setup.precision).bytes
    keep_gathered = setup.sharding is Sharding.FSDP and setup.fsdp_shard is FsdpShard.SHARD_GRAD_OP
    flat_grads = setup.sharding is Sharding.FSDP and stack_layers(setup.stack).fsdp_flat_params
    return gathering_units(spec, engine_tensors(spec, resolved), tensor_ranks(resolved), _half_bytes(resolved),
                 shards_trainable_in_fp32(resolved), prefetch, keep_gathered, flat_grads)


@functools.lru_cache(maxsize=1024)
def side_stream_pools(spec: ModelSpec, resolved: ResolvedSetup) -> tuple[int, int]:
    """(all-gather stream's, reduce-scatter stream's) pool: the bytes FSDP allocates on its own streams, which the
    caching allocator keeps for those streams alone (``caching_allocator`` rule 3; ``terms/runtime.py``
    ``stream_pool_bytes``). (0, 0) but under FSDP.

    all-gather: FSDP2 allocates each unit's flat all-gather output on ``all_gather_copy_in_stream``
      (torch ``_fully_shard/_fsdp_collectives.py::foreach_all_gather``), FSDP1 its padded unsharded flat parameter
      on ``_unshard_stream`` (``fsdp/_runtime_utils.py::_unshard``); two units' are alive at once (a unit's until the
      next one's copy-out, ``GatheredTimeline``): the largest two neighbours' buffers, in forward order (a tied tail,
      which holds the embedding, first). With fp32 trainable shards gathered in 16 bits
      (``shards_trainable_in_fp32``), the copy-in first casts the next unit's shards on that stream
      (``_get_param_all_gather_inputs``): 1/N of its buffer under full fine-tuning (an adapter's cast is left out: a
      few MB).
    reduce-scatter: FSDP2's reduce-scatter output, which the sharded gradients view, is allocated on
      ``reduce_scatter_stream`` (``foreach_reduce``), FSDP1's ``new_sharded_grad`` on ``_post_backward_stream``
      (``_get_reduce_scatter_tensors``): every unit's sharded gradients, as they stand at the optimizer step; one
      unit's when they leave the device as soon as they are made (CPU offload, an optimizer stepped in backward).
      With fp32 trainable shards reduced in 16 bits (``shards_trainable_in_fp32``), FSDP2 casts each unit's 16-bit
      output to fp32 on the same stream (``_to_dtype_if_needed``): a unit's 16-bit output beside its own fp32 shards and those
      of the units reduced before it (backward order: the tail, the layers from the last, the embedding; a tied
      tail last, once the embedding's gradient is in).
    The reduce-scatter input, the unsharded gradients and FSDP2's copied-out parameters are the default stream's.
    """
    setup = resolved.setup
    units = gathering(spec, resolved) if setup.sharding is Sharding.FSDP else None
    if units is None:
        return 0, 0
    layers = [units.layer(spec.is_moe_layer(i)) for i in range(spec.num_layers)]
    # gathered in forward order; a tied tail holds the embedding, so it is gathered first and reduced last
    gathered = [units.tail] + layers if units.tied else [units.embed] + layers + [units.tail]
    reduced_order = layers[::-1] + [units.tail] if units.tied else [units.tail] + layers[::-1] + [units.embed]
    n = tensor_ranks(resolved)
    fp32_trainable = shards_trainable_in_fp32(resolved)
    casts = fp32_trainable and setup.method is Method.FULL and not callable(n)
    all_gather = max(a.buffer_bytes + b.buffer_bytes + (b.buffer_bytes // n if casts else 0)
                     for a, b in zip([NO_UNIT] + gathered, gathered))
    cast = _half_bytes(resolved) if fp32_trainable else 0  # the 16-bit output's element bytes
    leaves_device = setup.offload is Offload.PARAMS or setup.optimizer_in_backward
    reduced = held = 0
    for unit in reduced_order:
        shard = unit.sharded_grads_bytes
        held = shard if leaves_device else held + shard
        reduced = max(reduced, held + shard * cast // DType.FP32.bytes)
    return all_gather, reduced


def gathering_units(spec: ModelSpec, tensors: tuple[StoredTensor, ...], n_ranks, half_bytes: int | None,
                    fp32_trainable: bool, zero3_prefetch_bytes: int | None, keep_gathered: bool,
                    flat_grads: bool = False) -> Gathering:
    """The embedding's, a dense and an MoE layer's and the tail's unit (``_unit``) of the stored ``tensors``: one
    unit per decoder layer, the input embedding alone, and final norm + lm_head (+ the embedding when tied)."""
    tied = spec.tie_word_embeddings
    model_level = [(t, t.count) for t in tensors if t.scope == "model"]
    args = (n_ranks, half_bytes, fp32_trainable, zero3_prefetch_bytes, flat_grads)
    return Gathering(
        embed=_unit([(t, c) for t, c in model_level if _unit_of(t, tied) == "embed"], *args),
        dense=_unit(_layer_tensors(spec, tensors, False), *args),
        moe=_unit(_layer_tensors(spec, tensors, True), *args),
        tail=_unit([(t, c) for t, c in model_level if _unit_of(t, tied) == "tail"], *args),
        keep_gathered=keep_gathered,
        tied=tied,
        tail_kept_through_backward=tied and zero3_prefetch_bytes is None,
    )


# -- the rank's states ------------------------------------------------------------------------------------------------
def rank_states(spec: ModelSpec, resolved: ResolvedSetup, states: RankStates | None = None) -> RankStates:
    """Per-rank model states for the setup's engine, from the one-GPU ``states`` (``states.model_states``): as they
    are on one GPU, plus the reducer's buckets under DDP; FSDP2 and DeepSpeed shard them per tensor."""
    sharding = resolved.setup.sharding
    if sharding is Sharding.FSDP:
        return _fsdp_states(spec, resolved)
    if sharding.is_deepspeed:
        return _deepspeed_states(spec, resolved)
    if states is None:
        setup = resolved.setup
        states = model_states(spec, stored_tensors(spec, resolved), setup.method, setup.optimizer, setup.grad_accum)
    if sharding is Sharding.DDP:
        return dataclasses.replace(states, standing_buffers=ddp_bucket_bytes(stored_tensors(spec, resolved)))
    return states


def ddp_bucket_bytes(tensors) -> int:
    """The reducer's flat buckets: every trainable gradient once, in buckets of at most 25 MiB (the first 1 MiB)
    per dtype, each one allocation (``Reducer::initialize_buckets``)."""
    by_dtype: dict[int, int] = {}
    for t in tensors:
        if t.trainable:
            by_dtype[t.bits] = by_dtype.get(t.bits, 0) + t.numel * t.bits // 8 * t.count
    total = 0
    for size in by_dtype.values():
        buckets = 1 + -(-max(size - DDP_FIRST_BUCKET_BYTES, 0) // DDP_BUCKET_CAP_BYTES)
        total += size + buckets * round_up(1)  # each bucket rounds up to the 512-B granule: at most one per bucket
    return total


def _fsdp_states(spec: ModelSpec, resolved: ResolvedSetup) -> RankStates:
    counts = tensor_ranks(resolved)
    ranks_of = counts if callable(counts) else (lambda tensor: counts)
    setup = resolved.setup
    tensors = engine_tensors(spec, resolved)
    units = gathering(spec, resolved)
    fp32_trainable = shards_trainable_in_fp32(resolved)
    # unmanaged tensors (peft's adapters under transformers' own FSDP2) stay whole, with whole gradients
    whole = tuple(t for t in tensors if t.kind != "quantized" and ranks_of(t) is None)
    shards = tuple(state_shard(t, ranks_of(t), fp32_trainable) for t in tensors
                   if t.kind != "quantized" and ranks_of(t) is not None) + whole
    replicated = sum(t.total_bytes for t in tensors if t.kind == "quantized")
    if shards_gptq(resolved):  # qweight and qzeros are sharded above; the QuantLinears' buffers stay whole
        replicated = gptq_replicated_bytes(stored_tensors(spec, resolved), setup.gptq_group_size)
    elif shards_4bit(resolved):  # the packed codes are sharded above; bitsandbytes' quantization state stays whole
        replicated = 0 if shards_4bit_state(resolved) else quant_state_bytes(stored_tensors(spec, resolved))
    weights = sum(t.total_bytes for t in shards) + replicated
    G = (units.embed.sharded_grads_bytes + units.tail.sharded_grads_bytes + units.dense.sharded_grads_bytes * spec.num_dense_layers
         + units.moe.sharded_grads_bytes * spec.num_moe_layers) + sum(t.total_bytes for t in whole if t.trainable)
    O = optimizer_state_bytes(shards, setup.optimizer).device_bytes
    step = optimizer_step_temporary_bytes(shards, setup.optimizer)
    accumulated = 0
    if setup.grad_accum > 1:  # no_sync: every unit's unsharded gradients wait for the last micro-batch
        accumulated = (units.embed.grads_bytes + units.tail.grads_bytes + units.dense.grads_bytes * spec.num_dense_layers
                       + units.moe.grads_bytes * spec.num_moe_layers)
    host = 0
    if setup.offload is Offload.PARAMS:  # CPUOffloadPolicy: shards, sharded gradients and the optimizer on the host
        host = weights - replicated + G + O
        weights, G, O, step = replicated, 0, 0, 0
        # each reduced shard is copied to the host as it is made (torch ``_fully_shard/_fsdp_collectives.py:711``
        # ``if fsdp_param.offload_to_cpu``): no unit's sharded gradients stay on the GPU
        units = dataclasses.replace(units, **{name: dataclasses.replace(getattr(units, name), sharded_grads_bytes=0)
                                             for name in ("embed", "dense", "moe", "tail")})
    return RankStates(
        weights=weights, gradients=G, optimizer_states=O, optimizer_step=step,
        layer_gradients=(units.dense.sharded_grads_bytes, units.moe.sharded_grads_bytes),
        head_gradient=units.tail.grads_bytes if setup.method is Method.FULL else 0,
        accumulated_gradients=accumulated, gathering=units, host_bytes=host,
    )


def zero3_step_gradient_bytes(trainable, n: int, half: bool) -> int:
    """ZeRO-3's fp32 gradient at the optimizer step, one sub-group at a time.

    ``step`` runs ``_prepare_sub_group``, ``_optimizer_step`` and ``_release_sub_group`` per sub-group;
    ``_prepare_fp32_grad_for_sub_group`` builds ``self.flatten(self.averaged_gradients[i]).to(fp32)`` (a flat copy
    of the sub-group's gradient partitions in the 16-bit accumulation dtype, cast to fp32, the 16-bit copy dying
    with the expression) and ``_release_sub_group`` drops it (DeepSpeed@edaa72212 ``runtime/zero/stage3.py:2398-2452``;
    the same flow since ZeRO-Infinity). Sub-groups fill greedily with the parameters' partitions up to
    ``facts.DEEPSPEED_SUB_GROUP_SIZE`` elements (``_create_fp16_sub_groups``), so the largest holds
    S = min(P, sub_group_size + p_max - 1), P the rank's partition, p_max the largest parameter's partition:
    S·(4 + 2) bytes at the cast under 16-bit training, 4·S in fp32 (ZeRO-1/2 cast a whole parameter group's
    partition at once, ``stage_1_and_2.py`` ``step``)."""
    partition = -(-sum(t.numel * t.count for t in trainable) // n)
    largest = -(-max((t.numel for t in trainable), default=0) // n)
    elements = min(partition, DEEPSPEED_SUB_GROUP_SIZE + largest - 1) if largest else 0
    return elements * (DType.FP32.bytes + (2 if half else 0))


def zero_reduce_buckets_bytes(spec: ModelSpec, setup, half: bool) -> int:
    """DeepSpeed's reduce buckets during backward: ``reduce_bucket_size`` gradient elements each (the config's
    ``--zero-bucket-size``, else transformers' "auto", h²), in the 16-bit training dtype (fp32 without it). ZeRO-1/2
    allocate one whenever the first gradient arrives, whatever the gradients' total, and a second under
    ``overlap_comm`` (DeepSpeed@edaa72212 ``runtime/zero/stage_1_and_2.py`` ``setup_buckets``: ``buf_0 =
    torch.empty(reduce_bucket_size)``, ``buf_1`` "to avoid data access conflict when overlap_comm is enabled"; in
    ``backward`` itself before November 2025, @f8d3ec7fa ``:1932-1945``; ``contiguous_gradients`` is on by default,
    ``zero/config.py``, stage 1 included); ZeRO-3 one per dtype, allocated with the optimizer (``stage3.py``
    ``_setup_for_real_optimizer``)."""
    elements = setup.zero_bucket_size or spec.hidden_size**2
    element_bytes = facts.half_dtype(setup.precision).bytes if half else DType.FP32.bytes
    buffers = 2 if setup.zero_overlap_comm and setup.sharding is not Sharding.ZERO3 else 1
    return buffers * elements * element_bytes


def _deepspeed_states(spec: ModelSpec, resolved: ResolvedSetup) -> RankStates:
    """ZeRO stages 1-3 with DeepSpeed's fp32 master copy under 16-bit training (module docstring)."""
    setup = resolved.setup
    n = ranks(resolved)
    compute = compute_setup(resolved)
    tensors = stored_tensors(spec, compute)  # the module after DeepSpeed's cast
    half = casts_to_half(resolved)
    trainable = [t for t in tensors if t.trainable]
    fp32 = tuple(dataclasses.replace(t, bits=32) for t in trainable)
    master = sum(t.total_bytes for t in fp32) if half else 0
    states = optimizer_state_bytes(fp32 if half else tuple(trainable), setup.optimizer).device_bytes
    grad_partition = sum(t.total_bytes for t in fp32) if half else 0  # fp32 gradients the optimizer steps on
    O = -(-(master + states) // n)
    step = -(-optimizer_step_temporary_bytes(fp32 if half else tuple(trainable), setup.optimizer) // n)
    if setup.sharding is Sharding.ZERO3:
        step += zero3_step_gradient_bytes(trainable, n, half)
    else:
        step += -(-grad_partition // n)
    G = gradient_bytes(tensors)
    layer_grads = (layer_gradient_bytes(spec, tensors, False), layer_gradient_bytes(spec, tensors, True))
    head = head_gradient_bytes(spec, compute.setup.method, tensors)  # full until reduced
    bucket = zero_reduce_buckets_bytes(spec, setup, half)
    W = weight_bytes(tensors)
    units = None
    if setup.sharding is Sharding.ZERO1:
        gradients = G
    else:
        gradients = -(-G // n)
        layer_grads = tuple(-(-g // n) for g in layer_grads)
    if setup.sharding is Sharding.ZERO3:
        units = gathering(spec, compute)
        params = engine_tensors(spec, compute)  # with bf16 storage: the packed codes, partitioned like any parameter
        persistent = sum(t.total_bytes for t in params
                         if t.numel < DEEPSPEED_PERSISTENCE_PER_HIDDEN * spec.hidden_size)
        W = persistent + -(-(weight_bytes(params) - persistent) // n)
        if shards_4bit(resolved):  # the quantization state is a module attribute, not a parameter: whole
            W += quant_state_bytes(tensors)
    host = 0
    if setup.offload is not Offload.NONE:
        host = O + -(-grad_partition // n)
        O, step = 0, 0
        if setup.sharding is not Sharding.ZERO1:
            gradients = 0  # the reduced partition goes straight to the host
            layer_grads = (0, 0)
    if setup.offload is Offload.PARAMS:
        host += W
        W = 0
    return RankStates(
        weights=W, gradients=gradients, optimizer_states=O, optimizer_step=step, layer_gradients=layer_grads,
        head_gradient=head, backward_buffers=bucket,
        accumulated_gradients=gradients if setup.grad_accum > 1 else 0, gathering=units, host_bytes=host,
    )


# -- host RAM ---------------------------------------------------------------------------------------------------------
def host_offload_bytes_per_node(spec: ModelSpec, resolved: ResolvedSetup) -> int:
    """Host memory one node of ``GPUS_PER_NODE`` needs for what its ranks offload.

    DeepSpeed: its own rule, 16 (optimizer) or 18 (with parameters) bytes per trainable parameter spread over the
    nodes, times 1.5 for pinned buffers (``estimate_zero3_model_states_mem_needs``). FSDP2 ``CPUOffloadPolicy``: the
    ranks' own shards, gradients and optimizer states (torch adds no staging copies beyond pinned shards).
    """
    setup = resolved.setup
    if setup.offload is Offload.NONE:
        return 0
    nodes = -(-setup.num_gpus // GPUS_PER_NODE)
    if setup.sharding.is_deepspeed:
        trainable = sum(t.numel * t.count for t in stored_tensors(spec, resolved) if t.trainable)
        per_param = DEEPSPEED_HOST_BYTES_PER_PARAM[setup.offload]
        return math.ceil(per_param * trainable * DEEPSPEED_HOST_BUFFER_FACTOR / nodes)
    return rank_states(spec, resolved).host_bytes * min(setup.num_gpus, GPUS_PER_NODE)


# -- communication volume ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Communication:
    """Bytes one rank sends per optimizer step, by collective (their time on a link is ``cost.communication_time``)."""

    all_reduce_bytes: int  # DDP's gradient all-reduce
    reduce_scatter_bytes: int  # gradients reduce-scattered to their owners
    all_gather_bytes: int  # parameters gathered (FSDP/ZeRO-3 forward and backward; ZeRO-1/2 after the step)

    @property
    def total_bytes(self) -> int:
        return self.all_reduce_bytes + self.reduce_scatter_bytes + self.all_gather_bytes


NO_COMMUNICATION = Communication(0, 0, 0)


def _ring_share(n_ranks: int) -> float:
    """A ring all-gather or reduce-scatter of S bytes sends (N-1)/N·S per rank; an all-reduce twice that
    (NCCL ``doc/PERFORMANCE.md``, "bus bandwidth"; Patarasuk and Yuan 2009)."""
    return (n_ranks - 1) / n_ranks


def communication_bytes_per_step(spec: ModelSpec, resolved: ResolvedSetup) -> Communication:
    """Per-rank traffic of one optimizer step (gradient accumulation syncs once, on the last micro-batch).

    ddp     all-reduce of the gradients: 2·(N-1)/N·G
    zero1/2 reduce-scatter of the gradients and all-gather of the updated 16-bit parameters: (N-1)/N·(G + W16)
    zero3, fsdp full-shard: parameters gathered in forward and again in backward, gradients reduce-scattered:
            (N-1)/N·(2·W + G); shard-grad-op gathers once: (N-1)/N·(W + G)
    W counts every gathered parameter (a LoRA job still gathers the frozen base under fsdp/zero3); G only trainable
    gradients, in the dtype they are reduced in.
    EP over FSDP ranks (``tensor_ranks``): each tensor gathered and reduced over its own ranks, the experts' n/E over
    efsdp = N/E ((efsdp-1)/efsdp of them), the rest over N; peft's adapters, outside FSDP2, all-reduced by Trainer
    over N (2·(N-1)/N of their gradients). AllToAllEP's own traffic: ``expert_parallel.expert_parallel_traffic``.
    """
    setup = resolved.setup
    n = setup.num_gpus
    if setup.sharding is Sharding.NONE or n == 1:
        return NO_COMMUNICATION
    counts = tensor_ranks(resolved)
    if callable(counts):
        return _per_tensor_communication(spec, resolved, counts)
    share = _ring_share(n)
    compute = compute_setup(resolved)
    tensors = engine_tensors(spec, compute)  # packed 4-bit codes are gathered when the engine shards them
    half_bytes = _half_bytes(resolved)
    grads = sum(t.numel * _gather_bytes(t, half_bytes) * t.count for t in tensors if t.trainable)
    if setup.sharding is Sharding.DDP:
        grads = sum(t.numel * t.bits // 8 * t.count for t in tensors if t.trainable)
    weights = sum(t.numel * _gather_bytes(t, half_bytes) * t.count for t in tensors if t.kind != "quantized")
    trainable_weights = sum(t.numel * _gather_bytes(t, half_bytes) * t.count for t in tensors if t.trainable)
    all_reduce = reduce_scatter = all_gather = 0
    if setup.sharding is Sharding.DDP:
        all_reduce = round(2 * share * grads)
    elif setup.sharding in (Sharding.ZERO1, Sharding.ZERO2):
        reduce_scatter, all_gather = round(share * grads), round(share * trainable_weights)
    else:
        gathers = 1 if setup.sharding is Sharding.FSDP and setup.fsdp_shard is FsdpShard.SHARD_GRAD_OP else 2
        reduce_scatter, all_gather = round(share * grads), round(gathers * share * weights)
    return Communication(all_reduce, reduce_scatter, all_gather)


def _per_tensor_communication(spec: ModelSpec, resolved: ResolvedSetup, ranks_of) -> Communication:
    """``communication_bytes_per_step`` with each tensor's own rank count (full-shard: two gathers per step)."""
    tensors = engine_tensors(spec, compute_setup(resolved))
    half_bytes = _half_bytes(resolved)
    all_reduce = reduce_scatter = all_gather = 0.0
    for t in tensors:
        if t.kind == "quantized":
            continue
        size = t.numel * _gather_bytes(t, half_bytes) * t.count
        ranks_t = ranks_of(t)
        if ranks_t is None:  # outside FSDP2: whole on every rank, its gradient all-reduced over the job
            all_reduce += 2 * _ring_share(ranks(resolved)) * size if t.trainable else 0
            continue
        all_gather += 2 * _ring_share(ranks_t) * size
        reduce_scatter += _ring_share(ranks_t) * size if t.trainable else 0
    return Communication(round(all_reduce), round(reduce_scatter), round(all_gather))


# -- the gathered units' timeline (FSDP2, ZeRO-3) ---------------------------------------------------------------------
class GatheredTimeline:
    """The bytes FSDP2 (or ZeRO-3) units add at each moment on top of the rank's sharded states (``Gathering``).

    Forward gathers each unit and keeps its flat all-gather buffer until the next unit's copy-out has returned
    (``FSDPParamGroup.wait_for_unshard`` holds the previous ``all_gather_state`` in a local until it exits): a
    copy-out holds the previous unit's buffer, its own buffer and its gathered parameters at once. The tail (final
    norm, lm_head) stays gathered into backward, and its buffer (the last layer's when tied) lives until the root's
    forward ends, after the loss. Backward re-gathers each layer while prefetching the one before it, and keeps the
    previous unit's reduce-scatter input until its own. Shard-grad-op keeps every unit gathered until its backward.
    Zero when the engine keeps whole parameters.
    """

    def __init__(self, spec: ModelSpec, gathering: Gathering | None):
        self.spec = spec
        self.g = gathering
        if gathering is None:
            self.last_layer_forward = self.loss_forward = self.loss_backward = self.head_backward = 0
            self.reduced_shards = self.tail_through_backward = self.tail_waiting_grads = 0
            return
        g = gathering
        n_layers = spec.num_layers
        last = g.layer(spec.is_moe_layer(n_layers - 1))
        before_last = g.layer(spec.is_moe_layer(n_layers - 2)).buffer_bytes if n_layers > 1 else g.embed.buffer_bytes
        all_layers = g.dense.params_bytes * spec.num_dense_layers + g.moe.params_bytes * spec.num_moe_layers
        kept = all_layers + g.embed.params_bytes if g.keep_gathered else 0
        # a tied tail holds the embedding: gathered at the embedding's forward, it stays gathered (not resharded after
        # forward) and keeps lm_head's unsharded gradient until the embedding's backward, the last use of its weight;
        # only then is it reduced (``side_stream_pools``' reduce order)
        tied_tail = g.tail.params_bytes if g.tied else 0
        self.tail_through_backward = tied_tail if g.tail_kept_through_backward else 0  # gathered in layers' backward
        self.tail_waiting_grads = g.tail.grads_bytes if g.tied else 0  # (autograd's: whatever the engine)
        self.last_layer_copy_out = (kept or last.params_bytes) + before_last + last.buffer_bytes + tied_tail
        self.last_layer_forward = (kept or last.params_bytes) + last.buffer_bytes + tied_tail
        self.tail_copy_out = kept + (0 if g.tied else last.buffer_bytes + g.tail.buffer_bytes
                                     + g.tail.params_bytes) + tied_tail
        self.loss_forward = kept + g.tail.params_bytes + (last.buffer_bytes if g.tied else g.tail.buffer_bytes)
        self.loss_backward = kept + g.tail.params_bytes
        self.head_backward = kept + g.tail.params_bytes + (0 if g.keep_gathered else last.prefetch_bytes)
        # the sharded gradients every unit but the embedding's leaves on the rank (the reduce-scatter stream's, held
        # once the first layer is reduced)
        self.reduced_shards = ((0 if g.tied else g.tail.sharded_grads_bytes)
                               + g.dense.sharded_grads_bytes * spec.num_dense_layers
                               + g.moe.sharded_grads_bytes * spec.num_moe_layers)
        # the unit reduced last, once the embedding's backward is done: the embedding's, or the tied tail
        self.last_reduced_shards = g.tail.sharded_grads_bytes if g.tied else g.embed.sharded_grads_bytes
        # the embedding's backward: every layer reduced, the first layer's reduce-scatter input retained (its dense
        # unit's: a nested experts unit was reduced before it)
        self.embedding_reduced = (self.reduced_shards + self.layer(0).reduce_buffer_bytes
                                  - self.layer(0).nested_reduce_bytes)
        # (a tied embedding is the tail: gathered again for its backward where the engine released it)
        self.embedding_gathered = g.embed.params_bytes + tied_tail
        self.embedding_copy_out = g.embed.params_bytes + (0 if g.keep_gathered else g.embed.buffer_bytes) + tied_tail

    def layer(self, index: int) -> Unit:
        return self.g.layer(self.spec.is_moe_layer(index))

    def buffers(self) -> GatheredTimeline:
        """The same timeline counting only the units' flat all-gather buffers (what ``side_stream_pools`` puts on
        the all-gather stream): every attribute of it is that moment's share of this one's."""
        if self.g is None:
            return self
        no_params = {name: dataclasses.replace(getattr(self.g, name), params_bytes=0)
                     for name in ("embed", "dense", "moe", "tail")}
        return GatheredTimeline(self.spec, dataclasses.replace(self.g, **no_params))

    def weights_during(self, index: int) -> int:
        """Gathered bytes while layer ``index`` runs its backward."""
        g = self.g
        if g.keep_gathered:  # every unit not yet through its backward is still gathered
            before = sum(self.layer(i).params_bytes for i in range(index + 1)) if self.spec.is_moe else \
                g.dense.params_bytes * (index + 1)
            return before + g.embed.params_bytes + self.tail_through_backward
        prefetched = self.layer(index - 1).prefetch_bytes if index > 0 else g.embed.buffer_bytes
        return self.layer(index).params_bytes + prefetched + self.tail_through_backward

    def retained_reduce_buffer(self, index: int) -> int:
        """The reduce-scatter input of the unit reduced just before layer ``index``'s: the next layer's, or its dense
        unit's alone when its experts are a nested unit (reduced before it, in the experts' post-backward)."""
        if index == self.spec.num_layers - 1:  # the tail's, reduced before the layers unless it is tied
            return 0 if self.g.tied else self.g.tail.reduce_buffer_bytes
        after = self.layer(index + 1)
        return after.reduce_buffer_bytes - after.nested_reduce_bytes

    def embedding_gradients(self, accumulated_gradients: int):
        """Gradients on the rank during the embedding's backward: its own unsharded ones (or the accumulated ones),
        beside every reduced layer."""
        return maximum(accumulated_gradients, self.g.embed.grads_bytes) + self.embedding_reduced
