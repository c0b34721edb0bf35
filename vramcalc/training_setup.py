"""TrainingSetup: everything about a fine-tuning job except the model, resolved and validated.

``resolve_setup`` turns user keywords (any of them ``None`` = "use the default") into a TrainingSetup. The defaults
are what a current transformers v5 + peft + Trainer user gets; ``defaulted`` lists which ones were filled in.
Bad values raise VramcalcError with one line that names the value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import VramcalcError, positive_int
from .model import ModelSpec
from .options import (
    AdapterDtype,
    Attention,
    ComputeDtype,
    FsdpShard,
    Loss,
    Method,
    Offload,
    Optimizer,
    Precision,
    Quant,
    Sharding,
)

LORA_TARGET_WORDS = ("qv", "all-linear")


@dataclass(frozen=True)
class TrainingSetup:
    method: Method = Method.FULL
    precision: Precision = Precision.BF16  # transformers v5 loads dtype="auto" (bf16 checkpoints); Trainer bf16=True
    optimizer: Optimizer = Optimizer.ADAMW  # Trainer default optim "adamw_torch_fused" (torch >= 2.8)
    batch_size: int = 1  # per device micro-batch
    seq_len: int = 2048
    grad_ckpt: bool = False  # TrainingArguments.gradient_checkpointing default
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
    offload: Offload = Offload.NONE
    global_batch_size: int | None = None  # sequences per optimizer step over all GPUs; sets batch_size when given

    @property
    def tokens(self) -> int:
        """Tokens one micro-batch puts through the model (prompt tuning prepends its virtual tokens)."""
        return self.batch_size * self.padded_seq_len

    @property
    def padded_seq_len(self) -> int:
        return self.seq_len + (self.virtual_tokens if self.method is Method.PROMPT else 0)

    def to_dict(self) -> dict:
        out = {}
        for key, value in asdict(self).items():
            if isinstance(value, tuple):
                value = ",".join(value)
            out[key] = value.value if hasattr(value, "value") else value
        return out


@dataclass(frozen=True)
class ResolvedSetup:
    setup: TrainingSetup
    attn_used: Attention  # after the family's silent fallback (Gemma-2: eager)
    lora_modules: tuple[str, ...]  # peft target module names, resolved for the family
    defaulted: tuple[str, ...]  # options the user did not give
    warnings: tuple[str, ...] = field(default=())


_LORA_OPTIONS = ("lora_rank", "lora_targets", "lora_dropout", "adapter_dtype")
_QLORA_OPTIONS = ("quant", "double_quant", "compute_dtype")
_PROMPT_OPTIONS = ("virtual_tokens",)
METHOD_OPTIONS = {  # the options that belong to one method; every other method rejects them
    Method.FULL: (),
    Method.LORA: _LORA_OPTIONS,
    Method.QLORA: _LORA_OPTIONS + _QLORA_OPTIONS,
    Method.PROMPT: _PROMPT_OPTIONS + ("adapter_dtype",),
}
METHOD_SPECIFIC_OPTIONS = _LORA_OPTIONS + _QLORA_OPTIONS + _PROMPT_OPTIONS


def options_for(method: Method) -> tuple[str, ...]:
    """The method-specific options that ``method`` accepts."""
    return METHOD_OPTIONS[method]


def resolve_setup(model: ModelSpec, **options) -> ResolvedSetup:
    """Validate user options against each other and the model; fill defaults. Unknown keywords are errors."""
    known = TrainingSetup.__dataclass_fields__
    for key in options:
        if key not in known:
            raise VramcalcError(f"unknown option {key!r}; options are: {', '.join(known)}")
    given = {key: value for key, value in options.items() if value is not None}
    defaulted = tuple(key for key in known if key not in given
                      and not (key == "batch_size" and "global_batch_size" in given))

    method = Method.parse(given.get("method", Method.FULL), "method")
    _reject_foreign_options(method, given)

    default_targets = ("qv",)
    values = dict(
        method=method,
        precision=Precision.parse(given.get("precision", Precision.BF16), "precision"),
        optimizer=Optimizer.parse(given.get("optimizer", Optimizer.ADAMW), "optimizer"),
        batch_size=positive_int(given.get("batch_size", 1), "batch size"),
        seq_len=positive_int(given.get("seq_len", 2048), "sequence length"),
        grad_ckpt=_bool(given.get("grad_ckpt", False), "grad_ckpt"),
        attn=Attention.parse(given.get("attn", Attention.SDPA), "attention"),
        lora_rank=positive_int(given.get("lora_rank", 8), "LoRA rank"),
        lora_targets=_targets(given.get("lora_targets", default_targets)),
        lora_dropout=_probability(given.get("lora_dropout", 0.0)),
        quant=Quant.parse(given.get("quant", Quant.NF4), "quantization"),
        double_quant=_bool(given.get("double_quant", True), "double_quant"),
        compute_dtype=ComputeDtype.parse(given.get("compute_dtype", ComputeDtype.BF16), "compute dtype"),
        virtual_tokens=positive_int(given.get("virtual_tokens", 20), "number of virtual tokens"),
        adapter_dtype=AdapterDtype.parse(given.get("adapter_dtype", AdapterDtype.FP32), "adapter dtype"),
        grad_accum=positive_int(given.get("grad_accum", 1), "gradient accumulation steps"),
        loss=Loss.parse(given.get("loss", Loss.HF), "loss"),
        num_gpus=positive_int(given.get("num_gpus", 1), "number of GPUs"),
        sharding=Sharding.parse(given.get("sharding", Sharding.NONE), "sharding"),
        fsdp_shard=FsdpShard.parse(given.get("fsdp_shard", FsdpShard.FULL_SHARD), "FSDP sharding strategy"),
        offload=Offload.parse(given.get("offload", Offload.NONE), "offload"),
    )
    if "global_batch_size" in given:
        values["global_batch_size"] = positive_int(given["global_batch_size"], "global batch size")
        values["batch_size"] = _per_device_batch(values, "batch_size" in given)
    setup = TrainingSetup(**values)
    _check_combination(setup)
    if "fsdp_shard" in given and setup.sharding is not Sharding.FSDP:
        raise VramcalcError(f"--fsdp-shard applies to --sharding fsdp, not {setup.sharding.value!r}")

    warnings = []
    if setup.num_gpus > 1 and setup.sharding is Sharding.NONE:
        warnings.append(f"{setup.num_gpus} GPUs without --sharding: each GPU is estimated as an independent copy "
                        "(no DDP buckets); give --sharding ddp, zero1-3 or fsdp for data parallelism")
    attn_used = setup.attn
    if setup.attn is Attention.SDPA and not model.traits.supports_sdpa:
        attn_used = Attention.EAGER
        warnings.append(f"{model.family} does not support sdpa: transformers falls back to eager attention")
    context = model.max_position_embeddings
    if context and setup.padded_seq_len > context:
        warnings.append(
            f"sequence length {setup.padded_seq_len} exceeds {model.name}'s context of {context} tokens; estimating anyway"
        )
    lora_modules = _lora_modules(model, setup) if setup.method.uses_lora else ()
    return ResolvedSetup(setup, attn_used, lora_modules, defaulted, tuple(warnings))


def _reject_foreign_options(method: Method, given: dict) -> None:
    """LoRA options with --method full and the like: say which option does not belong."""
    allowed = options_for(method)
    for key in METHOD_SPECIFIC_OPTIONS:
        if key in given and key not in allowed:
            flag = "--" + key.replace("_", "-")
            raise VramcalcError(f"{flag} does not apply to --method {method.value}")


def _check_combination(setup: TrainingSetup) -> None:
    if setup.method is Method.QLORA and setup.precision in (Precision.FP32, Precision.FP8):
        raise VramcalcError(
            f"qlora with precision {setup.precision.value} makes no sense: the 4-bit base computes in 16 bits; "
            "use bf16, fp16, mixed-bf16 or mixed-fp16"
        )
    if setup.sharding is not Sharding.NONE and setup.num_gpus == 1:
        raise VramcalcError(f"sharding {setup.sharding.value!r} needs --num-gpus of 2 or more")
    _check_offload(setup)


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


def _per_device_batch(values: dict, batch_given: bool) -> int:
    """global batch = micro-batch x GPUs x accumulation steps: the micro-batch it implies, or why none does."""
    total, gpus, accum = values["global_batch_size"], values["num_gpus"], values["grad_accum"]
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
        p = float(value)
    except (TypeError, ValueError):
        raise VramcalcError(f"LoRA dropout must be a number in [0, 1), got {value!r}") from None
    if not (0.0 <= p < 1.0):
        raise VramcalcError(f"LoRA dropout must be in [0, 1), got {value!r}")
    return p


def _bool(value, what: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise VramcalcError(f"{what} must be true or false, got {value!r}")


def _targets(value) -> tuple[str, ...]:
    """'qv', 'all-linear', 'q_proj,v_proj' or a list of module names."""
    if isinstance(value, str):
        names = [part.strip() for part in value.split(",")]
    else:
        names = [str(part).strip() for part in value]
    names = [name for name in names if name]
    if not names:
        raise VramcalcError("LoRA targets are empty; give qv, all-linear or a comma list of module names")
    words = [name.lower() for name in names]
    if len(words) == 1 and words[0] in LORA_TARGET_WORDS:
        return (words[0],)
    return tuple(names)


def _lora_modules(model: ModelSpec, setup: TrainingSetup) -> tuple[str, ...]:
    """peft target_modules for the family: 'qv' is the family's query/value projections (peft's default for
    llama-style models), 'all-linear' every nn.Linear but lm_head (peft ``_maybe_include_all_linear_layers``;
    v5 3-D experts and routers are not nn.Linear, so it skips them)."""
    linears = {module.name: module for module in model.inventory.linears}
    targets = setup.lora_targets
    if targets == ("qv",):
        names = model.traits.lora_qv
        if model.traits.mla and not model.q_lora_rank:
            names = ("q_proj", "kv_b_proj")
    elif targets == ("all-linear",):
        names = tuple(linears)
    else:
        unknown = [name for name in targets if name not in linears]
        if unknown:
            raise VramcalcError(
                f"LoRA target {unknown[0]!r} is not a linear layer of {model.name}; its linear layers: {', '.join(linears)}"
            )
        names = targets
    for name in names:
        module = linears[name]
        if setup.lora_rank > min(module.in_features, module.out_features):
            raise VramcalcError(
                f"LoRA rank {setup.lora_rank} is larger than {name} of {model.name} "
                f"({module.in_features} -> {module.out_features})"
            )
    return names
