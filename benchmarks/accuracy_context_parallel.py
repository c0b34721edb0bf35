"""Context parallelism (``--cp``): the per-rank estimate against the per-rank trace of torch's own ring attention
(``context_parallel`` with accelerate's default "allgather" rotation) on a fake process group, at full size (fake
tensors hold shapes, not data, so a 70B model at 65,536 positions traces on a CPU).

    python benchmarks/accuracy_context_parallel.py            # the grid: accuracy_context_parallel.csv and the
                                                              # "Context parallelism (--cp)" section of
                                                              # accuracy_distributed.md
    python benchmarks/accuracy_context_parallel.py --limit 2  # the first two setups
    python benchmarks/accuracy_context_parallel.py --retrace num_gpus=  # retrace the setups whose words contain
                                                              # "num_gpus=" (the dp_shard x cp ones); the others keep
                                                              # their traced numbers from the CSV, re-estimated
    python benchmarks/accuracy_context_parallel.py --keep-traces  # re-estimate every setup against its CSV trace

Traced: one ring over the whole world (``--num-gpus`` = ``--cp``), and dp_shard x cp (``--num-gpus`` = D x C:
accelerate's 2-D ``("dp_shard", "cp")`` mesh, FSDP2 over the flattened ``dp_shard_cp``, the ring over ``cp``;
tracing/context_parallel.py). A ring beside --tp is listed estimated only, with the ring's traffic. Target: every
traced setup within 5%.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accuracy_sections import replace_section, setup_words, write_rows  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGET_PCT = 5.0
HEADING = "## Context parallelism (--cp)"
QLORA_HEADING = "## FSDP-QLoRA (--quant-storage bf16)"  # accuracy_distributed.py rewrites from there to the end

GRID = [
    ("llama-3.1-8b", dict(cp=4, seq_len=32768, grad_ckpt=True)),
    ("qwen2.5-7b", dict(cp=2, seq_len=16384, method="lora")),
    ("qwen3-8b", dict(cp=4, seq_len=32768, method="lora", lora_targets="all-linear", grad_ckpt=True)),
    ("llama-3.1-8b", dict(cp=8, seq_len=131072, grad_ckpt=True)),
    ("llama-3.3-70b", dict(cp=8, seq_len=65536, grad_ckpt=True)),
    # dp_shard x cp: D rings of C ranks beside each other, FSDP2 over all D x C
    ("llama-3.1-8b", dict(cp=4, num_gpus=8, seq_len=32768, grad_ckpt=True)),
    ("qwen2.5-7b", dict(cp=2, num_gpus=8, seq_len=16384, method="lora")),
    ("llama-3.3-70b", dict(cp=8, num_gpus=16, seq_len=65536, grad_ckpt=True)),
    # as `plan` proposes on A100-40GB
    ("llama-3.1-70b", dict(cp=8, num_gpus=16, seq_len=65536, method="lora", grad_ckpt=True)),
    ("llama-3.3-70b", dict(cp=8, num_gpus=64, seq_len=65536, grad_ckpt=True)),
]
ESTIMATED_ONLY = [
    ("llama-3.1-8b", dict(cp=4, tp=2, num_gpus=16, seq_len=65536, grad_ckpt=True)),
]


def traced_row(name: str, options: dict) -> dict:
    import vramcalc as vc

    started = time.perf_counter()
    estimate = vc.estimate(name, **options)
    trace = vc.trace(name, progress=False, **options)
    row = {"model": name, "setup": setup_words(options), "num_gpus": estimate.inputs["num_gpus"],
           "estimate_bytes": estimate.peak_tensor_bytes, "trace_bytes": trace.peak_tensor_bytes,
           "error_pct": round(100 * (estimate.peak_tensor_bytes - trace.peak_tensor_bytes) / trace.peak_tensor_bytes, 3),
           "estimate_phase": estimate.phase.value, "trace_phase": trace.phase.value,
           "cp_communication_bytes_per_step": estimate.details["cp_communication_bytes_per_step"],
           "seconds": round(time.perf_counter() - started, 1)}
    print(f"{row['error_pct']:+7.3f}% {name} {row['setup']} ({row['seconds']:.0f}s)", flush=True)
    return row


def kept_row(name: str, options: dict, traced: dict) -> dict:
    """A setup not retraced: its trace from the CSV (``traced``), its estimate recomputed."""
    import vramcalc as vc

    estimate = vc.estimate(name, **options)
    trace_bytes = traced["trace_bytes"]
    row = {**traced, "num_gpus": estimate.inputs["num_gpus"], "estimate_bytes": estimate.peak_tensor_bytes,
           "error_pct": round(100 * (estimate.peak_tensor_bytes - trace_bytes) / trace_bytes, 3),
           "estimate_phase": estimate.phase.value,
           "cp_communication_bytes_per_step": estimate.details["cp_communication_bytes_per_step"]}
    moved = estimate.peak_tensor_bytes - traced["estimate_bytes"]
    print(f"{row['error_pct']:+7.3f}% {name} {row['setup']} (kept trace; estimate moved {moved:+d} bytes)", flush=True)
    return row


def previous_rows() -> dict:
    import csv

    path = HERE / "accuracy_context_parallel.csv"
    if not path.exists():
        return {}
    integers = ("num_gpus", "estimate_bytes", "trace_bytes", "cp_communication_bytes_per_step")
    with open(path, newline="") as handle:
        return {(r["model"], r["setup"]): {**r, **{k: int(r[k]) for k in integers},
                                           "error_pct": float(r["error_pct"]), "seconds": float(r["seconds"])}
                for r in csv.DictReader(handle)}


def estimated_rows() -> list[str]:
    import vramcalc as vc

    out = ["| model | setup | GPUs | FSDP ranks | estimate GiB | ring bytes per step (GB) | step s on H100 SXM "
           "| ring exposed s |", "|---|---|---|---|---|---|---|---|"]
    for name, options in ESTIMATED_ONLY:
        b = vc.estimate(name, gpu="h100-sxm", **options)
        d = b.details
        out.append(f"| {name} | {setup_words(options)} | {b.inputs['num_gpus']} | {d['fsdp_shard_ranks']} "
                   f"| {b.peak_tensor_bytes / 2**30:.2f} | {d['cp_communication_bytes_per_step'] / 1e9:.1f} "
                   f"| {d.get('step_seconds', float('nan')):.2f} "
                   f"| {d.get('cp_exposed_communication_seconds_per_step', float('nan')):.3f} |")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--retrace", action="append", default=None, metavar="WORDS",
                        help="retrace only the setups whose 'model setup' words contain WORDS (repeatable); the "
                             "others keep their traces from the CSV and are re-estimated")
    parser.add_argument("--keep-traces", action="store_true",
                        help="re-estimate every setup, keeping its trace from the CSV (tracing only those missing)")
    args = parser.parse_args(argv)
    grid = GRID[: args.limit] if args.limit else GRID
    if args.retrace or args.keep_traces:
        previous, retrace = previous_rows(), args.retrace or []
        rows = [traced_row(name, options)
                if any(w in f"{name} {setup_words(options)}" for w in retrace)
                or (name, setup_words(options)) not in previous
                else kept_row(name, options, previous[(name, setup_words(options))]) for name, options in grid]
    else:
        rows = [traced_row(name, options) for name, options in grid]
    write_rows(HERE / "accuracy_context_parallel.csv", rows)
    within = sum(abs(r["error_pct"]) <= TARGET_PCT for r in rows)
    body = [f"Written by `python benchmarks/accuracy_context_parallel.py` (accuracy_context_parallel.csv): one rank of "
            "a ring of --cp GPUs (accelerate's default allgather rotation), alone (GPUs = cp) or beside dp_shard = "
            "GPUs / cp data-parallel rings (accelerate's 2-D (dp_shard, cp) mesh; the ring over cp), FSDP2 over all "
            "the GPUs: the estimate against the trace of torch's own `context_parallel` ring attention on a fake "
            f"process group (tracing/context_parallel.py). Within {TARGET_PCT:g}%: {within}/{len(rows)}.", "",
            "| model | setup | GPUs | estimate GiB | trace GiB | error % | phase (est / trace) | ring GB per step "
            "| trace s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        body.append(f"| {r['model']} | {r['setup']} | {r['num_gpus']} | {r['estimate_bytes'] / 2**30:.2f} "
                    f"| {r['trace_bytes'] / 2**30:.2f} | {r['error_pct']:+.3f} "
                    f"| {r['estimate_phase']} / {r['trace_phase']} "
                    f"| {r['cp_communication_bytes_per_step'] / 1e9:.1f} | {r['seconds']:.0f} |")
    body += ["", "Estimated only (a ring beside --tp, which the trace does not run):", ""] + estimated_rows()
    report = HERE / "accuracy_distributed.md"
    text = report.read_text()
    qlora = text.find("\n" + QLORA_HEADING)
    tail = text[qlora:] if qlora >= 0 else ""
    head = text[:qlora] if qlora >= 0 else text
    report.write_text(head)
    replace_section(HEADING, "\n".join(body), report)  # before the FSDP-QLoRA section, which that script rewrites
    report.write_text(report.read_text().rstrip("\n") + "\n" + tail)
    print("\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
