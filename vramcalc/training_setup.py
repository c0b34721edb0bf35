"""TrainingSetup: everything about a fine-tuning job except the model, resolved and validated.

``resolve_setup`` turns user keywords (any of them ``None`` = "use the default") into a TrainingSetup. The defaults
are what a current transformers v5 + peft + Trainer user gets; ``defaulted`` lists which ones were filled in.
Bad values raise VramcalcError with one line that names the value.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields

from .errors import VramcalcError, positive_int, short_repr
from .model import ModelSpec, cached_field_hash, state_without_hash
from .options import (
    AdapterDtype,
    Attention,
    DeviceMap,
    ComputeDtype,
    FsdpShard,
    GradCkpt,
    Interconnect,
    Kernels,
    LoadPath,
    Loss,
    Method,
    Offload,
    PipelineSchedule,
    Optimizer,
    Precision,
    Quant,
    QuantStateDtype,
    QuantStorage,
    GptqKernel,
    RefModel,
    RolloutEngine,
    Sharding,
    Stack,
    Task,
    TpPlan,
    Vision,
)
from . import gptq, parallel_degrees
from .stacks import preset
from .task_setup import check_classify, check_teacher, resolve_task, task_warnings
from .vision import resolve_images

LORA_TARGET_WORDS = ("qv", "all-linear")
# The stacks that hand peft ``LoraConfig(target_modules="all-linear")`` as the user writes it (Trainer + peft, TRL's
# SFTTrainer with the user's peft_config), so that peft resolves the string itself (``_lora_modules``). The others
# expand all-linear to module names before peft sees it: axolotl ``lora_target_linear`` (``find_all_linear_names``)
# and LLaMA-Factory ``lora_target: all`` (model_utils/misc.py ``find_all_linear_modules``) to the Linear layers'
# leaf names, unsloth to its 7 projections (unsloth/models/llama.py:3061-3076); torchtune and litgpt build their own
# LoRA layers.
ALL_LINEAR_STRING_STACKS = (Stack.HF, Stack.TRL)
# families where peft's literal all-linear breaks the step: a module that subclasses nn.Linear but returns a tuple
# gets a lora.Linear wrapper, whose forward fails on ``result.dtype`` (peft/tuners/lora/layer.py L1089). Estimated
# and traced for the nn.Linear layers of the inventory, with a warning (``all_linear_warning``).
ALL_LINEAR_BREAKS_PEFT = {
    # transformers 5.25 models/llama4/modeling_llama4.py L145-156: Llama4Router(nn.Linear).forward -> (scores, logits)
    "llama4_text": "feed_forward.router (Llama4Router, an nn.Linear whose forward returns a tuple)",
}


def _all_linear_string(setup: TrainingSetup) -> bool:
    """LoRA (lora, qlora, dora) all-linear on a stack of ``ALL_LINEAR_STRING_STACKS``."""
    return (setup.lora_targets == ("all-linear",) and setup.method.uses_lora
            and setup.stack in ALL_LINEAR_STRING_STACKS)


def peft_resolves_all_linear(setup: TrainingSetup, family: str | None) -> bool:
    """peft gets the literal ``"all-linear"`` (``_all_linear_string``) for a family not in
    ``ALL_LINEAR_BREAKS_PEFT``."""
    return _all_linear_string(setup) and family not in ALL_LINEAR_BREAKS_PEFT


def all_linear_warning(setup: TrainingSetup, family: str, lora_modules: tuple[str, ...]) -> str | None:
    """For ``ALL_LINEAR_BREAKS_PEFT``: what peft's literal all-linear does there, and the list to give instead."""
    if not (_all_linear_string(setup) and family in ALL_LINEAR_BREAKS_PEFT):
        return None
    return (f"peft 0.21's all-linear also wraps {family}'s {ALL_LINEAR_BREAKS_PEFT[family]} and the forward then "
            f"fails (peft/tuners/lora/layer.py L1089); estimated for its nn.Linear layers, which to train give as "
            f"--lora-targets {','.join(lora_modules)}")

# Bounds on the numeric options, far past any real job (the longest contexts trained are ~10**7 tokens, the largest
# micro-batches ~10**4 sequences, the largest clusters ~10**5 GPUs), so that a typo (``--batch-size 1e18``,
# ``seq_len=10**400``) is one error line instead of a hang, an overflow or a negative total.
MAX_OPTION = {
    "batch_size": 2**24, "seq_len": 2**30, "lora_rank": 2**20, "virtual_tokens": 2**20, "grad_accum": 2**30,
    "num_gpus": 2**20, "global_batch_size": 2**44, "zero_bucket_size": 2**40, "cuda_context_mib": 2**20,
}
# Every byte count vramcalc computes must stay below this: the Python estimate is exact at any size, but ``sweep``
# evaluates byte counts in numpy int64 and the trace in torch int64 sizes (both wrap past 2**63). 2**62 bytes (4 EiB)
# is a million times the memory of any GPU, and leaves a factor 2 for sums of terms below the bound.
MAX_COMPUTABLE_BYTES = 2**62


