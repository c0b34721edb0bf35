"""Accuracy report for peft's methods (issue 17): ``vramcalc.estimate(method=...)`` against the trace of the same
setup built by real peft (``tracing/build.py::_apply_peft``), for every method the estimate has formulas for, on a
Llama, a Mistral and a Mixtral (MoE) family; and the trainable parameters of every
accepted method on llama-3.1-8b (counted on the real peft model built on the meta device).

    python benchmarks/accuracy_methods.py              # the grid (a few minutes): accuracy_methods.csv and .md
    python benchmarks/accuracy_methods.py --limit 3    # the first three setups
    python benchmarks/accuracy_methods.py --from-csv   # rewrite the .md files from accuracy_methods.csv

Each row: the setup, the peak tensor bytes estimated and traced, each one's phase, and the relative error
(estimate - trace) / trace. The tiny models are ``tests/tiny_models.py``'s; every mechanism scales with b, s, h as in
a full-size model.
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

from benchmarks.accuracy_sections import replace_section, write_rows  # noqa: E402
from tests.tiny_models import TINY  # noqa: E402
from vramcalc.estimator import step_moments  # noqa: E402
from vramcalc.peft_methods import PEFT_METHODS  # noqa: E402
from vramcalc.training_setup import resolve_setup  # noqa: E402

HERE = Path(__file__).resolve().parent
FAMILIES = ("llama", "mistral")


def grid() -> list[tuple[str, dict]]:
    per_method = {
        "dora": [dict(), dict(lora_targets="all-linear"), dict(lora_targets="all-linear", grad_ckpt=True),
                 dict(lora_rank=32, batch_size=2, seq_len=256)],
        "adalora": [dict(), dict(lora_targets="all-linear"), dict(lora_targets="all-linear", grad_ckpt=True)],
        "ia3": [dict(), dict(lora_targets="all-linear"), dict(lora_targets="all-linear", grad_ckpt=True)],
        "loha": [dict(), dict(lora_targets="all-linear"), dict(lora_targets="all-linear", grad_ckpt=True)],
        "lokr": [dict(), dict(lora_targets="all-linear"), dict(lora_targets="all-linear", grad_ckpt=True)],
        "ln-tuning": [dict(), dict(grad_ckpt=True), dict(batch_size=2, seq_len=256)],
        "p-tuning": [dict(), dict(grad_ckpt=True, batch_size=2), dict(virtual_tokens=64)],
        "vera": [dict(), dict(lora_targets="all-linear"), dict(lora_targets="all-linear", grad_ckpt=True)],
        "oft": [dict(), dict(lora_targets="all-linear"), dict(lora_targets="all-linear", grad_ckpt=True)],
        # prefix tuning does not run under --grad-ckpt (the estimate says why); SDPA only
        "prefix": [dict(), dict(batch_size=2, seq_len=256), dict(virtual_tokens=64)],
    }
    rows = []
    for family in FAMILIES:
        for method, variants in per_method.items():
            for options in variants:
                rows.append((family, dict(dict(method=method, seq_len=512), **options)))
    # MoE: every method on Mixtral (its experts are not nn.Linear modules: targets are the attention's Linears;
    # ln-tuning's norms are traced only for llama and mistral, peft's per-family mapping)
    for method in per_method:
        if method == "ln-tuning":
            continue
        rows.append(("mixtral", dict(method=method, seq_len=512)))
        if method != "prefix":
            rows.append(("mixtral", dict(method=method, seq_len=512, grad_ckpt=True)))
    # QDoRA: DoRA on an NF4 base (the estimate composes QLoRA's base with DoRA's extras)
    rows += [(family, dict(method="dora", quant="nf4", seq_len=512, **options)) for family in FAMILIES
             for options in (dict(), dict(lora_targets="all-linear"), dict(lora_targets="all-linear", grad_ckpt=True))]
    rows += [("mixtral", dict(method="dora", quant="nf4", seq_len=512, grad_ckpt=ckpt)) for ckpt in (False, True)]
    # short sequences: the methods' [out, in]-sized temporaries outweigh the logits and the peak moves into a layer
    rows += [("llama", dict(method=method, seq_len=64, lora_targets="all-linear", grad_ckpt=ckpt))
             for method in ("dora", "loha", "lokr", "vera", "oft") for ckpt in (False, True)]
    return rows


def measure(family: str, options: dict) -> dict:
    from vramcalc.tracing.runner import run_trace

    spec = TINY[family]
    resolved = resolve_setup(spec, **options)
    peak = max(step_moments(spec, resolved), key=lambda moment: moment.tensor_bytes)
    started = time.perf_counter()
    traced = run_trace(spec, resolved, progress=False)
    traced_bytes = sum(traced.terms.values())
    return {"model": spec.name, "setup": " ".join(f"{k}={v}" for k, v in options.items()),
            "estimate_bytes": peak.tensor_bytes, "trace_bytes": traced_bytes, "estimate_phase": peak.phase.value,
            "trace_phase": traced.phase.value, "error": (peak.tensor_bytes - traced_bytes) / traced_bytes,
            "trace_s": round(time.perf_counter() - started, 1)}


def trainable_params_8b() -> list[dict]:
    """Every accepted method with its defaults and all-linear targets where it takes targets, on llama-3.1-8b:
    trainable parameters of the real peft model (meta device, no memory), and the estimate's own count."""
    import torch

    import vramcalc
    from vramcalc.catalogue import get_model
    from vramcalc.errors import VramcalcError
    from vramcalc.tracing.build import build_model

    spec = get_model("llama-3.1-8b")
    rows = []
    for facts in PEFT_METHODS:
        options = dict(method=facts.word, **({"lora_targets": "all-linear"} if facts.targets else {}))
        row = {"method": facts.word, "options": " ".join(f"{k}={v}" for k, v in options.items())}
        try:
            resolved = resolve_setup(spec, **options)
            row["size"] = f"{facts.size_kwarg}={resolved.setup.lora_rank}" if facts.size_kwarg else ""
            with torch.device("meta"):
                model = build_model(spec, resolved, None, device="meta")
            row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        except (VramcalcError, RuntimeError, ValueError, TypeError) as err:
            row["trainable_params"] = f"not built: {str(err).splitlines()[0][:80]}"
        try:
            row["estimate_trainable_params"] = vramcalc.estimate(spec, **options).details["trainable_params"]
        except VramcalcError:
            row["estimate_trainable_params"] = "trace only"
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--no-params", action="store_true", help="skip the llama-3.1-8b trainable-parameter table")
    parser.add_argument("--from-csv", action="store_true",
                        help="rewrite the .md (and accuracy.md's section) from accuracy_methods.csv, tracing nothing")
    args = parser.parse_args()
    rows = []
    if args.from_csv:
        with open(HERE / "accuracy_methods.csv", newline="") as handle:
            for row in csv.DictReader(handle):
                rows.append(dict(row, estimate_bytes=int(row["estimate_bytes"]), trace_bytes=int(row["trace_bytes"]),
                                 error=float(row["error"])))
    for family, options in ([] if args.from_csv else grid()[: args.limit]):
        row = measure(family, options)
        rows.append(row)
        print(f"{row['model']:<14} {row['setup']:<60} {row['error']:+.4f}", flush=True)
    if not args.from_csv:
        write_rows(HERE / "accuracy_methods.csv", rows)
    errors = [abs(row["error"]) for row in rows]
    lines = ["# Accuracy: peft methods, estimate vs trace", "",
             "`python benchmarks/accuracy_methods.py` (peft 0.21.2, tiny models of `tests/tiny_models.py`, bf16, "
             "AdamW, sdpa, seq_len 512 unless given). Error = (estimate - trace) / trace of the step's peak tensor "
             "bytes.", "",
             f"{len(rows)} setups: median |error| {statistics.median(errors):.2%}, max {max(errors):.2%}.", "",
             "| model | setup | estimate (B) | trace (B) | phases (est / trace) | error |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['setup']} | {row['estimate_bytes']:,} | {row['trace_bytes']:,} | "
                     f"{row['estimate_phase']} / {row['trace_phase']} | {row['error']:+.2%} |")
    by_method: dict[str, list[float]] = {}
    for row in rows:
        words = dict(item.split("=", 1) for item in row["setup"].split())
        key = words["method"] + (f" ({words['quant']} base)" if "quant" in words else "")
        by_method.setdefault(key, []).append(abs(row["error"]))
    params = [] if args.no_params else trainable_params_8b()
    summary = summary_lines(rows, by_method, params)
    lines[4:4] = summary
    if not args.no_params:
        lines += ["", "## Trainable parameters on llama-3.1-8b (peft's defaults; all-linear where a method takes "
                  "targets)", "", "| method | size knob | trainable (peft, meta build) | estimate |",
                  "|---|---|---|---|"]
        for row in params:
            cells = [f"{value:,}" if isinstance(value, int) else value
                     for value in (row["trainable_params"], row["estimate_trainable_params"])]
            lines.append(f"| {row['method']} | {row.get('size', '')} | {cells[0]} | {cells[1]} |")
    (HERE / "accuracy_methods.md").write_text("\n".join(lines) + "\n")
    write_accuracy_section(summary)


