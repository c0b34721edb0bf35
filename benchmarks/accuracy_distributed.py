"""Distributed accuracy report: the per-rank estimate against the per-rank trace of the real HF training step under
torch.distributed (DDP and FSDP2 on a fake process group), 8B to 671B on 2 to 512 ranks.

    python benchmarks/accuracy_distributed.py             # the full grid (~10 min): accuracy_distributed.csv and .md
    python benchmarks/accuracy_distributed.py --limit 5   # the first five setups
    python benchmarks/accuracy_distributed.py --grid fsdp-qlora   # FSDP-QLoRA (--quant-storage bf16): its own
                                                                  # CSV and section of accuracy_distributed.md
    python benchmarks/accuracy_distributed.py --grid tp   # tensor parallelism (--tp): its own CSV and section

Rows and summary as ``benchmarks/accuracy.py`` (whose ``compare``, ``run_grid`` and ``summary`` it uses), with the
engine, the rank count and a summary by engine added. Target: every setup within 5%.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import compare, run_grid, summary  # noqa: E402
from accuracy_sections import replace_section  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGET_PCT = 5.0

# (model, options): DDP and FSDP2 (full-shard and shard-grad-op), full / LoRA / QLoRA (DDP), dense, tied, MoE and MLA,
# 2 to 512 ranks, 7B to 671B, with and without checkpointing, bf16 / mixed-bf16 / fp32, gradient accumulation.
GRID = [
    ("llama-3.1-8b", dict(num_gpus=2, sharding="ddp", method="lora", seq_len=2048)),
    ("llama-3.1-8b", dict(num_gpus=8, sharding="ddp", seq_len=4096, grad_ckpt=True)),
    ("llama-3.1-8b", dict(num_gpus=4, sharding="ddp", seq_len=2048, grad_accum=2, method="lora",
                          lora_targets="all-linear")),
    ("mistral-7b", dict(num_gpus=2, sharding="ddp", method="qlora", seq_len=4096, grad_ckpt=True)),
    ("llama-3.1-8b", dict(num_gpus=8, sharding="fsdp", seq_len=2048)),
    ("llama-3.1-8b", dict(num_gpus=8, sharding="fsdp", fsdp_shard="shard-grad-op", seq_len=4096, grad_ckpt=True)),
    ("llama-3.1-8b", dict(num_gpus=64, sharding="fsdp", method="lora", lora_targets="all-linear", seq_len=8192,
                          grad_ckpt=True)),
    ("llama-3.1-8b", dict(num_gpus=512, sharding="fsdp", seq_len=2048, grad_ckpt=True)),
    ("qwen2.5-7b", dict(num_gpus=16, sharding="fsdp", precision="mixed-bf16", seq_len=4096, grad_ckpt=True)),
    ("gemma-2-9b", dict(num_gpus=8, sharding="fsdp", seq_len=2048)),
    ("phi-4", dict(num_gpus=8, sharding="fsdp", method="lora", seq_len=4096)),
    ("qwen2.5-32b", dict(num_gpus=16, sharding="fsdp", seq_len=4096, grad_ckpt=True)),
    ("llama-3.3-70b", dict(num_gpus=8, sharding="fsdp", method="lora", seq_len=4096, grad_ckpt=True)),
    ("llama-3.3-70b", dict(num_gpus=64, sharding="fsdp", seq_len=4096, grad_ckpt=True)),
    ("llama-3.3-70b", dict(num_gpus=512, sharding="fsdp", fsdp_shard="shard-grad-op", seq_len=8192,
                           grad_ckpt=True)),
    ("qwen2.5-72b", dict(num_gpus=32, sharding="fsdp", precision="fp32", seq_len=2048, grad_ckpt=True)),
    ("mistral-large-2407", dict(num_gpus=64, sharding="fsdp", seq_len=4096, grad_ckpt=True)),
    ("mixtral-8x7b", dict(num_gpus=16, sharding="fsdp", seq_len=4096, grad_ckpt=True)),
    ("qwen3-30b-a3b", dict(num_gpus=8, sharding="fsdp", seq_len=2048)),
    ("qwen3-30b-a3b", dict(num_gpus=512, sharding="fsdp", seq_len=2048, grad_ckpt=True)),
    ("qwen3-235b-a22b", dict(num_gpus=64, sharding="fsdp", method="lora", seq_len=4096, grad_ckpt=True)),
    ("llama-3.1-405b", dict(num_gpus=128, sharding="fsdp", seq_len=4096, grad_ckpt=True)),
    ("llama-3.1-405b", dict(num_gpus=512, sharding="fsdp", method="lora", seq_len=8192, grad_ckpt=True)),
    ("deepseek-v3", dict(num_gpus=256, sharding="fsdp", seq_len=2048, grad_ckpt=True)),
    ("deepseek-v3", dict(num_gpus=512, sharding="fsdp", method="lora", seq_len=4096, grad_ckpt=True)),
    ("llama-3.1-8b", dict(num_gpus=2, sharding="fsdp", seq_len=2048, grad_accum=2)),
]

# FSDP-QLoRA: 4-bit codes packed in bf16 so that FSDP2 shards them (issue 14; target 3%). The first row is issue 14's
# "done when" setup; the llama-2-70b row has the shape of Answer.AI's and peft's published 2 x 24 GB runs (less their
# CPU offload, flash attention and packing, which the trace does not run on a fake group: see PUBLISHED_FSDP_QLORA).
QLORA = dict(method="qlora", quant_storage="bf16", sharding="fsdp")
QLORA_GRID = [
    ("llama-3.3-70b", dict(QLORA, num_gpus=2, seq_len=2048, grad_ckpt=True)),
    ("llama-2-70b", dict(QLORA, num_gpus=2, seq_len=2048, batch_size=2, lora_targets="all-linear", grad_ckpt=True)),
    ("llama-3.1-8b", dict(QLORA, num_gpus=8, seq_len=4096, lora_targets="all-linear", grad_ckpt=True)),
    ("qwen2.5-32b", dict(QLORA, num_gpus=4, seq_len=2048, precision="mixed-bf16", grad_ckpt=True)),
    ("mistral-7b", dict(QLORA, num_gpus=2, seq_len=2048)),
]
QLORA_TARGET_PCT = 3.0

# Tensor parallelism (--tp T on T GPUs: transformers' tp_plan="auto", DTensor placements on the fake process group),
# 8B to 123B, 2 to 8 ranks, full and LoRA, with and without checkpointing, GQA with 4 and 8 key/value heads.
# tp x fsdp (a 2-D mesh) is estimated but not traced, so every row here is one tensor-parallel group.
TP_GRID = [
    ("llama-3.1-8b", dict(num_gpus=2, tp=2, seq_len=2048)),
    ("llama-3.1-8b", dict(num_gpus=4, tp=4, method="lora", seq_len=4096, grad_ckpt=True)),
    ("llama-3.1-8b", dict(num_gpus=8, tp=8, seq_len=8192, grad_ckpt=True)),
    ("qwen2.5-7b", dict(num_gpus=4, tp=4, seq_len=4096, precision="mixed-bf16", grad_ckpt=True)),
    ("qwen2.5-14b", dict(num_gpus=8, tp=8, method="lora", lora_targets="q_proj,k_proj,v_proj,gate_proj,up_proj",
                         seq_len=4096)),
    ("qwen3-32b", dict(num_gpus=8, tp=8, seq_len=4096, grad_ckpt=True)),
    ("llama-3.3-70b", dict(num_gpus=8, tp=8, method="lora", seq_len=4096, grad_ckpt=True)),
    ("mistral-large-2407", dict(num_gpus=8, tp=8, method="lora", seq_len=2048, grad_ckpt=True)),
]
TP_SECTION = "\n## Tensor parallelism (--tp)\n"

# Published FSDP-QLoRA runs on consumer GPUs, each with the source's own settings, against the estimate of the nearest
# vramcalc setup (``published_rows``). Memory figures are as the sources state them (GB per GPU; how they measured is
# not said: nvidia-smi-like figures include the CUDA context and the allocator's cache, our ``total``).
PUBLISHED_FSDP_QLORA = [
    dict(source="peft docs/source/accelerate/fsdp.md (v0.21.2), 'Memory usage'",
         setting="Llama-2-70B, 2 GPUs, FSDP1 + CPU offload, seq 2048, batch 2, grad-accum 2, reentrant ckpt, flash, "
                 "packing, LoRA r8 all-linear dropout 0.1, nested quant, bf16 storage",
         published="19.6 GB per GPU, ~107 GB CPU RAM",
         model="llama-2-70b", options=dict(QLORA, num_gpus=2, seq_len=2048, batch_size=2, grad_accum=2, grad_ckpt=True,
                                           attn="flash", packing=True, lora_targets="all-linear", lora_dropout=0.1,
                                           offload="params")),
    dict(source="peft docs/source/accelerate/fsdp.md (v0.21.2), 'Memory usage'",
         setting="the same without CPU offloading", published="35.6 GB per GPU",
         model="llama-2-70b", options=dict(QLORA, num_gpus=2, seq_len=2048, batch_size=2, grad_accum=2, grad_ckpt=True,
                                           attn="flash", packing=True, lora_targets="all-linear", lora_dropout=0.1)),
    dict(source="AnswerDotAI/fsdp_qlora README.md, 'Finetune Llama-2 70B on Dual 24GB GPUs'",
         setting="Llama-2-70B, 2 x 24 GB, batch 2, context 2048, bf16, qlora, grad ckpt, CPU offload",
         published="fits 24 GB; ~55 GB CPU RAM for loading and offload",
         model="llama-2-70b", options=dict(QLORA, num_gpus=2, seq_len=2048, batch_size=2, grad_ckpt=True,
                                           lora_targets="all-linear", offload="params")),
]


def published_rows() -> str:
    """The published figures beside vramcalc's estimate (device total per GPU, host RAM per node for the offload)."""
    from vramcalc import estimate

    out = ["| source | their setting | published | vramcalc total per GPU (GB) | vramcalc peak tensors (GB) | "
           "host offload per node (GB) | fits 24 GB (rtx-4090) |", "|---|---|---|---|---|---|---|"]
    for row in PUBLISHED_FSDP_QLORA:
        b = estimate(row["model"], gpu="rtx-4090", **row["options"])
        host = b.details.get("host_offload_bytes_per_node", 0)
        out.append(f"| {row['source']} | {row['setting']} | {row['published']} | {b.total_bytes / 1e9:.1f} "
                   f"| {b.peak_tensor_bytes / 1e9:.1f} | {host / 1e9:.1f} | {b.fits('rtx-4090')} |")
    return "\n".join(out) + "\n"