@dataclass(frozen=True)
class TrainingSetup:
    method: Method = Method.FULL
    precision: Precision = Precision.BF16  # transformers v5 loads dtype="auto" (bf16 checkpoints); Trainer bf16=True
    optimizer: Optimizer = Optimizer.ADAMW  # Trainer default optim "adamw_torch_fused" (torch >= 2.8)
    batch_size: int = 1  # per device micro-batch
    seq_len: int = 2048
    grad_ckpt: GradCkpt = GradCkpt.NONE  # TrainingArguments.gradient_checkpointing default (off)
    attn: Attention = Attention.SDPA  # transformers default attn_implementation
    lora_rank: int = 8  # peft LoraConfig r
    lora_targets: tuple[str, ...] = ("qv",)  # peft default target_modules for llama-style models: q_proj, v_proj
    lora_dropout: float = 0.0  # peft LoraConfig lora_dropout
    quant: Quant = Quant.NF4
    double_quant: bool = True
    compute_dtype: ComputeDtype = ComputeDtype.BF16  # bnb_4bit_compute_dtype
    virtual_tokens: int = 20  # peft PromptTuningConfig num_virtual_tokens (no library default; 20 in peft's docs)
    adapter_dtype: AdapterDtype = AdapterDtype.FP32  # peft autocast_adapter_dtype=True
    grad_accum: int = 1
    loss: Loss = Loss.HF
    num_gpus: int = 1
    sharding: Sharding = Sharding.NONE
    fsdp_shard: FsdpShard = FsdpShard.FULL_SHARD  # accelerate fsdp_reshard_after_forward default True
    # DeepSpeed zero_optimization.reduce_bucket_size in elements; None: transformers' "auto" (h², integrations/
    # deepspeed.py); DeepSpeed's own default when a config leaves it out is 5e8 (runtime/zero/config.py)
    zero_bucket_size: int | None = None
    zero_overlap_comm: bool = False  # DeepSpeed overlap_comm under ZeRO-1/2 (its default there; ZeRO-3's is on)
    offload: Offload = Offload.NONE
    tp: int = 1  # tensor-parallel degree (transformers tp_plan="auto"); --num-gpus = tp x data-parallel ranks
    tp_plan: TpPlan = TpPlan.HF  # whose tensor-parallel plan --tp runs: transformers' or torchtitan's (options.py)
    ep: int = 1  # expert-parallel degree (transformers ep_size, base_model_ep_plan; parallel_degrees.py)
    cp: int = 1  # context-parallel degree (accelerate cp_size, torch ring attention); --num-gpus = dp_shard x cp x tp
    # pipeline-parallel degree (torch.distributed.pipelining as torchtitan drives it, terms/pipeline_parallel.py);
    # --num-gpus = pp x dp_shard x cp x tp
    pp: int = 1
    pp_schedule: PipelineSchedule = PipelineSchedule.ONE_F_ONE_B  # torchtitan's default schedule "1F1B"
    pp_microbatches: int | None = None  # microbatches of the local batch; None: pp (torchtitan@9dec370's default)
    global_batch_size: int | None = None  # sequences per optimizer step over all GPUs; sets batch_size when given
    stack: Stack = Stack.HF  # whose defaults the other options start from (vramcalc/stacks.py)
    compile: bool = False  # torch.compile of the model (Trainer torch_compile=False)
    # with compile: the loss is compiled too. The Trainer compiles the model's forward, the loss inside it; torchtune
    # compiles its loss (training.compile_loss); torchtitan from bbb1b616e (2025-04-02, components/loss.py), before
    # which it compiled the TransformerBlocks only
    compile_loss: bool = True
    # a custom loop that keeps the model call's ``outputs`` (its logits, and without checkpointing its DynamicCache)
    # until the next call returns: ``outputs = model(**batch); loss = outputs.loss; loss.backward()``, with any loss the
    # model computes (``--loss hf-loop`` is ``hf`` with it)
    loop_keeps_outputs: bool = False
    # transformers 4.x's Trainer without checkpointing (ms-swift 1.x: ``sft.py`` sets ``model.config.use_cache =
    # False`` only under ``gradient_checkpointing``): nothing turns the config's ``use_cache`` off, so the model
    # returns every layer's keys and values as a tuple in ``outputs.past_key_values``, which accelerate's
    # ``convert_outputs_to_fp32`` copies to fp32 under autocast; ``outputs`` dies before backward
    # (``estimator._trainer_cache_fp32_bytes``)
    trainer_use_cache: bool = False
    # the loop zeroes the gradients in place between steps instead of freeing them: ``zero_grad(set_to_none=False)``,
    # torch's default before 2.0 (which transformers' Trainer ``model.zero_grad()`` took), so every forward and
    # backward runs beside all the gradients, and a new gradient is added into its .grad as under accumulation
    grads_kept: bool = False
    # FSDP1 (torch ``FullyShardedDataParallel``, accelerate before ``fsdp_version: 2``) with each decoder layer a
    # frozen unit (peft's ``fsdp_auto_wrap_policy``, which transformers' Trainer sets for a LoRA model): under
    # --grad-ckpt reentrant its reshard-only hooks keep every layer's recomputed input and its gradient until the
    # backward ends (``distributed.fsdp1_retains_recompute_inputs``); the units are otherwise modelled as FSDP2's
    fsdp1_frozen_units: bool = False
    # torch < 1.11: softmax and log_softmax save their input as well as their output (torch 1.10.0's generated
    # ``autograd/generated/Functions.h``: ``SoftmaxBackward0 { SavedVariable self_; ... SavedVariable result_; }``;
    # 1.11.0 keeps ``self_scalar_type`` only, pytorch#65242); modelled for an encoder's eager attention
    softmax_saves_input: bool = False
    # transformers 4.x's BertModel adds the extended attention mask, ``(1.0 - mask) * -10000.0`` in the parameters'
    # dtype, to every layer's scores, an all-ones mask too (4.16.2 ``modeling_utils.py:306-307``,
    # ``models/bert/modeling_bert.py:957,969,327``): 16-bit scores become the parameters' dtype before the softmax;
    # transformers 5 adds none to an unpadded batch (``masking_utils.create_bidirectional_mask``)
    extended_mask: bool = False
    # the CUDA context the process measures (MiB of nvidia-smi's used memory after its first CUDA tensor, that
    # tensor's 2 MiB segment less), in place of the GPU profile's; torch < 1.13 loads every kernel at context creation
    # (lazy module loading came with CUDA 11.7 and torch 1.13), over 1 GiB where the default profile has 500 MiB
    cuda_context_mib: int | None = None
    activation_offload: bool = False  # saved activations kept in host memory
    optimizer_in_backward: bool = False  # each parameter stepped from its post-accumulate-grad hook
    kernels: Kernels = Kernels.NONE
    packing: bool = False  # padding-free batches (DataCollatorWithFlattening); Trainer pads
    # transformers < 4.54 (before PR #39412) copies k and v to all heads (repeat_kv) before SDPA; v5 passes
    # enable_gqa=True where no mask is given (integrations/sdpa_attention.py ``use_gqa_in_sdpa``)
    repeat_kv: bool = False
    kbit_prep: bool = False  # peft prepare_model_for_kbit_training (qlora): called by the user, not by Trainer
    quant_saves_input: bool = False  # bitsandbytes >= 0.44: MatMul4Bit saves (None, B) (qlora)
    quantize_lm_head: bool = False  # transformers keeps lm_head unquantized (qlora)
    quantize_experts: bool = False  # transformers 5 fuses the experts into 3-D parameters, left 16-bit (qlora)
    quant_state_dtype: QuantStateDtype = QuantStateDtype.AUTO  # (qlora)
    quant_storage: QuantStorage = QuantStorage.UINT8  # bnb_4bit_quant_storage default (qlora)
    gptq_group_size: int = 128  # GPTQConfig group_size default (qlora --quant int4-gptq; -1: one group per column)
    gptq_desc_act: bool = False  # GPTQConfig desc_act default (qlora --quant int4-gptq)
    gptq_kernel: GptqKernel = GptqKernel.CUDA_OLD  # optimum's auto-gptq qlinear_cuda_old (qlora --quant int4-gptq)
    # litgpt >= ae798aba (2024-10-04, 0.4.13) swaps in bitsandbytes' StableEmbedding (qlora; stack_layers.py)
    stable_embedding: bool = True
    # a stack whose own RMSNorm multiplies by its weight in fp32 (``stack_layers.norm_fp32_product``: torchtune from
    # 1450d6126, 2024-11-25, and litgpt) does; False for the torchtune before it, whose hand-written RMSNorm casts
    # back to the model dtype first (``modules/rms_norm.py:38-42`` @1814feb17)
    norm_fp32_product: bool = True
    load: LoadPath = LoadPath.PER_TENSOR  # transformers v5 from_pretrained
    task: Task = Task.SFT  # what the step trains (task_setup.py)
    ref_model: RefModel = RefModel.NONE  # preference tasks: copy (full) or adapter (lora, qlora) unless given
    prompt_len: int = 0  # preference tasks: prompt tokens of each concatenated row (labels -100)
    completion_len: int | None = None  # preference tasks: scored tokens of each row; seq_len - prompt_len
    num_generations: int | None = None  # grpo: completions per prompt (GRPOConfig default 8)
    rollout_engine: RolloutEngine = RolloutEngine.HF  # grpo: transformers generate (use_vllm=False)
    vllm_gpu_fraction: float | None = None  # grpo with vllm: GRPOConfig vllm_gpu_memory_utilization (0.3)
    teacher: str | None = None  # distill: the GKD teacher model (a name vramcalc reads), 16-bit, inference mode
    interconnect: Interconnect | None = None  # None: the GPU's own link (cost.link_plan); time only, never memory
    # vision-language models (vision.py): images per sample, their size or image tokens, what trains in the tower
    images: int = 0
    image_size: int | None = None  # pixels of a square image; None: the tower's own tile size
    image_tokens: int | None = None  # image tokens per image in the language model (instead of image_size)
    vision: Vision | None = None  # None without images; else frozen, lora or full (the method's default)
    device_map: DeviceMap = DeviceMap.NONE  # from_pretrained device_map ("auto": layers across num_gpus GPUs)
    # peft LoraConfig modules_to_save: modules trained whole beside the adapters, as canonical names (embed_tokens,
    # lm_head; ``MODULES_TO_SAVE``); peft's default is none
    modules_to_save: tuple[str, ...] = ()

    __hash__ = cached_field_hash
    __getstate__ = state_without_hash

    @property
    def tokens(self) -> int:
        """Tokens one micro-batch puts through the model (prompt tuning prepends its virtual tokens)."""
        return self.batch_size * self.padded_seq_len

    @property
    def padded_seq_len(self) -> int:
        return self.seq_len + (self.virtual_tokens if self.method.prepends_tokens else 0)

    def to_dict(self) -> dict:
        """Field -> plain value (enum words, comma-joined tuples), in field order."""
        return {name: _plain(getattr(self, name)) for name in SETUP_FIELDS}


def _plain(value):
    if isinstance(value, tuple):
        return ",".join(value)
    return value.value if hasattr(value, "value") else value


SETUP_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(TrainingSetup))  # every option, in order
SETUP_DEFAULTS: dict = {f.name: f.default for f in fields(TrainingSetup)}  # the defaults, stated once above


def setup_defaults() -> dict[str, object]:
    """The default of every option as a plain value (enum words, comma-joined tuples): what ``inputs`` shows for an
    option left out. The one statement of the defaults is ``TrainingSetup`` itself."""
    return TrainingSetup().to_dict()


def defaults_sentence() -> str:
    """The defaults in a few words, for reports: "bf16, adamw, seq_len 2048, no checkpointing, sdpa; LoRA r=8 on qv"
    (read from ``TrainingSetup``, so a changed default changes the sentence)."""
    d = setup_defaults()
    checkpointing = "no checkpointing" if d["grad_ckpt"] == GradCkpt.NONE.value else f"{d['grad_ckpt']} checkpointing"
    return (f"{d['precision']}, {d['optimizer']}, seq_len {d['seq_len']}, {checkpointing}, {d['attn']}; "
            f"LoRA r={d['lora_rank']} on {d['lora_targets']}")


@dataclass(frozen=True)
class ResolvedSetup:
    setup: TrainingSetup
    attn_used: Attention  # after the family's silent fallback (Gemma-2: eager)
    lora_modules: tuple[str, ...]  # peft target module names, resolved for the family
    defaulted: tuple[str, ...]  # options that took vramcalc's default (neither given nor set by the stack)
    warnings: tuple[str, ...] = field(default=())
    origins: tuple[tuple[str, str], ...] = field(default=())  # (option, where its value came from), options not given
    # the decoder Linears are bitsandbytes Linear4bit although ``setup.quant`` is none: a peft method on a --quant
    # base, whose moments are estimated on the 16-bit base plus QLoRA's shift (``estimator._quantized_base_moments``);
    # only the selective checkpoint's op kinds read it (``activations.LayerSetup.base_4bit``)
    base_4bit: bool = False

    def origin(self, option: str) -> str:
        """'user', 'default', 'stack <name>' or 'implied by <option>': where the value of ``option`` came from."""
        return dict(self.origins).get(option, "user")

    __hash__ = cached_field_hash
    __getstate__ = state_without_hash


