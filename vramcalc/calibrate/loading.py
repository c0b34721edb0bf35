"""``python -m vramcalc.calibrate.loading``: the QLoRA loading panel, a real ``from_pretrained`` on a CUDA device.

The default grid builds each model on the device and quantizes it there (``training.build_on_device``); it measures
the training step alone. This panel measures what a QLoRA user really runs, phase by phase, in one fresh process per
variant:

1. **checkpoint** (its own process): the model from its config in bf16 on the device, initialised by transformers,
   written with ``save_pretrained`` (safetensors) to a folder; random weights, the real tensor layout.
2. **load**: ``AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(load_in_4bit=True,
   nf4, double quantization, bf16 compute), dtype=bfloat16, device_map={"": N})``: transformers v5 reads and
   quantizes the checkpoint tensor by tensor. Peak: ``max_memory_allocated`` from a reset before the call.
3. **prep** (variant ``kbit``): peft ``prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)``:
   every non-4-bit 16-bit parameter becomes fp32 on the device. Variant ``plain`` skips it.
4. **steps**: peft LoRA as the trace applies it (``tracing/build.apply_lora``: the estimate's targets and rank),
   Trainer's step as the grid runs it (``training.TrainingStep``: autocast bf16, the setup's optimizer), one warm-up
   step, then the peak over two steps from a reset.

Each phase's peak is written beside the estimate's (``terms/loading.load_peak_bytes`` for ``load``; the estimate's
peak tensor bytes for ``steps``) in ``loading.csv``, with the device, driver and library versions and the date.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {"kbit": True, "plain": False}  # variant -> kbit_prep
COLUMNS = ("date", "device_name", "driver_version", "cuda_version", "torch_version", "transformers_version",
           "peft_version", "bitsandbytes_version", "model", "variant", "kbit_prep", "precision", "optimizer",
           "grad_ckpt", "batch_size", "seq_len", "lora_targets", "phase", "status", "message",
           "meas_allocated_peak_bytes", "meas_reserved_peak_bytes", "nvml_peak_bytes", "est_peak_tensor_bytes",
           "error_pct", "seconds")


def setup_options(args, kbit_prep: bool) -> dict:
    """The estimate's options for one variant (QLoRA, bf16 storage; ``kbit_prep`` implies mixed-bf16)."""
    return {"method": "qlora", "precision": "bf16", "optimizer": args.optimizer, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "grad_ckpt": True, "attn": "sdpa", "kbit_prep": kbit_prep}


def make_checkpoint(args) -> None:
    """Phase 1: the bf16 model with transformers' own random initialisation, saved as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..catalogue import get_model
    from ..tracing.build import hf_config

    config = hf_config(get_model(args.model))
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(args.checkpoint)


def measure_variant(args) -> list[dict]:
    """Phases 2-4 for one variant in this process; one row per phase (an OOM or error ends the variant)."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from .. import estimate
    from ..catalogue import get_model
    from ..terms.loading import load_peak_bytes
    from ..tracing.build import apply_lora
    from ..training_setup import resolve_setup
    from .probes import Nvml, NvmlSampler, _cuda_peaks, _nvml_peaks, is_out_of_memory
    from .training import TrainingStep

    kbit_prep = VARIANTS[args.variant]
    options = setup_options(args, kbit_prep)
    spec = get_model(args.model)
    resolved = resolve_setup(spec, **options)
    load_bytes = load_peak_bytes(spec, resolved)  # peft's fp32 casts are part of the load phase's rule
    estimated = {"load": load_bytes, "prep": load_bytes,
                 "steps": estimate(args.model, gpu=args.gpu, **options).peak_tensor_bytes}
    cuda = args.device.startswith("cuda")
    nvml = Nvml.open(args.index) if cuda else None
    pre_cuda = nvml.device_used_bytes() if nvml else None
    device = torch.device(args.device)
    if cuda:
        torch.cuda.set_device(device)
    torch.zeros(1, device=device)
    rows: list[dict] = []

    def synchronize():
        if cuda:
            torch.cuda.synchronize(device)

    def reset_peaks():
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

    def sampling():
        return NvmlSampler(nvml, os.getpid()) if nvml else contextlib.nullcontext()

    def record(phase: str, started: float, sampler, status="ok", message=""):
        peaks = _cuda_peaks(torch, device) if cuda else {"allocated_peak_bytes": None, "reserved_peak_bytes": None}
        allocated = peaks["allocated_peak_bytes"]
        rows.append({"phase": phase, "status": status, "message": message,
                     "precision": resolved.setup.precision.value, "meas_allocated_peak_bytes": allocated,
                     "meas_reserved_peak_bytes": peaks["reserved_peak_bytes"],
                     "nvml_peak_bytes": _nvml_peaks(sampler, pre_cuda)["nvml_peak_bytes"],
                     "est_peak_tensor_bytes": estimated[phase],
                     "error_pct": round(100 * (estimated[phase] - allocated) / allocated, 3) if allocated else "",
                     "seconds": round(time.perf_counter() - started, 3)})

    phase, started, sampler = "load", time.perf_counter(), None
    try:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        reset_peaks()
        with sampling() as sampler:
            model = AutoModelForCausalLM.from_pretrained(args.checkpoint, quantization_config=quantization,
                                                         dtype=torch.bfloat16,
                                                         device_map={"": args.index if cuda else "cpu"},
                                                         attn_implementation="sdpa")
            synchronize()
        record("load", started, sampler)
        if kbit_prep:
            phase, started = "prep", time.perf_counter()
            with sampling() as sampler:
                model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                        gradient_checkpointing_kwargs={"use_reentrant": False})
                synchronize()
            record("prep", started, sampler)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        phase, started = "steps", time.perf_counter()
        model = apply_lora(model, resolved)  # the trace's LoraConfig and adapter dtype
        model.train()
        step = TrainingStep(model, spec, resolved, device)
        step.run()
        synchronize()
        reset_peaks()
        started = time.perf_counter()
        with sampling() as sampler:
            for _ in range(2):
                step.run()
            synchronize()
        record("steps", started, sampler)
    except Exception as error:  # an OOM or a library failure ends this variant; the row says which phase
        status = "oom" if is_out_of_memory(error) else "error"
        record(phase, started, None, status, f"{type(error).__name__}: {error}"[:600])
    stamp = provenance(args.device, args.index)  # here, where CUDA is up: the parent never initialises it
    return [{**stamp, **row} for row in rows]


