"""Accuracy report for the stacks traced with their own code: ``vramcalc.estimate(stack=...)`` against the trace of
torchtune 0.6.1's and litgpt 0.5.13's real training step (``vramcalc/tracing/stacks/``).

    python benchmarks/accuracy_stacks.py              # the grid (a few minutes): accuracy_stacks.csv and .md
    python benchmarks/accuracy_stacks.py --limit 4    # the first four setups of each stack

Each row: the setup, each tensor term of the step's peak estimated and traced (bytes), the peak phase of each, and
the relative error (estimate - trace) / trace of the step's ``peak_tensor_bytes``. The step peak leaves the
``load`` phase out on both sides (the trace's load phase is in ``load_trace_bytes``; the estimate's in
``load_estimate_bytes`` when it models one). Small Llama-style shapes (all sizes divisible by torchao's NF4 blocks)
keep the grid in minutes; every mechanism scales with b, s, h, V as in a full-size model.
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

from vramcalc.estimator import step_moments  # noqa: E402
from vramcalc.model import ModelSpec  # noqa: E402
from vramcalc.options import Phase, Term  # noqa: E402
from vramcalc.training_setup import resolve_setup  # noqa: E402

HERE = Path(__file__).resolve().parent
TENSOR_TERMS = [t for t in Term if t.is_tensor]

# GQA and MHA shapes; torchao's NF4Tensor needs every quantized weight's numel divisible by 64 * 256
GQA = ModelSpec(name="stack-llama-gqa", family="llama", hidden_size=512, num_layers=2, num_heads=8, num_kv_heads=2,
                head_dim=64, intermediate_size=1536, vocab_size=8192, max_position_embeddings=4096)
MHA = ModelSpec(name="stack-llama-mha", family="llama", hidden_size=256, num_layers=3, num_heads=4, num_kv_heads=4,
                head_dim=64, intermediate_size=768, vocab_size=4096, max_position_embeddings=2048)


def _grid(stack: str) -> list[tuple[ModelSpec, dict]]:
    rows = []
    for spec in (GQA, MHA):
        for method in ("full", "lora", "qlora"):
            for ckpt in (True, False):
                for batch, seq in ((1, 256), (2, 512)):
                    rows.append((spec, dict(method=method, grad_ckpt=ckpt, batch_size=batch, seq_len=seq)))
    extra = [(GQA, dict(method="lora", lora_targets="all-linear", batch_size=2, seq_len=512)),
             (GQA, dict(method="lora", lora_targets="all-linear", batch_size=1, seq_len=1024, grad_ckpt=True)),
             (MHA, dict(method="lora", lora_rank=64, batch_size=4, seq_len=256))]
    if stack == "torchtune":
        extra += [(GQA, dict(method="full", optimizer="adamw", optimizer_in_backward=False, batch_size=2, seq_len=512)),
                  (GQA, dict(method="lora", loss="hf", batch_size=2, seq_len=512)),
                  (GQA, dict(method="lora", grad_accum=2, batch_size=1, seq_len=512))]
        # the 2024 recipes' loop: the shifted fp32 logits kept through backward into the next forward
        old_loop = dict(loss="torchtune-2024")
        extra += [(GQA, dict(old_loop, method="lora", batch_size=2, seq_len=512)),
                  (GQA, dict(old_loop, method="full", grad_ckpt=True, batch_size=2, seq_len=512)),
                  (MHA, dict(old_loop, method="qlora", grad_ckpt=True, batch_size=2, seq_len=512)),
                  (GQA, dict(old_loop, method="lora", grad_accum=2, batch_size=1, seq_len=512))]
    else:
        # bitsandbytes <= 0.43's held inputs (litgpt 0.4.x pinned 0.42.0), alive into the next micro-batch's forward
        old_bnb = dict(method="qlora", quant_saves_input=True, stable_embedding=False)
        extra += [(GQA, dict(method="qlora", double_quant=True, batch_size=2, seq_len=512)),
                  (GQA, dict(method="lora", lora_dropout=0.0, batch_size=2, seq_len=512)),
                  (GQA, dict(old_bnb, batch_size=2, seq_len=512)),
                  (MHA, dict(old_bnb, lora_targets="q_proj,v_proj,o_proj", batch_size=2, seq_len=512)),
                  (GQA, dict(old_bnb, grad_accum=2, batch_size=1, seq_len=512)),
                  (GQA, dict(old_bnb, grad_ckpt=True, batch_size=2, seq_len=512))]
    return [(spec, dict(stack=stack, **options)) for spec, options in rows + extra]


def _trace(stack: str):
    if stack == "torchtune":
        from vramcalc.tracing.stacks.torchtune import run_trace
    else:
        from vramcalc.tracing.stacks.litgpt import run_trace
    return run_trace


def measure(spec: ModelSpec, options: dict) -> dict:
    resolved = resolve_setup(spec, **options)
    started = time.perf_counter()
    traced = _trace(options["stack"])(spec, resolved, progress=False)
    seconds = time.perf_counter() - started
    moments = step_moments(spec, resolved)
    step_moments_ = [m for m in moments if m.phase is not Phase.LOAD]
    best = max(step_moments_, key=lambda m: sum(m[1:]))
    load_estimate = [sum(m[1:]) for m in moments if m.phase is Phase.LOAD]
    estimate_terms = {term: getattr(best, term.name.lower()) for term in TENSOR_TERMS}
    trace_terms = traced.step_terms
    trace_peak = sum(trace_terms.values())
    estimate_peak = sum(estimate_terms.values())
    row = {"stack": options["stack"], "model": spec.name,
           "options": " ".join(f"{k}={v}" for k, v in options.items() if k != "stack"),
           "error": (estimate_peak - trace_peak) / trace_peak,
           "peak_trace_bytes": trace_peak, "peak_estimate_bytes": estimate_peak,
           "phase_trace": traced.step_phase.value, "phase_estimate": best.phase.value,
           "load_trace_bytes": traced.result.phase_peaks.get(Phase.LOAD, ""),
           "load_estimate_bytes": load_estimate[0] if load_estimate else "",
           "trace_seconds": round(seconds, 2)}
    for term in TENSOR_TERMS:
        row[f"{term.value}_trace_bytes"] = trace_terms[term]
        row[f"{term.value}_estimate_bytes"] = estimate_terms[term]
    return row


def _gib(n) -> str:
    return f"{n / 2**20:.2f}"


def write_report(rows: list[dict], out: Path) -> None:
    with open(out.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["# Estimate vs trace: torchtune 0.6.1 and litgpt 0.5.13 traced with their own code", "",
             "Generated by `python benchmarks/accuracy_stacks.py`. Error = (estimate - trace) / trace of the training "
             "step's peak tensor bytes (load phase left out; MiB = 2^20 bytes). The trace runs each stack's real "
             "model, loss, checkpointing and optimizer code on fake tensors (`vramcalc/tracing/stacks/`).", ""]
    lines += ["| stack | method | n | median abs error | max abs error |", "|---|---|---|---|---|"]
    groups: dict = {}
    for row in rows:
        method = row["options"].split("method=")[1].split()[0]
        groups.setdefault((row["stack"], method), []).append(abs(row["error"]))
        groups.setdefault((row["stack"], "all"), []).append(abs(row["error"]))
    for (stack, method), errors in sorted(groups.items()):
        lines.append(f"| {stack} | {method} | {len(errors)} | {100 * statistics.median(errors):.2f}% | "
                     f"{100 * max(errors):.2f}% |")
    lines += ["", "| stack | model | options | trace MiB | estimate MiB | error | phase trace / estimate | "
              "largest term gap (estimate - trace, MiB) |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        gaps = {term.value: row[f"{term.value}_estimate_bytes"] - row[f"{term.value}_trace_bytes"]
                for term in TENSOR_TERMS}
        term, gap = max(gaps.items(), key=lambda kv: abs(kv[1]))
        lines.append(f"| {row['stack']} | {row['model']} | {row['options']} | {_gib(row['peak_trace_bytes'])} | "
                     f"{_gib(row['peak_estimate_bytes'])} | {100 * row['error']:+.2f}% | {row['phase_trace']} / "
                     f"{row['phase_estimate']} | {term} {gap / 2**20:+.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="setups per stack")
    parser.add_argument("--stacks", default="torchtune,litgpt")
    parser.add_argument("--out", type=Path, default=HERE / "accuracy_stacks")
    args = parser.parse_args(argv)
    rows = []
    for stack in args.stacks.split(","):
        for spec, options in _grid(stack)[: args.limit]:
            row = measure(spec, options)
            rows.append(row)
            print(f"{row['stack']:9s} {row['model']:16s} {row['options']:70s} {100 * row['error']:+7.2f}% "
                  f"({row['trace_seconds']} s)", flush=True)
    write_report(rows, args.out)
    errors = [abs(r["error"]) for r in rows]
    print(f"median |error| {100 * statistics.median(errors):.2f}%, max {100 * max(errors):.2f}% over {len(rows)} setups")
    return 0


if __name__ == "__main__":
    sys.exit(main())
