"""Stack presets: the option defaults of each training stack people use, each with the file that proves it.

A preset is a bundle of ``TrainingSetup`` values. ``resolve_setup`` starts from vramcalc's defaults (transformers
Trainer + peft: the ``hf`` stack), lays the chosen stack's knobs over them, then the user's own options over both:
an explicit option always wins. A knob may hold for some methods only (TRL casts QLoRA adapters to bf16 but leaves
LoRA adapters in fp32); a knob an option's method does not accept is skipped (no LoRA knob for full fine-tuning).

Sources are ``repo@commit:path:line`` of the version read (details and the mechanisms behind them in
``docs/stacks-research.md``). Stacks move: a preset states the version it was read at, and every knob is also a
flag, so a user on another version overrides the one that changed.
"""

from __future__ import annotations

from dataclasses import dataclass

from .options import Method, Stack

_ADAPTER_METHODS = (Method.LORA, Method.QLORA)


@dataclass(frozen=True)
class Knob:
    """One option a stack sets: its value (a plain word, number or bool), the source that proves it, and the methods
    it holds for (empty: every method that accepts the option)."""

    option: str
    value: object
    source: str
    methods: tuple[Method, ...] = ()

    def applies_to(self, method: Method) -> bool:
        return not self.methods or method in self.methods


@dataclass(frozen=True)
class StackPreset:
    stack: Stack
    version: str  # what was read
    summary: str
    knobs: tuple[Knob, ...]
    estimate_only: str = ""  # why vramcalc cannot trace this stack's own code on CPU ('' when it can)
    # the methods the stack's own code runs, with the source that shows it; () for a stack on peft (any method)
    methods: tuple[Method, ...] = ()
    methods_source: str = ""

    def knobs_for(self, method: Method) -> tuple[Knob, ...]:
        return tuple(knob for knob in self.knobs if knob.applies_to(method))


_TRL = "huggingface/trl 1.16.0 (PyPI wheel)"
_AXOLOTL = "axolotl-ai-cloud/axolotl@067b021c8 (0.18.0)"
_LLAMA_FACTORY = "hiyouga/LLaMA-Factory@ff6d4d12e (0.9.6.dev0)"
_UNSLOTH = "unslothai/unsloth@015bdef0d9 (2026.8.19), unsloth-zoo@ce232d6c"
_TORCHTUNE = "pytorch/torchtune@bd2a0fc7c (configs of 0.6.x)"
_LITGPT = "Lightning-AI/litgpt 0.5.13 (pyproject pins bitsandbytes>=0.45.2 on Linux) and @00af8b0d"