_LORA_OPTIONS = ("lora_rank", "lora_targets", "lora_dropout", "adapter_dtype", "modules_to_save")
_QLORA_OPTIONS = ("quant", "double_quant", "compute_dtype", "kbit_prep", "quant_saves_input", "quantize_lm_head",
                  "quantize_experts", "quant_state_dtype", "quant_storage", "stable_embedding", "gptq_group_size",
                  "gptq_desc_act", "gptq_kernel")
_PROMPT_OPTIONS = ("virtual_tokens",)
METHOD_OPTIONS = {  # the options that belong to one method; every other method rejects them
    Method.FULL: (),
    Method.LORA: _LORA_OPTIONS,
    Method.QLORA: _LORA_OPTIONS + _QLORA_OPTIONS,
    Method.PROMPT: _PROMPT_OPTIONS + ("adapter_dtype",),
}
METHOD_SPECIFIC_OPTIONS = _LORA_OPTIONS + _QLORA_OPTIONS + _PROMPT_OPTIONS


def options_for(method: Method) -> tuple[str, ...]:
    """The method-specific options that ``method`` accepts (a peft method's: ``PeftMethodFacts.options``)."""
    facts = method.peft_facts
    return METHOD_OPTIONS[method] if facts is None else facts.options


def resolve_setup(model: ModelSpec, **options) -> ResolvedSetup:
    """Validate user options against each other and the model; fill defaults. Unknown keywords are errors.

    Resolved once per (model, options): the same words give the same frozen ``ResolvedSetup`` object (each value's
    type is part of the key, so ``True`` and ``1`` stay apart). Unhashable values (a list of targets) resolve
    every time."""
    try:
        key = tuple((name, value.__class__, value) for name, value in options.items())
        return _resolve_cached(model, key)
    except TypeError:
        return _resolve(model, options)


@functools.lru_cache(maxsize=8192)
def _resolve_cached(model: ModelSpec, key: tuple) -> ResolvedSetup:
    return _resolve(model, {name: value for name, _, value in key})