def distributed_row(name: str, options: dict) -> dict:
    row = compare(name, options)
    row["sharding"] = options["sharding"] + ("/" + options["fsdp_shard"] if "fsdp_shard" in options else "")
    row["ranks"] = options["num_gpus"]
    return row


def engine_summary(rows: list[dict], target_pct: float = TARGET_PCT) -> str:
    out = [f"| engine | setups | median abs error % | max abs error % | within {target_pct:g} % |",
           "|---|---|---|---|---|"]
    for engine in sorted({r["sharding"] for r in rows}):
        errors = [abs(r["peak_error_pct"]) for r in rows if r["sharding"] == engine]
        within = sum(e <= target_pct for e in errors)
        out.append(f"| {engine} | {len(errors)} | {statistics.median(errors):.3f} | {max(errors):.3f} | "
                   f"{within}/{len(errors)} |")
    out += ["", "| model | engine | ranks | setup | estimate GiB | trace GiB | error % | phase (est / trace) |",
            "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        engine_words = ("num_gpus", "sharding", "fsdp_shard")
        setup = " ".join(part for part in r["setup"].split() if not part.startswith(engine_words))
        out.append(f"| {r['model']} | {r['sharding']} | {r['ranks']} | {setup} "
                   f"| {r['peak_estimate_bytes'] / 2**30:.2f} | {r['peak_trace_bytes'] / 2**30:.2f} "
                   f"| {r['peak_error_pct']:+.3f} | {r['estimate_phase']} / {r['trace_phase']} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "accuracy_distributed.csv"))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--grid", choices=("all", "fsdp-qlora", "tp"), default="all")
    args = parser.parse_args(argv)
    if args.grid == "fsdp-qlora":
        return fsdp_qlora_main(args)
    if args.grid == "tp":
        return tp_main(args)
    grid = GRID[: args.limit] if args.limit else GRID
    rows = run_grid(grid, args.out, distributed_row)
    table = "# Per-rank estimate vs trace (torch.distributed, fake process group)\n\n" + summary(rows) + "\n" + \
        engine_summary(rows)
    Path(args.out).with_suffix(".md").write_text(table)
    print(table)
    return 0


QLORA_SECTION = "\n## FSDP-QLoRA (--quant-storage bf16)\n"


def fsdp_qlora_main(args) -> int:
    """The FSDP-QLoRA grid into accuracy_distributed_fsdp_qlora.csv, and its section (with the published figures)
    in place of the previous one in accuracy_distributed.md (the other sections stay)."""
    out = HERE / "accuracy_distributed_fsdp_qlora.csv"
    grid = QLORA_GRID[: args.limit] if args.limit else QLORA_GRID
    rows = run_grid(grid, str(out), distributed_row)
    section = (QLORA_SECTION + f"\nWritten by `python benchmarks/accuracy_distributed.py --grid fsdp-qlora` "
               f"({out.name}); target: every setup within {QLORA_TARGET_PCT:g}%.\n\n" + engine_summary(rows, QLORA_TARGET_PCT)
               + "\n### Published FSDP-QLoRA figures on consumer GPUs\n\n" + published_rows())
    replace_section(QLORA_SECTION.strip(), section.replace(QLORA_SECTION, "", 1), HERE / "accuracy_distributed.md")
    print(section)
    return 0


def tp_main(args) -> int:
    """The tensor-parallel grid into accuracy_distributed_tp.csv, and its section in place of the previous one in
    accuracy_distributed.md (``accuracy_sections.replace_section``: the other sections stay)."""
    out = HERE / "accuracy_distributed_tp.csv"
    grid = TP_GRID[: args.limit] if args.limit else TP_GRID
    rows = run_grid(grid, str(out), tp_row)
    section = (TP_SECTION + f"\nWritten by `python benchmarks/accuracy_distributed.py --grid tp` ({out.name}): one "
               f"rank of a T-way group against the trace of transformers' own `tp_plan=\"auto\"` distribution on the "
               f"fake process group; target: every setup within {TARGET_PCT:g}%.\n\n" + engine_summary(rows))
    replace_section(TP_SECTION.strip(), section.replace(TP_SECTION, "", 1), HERE / "accuracy_distributed.md")
    print(section)
    return 0


def tp_row(name: str, options: dict) -> dict:
    row = compare(name, options)
    row["sharding"] = f"tp {options['tp']}"
    row["ranks"] = options["num_gpus"]
    return row


if __name__ == "__main__":
    sys.exit(main())