PRESETS: dict[Stack, StackPreset] = {
    Stack.HF: StackPreset(
        Stack.HF, "transformers 5.25, peft 0.21.2, bitsandbytes 0.50.2",
        "transformers Trainer + peft, as documented in shared/reference/memory-math.md: vramcalc's own defaults",
        ()),
    Stack.TRL: StackPreset(Stack.TRL, _TRL, "TRL SFTTrainer", (
        Knob("grad_ckpt", "full", "trl/trainer/base_config.py:62-63 (gradient_checkpointing=True; non-reentrant, "
             "transformers 5 default)"),
        Knob("loss", "trl", "trl/trainer/sft_trainer.py:1144-1147 (add_fused_lm_head, always; loss_type='nll' "
             "default, sft_config.py:283-290) -> trl/kernels/chunked_logprob.py:299 ([4096, 32768] log-prob tiles, "
             "no [T, V] logits, no torch.utils.checkpoint)"),
        Knob("adapter_dtype", "bf16", "trl/trainer/sft_trainer.py:902-911 (quantized base: trainable params except "
             "DoRA's magnitude cast to bf16)", (Method.QLORA,)),
        Knob("kbit_prep", False, "SFTTrainer never calls prepare_model_for_kbit_training (only trl/experimental/"
             "{cpo,orpo})", (Method.QLORA,)),
        Knob("packing", False, "trl/trainer/sft_config.py:222-223,238-239 (packing=False, padding_free=False)"),
        Knob("activation_offload", False, "trl/trainer/sft_config.py:291-292 (activation_offloading=False)"),
        Knob("precision", "mixed-bf16", "trl/trainer/utils.py:1332 (a model given by its id loads with dtype "
             "'float32' unless model_init_kwargs says otherwise) + base_config.py:68-74,108 (bf16 autocast)",
             (Method.FULL, Method.LORA)),
    )),
    Stack.AXOLOTL: StackPreset(Stack.AXOLOTL, _AXOLOTL, "axolotl (YAML defaults)", (
        Knob("grad_ckpt", "none", "src/axolotl/utils/schemas/config.py:600-602 (gradient_checkpointing unset)"),
        Knob("kbit_prep", False, "src/axolotl/loaders/model.py:988-1023 calls prepare_model_for_kbit_training, then "
             ":446-476 casts norms, embeddings and lm_head back to torch_dtype for LoRA/QLoRA: training stays 16-bit",
             (Method.QLORA,)),
        Knob("load", "per-tensor", "transformers from_pretrained with BitsAndBytesConfig (loaders/model.py)"),
        Knob("packing", False, "src/axolotl/utils/schemas/config.py:688-690 (sample_packing unset)"),
    )),
    Stack.LLAMA_FACTORY: StackPreset(Stack.LLAMA_FACTORY, _LLAMA_FACTORY, "LLaMA-Factory (llamafactory-cli train)", (
        Knob("grad_ckpt", "full", "src/llamafactory/hparams/model_args.py:145-152 (disable_gradient_checkpointing="
             "False; reentrant, model/model_utils/checkpointing.py:46,141)"),
        Knob("precision", "mixed-bf16", "src/llamafactory/model/adapter.py:51-52 (full fine-tuning upcasts every "
             "trainable parameter to fp32 unless pure_bf16)", (Method.FULL,)),
        Knob("kbit_prep", False, "no call of prepare_model_for_kbit_training in src/", (Method.QLORA,)),
        Knob("double_quant", True, "src/llamafactory/model/model_utils/quantization.py:186-188", (Method.QLORA,)),
    )),
    Stack.UNSLOTH: StackPreset(Stack.UNSLOTH, _UNSLOTH, "Unsloth FastLanguageModel", (
        Knob("lora_rank", 16, "unsloth/models/llama.py:3061-3076 (get_peft_model r=16)", _ADAPTER_METHODS),
        Knob("lora_targets", "all-linear", "unsloth/models/llama.py:3061-3076 (the 7 projections)", _ADAPTER_METHODS),
        Knob("lora_dropout", 0.0, "unsloth/models/llama.py:3061-3076", _ADAPTER_METHODS),
        Knob("grad_ckpt", "full", "unsloth/models/llama.py:3079 (use_gradient_checkpointing='unsloth')"),
        Knob("activation_offload", True, "unsloth-zoo unsloth_zoo/gradient_checkpointing.py:259-300 (each layer's "
             "input hidden state is copied to the host and brought back for the recompute)"),
        Knob("kbit_prep", False, "unsloth/models/_utils.py:2482-2496: its own routine casts only trainable params "
             "(unsloth-zoo training_utils.py:300-342)", (Method.QLORA,)),
        Knob("double_quant", True, "unsloth/models/llama.py:2616-2622", (Method.QLORA,)),
        Knob("loss", "fused", "unsloth/kernels/cross_entropy_loss.py:296-312 (Triton cross-entropy, no fp32 [T, V] "
             "copy); Unsloth before 2024.11.8 kept the whole 16-bit logits: --loss unsloth-2024"),
        Knob("optimizer", "adamw-8bit", "studio/backend/core/training/training.py:232 (optim defaults to "
             "'adamw_8bit'); scripts/notebook_validator.py:742 (the notebooks' SFTConfig: optim='adamw_8bit')"),
        Knob("kernels", "unsloth", "unsloth/models/llama.py LlamaDecoderLayer_fast_forward (fast_rms_layernorm), "
             "patch_peft_model (LoRA_QKV, LoRA_W, LoRA_MLP of unsloth/kernels/fast_lora.py when dropout is 0 and "
             "the bias 'none')"),
    ), estimate_only="Unsloth's kernels are Triton and need a GPU; its memory is modelled from its source",
        methods=(Method.FULL, Method.LORA, Method.QLORA, Method.DORA),
        methods_source="unsloth/models/llama.py:3061-3119 (get_peft_model builds a LoraConfig: LoRA, use_dora "
                       "through its kwargs; full_finetuning=True for full)"),
    Stack.TORCHTUNE: StackPreset(Stack.TORCHTUNE, _TORCHTUNE, "torchtune single-device recipes", (
        Knob("precision", "bf16-true", "recipes/configs/llama3_1/8B_*_single_device.yaml (dtype: bf16; "
             "training.get_dtype; no recipe enters torch.autocast)"),
        Knob("grad_ckpt", "full", "recipes/configs/llama3_1/8B_{lora,qlora,full}_single_device.yaml "
             "(enable_activation_checkpointing: True)"),
        Knob("activation_offload", False, "same configs (enable_activation_offloading: False)"),
        Knob("compile", False, "same configs (compile: False)"),
        Knob("loss", "torchtune", "torchtune 0.6.1 recipes/configs/llama3_1/8B_*_single_device.yaml "
             "(CEWithChunkedOutputLoss, 8 chunks, fp32 per chunk); recipes/lora_finetune_single_device.py:639-661 "
             "holds the chunk list until the loss is computed (recipes before July 2024: --loss torchtune-2024)"),
        Knob("optimizer", "adamw", "8B_lora_single_device.yaml (torch.optim.AdamW, fused: True)", _ADAPTER_METHODS),
        Knob("optimizer", "paged-adamw-8bit", "8B_full_single_device.yaml (bitsandbytes.optim.PagedAdamW8bit)",
             (Method.FULL,)),
        Knob("optimizer_in_backward", True, "8B_full_single_device.yaml (optimizer_in_bwd: True)", (Method.FULL,)),
        Knob("adapter_dtype", "bf16", "recipes/lora_finetune_single_device.py builds the model under "
             "set_default_dtype(bf16): adapters are bf16", _ADAPTER_METHODS),
        Knob("double_quant", True, "torchao NF4Tensor: blocks of 64 with int8 scalers per 256 blocks "
             "(torchao/dtypes/nf4tensor.py)", (Method.QLORA,)),
        Knob("load", "per-layer", "torchtune/modules/peft/lora.py:87-94 (each LoRALinear's base weight is built in "
             "bf16 on the device, then to_nf4)"),
        Knob("packing", False, "same configs (dataset packed: False)"),
    ), methods=(Method.FULL, Method.LORA, Method.QLORA, Method.DORA),
        methods_source="recipes/full_finetune_*.py, lora_finetune_*.py (LoRA, QLoRA; DoRA with use_dora: "
                       "torchtune/modules/peft/dora.py)"),
    Stack.LITGPT: StackPreset(Stack.LITGPT, _LITGPT, "litgpt finetune (Fabric, bf16-true)", (
        Knob("precision", "bf16-true", "config_hub/finetune/*/{lora,qlora,full}.yaml (precision: bf16-true; "
             "finetune/lora.py:141-150 refuses mixed precision with --quantize)"),
        Knob("adapter_dtype", "bf16", "config_hub/finetune/*/lora.yaml (precision: bf16-true: adapters bf16)",
             _ADAPTER_METHODS),
        Knob("optimizer", "adamw-foreach", "litgpt/finetune/lora.py (torch.optim.AdamW: foreach on CUDA)",
             (Method.FULL, Method.LORA)),
        Knob("optimizer", "paged-adamw", "litgpt/utils.py:546-557 (instantiate_bnb_optimizer: PagedAdamW whenever "
             "the model is quantized)", (Method.QLORA,)),
        Knob("lora_rank", 8, "litgpt/finetune/lora.py (lora_r: int = 8)", _ADAPTER_METHODS),
        Knob("lora_dropout", 0.05, "litgpt/finetune/lora.py (lora_dropout: float = 0.05)", _ADAPTER_METHODS),
        Knob("loss", "litgpt", "litgpt/finetune/lora.py:355-359 (lm_head in 128-position chunks, Fabric's fp32 "
             "outputs kept through fabric.backward), litgpt/utils.py:302-331 chunked_cross_entropy"),
        Knob("double_quant", False, "--quantize bnb.nf4 (bnb.nf4-dq is the double-quantized choice)",
             (Method.QLORA,)),
        Knob("quantize_lm_head", True, "lightning/fabric/plugins/precision/bitsandbytes.py:97,130 (every "
             "torch.nn.Linear is replaced, lm_head included; ignore_modules empty)", (Method.QLORA,)),
        Knob("quant_state_dtype", "fp16", "lightning/fabric/plugins/precision/bitsandbytes.py:221 (an fp16 copy is "
             "quantized: dequantize_4bit returns fp16, then MatMul4Bit casts to bf16)", (Method.QLORA,)),
        Knob("load", "per-layer", "lightning/fabric/plugins/precision/bitsandbytes.py:213-215 (_Linear4bit "
             "quantizes on the device as each layer is built)"),
    ), methods=(Method.FULL, Method.LORA, Method.QLORA),
        methods_source="litgpt/finetune/{full,lora,adapter,adapter_v2}.py (LoRA with --quantize bnb.nf4 for "
                       "QLoRA; vramcalc models no adapter method)"),
}


def preset(stack: Stack) -> StackPreset:
    return PRESETS[stack]
