"""The ``vramcalc`` command: a thin shell over the library. ``main(argv)`` returns the exit code.

Exit codes: 0 success; 2 bad input (one ``error: ...`` line on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys

from . import catalogue
from .breakdown import GIB_NOTE, MemoryBreakdown
from .errors import VramcalcError
from .units import BYTES_PER_GIB

FORMATS = ("table", "json", "csv")


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one ``error:`` line (no usage dump) with exit code 2."""

    def error(self, message: str):
        raise VramcalcError(message)


def _setup_options(parser: argparse.ArgumentParser) -> None:
    """The TrainingSetup flags shared by estimate, trace and plan. Values are validated by the library."""
    add = parser.add_argument
    add("--method", help="full | lora | qlora | prompt")
    add("--precision", help="fp32 | mixed-bf16 | mixed-fp16 | bf16 | fp16 | fp8")
    add("--optimizer", help="adamw | adamw-foreach | adamw-8bit | paged-adamw | paged-adamw-8bit | sgd | sgd-momentum | adafactor")
    add("--batch-size", dest="batch_size", help="micro-batch per GPU")
    add("--seq-len", dest="seq_len", help="tokens per sequence")
    add("--grad-ckpt", dest="grad_ckpt", action="store_const", const=True, help="gradient checkpointing on")
    add("--no-grad-ckpt", dest="grad_ckpt", action="store_const", const=False, help="gradient checkpointing off")
    add("--attn", help="sdpa | flash | eager")
    add("--lora-rank", dest="lora_rank")
    add("--lora-targets", dest="lora_targets", help="qv | all-linear | comma list of module names")
    add("--lora-dropout", dest="lora_dropout")
    add("--quant", help="nf4 | fp4 (qlora)")
    add("--double-quant", dest="double_quant", action="store_const", const=True)
    add("--no-double-quant", dest="double_quant", action="store_const", const=False)
    add("--compute-dtype", dest="compute_dtype", help="bf16 | fp16 | fp32 (qlora bnb_4bit_compute_dtype)")
    add("--virtual-tokens", dest="virtual_tokens", help="prompt tuning tokens")
    add("--adapter-dtype", dest="adapter_dtype", help="fp32 | bf16")
    add("--grad-accum", dest="grad_accum", help="gradient accumulation steps")
    add("--loss", help="hf | chunked | fused")
    add("--num-gpus", dest="num_gpus")
    add("--sharding", help="none | ddp | zero1 | zero2 | zero3 | fsdp")
    add("--fsdp-shard", dest="fsdp_shard", help="full-shard | shard-grad-op (with --sharding fsdp)")
    add("--offload", help="none | optimizer | params (zero1-3: optimizer; zero3 and fsdp: params)")
    add("--global-batch-size", dest="global_batch_size", help="sequences per step over all GPUs (sets --batch-size)")