def _resolve(model: ModelSpec, options: dict) -> ResolvedSetup:
    known = TrainingSetup.__dataclass_fields__
    for key in options:
        if key not in known:
            raise VramcalcError(f"unknown option {key!r}; options are: {', '.join(known)}")
    given = {key: value for key, value in options.items() if value is not None}
    method = Method.parse(given.get("method", SETUP_DEFAULTS["method"]), "method")
    _reject_foreign_options(method, given)
    stack = Stack.parse(given.get("stack", SETUP_DEFAULTS["stack"]), "stack")
    chosen, origins = _stack_choices(stack, method, given)

    values = dict(
        method=method,
        precision=Precision.parse(chosen.get("precision", SETUP_DEFAULTS["precision"]), "precision"),
        optimizer=Optimizer.parse(chosen.get("optimizer", SETUP_DEFAULTS["optimizer"]), "optimizer"),
        batch_size=positive_int(chosen.get("batch_size", SETUP_DEFAULTS["batch_size"]), "batch size",
                                MAX_OPTION["batch_size"]),
        seq_len=positive_int(chosen.get("seq_len", SETUP_DEFAULTS["seq_len"]), "sequence length",
                             MAX_OPTION["seq_len"]),
        grad_ckpt=GradCkpt.parse(chosen.get("grad_ckpt", SETUP_DEFAULTS["grad_ckpt"]), "gradient checkpointing"),
        attn=Attention.parse(chosen.get("attn", SETUP_DEFAULTS["attn"]), "attention"),
        lora_rank=positive_int(chosen.get("lora_rank", SETUP_DEFAULTS["lora_rank"]), "LoRA rank",
                               MAX_OPTION["lora_rank"]),
        lora_targets=_targets(chosen.get("lora_targets", SETUP_DEFAULTS["lora_targets"])),
        lora_dropout=_probability(chosen.get("lora_dropout", SETUP_DEFAULTS["lora_dropout"])),
        quant=Quant.parse(chosen.get("quant", SETUP_DEFAULTS["quant"]), "quantization"),
        double_quant=_bool(chosen.get("double_quant", SETUP_DEFAULTS["double_quant"]), "double_quant"),
        compute_dtype=ComputeDtype.parse(chosen.get("compute_dtype", SETUP_DEFAULTS["compute_dtype"]), "compute dtype"),
        virtual_tokens=positive_int(chosen.get("virtual_tokens", SETUP_DEFAULTS["virtual_tokens"]),
                                    "number of virtual tokens", MAX_OPTION["virtual_tokens"]),
        adapter_dtype=AdapterDtype.parse(chosen.get("adapter_dtype", SETUP_DEFAULTS["adapter_dtype"]), "adapter dtype"),
        grad_accum=positive_int(chosen.get("grad_accum", SETUP_DEFAULTS["grad_accum"]), "gradient accumulation steps",
                                MAX_OPTION["grad_accum"]),
        loss=Loss.parse(chosen.get("loss", SETUP_DEFAULTS["loss"]), "loss"),
        num_gpus=positive_int(chosen.get("num_gpus", SETUP_DEFAULTS["num_gpus"]), "number of GPUs",
                              MAX_OPTION["num_gpus"]),
        sharding=Sharding.parse(chosen.get("sharding", SETUP_DEFAULTS["sharding"]), "sharding"),
        fsdp_shard=FsdpShard.parse(chosen.get("fsdp_shard", SETUP_DEFAULTS["fsdp_shard"]), "FSDP sharding strategy"),
        zero_bucket_size=None if chosen.get("zero_bucket_size") is None else positive_int(
            chosen["zero_bucket_size"], "DeepSpeed reduce bucket size (elements)", MAX_OPTION["zero_bucket_size"]),
        zero_overlap_comm=_bool(chosen.get("zero_overlap_comm", SETUP_DEFAULTS["zero_overlap_comm"]),
                                "zero_overlap_comm"),
        offload=Offload.parse(chosen.get("offload", SETUP_DEFAULTS["offload"]), "offload"),
        tp=positive_int(chosen.get("tp", SETUP_DEFAULTS["tp"]), "tensor-parallel degree", MAX_OPTION["num_gpus"]),
        tp_plan=TpPlan.parse(chosen.get("tp_plan", SETUP_DEFAULTS["tp_plan"]), "tensor-parallel plan"),
        ep=positive_int(chosen.get("ep", SETUP_DEFAULTS["ep"]), "expert-parallel degree", MAX_OPTION["num_gpus"]),
        cp=positive_int(chosen.get("cp", SETUP_DEFAULTS["cp"]), "context-parallel degree", MAX_OPTION["num_gpus"]),
        pp=positive_int(chosen.get("pp", SETUP_DEFAULTS["pp"]), "pipeline-parallel degree", MAX_OPTION["num_gpus"]),
        pp_schedule=PipelineSchedule.parse(chosen.get("pp_schedule", SETUP_DEFAULTS["pp_schedule"]),
                                           "pipeline schedule"),
        pp_microbatches=None if chosen.get("pp_microbatches") is None else positive_int(
            chosen["pp_microbatches"], "pipeline microbatches", MAX_OPTION["batch_size"]),
        stack=stack,
        compile=_bool(chosen.get("compile", SETUP_DEFAULTS["compile"]), "compile"),
        compile_loss=_bool(chosen.get("compile_loss", SETUP_DEFAULTS["compile_loss"]), "compile_loss"),
        loop_keeps_outputs=_bool(chosen.get("loop_keeps_outputs", SETUP_DEFAULTS["loop_keeps_outputs"]),
                                 "loop_keeps_outputs"),
        trainer_use_cache=_bool(chosen.get("trainer_use_cache", SETUP_DEFAULTS["trainer_use_cache"]),
                                "trainer_use_cache"),
        grads_kept=_bool(chosen.get("grads_kept", SETUP_DEFAULTS["grads_kept"]), "grads_kept"),
        fsdp1_frozen_units=_bool(chosen.get("fsdp1_frozen_units", SETUP_DEFAULTS["fsdp1_frozen_units"]),
                                 "fsdp1_frozen_units"),
        softmax_saves_input=_bool(chosen.get("softmax_saves_input", SETUP_DEFAULTS["softmax_saves_input"]),
                                  "softmax_saves_input"),
        extended_mask=_bool(chosen.get("extended_mask", SETUP_DEFAULTS["extended_mask"]), "extended_mask"),
        cuda_context_mib=None if chosen.get("cuda_context_mib") is None else positive_int(
            chosen["cuda_context_mib"], "CUDA context (MiB)", MAX_OPTION["cuda_context_mib"]),
        activation_offload=_bool(chosen.get("activation_offload", SETUP_DEFAULTS["activation_offload"]),
                                 "activation_offload"),
        optimizer_in_backward=_bool(chosen.get("optimizer_in_backward", SETUP_DEFAULTS["optimizer_in_backward"]),
                                    "optimizer_in_backward"),
        kernels=Kernels.parse(chosen.get("kernels", SETUP_DEFAULTS["kernels"]), "kernels"),
        packing=_bool(chosen.get("packing", SETUP_DEFAULTS["packing"]), "packing"),
        repeat_kv=_bool(chosen.get("repeat_kv", SETUP_DEFAULTS["repeat_kv"]), "repeat_kv"),
        kbit_prep=_bool(chosen.get("kbit_prep", SETUP_DEFAULTS["kbit_prep"]), "kbit_prep"),
        quant_saves_input=_bool(chosen.get("quant_saves_input", SETUP_DEFAULTS["quant_saves_input"]),
                                "quant_saves_input"),
        quantize_lm_head=_bool(chosen.get("quantize_lm_head", SETUP_DEFAULTS["quantize_lm_head"]),
                               "quantize_lm_head"),
        quantize_experts=_bool(chosen.get("quantize_experts", SETUP_DEFAULTS["quantize_experts"]),
                               "quantize_experts"),
        quant_state_dtype=QuantStateDtype.parse(chosen.get("quant_state_dtype", SETUP_DEFAULTS["quant_state_dtype"]),
                                                "quant state dtype"),
        quant_storage=QuantStorage.parse(chosen.get("quant_storage", SETUP_DEFAULTS["quant_storage"]), "quant storage"),
        gptq_group_size=gptq.group_size(chosen.get("gptq_group_size", SETUP_DEFAULTS["gptq_group_size"])),
        gptq_desc_act=_bool(chosen.get("gptq_desc_act", SETUP_DEFAULTS["gptq_desc_act"]), "gptq_desc_act"),
        gptq_kernel=GptqKernel.parse(chosen.get("gptq_kernel", SETUP_DEFAULTS["gptq_kernel"]), "gptq kernel"),
        load=LoadPath.parse(chosen.get("load", SETUP_DEFAULTS["load"]), "load path"),
        stable_embedding=_bool(chosen.get("stable_embedding", SETUP_DEFAULTS["stable_embedding"]),
                               "stable_embedding"),
        norm_fp32_product=_bool(chosen.get("norm_fp32_product", SETUP_DEFAULTS["norm_fp32_product"]),
                                "norm_fp32_product"),
        interconnect=None if chosen.get("interconnect") is None else Interconnect.parse(chosen["interconnect"],
                                                                                        "interconnect"),
        device_map=DeviceMap.parse(chosen.get("device_map", SETUP_DEFAULTS["device_map"]), "device map"),
        modules_to_save=modules_to_save_names(model, chosen.get("modules_to_save", SETUP_DEFAULTS["modules_to_save"])),
    )
    _apply_peft_defaults(values, chosen, origins)  # (a peft method's base is 16-bit unless --quant: before kbit prep)
    _apply_kbit_prep(values, chosen, origins)
    if (values["optimizer_in_backward"] and origins.get("optimizer_in_backward", "").startswith("stack")
            and (values["sharding"] is not Sharding.NONE or values["grad_accum"] > 1)):
        # a preset's optimizer_in_bwd is its single-device config's (torchtune 8B_full_single_device.yaml): it yields
        # to the sharding or accumulation the user asked for, as the distributed configs leave it off
        values["optimizer_in_backward"] = False
        origins["optimizer_in_backward"] = f"stack {stack.value} (single-device config; off here)"
    _torchtune_loss_uncompiled(values, given, origins)
    resolve_task(values, given, origins, model)
    parallel_degrees.implied_num_gpus(values, given, origins)  # --tp alone: one tensor-parallel group
    if "global_batch_size" in given:
        values["global_batch_size"] = positive_int(given["global_batch_size"], "global batch size",
                                                   MAX_OPTION["global_batch_size"])
        values["batch_size"] = _per_device_batch(values, "batch_size" in given)
    resolve_images(model, values, given)  # --images, --image-size, --image-tokens, --vision (vision.py)
    setup = TrainingSetup(**values)
    parallel_degrees.check_degrees(model, setup)
    parallel_degrees.check_context_parallel(model, setup)  # --cp
    _check_combination(setup)
    _check_computable(model, setup)
    check_teacher(model, setup)
    check_classify(model, setup)
    if setup.loop_keeps_outputs and setup.loss is Loss.UNSLOTH_2024:
        raise VramcalcError("--loop-keeps-outputs with --loss unsloth-2024: Unsloth's returned logits are the tensor "
                            "its loss's backward overwrites with their gradient (kernels/cross_entropy_loss.py:256, "
                            "347 @October-2024), and its notebooks' SFTTrainer drops outputs")
    if setup.loop_keeps_outputs and not setup.loss.in_model:
        raise VramcalcError(f"--loop-keeps-outputs applies to a loss the model computes (hf, hf-shifted, "
                            f"hf-fp32-logits, model-dtype), not --loss {setup.loss.value}")
    if setup.trainer_use_cache and getattr(model, "kv_lora_rank", None):
        raise VramcalcError("--trainer-use-cache models a tuple of per-head keys and values (transformers 4.x, Qwen "
                            "v1), not an MLA model's compressed cache")
    if setup.trainer_use_cache and (setup.loss is not Loss.HF or setup.loop_keeps_outputs):
        raise VramcalcError(f"--trainer-use-cache models a Trainer's call with --loss hf (outputs dropped before "
                            f"backward), not --loss {setup.loss.value}"
                            + (" with --loop-keeps-outputs" if setup.loop_keeps_outputs else ""))
    if setup.fsdp1_frozen_units and setup.sharding is not Sharding.FSDP:
        raise VramcalcError(f"--fsdp1-frozen-units describes FSDP1's units (with --sharding fsdp), not --sharding "
                            f"{setup.sharding.value}")
    if not setup.compile_loss and not setup.compile:
        raise VramcalcError("--no-compile-loss applies with --compile (without it nothing is compiled)")
    for knob in ("pp_schedule", "pp_microbatches"):
        if given.get(knob) is not None and setup.pp == 1:
            raise VramcalcError(f"--{knob.replace('_', '-')} applies with --pp (a pipeline of 2 or more stages)")
    if "fsdp_shard" in given and setup.sharding is not Sharding.FSDP:
        raise VramcalcError(f"--fsdp-shard applies to --sharding fsdp, not {setup.sharding.value!r}")
    for knob in ("zero_bucket_size", "zero_overlap_comm"):
        if given.get(knob) not in (None, False) and not setup.sharding.is_deepspeed:
            raise VramcalcError(f"--{knob.replace('_', '-')} is a DeepSpeed ZeRO setting: it applies to --sharding "
                                f"zero1, zero2 or zero3, not {setup.sharding.value!r}")

    warnings = []
    if setup.ep > 1 and setup.num_gpus > setup.ep and model.num_experts % setup.num_gpus:
        # EP over FSDP ranks: FSDP2 cuts each rank's n/E experts in dim 0 over efsdp = N/E ranks, padded to
        # ceil(n/E / efsdp) (terms/expert_parallel.py); n/N per rank only when N divides n
        held = parallel_degrees.shard_rows(model.num_experts // setup.ep, setup.num_gpus // setup.ep)
        warnings.append(f"--ep {setup.ep} on {setup.num_gpus} GPUs: {setup.num_gpus} does not divide "
                        f"{model.name}'s {model.num_experts} experts, so FSDP2 pads each rank's expert shard to "
                        f"{held} expert(s) (an even split would be {model.num_experts / setup.num_gpus:g}); a GPU "
                        f"count dividing {model.num_experts} wastes none")
    if (parallel_degrees.stage_gpus(setup) > setup.tp * setup.ep and setup.sharding is Sharding.NONE
            and setup.device_map is DeviceMap.NONE):
        warnings.append(f"{setup.num_gpus} GPUs without --sharding: each GPU is estimated as an independent copy "
                        "(no DDP buckets); give --sharding ddp, zero1-3 or fsdp for data parallelism")
    attn_used = setup.attn
    if model.traits.alibi and setup.attn is Attention.FLASH:
        raise VramcalcError(f"{model.family} supports only eager attention (transformers' BloomAttention: ALiBi by "
                            "baddbmm, no flash_attention_2); use --attn eager")
    if model.traits.eager_fp32_scores and setup.attn is Attention.EAGER:
        raise VramcalcError(f"{model.family} under --attn eager is not modelled (its eager path casts q and k to fp32 "
                            "and runs softmax without a dtype, which CUDA autocast makes fp32 and the trace does not "
                            "emulate); use --attn sdpa or flash")
    if setup.attn is Attention.SDPA and not model.traits.supports_sdpa:
        from .terms.stack_layers import stack_layers

        dropped_in = model.traits.sdpa_dropped_in if stack_layers(setup.stack).name == "hf" else ""
        if dropped_in and "attn" in given:
            # transformers >= dropped_in refuses an explicit sdpa, so asking for it means a release that ran it
            warnings.append(f"{model.family} on --attn sdpa: transformers before {dropped_in} ran it through SDPA "
                            f"(no attention softcapping); {dropped_in} and later refuse sdpa and default to eager "
                            "(leave --attn out)")
        else:
            attn_used = Attention.EAGER
            older = f" (transformers before {dropped_in} ran it: give --attn sdpa explicitly)" if dropped_in else ""
            warnings.append(f"{model.family} does not support sdpa: transformers falls back to eager attention{older}")
    if model.family == "gpt_oss" and "MXFP4" in model.notes:  # hf_config.MXFP4_NOTE
        warnings.append("gpt_oss: an MXFP4 checkpoint is trained dequantized to bf16 (transformers cannot train "
                        "MXFP4 experts); the estimate counts the dequantized model")
    warnings += _knob_warnings(setup, attn_used) + task_warnings(setup)
    context = model.max_position_embeddings
    if context and setup.padded_seq_len > context:
        warnings.append(
            f"sequence length {setup.padded_seq_len} exceeds {model.name}'s context of {context} tokens; estimating anyway"
        )
    lora_modules = _lora_modules(model, setup) if _takes_targets(setup.method) else ()
    _check_modules_to_save(model, setup, lora_modules)
    _check_quantize_experts(model, setup, lora_modules)
    if gptq.is_gptq(setup):
        gptq.check_packable(model, setup.gptq_group_size)
    warnings += parallel_degrees.tp_warnings(setup, lora_modules)
    if setup.method.uses_lora:  # peft converts LoRA configs only (transformers_weight_conversion.py L494-496)
        from .terms.moe_lora import conversion_warning

        converted = conversion_warning(model, lora_modules, setup.lora_rank)
        if converted:
            warnings.append(converted)
        breaks = all_linear_warning(setup, model.family, lora_modules)
        if breaks:
            warnings.append(breaks)
    if "batch_size" in origins and "global_batch_size" in given:
        origins["batch_size"] = "implied by global_batch_size"
    defaulted = tuple(key for key, origin in origins.items() if origin == "default")
    return ResolvedSetup(setup, attn_used, lora_modules, defaulted, tuple(warnings), tuple(origins.items()))


def _knob_warnings(setup: TrainingSetup, attn_used: Attention) -> list[str]:
    """What the estimate can say only from a model of the library's source, and knob combinations that do not do what
    their names suggest."""
    out = []
    if setup.stack is Stack.UNSLOTH:
        out.append(f"--stack unsloth is estimate only: {preset(setup.stack).estimate_only}")
    if setup.kernels is Kernels.LIGER:
        out.append("--kernels liger is modelled from liger-kernel's source (Triton kernels need a GPU; not traced)")
    if setup.kernels is Kernels.UNSLOTH and setup.stack is not Stack.UNSLOTH:
        out.append("--kernels unsloth is modelled from Unsloth's source (Triton kernels need a GPU; not traced)")
    if (setup.kernels is Kernels.UNSLOTH and setup.method in (Method.LORA, Method.QLORA)
            and setup.lora_dropout > 0):
        out.append(f"--kernels unsloth with --lora-dropout {setup.lora_dropout:g}: Unsloth patches its fused LoRA "
                   "autograd only at dropout 0 (unsloth/models/llama.py patch_peft_model); peft's layers run instead")
    if setup.compile and setup.method is Method.QLORA:
        out.append("--compile with qlora is modelled, not traced (AOTAutograd cannot functionalize bitsandbytes' "
                   "4-bit dequantize on fake tensors)")
    from .terms.stack_layers import stack_layers

    if setup.packing and attn_used is not Attention.FLASH and not stack_layers(setup.stack).packed_block_mask:
        out.append(f"--packing with --attn {attn_used.value}: transformers builds a block-diagonal [T, T] mask for "
                   "the packed row (masking_utils.py); only --attn flash packs without a mask")
    return out


def _stack_choices(stack: Stack, method: Method, given: dict) -> tuple[dict, dict]:
    """The options as the stack sets them with the user's laid over (an explicit option wins), and where each option
    the user did not give comes from: 'stack <name>' or 'default'. A stack knob for an option the method does not
    accept is skipped."""
    allowed = options_for(method)
    runs = preset(stack).methods
    if runs and method not in runs:
        raise VramcalcError(f"--stack {stack.value} runs --method {', '.join(m.value for m in runs)} "
                            f"({preset(stack).methods_source}), not --method {method.value}")
    chosen, origins = {}, {}
    for knob in preset(stack).knobs_for(method):
        if knob.option in METHOD_SPECIFIC_OPTIONS and knob.option not in allowed:
            continue
        chosen[knob.option] = knob.value
        origins[knob.option] = f"stack {stack.value}"
    chosen.update(given)
    for key in TrainingSetup.__dataclass_fields__:
        if key in given:
            origins.pop(key, None)
        elif key not in origins:
            origins[key] = "default"
    return chosen, origins


def _torchtune_loss_uncompiled(values: dict, given: dict, origins: dict) -> None:
    """torchtune's recipes compile a loss with ``training.compile_loss``, which compiles ``CEWithChunkedOutputLoss``
    in place (``loss.compute_cross_entropy = torch.compile(...)``) but returns any other loss as a new
    ``torch.compile(loss)`` module (``torchtune/training/_compile.py:63-87`` @1814feb17; ``apply_compile_strategy``
    or ``torch.compile`` at bd2a0fc7c). ``lora_finetune_single_device`` keeps that result (``self._loss_fn =
    training.compile_loss(...)``, ``:296`` @1814feb17, ``:319`` @bd2a0fc7c); ``full_finetune_single_device``,
    ``full_finetune_distributed`` and ``lora_finetune_distributed`` call ``training.compile_loss(self._loss_fn)`` and
    drop it (``full_finetune_single_device.py:291-292`` @1814feb17, ``:281`` @bd2a0fc7c; ``full_finetune_distributed
    .py:299``, ``lora_finetune_distributed.py:302`` @1814feb17, ``:436``, ``:378`` @bd2a0fc7c). So under those recipes a
    plain ``CrossEntropyLoss`` (``--loss hf``) runs eagerly beside compiled layers: ``--no-compile-loss``, unless the
    user said otherwise."""
    if (values["stack"] is not Stack.TORCHTUNE or not values["compile"] or "compile_loss" in given
            or values["loss"] is Loss.TORCHTUNE):
        return
    if values["method"] is Method.FULL or values["sharding"] is not Sharding.NONE or values["num_gpus"] > 1:
        values["compile_loss"] = False
        origins["compile_loss"] = ("stack torchtune (full_finetune_* and lora_finetune_distributed drop "
                                   "compile_loss's result for a loss other than CEWithChunkedOutputLoss)")


def _apply_kbit_prep(values: dict, chosen: dict, origins: dict) -> None:
    """peft ``prepare_model_for_kbit_training`` (``peft/utils/other.py``): every parameter that is not 4- or 8-bit
    becomes fp32 and, by default (``use_gradient_checkpointing=True``), gradient checkpointing is turned on. So for
    QLoRA ``kbit_prep`` with 16-bit ``precision`` is the ``mixed-*`` word (fp32 unquantized params under 16-bit
    autocast), and a ``mixed-*`` QLoRA is a prepared one: the two words are kept in agreement here."""
    peft_method = values["method"].peft_facts is not None
    if peft_method and values["quant"] is Quant.NONE:
        for key in ("kbit_prep", "quant_saves_input"):
            if chosen.get(key):
                raise VramcalcError(f"--{key.replace('_', '-')} applies to a quantized base: add --quant nf4 "
                                    f"(or fp4, int8) to --method {values['method'].value}")
    if values["method"] is not Method.QLORA and not peft_method:
        return
    mixed = {Precision.BF16: Precision.MIXED_BF16, Precision.FP16: Precision.MIXED_FP16}
    prepared_explicitly = bool(values["kbit_prep"])  # by the user or the stack
    if values["kbit_prep"] and values["precision"] in (Precision.BF16_TRUE, Precision.FP16_TRUE):
        word = values["precision"].value
        raise VramcalcError(f"--kbit-prep makes the unquantized parameters fp32 for 16-bit autocast, which "
                            f"--precision {word} has not: use --precision {word[:4]} (or mixed-{word[:4]}) with "
                            "--kbit-prep")
    if values["kbit_prep"] and values["precision"] in mixed:
        values["precision"] = mixed[values["precision"]]
        origins["precision"] = "implied by kbit_prep" if "precision" in origins else "user, with kbit_prep"
    elif values["precision"].is_mixed and not values["kbit_prep"]:
        if "kbit_prep" not in origins:  # the user said --no-kbit-prep
            raise VramcalcError(f"--precision {values['precision'].value} with --method qlora is a model prepared by "
                                "prepare_model_for_kbit_training (fp32 unquantized parameters); drop --no-kbit-prep "
                                "or use --precision bf16 or fp16")
        values["kbit_prep"] = True
        origins["kbit_prep"] = "implied by precision"
    if prepared_explicitly and "grad_ckpt" not in chosen:
        values["grad_ckpt"] = GradCkpt.FULL
        origins["grad_ckpt"] = "implied by kbit_prep"


def _apply_peft_defaults(values: dict, chosen: dict, origins: dict) -> None:
    """A peft method's size knob (``--lora-rank``) left out takes peft's own default for its config argument
    (``peft_methods.PeftMethodFacts.size_default``: VeRA r=256, OFT oft_block_size=32, ...), and its base is 16-bit
    unless ``--quant`` is given (``Quant.NONE``). qlora always has a quantized base."""
    method = values["method"]
    if method is Method.QLORA and values["quant"] is Quant.NONE:
        raise VramcalcError("--quant none does not apply to --method qlora (LoRA on a quantized base); "
                            "use --method lora for a 16-bit base")
    facts = method.peft_facts
    if facts is None:
        return
    if facts.size_kwarg and "lora_rank" not in chosen:
        values["lora_rank"] = facts.size_default
        origins["lora_rank"] = f"peft {facts.config_class}.{facts.size_kwarg} default"
    if "quant" not in chosen:
        values["quant"] = Quant.NONE


def _takes_targets(method: Method) -> bool:
    """LoRA's and every peft method's with ``target_modules`` (``--lora-targets``)."""
    facts = method.peft_facts
    return method.uses_lora if facts is None else facts.targets


def _reject_foreign_options(method: Method, given: dict) -> None:
    """LoRA options with --method full and the like: say which option does not belong."""
    allowed = options_for(method)
    if "modules_to_save" in given and "modules_to_save" not in allowed:
        why = ": full fine-tuning trains every module already" if method is Method.FULL else ""
        raise VramcalcError(f"--modules-to-save applies to lora, qlora and the peft methods that take --lora-targets "
                            f"(their config's modules_to_save), not --method {method.value}{why}")
    for key in METHOD_SPECIFIC_OPTIONS:
        if key in given and key not in allowed:
            flag = "--" + key.replace("_", "-")
            raise VramcalcError(f"{flag} does not apply to --method {method.value}")


def _check_wrapper(setup: TrainingSetup) -> None:
    """``--grad-ckpt wrapper`` (torch's checkpoint_wrapper from outside, the model's KV cache on): what is modelled.
    The tasks and the Trainer-based stacks run on transformers' Trainer, which sets ``model.config.use_cache =
    args.use_cache`` (False by default; transformers 5.25 ``trainer.py:646``): full checkpointing there. Compile and
    activation offload around the wrapper are not modelled."""
    if setup.grad_ckpt is not GradCkpt.WRAPPER:
        return
    if setup.task is not Task.SFT:
        raise VramcalcError(f"--grad-ckpt wrapper with --task {setup.task.value}: TRL's trainers run on transformers' "
                            "Trainer, which turns the model's cache off (use_cache=False), so its layers save what "
                            "full checkpointing saves; use --grad-ckpt full")
    if setup.stack in (Stack.TRL, Stack.AXOLOTL, Stack.LLAMA_FACTORY, Stack.UNSLOTH):
        raise VramcalcError(f"--grad-ckpt wrapper with --stack {setup.stack.value}: its trainer is transformers' "
                            "Trainer, which turns the model's cache off (use_cache=False), so its layers save what "
                            "full checkpointing saves; use --grad-ckpt full")
    for knob, on in (("--compile", setup.compile), ("--activation-offload", setup.activation_offload)):
        if on:
            raise VramcalcError(f"--grad-ckpt wrapper with {knob} is not modelled; use --grad-ckpt full")


def _check_combination(setup: TrainingSetup) -> None:
    if setup.stack is Stack.TRL and setup.grad_ckpt.caches_ops:
        raise VramcalcError(f"--stack trl with --grad-ckpt {setup.grad_ckpt.value}: TRL's own selective checkpointing "
                            "saves attention outputs only (trl/models/selective_activation_checkpointing.py:51), not "
                            "an op-level policy (every matmul and attention output, or torchtitan's); use "
                            "--grad-ckpt full or --stack hf")
    _check_wrapper(setup)
    if setup.method is Method.QLORA and setup.precision is Precision.FP8:
        raise VramcalcError("qlora with precision fp8: the 4-bit base dequantizes to its compute dtype, not fp8; "
                            "use bf16, fp16, mixed-bf16, mixed-fp16 or fp32")
    _check_quant_storage(setup)
    gptq.check_setup(setup)  # --quant int4-gptq: what is modelled (terms/gptq.py)
    _check_device_map(setup)
    # one GPU: DeepSpeed runs any ZeRO stage with a world size of 1 (its fp32 master copy, buckets and, under ZeRO-3,
    # the partitioned-parameter machinery stay: ``deepspeed --num_gpus 1``, as QwenLM/Qwen's finetune_ds.sh runs
    # full fine-tuning of Qwen-1.8B on one A100), and FSDP2 on a one-rank mesh with CPUOffloadPolicy (the
    # parameters live on the host and come to the GPU one unit at a time)
    single_gpu = setup.sharding.is_deepspeed or (setup.sharding.shards_optimizer and setup.offload is not Offload.NONE)
    if setup.sharding is not Sharding.NONE and parallel_degrees.stage_gpus(setup) == setup.tp and not single_gpu:
        raise VramcalcError(f"sharding {setup.sharding.value!r} needs --num-gpus of 2 or more "
                            "(on one GPU: DeepSpeed ZeRO, or FSDP with --offload)")
    _check_offload(setup)
    if setup.precision is Precision.FP8 and setup.method is not Method.FULL:
        raise VramcalcError(
            f"--precision fp8 is modelled for --method full only: torchao's Float8Linear saves the input of every "
            f"converted Linear, frozen ones too (float8_linear.py: ctx.save_for_backward(input_hp, weight_hp_t)), "
            f"which {setup.method.value} with a frozen base would add to its activations and vramcalc does not "
            "estimate yet; use --precision bf16")
    if setup.grads_kept and (setup.num_gpus > 1 or setup.sharding is not Sharding.NONE or setup.optimizer_in_backward
                             or setup.stack not in (Stack.HF, Stack.AXOLOTL, Stack.LLAMA_FACTORY, Stack.TRL)):
        raise VramcalcError("--grads-kept (zero_grad(set_to_none=False) between steps) is modelled for the Trainer's "
                            "step on one GPU, without --optimizer-in-backward")
    for knob, on in (("softmax-saves-input", setup.softmax_saves_input), ("extended-mask", setup.extended_mask)):
        if on and (setup.task is not Task.CLASSIFY or setup.attn is not Attention.EAGER):
            raise VramcalcError(f"--{knob} is modelled for an encoder's eager attention (--task classify --attn "
                                "eager), the 2022 stacks that ran it")
    if setup.optimizer_in_backward and setup.grad_accum > 1:
        raise VramcalcError("--optimizer-in-backward steps each parameter as soon as its gradient is ready, so it "
                            "cannot accumulate gradients (torchtune recipes refuse gradient_accumulation_steps > 1 "
                            "with optimizer_in_bwd); use --grad-accum 1 or --no-optimizer-in-backward")
    if setup.optimizer_in_backward and setup.sharding is not Sharding.NONE:
        raise VramcalcError("--optimizer-in-backward is modelled on one GPU (or independent copies) only: under "
                            f"--sharding {setup.sharding.value} the engine's own reduction owns the gradients")
    if setup.attn is Attention.FLASH and setup.precision is Precision.FP32:
        raise VramcalcError("--attn flash needs 16-bit compute: FlashAttention-2 has no fp32 kernel (flash-attn "
                            "csrc/flash_attn/flash_api.cpp: 'FlashAttention only support fp16 and bf16 data type'); "
                            "use --attn sdpa or eager, or --precision bf16, fp16, mixed-bf16 or mixed-fp16")


def _check_quantize_experts(model: ModelSpec, setup: TrainingSetup, lora_modules: tuple[str, ...]) -> None:
    """``--quantize-experts`` (transformers < 5: each expert's projections are ``nn.Linear`` modules, which
    bitsandbytes quantizes) is modelled for a mixture of experts whose experts stay frozen: LoRA on the expert
    projections follows v5's fused layout (peft's ``ParamWrapper``, terms/moe_lora.py), not 4.x's per-expert
    Linears."""
    if not setup.quantize_experts:
        return
    from .terms.moe_lora import target_parameters

    if not model.is_moe or model.traits.dense_experts:
        raise VramcalcError(f"--quantize-experts needs a mixture-of-experts model with routed experts; {model.name} "
                            "has none")
    if setup.quant is not Quant.NF4 and setup.quant is not Quant.FP4:
        raise VramcalcError(f"--quantize-experts is modelled for a bitsandbytes 4-bit base (--quant nf4 or fp4), "
                            f"not --quant {setup.quant.value}")
    if target_parameters(model.family, lora_modules):
        raise VramcalcError("--quantize-experts keeps the experts frozen: leave the expert projections out of "
                            "--lora-targets (LoRA on transformers 4.x's per-expert Linears is not modelled)")
    if setup.ep > 1:
        raise VramcalcError("--quantize-experts is not modelled with --ep (transformers 5's expert parallelism "
                            "shards the fused experts)")


def _check_quant_storage(setup: TrainingSetup) -> None:
    """``--quant-storage bf16`` packs 4-bit codes (``options.QuantStorage``): not int8 weights, and not under
    DeepSpeed's fp16 engine, which casts every floating parameter with ``module.half()`` (deepspeed/runtime/engine.py
    ``_configure_distributed_model``) and so would convert the packed codes as numbers. FSDP is safe: transformers
    sets its mixed-precision policy to the storage dtype (transformers 5.25.0 ``distributed/fsdp.py:280-286``)."""
    if setup.quant_storage is QuantStorage.UINT8 or setup.method is not Method.QLORA:
        return
    if setup.quant is Quant.INT8:
        raise VramcalcError("--quant-storage packs 4-bit codes; --quant int8 stores int8 weights (use nf4 or fp4)")
    if setup.sharding.is_deepspeed and setup.precision in (Precision.FP16, Precision.MIXED_FP16, Precision.FP16_TRUE):
        raise VramcalcError(f"--quant-storage bf16 with DeepSpeed and --precision {setup.precision.value}: its fp16 "
                            "engine casts the module to fp16 and would corrupt the packed bf16 codes; use --precision "
                            "bf16 or mixed-bf16, or --sharding fsdp")


def _check_device_map(setup: TrainingSetup) -> None:
    """``--device-map auto`` splits one model across ``--num-gpus`` GPUs (``terms/device_map.py``): not with a
    data-parallel engine (DeepSpeed refuses a device_map, transformers ``check_and_set_device_map``; DDP/FSDP would
    replicate the split model), not on one GPU, and modelled for the supervised step of the hf stack only."""
    if setup.device_map is DeviceMap.NONE:
        return
    if setup.sharding is not Sharding.NONE:
        raise VramcalcError(f"--device-map auto splits the model across GPUs without data parallelism; it does not "
                            f"combine with --sharding {setup.sharding.value} (use one or the other)")
    if setup.num_gpus < 2:
        raise VramcalcError("--device-map auto needs --num-gpus of 2 or more (the GPUs the layers are spread over)")
    if setup.task is not Task.SFT:
        raise VramcalcError(f"--device-map auto is modelled for --task sft only, not {setup.task.value!r} (its "
                            "reference model, generation or teacher would need their own placement)")
    if setup.stack is not Stack.HF or setup.optimizer_in_backward or setup.activation_offload or setup.packing:
        raise VramcalcError("--device-map auto is modelled for the hf stack's step (transformers Trainer with "
                            "accelerate's hooks): no --stack other than hf, --optimizer-in-backward, "
                            "--activation-offload or --packing")
    if not (setup.method in (Method.FULL, Method.LORA, Method.QLORA)):
        raise VramcalcError(f"--device-map auto is modelled for --method full, lora and qlora, not "
                            f"{setup.method.value!r}")


OFFLOAD_OPTIMIZERS = (Optimizer.ADAMW, Optimizer.ADAMW_FOREACH)  # DeepSpeed's CPU Adam replaces torch AdamW


def _check_offload(setup: TrainingSetup) -> None:
    """Which engines offload what (DeepSpeed ``offload_optimizer`` stages 1-3 and ``offload_param`` stage 3 only,
    ``runtime/zero/config.py``; FSDP2 ``CPUOffloadPolicy`` moves parameters, gradients and the optimizer together)."""
    offload, sharding = setup.offload, setup.sharding
    if offload is Offload.NONE:
        return
    if not sharding.shards_optimizer:
        raise VramcalcError(f"--offload {offload.value} needs --sharding zero1, zero2, zero3 or fsdp, "
                            f"not {sharding.value!r}")
    if offload is Offload.OPTIMIZER and sharding is Sharding.FSDP:
        raise VramcalcError("FSDP offloads parameters, gradients and optimizer states together: use --offload params")
    if offload is Offload.PARAMS and sharding in (Sharding.ZERO1, Sharding.ZERO2):
        raise VramcalcError(f"--offload params needs --sharding zero3 or fsdp (DeepSpeed offloads parameters at "
                            f"stage 3 only), not {sharding.value!r}")
    if sharding.is_deepspeed and setup.optimizer not in OFFLOAD_OPTIMIZERS:
        raise VramcalcError(f"DeepSpeed offload runs its CPU Adam in place of AdamW; {setup.optimizer.value!r} "
                            "cannot be offloaded")
    if setup.optimizer.is_bnb:
        raise VramcalcError(f"{setup.optimizer.value!r} keeps its states on the GPU (paged ones page by themselves); "
                            "offload needs a torch optimizer")


def size_bound_bytes(model: ModelSpec, setup: TrainingSetup, batch_size=None, seq_len=None):
    """An upper bound, in bytes as a float, on every byte count the estimate, the sweep or the trace computes for
    this setup (elementwise when ``batch_size``/``seq_len`` are numpy arrays; the setup's own when left out).

    bound = 32·P + 64·T·(V + L·(h + a·(d_qk + d_v) + k·(d_qk + d_v) + 3·(I + K·I_m + S·I_m) + E)) + 16·b·a·s²·L
    with P stored parameters, T = b·s tokens, s the padded sequence length, S shared experts: at most 32 bytes per
    parameter (fp32 weight, gradient, two Adam moments; a master copy and gathered units stay below it since the
    16-bit weights are counted there at 4 bytes too), at most 16 saved or transient 4-byte copies of every per-token
    feature of a layer and of the logits, and 4 fp32 copies of every attention score (eager attention; the bound
    keeps it for every kernel). Each real term is a sum of a few such tensors, far below the factors used here.
    """
    b = setup.batch_size if batch_size is None else batch_size
    s = setup.padded_seq_len if seq_len is None else seq_len + (setup.padded_seq_len - setup.seq_len)
    m = model
    qk, v = float(m.qk_head_dim), float(m.v_dim)
    per_layer = (m.hidden_size + (m.num_heads + m.num_kv_heads) * (qk + v)
                 + 3.0 * (m.intermediate_size + (m.experts_per_token + m.n_shared_experts) * m.expert_width)
                 + m.num_experts)
    tokens = b * 1.0 * s
    return (32.0 * m.params + 64.0 * tokens * (m.vocab_size + m.num_layers * per_layer)
            + 16.0 * b * m.num_heads * (s * 1.0) * s * m.num_layers)


def oversize_error(bound_bytes: float) -> str:
    """The one-line reason a setup past ``MAX_COMPUTABLE_BYTES`` is refused."""
    return (f"this setup could need up to 2**{int(math.log2(max(bound_bytes, 1.0)))} bytes: past "
            f"2**62 (4 EiB), the most vramcalc computes (sweep and trace hold byte counts in 64-bit integers); "
            "use a smaller batch size, sequence length or model")


def _check_computable(model: ModelSpec, setup: TrainingSetup) -> None:
    """Refuse a setup whose byte counts could pass ``MAX_COMPUTABLE_BYTES`` (see ``size_bound_bytes``)."""
    bound = size_bound_bytes(model, setup)
    if bound >= MAX_COMPUTABLE_BYTES:
        raise VramcalcError(oversize_error(bound))


def _per_device_batch(values: dict, batch_given: bool) -> int:
    """global batch = micro-batch x GPUs x accumulation steps: the micro-batch it implies, or why none does."""
    total, gpus, accum = values["global_batch_size"], values["num_gpus"], values["grad_accum"]
    gpus = parallel_degrees.data_parallel_degree(gpus, values.get("tp", 1))  # a tp group shares one micro-batch
    gpus = parallel_degrees.data_parallel_degree(gpus, values.get("ep", 1))  # so does an --ep group
    gpus //= values.get("cp", 1)  # so does a cp group (accelerate data_loader.py:1143-1152)
    gpus //= values.get("pp", 1)  # so does a pipeline: its stages pass one batch's microbatches along
    if gpus < 1:  # degrees beyond the GPUs: ``parallel_degrees.check_degrees`` refuses them in one line
        return values["batch_size"]
    if total % (gpus * accum):
        raise VramcalcError(f"global batch size {total} is not divisible by {gpus} GPUs x {accum} accumulation "
                            f"steps; use a multiple of {gpus * accum}")
    per_device = total // (gpus * accum)
    if batch_given and values["batch_size"] != per_device:
        raise VramcalcError(f"--batch-size {values['batch_size']} x {gpus} GPUs x {accum} accumulation steps is "
                            f"not the global batch size {total}; give one of the two")
    return per_device


def _probability(value) -> float:
    try:
        if isinstance(value, bool):
            raise TypeError
        p = float(value)
    except (TypeError, ValueError, OverflowError):
        raise VramcalcError(f"LoRA dropout must be a number in [0, 1), got {short_repr(value)}") from None
    if not (0.0 <= p < 1.0):
        raise VramcalcError(f"LoRA dropout must be in [0, 1), got {short_repr(value)}")
    return p


def _bool(value, what: str) -> bool:
    if isinstance(value, bool):
        return value
    text = "" if isinstance(value, int) and value.bit_length() > 64 else str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise VramcalcError(f"{what} must be true or false, got {short_repr(value)}")


# peft ``modules_to_save`` (LoraConfig; peft 0.21.2 ``utils/other.py:1047-1130`` ``_set_trainable`` wraps every
# module whose name ends with one of them in a ``ModulesToSaveWrapper``): the modules outside the decoder layers
# vramcalc models trained whole, in the names its LoRA-target error uses, in this order
MODULES_TO_SAVE = ("embed_tokens", "lm_head")


def modules_to_save_names(model: ModelSpec, value) -> tuple[str, ...]:
    """``--modules-to-save``: a comma list (or a list of strings) of ``MODULES_TO_SAVE``, or the family's own names
    for them (``FamilyTraits.embedding_name``/``head_name``: Qwen v1 ``wte``, GPT-NeoX ``embed_in``, Falcon
    ``word_embeddings``), as the canonical names in ``MODULES_TO_SAVE`` order; empty: none."""
    names = _name_list(value, "modules to save must be a comma list of module names (embed_tokens, lm_head) or "
                              "a list of strings")
    own = {model.traits.embedding_name: "embed_tokens", model.traits.head_name: "lm_head"}
    canonical = set()
    for name in names:
        word = own.get(name, name)
        if word not in MODULES_TO_SAVE:
            aliases = "".join(f", {alias}" for alias in own if alias not in MODULES_TO_SAVE)
            raise VramcalcError(f"--modules-to-save {name!r} is not a module vramcalc models trained whole; give "
                                f"embed_tokens, lm_head{aliases} (the embedding and the output layer of {model.name})")
        canonical.add(word)
    return tuple(name for name in MODULES_TO_SAVE if name in canonical)


def peft_modules_to_save(traits, modules_to_save: tuple[str, ...]) -> list[str] | None:
    """``LoraConfig(modules_to_save=...)`` in the family's own module names (``FamilyTraits.embedding_name`` and
    ``head_name``; peft matches them by suffix and skips a name it does not find, ``utils/other.py:1088-1130``), or
    None without any (peft's default)."""
    own = {"embed_tokens": traits.embedding_name, "lm_head": traits.head_name}
    return [own[name] for name in modules_to_save] or None


def _check_modules_to_save(model: ModelSpec, setup: TrainingSetup, lora_modules: tuple[str, ...]) -> None:
    """What ``--modules-to-save`` is modelled with: LoRA, QLoRA and peft's tuner methods (the option is in
    ``_LORA_OPTIONS`` and ``PeftMethodFacts.options``) on the supervised step of a peft stack (Trainer or TRL's
    SFTTrainer with the user's config), not also a LoRA target (peft would wrap the LoRA layer's own base module), on
    one GPU or under DDP, DeepSpeed ZeRO or FSDP (the copies are trainable tensors like any other there: each engine
    replicates, partitions or shards them as it does the adapters; traced for DDP and FSDP); a quantized lm_head
    (``--quantize-lm-head``) cannot train."""
    if not setup.modules_to_save:
        return
    both = [name for name in setup.modules_to_save if name in lora_modules]
    if both:
        raise VramcalcError(f"{both[0]} is in both --lora-targets and --modules-to-save: train it with an adapter or "
                            "whole, not both")
    if setup.stack not in ALL_LINEAR_STRING_STACKS:
        raise VramcalcError(f"--modules-to-save is modelled for --stack hf and trl (peft's LoraConfig as the user "
                            f"writes it), not {setup.stack.value}")
    if "lm_head" in setup.modules_to_save and setup.quantize_lm_head:
        raise VramcalcError("--modules-to-save lm_head trains lm_head whole; a 4-bit lm_head (--quantize-lm-head) "
                            "cannot train: drop one of them")
    if setup.task is not Task.SFT:
        raise VramcalcError(f"--modules-to-save is modelled for --task sft, not {setup.task.value}")
    if (setup.tp > 1 or setup.cp > 1 or setup.pp > 1 or setup.device_map is not DeviceMap.NONE
            or model.vision is not None):
        raise VramcalcError("--modules-to-save is modelled for a text model without --tp, --cp, --pp or --device-map")


def _name_list(value, wrong: str) -> list[str]:
    """A comma list or a list of strings as stripped names, empty and repeated ones dropped (peft matches a module
    once however often its name is listed); else ``wrong``, with the value."""
    if isinstance(value, str):
        names = value.split(",")
    elif isinstance(value, (list, tuple)) and all(isinstance(part, str) for part in value):
        names = value
    else:
        raise VramcalcError(f"{wrong}, got {short_repr(value)}")
    return list(dict.fromkeys(name for name in (part.strip() for part in names) if name))


def _targets(value) -> tuple[str, ...]:
    """'qv', 'all-linear', 'q_proj,v_proj' or a list of module names."""
    names = _name_list(value, "LoRA targets must be a string (qv, all-linear or a comma list of module names) or a "
                              "list of strings")
    if not names:
        raise VramcalcError("LoRA targets are empty; give qv, all-linear or a comma list of module names")
    words = [name.lower() for name in names]
    if len(words) == 1 and words[0] in LORA_TARGET_WORDS:
        return (words[0],)
    return tuple(names)


def _lora_modules(model: ModelSpec, setup: TrainingSetup) -> tuple[str, ...]:
    """peft target_modules for the family: 'qv' is the family's query/value projections (peft's default for
    llama-style models), 'all-linear' every nn.Linear but lm_head (peft ``_maybe_include_all_linear_layers``,
    tuners/tuners_utils.py L2430-2490). v5's 3-D experts and routers are not nn.Linear, but for LoRA on a family
    peft converts (terms/moe_lora.py) peft 0.21.2 resolves the string first (``_resolve_string_target_modules``,
    peft/utils/transformers_weight_conversion.py L355-399): the nn.Linear leaf names plus the v4 names of its
    ``_MOE_TARGET_MODULE_MAPPING`` (router ``gate``, experts gate/up/down_proj or mixtral's w1/w3/w2), which the
    conversion then moves onto the fused experts and the router. So LoRA all-linear adapts the experts and the
    router there, on the stacks that hand peft the string (``peft_resolves_all_linear``); peft's other methods are
    not converted (L494-496) and keep the nn.Linear names. A list may also name ``lm_head`` (peft's ``Linear`` LoRA
    around it) and ``embed_tokens`` (peft's ``Embedding`` LoRA layer)."""
    linears = {module.name: (module.in_features, module.out_features) for module in model.inventory.linears}
    outside = {"lm_head": (model.hidden_size, model.vocab_size), "embed_tokens": (model.vocab_size, model.hidden_size)}
    targets = setup.lora_targets
    if targets == ("qv",):
        names = model.traits.lora_qv
        if model.traits.mla and not model.q_lora_rank:
            names = ("q_proj", "kv_b_proj")
    elif targets == ("all-linear",):
        from .terms.moe_lora import old_names

        converted = old_names(model.family) if peft_resolves_all_linear(setup, model.family) else ()
        names = tuple(dict.fromkeys((*linears, *converted)))
    else:
        known = {**linears, **outside}
        from .terms.moe_lora import old_names  # peft moves these onto the fused experts (terms/moe_lora.py)

        unknown = [name for name in targets if name not in known and name not in old_names(model.family)]
        if unknown:
            raise VramcalcError(
                f"LoRA target {unknown[0]!r} is not a linear layer of {model.name}; its linear layers: "
                f"{', '.join(linears)}, and lm_head, embed_tokens"
            )
        names = targets
    low_rank = setup.method.uses_lora or setup.method is Method.ADALORA  # A [r, in] and B [out, r]
    if setup.method.uses_lora:
        from .terms.moe_lora import linear_targets, target_parameters

        moved = target_parameters(model.family, names)  # raises, as peft does, on half of a fused gate/up pair
        # peft's ParamWrapper.__init__ / update_layer (tuners/lora/layer.py L2364-2374, L2427-2429) refuse these
        drop = ("list the targets without them (peft 0.21 resolves all-linear onto the experts and router)"
                if targets == ("all-linear",) else "drop the expert targets")
        if moved and setup.method is Method.DORA:
            raise VramcalcError(f"peft cannot apply DoRA to the fused experts of {model.name} (ParamWrapper: "
                                f"'does not work with use_dora=True'); {drop} or use --method lora")
        if moved and setup.lora_dropout:
            raise VramcalcError(f"peft's LoRA on the fused experts of {model.name} (ParamWrapper) does not work with "
                                f"lora_dropout != 0; give --lora-dropout 0 or {drop}")
        # transformers' expert plan makes the experts DTensor shards before peft wraps them; ParamWrapper's plain
        # lora_A/B factors then meet them in _LoraFactorsProxy's baddbmm (L2305-2323), which torch refuses
        if moved and setup.ep > 1:
            raise VramcalcError(f"peft's LoRA on the fused experts of {model.name} (ParamWrapper) fails under --ep "
                                f"{setup.ep}: its plain adapter factors meet the DTensor expert shards (torch: "
                                f"'aten.baddbmm got mixed torch.Tensor and DTensor'); give --ep 1 or {drop}")
        low_names = linear_targets(model.family, names)
    else:
        low_names = names
    for name in low_names if low_rank else ():
        rows, cols = {**linears, **outside}[name]
        if setup.lora_rank > min(rows, cols) and cols > 1:  # peft accepts r > 1 on Qwen2-MoE's Linear(h, 1) gate
            raise VramcalcError(f"LoRA rank {setup.lora_rank} is larger than {name} of {model.name} ({rows} -> {cols})")
    return names