def provenance(device: str, index: int) -> dict:
    """Device, driver and library versions, and the date, for every row."""
    import platform

    import torch

    from .probes import Nvml, library_versions

    cuda = device.startswith("cuda")
    nvml = Nvml.open(index) if cuda else None
    versions = library_versions()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device_name": torch.cuda.get_device_name(index) if cuda else f"cpu ({platform.processor()})",
            "driver_version": nvml.driver_version() if nvml else "",
            "cuda_version": str(torch.version.cuda or ""),
            **{f"{name}_version": versions.get(name, "") for name in ("torch", "transformers", "peft", "bitsandbytes")}}


def write_rows(path: Path, rows: list[dict]) -> None:
    """``loading.csv``, whole, through ``files.write_atomic``."""
    from ..files import write_atomic

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vramcalc.calibrate.loading", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0", help="cuda, cuda:N, or cpu (a smoke test: no peaks are read)")
    parser.add_argument("--model", default="llama-3.1-8b", help="a catalogue model")
    parser.add_argument("--gpu", default="h200", help="the catalogue GPU for the estimate's runtime terms")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--out", default="/tmp/vramcalc-loading", help="folder for loading.csv and the checkpoint")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # the worker's role
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--make-checkpoint", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        print("error: --device must be cuda, cuda:N or cpu", file=sys.stderr)
        return 2
    args.index = int(args.device.split(":")[1]) if ":" in args.device else 0
    if args.make_checkpoint:
        make_checkpoint(args)
        return 0
    if args.variant:
        print(json.dumps(measure_variant(args)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.checkpoint = str(out / "checkpoint")
    base = [sys.executable, "-m", "vramcalc.calibrate.loading", "--device", args.device, "--model", args.model,
            "--gpu", args.gpu, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
            "--optimizer", args.optimizer, "--checkpoint", args.checkpoint]
    started = time.perf_counter()
    subprocess.run(base + ["--make-checkpoint"], check=True)
    print(f"checkpoint written in {time.perf_counter() - started:.0f} s", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))  # a timeout still removes the checkpoint
    rows = []
    try:
        for variant, kbit_prep in VARIANTS.items():
            done = subprocess.run(base + ["--variant", variant], capture_output=True, text=True)
            fixed = {"model": args.model, "variant": variant, "kbit_prep": kbit_prep, "optimizer": args.optimizer,
                     "grad_ckpt": "full", "batch_size": args.batch_size, "seq_len": args.seq_len,
                     "lora_targets": "default"}
            try:
                measured = json.loads(done.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                measured = [{"phase": "load", "status": "error", "message": done.stderr.strip()[-600:]}]
            rows += [{**fixed, **row} for row in measured]
            write_rows(out / "loading.csv", rows)  # after each variant: a cut run keeps what it measured
            print(f"{variant}: " + ", ".join(f"{r['phase']} {r.get('status')} {r.get('error_pct', '')}%"
                                             for r in measured), flush=True)
    finally:
        shutil.rmtree(args.checkpoint, ignore_errors=True)  # random weights: nothing worth keeping
    print((out / "loading.csv").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