SETUP_KEYS = (
    "method", "precision", "optimizer", "batch_size", "seq_len", "grad_ckpt", "attn", "lora_rank", "lora_targets",
    "lora_dropout", "quant", "double_quant", "compute_dtype", "virtual_tokens", "adapter_dtype", "grad_accum", "loss",
    "num_gpus", "sharding", "fsdp_shard", "offload", "global_batch_size",
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vramcalc", description="GPU memory, time and cost of fine-tuning an LLM. " + GIB_NOTE + ".")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    for verb, help_text in (("estimate", "analytic estimate (microseconds)"),
                            ("trace", "exact allocation trace of a real HF training step on fake tensors (needs torch)")):
        sub = verbs.add_parser(verb, help=help_text)
        sub.add_argument("model", help="catalogue name, HF repo id, or path to a config.json (or its folder)")
        _setup_options(sub)
        sub.add_argument("--gpu", help="catalogue GPU: say whether it fits and the headroom")
        sub.add_argument("--format", default="table", help="table | json | csv")
    for verb in ("models", "gpus"):
        sub = verbs.add_parser(verb, help=f"list the {verb} catalogue")
        sub.add_argument("--format", default="table", help="table | json | csv")
    sub = verbs.add_parser("plan", help="every catalogue GPU: how many, largest micro-batch, host RAM, time and cost")
    sub.add_argument("model", help="catalogue name, HF repo id, or path to a config.json (or its folder)")
    _setup_options(sub)
    sub.add_argument("--tokens", required=True, help="dataset tokens, e.g. 1e9")
    sub.add_argument("--epochs", help="passes over the dataset (default 1)")
    sub.add_argument("--gpus", help="comma list of catalogue GPUs (default: all)")
    sub.add_argument("--max-gpus", dest="max_gpus", help="most GPUs to try per type (default 512)")
    sub.add_argument("--rank-by", dest="rank_by", help="cost | time (default cost)")
    sub.add_argument("--mfu", help="model-FLOPs utilisation to assume (default: per GPU generation)")
    sub.add_argument("--usd-per-kwh", dest="usd_per_kwh", help="electricity price (default: US commercial average)")
    sub.add_argument("--amortisation-years", dest="amortisation_years", help="purchase write-off period (default 3)")
    sub.add_argument("--offload-optimizer", dest="offload_optimizer", action="store_true",
                     help="optimizer states on the host (ZeRO-Offload)")
    sub.add_argument("--no-hosted", dest="hosted", action="store_false", help="leave hosted services out")
    sub.add_argument("--output", help="write the plan as CSV to this file")
    sub.add_argument("--format", default="table", help="table | json | csv")
    sub = verbs.add_parser("max-batch", help="the largest micro-batch that fits one GPU")
    sub.add_argument("model", help="catalogue name, HF repo id, or path to a config.json (or its folder)")
    _setup_options(sub)
    sub.add_argument("--gpu", required=True, help="catalogue GPU")
    sub.add_argument("--offload-optimizer", dest="offload_optimizer", action="store_true")
    sub.add_argument("--format", default="table", help="table | json | csv")
    sub = verbs.add_parser("report", help="reference tables (hardware by size, techniques, budgets) as Markdown and CSV")
    sub.add_argument("--model", dest="models", action="append", default=[], help="a model to add (repeatable)")
    _setup_options(sub)
    sub.add_argument("--tokens", help="token budget of the cost columns (default 1e9)")
    sub.add_argument("--epochs", help="passes over the dataset (default 1)")
    sub.add_argument("--budget", dest="budgets", action="append", help="a budget in $ (repeatable; default bands)")
    sub.add_argument("--speed-gpu", dest="speed_gpu", help="GPU of the techniques table's speed column")
    sub.add_argument("--max-gpus", dest="max_gpus", help="most GPUs to try per type (default 512)")
    sub.add_argument("--output", help="folder for report.md and the CSV tables")
    return parser


def main(argv: list[str] | None = None) -> int:
    stdout, stderr = sys.stdout, sys.stderr
    try:
        args = build_parser().parse_args(argv)
        fmt = getattr(args, "format", "table")
        if fmt not in FORMATS:
            raise VramcalcError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
        if args.verb in ("estimate", "trace"):
            stdout.write(_run_breakdown(args))
        elif args.verb == "models":
            stdout.write(_models(fmt))
        elif args.verb == "gpus":
            stdout.write(_gpus(fmt))
        elif args.verb == "plan":
            from .planning import plan_command

            stdout.write(plan_command(args, fmt))
        elif args.verb == "max-batch":
            from .planning import max_batch_command

            stdout.write(max_batch_command(args, fmt))
        elif args.verb == "report":
            from .report import report_command

            stdout.write(report_command(args))
        return 0
    except VramcalcError as err:
        stderr.write(f"error: {err}\n")
        return 2
    except ImportError as err:
        stderr.write(f"error: {err}\n")
        return 2
    except KeyboardInterrupt:
        stderr.write("error: interrupted\n")
        return 130


