"""Accuracy report for LoRA on a GPTQ int4 checkpoint (``--method qlora --quant int4-gptq``): the estimate against
the trace of the real step, whose decoder Linears are auto-gptq 0.7.1's own ``QuantLinear`` (``tracing/gptq.py``)
wrapped by peft's ``GPTQLoraLinear``, at real size on catalogue models (fake tensors: no memory).

    python benchmarks/accuracy_gptq.py              # the grid: accuracy_gptq.csv and accuracy_gptq.md
    python benchmarks/accuracy_gptq.py --limit 3    # the first three setups
    python benchmarks/accuracy_gptq.py --from-csv   # rewrite the .md from accuracy_gptq.csv

Each row: the setup, the peak tensor bytes estimated and traced, each one's phase, and the relative error
(estimate - trace) / trace. fp16 (Qwen's Q-LoRA), AdamW, sdpa, batch 1, group size 128, all-linear LoRA r=8 unless
given.
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

from benchmarks.accuracy_sections import write_rows  # noqa: E402
from vramcalc.catalogue import get_model  # noqa: E402
from vramcalc.estimator import step_moments  # noqa: E402
from vramcalc.training_setup import resolve_setup  # noqa: E402

HERE = Path(__file__).resolve().parent
BASE = dict(method="qlora", quant="int4-gptq", precision="fp16", lora_targets="all-linear")


def grid() -> list[tuple[str, dict]]:
    rows = []
    for model, seq in (("qwen2.5-0.5b", 256), ("qwen2.5-0.5b", 2048), ("tinyllama-1.1b", 1024),
                       ("llama-3.2-1b", 512), ("qwen2.5-1.5b", 4096)):
        for ckpt in (True, False):
            rows.append((model, dict(BASE, seq_len=seq, grad_ckpt=ckpt)))
    rows += [("qwen2.5-0.5b", dict(BASE, seq_len=1024, grad_ckpt=True, precision="bf16")),
             ("qwen2.5-0.5b", dict(BASE, seq_len=1024, grad_ckpt=False, gptq_desc_act=True)),
             ("qwen2.5-0.5b", dict(BASE, seq_len=1024, grad_ckpt=False, gptq_group_size=64, lora_targets="qv")),
             ("qwen2.5-7b", dict(BASE, seq_len=2048, grad_ckpt=True)),
             ("qwen2.5-7b", dict(BASE, seq_len=256, grad_ckpt=False))]
    return rows


def measure(model: str, options: dict) -> dict:
    from vramcalc.tracing.runner import run_trace

    spec = get_model(model)
    resolved = resolve_setup(spec, **options)
    peak = max(step_moments(spec, resolved), key=lambda moment: moment.tensor_bytes)
    started = time.perf_counter()
    traced = run_trace(spec, resolved, progress=False)
    traced_bytes = sum(traced.terms.values())
    shown = {k: v for k, v in options.items() if k not in ("method", "quant")}
    return {"model": spec.name, "setup": " ".join(f"{k}={v}" for k, v in shown.items()),
            "estimate_bytes": peak.tensor_bytes, "trace_bytes": traced_bytes, "estimate_phase": peak.phase.value,
            "trace_phase": traced.phase.value, "error": (peak.tensor_bytes - traced_bytes) / traced_bytes,
            "trace_s": round(time.perf_counter() - started, 1)}


def write_md(rows: list[dict], planned: int) -> None:
    errors = [abs(row["error"]) for row in rows]
    summary = (f"{len(rows)} setups: median |error| {statistics.median(errors):.4%}, max {max(errors):.4%}."
               if rows else "no setup traced yet.")
    partial = "" if len(rows) >= planned else f" (partial: {len(rows)} of {planned} setups traced)"
    lines = ["# Accuracy: LoRA on a GPTQ int4 base, estimate vs trace", "",
             "`python benchmarks/accuracy_gptq.py` (auto-gptq 0.7.1 `QuantLinear`, torch path; peft 0.21.2 "
             "`GPTQLoraLinear`; transformers 5.25; catalogue models at real size; "
             "`--method qlora --quant int4-gptq`, fp16, all-linear r=8, batch 1, group size 128 unless given). "
             "Error = (estimate - trace) / trace of the step's peak tensor bytes.", "",
             summary + partial, "",
             "| model | setup | estimate (B) | trace (B) | phases (est / trace) | error | trace s |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['setup']} | {row['estimate_bytes']:,} | {row['trace_bytes']:,} | "
                     f"{row['estimate_phase']} / {row['trace_phase']} | {row['error']:+.4%} | {row['trace_s']} |")
    (HERE / "accuracy_gptq.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--from-csv", action="store_true", help="rewrite the .md from accuracy_gptq.csv")
    args = parser.parse_args()
    rows = []
    planned = len(grid()[: args.limit])
    if args.from_csv:
        with open(HERE / "accuracy_gptq.csv", newline="") as handle:
            for row in csv.DictReader(handle):
                rows.append(dict(row, estimate_bytes=int(row["estimate_bytes"]), trace_bytes=int(row["trace_bytes"]),
                                 error=float(row["error"])))
        write_md(rows, planned)
        return
    for model, options in grid()[: args.limit]:
        row = measure(model, options)
        rows.append(row)
        print(f"{row['model']:<16} {row['setup']:<70} {row['error']:+.4f} {row['trace_s']}s", flush=True)
        write_rows(HERE / "accuracy_gptq.csv", rows)  # after every row: a partial grid survives
        write_md(rows, planned)


if __name__ == "__main__":
    main()
