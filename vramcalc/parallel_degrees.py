"""Model-parallel degrees of a job (``--tp``) and how they compose with data parallelism (``--num-gpus``).

``--num-gpus`` is the product of the parallel degrees (DESIGN.md, "Several GPUs"): N = tp x dp, where dp, the
data-parallel degree, is what ``--sharding`` spreads the batch and the model states over. A rank holds the 1/tp slice
transformers' tensor-parallel plan gives it (``terms/tensor_parallel.py``); with dp > 1 transformers shards that slice
again with FSDP2 on the ``fsdp`` axis of its ``(pp, dp_replicate, fsdp, tp)`` mesh (transformers 5.25.0
``distributed/mixin.py:304-343`` ``maybe_distribute_model``: TP first, then ``apply_fully_sharded_data_parallelism``),
which vramcalc estimates as ``--sharding fsdp`` over dp ranks. Trainer does not wrap such a model in DDP
(trainer.py:1767-1772) and vramcalc does not model DeepSpeed ZeRO over DTensor parameters: both are refused with
``--tp``.

What ``--tp`` covers: the families whose ``base_model_tp_plan`` is Megatron-style (column-parallel q/k/v and MLP input
projections, row-parallel o and MLP output projection; q/k norms replicated), the plan ``tp_plan="auto"`` applies,
with dense MLPs. Others are refused here with a reason rather than estimated wrongly.
"""

from __future__ import annotations

from .errors import VramcalcError
from .model import ModelSpec
from .options import TpPlan

# families whose transformers 5.25.0 ``base_model_tp_plan`` is llama's (models/llama/configuration_llama.py:48-56:
# q/k/v/gate/up "colwise", o/down "rowwise"), or llama's plus replicated q/k norms (qwen3, gemma3_text:
# "replicated_with_grad_allreduce"), all dense
TP_FAMILIES = ("cohere2", "ernie4_5", "gemma", "gemma2", "gemma3_text", "granite", "llama", "mistral", "qwen2",
               "qwen3", "smollm3")


