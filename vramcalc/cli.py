"""The ``vramcalc`` command: a thin shell over the library. ``main(argv)`` returns the exit code.

Exit codes: 0 success; 2 bad input (one ``error: ...`` line on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import fields

from .breakdown import GIB_NOTE
from .errors import VramcalcError
from .export import (csv_text, format_breakdown, gpus_text, models_text, render_rows, rows_csv, rows_json, stacks_text,
                     table_text,
                     terminal_text)
from .files import write_atomic
from .option_help import option_help
from .training_setup import TrainingSetup, setup_defaults
from .units import BYTES_PER_GIB
from .version import __version__

FORMATS = ("table", "json", "csv")


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one ``error:`` line (no usage dump) with exit code 2. Every flag's
    help says its default (``_default``: drawn from ``TrainingSetup``, stated there once)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise VramcalcError(message)


def _default(key: str) -> str:
    """' (default: X)' for a TrainingSetup field, from ``training_setup.setup_defaults()``."""
    value = setup_defaults()[key]
    if value is None:
        return " (default: none)"
    if isinstance(value, bool):
        return f" (default: {'on' if value else 'off'})"
    return f" (default: {value})"


def _setup_options(parser: argparse.ArgumentParser) -> None:
    """The TrainingSetup flags shared by estimate, trace and plan. Values are validated by the library; each help
    text ends with the default ``TrainingSetup`` gives it."""

    def add(flag, key=None, **kwargs):
        key = key or flag[2:].replace("-", "_")
        parser.add_argument(flag, dest=key, help=option_help(key) + _default(key), **kwargs)

    for field in fields(TrainingSetup):
        flag = "--" + field.name.replace("_", "-")
        if field.type in ("bool", bool):  # an on/off pair: --packing / --no-packing
            add(flag, field.name, action="store_const", const=True)
            parser.add_argument("--no-" + flag[2:], dest=field.name, action="store_const", const=False,
                                help=NEGATED_HELP.get(field.name, f"{field.name.replace('_', ' ')} off"))
        elif field.type == "GradCkpt":  # bare --grad-ckpt is full checkpointing; --no-grad-ckpt is none
            add(flag, field.name, nargs="?", const="full", metavar="{full,selective,selective-op,reentrant,wrapper}")
            parser.add_argument("--no-" + flag[2:], dest=field.name, action="store_const", const="none",
                                help=NEGATED_HELP[field.name])
        else:
            add(flag, field.name)


NEGATED_HELP = {"grad_ckpt": "gradient checkpointing off",
                "double_quant": "keep the quantization constants in fp32 (qlora)"}


SETUP_KEYS = tuple(field.name for field in fields(TrainingSetup))  # every flag of _setup_options, by its dest


MODEL_HELP = "catalogue name, HF repo id, or path to a config.json (or its folder)"
REVISION_HELP = "branch, tag or commit of a HF repo id's config.json (default: main)"
FORMAT_HELP = "output: table | json | csv (default: table)"
RESERVED_HELP = ("also replay the step's allocations through PyTorch's caching allocator for max_memory_reserved: "
                 "the build, 1 warm-up step, empty_cache, 2 measured steps, with the --gpu profile's cuBLAS "
                 "workspace; adds details.reserved_peak_bytes (JSON, CSV) and a table line; traces three steps "
                 "instead of two, recorded: about 1.5 times as long (default: off)")

SAMPLE_LENGTHS_HELP = ("the dataset's token count per sample, for unpacked batches padded to their longest sample "
                       "(--seq-len truncates): a 'tokens,samples' CSV, a JSON list or one count per line; the peak "
                       "is the longest step's, and details.length_ladders_bytes what the shorter steps' loss blocks "
                       "keep cached on average over one epoch (in max_memory_reserved, not in the total) "
                       "(default: none, every step at --seq-len)")


def build_parser() -> argparse.ArgumentParser:
    from .cost import DEFAULT_AMORTISATION_YEARS, DEFAULT_USD_PER_KWH
    from .planning import DEFAULT_MAX_GPUS, MAX_GPUS_LIMIT

    parser = _Parser(prog="vramcalc", description="GPU memory, time and cost of fine-tuning an LLM. " + GIB_NOTE + ".",
                     epilog=EXTRAS_NOTE)
    parser.add_argument("--version", action="version", version=f"vramcalc {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser, metavar="COMMAND")
    for verb, help_text in (("estimate", "analytic estimate (microseconds)"),
                            ("trace", "exact allocation trace of a real HF training step on fake tensors (needs torch)")):
        sub = verbs.add_parser(verb, help=help_text, description=help_text)
        sub.add_argument("model", help=MODEL_HELP)
        sub.add_argument("--revision", help=REVISION_HELP)
        _setup_options(sub)
        sub.add_argument("--gpu", help="catalogue GPU: say whether it fits and the headroom (default: none)")
        if verb == "trace":
            sub.add_argument("--reserved", action="store_true", help=RESERVED_HELP)
        else:
            sub.add_argument("--sample-lengths", dest="sample_lengths", metavar="FILE", help=SAMPLE_LENGTHS_HELP)
        sub.add_argument("--format", default="table", help=FORMAT_HELP)
    for verb in ("models", "gpus"):
        sub = verbs.add_parser(verb, help=f"list the {verb} catalogue", description=f"list the {verb} catalogue")
        sub.add_argument("--format", default="table", help=FORMAT_HELP)
    _add_model_filters(verbs.choices["models"])
    text = "every --method: the peft config class, what it trains, what --lora-rank sets, the options it takes"
    sub = verbs.add_parser("methods", help=text, description=text)
    sub.add_argument("--format", default="table", help=FORMAT_HELP)
    text = "the training stacks (--stack) and every option each one sets, with its source"
    sub = verbs.add_parser("stacks", help=text, description=text)
    sub.add_argument("--format", default="table", help=FORMAT_HELP)
    text = "a local dataset's token count per sample, for estimate --sample-lengths (needs the trace extra)"
    sub = verbs.add_parser("lengths", help=text, description=text)
    sub.add_argument("data", help="the dataset: a .jsonl, .json, .csv or .parquet file of records")
    sub.add_argument("--tokenizer", required=True, help="the model's tokenizer: a local folder or a HF repo id")
    sub.add_argument("--field", help="the record field holding the text (default: each record's messages, text, "
                     "prompt+completion or instruction+output)")
    sub.add_argument("--output", help="also write the 'tokens,samples' CSV that --sample-lengths reads to this "
                     "file, atomically (default: print only)")
    sub.add_argument("--format", default="table", help=FORMAT_HELP)
    max_gpus_help = f"most GPUs to try per type, 1 to {MAX_GPUS_LIMIT:,} (default: {DEFAULT_MAX_GPUS})"
    text = "every catalogue GPU: how many, largest micro-batch, host RAM, time and cost"
    sub = verbs.add_parser("plan", help=text, description=text)
    sub.add_argument("model", help=MODEL_HELP)
    sub.add_argument("--revision", help=REVISION_HELP)
    _setup_options(sub)
    sub.add_argument("--tokens", help="dataset tokens, e.g. 1e9 (default: none; the plan gives the cost per "
                     "million training tokens, and with --tokens the hours and totals)")
    sub.add_argument("--epochs", help="passes over the dataset (default: 1)")
    sub.add_argument("--gpus", help="comma list of catalogue GPUs (default: all of them)")
    sub.add_argument("--max-gpus", dest="max_gpus", help=max_gpus_help)
    sub.add_argument("--rank-by", dest="rank_by", help="cost | time (default: cost)")
    sub.add_argument("--mfu", help="model-FLOPs utilisation to assume, 0 to 1 (default: the step-time model, "
                     "else per GPU generation)")
    sub.add_argument("--usd-per-kwh", dest="usd_per_kwh",
                     help=f"electricity price in $/kWh (default: {DEFAULT_USD_PER_KWH}, US commercial average)")
    sub.add_argument("--amortisation-years", dest="amortisation_years",
                     help=f"purchase write-off period in years (default: {DEFAULT_AMORTISATION_YEARS:g})")
    sub.add_argument("--no-hosted", dest="hosted", action="store_false",
                     help="leave hosted services out (default: include them)")
    sub.add_argument("--output", help="also write the plan as CSV to this file, atomically (default: none)")
    sub.add_argument("--format", default="table", help=FORMAT_HELP)
    text = "the largest micro-batch that fits one GPU"
    sub = verbs.add_parser("max-batch", help=text, description=text)
    sub.add_argument("model", help=MODEL_HELP)
    sub.add_argument("--revision", help=REVISION_HELP)
    _setup_options(sub)
    sub.add_argument("--gpu", required=True, help="catalogue GPU (required)")
    sub.add_argument("--format", default="table", help=FORMAT_HELP)
    text = "reference tables (hardware by size, techniques, budgets) as Markdown and CSV"
    sub = verbs.add_parser("report", help=text, description=text)
    sub.add_argument("--model", dest="models", action="append", default=[],
                     help="a model to add (repeatable; default: the size classes' representatives only)")
    _setup_options(sub)
    sub.add_argument("--tokens", help="token budget of the cost columns (default: 1e9)")
    sub.add_argument("--epochs", help="passes over the dataset (default: 1)")
    sub.add_argument("--budget", dest="budgets", action="append",
                     help="a budget in $ (repeatable; default: the bands $5k-20k, $50k-200k, $500k+)")
    sub.add_argument("--speed-gpu", dest="speed_gpu",
                     help="GPU of the techniques table's speed column (default: h100-sxm)")
    sub.add_argument("--max-gpus", dest="max_gpus", help=max_gpus_help)
    sub.add_argument("--output", help="folder for report.md and the CSV tables (default: print only)")
    _add_serving_verbs(verbs)
    _add_web_verb(verbs)
    return parser


EXTRAS_NOTE = """\
install extras:
  estimate, models, gpus, plan, max-batch, report   pip install vramcalc          (standard library only)
  estimate ORG/NAME (any Hugging Face repo id)      pip install 'vramcalc[hub]'
  trace, lengths                                    pip install 'vramcalc[trace]'
  trace --stack torchtune|litgpt|trl                pip install 'vramcalc[trace,stacks]'
  python -m vramcalc.calibrate                      pip install 'vramcalc[calibrate]'
  vramcalc.plan() / vramcalc.sweep() DataFrames     pip install 'vramcalc[plan]'"""


def main(argv: list[str] | None = None) -> int:
    stdout, stderr = sys.stdout, sys.stderr
    try:
        parser = build_parser()
        if not (sys.argv[1:] if argv is None else argv):
            usage = " ".join(parser.format_usage().split())
            raise VramcalcError(f"no command given; {usage} (vramcalc --help for more)")
        args = parser.parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # an unsupported family's trace command
        fmt = getattr(args, "format", "table")
        if fmt not in FORMATS:
            raise VramcalcError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
        if args.verb in ("estimate", "trace"):
            stdout.write(_run_breakdown(args))
        elif args.verb == "models":
            stdout.write(models_command(args, fmt))
        elif args.verb == "gpus":
            stdout.write(gpus_text(fmt))
        elif args.verb == "stacks":
            stdout.write(stacks_text(fmt))
        elif args.verb == "methods":
            from .peft_methods import PEFT_VERSION, method_rows

            stdout.write(render_rows(method_rows(), fmt, note=f"peft {PEFT_VERSION}; 'trace only': vramcalc trace "
                                                              "gives the memory, the estimate refuses"))
        elif args.verb == "plan":
            stdout.write(plan_command(args, fmt))
        elif args.verb == "lengths":
            stdout.write(lengths_command(args, fmt))
        elif args.verb == "max-batch":
            stdout.write(max_batch_command(args, fmt))
        elif args.verb == "report":
            stdout.write(report_command(args))
        elif args.verb == "infer":
            stdout.write(infer_command(args, fmt))
        elif args.verb == "max-context":
            stdout.write(max_context_command(args, fmt))
        elif args.verb == "serve-plan":
            stdout.write(serve_plan_command(args, fmt))
        elif args.verb == "web":
            web_command(args)
        stdout.flush()
        return 0
    except BrokenPipeError:  # the reader went away (vramcalc models | head): nothing left to say
        _silence(stdout)
        return 0
    except OSError as err:  # stdout itself cannot be written (vramcalc models > /dev/full)
        if err.filename is not None:  # a file the command had to read (writes go through files.write_atomic)
            name = terminal_text(err.filename)
            name = name if len(name) <= 100 else name[:100] + "..."
            stderr.write(f"error: cannot read {name!r}: {err.strerror or err}\n")
            return 2
        _silence(stdout)
        stderr.write(f"error: cannot write the output: {err.strerror or err}\n")
        return 2
    except VramcalcError as err:
        stderr.write(f"error: {err}\n")
        return 2
    except ImportError as err:
        stderr.write(f"error: {err}\n")
        return 2
    except KeyboardInterrupt:
        stderr.write("error: interrupted\n")
        return 130
    except SystemExit as done:  # --help and --version: argparse printed them and exits 0
        return done.code if isinstance(done.code, int) else 0


def _silence(stream) -> None:
    """Point ``stream``'s descriptor at /dev/null, so that the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (a test's capture buffer)
        pass


