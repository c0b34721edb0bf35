"""Accuracy of the encoder family (BERT, ``--task classify``): ``vramcalc.estimate`` against the trace of the real
``BertForSequenceClassification`` step (``vramcalc/tracing/encoder.py``) at full size on fake tensors, over a grid of
precisions (fp32, mixed-fp16, mixed-bf16, bf16, bf16-true), batch sizes (1, 2, 4, 8), checkpointing (none, full,
reentrant), optimizers (adamw, adafactor, adamw-8bit, adamw-foreach), gradient accumulation, gradients kept between
steps (``--grads-kept``), the 2022 stacks' attention (``--softmax-saves-input``, ``--extended-mask``) and attention
(eager, sdpa) on bert-large-uncased at 512 tokens (the hf-perf-doc rows'
setups among them) and bert-base-uncased.

    python benchmarks/accuracy_encoder.py            # writes accuracy_encoder.csv and accuracy_encoder.md

Error = (estimate - trace) / trace of the step's peak tensor bytes (``peak_tensor_bytes``). About 30 s per setup.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from published import HF_PERF_DOC_STACK  # noqa: E402
from vramcalc.catalogue import get_model  # noqa: E402
from vramcalc.estimator import step_moments  # noqa: E402
from vramcalc.training_setup import resolve_setup  # noqa: E402

HERE = Path(__file__).resolve().parent
LARGE = dict(seq_len=512)
# the nine hf-perf-doc setups as benchmarks/published.py maps them (its 2022 stack, published.HF_PERF_DOC_STACK), then
# the rest
PAGE = dict(LARGE, **HF_PERF_DOC_STACK)
GRID = [
    ("bert-large-uncased", dict(PAGE, batch_size=4, precision="fp32", optimizer="adamw", attn="eager")),
    ("bert-large-uncased", dict(PAGE, batch_size=1, grad_accum=4, precision="fp32", optimizer="adamw",
                                attn="eager")),
    ("bert-large-uncased", dict(PAGE, batch_size=1, grad_accum=4, grad_ckpt="reentrant", precision="fp32",
                                optimizer="adamw", attn="eager")),
    ("bert-large-uncased", dict(PAGE, batch_size=4, precision="mixed-fp16", optimizer="adamw", attn="eager")),
    ("bert-large-uncased", dict(PAGE, batch_size=1, grad_accum=4, grad_ckpt="reentrant", precision="mixed-fp16",
                                optimizer="adamw", attn="eager")),
    ("bert-large-uncased", dict(PAGE, batch_size=4, precision="fp32", optimizer="adafactor", attn="eager")),
    ("bert-large-uncased", dict(PAGE, batch_size=1, grad_accum=4, grad_ckpt="reentrant", precision="mixed-fp16",
                                optimizer="adafactor", attn="eager")),
    ("bert-large-uncased", dict(PAGE, batch_size=4, precision="fp32", optimizer="adamw-8bit", attn="eager")),
    ("bert-large-uncased", dict(PAGE, batch_size=1, grad_accum=4, grad_ckpt="reentrant", precision="mixed-fp16",
                                optimizer="adamw-8bit", attn="eager")),
    ("bert-large-uncased", dict(LARGE, batch_size=4, precision="fp32", optimizer="adamw", attn="eager")),
    ("bert-large-uncased", dict(LARGE, batch_size=4, precision="mixed-fp16", optimizer="adamw", attn="eager")),
    ("bert-large-uncased", dict(LARGE, batch_size=4, precision="fp32", optimizer="adamw", attn="sdpa")),
    ("bert-large-uncased", dict(LARGE, batch_size=4, grad_ckpt=True, precision="mixed-fp16", optimizer="adamw",
                                attn="sdpa")),
    ("bert-large-uncased", dict(LARGE, batch_size=4, grad_ckpt="reentrant", precision="fp32", optimizer="adamw",
                                attn="eager")),
    ("bert-large-uncased", dict(LARGE, batch_size=4, grad_ckpt=True, precision="mixed-fp16",
                                optimizer="adamw-8bit", attn="eager")),
    ("bert-large-uncased", dict(LARGE, batch_size=4, precision="bf16", optimizer="adamw", attn="sdpa")),
    ("bert-large-uncased", dict(LARGE, batch_size=4, precision="bf16-true", optimizer="adafactor", attn="eager")),
    ("bert-large-uncased", dict(LARGE, batch_size=2, grad_ckpt="reentrant", precision="mixed-bf16",
                                optimizer="adamw-foreach", attn="sdpa")),
    ("bert-base-uncased", dict(seq_len=256, batch_size=8, precision="fp32", optimizer="adamw", attn="sdpa")),
    ("bert-base-uncased", dict(seq_len=128, batch_size=8, grad_accum=2, precision="mixed-fp16", optimizer="adamw",
                               attn="eager")),
]


def measure(name: str, options: dict) -> dict:
    from vramcalc.tracing.runner import run_trace

    spec = get_model(name)
    resolved = resolve_setup(spec, **options)
    peak = max(step_moments(spec, resolved), key=lambda moment: moment.tensor_bytes)
    started = time.perf_counter()
    traced = run_trace(spec, resolved, progress=False)
    total = sum(traced.terms.values())
    return dict(model=name, options=json.dumps(options, sort_keys=True), estimate_bytes=int(peak.tensor_bytes),
                trace_bytes=int(total), error=(peak.tensor_bytes - total) / total, estimate_phase=peak.phase.value,
                trace_phase=traced.phase.value, trace_seconds=round(time.perf_counter() - started, 1))


def main() -> int:
    rows = []
    for name, options in GRID:
        rows.append(measure(name, options))
        row = rows[-1]
        print(f"{row['error']:+.4%} {row['estimate_phase']:>14s} {row['trace_phase']:>14s} {name} {row['options']}",
              flush=True)
    with open(HERE / "accuracy_encoder.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    errors = [abs(row["error"]) for row in rows]
    lines = ["# Accuracy: the encoder family (BERT sequence classification), estimate vs trace", "",
             "`python benchmarks/accuracy_encoder.py`: `vramcalc.estimate` against the trace of transformers 5.25's "
             "`BertForSequenceClassification` step at full size (fake tensors, CUDA kernels emulated: "
             "`vramcalc/tracing/encoder.py`). Error = (estimate - trace) / trace of the step's peak tensor bytes; "
             "the first nine rows are the hf-perf-doc setups (`benchmarks/published.py`).", "",
             f"{len(rows)} setups: median |error| {statistics.median(errors):.3%}, max {max(errors):.3%}.", "",
             "| model | options | estimate GiB | trace GiB | error | phase (estimate / trace) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        options = ", ".join(f"{k}={v}" for k, v in json.loads(row["options"]).items())
        lines.append(f"| {row['model']} | {options} | {row['estimate_bytes'] / 2**30:.3f} | "
                     f"{row['trace_bytes'] / 2**30:.3f} | {row['error']:+.3%} | {row['estimate_phase']} / "
                     f"{row['trace_phase']} |")
    (HERE / "accuracy_encoder.md").write_text("\n".join(lines) + "\n")
    print(f"median {statistics.median(errors):.4%} max {max(errors):.4%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
