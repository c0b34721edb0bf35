"""Distributed accuracy report: the per-rank estimate against the per-rank trace of the real HF training step under
torch.distributed (DDP and FSDP2 on a fake process group), 8B to 671B on 2 to 512 ranks.

    python benchmarks/accuracy_distributed.py             # the full grid (~10 min): accuracy_distributed.csv and .md
    python benchmarks/accuracy_distributed.py --limit 5   # the first five setups

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


def distributed_row(name: str, options: dict) -> dict:
    row = compare(name, options)
    row["sharding"] = options["sharding"] + ("/" + options["fsdp_shard"] if "fsdp_shard" in options else "")
    row["ranks"] = options["num_gpus"]
    return row


def engine_summary(rows: list[dict]) -> str:
    out = ["| engine | setups | median abs error % | max abs error % | within 5 % |", "|---|---|---|---|---|"]
    for engine in sorted({r["sharding"] for r in rows}):
        errors = [abs(r["peak_error_pct"]) for r in rows if r["sharding"] == engine]
        within = sum(e <= TARGET_PCT for e in errors)
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
    args = parser.parse_args(argv)
    grid = GRID[: args.limit] if args.limit else GRID
    rows = run_grid(grid, args.out, distributed_row)
    table = "# Per-rank estimate vs trace (torch.distributed, fake process group)\n\n" + summary(rows) + "\n" + \
        engine_summary(rows)
    Path(args.out).with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