def shard_rows(rows: int, n_ranks: int) -> int:
    """Rows of a dim-0 shard on rank 0 (the largest): ``ceil(rows / N)``, what FSDP2 pads every shard to."""
    return -(-rows // n_ranks)


def stage_gpus(setup) -> int:
    """The GPUs of one pipeline stage: ``--num-gpus`` / ``--pp`` (the whole job without ``--pp``). Tensor, context and
    data parallelism lay out over these, each pipeline stage alike (torchtitan's mesh ``(pp, dp_shard, cp, tp)``,
    parallel_dims.py@9dec370)."""
    return setup.num_gpus // getattr(setup, "pp", 1)


def data_parallel_degree(num_gpus: int, tp: int) -> int:
    """dp = N / tp: the ranks that hold the same tensor-parallel slice and split the batch."""
    return num_gpus // tp


def implied_num_gpus(values: dict, given: dict, origins: dict) -> None:
    """``--tp T`` without ``--num-gpus``: the job runs on T GPUs (one tensor-parallel group, no data parallelism).
    ``--cp C``: on C x T GPUs, and with ``--sharding fsdp`` unless another sharding is given (accelerate runs context
    parallelism only with an FSDP2 plugin, state.py:961-971; ``check_context_parallel`` refuses the others)."""
    pp = values.get("pp", 1)
    if pp > 1 and "num_gpus" not in given and values["num_gpus"] == 1:  # --pp P alone: P x tp x cp GPUs
        values["num_gpus"] = pp * values.get("tp", 1) * values.get("cp", 1)
        origins["num_gpus"] = "implied by pp"
    if values.get("tp", 1) > 1 and "num_gpus" not in given and values["num_gpus"] == 1:
        values["num_gpus"] = values["tp"]
        origins["num_gpus"] = "implied by tp"
    if values.get("ep", 1) > 1 and "num_gpus" not in given and values["num_gpus"] == 1:  # --ep E alone: one group
        values["num_gpus"] = values["ep"]
        origins["num_gpus"] = "implied by ep"
    cp = values.get("cp", 1)
    if cp > 1:
        if "num_gpus" not in given and values["num_gpus"] in (1, values.get("tp", 1)):
            values["num_gpus"] = cp * values.get("tp", 1) * pp
            origins["num_gpus"] = "implied by cp"
        if "sharding" not in given and values["sharding"].value == "none":
            values["sharding"] = type(values["sharding"]).parse("fsdp", "sharding")
            origins["sharding"] = "implied by cp"


def check_degrees(model: ModelSpec, setup) -> None:
    """One error line for a ``--tp`` the real stack would refuse or that vramcalc does not model."""
    check_expert_degree(model, setup)
    check_pipeline_degree(model, setup)
    tp = setup.tp
    torchtitan = getattr(setup, "tp_plan", TpPlan.HF) is TpPlan.TORCHTITAN
    if tp == 1:
        if torchtitan:
            raise VramcalcError("--tp-plan torchtitan applies with --tp 2 or more")
        return
    gpus, pp = stage_gpus(setup), getattr(setup, "pp", 1)
    if gpus % tp:
        raise VramcalcError(f"--num-gpus {setup.num_gpus} is not a multiple of --tp {tp}"
                            f"{f' x --pp {pp}' if pp > 1 else ''}: --num-gpus is the product of the parallel degrees "
                            f"({'pp x ' if pp > 1 else ''}tp x data-parallel ranks)")
    dp = data_parallel_degree(gpus, tp)
    if dp > 1 and setup.sharding.value == "none":
        raise VramcalcError(f"--num-gpus {setup.num_gpus} with --tp {tp}{f' and --pp {pp}' if pp > 1 else ''} leaves "
                            f"{dp} data-parallel ranks: give --sharding ddp, zero1-3 or fsdp for them, or --num-gpus "
                            f"equal to {'--pp x ' if pp > 1 else ''}--tp")
    if dp == 1 and setup.sharding.value != "none" and setup.offload.value == "none":
        raise VramcalcError(f"--sharding {setup.sharding.value} with --tp {tp} on {setup.num_gpus} GPUs leaves one "
                            f"data-parallel rank: use --num-gpus {2 * tp * pp} or more, or --sharding none")
    if setup.sharding.value == "ddp":
        raise VramcalcError("--tp with --sharding ddp: Trainer does not wrap a model loaded with a tp_plan in DDP "
                            "(transformers 5.25.0 trainer.py:1767-1772); its data-parallel ranks shard it with FSDP2 "
                            "(DistributedConfig fsdp_size): use --sharding fsdp")
    if setup.sharding.is_deepspeed:
        raise VramcalcError(f"--tp with --sharding {setup.sharding.value}: DeepSpeed ZeRO does not compose with "
                            "transformers' DTensor tensor parallelism; use --sharding ddp or fsdp for the data-"
                            "parallel ranks")
    if model.family not in TP_FAMILIES or model.is_moe:
        raise VramcalcError(f"--tp is modelled for dense families with the Megatron-style tp plan ({', '.join(TP_FAMILIES)}); "
                            f"{model.name} is {model.family}{' (MoE)' if model.is_moe else ''}")
    for what, size in (("attention heads", model.num_heads), ("key/value heads", model.num_kv_heads),
                       ("intermediate size", model.intermediate_size)):
        if size % tp:
            raise VramcalcError(f"--tp {tp} does not divide {model.name}'s {size} {what}: each rank must hold whole "
                                "heads and an equal slice of the MLP")
    method = setup.method.value
    if torchtitan:
        check_torchtitan_plan(model, setup)
        return
    if method == "qlora" or setup.method.peft_facts is not None or method == "prompt":
        raise VramcalcError(f"--tp with --method {method}: modelled for full and lora (transformers 5.25.0 has no "
                            "tensor-parallel path for bitsandbytes layers, and peft shards only LoRA's adapters, "
                            "lora/model.py:402-440)")
    if setup.loss.value != "hf" or any(t in ("lm_head", "embed_tokens") for t in setup.lora_targets):
        raise VramcalcError("--tp is modelled with --loss hf and LoRA on the decoder layers' linears (the vocab-"
                            "parallel lm_head and embedding keep no adapters)")
    if setup.optimizer.value not in ("adamw", "adamw-foreach", "sgd", "sgd-momentum"):
        raise VramcalcError(f"--tp with --optimizer {setup.optimizer.value}: modelled for torch's optimizers on "
                            "DTensor parameters (adamw, adamw-foreach, sgd, sgd-momentum)")
    if setup.optimizer_in_backward:
        raise VramcalcError("--tp with --optimizer-in-backward is not modelled")
    if setup.task.value != "sft" or setup.stack.value != "hf":
        raise VramcalcError("--tp is modelled for --task sft on the hf stack (transformers' tp_plan='auto')")
    if setup.packing or setup.compile or setup.activation_offload or setup.kernels.value != "none":
        raise VramcalcError("--tp with transformers' plan is modelled without --packing, --compile, "
                            "--activation-offload and --kernels (torchtitan's, --tp-plan torchtitan, takes --compile)")
    if setup.precision.value == "fp8":
        raise VramcalcError("--tp with transformers' plan and --precision fp8 is not modelled (torchao's Float8Linear "
                            "under DTensor; torchtitan's plan, --tp-plan torchtitan, takes it)")


def check_torchtitan_plan(model: ModelSpec, setup) -> None:
    """One error line for a ``--tp-plan torchtitan`` setup vramcalc does not model (the mesh and divisibility checks
    of ``check_degrees`` passed). What it models: torchtitan 9dec370's ``apply_tp`` on a dense Llama-style decoder
    (``parallelisms/parallelize_llama.py``): full training (torchtitan trains no adapters), its loss
    ``F.cross_entropy(pred.flatten(0, 1).float(), labels)`` under ``loss_parallel()`` (``--loss hf``), FSDP2 over the
    data-parallel ranks (``apply_fsdp``, ``dp_shard``), torch's AdamW or SGD on DTensor parameters; with
    ``--compile`` (``apply_compile``: each TransformerBlock) and ``--precision fp8`` (torchao's Float8Linear with the
    Float8 parallel styles) allowed. The sequence is sharded ``Shard(1)`` between blocks: T must divide it. With
    ``--cp C`` (torchtitan's mesh ``(pp, dp_shard, cp, tp)``, parallel_dims.py@9dec370, FSDP2 over dp_shard x cp,
    ``apply_fsdp`` on ``dp_shard_cp``; its ``context_parallel`` buffers cut the sequence to s/C before the blocks) the
    rank's sequence is s/C, which T must divide (``check_context_parallel`` has the ring's own conditions)."""
    tp = setup.tp
    if setup.method.value != "full":
        raise VramcalcError(f"--tp-plan torchtitan with --method {setup.method.value}: torchtitan trains the whole "
                            "model (--method full)")
    if setup.sharding.value not in ("none", "fsdp") or setup.offload.value != "none":
        raise VramcalcError(f"--tp-plan torchtitan with --sharding {setup.sharding.value}"
                            f"{' --offload ' + setup.offload.value if setup.offload.value != 'none' else ''}: "
                            "torchtitan shards its data-parallel ranks with FSDP2 (apply_fsdp); use --sharding fsdp "
                            "without offload")
    if setup.loss.value != "hf":
        raise VramcalcError(f"--tp-plan torchtitan with --loss {setup.loss.value}: torchtitan's loss is "
                            "cross_entropy(pred.float(), labels) under loss_parallel (--loss hf)")
    cp = getattr(setup, "cp", 1)
    if setup.padded_seq_len % (tp * cp):
        raise VramcalcError(f"--seq-len {setup.padded_seq_len} with --tp {tp}{f' --cp {cp}' if cp > 1 else ''} "
                            f"--tp-plan torchtitan: sequence parallelism shards every{' local' if cp > 1 else ''} "
                            f"sequence into {tp} equal parts; use a multiple of {tp * cp}")
    if setup.optimizer.value not in ("adamw", "adamw-foreach", "sgd", "sgd-momentum") or setup.optimizer_in_backward:
        raise VramcalcError(f"--tp with --optimizer {setup.optimizer.value}: modelled for torch's optimizers on "
                            "DTensor parameters (adamw, adamw-foreach, sgd, sgd-momentum)")
    if setup.task.value != "sft" or setup.stack.value != "hf":
        raise VramcalcError("--tp-plan torchtitan is modelled for --task sft with the stack's other knobs given "
                            "explicitly (--stack hf)")
    if setup.packing or setup.activation_offload or setup.kernels.value != "none":
        raise VramcalcError("--tp-plan torchtitan is modelled without --packing, --activation-offload and --kernels")
    if setup.grad_ckpt.caches_ops:
        raise VramcalcError(f"--tp-plan torchtitan with --grad-ckpt {setup.grad_ckpt.value} is not modelled "
                            "(full or none)")


ROWWISE_MODULES = ("o_proj", "down_proj")  # the plan's "rowwise" layers (models/llama/configuration_llama.py:52,55)


def tp_warnings(setup, lora_modules: tuple[str, ...]) -> list[str]:
    """What the real stack does differently from the estimate under ``--tp`` with LoRA (found by the trace,
    ``tracing/tensor_parallel.py``): estimated as the stack intends, said in a warning."""
    if setup.tp == 1 or not setup.method.uses_lora:
        return []
    out = []
    if any(module in ROWWISE_MODULES for module in lora_modules):
        out.append("--tp with LoRA on o_proj/down_proj: peft 0.21.2 gives their lora_A the local in_features "
                   "(tuners_utils.py:186) while transformers' RowwiseParallel reads it as the global width, so the "
                   "forward fails with a shape error; estimated as the fixed stack would run")
    return out


# -- expert parallelism (--ep) -----------------------------------------------------------------------------------------
# families whose transformers 5.25.0 ``base_model_ep_plan`` shards the 3-D expert tensors "grouped_gemm" and
# dispatches tokens "ep_dispatch_experts" (models/qwen3_moe/configuration_qwen3_moe.py:66-70, mixtral :55-59,
# qwen2_moe :69-73, deepseek_v3 :72-76, gpt_oss :43-49 with the expert biases; deepseek_v2 the same); Llama-4's
# experts take every token and have no EP plan (models/llama4/configuration_llama4.py:126-127)
EP_FAMILIES = ("deepseek_v2", "deepseek_v3", "gpt_oss", "mixtral", "qwen2_moe", "qwen3_moe")


def check_expert_degree(model: ModelSpec, setup) -> None:
    """One error line for an ``--ep`` the real stack refuses or vramcalc does not model.

    What transformers 5.25.0 runs: ``DistributedConfig`` requires ``ep_size`` to be a multiple of ``tp_size`` and to
    divide ``fsdp_size * tp_size`` (distributed/configuration_utils.py:183-187). vramcalc models its two layouts
    without TP:
    - one expert-parallel group that is the whole job and shares one batch, --num-gpus = --ep, --sharding none:
      ``DistributedConfig(tp_size=E, tp_plan={}, ep_size=E)`` (:40-43, :156-170: the expert plan alone across the tp
      ranks, dense modules whole);
    - EP across FSDP ranks, --num-gpus N a multiple of --ep E, --sharding fsdp (full-shard, no offload):
      ``DistributedConfig(fsdp_size=N, ep_size=E)``. Every rank has a batch of its own (``dp_size`` = N); the
      dense modules are FSDP2 units over the N ranks of the ``(pp, dp_replicate, fsdp, tp)`` mesh, each rank's n/E
      experts a unit over the efsdp = N/E ranks of the ``(pp, dp_replicate, efsdp, ep)`` mesh that hold the same
      experts (distributed/utils.py:313-346, fsdp.py:176-238, both with ``reshard_after_forward=True``). Trainer
      neither wraps nor reshards such a model (trainer.py:467-469), so DDP, DeepSpeed, shard-grad-op and
      accelerate's offload are refused; HSDP (``dp_replicate_size``) is not modelled.
    """
    ep = getattr(setup, "ep", 1)
    if ep == 1:
        return
    if not model.is_moe:
        raise VramcalcError(f"--ep {ep} needs a mixture-of-experts model; {model.name} is dense")
    if model.family not in EP_FAMILIES:
        raise VramcalcError(f"--ep is modelled for the families whose transformers expert plan dispatches tokens "
                            f"({', '.join(EP_FAMILIES)}); {model.name} is {model.family}")
    if model.num_experts % ep:
        raise VramcalcError(f"--ep {ep} does not divide {model.name}'s {model.num_experts} experts: transformers "
                            "gives each rank n/ep whole experts (expert_parallel.py:103-107)")
    if setup.tp > 1:
        raise VramcalcError("--ep with --tp: transformers' tensor-parallel plans are modelled for dense models only")
    if setup.num_gpus % ep:
        raise VramcalcError(f"--num-gpus {setup.num_gpus} is not a multiple of --ep {ep}: transformers lays the "
                            "expert-parallel groups over the data-parallel ranks (ep_size divides fsdp_size x tp_size)")
    if setup.num_gpus == ep and (setup.sharding.value != "none" or setup.offload.value != "none"):
        raise VramcalcError(f"--ep with --sharding {setup.sharding.value} on {ep} GPUs: one expert-parallel group has "
                            f"no data-parallel ranks to shard over; use --sharding none, or --num-gpus {2 * ep} or "
                            "more with --sharding fsdp")
    if setup.num_gpus > ep and (setup.sharding.value != "fsdp" or setup.offload.value != "none"):
        raise VramcalcError(f"--num-gpus {setup.num_gpus} with --ep {ep} and --sharding {setup.sharding.value}"
                            f"{' --offload ' + setup.offload.value if setup.offload.value != 'none' else ''}: "
                            "transformers lays expert parallelism over its FSDP2 ranks (DistributedConfig fsdp_size, "
                            "ep_size; Trainer wraps such a model in nothing else): use --sharding fsdp without offload")
    if setup.num_gpus > ep and setup.fsdp_shard.value != "full-shard":
        raise VramcalcError("--ep over FSDP ranks with --fsdp-shard shard-grad-op: transformers' FSDP2 plan frees "
                            "every layer after its forward (reshard_after_forward=True, distributed/fsdp.py:219-221)")
    method = setup.method.value
    if method not in ("full", "lora") or setup.method.peft_facts is not None:
        raise VramcalcError(f"--ep with --method {method}: modelled for full and lora (transformers' expert plan "
                            "shards nn.Parameter experts; bitsandbytes and peft's other methods are not modelled)")
    if setup.loss.value != "hf" or setup.task.value != "sft" or setup.stack.value != "hf":
        raise VramcalcError("--ep is modelled for --task sft on the hf stack with --loss hf")
    if setup.packing or setup.compile or setup.activation_offload or setup.kernels.value != "none":
        raise VramcalcError("--ep is modelled without --packing, --compile, --activation-offload and --kernels")
    if setup.optimizer_in_backward or setup.optimizer.value not in ("adamw", "adamw-foreach", "sgd", "sgd-momentum"):
        raise VramcalcError(f"--ep with --optimizer {setup.optimizer.value}: modelled for torch's optimizers on "
                            "DTensor parameters (adamw, adamw-foreach, sgd, sgd-momentum)")
    if setup.precision.value == "fp8":
        raise VramcalcError("--ep with --precision fp8 is not modelled")
    if setup.grad_ckpt.caches_ops:
        raise VramcalcError(f"--ep with --grad-ckpt {setup.grad_ckpt.value} is not modelled")


# -- context parallelism (--cp) ---------------------------------------------------------------------------------------
def check_context_parallel(model: ModelSpec, setup) -> None:
    """One error line for a ``--cp`` the real stack refuses or that vramcalc does not model.

    The stack (transformers 5.25.0 Trainer + accelerate 1.16 + torch 2.13):
    - accelerate builds the mesh ``(dp_replicate, dp_shard, cp, sp, tp)`` (parallelism_config.py:247-262) and shards
      the model with FSDP2 over the flattened ``dp_shard_cp`` dimension (:141-153, :224-225); cp needs an FSDP2
      plugin (state.py:961-971): N = dp_shard x cp x tp and ``--sharding fsdp``;
    - Trainer allows only SDPA attention under cp (trainer.py:2458-2462) and only causal masks (:2483-2496);
      accelerate drops the mask and forces ``is_causal=True`` in every ``self_attn`` and refuses a model whose layers
      are not all full attention (big_modeling.py:786-800, transformers modeling_utils.py:1148-1163: sliding-window,
      chunked or recurrent layers);
    - torch's ring attention dispatches only the flash, memory-efficient and cuDNN SDPA kernels
      (_context_parallel/_attention.py:897-934: "CP only supports flash attention and memory efficient attention
      now"), and balances the causal work with its head-tail load balancer only when the sequence divides into
      2 x cp chunks (_load_balancer.py:470-478; otherwise it silently runs unbalanced, and the last rank does most of
      the attention).
    """
    cp = setup.cp
    if cp == 1:
        return
    tp = setup.tp
    if stage_gpus(setup) % (cp * tp):
        pp = getattr(setup, "pp", 1)
        raise VramcalcError(f"--num-gpus {setup.num_gpus} is not a multiple of --cp {cp} x --tp {tp}"
                            f"{f' x --pp {pp}' if pp > 1 else ''}: accelerate's mesh is dp_shard x cp x tp "
                            "(parallelism_config.py:168)")
    if setup.sharding.value != "fsdp" or setup.offload.value != "none":
        raise VramcalcError(f"--cp with --sharding {setup.sharding.value}"
                            f"{' and --offload ' + setup.offload.value if setup.offload.value != 'none' else ''}: "
                            "accelerate runs context parallelism only under FSDP2, sharding over dp_shard x cp "
                            "(state.py:961-971); use --sharding fsdp without offload")
    if not model.traits.supports_sdpa:
        raise VramcalcError(f"--cp on {model.name}: {model.family} has no sdpa attention in transformers, and Trainer "
                            "allows context parallelism only with sdpa (trainer.py:2458-2462)")
    if setup.attn.value != "sdpa":
        raise VramcalcError(f"--cp with --attn {setup.attn.value}: Trainer allows context parallelism only with sdpa "
                            "attention (transformers 5.25.0 trainer.py:2458-2462), whose flash/efficient kernels "
                            "torch's ring attention replaces (_attention.py:897-934)")
    if model.sliding_window or any(t != "full_attention" for t in model.layer_types) or model.traits.short_conv:
        raise VramcalcError(f"--cp on {model.name}: context parallelism drops the attention mask and forces causal "
                            "attention, so accelerate refuses models with sliding-window, chunked or recurrent layers "
                            "(big_modeling.py:786-800, transformers modeling_utils.py:1148-1163)")
    if model.is_moe or model.kv_lora_rank:
        raise VramcalcError(f"--cp is modelled for dense decoders with standard attention; {model.name} is "
                            f"{'MoE' if model.is_moe else 'MLA'}")
    if setup.padded_seq_len % (2 * cp):
        raise VramcalcError(f"--seq-len {setup.padded_seq_len} with --cp {cp}: torch's head-tail load balancer needs "
                            f"the sequence in 2 x cp = {2 * cp} equal chunks (_load_balancer.py:475); use a multiple "
                            f"of {2 * cp}")
    method = setup.method.value
    if method not in ("full", "lora"):
        raise VramcalcError(f"--cp with --method {method}: modelled for full and lora")
    if setup.packing:
        raise VramcalcError("--cp with --packing: context parallelism supports only causal masks over one sequence "
                            "(trainer.py:2483-2496); packed documents would attend across their boundaries")
    if setup.task.value != "sft" or setup.stack.value != "hf":
        raise VramcalcError("--cp is modelled for --task sft on the hf stack (Trainer's ParallelismConfig)")
    if setup.activation_offload or setup.kernels.value != "none" or setup.optimizer_in_backward:
        raise VramcalcError("--cp is modelled without --activation-offload, --kernels and --optimizer-in-backward")
    if setup.device_map.value != "none":
        raise VramcalcError("--cp is not modelled with --device-map")


# -- pipeline parallelism (--pp) --------------------------------------------------------------------------------------
PP_OPTIMIZERS = ("adamw", "adamw-foreach", "sgd", "sgd-momentum")  # torch's, on (DTensor) shards


def pipeline_microbatches(setup) -> int:
    """M: the microbatches the local batch is cut into, ``--pp-microbatches`` or torchtitan@9dec370's default, the
    pipeline degree (``pipeline_parallel_microbatches or parallel_dims.pp``, parallelisms/pipeline_llama.py:67-69)."""
    return setup.pp_microbatches or setup.pp


def check_pipeline_degree(model: ModelSpec, setup) -> None:
    """One error line for a ``--pp`` the real stack refuses or that vramcalc does not model
    (``terms/pipeline_parallel.py`` says what it models).

    The stack: torchtitan@9dec370 cuts the layers into pp x stages-per-rank stages (``generate_split_points``, which
    refuses more stages than layers: parallelisms/pipelining_utils.py:33-34) and runs torch.distributed.pipelining's
    schedule over them (torch 2.13: ``Schedule1F1B`` refuses fewer microbatches than stages, schedules.py:1020-1024;
    ``ScheduleInterleaved1F1B`` needs M a multiple of max(1, M // pp), :2936-2943); each stage's model is FSDP2-sharded
    over the data-parallel ranks (``apply_fsdp``) or not at all: torchtitan's DDP refuses a second parallel dimension
    (parallelize_llama.py@9dec370: "DDP has not supported > 1D parallelism"), and torchtitan has no gradient
    accumulation at that commit (train.py: one batch per step).
    """
    pp = getattr(setup, "pp", 1)
    if pp == 1:
        return
    schedule = setup.pp_schedule
    if setup.num_gpus % pp:
        raise VramcalcError(f"--num-gpus {setup.num_gpus} is not a multiple of --pp {pp}: --num-gpus is the product "
                            "of the parallel degrees (pp x dp_shard x cp x tp)")
    stages = pp * schedule.stages_per_rank
    if stages > model.num_layers:
        raise VramcalcError(f"--pp {pp} with --pp-schedule {schedule.value} makes {stages} stages, more than "
                            f"{model.name}'s {model.num_layers} layers (torchtitan: \"Total stages cannot be greater "
                            "than the number of layers\")")
    microbatches = pipeline_microbatches(setup)
    if setup.batch_size % microbatches:
        raise VramcalcError(f"--batch-size {setup.batch_size} does not divide into --pp-microbatches {microbatches}: "
                            "the local batch is cut into equal microbatches (torchtitan: \"must be evenly divisible by "
                            "the number of microbatches\")")
    if schedule.value == "1f1b" and microbatches < pp:
        raise VramcalcError(f"--pp-schedule 1f1b with {microbatches} microbatches on {pp} stages: torch's Schedule1F1B "
                            "needs at least as many microbatches as stages (schedules.py:1020-1024)")
    if schedule.value == "interleaved-1f1b" and microbatches % max(1, microbatches // pp):
        raise VramcalcError(f"--pp-schedule interleaved-1f1b with {microbatches} microbatches on {pp} ranks: torch "
                            f"needs a multiple of the rounds, max(1, {microbatches} // {pp}) (schedules.py:2936-2943)")
    if setup.sharding.value not in ("none", "fsdp") or setup.offload.value != "none":
        raise VramcalcError(f"--pp with --sharding {setup.sharding.value}"
                            f"{' --offload ' + setup.offload.value if setup.offload.value != 'none' else ''}: "
                            "torchtitan shards each stage with FSDP2 or not at all (its DDP refuses a second "
                            "parallel dimension); use --sharding fsdp or none, without offload")
    if setup.sharding.value == "none" and stage_gpus(setup) > setup.tp * getattr(setup, "cp", 1):
        raise VramcalcError(f"--num-gpus {setup.num_gpus} with --pp {pp} leaves data-parallel ranks: give --sharding "
                            f"fsdp for them, or --num-gpus {pp * setup.tp * getattr(setup, 'cp', 1)}")
    if setup.method.value != "full":
        raise VramcalcError(f"--pp with --method {setup.method.value}: modelled for full training (torchtitan)")
    if model.is_moe or model.vision is not None or model.traits.short_conv or len(set(model.layer_types)) > 1 \
            or model.kv_lora_rank or model.nope_layers:
        raise VramcalcError(f"--pp is modelled for dense decoders whose layers are all alike; {model.name} is not")
    if model.tie_word_embeddings:
        raise VramcalcError(f"--pp on {model.name}: its lm_head shares the embedding's weight, which a pipeline puts on "
                            "the first and the last stage (torchtitan's Llama does not tie them)")
    if setup.grad_accum > 1:
        raise VramcalcError("--pp with --grad-accum: the pipeline's microbatches are its accumulation (torchtitan "
                            "runs one batch per step); use --pp-microbatches")
    if setup.loss.value != "hf" or setup.task.value != "sft" or setup.stack.value != "hf":
        raise VramcalcError("--pp is modelled for --task sft on the hf stack with --loss hf (torchtitan's "
                            "cross-entropy on the last stage's logits)")
    if setup.activation_offload or setup.kernels.value != "none" or setup.packing \
            or setup.optimizer_in_backward or setup.loop_keeps_outputs:
        raise VramcalcError("--pp is modelled without --activation-offload, --kernels, --packing, "
                            "--optimizer-in-backward and --loop-keeps-outputs")
    if setup.compile and setup.compile_loss:
        raise VramcalcError("--pp with --compile is modelled as torchtitan@9dec370 compiles: each TransformerBlock, "
                            "the loss eager (apply_compile); add --no-compile-loss")
    if setup.precision.value.startswith("mixed") and setup.sharding.value != "fsdp":
        raise VramcalcError(f"--pp with --precision {setup.precision.value} and no --sharding fsdp: torchtitan's "
                            "mixed precision is FSDP2's MixedPrecisionPolicy (no autocast), so a stage without it "
                            "computes in its stored dtype; use --precision bf16, fp16 or fp32, or --sharding fsdp")
    if setup.optimizer.value not in PP_OPTIMIZERS:
        raise VramcalcError(f"--pp with --optimizer {setup.optimizer.value}: modelled for torch's optimizers "
                            f"({', '.join(PP_OPTIMIZERS)})")
    if getattr(setup, "ep", 1) > 1 or setup.device_map.value != "none":
        raise VramcalcError("--pp with --ep or --device-map is not modelled")
