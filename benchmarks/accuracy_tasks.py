"""Accuracy report for ``--task`` (issue 15): ``vramcalc.estimate(task=...)`` against the trace of TRL 1.16's
``DPOTrainer``, ``KTOTrainer`` and ``GRPOTrainer`` ``_compute_loss`` and ``RewardTrainer.compute_loss`` on fake tensors (``vramcalc/tracing/tasks.py``),
and of GRPO's generation through transformers' ``generate`` (``tracing/tasks.trace_generation_bytes``).

    python benchmarks/accuracy_tasks.py              # the grid (several minutes): accuracy_tasks.csv and .md
    python benchmarks/accuracy_tasks.py --limit 4    # the first four setups

Each row: the setup, the traced and estimated peak tensor bytes of the step (the load phase left out on both
sides; for GRPO the training phase only: its generation and reference phases are modelled, not traced), the phase
of each, and the error (estimate - trace) / trace. Generation rows (``kind=generation``) compare the generation
phase's bytes beside the model states (KV cache, activations, logits, sampling). Tiny models of four families
(``tests/tiny_models.py``) keep the grid in minutes; every term scales with b, s, h, V as at full size.
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
from vramcalc.options import Phase  # noqa: E402
from vramcalc.training_setup import resolve_setup  # noqa: E402

HERE = Path(__file__).resolve().parent
MIB = 2**20
TASKS_HEADING = "## Tasks (issue 15)"  # the section of benchmarks/accuracy.md this script writes (accuracy.py keeps it)


def grid() -> list[tuple[str, dict]]:
    rows = []
    for family, precision in (("llama", None), ("qwen3", None), ("mistral", None), ("gemma2", "bf16")):
        extra = {} if precision is None else {"precision": precision}
        for method, refs in (("full", ("copy", "precomputed")), ("lora", ("copy", "adapter", "precomputed")),
                             ("qlora", ("copy", "adapter"))):
            for ref in refs:
                rows.append((family, dict(task="dpo", method=method, ref_model=ref, seq_len=512, prompt_len=128,
                                          **extra)))
    rows += [
        ("llama", dict(task="ipo", method="full", precision="bf16", seq_len=1024, batch_size=2, grad_ckpt=False,
                       prompt_len=64)),
        ("llama", dict(task="simpo", method="lora", seq_len=512, prompt_len=64)),
        ("qwen3", dict(task="dpo", method="lora", seq_len=1024, prompt_len=256, batch_size=2)),
        ("qwen3", dict(task="dpo", method="qlora", seq_len=2048, prompt_len=1024, lora_targets="all-linear",
                       ref_model="copy")),
        ("mistral", dict(task="cpo", method="qlora", seq_len=1024, prompt_len=512, grad_ckpt=False)),
        ("qwen3", dict(task="orpo", method="full", seq_len=512, prompt_len=128, batch_size=2)),
        ("llama", dict(task="dpo", method="lora", ref_model="adapter", seq_len=2048, prompt_len=512, batch_size=4,
                       grad_ckpt=False)),
    ]
    # GRPO: the training phase (GRPOTrainer._compute_loss on b·g / grad_accum completions); its generation and
    # reference phases are modelled, not traced
    grpo = dict(task="grpo", prompt_len=128, completion_len=256, num_generations=4)
    rows += [
        ("llama", dict(grpo, method="lora")),
        ("llama", dict(grpo, method="full", grad_ckpt=False)),
        ("qwen3", dict(grpo, method="qlora", batch_size=2, grad_accum=2)),
        ("mistral", dict(grpo, method="lora", num_generations=8, completion_len=512)),
    ]
    # KTO: b unpaired rows and their KL rows (KTOTrainer._compute_loss), every reference
    kto = dict(task="kto", batch_size=2, seq_len=512, prompt_len=128)
    rows += [
        ("llama", dict(kto, method="full")),
        ("llama", dict(kto, method="lora")),
        ("llama", dict(kto, method="lora", ref_model="copy", batch_size=4)),
        ("qwen3", dict(kto, method="lora", ref_model="precomputed")),
        ("qwen3", dict(kto, method="full", ref_model="precomputed", grad_ckpt=False)),
        ("mistral", dict(kto, method="qlora", seq_len=1024, prompt_len=256)),
        ("mistral", dict(kto, method="qlora", ref_model="copy")),
        ("gemma2", dict(kto, method="full", precision="bf16", batch_size=4, prompt_len=64, grad_ckpt=False)),
        ("gemma2", dict(kto, method="lora", precision="bf16")),
    ]
    # GRPO's generation phase: transformers' generate with its DynamicCache on fake tensors (kind "generation")
    gen = dict(task="grpo", precision="bf16", kind="generation")
    rows += [
        ("llama", dict(gen, method="lora", batch_size=2, num_generations=4, prompt_len=16, completion_len=48)),
        ("llama", dict(gen, method="full", batch_size=1, num_generations=4, prompt_len=8, completion_len=160)),
        ("qwen3", dict(gen, method="qlora", precision="mixed-bf16", batch_size=1, num_generations=8, prompt_len=32,
                       completion_len=32)),
        ("mistral", dict(gen, method="full", batch_size=2, num_generations=4, prompt_len=64, completion_len=16)),
        ("gemma2", dict(gen, method="lora", batch_size=2, num_generations=4, prompt_len=100, completion_len=24)),
    ]
    # distillation: GKDTrainer.compute_loss with a teacher twice as deep and wide ("2x": tiny_teacher_config)
    distill = dict(task="distill", teacher="2x")
    rows += [
        ("llama", dict(distill, method="lora", seq_len=512)),
        ("llama", dict(distill, method="full", seq_len=256, batch_size=2)),
        ("qwen3", dict(distill, method="qlora", seq_len=512)),
        ("qwen3", dict(distill, method="full", precision="mixed-bf16", seq_len=256)),
        ("mistral", dict(distill, method="lora", seq_len=512, grad_ckpt=True)),
        ("gemma2", dict(distill, method="lora", precision="bf16", seq_len=256)),
    ]
    # reward: RewardTrainer.compute_loss on AutoModelForSequenceClassification (score [1, h], no lm_head), b pairs
    # in one forward of 2·b rows
    reward = dict(task="reward", seq_len=512)
    rows += [
        ("llama", dict(reward, method="full")),
        ("llama", dict(reward, method="lora")),  # mixed-bf16 LoRA + checkpointing: the SFT layer-backward rule
        ("llama", dict(reward, method="qlora", batch_size=2)),
        ("qwen3", dict(reward, method="lora", precision="bf16", batch_size=2)),
        ("qwen3", dict(reward, method="full", precision="bf16", grad_ckpt=False)),
        ("mistral", dict(reward, method="lora", precision="bf16", seq_len=1024)),
        ("gemma2", dict(reward, method="lora", precision="bf16")),
    ]
    return [(family, dict(stack="trl", **options)) for family, options in rows]


def measure_generation(family: str, options: dict) -> dict:
    """GRPO's generation transients (KV cache, activations, logits and sampling beside the weights): traced through
    transformers' ``generate`` (``tracing/tasks.trace_generation_bytes``) and estimated
    (``terms/tasks.generation_bytes``)."""
    from vramcalc.estimator import layer_setup
    from vramcalc.terms import tasks
    from vramcalc.tracing.tasks import trace_generation_bytes

    spec = TINY[family]
    resolved = resolve_setup(spec, **{k: v for k, v in options.items() if k != "kind"})
    setup = resolved.setup
    started = time.perf_counter()
    traced = trace_generation_bytes(spec, resolved)
    estimated = int(tasks.generation_bytes(spec, setup, layer_setup(resolved).dtypes,
                                           setup.batch_size * setup.num_generations, setup.prompt_len,
                                           setup.completion_len))
    return {"model": spec.name, "options": " ".join(f"{k}={v}" for k, v in options.items() if k != "stack"),
            "trace_bytes": traced["generation_bytes"], "estimate_bytes": estimated,
            "trace_phase": "generation:" + traced["phase"], "estimate_phase": "generation",
            "error": (estimated - traced["generation_bytes"]) / traced["generation_bytes"],
            "trace_seconds": round(time.perf_counter() - started, 1)}


def measure(family: str, options: dict) -> dict:
    if options.get("kind") == "generation":
        return measure_generation(family, options)
    from tests.tiny_models import tiny_teacher_config
    from vramcalc.tracing.runner import run_trace
    from vramcalc.tracing.tasks import DistillStepTracer, PreferenceStepTracer, RewardStepTracer

    spec = TINY[family]
    given = dict(options, teacher=tiny_teacher_config(family)) if options.get("teacher") == "2x" else options
    resolved = resolve_setup(spec, **given)
    started = time.perf_counter()
    tracer = {"distill": DistillStepTracer, "reward": RewardStepTracer}.get(options["task"], PreferenceStepTracer)
    result = run_trace(spec, resolved, progress=False, tracer_class=tracer)
    traced = sum(result.terms.values())
    skipped = (Phase.LOAD, Phase.GENERATION, Phase.REFERENCE_FORWARD) if options["task"] == "grpo" else (Phase.LOAD,)
    moments = [m for m in step_moments(spec, resolved) if m.phase not in skipped]
    peak = max(moments, key=lambda m: m.tensor_bytes)
    return {"model": spec.name, "options": " ".join(f"{k}={v}" for k, v in options.items() if k != "stack"),
            "trace_bytes": traced, "estimate_bytes": peak.tensor_bytes, "trace_phase": result.phase.value,
            "estimate_phase": peak.phase.value, "error": (peak.tensor_bytes - traced) / traced,
            "trace_seconds": round(time.perf_counter() - started, 1)}


def write(rows: list[dict]) -> None:
    write_rows(HERE / "accuracy_tasks.csv", rows)
    errors = [abs(r["error"]) for r in rows]
    lines = ["# Estimate vs trace: --task (TRL 1.16 DPOTrainer, KTOTrainer, GRPOTrainer)", "",
             "Generated by `python benchmarks/accuracy_tasks.py`. Error = (estimate - trace) / trace of the training "
             "step's peak tensor bytes (load phase left out; MiB = 2^20 bytes). The trace runs DPOTrainer's real "
             "`_compute_loss` (fused lm_head, reference via a second model or peft's `disable_adapter`, the DPO loss "
             "and its metrics) on fake tensors with the HF trace's model, optimizer and step (`vramcalc/tracing/"
             "tasks.py`); distill rows run GKDTrainer's real `compute_loss` (a 16-bit teacher twice as deep and wide, "
             "the generalized JSD loss on both full logits); KTO rows run KTOTrainer's real `_compute_loss` (b unpaired rows, the KL rows scored under "
             "no_grad by the policy and the reference); GRPO training rows run GRPOTrainer's real `_compute_loss` "
             "(training phase); GRPO `kind=generation` rows run transformers' real `generate` (sampling, "
             "DynamicCache) on b x num_generations rows and compare the generation phase's bytes beside the model "
             "states; the estimate is `vramcalc/terms/tasks.py`.", "",
             f"**{len(rows)} setups: median abs error {100 * statistics.median(errors):.2f}%, max "
             f"{100 * max(errors):.2f}%.**", "",
             *summary_lines(rows), "",
             "| model | options | trace MiB | estimate MiB | error | phase trace / estimate |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['options']} | {r['trace_bytes'] / MIB:.2f} | "
                     f"{r['estimate_bytes'] / MIB:.2f} | {100 * r['error']:+.2f}% | "
                     f"{r['trace_phase']} / {r['estimate_phase']} |")
    (HERE / "accuracy_tasks.md").write_text("\n".join(lines) + "\n")
    write_accuracy_section(rows)


def write_accuracy_section(rows: list[dict]) -> None:
    """The ``## Tasks (issue 15)`` section of ``benchmarks/accuracy.md``: the figures and the per-task summary
    (``benchmarks/accuracy_sections``)."""
    errors = [abs(r["error"]) for r in rows]
    families = sorted({r["model"] for r in rows})
    section = [TASKS_HEADING, "",
               f"`--task` (DPO, IPO, SimPO, ORPO, CPO, KTO, reward, GRPO training and generation, distill) against the "
               f"trace of "
               f"TRL 1.16's "
               f"real trainers' loss computation and of transformers' `generate` on fake tensors: "
               f"`benchmarks/accuracy_tasks.md`, written by `python benchmarks/accuracy_tasks.py` "
               f"({len(rows)} setups, {len(families)} families, full/LoRA/QLoRA: median |error| "
               f"{100 * statistics.median(errors):.2f}%, max {100 * max(errors):.2f}%).", "",
               *summary_lines(rows), "",
               "`--task reward` rows: RewardTrainer's real `compute_loss` on transformers' *ForSequenceClassification; "
               "`--task distill` rows: GKDTrainer's real `compute_loss` with a teacher. Published DPO/GRPO memory "
               "figures against the estimate: "
               "`benchmarks/tasks_published.md`.", ""]
    replace_section(TASKS_HEADING, "\n".join(section[2:]))


def _group(row: dict) -> str:
    options = dict(word.split("=", 1) for word in row["options"].split())
    task = options["task"] + (" generation" if options.get("kind") == "generation" else "")
    return f"{task} {options['method']}"


def summary_lines(rows: list[dict]) -> list[str]:
    """One line per task and method: setups, families, median and max abs error."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(_group(row), []).append(row)
    lines = ["| task, method | setups | families | median abs error | max abs error |", "|---|---|---|---|---|"]
    for name, members in sorted(groups.items()):
        errors = [abs(r["error"]) for r in members]
        families = len({r["model"] for r in members})
        lines.append(f"| {name} | {len(members)} | {families} | {100 * statistics.median(errors):.2f}% | "
                     f"{100 * max(errors):.2f}% |")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--only", default=None, help="only the setups whose options contain this text")
    parser.add_argument("--rewrite", action="store_true", help="rewrite the .md files from accuracy_tasks.csv")
    args = parser.parse_args(argv)
    if args.rewrite:
        with open(HERE / "accuracy_tasks.csv", newline="") as f:
            rows = [dict(r, trace_bytes=int(r["trace_bytes"]), estimate_bytes=int(r["estimate_bytes"]),
                         error=float(r["error"])) for r in csv.DictReader(f)]
        write(rows)
        return
    setups = [(f, o) for f, o in grid() if args.only is None or args.only in " ".join(f"{k}={v}" for k, v in
                                                                                      o.items())][: args.limit]
    rows = []
    for family, options in setups:
        row = measure(family, options)
        rows.append(row)
        print(f"{row['model']:>14} {row['options']:<90} {100 * row['error']:+.2f}%", flush=True)
    if args.only is not None:  # replace those rows of accuracy_tasks.csv, keep the others
        with open(HERE / "accuracy_tasks.csv", newline="") as f:
            old = [dict(r, trace_bytes=int(r["trace_bytes"]), estimate_bytes=int(r["estimate_bytes"]),
                        error=float(r["error"])) for r in csv.DictReader(f)]
        new = {(r["model"], r["options"]): r for r in rows}
        rows = [new.pop((r["model"], r["options"]), r) for r in old] + list(new.values())
    write(rows)


if __name__ == "__main__":
    main()