LENGTH_CAPS = (512, 1024, 2048, 4096, 8192)


def lengths_command(args: argparse.Namespace, fmt: str) -> str:
    """``vramcalc lengths``: the dataset's token counts (``dataset_lengths``), summarised, as the histogram CSV."""
    from .dataset_lengths import dataset_lengths, histogram_csv

    profile = dataset_lengths(args.data, args.tokenizer, field=args.field)
    if args.output:
        write_atomic(args.output, histogram_csv(profile))
    if fmt == "csv":
        return histogram_csv(profile)
    ordered = [t for t, n in zip(profile.tokens, profile.samples) for _ in range(n)]

    def quantile(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    summary = {"samples": profile.count, "mean_tokens": round(profile.mean, 1), "median_tokens": quantile(0.5),
               "p90_tokens": quantile(0.9), "p99_tokens": quantile(0.99), "longest_tokens": profile.longest,
               **{f"share_over_{cap}": round(sum(n for t, n in zip(profile.tokens, profile.samples) if t > cap)
                                              / profile.count, 4) for cap in LENGTH_CAPS}}
    if fmt == "json":
        return json.dumps({**summary, "histogram": [{"tokens": t, "samples": n} for t, n in
                                                    zip(profile.tokens, profile.samples) if n]}, indent=2) + "\n"
    lines = [f"{key:<18} {value:,}" if isinstance(value, int) else f"{key:<18} {value}" for key, value in
             summary.items()]
    if args.output:
        lines.append(f"wrote {terminal_text(args.output)} (vramcalc estimate ... --sample-lengths "
                     f"{terminal_text(args.output)})")
    return "\n".join(lines) + "\n"


def setup_kwargs(args: argparse.Namespace) -> dict:
    return {key: getattr(args, key) for key in SETUP_KEYS if getattr(args, key, None) is not None}


def _warn(warnings) -> None:
    for warning in warnings:
        sys.stderr.write(f"warning: {terminal_text(warning)}\n")


def _check_model(model: str) -> str:
    """An empty MODEL is an error, not the current folder."""
    if not model.strip():
        raise VramcalcError("empty model name: give a catalogue name, a HF repo id or a path to a config.json")
    return model


def _add_model_filters(sub: argparse.ArgumentParser) -> None:
    """``vramcalc models [WORD...] [--family F] [--max-params N] [--search WORD]``."""
    sub.add_argument("words", nargs="*", metavar="WORD", help="only models whose name, Hub id or family holds "
                     "every word (case-insensitive; '-', '.' and spaces ignored)")
    sub.add_argument("--search", help="a search word, as WORD (default: none)")
    sub.add_argument("--family", help="only this model_type, e.g. llama, qwen3_moe (default: all)")
    sub.add_argument("--max-params", dest="max_params", help="only models with at most this many parameters in "
                     "total, e.g. 8e9, 8B, 500M (default: no limit)")


def models_command(args: argparse.Namespace, fmt: str) -> str:
    """``vramcalc models``: the catalogue, filtered; no match is an error (exit 2), never an empty table."""
    from .catalogue import find_models

    words = " ".join(args.words + ([args.search] if args.search is not None else []))
    chosen = find_models(family=args.family, max_params=args.max_params, search=words or None)
    if not chosen:
        raise VramcalcError("no catalogue model matches those filters; vramcalc models lists them all")
    return models_text(fmt, chosen)


def _hub_model(args: argparse.Namespace):
    """MODEL at ``--revision``, resolved once (a Hub repo id's config.json)."""
    from .catalogue import get_model

    return get_model(_check_model(args.model), args.revision)


def _run_breakdown(args: argparse.Namespace) -> str:
    from . import estimate, trace

    _check_model(args.model)
    function = estimate if args.verb == "estimate" else trace
    extra = {"reserved": True} if getattr(args, "reserved", False) else {}
    if getattr(args, "sample_lengths", None):
        extra["sample_lengths"] = args.sample_lengths
    try:
        result = function(args.model, gpu=args.gpu, revision=args.revision, **extra, **setup_kwargs(args))
    except VramcalcError as err:
        from .hf_config import UnsupportedArchitecture, trace_hint

        if args.verb != "estimate" or not isinstance(err, UnsupportedArchitecture):
            raise
        words = list(getattr(args, "argv", ["estimate", args.model]))
        words[words.index("estimate")] = "trace"  # the same model and options, traced
        raise VramcalcError(f"unsupported architecture {err.family!r}: vramcalc has no formulas for this family; "
                            f"{trace_hint('vramcalc ' + shlex.join(words))}") from None
    if args.format != "table":  # the table ends with its warnings already: print them once
        _warn(result.warnings)
    return format_breakdown(result, args.format)


def _given(args: argparse.Namespace, *names) -> dict:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def plan_command(args: argparse.Namespace, fmt: str) -> str:
    """``vramcalc plan``: the plan as a table (with its one-line summary), JSON or CSV; ``--output`` writes the CSV
    atomically and says so on stderr. Plain rows (``planning.plan_rows``): no pandas needed."""
    from .planning import PLAN_COLUMNS, plan_rows, plan_table

    kwargs = _given(args, "epochs", "max_gpus", "rank_by", "mfu", "usd_per_kwh", "amortisation_years")
    if args.gpus is not None:
        kwargs["gpus"] = args.gpus.split(",")  # a blank name (--gpus ",,") is an error, never "all GPUs"
    model = _check_model(args.model) if not args.revision else _hub_model(args)
    result = plan_rows(model, tokens=args.tokens, hosted=args.hosted, **kwargs, **setup_kwargs(args))
    _warn(result.warnings)
    columns = list(PLAN_COLUMNS)
    if args.output:
        write_atomic(args.output, rows_csv(result.rows, columns))
        sys.stderr.write(f"wrote {terminal_text(args.output)} ({len(result.rows)} rows)\n")
    if fmt == "json":
        return json.dumps({"summary": result.summary, "catalogue_version": result.catalogue_version,
                           "catalogue_date": result.catalogue_date, "rows": rows_json(result.rows, columns)},
                          indent=2) + "\n"
    if fmt == "csv":
        return "" if args.output else rows_csv(result.rows, columns)
    lines = [terminal_text(result.summary), "", plan_table(result.rows), "",
             f"(GiB = 2^30 bytes; $ from catalogue {result.catalogue_version}, prices up to {result.catalogue_date}; "
             "'-' = none, never 0)"]
    return "\n".join(lines) + "\n"


def max_batch_command(args: argparse.Namespace, fmt: str) -> str:
    """``vramcalc max-batch``: the largest micro-batch on one GPU (a scalar search, standard library only), or that
    not even one sequence fits (JSON ``max_batch_size`` null, never 0)."""
    from . import catalogue, estimate
    from .planning import MAX_MICRO_BATCH, max_batch_size

    options = setup_kwargs(args)
    if "batch_size" in options:
        raise VramcalcError("max-batch searches the batch size: leave --batch-size out")
    spec, device = catalogue.get_model(_check_model(args.model), args.revision), catalogue.get_gpu(args.gpu)
    batch = max_batch_size(spec, device, **options)
    at = estimate(spec, gpu=device, batch_size=max(batch, 1), **options)
    _warn(at.warnings)
    used = at.total_bytes
    at_limit = batch >= MAX_MICRO_BATCH
    row = {"model": spec.name, "gpu": device.name, "seq_len": at.inputs["seq_len"],
           "max_batch_size": batch or None, "search_limit_reached": at_limit,
           "device_bytes": used, "gpu_memory_bytes": device.memory_bytes}
    if fmt == "json":
        return json.dumps(row, indent=2) + "\n"
    if fmt == "csv":
        return rows_csv([row], list(row))
    name = terminal_text(spec.name)
    if batch == 0:
        return (f"{name} does not fit on one {device.name} even at micro-batch 1: it needs "
                f"{used / BYTES_PER_GIB:.2f} GiB of {device.memory_gib:.2f} GiB (GiB = 2^30 bytes)\n")
    largest = f"at least {batch} (search limit)" if at_limit else str(batch)
    return (f"{name} on {device.name}: largest micro-batch {largest} at seq_len {row['seq_len']}, using "
            f"{used / BYTES_PER_GIB:.2f} GiB of {device.memory_gib:.2f} GiB (GiB = 2^30 bytes)\n")


def report_command(args: argparse.Namespace) -> str:
    """``vramcalc report``: Markdown on stdout; ``--output DIR`` also writes report.md and the CSV tables."""
    from .report import budget_bands, report

    kwargs = _given(args, "tokens", "epochs", "speed_gpu", "max_gpus")
    if args.budgets:
        kwargs["budgets"] = budget_bands(args.budgets)
    result = report(args.models, **kwargs, **setup_kwargs(args))
    if args.output:
        for path in result.write(args.output):
            sys.stderr.write(f"wrote {terminal_text(path)}\n")
    return terminal_text(result.markdown)


# -- serving (issue 18): infer, max-context, serve-plan -------------------------------------------------------------
def _serving_options(sub: argparse.ArgumentParser) -> None:
    """Flags of ``vramcalc.infer`` shared by infer, max-context and serve-plan (validated by the library)."""
    sub.add_argument("model", help="catalogue name, HF repo id, or path to a config.json (or its folder)")
    add = sub.add_argument
    add("--weights", help="bf16 | fp16 | fp8 | int8 | int4-awq | int4-gptq | nf4 (default bf16)")
    add("--kv-dtype", dest="kv_dtype", help="auto | fp8 (default auto: the compute dtype)")
    add("--engine", help="hf | vllm | sglang (default vllm; hf with --trace)")
    add("--hf-cache", dest="hf_cache", help="dynamic | static (transformers cache class, --engine hf)")
    add("--tp", help="tensor-parallel GPUs per replica (default 1)")
    add("--lora-rank", dest="lora_rank", help="serve one LoRA adapter of this rank beside the base model")
    add("--gpu-memory-utilization", dest="gpu_memory_utilization", help="vLLM budget fraction (default 0.9)")
    add("--max-num-batched-tokens", dest="max_num_batched_tokens", help="largest prefill chunk (vLLM/SGLang)")
    add("--mem-fraction-static", dest="mem_fraction_static", help="SGLang static fraction (default by tp)")
    add("--format", default="table", help="table | json | csv")


SERVING_KEYS = ("weights", "kv_dtype", "engine", "hf_cache", "tp", "lora_rank", "gpu_memory_utilization",
                "max_num_batched_tokens", "mem_fraction_static")


def _add_serving_verbs(verbs) -> None:
    sub = verbs.add_parser("infer", help="serving memory: KV cache, engine rules, largest concurrency, tokens/s")
    _serving_options(sub)
    sub.add_argument("--context", required=True, help="tokens per sequence: prompt + generated")
    sub.add_argument("--concurrency", default="1", help="sequences in flight")
    sub.add_argument("--batch-size", dest="batch_size", help="sequences per forward (offline batch inference)")
    sub.add_argument("--prompt-len", dest="prompt_len", help="prompt tokens of the hf prefill (default context - 2)")
    sub.add_argument("--gpu", help="catalogue GPU: fit, largest concurrency, decode tokens/s and $ per 1M tokens")
    sub.add_argument("--trace", action="store_true", help="trace transformers' generate on fake tensors (needs torch)")
    sub = verbs.add_parser("max-context", help="the largest context (prompt + generated) that fits at a concurrency")
    _serving_options(sub)
    sub.add_argument("--concurrency", default="1", help="sequences in flight")
    sub.add_argument("--gpu", required=True, help="catalogue GPU")
    sub = verbs.add_parser("serve-plan", help="GPUs for a target concurrency and context, with $ per 1M generated tokens")
    _serving_options(sub)
    sub.add_argument("--context", required=True, help="tokens per sequence: prompt + generated")
    sub.add_argument("--concurrency", required=True, help="sequences in flight to serve")
    sub.add_argument("--gpus", help="comma list of catalogue GPUs (default: all with a bandwidth figure)")


def infer_command(args: argparse.Namespace, fmt: str) -> str:
    """``vramcalc infer``: the breakdown (as ``estimate`` formats it), then the answers a GPU allows."""
    from . import infer

    options = _given(args, *SERVING_KEYS, "batch_size", "prompt_len")
    result = infer(args.model, context=args.context, concurrency=args.concurrency, gpu=args.gpu, trace=args.trace,
                   **options)
    for warning in result.warnings:
        sys.stderr.write(f"warning: {warning}\n")
    if fmt != "table":
        return format_breakdown(result, fmt)
    d, inputs = result.details, result.inputs
    lines = [result.table(), f"engine {inputs['engine']}; KV cache {d['kv_bytes_per_token']:,} bytes per token"]
    if "gpu_blocks" in d:
        lines.append(f"vLLM KV pool: {d['gpu_blocks']:,} blocks = {d['kv_pool_tokens']:,} tokens "
                     f"(vLLM would log 'Maximum concurrency for {inputs['context']:,} tokens per request: "
                     f"{d['vllm_log_max_concurrency']:.2f}x')")
    if "max_concurrency" in d:
        lines.append(f"{'fits' if d['fits'] else 'does not fit'}: {inputs['concurrency']} x {inputs['context']} tokens; "
                     f"largest concurrency that fits at {inputs['context']} tokens: {d['max_concurrency']}")
    if "decode_tokens_per_s" in d:
        lines.append(f"decode: {d['decode_tokens_per_s_per_sequence']:.1f} tokens/s per sequence, "
                     f"{d['decode_tokens_per_s']:.0f} tokens/s over {inputs['batch_size']} sequences ({d['bound']}-bound, "
                     f"at the full context); prefill of {inputs['prompt_len']} tokens: {d['prefill_s']:.2f} s")
        if "decode_tokens_per_s_at_max_concurrency" in d:
            lines.append(f"at the largest concurrency that fits ({d['max_concurrency']}): "
                         f"{d['decode_tokens_per_s_at_max_concurrency']:.0f} tokens/s")
    if "usd_per_million_generated_tokens" in d:
        lines.append(f"${d['usd_per_million_generated_tokens']:.3f} per million generated tokens at {d['price_basis']}")
    lines += _hosted_lines(d.get("hosted_api_prices") or [])
    return "\n".join(lines) + "\n"


def _hosted_lines(prices: list) -> list[str]:
    """Hosted APIs' published $ per million generated tokens for the same model (data/hosted_inference.csv)."""
    if not prices:
        return []
    cells = ", ".join(f"{p['provider']} ${p['usd_per_million_output_tokens']:.2f}" for p in prices)
    return [f"hosted APIs, $ per million generated tokens (published, see data/hosted_inference.csv): {cells}"]


def max_context_command(args: argparse.Namespace, fmt: str) -> str:
    """``vramcalc max-context``: the largest context at which ``--concurrency`` sequences fit."""
    from . import catalogue
    from .serving import max_context

    spec, device = catalogue.get_model(args.model), catalogue.get_gpu(args.gpu)
    options = _given(args, *SERVING_KEYS)
    best = max_context(spec, gpu=device, concurrency=args.concurrency, **options)
    row = {"model": spec.name, "gpu": device.name, "engine": options.get("engine", "vllm"),
           "concurrency": int(args.concurrency), "max_context": best}
    if fmt == "json":
        return json.dumps(row, indent=2) + "\n"
    if fmt == "csv":
        return csv_text([row], list(row))
    if best == 0:
        return f"{spec.name} on {device.name}: not even {row['concurrency']} sequence(s) of 2 tokens fit\n"
    return (f"{spec.name} on {device.name} ({row['engine']}): largest context {best:,} tokens "
            f"(prompt + generated) at concurrency {row['concurrency']}\n")


def serve_plan_command(args: argparse.Namespace, fmt: str) -> str:
    """``vramcalc serve-plan``: per GPU, the replicas x tensor-parallel GPUs a target needs, and $ per 1M tokens."""
    from .serving import serve_plan

    options = _given(args, *SERVING_KEYS)
    options.pop("tp", None)
    gpus = [name.strip() for name in args.gpus.split(",") if name.strip()] if args.gpus else None
    plans = serve_plan(args.model, context=int(args.context), concurrency=int(args.concurrency), gpus_to_try=gpus,
                       **options)
    rows = [p.to_dict() for p in plans]
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    header = ["gpu", "tp", "replicas", "gpus", "max_concurrency_per_replica", "decode_tokens_per_s", "usd_per_hour",
              "usd_per_million_generated_tokens"]
    if fmt == "csv":
        return csv_text(rows, header)
    if not rows:
        return f"no catalogue GPU holds {args.model} at tp <= 8\n"
    note = ("decode tokens/s per replica at a full batch, memory-bound roofline (serving/throughput.py assumptions); "
            "$ from data/gpus.csv cloud_usd_per_gpu_hour")
    from .catalogue import get_model
    from .serving.hosted import hosted_prices_for

    hosted = _hosted_lines([p.to_dict() for p in hosted_prices_for(get_model(args.model))])
    return table_text(rows, header) + "\n(" + note + ")\n" + "".join(line + "\n" for line in hosted)


# -- the page (issue 19): vramcalc web -------------------------------------------------------------------------------
def _add_web_verb(verbs) -> None:
    text = "a local page and JSON API (/api/estimate, /api/plan) over the estimator, until Ctrl-C"
    sub = verbs.add_parser("web", help=text, description=text)
    sub.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    sub.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    sub.add_argument("--open", dest="open_browser", action="store_true", help="open the page in the default browser")
    sub.add_argument("--allow-trace", dest="allow_trace", action="store_true",
                     help="let the page run traces (seconds of CPU each; needs the trace extra) (default: refused)")


def web_command(args: argparse.Namespace) -> None:
    """``vramcalc web``: serve the page until Ctrl-C (the web package is imported here only)."""
    from .web.server import serve

    if not 0 <= args.port <= 65535:
        raise VramcalcError(f"port must be 0 to 65535, got {args.port}")
    serve(args.host, args.port, open_browser=args.open_browser, allow_trace=args.allow_trace)


if __name__ == "__main__":
    sys.exit(main())