def setup_kwargs(args: argparse.Namespace) -> dict:
    return {key: getattr(args, key) for key in SETUP_KEYS if getattr(args, key, None) is not None}


def _run_breakdown(args: argparse.Namespace) -> str:
    from . import estimate, trace

    function = estimate if args.verb == "estimate" else trace
    result = function(args.model, gpu=args.gpu, **setup_kwargs(args))
    for warning in result.warnings:
        sys.stderr.write(f"warning: {warning}\n")
    return format_breakdown(result, args.format)


def format_breakdown(result: MemoryBreakdown, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(result.to_dict(), indent=2) + "\n"
    if fmt == "csv":
        row = breakdown_row(result)
        return _csv([row], list(row))
    return result.table() + "\n"


def breakdown_row(result: MemoryBreakdown) -> dict:
    """One flat, unit-suffixed row: the setup, each term in bytes, and the totals in bytes and GiB."""
    row = {"model": result.model, "source": result.source, "phase": result.phase.value}
    row.update({key: value for key, value in result.inputs.items() if key not in ("model", "defaults")})
    row.update({f"{term}_bytes": value for term, value in result.terms().items()})
    row["peak_tensor_bytes"] = result.peak_tensor_bytes
    row["total_bytes"] = result.total_bytes
    row["total_gib"] = round(result.total_bytes / BYTES_PER_GIB, 2)
    if result.gpu is not None:
        row["gpu"] = result.gpu.name
        row["fits"] = result.fits()
        row["headroom_gib"] = round(result.headroom_bytes() / BYTES_PER_GIB, 2)
    return row


def _csv(rows: list[dict], header: list[str]) -> str:
    from .spreadsheet import safe_cell

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([safe_cell(row.get(key, "")) for key in header])
    return buffer.getvalue()


def _table(rows: list[dict], header: list[str]) -> str:
    cells = [[str(row.get(key, "")) for key in header] for row in rows]
    widths = [max(len(key), *(len(c[i]) for c in cells)) if cells else len(key) for i, key in enumerate(header)]
    lines = ["  ".join(key.ljust(w) for key, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines) + "\n"


def _render(rows: list[dict], fmt: str, note: str = "") -> str:
    header = list(rows[0]) if rows else []
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if fmt == "csv":
        return _csv(rows, header)
    return _table(rows, header) + (f"({note})\n" if note else "")


def model_rows() -> list[dict]:
    return [
        {
            "name": m.name,
            "family": m.family,
            "params": m.params,
            "active_params": m.active_params,
            "layers": m.num_layers,
            "hidden_size": m.hidden_size,
            "vocab_size": m.vocab_size,
            "context": m.max_position_embeddings or "",
            "license": m.license,
        }
        for m in catalogue.models()
    ]


def gpu_rows() -> list[dict]:
    return [
        {
            "name": g.name,
            "memory_bytes": g.memory_bytes,
            "memory_gib": round(g.memory_gib, 2),
            "bandwidth_gb_s": g.bandwidth_gb_s if g.bandwidth_gb_s is not None else "",
            "bf16_dense_tflops": g.bf16_dense_tflops if g.bf16_dense_tflops is not None else "",
            "fp8_dense_tflops": g.fp8_dense_tflops if g.fp8_dense_tflops is not None else "",
            "tdp_w": g.tdp_w if g.tdp_w is not None else "",
            "list_price_usd": g.list_price_usd if g.list_price_usd is not None else "",
            "cloud_usd_per_gpu_hour": g.cloud_usd_per_gpu_hour if g.cloud_usd_per_gpu_hour is not None else "",
            "cloud_price_date": g.cloud_price_date,
        }
        for g in catalogue.gpus()
    ]


def _models(fmt: str) -> str:
    return _render(model_rows(), fmt)


def _gpus(fmt: str) -> str:
    return _render(gpu_rows(), fmt, note=GIB_NOTE)


if __name__ == "__main__":
    sys.exit(main())