def summary_lines(rows: list[dict], by_method: dict[str, list[float]], params: list[dict]) -> list[str]:
    """The "## Summary" section: per method, its trainable parameters on llama-3.1-8b (peft's meta build) and the
    estimate's error against the trace over its setups; also accuracy.md's "## peft methods" section."""
    errors = [abs(row["error"]) for row in rows]
    families = sorted({row["model"] for row in rows})
    trainable = {row["method"]: row["trainable_params"] for row in params}
    out = ["## Summary", "",
           f"Every peft method with estimate formulas, estimate vs the trace of the real peft model "
           f"(`benchmarks/accuracy_methods.md`, written by `python benchmarks/accuracy_methods.py`; "
           f"{', '.join(families)}): {len(rows)} setups, median |error| {statistics.median(errors):.2%}, "
           f"max {max(errors):.2%}.", "",
           "| method | trainable params, llama-3.1-8b (peft defaults, all-linear where targeted) | setups | "
           "median abs error | max abs error |", "|---|---|---|---|---|"]
    for method, values in by_method.items():
        count = trainable.get(method, "")
        cell = f"{count:,}" if isinstance(count, int) else count
        out.append(f"| {method} | {cell} | {len(values)} | {statistics.median(values):.2%} | {max(values):.2%} |")
    return out + ["", published_variants_line(), ""]


def published_variants_line() -> str:
    """Whether the published development set (``benchmarks/published.csv``, scored by ``published.py``) has rows of
    a method beyond full/lora/qlora that this grid could score against a measurement."""
    path = HERE / "published.csv"
    if not path.exists():
        return ""
    with open(path, newline="") as handle:
        methods = [row["method"] for row in csv.DictReader(handle)]
    variants = sorted({method for method in methods if method not in ("full", "lora", "qlora", "prompt")})
    counts = ", ".join(f"{word} {methods.count(word)}" for word in sorted(set(methods)))
    if not variants:
        return (f"The published development set (`benchmarks/published.csv`, {len(methods)} rows: {counts}) has no "
                "DoRA or other LoRA-variant row: no measurement to score these methods against.")
    return f"Published rows of these methods: {', '.join(variants)} (scored in `benchmarks/published.md`)."


def write_accuracy_section(summary: list[str]) -> None:
    """accuracy.md's "## peft methods" section: the summary, without its own heading."""
    replace_section("## peft methods", "\n".join(summary[2:]))


if __name__ == "__main__":
    main()
