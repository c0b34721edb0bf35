"""Estimate vs trace for the knobs of sessions 33-36 in one grid (issue 11), and the wall time of a 70B trace under
every stack the trace runs.

    python benchmarks/accuracy_knobs_recent.py              # both parts (about 25 minutes on 2 cores)
    python benchmarks/accuracy_knobs_recent.py --part grid  # the grid: accuracy_knobs_recent.csv
    python benchmarks/accuracy_knobs_recent.py --part times # the 70B timings: accuracy_knobs_recent_70b.csv
    python benchmarks/accuracy_knobs_recent.py --part report  # the section again, from both CSVs

Each part writes its CSV; then the section "## Recent knobs (issue 11)" of ``accuracy.md`` is rewritten from both
CSVs (``accuracy_sections.replace_section``), so a part rerun alone keeps the other's figures.

Grid: the same comparison as ``accuracy.py`` (``vramcalc.estimate`` against ``vramcalc.trace``: the step's peak
tensor bytes and each tensor term at that peak), over the knobs checked so far only in their own files: --grad-ckpt
wrapper, torchao's optimizers (adamw-8bit-torchao, adamw-4bit-torchao, adamw-fp8-torchao), --loss torchtune-2024,
--grads-kept, --task classify on BERT, --stack torchtune and litgpt (their own code) and trl/axolotl/llama-factory
(the HF step under their presets), --compile, --activation-offload, --optimizer-in-backward, --packing, --kernels
liger, --quant int8, --grad-ckpt selective and selective-op, --sample-lengths. Real model sizes (each trace takes
seconds to tens of seconds on fake tensors); every row is labelled with the knob it checks.

Times: ``python -m vramcalc trace llama-3.1-70b --stack S --method M`` run as a subprocess and timed from outside
(the wall time a user waits, imports included: what ``time`` reads), at the stack's defaults, 2048 tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accuracy_sections import read_rows, replace_section, setup_words, write_rows  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GRID_CSV = HERE / "accuracy_knobs_recent.csv"
TIMES_CSV = HERE / "accuracy_knobs_recent_70b.csv"
HEADING = "## Recent knobs (issue 11)"
TIME_LIMIT_S = 60.0
TIMED_MODEL = "llama-3.1-70b"
TIMED_SEQ_LEN = 2048
TIMED = [(stack, method) for stack in ("hf", "trl", "axolotl", "llama-factory", "torchtune", "litgpt")
         for method in ("full", "lora", "qlora")]

# (knob, model, options): each row names the knob it checks; real model sizes throughout
GRID = [
    # --grad-ckpt wrapper: torch's checkpoint_wrapper from outside, the model's KV cache on (session 35)
    ("grad-ckpt wrapper", "qwen3-1.7b", dict(seq_len=2048, batch_size=2, method="lora", grad_ckpt="wrapper")),
    ("grad-ckpt wrapper", "llama-3.1-8b", dict(seq_len=2048, method="qlora", grad_ckpt="wrapper", loss="hf-loop")),
    ("grad-ckpt wrapper", "mistral-7b", dict(seq_len=1024, batch_size=2, method="lora", lora_targets="all-linear",
                                             grad_ckpt="wrapper")),
    ("grad-ckpt wrapper", "qwen2.5-1.5b", dict(seq_len=1024, batch_size=4, precision="mixed-bf16",
                                                grad_ckpt="wrapper")),
    # torchao's low-bit AdamW (session 34): quantized states above 4096 elements, the compiled step's scratch
    ("optimizer torchao", "llama-3.2-1b", dict(seq_len=1024, batch_size=2, optimizer="adamw-8bit-torchao")),
    ("optimizer torchao", "qwen2.5-1.5b", dict(seq_len=1024, optimizer="adamw-4bit-torchao", grad_ckpt=True)),
    ("optimizer torchao", "smollm2-1.7b", dict(seq_len=2048, optimizer="adamw-fp8-torchao",
                                               precision="mixed-bf16")),
    ("optimizer torchao", "llama-3.1-8b", dict(seq_len=2048, method="lora", lora_targets="all-linear",
                                               optimizer="adamw-8bit-torchao")),
    ("optimizer torchao", "llama-3.2-1b", dict(seq_len=1024, stack="torchtune", method="full",
                                               optimizer="adamw-4bit-torchao", optimizer_in_backward=False)),
    ("optimizer torchao", "llama-3.2-3b", dict(seq_len=1024, stack="torchtune", method="full",
                                               optimizer="adamw-fp8-torchao", optimizer_in_backward=True)),
    # --loss torchtune-2024: the 2024 recipes' loop, the shifted fp32 logits kept into the next forward
    ("loss torchtune-2024", "llama-3.2-1b", dict(seq_len=2048, batch_size=2, stack="torchtune", method="lora",
                                                 loss="torchtune-2024")),
    ("loss torchtune-2024", "llama-3.1-8b", dict(seq_len=2048, stack="torchtune", method="qlora",
                                                 loss="torchtune-2024")),
    ("loss torchtune-2024", "llama-2-7b", dict(seq_len=512, batch_size=2, stack="torchtune", method="lora",
                                               lora_targets="q_proj,v_proj", loss="torchtune-2024",
                                               optimizer="adamw-foreach", grad_accum=2)),
    # --grads-kept: the gradients kept from one step to the next (transformers <= 4.x Trainer's zero_grad)
    ("grads-kept", "llama-3.2-1b", dict(seq_len=1024, batch_size=2, grads_kept=True)),
    ("grads-kept", "qwen2.5-0.5b", dict(seq_len=2048, method="lora", grads_kept=True, grad_ckpt=True)),
    ("grads-kept", "qwen2.5-1.5b", dict(seq_len=1024, optimizer="adamw-8bit", grads_kept=True,
                                        precision="mixed-bf16")),
    # --task classify on BERT (BertForSequenceClassification)
    ("task classify", "bert-base-uncased", dict(task="classify", seq_len=512, batch_size=16,
                                                precision="mixed-bf16", attn="sdpa")),
    ("task classify", "bert-large-uncased", dict(task="classify", seq_len=256, batch_size=8, grad_ckpt=True,
                                                 precision="bf16-true", optimizer="adamw-8bit", attn="eager")),
    ("task classify", "bert-large-uncased", dict(task="classify", seq_len=512, batch_size=2, grads_kept=True,
                                                 precision="mixed-fp16", optimizer="adamw-foreach", attn="sdpa")),
    # --stack torchtune / litgpt: the stacks' own model, loss, checkpointing and optimizer code at full size
    ("stack torchtune", "llama-3.2-1b", dict(seq_len=2048, stack="torchtune", method="full")),
    ("stack torchtune", "llama-3.1-8b", dict(seq_len=2048, stack="torchtune", method="lora")),
    ("stack torchtune", "llama-3.1-8b", dict(seq_len=4096, stack="torchtune", method="qlora")),
    ("stack torchtune", "llama-3.2-3b", dict(seq_len=1024, batch_size=2, stack="torchtune", method="lora",
                                             lora_targets="all-linear", grad_ckpt=False)),
    ("stack litgpt", "llama-3.2-1b", dict(seq_len=2048, stack="litgpt", method="full")),
    ("stack litgpt", "llama-3.1-8b", dict(seq_len=2048, stack="litgpt", method="lora")),
    ("stack litgpt", "llama-3.1-8b", dict(seq_len=2048, stack="litgpt", method="qlora")),
    ("stack litgpt", "mistral-7b", dict(seq_len=1024, batch_size=2, stack="litgpt", method="lora",
                                        grad_ckpt=True)),
    # --stack trl / axolotl / llama-factory: their presets on the HF step
    ("stack trl", "qwen2.5-1.5b", dict(seq_len=2048, stack="trl", method="lora")),
    ("stack axolotl", "llama-3.1-8b", dict(seq_len=2048, stack="axolotl", method="qlora")),
    ("stack llama-factory", "qwen2.5-7b", dict(seq_len=2048, stack="llama-factory", method="lora")),
    # --compile: torch.compile's min-cut partition per layer
    ("compile", "qwen2.5-1.5b", dict(seq_len=2048, compile=True)),
    ("compile", "llama-3.2-3b", dict(seq_len=2048, method="lora", compile=True, grad_ckpt=True)),
    ("compile", "qwen3-4b", dict(seq_len=2048, method="lora", lora_targets="all-linear", compile=True)),
    # --activation-offload: save_on_cpu on every saved tensor
    ("activation-offload", "llama-3.2-3b", dict(seq_len=4096, method="lora", grad_ckpt=True,
                                                activation_offload=True)),
    ("activation-offload", "qwen2.5-1.5b", dict(seq_len=2048, activation_offload=True)),
    ("activation-offload", "mistral-7b", dict(seq_len=2048, method="qlora", activation_offload=True)),
    # --optimizer-in-backward: torchtune's per-parameter optimizers stepped in the gradient hooks
    ("optimizer-in-backward", "llama-3.2-1b", dict(seq_len=2048, stack="torchtune", method="full",
                                                   optimizer="adamw", optimizer_in_backward=True)),
    ("optimizer-in-backward", "llama-3.2-3b", dict(seq_len=1024, stack="torchtune", method="full",
                                                   optimizer_in_backward=True, grad_ckpt=False)),
    ("optimizer-in-backward", "llama-3.1-8b", dict(seq_len=1024, stack="torchtune", method="full",
                                                   optimizer="paged-adamw-8bit", optimizer_in_backward=True)),
    # --packing: padding-free rows (flash's varlen / position_ids)
    ("packing", "qwen2.5-1.5b", dict(seq_len=2048, batch_size=4, method="lora", packing=True, attn="flash")),
    ("packing", "llama-3.1-8b", dict(seq_len=2048, batch_size=2, method="qlora", packing=True, attn="flash",
                                     grad_ckpt=True)),
    ("packing", "gemma-2-2b", dict(seq_len=1024, batch_size=4, method="lora", packing=True)),
    # --quant int8: bitsandbytes LLM.int8 base
    ("quant int8", "qwen2.5-7b", dict(seq_len=2048, method="qlora", quant="int8", grad_ckpt=True)),
    ("quant int8", "llama-3.2-3b", dict(seq_len=1024, batch_size=2, method="qlora", quant="int8",
                                        lora_targets="all-linear")),
    ("quant int8", "gemma-2-2b", dict(seq_len=2048, method="qlora", quant="int8")),
    # --grad-ckpt selective (torch SAC, matmuls saved) and selective-op (torchtitan's every other mm)
    ("grad-ckpt selective", "qwen2.5-7b", dict(seq_len=2048, method="lora", grad_ckpt="selective")),
    ("grad-ckpt selective", "llama-3.2-3b", dict(seq_len=2048, grad_ckpt="selective")),
    ("grad-ckpt selective", "mistral-7b", dict(seq_len=2048, method="qlora", lora_targets="all-linear",
                                               grad_ckpt="selective")),
    ("grad-ckpt selective-op", "gemma-2-2b", dict(seq_len=2048, method="lora", grad_ckpt="selective-op")),
    ("grad-ckpt selective-op", "qwen3-8b", dict(seq_len=2048, method="qlora", grad_ckpt="selective-op")),
    # --sample-lengths: batches padded to their longest sample; the trace runs the longest step (T_max)
    ("sample-lengths", "llama-2-7b", dict(seq_len=512, batch_size=2, stack="torchtune", method="lora",
                                          lora_targets="q_proj,v_proj", loss="torchtune-2024",
                                          optimizer="adamw-foreach", precision="bf16-true", grad_ckpt=True,
                                          sample_lengths="alpaca-like")),
    ("sample-lengths", "llama-3.2-1b", dict(seq_len=4096, batch_size=4, method="lora",
                                            sample_lengths="alpaca-like")),
]
# estimate only (the trace refuses them by name): listed, not in the grid
NOT_TRACED = {"--grad-ckpt wrapper with eager attention (gemma-2's default)": "transformers 5.25's recompute appends a "
              "second KV-cache copy the 4-D mask no longer fits (tracing/step.py check_traceable_knobs)",
              "--compile with --method qlora": "AOTAutograd cannot functionalize bitsandbytes' double-quantized "
              "dequantize (tracing/step.py check_traceable_knobs)",
              "--grad-ckpt wrapper under --stack axolotl (or trl, llama-factory)": "refused by the setup: their "
              "trainer turns the model's cache off, so the wrapper saves what full checkpointing saves",
              "--kernels liger / unsloth": "Triton kernels, which need a GPU (tracing/step.py check_traceable_knobs)",
              "--stack unsloth": "Triton kernels (tracing/runner.py _stack_tracer)",
              "--compile / --activation-offload / --packing under --stack torchtune or litgpt":
                  "refused by tracing/stacks/torchtune.py and litgpt.py (CUDA streams, flex attention, no recipe)"}

# why a row over 3% is off, found by reading the two sides' code (keyed by model and setup words)
OPEN_CAUSES = {
    ("llama-3.2-1b", "seq_len=2048 stack=litgpt method=full"):
        "the estimate ties lm_head to the embedding (the catalogue's tie_word_embeddings, right for transformers and "
        "torchtune's llama3_2 builders), but litgpt 0.5.13's GPT never ties it: its Config has no tie field and "
        "scripts/convert_hf_checkpoint.py:205-206 copies transformer.wte.weight into a separate lm_head.weight, so "
        "litgpt's own model (the trace) holds a second [128256, 2048] bf16 matrix and its two AdamW states: weights "
        "-501.0 MiB and optimizer_states -1002.0 MiB (estimate - trace); the LoRA run of the same setup (beside "
        "the grid) is -6.06% (weights only). Open: the fix is an untied spec for --stack litgpt in the estimate "
        "(estimator.py, beside rank_view), outside what this grid's session may edit.",
}


def alpaca_like(n: int = 20000, seed: int = 0) -> list[int]:
    """A lognormal sample-length profile like Alpaca's tokenized rows (tests/test_sample_lengths.py _alpaca_like):
    median about 164 tokens, a tail past 1000."""
    import random

    rng = random.Random(seed)
    return [max(8, int(rng.lognormvariate(5.1, 0.6))) for _ in range(n)]


def compare(knob: str, name: str, options: dict) -> dict:
    """``vramcalc.estimate`` against ``vramcalc.trace`` (peak tensor bytes, and each tensor term at its peak); with
    ``sample_lengths`` the trace runs the estimate's longest step (``details["longest_step_tokens"]``)."""
    import vramcalc as vc
    from vramcalc.options import Term

    terms = [t for t in Term if t.is_tensor]
    traced_options = dict(options)
    estimate_options = dict(options)
    if options.get("sample_lengths") == "alpaca-like":
        estimate_options["sample_lengths"] = alpaca_like()
    estimate = vc.estimate(name, **estimate_options)
    if "sample_lengths" in options:
        del traced_options["sample_lengths"]
        traced_options["seq_len"] = estimate.details["longest_step_tokens"]
    started = time.perf_counter()
    trace = vc.trace(name, progress=False, **traced_options)
    seconds = time.perf_counter() - started
    est, got = estimate.peak_tensor_bytes, trace.peak_tensor_bytes
    row = {"knob": knob, "model": name, "setup": setup_words(options),
           "traced_seq_len": traced_options.get("seq_len", ""),
           "estimate_phase": estimate.phase.value, "trace_phase": trace.phase.value}
    for term in terms:
        row[f"{term.value}_estimate_bytes"] = estimate.terms_bytes[term]
        row[f"{term.value}_trace_bytes"] = trace.terms_bytes[term]
    row.update(peak_estimate_bytes=est, peak_trace_bytes=got, peak_error_pct=round(100 * (est - got) / got, 3),
               trace_seconds=round(seconds, 1))
    return row


