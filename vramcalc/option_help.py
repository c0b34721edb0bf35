"""What each training option means, in the words a user reads: one text per ``TrainingSetup`` field, shared by the
CLI's ``--help`` and the web page's form (each adds the default, which ``TrainingSetup`` states once)."""

from __future__ import annotations

SETUP_OPTION_HELP: dict[str, str] = {
    "method": "full | lora | qlora | prompt | any peft method by peft's name: dora, adalora, ia3, ln-tuning, "
              "p-tuning, prefix, loha, lokr, oft, vera, ... (vramcalc methods lists them)",
    "precision": "fp32 | mixed-bf16 | mixed-fp16 | bf16 | fp16 | fp8 | bf16-true | fp16-true (16 bits, no autocast)",
    "optimizer": "adamw | adamw-foreach | adamw-8bit | paged-adamw | paged-adamw-8bit | sgd | sgd-momentum | adafactor "
                 "| adamw-8bit-torchao | adamw-4bit-torchao | adamw-fp8-torchao",
    "batch_size": "micro-batch per GPU (sequences)",
    "seq_len": "tokens per sequence",
    "grad_ckpt": "activation checkpointing: full (bare --grad-ckpt) | selective (save matmul outputs, recompute "
                 "the rest) | selective-op (torchtitan's: save every other mm output) | reentrant (full, as "
                 "transformers 4.x ran it: use_reentrant=True) | wrapper (full, by torch's checkpoint_wrapper around "
                 "each decoder layer, as FSDP's and accelerate's activation checkpointing apply it, with transformers' "
                 "own off: the model keeps its KV cache on) | none",
    "attn": "attention kernel: sdpa | flash | eager",
    "lora_rank": "LoRA rank r (lora, qlora), or a peft method's size knob (vramcalc methods says which)",
    "lora_targets": "qv | all-linear | comma list of module names (lora, qlora, and peft methods' target_modules)",
    "modules_to_save": "embed_tokens,lm_head (either or both; the model's own names too, e.g. Qwen v1 wte): train "
                       "them whole beside the adapters, as peft's LoraConfig modules_to_save (lora, qlora, peft's tuner "
                       "methods)",
    "lora_dropout": "LoRA dropout probability, 0 to <1 (lora, qlora)",
    "quant": "quantized base weights: nf4 | fp4 (4-bit) | int8 (LLM.int8) | int4-gptq (a GPTQ checkpoint) (qlora; a peft method with a "
             "bitsandbytes layer, e.g. dora, on that base) | none",
    "double_quant": "quantize the quantization constants too (qlora)",
    "compute_dtype": "bf16 | fp16 | fp32 (qlora bnb_4bit_compute_dtype)",
    "virtual_tokens": "virtual tokens (prompt, p-tuning, prefix, cartridge; adapter_len of adaption-prompt)",
    "adapter_dtype": "dtype of the trained adapter weights: fp32 | bf16 (lora, qlora, prompt)",
    "grad_accum": "gradient accumulation steps",
    "loss": "loss implementation: hf | hf-shifted (transformers 4.46-4.49: a shifted fp32 copy of the logits) | "
            "hf-fp32-logits (transformers 4.31-4.45: the model returns fp32 logits, the loss shifts a copy) | "
            "hf-loop (a custom loop that keeps outputs, as transformers' *_no_trainer examples) | "
            "chunked | fused (Liger, Cut Cross-Entropy) | torchtune (0.6 chunked output) | "
            "torchtune-2024 (recipes before July 2024, which keep the logits through backward) | litgpt | trl | "
            "unsloth-2024 (Unsloth before 2024.11.8: 16-bit logits kept, their gradient written in place)",
    "num_gpus": "GPUs the job runs on",
    "sharding": "none | ddp | zero1 | zero2 | zero3 | fsdp",
    "tp": "tensor-parallel degree (transformers tp_plan=\"auto\"): each GPU holds 1/tp of every attention and MLP "
          "matrix; --num-gpus = tp x data-parallel ranks (given --tp alone, --num-gpus is tp)",
    "tp_plan": "hf (transformers tp_plan=\"auto\": replicated residual stream, gathered logits) | torchtitan "
               "(torchtitan apply_tp: sequence-parallel norms, [b, s/tp, h] residual stream, vocab-parallel loss)",
    "ep": "expert-parallel degree (transformers ep_size, the model's expert plan): each GPU holds 1/ep of the "
          "experts; one group of ep GPUs shares a batch, the rest whole (given --ep alone, --num-gpus is ep), or "
          "with --num-gpus N (a multiple of ep) and --sharding fsdp every GPU its own batch, the experts sharded "
          "again over N/ep ranks and the rest over N",
    "cp": "context-parallel degree (accelerate ParallelismConfig cp_size: torch ring attention over SDPA, FSDP2 over "
          "dp_shard x cp): each GPU holds 1/cp of every sequence; needs --sharding fsdp and --attn sdpa; "
          "--num-gpus = dp_shard x cp x tp (given --cp alone, --num-gpus is cp x tp)",
    "pp": "pipeline-parallel degree (torch.distributed.pipelining as torchtitan splits and schedules it): each GPU "
          "holds one stage of the layers and the in-flight microbatches' activations; --num-gpus = pp x dp_shard x "
          "cp x tp; the estimate is the largest stage's",
    "pp_schedule": "1f1b | interleaved-1f1b | gpipe (with --pp)",
    "pp_microbatches": "microbatches the local --batch-size is split into (with --pp; default: pp)",
    "fsdp_shard": "full-shard | shard-grad-op (with --sharding fsdp)",
    "zero_bucket_size": "DeepSpeed reduce_bucket_size in elements, as the config sets it (with --sharding zero1-3; "
                        "default transformers' \"auto\": hidden_size²; DeepSpeed's own default is 5e8)",
    "zero_overlap_comm": "DeepSpeed overlap_comm under ZeRO-1/2: a second reduce bucket (with --sharding zero1-3; "
                         "ZeRO-3 overlaps anyway)",
    "offload": "none | optimizer | params (zero1-3: optimizer; zero3 and fsdp: params)",
    "global_batch_size": "sequences per step over all GPUs (sets --batch-size)",
    "stack": "hf | trl | axolotl | llama-factory | unsloth | torchtune | litgpt: start from that stack's defaults "
             "(vramcalc stacks lists them); options given explicitly win",
    "compile": "torch.compile the model (changes what is saved for backward)",
    "loop_keeps_outputs": ("a custom loop keeps the model's outputs (logits, cache) through backward until the "
                           "next call"),
    "trainer_use_cache": ("transformers 4.x's Trainer without checkpointing (ms-swift 1.x): the model runs with its "
                          "config's use_cache and returns its keys and values as a tuple, which accelerate copies to "
                          "fp32 at the call's end under autocast (dropped before backward)"),
    "grads_kept": ("the loop zeroes gradients in place instead of freeing them (zero_grad(set_to_none=False): "
                   "torch < 2.0's default, which transformers' Trainer used): every step runs beside all the "
                   "gradients"),
    "fsdp1_frozen_units": ("FSDP1 (accelerate before fsdp_version 2) with frozen decoder-layer units (peft's wrap "
                           "policy): under --grad-ckpt reentrant each layer's recomputed input and its gradient stay "
                           "until the backward ends (with --sharding fsdp)"),
    "softmax_saves_input": ("torch < 1.11: softmax saves its input as well as its output (an encoder's eager "
                            "attention keeps one more [b, heads, s, s] tensor per layer)"),
    "cuda_context_mib": ("the CUDA context your process measures (nvidia-smi after its first CUDA tensor), in place "
                         "of the GPU profile's; torch < 1.13 loads every kernel at start (over 1 GiB)"),
    "extended_mask": ("transformers 4.x's BERT adds its extended attention mask, in the parameters' dtype, to every "
                      "layer's scores (16-bit scores become fp32 under mixed precision)"),
    "compile_loss": ("with --compile, the loss is compiled too (--no-compile-loss: torchtitan before April 2025 "
                     "compiled its blocks only)"),
    "activation_offload": "keep saved activations in host memory (torchtune, Unsloth, save_on_cpu)",
    "optimizer_in_backward": "step each parameter as its gradient is ready (torchtune optimizer_in_bwd)",
    "kernels": "none | liger (Liger-Kernel RMSNorm, SwiGLU, RoPE) | unsloth (Unsloth's RMSNorm, RoPE and fused "
               "LoRA autograd for QKV, O and the MLP)",
    "packing": "padding-free packed batches (no padding, no 4-D mask)",
    "repeat_kv": "transformers < 4.54: k and v copied to every head before SDPA (grouped-query models)",
    "kbit_prep": "peft prepare_model_for_kbit_training: fp32 unquantized parameters, checkpointing on (qlora)",
    "quant_saves_input": "the quantized Linear keeps its input for backward, as bitsandbytes <= 0.43 did (qlora); "
                         "that era's transformers checkpointed reentrantly: pair it with --grad-ckpt reentrant",
    "quantize_lm_head": "quantize lm_head too, as Lightning/litgpt do (qlora)",
    "quantize_experts": "a mixture of experts whose experts are nn.Linear per expert, as transformers < 5 built "
                        "them, so bitsandbytes quantizes them (transformers 5 fuses them, left 16-bit) (qlora)",
    "stable_embedding": "litgpt: swap the embedding for bitsandbytes' StableEmbedding, as litgpt >= 0.4.13 does "
                        "(qlora; --no-stable-embedding for older litgpt)",
    "norm_fp32_product": ("a stack's own RMSNorm multiplies by its weight in fp32 and saves that fp32 product "
                          "(torchtune >= 2024-11-25, litgpt); --no-norm-fp32-product for older torchtune, whose "
                          "RMSNorm casts to the model dtype first"),
    "quant_state_dtype": "auto | bf16 | fp16 | fp32: the dtype the weights were quantized from (qlora)",
    "quant_storage": "uint8 | bf16: the dtype 4-bit codes are packed in (bnb_4bit_quant_storage); bf16 lets fsdp "
                     "shard them (qlora)",
    "gptq_group_size": "input rows per GPTQ quantization group, or -1 for one (qlora --quant int4-gptq)",
    "gptq_desc_act": "an act-order GPTQ checkpoint: auto-gptq's qlinear_cuda, a larger dequantization transient "
                     "(qlora --quant int4-gptq)",
    "gptq_kernel": "cuda-old | triton-v2: the GPTQ QuantLinear (cuda-old: optimum's auto-gptq, saves each dequantized "
                   "weight; triton-v2: fms-acceleration's, dequantizes again in backward) (qlora --quant int4-gptq)",
    "task": "sft | dpo | ipo | simpo | orpo | cpo | kto | reward | grpo | distill | classify (an encoder's)",
    "ref_model": "copy | adapter | precomputed | none: the preference tasks' reference log-probs",
    "prompt_len": "prompt tokens of each chosen/rejected row (preference tasks; not scored)",
    "interconnect": "nvlink | pcie (the link inside a node) | infiniband | ethernet (between nodes: 400 Gb/s NDR, "
                    "100 GbE per NIC); default: the GPU's NVLink, else PCIe, and InfiniBand past one node "
                    "(data/gpu_links.csv). Time and cost only",
    "teacher": "the teacher model of --task distill (GKD): a catalogue name, Hub id or config.json; same vocabulary",
    "completion_len": "scored tokens of each row (preference tasks; default seq_len - prompt_len)",
    "num_generations": "grpo: completions per prompt; --batch-size counts prompts",
    "rollout_engine": "grpo: hf (transformers generate) | vllm (colocated engine, modelled)",
    "vllm_gpu_fraction": "grpo with --rollout-engine vllm: vLLM's gpu_memory_utilization, 0 to 1",
    "device_map": "none | auto: from_pretrained(device_map=\"auto\"): the layers spread over --num-gpus GPUs, one "
                  "computing at a time (no --sharding); the peak is the fullest GPU's (plan ignores it)",
    "load": "per-tensor | per-layer | whole-model | requantize: how the weights reach the GPU (the load phase; requantize: torchtune 0.1.x + torchao 0.1)",
    "images": "images per sample for a vision-language model (smolvlm, idefics3, gemma3, qwen2_5_vl, mllama); image tokens count "
              "toward --seq-len, which is every token the language model sees",
    "image_size": "pixels of a square image: SmolVLM/Idefics3 split it into ceil(S/tile)^2 tiles plus a global one "
                  "(Gemma-3 resizes every image to its tile; Qwen2.5-VL to multiples of 28 px, (H/14)(W/14)/4 "
                  "tokens, 448 px when not given)",
    "image_tokens": "image tokens per image in the language model, instead of --image-size (a multiple of one "
                    "tile's tokens)",
    "vision": "frozen | lora | full: what trains in the vision tower and projector (default: full with --method "
              "full, lora with --method lora, as peft's suffix-matched targets reach the tower)",
}


def option_help(name: str) -> str:
    """The help text of a setup option ('' for an option that has none yet)."""
    return SETUP_OPTION_HELP.get(name, "")
