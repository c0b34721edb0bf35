"""Count the ops one eager training micro-step issues per decoder layer: the evidence for step_time's host term.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/throughput_trace_ops.py`` (CPU, about a minute; needs torch,
transformers, peft). A tiny transformers Llama (hidden 64, 4 heads, vocab 128, bf16 weights) runs forward + loss +
backward under ``TorchDispatchMode``; the ops below autograd are counted for 4 and for 2 layers and the per-layer count
is the difference over 2 (what does not scale with layers is the head: embedding, final norm, lm_head, loss). Ops are
split into launched ops (a kernel on a GPU) and view/metadata ops (no kernel; they still cost host time), which
``vramcalc.step_time.VIEW_OPS_PER_KERNEL`` records. Op counts do not depend on tensor sizes, so the tiny model counts
the real ones. CPU-only differences, corrected in step_time's note: CPU dropout decomposes into bernoulli_ + div_ +
mul where CUDA runs one native_dropout kernel.
"""

from __future__ import annotations

import collections
import sys

import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

# ops that launch no kernel on a CUDA device (views, aliases, allocations without a fill)
VIEW_OPS = {"view", "_unsafe_view", "t", "transpose", "expand", "unsqueeze", "squeeze", "slice", "select", "permute",
            "split", "split_with_sizes", "as_strided", "detach", "alias", "_reshape_alias", "reshape", "unbind",
            "empty", "empty_like", "empty_strided", "lift_fresh", "new_empty", "new_empty_strided", "view_as",
            "expand_as", "chunk", "narrow", "diagonal", "unfold", "_local_scalar_dense", "zeros", "ones",
            "scalar_tensor", "arange", "full", "new_zeros"}

SETUPS = {
    "full fine-tuning, no checkpointing": dict(lora=False, dropout=0.0, ckpt=False),
    "LoRA all-linear, no checkpointing": dict(lora=True, dropout=0.0, ckpt=False),
    "LoRA all-linear, dropout 0.05, fp32 adapters, reentrant checkpointing": dict(lora=True, dropout=0.05, ckpt=True),
}


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def step_ops(layers: int, *, lora: bool, dropout: float, ckpt: bool, seq: int = 16) -> collections.Counter:
    """Ops of one micro-step (the second of two, after lazy initialisation) under bf16 autocast."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    if lora:  # peft keeps the adapters in fp32 (autocast_adapter_dtype), as the Qwen rows' peft did
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear"))
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        if lora:
            model.enable_input_require_grads()
    model.train()
    x = torch.randint(0, 128, (1, seq))
    counter = OpCounter()
    for _ in range(2):
        counter = OpCounter()
        with counter, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        with counter:
            loss.backward()
        model.zero_grad(set_to_none=True)
    return counter.ops


def per_layer(**setup) -> tuple[float, float, float, dict[str, float]]:
    """(launched ops per layer, view ops per layer, launched ops outside the layers, per-op counts per layer)."""
    two, four = step_ops(2, **setup), step_ops(4, **setup)
    diff = {k: (four[k] - two[k]) / 2 for k in set(two) | set(four) if four[k] != two[k]}
    launched = sum(v for k, v in diff.items() if k not in VIEW_OPS)
    views = sum(v for k, v in diff.items() if k in VIEW_OPS)
    head = sum(v for k, v in two.items() if k not in VIEW_OPS) - 2 * launched
    return launched, views, head, diff


def main() -> None:
    for name, setup in SETUPS.items():
        launched, views, head, diff = per_layer(**setup)
        print(f"{name}: per layer {launched:.0f} launched ops, {views:.0f} view ops; outside the layers {head:.0f}")
        if "-v" in sys.argv:
            print("   ", dict(sorted(diff.items(), key=lambda t: -t[1])))


if __name__ == "__main__":
    main()