def run_grid(limit: int | None, only: str | None) -> list[dict]:
    grid = [g for g in GRID if only is None or only in g[0]]
    grid = grid[:limit] if limit else grid
    rows = []
    for index, (knob, name, options) in enumerate(grid, 1):
        try:
            row = compare(knob, name, options)
        except Exception as err:  # a setup the trace refuses: listed with its error, not counted
            row = {"knob": knob, "model": name, "setup": setup_words(options), "error": f"{type(err).__name__}: "
                   f"{str(err).splitlines()[0][:200]}"}
        rows.append(row)
        if "error" in row:
            print(f"[{index}/{len(grid)}] REFUSED {name} {row['setup']}: {row['error']}", flush=True)
            continue
        print(f"[{index}/{len(grid)}] {row['peak_error_pct']:+7.3f}% {knob:24s} {name} {row['setup']} "
              f"({row['trace_seconds']:.0f}s)", flush=True)
    return rows


def time_trace(stack: str, method: str) -> dict:
    """One 70B trace through the CLI, timed from outside (imports, model build, step: what ``time`` reads)."""
    command = [sys.executable, "-m", "vramcalc", "trace", TIMED_MODEL, "--stack", stack, "--method", method,
               "--seq-len", str(TIMED_SEQ_LEN)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    peak = next((line for line in done.stdout.splitlines() if line.startswith("peak_tensor_bytes")), "")
    row = {"model": TIMED_MODEL, "stack": stack, "method": method, "seq_len": TIMED_SEQ_LEN,
           "wall_seconds": round(seconds, 1), "exit_code": done.returncode,
           "load_average_1min": round(max(load_before, os.getloadavg()[0]), 2),
           "peak_line": peak.strip() if done.returncode == 0 else done.stderr.strip().splitlines()[-1][:200]}
    print(f"{stack:14s} {method:6s} {seconds:6.1f} s rc={done.returncode} {row['peak_line']}", flush=True)
    return row


def _line(label: str, errors: list[float]) -> str:
    return f"| {label} | {len(errors)} | {statistics.median(errors):.3f} | {max(errors):.3f} |"


def _widest_term(row: dict) -> tuple[str, int, int]:
    """The tensor term whose estimate and trace differ most at their peaks: (term, estimate bytes, trace bytes)."""
    terms = [k[: -len("_estimate_bytes")] for k in row if k.endswith("_estimate_bytes") and not k.startswith("peak")]
    term = max(terms, key=lambda t: abs(int(row[f"{t}_estimate_bytes"]) - int(row[f"{t}_trace_bytes"])))
    return term, int(row[f"{term}_estimate_bytes"]), int(row[f"{term}_trace_bytes"])


def report() -> str:
    rows, times = read_rows(GRID_CSV), read_rows(TIMES_CSV)
    out = ["Written by `python benchmarks/accuracy_knobs_recent.py` (accuracy_knobs_recent.csv, "
           "accuracy_knobs_recent_70b.csv): the knobs of sessions 33-36, until now checked each in its own file, "
           "on one grid of new setups at real model sizes. Error = (estimate - trace) / trace of the step's peak "
           "tensor bytes, `vramcalc.estimate` against `vramcalc.trace` (as in the head of this file); the term "
           "column names the tensor term whose estimate and trace differ most at their peaks (MiB = 2^20 bytes). "
           "`--sample-lengths` rows trace the estimate's longest step (T_max = min(seq_len, longest sample), column "
           "traced_seq_len of the CSV) of an Alpaca-like lognormal length profile. Target: median <= 0.5%, "
           "max <= 3%.", ""]
    if rows:
        errors = [abs(float(r["peak_error_pct"])) for r in rows]
        out += [f"{len(rows)} setups: median abs error {statistics.median(errors):.3f}%, max {max(errors):.3f}%; "
                f"within 3%: {sum(e <= 3 for e in errors)}/{len(rows)}.", "",
                "| knob | setups | median abs error % | max abs error % |", "|---|---|---|---|",
                _line("all", errors)]
        for knob in dict.fromkeys(r["knob"] for r in rows):
            out.append(_line(knob, [abs(float(r["peak_error_pct"])) for r in rows if r["knob"] == knob]))
        worst = sorted(rows, key=lambda r: -abs(float(r["peak_error_pct"])))[:8]
        out += ["", "Worst eight:", "", "| knob | model | setup | error % | phase (estimate / trace) | term that "
                "differs most: estimate / trace MiB |", "|---|---|---|---|---|---|"]
        for r in worst:
            term, est, got = _widest_term(r)
            out.append(f"| {r['knob']} | {r['model']} | {r['setup']} | {float(r['peak_error_pct']):+.3f} | "
                       f"{r['estimate_phase']} / {r['trace_phase']} | {term}: {est / 2**20:.1f} / "
                       f"{got / 2**20:.1f} |")
        over = [r for r in rows if abs(float(r["peak_error_pct"])) > 3]
        out += ["", "Open (over 3%): " + ("none." if not over else "")]
        for r in over:
            term, est, got = _widest_term(r)
            cause = OPEN_CAUSES.get((r["model"], r["setup"]), "not yet explained")
            out.append(f"- {r['model']} {r['setup']}: {float(r['peak_error_pct']):+.2f}%, {term} {est} vs {got} "
                       f"bytes (estimate vs trace): {cause}")
    out += ["", "Estimate only (the trace refuses them by name, so they are not in the grid): " + "; ".join(
        f"{knob}: {why}" for knob, why in NOT_TRACED.items()) + "."]
    if times:
        slowest = max(float(t["wall_seconds"]) for t in times if t["exit_code"] == "0")
        out += ["", f"### 70B trace time ({TIMED_MODEL}, {TIMED_SEQ_LEN} tokens, each stack's defaults)", "",
                f"`time python -m vramcalc trace {TIMED_MODEL} --stack S --method M --seq-len {TIMED_SEQ_LEN}` "
                f"on this machine's 2 cores (wall seconds, imports and model build included; the 1-minute load "
                f"average beside it, as other jobs shared the cores). Target under {TIME_LIMIT_S:g} s: slowest "
                f"{slowest:.1f} s. The torchtune QLoRA trace took 137.6 s (load average 3.35 just after) before "
                "tracing/stacks/torchtune.py ran torchao's NF4 quantization loop (2^20-element chunks, about 65,000 "
                "for 70B, each a handful of fake-tensor dispatches) once per chunk length during the build; every "
                "traced byte is unchanged (tests/test_trace_stacks.py "
                "test_torchtune_qlora_quantizes_one_nf4_chunk_per_length_with_the_bytes_of_torchaos_loop).", "",
                "| stack | method | wall s | load average | peak tensor |",
                "|---|---|---|---|---|"]
        for t in times:
            peak = t["peak_line"].replace("peak_tensor_bytes", "").strip() if t["exit_code"] == "0" else \
                f"refused: {t['peak_line']}"
            out.append(f"| {t['stack']} | {t['method']} | {float(t['wall_seconds']):.1f} | "
                       f"{t['load_average_1min']} | {peak} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "grid", "times", "report"), default="all")
    parser.add_argument("--limit", type=int, default=None, help="the first N setups of the grid")
    parser.add_argument("--only", default=None, help="the setups whose knob label contains this")
    args = parser.parse_args(argv)
    if args.part in ("all", "grid"):
        rows = run_grid(args.limit, args.only)
        traced = {(r["knob"], r["model"], r["setup"]): r for r in rows if "error" not in r}
        if args.limit or args.only:  # a part of the grid retraced: the CSV's other rows kept
            kept = {(r["knob"], r["model"], r["setup"]): r for r in read_rows(GRID_CSV)}
            traced = {**kept, **traced}
        order = [(knob, name, setup_words(options)) for knob, name, options in GRID]
        write_rows(GRID_CSV, [traced[key] for key in order if key in traced])
    if args.part in ("all", "times"):
        write_rows(TIMES_CSV, [time_trace(stack, method) for stack, method in TIMED])
    body = report()
    replace_section(HEADING, body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
