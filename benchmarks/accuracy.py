"""Accuracy report: the analytic estimate against the trace of the real training step, at real model sizes.

    python benchmarks/accuracy.py                       # the full grid (minutes): writes accuracy.csv and accuracy.md
    python benchmarks/accuracy.py --limit 10            # the first ten setups
    python benchmarks/accuracy.py --first 63 --out benchmarks/accuracy_knobs.csv   # issue 11's knob rows only
    python benchmarks/accuracy.py --first 85 --limit 7 --out benchmarks/accuracy_loop.csv  # the hf-loop rows only
    python benchmarks/accuracy.py --first 92 --out benchmarks/accuracy_modules_to_save.csv  # --modules-to-save rows
    python benchmarks/accuracy.py --first 109 --limit 9 --out benchmarks/accuracy_session31.csv  # reentrant, QDoRA, ...
    python benchmarks/accuracy.py --first 118 --limit 9 --out benchmarks/accuracy_session32.csv  # selective-op, ...
    python benchmarks/accuracy.py --first 127 --limit 19 --out benchmarks/accuracy_session33.csv  # fp32 QLoRA, ...
    python benchmarks/accuracy.py --first 146 --limit 16 --out benchmarks/accuracy_session34.csv  # Gemma-2 SDPA, ...
    python benchmarks/accuracy.py --first 162 --out benchmarks/accuracy_session35.csv  # --grad-ckpt wrapper

Each row: the setup, every tensor term estimated and traced (bytes), the peak phase of each, and the relative error
of ``peak_tensor_bytes`` (estimate - trace) / trace. Rows are appended as they are traced.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.accuracy_sections import replace_head  # noqa: E402
from vramcalc.catalogue import get_model  # noqa: E402
from vramcalc.estimator import step_moments  # noqa: E402
from vramcalc.options import Term  # noqa: E402
from vramcalc.terms.tensor_parallel import rank_view  # noqa: E402
from vramcalc.tracing.runner import run_trace  # noqa: E402
from vramcalc.training_setup import resolve_setup  # noqa: E402

HERE = Path(__file__).resolve().parent
TENSOR_TERMS = [t for t in Term if t.is_tensor]

# (model, options): every family, every method, 3+ precisions, 3+ optimizers, checkpointing on and off, sdpa and
# eager, batch 1-8, sequence 256-8192, the three losses, MoE and MLA.
GRID = [
    ("llama-3.1-8b", dict(seq_len=4096)),
    ("llama-3.1-8b", dict(seq_len=4096, grad_ckpt=True)),
    ("llama-3.1-8b", dict(seq_len=8192, batch_size=1, method="lora", grad_ckpt=True)),
    ("llama-3.1-8b", dict(seq_len=2048, batch_size=4, method="qlora")),
    ("llama-3.1-8b", dict(seq_len=2048, method="qlora", precision="mixed-bf16", grad_ckpt=True)),
    ("llama-3.1-8b", dict(seq_len=2048, precision="mixed-bf16")),
    ("llama-3.1-8b", dict(seq_len=1024, precision="fp32", optimizer="sgd-momentum")),
    ("llama-3.1-8b", dict(seq_len=2048, optimizer="adamw-8bit")),
    ("llama-3.1-8b", dict(seq_len=2048, optimizer="paged-adamw-8bit", method="lora", lora_targets="all-linear")),
    ("llama-3.1-8b", dict(seq_len=512, optimizer="adamw-foreach", batch_size=8)),
    ("llama-3.1-8b", dict(seq_len=256, optimizer="adafactor", batch_size=2)),
    ("llama-3.1-8b", dict(seq_len=2048, loss="chunked")),
    ("llama-3.1-8b", dict(seq_len=4096, loss="fused", method="lora")),
    ("llama-3.1-8b", dict(seq_len=2048, method="prompt", virtual_tokens=32)),
    ("llama-3.1-8b", dict(seq_len=2048, attn="eager", batch_size=2)),
    ("llama-3.1-8b", dict(seq_len=2048, grad_accum=4, method="lora", lora_rank=64, lora_targets="all-linear")),
    ("llama-3.1-8b", dict(seq_len=2048, method="lora", lora_dropout=0.05, adapter_dtype="bf16")),
    ("llama-3.1-8b", dict(seq_len=4096, precision="fp16", method="lora", attn="flash")),
    ("llama-2-7b", dict(seq_len=4096, batch_size=2, method="lora")),
    ("llama-2-13b", dict(seq_len=2048, method="qlora", quant="fp4", double_quant=False)),
    ("llama-3.3-70b", dict(seq_len=4096, method="qlora", grad_ckpt=True)),
    ("llama-3.3-70b", dict(seq_len=2048, method="lora", lora_targets="all-linear", grad_ckpt=True)),
    ("llama-3.1-70b", dict(seq_len=8192, method="qlora", grad_ckpt=True, loss="chunked")),
    ("llama-2-70b", dict(seq_len=4096, grad_ckpt=True, optimizer="adamw-8bit")),
    ("llama-3.1-405b", dict(seq_len=2048, method="qlora", grad_ckpt=True)),
    ("mistral-7b", dict(seq_len=8192, method="lora", grad_ckpt=True)),
    ("mistral-7b", dict(seq_len=1024, batch_size=8, attn="eager", method="lora")),
    ("mistral-large-2407", dict(seq_len=2048, method="qlora", grad_ckpt=True)),
    ("mixtral-8x7b", dict(seq_len=2048, method="qlora")),
    ("mixtral-8x7b", dict(seq_len=1024, batch_size=4, method="lora", grad_ckpt=True)),
    ("qwen2.5-7b", dict(seq_len=4096)),
    ("qwen2.5-7b", dict(seq_len=2048, batch_size=4, method="qlora", grad_ckpt=True)),
    ("qwen2.5-14b", dict(seq_len=2048, method="lora", lora_targets="all-linear")),
    ("qwen2.5-32b", dict(seq_len=4096, method="qlora", loss="fused")),
    ("qwen2.5-72b", dict(seq_len=2048, method="qlora", grad_ckpt=True, precision="mixed-bf16")),
    ("qwen3-8b", dict(seq_len=4096, grad_ckpt=True, optimizer="adamw-8bit")),
    ("qwen3-8b", dict(seq_len=1024, batch_size=8, attn="eager", method="lora")),
    ("qwen3-14b", dict(seq_len=2048, method="prompt")),
    ("qwen3-32b", dict(seq_len=2048, method="qlora", lora_targets="all-linear")),
    ("qwen3-30b-a3b", dict(seq_len=2048)),
    ("qwen3-30b-a3b", dict(seq_len=4096, method="lora", lora_targets="all-linear", grad_ckpt=True)),
    ("qwen3-30b-a3b", dict(seq_len=2048, method="qlora", batch_size=2)),
    ("qwen3-235b-a22b", dict(seq_len=2048, method="lora", grad_ckpt=True)),
    ("gemma-2-2b", dict(seq_len=2048, batch_size=4)),
    ("gemma-2-2b", dict(seq_len=8192, method="lora", grad_ckpt=True)),
    ("gemma-2-9b", dict(seq_len=4096, method="qlora")),
    ("gemma-2-9b", dict(seq_len=2048, loss="chunked", method="lora")),
    ("gemma-2-27b", dict(seq_len=2048, method="qlora", grad_ckpt=True)),
    ("phi-4", dict(seq_len=4096, method="lora")),
    ("phi-4", dict(seq_len=2048, grad_ckpt=True, optimizer="adamw-8bit")),
    ("phi-3-mini", dict(seq_len=2048, batch_size=4)),
    ("phi-3-mini", dict(seq_len=4096, precision="fp32", method="lora")),
    ("deepseek-v3", dict(seq_len=1024, method="lora")),
    ("deepseek-r1", dict(seq_len=4096, method="lora", grad_ckpt=True)),
    ("deepseek-r1-distill-llama-8b", dict(seq_len=8192, method="qlora", grad_ckpt=True)),
    ("deepseek-r1-distill-qwen-32b", dict(seq_len=2048, method="lora", grad_ckpt=True)),
    ("tinyllama-1.1b", dict(seq_len=2048, batch_size=8)),
    ("tinyllama-1.1b", dict(seq_len=2048, batch_size=4, attn="eager")),
    ("smollm2-135m", dict(seq_len=2048, batch_size=8)),
    ("smollm2-360m", dict(seq_len=4096, batch_size=2, method="lora", lora_targets="all-linear")),
    ("smollm2-1.7b", dict(seq_len=2048, batch_size=8, grad_ckpt=True, precision="mixed-bf16")),
    ("smollm2-1.7b", dict(seq_len=1024, batch_size=2, method="prompt", precision="fp32")),
    # issue 11, quantized base and LoRA outside the layers: bitsandbytes <= 0.43 held inputs, 4-bit lm_head, fp16
    # quant state (litgpt's QLoRA), LLM.int8 bases, peft's kbit preparation, LoRA on lm_head and embed_tokens
    ("llama-2-7b", dict(seq_len=1024, method="qlora", quant_saves_input=True, quantize_lm_head=True,
                        quant_state_dtype="fp16")),
    ("llama-3.1-8b", dict(seq_len=512, batch_size=2, method="qlora", quant_saves_input=True, quantize_lm_head=True,
                          quant_state_dtype="fp16")),
    ("llama-3.1-8b", dict(seq_len=2048, method="qlora", quant="int8")),
    ("mistral-7b", dict(seq_len=2048, method="qlora", quant="int8", grad_ckpt=True)),
    ("llama-3.1-8b", dict(seq_len=2048, method="qlora", kbit_prep=True)),
    ("qwen2.5-7b", dict(seq_len=2048, method="qlora", quant_saves_input=True, grad_ckpt=True)),
    ("tinyllama-1.1b", dict(seq_len=512, method="qlora", quantize_lm_head=True, quant_state_dtype="fp16")),
    ("smollm2-360m", dict(seq_len=2048, method="qlora", quant="int8", lora_targets="all-linear")),
    ("llama-3.1-8b", dict(seq_len=2048, method="lora", lora_targets="q_proj,v_proj,lm_head")),
    ("llama-2-7b", dict(seq_len=2048, method="lora", lora_targets="q_proj,v_proj,embed_tokens")),
    # issue 11, activation knobs: selective checkpointing (torch SAC, matmul outputs saved), torch.compile's min-cut
    # partition (AOTAutograd traced per layer), activation offloading (save_on_cpu), packing (padding-free rows)
    ("llama-3.1-8b", dict(seq_len=4096, grad_ckpt="selective")),
    ("llama-3.1-8b", dict(seq_len=4096, method="lora", lora_targets="all-linear", grad_ckpt="selective")),
    ("qwen3-8b", dict(seq_len=4096, method="qlora", grad_ckpt="selective")),
    ("llama-3.1-8b", dict(seq_len=4096, compile=True)),
    ("llama-3.1-8b", dict(seq_len=4096, method="lora", compile=True)),
    ("mistral-7b", dict(seq_len=4096, method="lora", lora_targets="all-linear", compile=True, grad_ckpt=True)),
    ("llama-3.1-8b", dict(seq_len=8192, method="lora", grad_ckpt=True, activation_offload=True)),
    ("llama-3.1-8b", dict(seq_len=4096, method="qlora", grad_ckpt=True, activation_offload=True)),
    ("qwen3-8b", dict(seq_len=2048, method="lora", activation_offload=True)),
    ("llama-3.1-8b", dict(seq_len=2048, batch_size=4, method="lora", packing=True, attn="flash")),
    ("llama-3.1-8b", dict(seq_len=1024, batch_size=4, method="lora", packing=True)),
    ("qwen3-8b", dict(seq_len=2048, batch_size=2, method="qlora", packing=True, attn="flash", grad_ckpt="selective",
                      activation_offload=True)),
    # a custom loop that keeps ``outputs`` (transformers' *_no_trainer examples): its logits through backward and
    # the next forward (--loss hf-loop; mixed precision: accelerate's fp32 copy, bf16-true: lm_head's own)
    ("llama-3.2-1b", dict(seq_len=2048, batch_size=2, loss="hf-loop")),
    ("llama-3.2-1b", dict(seq_len=2048, batch_size=2, method="lora", loss="hf-loop", precision="bf16-true")),
    ("qwen2.5-0.5b", dict(seq_len=1024, batch_size=4, method="lora", loss="hf-loop", grad_ckpt=True)),
    ("smollm2-360m", dict(seq_len=2048, batch_size=2, method="qlora", loss="hf-loop", grad_accum=2)),
    # without checkpointing the loop's ``outputs`` keeps transformers' DynamicCache too (every layer's K/V through
    # backward, the step and the next forward): fp32 rotated keys beside autocast's casts (mixed-bf16), eager
    # attention's repeated k and v (gemma2), a fused qkv output released by v's copy (phi3)
    ("qwen3-0.6b", dict(seq_len=2048, batch_size=2, precision="mixed-bf16", loss="hf-loop")),
    ("gemma-2-2b", dict(seq_len=2048, batch_size=1, method="lora", loss="hf-loop")),
    ("phi-3-mini", dict(seq_len=2048, batch_size=1, method="lora", loss="hf-loop")),
    # peft's modules_to_save (--modules-to-save): the embedding and lm_head trained whole beside LoRA, as peft's
    # ModulesToSaveWrapper copies them (axolotl lora_modules_to_save, LLaMA-Factory additional_target, the Qwen
    # finetune.py "LoRA (emb)" setting); tied (qwen2.5, llama-3.2, smollm2, gemma-2) and untied (tinyllama, qwen2.5-7b)
    ("qwen2.5-0.5b", dict(seq_len=1024, batch_size=4, method="lora", modules_to_save="embed_tokens,lm_head")),
    ("qwen2.5-0.5b", dict(seq_len=2048, method="qlora", precision="mixed-bf16", grad_ckpt=True,
                          modules_to_save="lm_head")),
    ("llama-3.2-1b", dict(seq_len=2048, method="lora", modules_to_save="embed_tokens")),
    ("llama-3.2-1b", dict(seq_len=2048, batch_size=2, method="lora", grad_ckpt=True,
                          modules_to_save="embed_tokens,lm_head")),
    ("llama-3.2-1b", dict(seq_len=1024, method="qlora", modules_to_save="embed_tokens,lm_head")),
    ("llama-3.2-1b", dict(seq_len=512, method="lora", optimizer="adamw-foreach", modules_to_save="lm_head")),
    ("smollm2-360m", dict(seq_len=2048, batch_size=2, method="lora", lora_targets="all-linear",
                          modules_to_save="lm_head")),
    ("smollm2-360m", dict(seq_len=2048, method="lora", precision="mixed-bf16", modules_to_save="embed_tokens,lm_head")),
    ("tinyllama-1.1b", dict(seq_len=2048, batch_size=4, method="lora", modules_to_save="embed_tokens,lm_head")),
    ("tinyllama-1.1b", dict(seq_len=2048, method="qlora", grad_ckpt=True, modules_to_save="lm_head")),
    ("tinyllama-1.1b", dict(seq_len=1024, method="lora", optimizer="adamw-8bit", modules_to_save="embed_tokens")),
    ("tinyllama-1.1b", dict(seq_len=256, method="lora", modules_to_save="embed_tokens,lm_head")),
    ("gemma-2-2b", dict(seq_len=2048, method="lora", grad_ckpt=True, modules_to_save="embed_tokens,lm_head")),
    ("qwen2.5-7b", dict(seq_len=2048, method="lora", grad_ckpt=True, modules_to_save="embed_tokens,lm_head")),
    # short sequences: the copies' gradients and optimizer states decide the peak (the embedding's backward, the step)
    ("llama-3.2-1b", dict(seq_len=128, method="lora", modules_to_save="embed_tokens,lm_head")),
    ("qwen2.5-0.5b", dict(seq_len=256, method="lora", precision="mixed-bf16", optimizer="adamw-8bit",
                          modules_to_save="embed_tokens,lm_head")),
    ("tinyllama-1.1b", dict(seq_len=512, method="lora", num_gpus=2, sharding="fsdp",
                            modules_to_save="embed_tokens,lm_head")),
    # session 31: reentrant checkpointing (transformers 4.x: no ctx-held inputs from a no-grad forward), QDoRA with
    # kbit preparation and held inputs, a tied tail under FSDP2 (gathered with lm_head's gradient until the embedding's
    # backward; bf16-true keeps bf16 shards), selective checkpointing's MoE router and expert matmul outputs
    ("llama-3.1-8b", dict(seq_len=2048, method="qlora", quant_saves_input=True, grad_ckpt="reentrant")),
    ("mistral-7b", dict(seq_len=2048, method="qlora", quant="int8", grad_ckpt="reentrant")),
    ("qwen2.5-7b", dict(seq_len=2048, method="lora", grad_ckpt="reentrant")),
    ("llama-3.1-8b", dict(seq_len=1024, method="dora", quant="nf4", kbit_prep=True)),
    ("qwen2.5-7b", dict(seq_len=1024, method="dora", quant="nf4", quant_saves_input=True)),
    ("llama-3.2-1b", dict(seq_len=2048, batch_size=2, grad_ckpt=True, num_gpus=2, sharding="fsdp",
                          precision="bf16-true")),
    ("llama-3.2-3b", dict(seq_len=2048, grad_ckpt=True, num_gpus=4, sharding="fsdp")),
    ("smollm2-360m", dict(seq_len=1024, batch_size=4, num_gpus=8, sharding="fsdp", precision="bf16-true")),
    ("qwen3-30b-a3b", dict(seq_len=1024, method="lora", grad_ckpt="selective")),
    # session 32: torchtitan's selective checkpointing (every other mm, counted in call order with LoRA's and
    # skipping addmm/gemm_4bit/int8/grouped matmuls), DoRA's identity matmuls, LLM.int8 under selective
    # checkpointing (o_proj holds the cached SDPA output), MLA's attention output in the cache
    ("llama-3.1-8b", dict(seq_len=4096, grad_ckpt="selective-op")),
    ("llama-3.2-3b", dict(seq_len=4096, method="lora", lora_targets="all-linear", grad_ckpt="selective-op")),
    ("qwen2.5-7b", dict(seq_len=2048, method="qlora", grad_ckpt="selective-op")),
    ("mistral-7b", dict(seq_len=1024, method="dora", grad_ckpt="selective-op")),
    ("mistral-7b", dict(seq_len=2048, method="qlora", quant="int8", grad_ckpt="selective")),
    ("gemma-2-2b", dict(seq_len=2048, grad_ckpt="selective-op")),
    ("phi-3-mini", dict(seq_len=2048, method="lora", grad_ckpt="selective-op")),
    ("qwen3-30b-a3b", dict(seq_len=1024, method="lora", grad_ckpt="selective-op")),
    ("llama-3.1-8b", dict(seq_len=1024, method="dora", grad_ckpt="selective")),
    # session 33: QLoRA on an fp32 model (fp32 unquantized parameters, Linear4bit computing in fp32); the first
    # layer's partial gradients (LoRA on q and v: q unsaved; LoRA on gate or up alone); the math SDPA kernel (fp32
    # with GQA: o_proj's input, the eager-like backward, the bmm outputs in the selective cache); multi-query eager
    # attention at batch 1 (repeat_kv's views reach bmm uncopied); o_proj's input under eager attention (saved as it
    # is only where o_proj saves it so) and in the first layer with o_proj alone adapted
    ("llama-3.1-8b", dict(seq_len=1024, method="qlora", precision="fp32", grad_ckpt=True)),
    ("mistral-7b", dict(seq_len=1024, method="qlora", precision="fp32", attn="eager", batch_size=2)),
    ("qwen2.5-1.5b", dict(seq_len=2048, method="qlora", precision="fp32", lora_targets="all-linear")),
    ("phi-3-mini", dict(seq_len=1024, method="qlora", precision="fp32")),
    ("llama-3.2-1b", dict(seq_len=1024, method="lora", precision="fp32")),
    ("qwen3-0.6b", dict(seq_len=1024, method="lora", precision="fp32", grad_ckpt="selective")),
    ("llama-3.2-1b", dict(seq_len=1024, method="lora", lora_targets="gate_proj,down_proj")),
    ("llama-3.1-8b", dict(seq_len=1024, method="lora", attn="eager")),
    ("gemma-3-1b", dict(seq_len=2048, method="lora", attn="eager")),
    ("gemma-3-1b", dict(seq_len=1024, method="lora", attn="eager", lora_targets="all-linear", batch_size=2)),
    ("llama-3.2-1b", dict(seq_len=1024, method="lora", lora_targets="o_proj", attn="eager", batch_size=2)),
    ("llama-3.2-3b", dict(seq_len=2048, method="lora", lora_targets="o_proj", adapter_dtype="bf16")),
    # session 33, found by a fuzz of 60 unseen setups: DoRA with dropout (peft's F.linear(dropout(x), W) saves W or
    # its cast, one more aten.mm per target), mixed precision's first-layer weight copies, eager attention's batch-1
    # views (a fused qkv's v pins the qkv output; the hf-loop's cache copies do not), o_proj's input behind a LoRA
    # cast on a fused qkv, a chunked loss's per-chunk copies of a frozen fp32 head
    ("smollm2-360m", dict(seq_len=4096, method="dora", lora_dropout=0.1, lora_rank=16, precision="bf16-true",
                          lora_targets="q_proj,k_proj,v_proj,o_proj", grad_ckpt="selective-op", optimizer="sgd",
                          stack="axolotl")),
    ("llama-3.1-8b", dict(seq_len=1024, method="dora", lora_dropout=0.05)),
    ("qwen2.5-1.5b", dict(seq_len=2048, method="lora", precision="mixed-bf16")),
    ("phi-3-mini", dict(seq_len=1024, method="lora", attn="eager")),
    ("phi-3-mini", dict(seq_len=512, method="lora", attn="eager", loss="hf-loop")),
    ("phi-4-mini", dict(seq_len=2048, method="lora", lora_targets="all-linear", precision="fp16", batch_size=2)),
    ("olmo-2-0425-1b", dict(seq_len=2048, method="lora", precision="mixed-fp16", loss="chunked")),
    # session 34: Gemma-2 on an explicit SDPA (transformers 4.42-5.20), the fp32 logits of 4.31-4.45
    # (hf-fp32-logits), a loop that keeps its outputs, blocks compiled beside an eager loss, LoHa's input casts
    # without autocast, the final norm's output through a shifted loss, QDoRA under selective-op, and the families
    # opt, bloom and gptj
    ("gemma-2-2b", dict(seq_len=8192, method="lora", attn="sdpa", grad_ckpt=True)),
    ("gemma-2-9b", dict(seq_len=2048, method="qlora", attn="sdpa")),
    ("llama-3.1-8b", dict(seq_len=1024, batch_size=2, method="lora", loss="hf-fp32-logits")),
    ("mistral-7b", dict(seq_len=2048, method="qlora", loss="hf-fp32-logits", grad_ckpt=True)),
    ("qwen2.5-1.5b", dict(seq_len=1024, batch_size=2, loss="hf-fp32-logits", precision="mixed-bf16")),
    ("llama-3.2-3b", dict(seq_len=768, batch_size=4, method="lora", precision="bf16-true", loop_keeps_outputs=True)),
    ("llama-2-7b", dict(seq_len=1024, batch_size=2, method="lora", loss="hf-fp32-logits", loop_keeps_outputs=True,
                        grad_ckpt=True, precision="bf16-true")),
    ("llama-3.2-1b", dict(seq_len=2048, compile=True, compile_loss=False)),
    ("qwen3-0.6b", dict(seq_len=2048, method="lora", compile=True, compile_loss=False, grad_ckpt="selective-op")),
    ("llama-3.2-1b", dict(seq_len=1024, method="loha", precision="bf16-true", lora_targets="all-linear")),
    ("llama-3.2-1b", dict(seq_len=1024, batch_size=2, method="lora", loss="hf-shifted")),
    ("qwen3-0.6b", dict(seq_len=4096, method="dora", quant="nf4", grad_ckpt="selective-op")),
    ("opt-1.3b", dict(seq_len=2048, method="lora")),
    ("bloom-560m", dict(seq_len=1024, method="lora", attn="eager")),
    ("gpt-j-6b", dict(seq_len=1024, method="lora")),
    ("opt-6.7b", dict(seq_len=512, method="qlora", grad_ckpt=True)),
    # session 35: torch's checkpoint_wrapper around each layer from outside (--grad-ckpt wrapper), the model's KV
    # cache on: in every loop's forward and through backward (the recompute's second copies and their graph), kept
    # through the step where the loop keeps outputs
    ("llama-3.2-1b", dict(seq_len=2048, batch_size=2, method="lora", grad_ckpt="wrapper")),
    ("llama-3.2-1b", dict(seq_len=2048, batch_size=2, method="lora", grad_ckpt="wrapper", loss="hf-loop",
                          precision="bf16-true")),
    ("llama-3.2-1b", dict(seq_len=2048, batch_size=2, grad_ckpt="wrapper", loss="hf-loop")),
    ("qwen2.5-0.5b", dict(seq_len=1024, batch_size=4, method="lora", loss="hf-loop", grad_ckpt="wrapper")),
    ("qwen3-0.6b", dict(seq_len=2048, batch_size=2, precision="mixed-bf16", loss="hf-loop", grad_ckpt="wrapper")),
    ("smollm2-360m", dict(seq_len=2048, batch_size=2, method="qlora", loss="hf-fp32-logits", loop_keeps_outputs=True,
                          grad_ckpt="wrapper")),
    ("llama-2-7b", dict(seq_len=1024, batch_size=2, method="lora", loss="hf-fp32-logits", loop_keeps_outputs=True,
                        grad_ckpt="wrapper", precision="bf16-true", adapter_dtype="fp32")),
    ("mistral-7b", dict(seq_len=2048, method="qlora", grad_ckpt="wrapper")),
    ("phi-3-mini", dict(seq_len=1024, method="lora", loss="hf-loop", grad_ckpt="wrapper")),
]


def family_of(name: str) -> str:
    return get_model(name).family


def compare(name: str, options: dict) -> dict:
    spec = get_model(name)
    resolved = resolve_setup(spec, **options)
    # one rank's slice under --tp, as estimate() computes it (the model as given otherwise)
    peak = max(step_moments(*rank_view(spec, resolved)), key=lambda m: m.tensor_bytes)
    traced = run_trace(spec, resolved, progress=False)
    traced_total = sum(traced.terms.values())
    row = {"model": name, "family": spec.family, "method": resolved.setup.method.value,
           "setup": " ".join(f"{k}={v}" for k, v in options.items()),
           "estimate_phase": peak.phase.value, "trace_phase": traced.phase.value}
    for term in TENSOR_TERMS:
        row[f"{term.value}_estimate_bytes"] = getattr(peak, term.value)
        row[f"{term.value}_trace_bytes"] = traced.terms[term]
    row["peak_estimate_bytes"] = peak.tensor_bytes
    row["peak_trace_bytes"] = traced_total
    row["peak_error_pct"] = round(100 * (peak.tensor_bytes - traced_total) / traced_total, 3)
    row["trace_seconds"] = round(traced.seconds, 1)
    row["trace_peak_rss_gib"] = round(traced.peak_rss_bytes / 2**30, 2)
    return row


def summary(rows: list[dict]) -> str:
    def line(label, subset):
        errors = [abs(r["peak_error_pct"]) for r in subset]
        return f"| {label} | {len(subset)} | {statistics.median(errors):.3f} | {max(errors):.3f} |"

    out = ["| group | setups | median abs error % | max abs error % |", "|---|---|---|---|", line("all", rows)]
    for key in ("family", "method"):
        for value in sorted({r[key] for r in rows}):
            out.append(line(f"{key} {value}", [r for r in rows if r[key] == value]))
    worst = sorted(rows, key=lambda r: -abs(r["peak_error_pct"]))[:5]
    out += ["", "Worst five:", "", "| model | setup | error % | term that differs most |", "|---|---|---|---|"]
    for r in worst:
        term = max(TENSOR_TERMS, key=lambda t: abs(r[f"{t.value}_estimate_bytes"] - r[f"{t.value}_trace_bytes"]))
        diff = (r[f"{term.value}_estimate_bytes"] - r[f"{term.value}_trace_bytes"]) / 2**30
        out.append(f"| {r['model']} | {r['setup']} | {r['peak_error_pct']:+.3f} | {term.value} ({diff:+.3f} GiB) |")
    return "\n".join(out) + "\n"


def run_grid(grid, out_path: str, make_row=compare) -> list[dict]:
    """``make_row(name, options)`` for every setup, each row appended to the CSV at ``out_path`` as it is traced."""
    rows = []
    with open(out_path, "w", newline="") as f:
        writer = None
        for index, (name, options) in enumerate(grid, 1):
            started = time.perf_counter()
            row = make_row(name, options)
            rows.append(row)
            if writer is None:
                writer = csv.DictWriter(f, fieldnames=list(row), lineterminator="\n")
                writer.writeheader()
            writer.writerow(row)
            f.flush()
            print(f"[{index}/{len(grid)}] {row['peak_error_pct']:+7.3f}% {name} {row['setup']} "
                  f"({time.perf_counter() - started:.0f}s)", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "accuracy.csv"))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--first", type=int, default=1, help="start at this setup of the grid (1-based)")
    args = parser.parse_args(argv)
    grid = GRID[args.first - 1:]
    grid = grid[: args.limit] if args.limit else grid
    rows = run_grid(grid, args.out)
    table = summary(rows)
    replace_head("# Estimate vs trace\n\n" + table, Path(args.out).with_suffix(".md"))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
