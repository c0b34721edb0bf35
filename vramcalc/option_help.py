"""What each training option means, in the words a user reads: one text per ``TrainingSetup`` field, shared by the
CLI's ``--help`` and the web page's form (each adds the default, which ``TrainingSetup`` states once)."""

from __future__ import annotations

SETUP_OPTION_HELP: dict[str, str] = {
    "method": "full | lora | qlora | prompt",
    "precision": "fp32 | mixed-bf16 | mixed-fp16 | bf16 | fp16 | fp8",
    "optimizer": "adamw | adamw-foreach | adamw-8bit | paged-adamw | paged-adamw-8bit | sgd | sgd-momentum | adafactor",
    "batch_size": "micro-batch per GPU (sequences)",
    "seq_len": "tokens per sequence",
    "grad_ckpt": "gradient checkpointing on",
    "attn": "attention kernel: sdpa | flash | eager",
    "lora_rank": "LoRA rank r (lora, qlora)",
    "lora_targets": "qv | all-linear | comma list of module names (lora, qlora)",
    "lora_dropout": "LoRA dropout probability, 0 to <1 (lora, qlora)",
    "quant": "4-bit base weights: nf4 | fp4 (qlora)",
    "double_quant": "quantize the quantization constants too (qlora)",
    "compute_dtype": "bf16 | fp16 | fp32 (qlora bnb_4bit_compute_dtype)",
    "virtual_tokens": "prompt tuning virtual tokens (prompt)",
    "adapter_dtype": "dtype of the trained adapter weights: fp32 | bf16 (lora, qlora, prompt)",
    "grad_accum": "gradient accumulation steps",
    "loss": "loss implementation: hf | chunked | fused",
    "num_gpus": "GPUs the job runs on",
    "sharding": "none | ddp | zero1 | zero2 | zero3 | fsdp",
    "fsdp_shard": "full-shard | shard-grad-op (with --sharding fsdp)",
    "offload": "none | optimizer | params (zero1-3: optimizer; zero3 and fsdp: params)",
    "global_batch_size": "sequences per step over all GPUs (sets --batch-size)",
}


def option_help(name: str) -> str:
    """The help text of a setup option ('' for an option that has none yet)."""
    return SETUP_OPTION_HELP.get(name, "")
