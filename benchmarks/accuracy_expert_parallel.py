"""Expert parallelism (``--ep``): the per-rank estimate against the per-rank trace of transformers' own expert plan
on a fake process group, full-size MoE models built from their configs on fake tensors.

    python benchmarks/accuracy_expert_parallel.py            # accuracy_expert_parallel.csv and the "Expert
                                                              # parallelism (--ep)" section of accuracy_distributed.md
    python benchmarks/accuracy_expert_parallel.py --limit 2  # the first two setups
    python benchmarks/accuracy_expert_parallel.py --from-csv # the section from the CSV's rows (no tracing)
    python benchmarks/accuracy_expert_parallel.py --over-fsdp  # only the EP x FSDP setups, merged into the CSV

Each rank of an E-way group holds n/E experts as transformers' ``MoEParamShard`` shards them and runs the shared
batch's routed pairs through ``AllToAllEP`` (``vramcalc/tracing/expert_parallel.py``; the split sizes those of a
uniform routing, the estimate's assumption). Every layer is built and traced, as in the other distributed rows.
Rows as ``benchmarks/accuracy.py``'s ``compare``; target: every setup within 5% (issue 14).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import compare, run_grid  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGET_PCT = 5.0
SECTION = "\n## Expert parallelism (--ep)\n"

# (model, options): 2 to 64 ranks, 47B to 671B, full and LoRA, with and without checkpointing
GRID = [
    ("qwen3-30b-a3b", dict(ep=8, seq_len=2048, grad_ckpt=True)),
    # the attention Linears: peft 0.21 puts all-linear onto the fused experts too, which --ep refuses (terms/moe_lora)
    ("qwen3-30b-a3b", dict(ep=4, method="lora", lora_targets="q_proj,k_proj,v_proj,o_proj", seq_len=4096,
                           grad_ckpt=True)),
    ("mixtral-8x7b", dict(ep=8, seq_len=4096, grad_ckpt=True)),
    ("mixtral-8x7b", dict(ep=2, method="lora", seq_len=2048)),
    ("qwen3-235b-a22b", dict(ep=16, method="lora", seq_len=4096, grad_ckpt=True)),
    ("qwen3-235b-a22b", dict(ep=32, seq_len=2048, grad_ckpt=True)),
    ("deepseek-v3", dict(ep=64, method="lora", seq_len=4096, grad_ckpt=True)),
    ("deepseek-v3", dict(ep=64, seq_len=2048, grad_ckpt=True)),
    # EP across FSDP ranks (DistributedConfig(fsdp_size=N, ep_size=E)): every rank its own batch, dense units over N,
    # the experts over efsdp = N/E
    ("qwen3-30b-a3b", dict(ep=4, num_gpus=8, sharding="fsdp", seq_len=2048, grad_ckpt=True)),
    ("mixtral-8x7b", dict(ep=8, num_gpus=16, sharding="fsdp", method="lora", seq_len=4096, grad_ckpt=True)),
    ("qwen3-235b-a22b", dict(ep=8, num_gpus=32, sharding="fsdp", method="lora", lora_targets="q_proj,k_proj,v_proj,o_proj",
                             seq_len=4096, grad_ckpt=True)),
    ("deepseek-v3", dict(ep=32, num_gpus=64, sharding="fsdp", seq_len=2048, grad_ckpt=True)),
]


def over_fsdp(options: dict) -> bool:
    return options.get("sharding") == "fsdp"


def table(rows: list[dict]) -> str:
    within = sum(abs(r["peak_error_pct"]) <= TARGET_PCT for r in rows)
    out = [f"{within} of {len(rows)} setups within {TARGET_PCT:g}%.", "",
           "| model | GPUs | ep | efsdp | setup | experts per rank | estimate GiB | trace GiB | error % "
           "| phase (est / trace) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    from vramcalc import get_model

    for r in rows:
        words = dict(part.split("=", 1) for part in r["setup"].split())
        ep = int(words["ep"])
        gpus = int(words.get("num_gpus", ep))
        setup = " ".join(part for part in r["setup"].split() if part.split("=")[0] not in ("ep", "num_gpus"))
        out.append(f"| {r['model']} | {gpus} | {ep} | {gpus // ep} | {setup} | {get_model(r['model']).num_experts // ep} "
                   f"| {r['peak_estimate_bytes'] / 2**30:.2f} | {r['peak_trace_bytes'] / 2**30:.2f} "
                   f"| {r['peak_error_pct']:+.3f} | {r['estimate_phase']} / {r['trace_phase']} |")
    return "\n".join(out) + "\n"


def read_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return [dict(r, peak_error_pct=float(r["peak_error_pct"]), peak_trace_bytes=int(r["peak_trace_bytes"]),
                     peak_estimate_bytes=int(r["peak_estimate_bytes"])) for r in csv.DictReader(f)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--from-csv", action="store_true", help="write the section from the rows already traced")
    parser.add_argument("--over-fsdp", action="store_true",
                        help="trace only the EP x FSDP setups and keep the CSV's other rows")
    args = parser.parse_args(argv)
    out = HERE / "accuracy_expert_parallel.csv"
    if args.from_csv:
        rows = read_rows(out)
    elif args.over_fsdp:
        part = out.with_suffix(".part.csv")
        traced = run_grid([g for g in GRID if over_fsdp(g[1])], str(part))
        new = {(r["model"], r["setup"]): r for r in traced}
        kept = [r for r in read_rows(out) if (r["model"], r["setup"]) not in new]
        rows = kept + traced
        with open(out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(traced[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        part.unlink()
    else:
        rows = run_grid(GRID[: args.limit] if args.limit else GRID, str(out))
    section = (SECTION + f"\nWritten by `python benchmarks/accuracy_expert_parallel.py` ({out.name}; "
               "`--over-fsdp` traces the EP x FSDP rows alone). GPUs = ep: one expert-parallel group of --ep ranks "
               "sharing one batch (transformers `DistributedConfig(tp_size=E, tp_plan={}, ep_size=E)`). GPUs > ep: "
               "EP across FSDP ranks (`DistributedConfig(fsdp_size=N, ep_size=E)`, --sharding fsdp): every rank its "
               "own batch, dense layers FSDP2-sharded over N, each rank's n/E experts FSDP2-sharded over efsdp = N/E. "
               "Uniform routing; the trace runs transformers' own expert plan, FSDP2 plan and AllToAllEP on a fake "
               "process group.\n\n" + table(rows))
    report = HERE / "accuracy_distributed.md"
    text = report.read_text()
    if SECTION in text:  # replace the previous section, whatever follows it up to the next "## "
        head, rest = text.split(SECTION, 1)
        tail = rest[rest.index("\n## "):] if "\n## " in rest else ""
        text = head.rstrip("\n") + "\n" + section + tail
    else:
        text = text.rstrip("\n") + "\n" + section
    report.write_text(text)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
