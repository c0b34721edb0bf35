"""Estimate vs trace on setups sampled outside benchmarks/accuracy.py's GRID: the check for setups nobody wrote down.

    python benchmarks/accuracy_fuzz.py --seed 34 --n 40       # appends to benchmarks/accuracy_fuzz_seed34.csv
    python benchmarks/accuracy_fuzz.py --seed 34 --list       # the sampled setups only
    python benchmarks/accuracy_fuzz.py --seed 34 --only 3,7   # rerun two of them

Each setup draws a catalogue model (135M to 30B-A3B, many families), a method, precision, optimizer, checkpointing
mode, attention, loss, stack and the LoRA and activation knobs at random; refusals are recorded with their message
(a refusal of a setup the libraries run is a finding). The trace is the one ``vramcalc.trace`` runs for the stack
(TRL's own step for ``--stack trl``); torchtune and litgpt have their own grid (``accuracy_stacks.py``). Session 33:
seed 33 (60 setups) found the mechanisms listed in docs/stacks-research.md section 9; seed 34 (40 setups, after
them): 35 traced, median 0.001%, max 2.1% (``accuracy_fuzz_seed34.csv``). The knobs added after seed 34
(``KNOBS``: --repeat-kv, --activation-offload, --no-compile-loss under --compile) come from a second random stream, so
seeds 33 and 34 sample as before. About 10-20 s a setup on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.accuracy import GRID, TENSOR_TERMS  # noqa: E402
import vramcalc  # noqa: E402
from vramcalc.catalogue import get_model  # noqa: E402
from vramcalc.errors import VramcalcError  # noqa: E402
from vramcalc.estimator import step_moments  # noqa: E402
from vramcalc.terms.tensor_parallel import rank_view  # noqa: E402
from vramcalc.training_setup import resolve_setup  # noqa: E402

# small to mid models of many families (fake tensors: size matters little, but keep traces < ~60 s)
MODELS = ["qwen3-0.6b", "qwen3-1.7b", "qwen2.5-0.5b", "qwen2.5-1.5b", "llama-3.2-1b", "smollm2-135m",
          "smollm2-360m", "smollm3-3b", "gemma-2-2b", "gemma-3-1b", "gemma-2b", "phi-3-mini", "phi-4-mini",
          "mistral-7b", "qwen3-30b-a3b", "olmo-2-0425-1b", "granite-3.3-2b", "tinyllama-1.1b", "llama-3.2-3b",
          "qwen3-4b", "gemma-3-4b", "starcoder2-3b", "ernie-4.5-0.3b", "pythia-410m"]
METHODS = ["full", "lora", "lora", "qlora", "qlora", "dora", "prompt"]
PRECISIONS = ["bf16", "mixed-bf16", "fp16", "mixed-fp16", "bf16-true"]
OPTIMIZERS = ["adamw", "adamw-foreach", "adamw-8bit", "paged-adamw", "paged-adamw-8bit", "sgd", "sgd-momentum",
              "adafactor"]
CKPT = ["none", "full", "selective", "selective-op", "reentrant"]
ATTN = ["sdpa", "sdpa", "eager", "flash"]
LOSSES = ["hf", "hf", "hf-shifted", "model-dtype", "chunked", "fused", "hf-loop"]
STACKS = ["hf", "hf", "trl", "axolotl", "llama-factory"]
SEQS = [128, 256, 512, 1024, 2048, 4096]
TARGETS = ["qv", "all-linear", "q_proj,k_proj,v_proj,o_proj", "gate_proj,up_proj,down_proj"]
# (chance of setting it, option, values): drawn in this order for every setup
OPTIONAL = [(0.7, "precision", PRECISIONS), (0.5, "optimizer", OPTIMIZERS), (0.6, "grad_ckpt", CKPT),
            (0.4, "attn", ATTN), (0.4, "loss", LOSSES), (0.35, "stack", STACKS)]
# knobs added after seed 34, drawn from a second stream (random.Random(f"{seed}-knobs")) so that the main stream, and
# so every setup of seeds 33 and 34, draws as before; compile and packing stay on the main stream where they were.
# compile_loss=False is drawn only under compile (without it the setup refuses: nothing is compiled)
KNOBS = [(0.15, "repeat_kv", [True]), (0.1, "activation_offload", [True]), (0.4, "compile_loss", [False])]


def sample(rng: random.Random, knobs: random.Random) -> tuple[str, dict]:
    model = rng.choice(MODELS)
    method = rng.choice(METHODS)
    o: dict = dict(method=method)
    seq = rng.choice(SEQS)
    o["seq_len"] = seq
    o["batch_size"] = rng.choice([1, 1, 2, 4]) if seq <= 2048 else 1
    for chance, key, choices in OPTIONAL:
        if rng.random() < chance:
            o[key] = rng.choice(choices)
    if method in ("lora", "qlora", "dora"):
        if rng.random() < 0.5:
            o["lora_targets"] = rng.choice(TARGETS)
        if rng.random() < 0.4:
            o["lora_rank"] = rng.choice([4, 16, 32, 64])
        if rng.random() < 0.3:
            o["lora_dropout"] = rng.choice([0.05, 0.1])
        if rng.random() < 0.3:
            o["adapter_dtype"] = rng.choice(["fp32", "bf16"])
    if method == "qlora" and rng.random() < 0.3:
        o["kbit_prep"] = rng.choice([True, False])
    if method == "dora" and rng.random() < 0.3:
        o["quant"] = "nf4"
    if method == "prompt" and rng.random() < 0.5:
        o["virtual_tokens"] = rng.choice([8, 20, 64])
    if rng.random() < 0.15:
        o["packing"] = True
    if rng.random() < 0.12:
        o["compile"] = True
    if rng.random() < 0.1:
        o["grad_accum"] = 2
    for chance, key, choices in KNOBS:
        draw, value = knobs.random(), knobs.choice(choices)  # two draws per knob whatever the setup
        if draw < chance and (key != "compile_loss" or o.get("compile")):
            o[key] = value
    return model, o


def excluded(model: str, o: dict) -> bool:
    """A setup of the grid itself (session 33's seed-33 sample also left out QLoRA at fp32, then refused)."""
    return any(model == g and o == opts for g, opts in GRID)


def run_one(model: str, o: dict) -> dict:

    row = {"model": model, "setup": json.dumps(o, sort_keys=True)}
    spec = get_model(model)
    try:
        resolved = resolve_setup(spec, **o)
        peak = max(step_moments(*rank_view(spec, resolved)), key=lambda m: m.tensor_bytes)
    except VramcalcError as err:
        row["status"] = "refused"
        row["message"] = str(err).splitlines()[0]
        return row
    row["estimate_phase"] = peak.phase.value
    row["estimate"] = peak.tensor_bytes
    for t in TENSOR_TERMS:
        row[f"{t.value}_est"] = getattr(peak, t.value)
    started = time.perf_counter()
    try:
        traced = vramcalc.trace(model, **o)  # the stack's own step where it has one (TRL)
    except VramcalcError as err:
        row["status"] = "trace-refused"
        row["message"] = str(err).splitlines()[0]
        return row
    except Exception as err:  # a crash in the trace is a finding too
        row["status"] = "trace-error"
        row["message"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        traceback.print_exc()
        return row
    total = traced.peak_tensor_bytes
    row["trace_phase"] = traced.phase.value
    row["trace"] = total
    for t in TENSOR_TERMS:
        row[f"{t.value}_tr"] = traced.terms_bytes[t]
    row["error_pct"] = round(100 * (peak.tensor_bytes - total) / total, 3)
    row["status"] = "ok"
    row["seconds"] = round(time.perf_counter() - started, 1)
    row["warnings"] = " | ".join(resolved.warnings)[:300]
    return row


FIELDS = (["index", "model", "setup", "status", "error_pct", "estimate", "trace", "estimate_phase", "trace_phase"]
          + [f"{t.value}_{s}" for t in TENSOR_TERMS for s in ("est", "tr")] + ["seconds", "message", "warnings"])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=60)
    p.add_argument("--seed", type=int, default=33)
    p.add_argument("--out", default=None, help="default: benchmarks/accuracy_fuzz_seed<seed>.csv")
    p.add_argument("--only", default="", help="comma list of setup indices to (re)run")
    p.add_argument("--list", action="store_true")
    args = p.parse_args()
    args.out = args.out or os.path.join(ROOT, "benchmarks", f"accuracy_fuzz_seed{args.seed}.csv")
    rng, knobs = random.Random(args.seed), random.Random(f"{args.seed}-knobs")
    setups, seen = [], set()
    while len(setups) < args.n:
        model, o = sample(rng, knobs)
        key = (model, json.dumps(o, sort_keys=True))
        if excluded(model, o) or key in seen:
            continue
        seen.add(key)
        setups.append((model, o))
    only = {int(i) for i in args.only.split(",") if i}
    if args.list:
        for i, (m, o) in enumerate(setups, 1):
            print(i, m, o)
        return 0
    new = not os.path.exists(args.out)
    with open(args.out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n", extrasaction="ignore")
        if new:
            w.writeheader()
        for i, (model, o) in enumerate(setups, 1):
            if only and i not in only:
                continue
            t0 = time.perf_counter()
            row = run_one(model, o)
            row["index"] = i
            w.writerow(row)
            f.flush()
            print(f"[{i}] {row['status']:13s} {row.get('error_pct', ''):>8} {model} {o} "
                  f"({time.perf_counter() - t0:.0f}s) {row.get('message', '')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
