"""The caching-allocator replay against the first real ``max_memory_reserved`` measurements (one H200, torch 2.11).

For each scenario of ``calibration/runs/h200/measurements.csv`` (the grid) and ``calibration/runs/h200/qlora/``
(the QLoRA panel), the same setup is traced at full size on fake CPU tensors with the allocation recorder
(``vramcalc/tracing/reserved.py::replay_reserved``) and the sequence replayed through the allocator model
(``vramcalc/tracing/caching_allocator.py``), following the harness' protocol: build, 1 warm-up step,
``gc.collect(); empty_cache(); reset_peak_memory_stats()``, 2 measured steps (``calibration/run_h200.sh`` runs
``python -m vramcalc.calibrate`` with its defaults ``--warmup 1 --steps 2``).

What the trace reproduces of the harness' build (``calibrate/training.py::build_on_device``): the same
``build_model`` (meta model, parameters and buffers materialised in module order). What this script adds to it for
QLoRA (``harness_build``): ``quantize_4bit_weights``, module by module, as bitsandbytes 0.50's ``quantize_4bit``
allocates on CUDA (the 16-bit random weight, absmax and packed weight, with double quantization the offset, the
centred absmax, the 8-bit absmax and its state), then the trace's stand-in weight and state die and the 16-bit
weight is freed. Weight initialisation (in place) and RoPE's reset (a few KiB) are left out.

The cuBLAS workspace: one allocation of the H200 profile's fitted ``workspace_bytes``
(``calibration/profiles/h200.json``, 82.3 MiB, fitted to measured allocated - estimated tensor peak over the grid),
made after the first matmul's output. Nothing in the allocator model is fitted: its constants are the C++ source's.

The old estimate for comparison: reserved = tensor peak x (1 + slack) + workspace, with the estimate's tensor peak
from the same row (``est_peak_tensor_bytes``) and two slacks: the documented default the row was estimated with
(``est_allocator_slack_bytes`` / ``est_peak_tensor_bytes``) and the H200 profile's fitted 0.1046.

    python benchmarks/allocator_replay.py                  # every scenario, one process each: allocator_replay.csv
    python benchmarks/allocator_replay.py --only smollm2   # scenarios whose id contains the word
    python benchmarks/allocator_replay.py --from-csv       # rewrite allocator_replay.md from the CSV
    python benchmarks/allocator_replay.py --explain ID     # the segments one replay allocates after the reset
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RUN = ROOT / "calibration" / "runs" / "h200"
PANELS = [(RUN / "measurements.csv", RUN / "scenarios.json", "grid"),
          (RUN / "qlora" / "measurements.csv", RUN / "qlora" / "scenarios.json", "qlora panel")]
PROFILE = ROOT / "calibration" / "profiles" / "h200.json"
WARMUP, STEPS = 1, 2  # vramcalc/calibrate/__main__.py defaults, which run_h200.sh keeps
TRACE_TIMEOUT_S = 900  # a trace that takes longer is skipped (said in the report)
CSV_PATH = HERE / "allocator_replay.csv"
MD_PATH = HERE / "allocator_replay.md"
GIB = 2**30
COLUMNS = ("scenario_id", "panel", "status", "trace_seconds", "events", "meas_allocated_peak_bytes",
           "meas_reserved_peak_bytes", "meas_reserved_baseline_bytes", "est_peak_tensor_bytes",
           "est_default_slack_fraction", "replay_allocated_peak_bytes", "replay_reserved_peak_bytes",
           "replay_reserved_baseline_bytes", "trace_peak_tensor_bytes", "workspace_bytes", "message")


def workspace_bytes() -> int:
    return int(json.loads(PROFILE.read_text(encoding="utf-8"))["coefficients"]["workspace_bytes"])


def fitted_slack() -> float:
    return float(json.loads(PROFILE.read_text(encoding="utf-8"))["coefficients"]["allocator_slack_fraction"])


def measured_rows() -> list[tuple[dict, dict, str]]:
    """(measurement row, scenario, panel) for every ok row."""
    out = []
    for csv_path, scenarios_path, panel in PANELS:
        scenarios = {s["id"]: s for s in json.loads(scenarios_path.read_text(encoding="utf-8"))["scenarios"]}
        with csv_path.open(encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                if row["status"] == "ok":
                    out.append((row, scenarios[row["scenario_id"]], panel))
    return out


# -- the harness' QLoRA build ------------------------------------------------------------------------------
def harness_build(spec, resolved, build_mode):
    """``build_model`` (recorded), then for QLoRA the harness' real quantization of every 4-bit layer
    (``calibrate/training.py::quantize_4bit_weights``) as events: bitsandbytes' CUDA allocations in order, the
    stand-in's storages rebound to what replaced them."""
    from vramcalc.options import Method
    from vramcalc.tracing.build import build_model, half_dtype

    model = build_model(spec, resolved, build_mode)
    if resolved.setup.method is Method.QLORA:
        _quantize_as_harness(model, resolved, build_mode.events, half_dtype(resolved.setup.precision).itemsize)
    return model


def _quantize_as_harness(model, resolved, events, half_bytes: int) -> None:
    import bitsandbytes as bnb

    from vramcalc.facts import BNB_BLOCKSIZE
    from vramcalc.tracing.caching_allocator import ALLOC, FREE

    double = bool(resolved.setup.double_quant)
    freed: set = set()

    def alloc(nbytes):
        key = events.new_key()
        events.events.append((ALLOC, key, nbytes))
        return key

    def free(key):
        if key is not None and key not in freed:
            freed.add(key)
            events.events.append((FREE, key))

    dynamic_code = None
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        n = module.out_features * module.in_features
        blocks = -(-n // BNB_BLOCKSIZE)
        weight16 = alloc(n * half_bytes)  # torch.empty(out, in, dtype=16-bit, device).normal_()
        # bitsandbytes/backends/cuda/ops.py quantize_4bit: absmax (fp32 per block), then the packed codes
        absmax = alloc(blocks * 4)
        packed = alloc((n + 1) // 2)
        code4 = alloc(16 * 4)  # functional.get_4bit_type(quant_type, device)
        new = {"weight": packed, "absmax": absmax, "code": code4}
        if double:  # functional.quantize_4bit: offset = absmax.mean(); quantize_blockwise(absmax - offset, 256)
            offset = alloc(4)
            centred = alloc(blocks * 4)
            if dynamic_code is None:
                dynamic_code = alloc(256 * 4)  # name2qmap["dynamic"], kept on the device once
            blocks2 = -(-blocks // 256)
            absmax2 = alloc(blocks2 * 4)  # quantize_blockwise: absmax, then the 8-bit codes
            qabsmax = alloc(blocks)
            code2 = alloc(256 * 4)  # code.to(device, copy=True) in the nested state
            free(centred)
            free(absmax)  # del _absmax
            new.update(absmax=qabsmax, offset=offset, state2_absmax=absmax2, state2_code=code2)
        # module.weight = param.to(device): the stand-in weight and its quantization state die
        old = {"weight": module.weight}
        state = getattr(module.weight, "quant_state", None) or getattr(module, "quant_state", None)
        if state is not None:
            old.update(absmax=state.absmax, code=state.code, offset=state.offset)
            if state.state2 is not None:
                old.update(state2_absmax=state.state2.absmax, state2_code=state.state2.code)
        for role, tensor in old.items():
            if tensor is None:
                continue
            storage = tensor.untyped_storage()
            free(events.key_of(storage))
            events.rebind(storage, new.get(role))  # the stand-in now stands for the real allocation
        free(weight16)  # del weight


# -- one scenario (in its own process) ----------------------------------------------------------------------
def run_one(scenario: dict) -> dict:
    """``scenario``: the run's scenario, with the row's ``lora_modules`` (the targets the run adapted) beside it."""
    from vramcalc.calibrate.scenarios import Scenario, as_measured, resolve, scenario_id
    from vramcalc.tracing.reserved import replay_reserved

    given = Scenario.from_dict(scenario)
    spec, resolved = resolve(given)
    if scenario_id(spec, resolved) != scenario["id"]:
        raise SystemExit(f"{scenario['id']} resolves to {scenario_id(spec, resolved)}")
    spec, resolved = resolve(as_measured(given, scenario))  # the LoRA targets the run adapted
    out = replay_reserved(spec, resolved, warmup=WARMUP, steps=STEPS, workspace_bytes=workspace_bytes(),
                          builder=harness_build, progress=False)
    return {
        "trace_seconds": round(out.trace_seconds, 1),
        "events": out.events,
        "replay_allocated_peak_bytes": out.allocated_peak_bytes,
        "replay_reserved_peak_bytes": out.reserved_peak_bytes,
        "replay_reserved_baseline_bytes": out.replay.reserved_at_reset_bytes,
        "trace_peak_tensor_bytes": sum(out.trace.terms.values()),
        "workspace_bytes": out.workspace_bytes,
    }


def explain(scenario: dict, measured: dict) -> None:
    """Print the segments the replay allocates after the peak reset, with the op whose allocation made each."""
    from vramcalc.calibrate.scenarios import Scenario, as_measured, resolve
    from vramcalc.tracing.alloc_events import AllocationEvents
    from vramcalc.tracing.caching_allocator import ALLOC, EMPTY_CACHE, FREE, RESET_PEAK, CachingAllocator
    from vramcalc.tracing.engine import run_trace
    from vramcalc.tracing.reserved import CONTEXT_TENSOR_BYTES

    spec, resolved = resolve(as_measured(Scenario.from_dict(scenario), measured))
    events = AllocationEvents(workspace_bytes=workspace_bytes())
    events.events.append((ALLOC, events.new_key(), CONTEXT_TENSOR_BYTES))
    run_trace(spec, resolved, steps=STEPS, warmup=WARMUP, events=events, builder=harness_build, progress=False)
    allocator, live, after_reset = CachingAllocator(), {}, False
    for event in list(events.events):
        kind = event[0]
        if kind == ALLOC:
            before = allocator.reserved_bytes
            live[event[1]] = allocator.malloc(event[2])
            if after_reset and allocator.reserved_bytes > before:
                print(f"segment {(allocator.reserved_bytes - before) / 2**20:9.1f} MiB for {event[2] / 2**20:9.1f} MiB "
                      f"({events.ops.get(event[1], '')}): allocated {allocator.allocated_bytes / GIB:.3f} GiB, "
                      f"reserved {allocator.reserved_bytes / GIB:.3f} GiB")
        elif kind == FREE:
            allocator.free(live.pop(event[1]))
        elif kind == EMPTY_CACHE:
            allocator.empty_cache()
        elif kind == RESET_PEAK:
            allocator.reset_peak()
            after_reset = True
            print(f"reset: allocated {allocator.allocated_bytes / GIB:.3f} GiB, reserved "
                  f"{allocator.reserved_bytes / GIB:.3f} GiB, {allocator.segments} segments")
    print(allocator.result())


def run_all(only: str | None) -> list[dict]:
    rows = []
    for measured, scenario, panel in measured_rows():
        if only and only not in measured["scenario_id"]:
            continue
        est = int(measured["est_peak_tensor_bytes"])
        row = {"scenario_id": measured["scenario_id"], "panel": panel,
               "meas_allocated_peak_bytes": int(measured["meas_allocated_peak_bytes"]),
               "meas_reserved_peak_bytes": int(measured["meas_reserved_peak_bytes"]),
               "meas_reserved_baseline_bytes": int(measured["meas_reserved_baseline_bytes"]),
               "est_peak_tensor_bytes": est,
               "est_default_slack_fraction": round(int(measured["est_allocator_slack_bytes"]) / est, 6)}
        started = time.perf_counter()
        print(f"{measured['scenario_id']} ...", flush=True)
        try:
            done = subprocess.run([sys.executable, __file__, "--one",
                                   json.dumps({**scenario, "lora_modules": measured["lora_modules"]})], capture_output=True,
                                  text=True, timeout=TRACE_TIMEOUT_S, cwd=ROOT)
            if done.returncode != 0:
                row.update(status="error", message=done.stderr.strip().splitlines()[-1][:200])
            else:
                row.update(json.loads(done.stdout.strip().splitlines()[-1]), status="ok", message="")
        except subprocess.TimeoutExpired:
            row.update(status="skipped", message=f"trace over {TRACE_TIMEOUT_S} s")
        print(f"  {row['status']} in {time.perf_counter() - started:.0f} s {row.get('message', '')}", flush=True)
        rows.append(row)
        write_csv(merge(read_csv(), rows))
    return rows


# -- the report ---------------------------------------------------------------------------------------------
def read_csv() -> list[dict]:
    if not CSV_PATH.is_file():
        return []
    with CSV_PATH.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    by_id = {row["scenario_id"]: row for row in old}
    by_id.update({row["scenario_id"]: row for row in new})
    order = [m["scenario_id"] for m, _, _ in measured_rows()]
    return [by_id[i] for i in order if i in by_id]


def write_csv(rows: list[dict]) -> None:
    with CSV_PATH.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def _error(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured


OUTLIER = "smollm2-135m/full/mixed-bf16/adamw/ckpt/eager/b8s8192"  # +18 GiB allocated the CPU trace never makes


def write_md(rows: list[dict]) -> None:
    """The table and its summary between the report's ``<!-- table -->`` markers (the prose around it is kept)."""
    workspace, slack = workspace_bytes(), fitted_slack()
    lines = ["| scenario | measured reserved (GiB) | replayed (GiB) | error | measured reserved - allocated (GiB) | "
             "replayed (GiB) | tensor peak x (1 + default slack) + ws (GiB) | error | x (1 + 0.1046) + ws (GiB) | "
             "error | measured - replayed allocated (MiB) | trace (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    errors: dict[str, list[float]] = {"replay": [], "default": [], "fitted": [], "slack": []}
    kept: dict[str, list[float]] = {"replay": [], "default": [], "fitted": []}
    skipped = []
    for row in rows:
        measured = int(row["meas_reserved_peak_bytes"])
        est = int(row["est_peak_tensor_bytes"])
        old_default = est * (1 + float(row["est_default_slack_fraction"])) + workspace
        old_fitted = est * (1 + slack) + workspace
        e_default, e_fitted = _error(old_default, measured), _error(old_fitted, measured)
        measured_slack = measured - int(row["meas_allocated_peak_bytes"])
        if row["status"] != "ok":
            skipped.append(f"- `{row['scenario_id']}`: {row['status']} ({row['message']})")
            lines.append(f"| `{row['scenario_id']}` | {measured / GIB:.3f} | {row['status']} | | "
                         f"{measured_slack / GIB:.3f} | | {old_default / GIB:.3f} | {e_default:+.1%} | "
                         f"{old_fitted / GIB:.3f} | {e_fitted:+.1%} | | |")
            continue
        replayed = int(row["replay_reserved_peak_bytes"])
        replayed_slack = replayed - int(row["replay_allocated_peak_bytes"])
        e_replay = _error(replayed, measured)
        alloc_gap = (int(row["meas_allocated_peak_bytes"]) - int(row["replay_allocated_peak_bytes"])) / 2**20
        for name, value in (("replay", e_replay), ("default", e_default), ("fitted", e_fitted)):
            errors[name].append(abs(value))
            if row["scenario_id"] != OUTLIER:
                kept[name].append(abs(value))
        errors["slack"].append(abs(replayed_slack - measured_slack))
        lines.append(f"| `{row['scenario_id']}` | {measured / GIB:.3f} | {replayed / GIB:.3f} | {e_replay:+.1%} | "
                     f"{measured_slack / GIB:.3f} | {replayed_slack / GIB:.3f} | {old_default / GIB:.3f} | "
                     f"{e_default:+.1%} | {old_fitted / GIB:.3f} | {e_fitted:+.1%} | {alloc_gap:+.0f} | "
                     f"{float(row['trace_seconds']):.0f} |")
    summary = ["Median / max |relative error| of the reserved peak:", ""]
    for name, label in (("replay", "replay"), ("default", "tensor peak x (1 + default slack) + workspace"),
                        ("fitted", "tensor peak x (1 + fitted 0.1046) + workspace")):
        if errors[name]:
            summary.append(f"- {label}: {statistics.median(errors[name]):.1%} / {max(errors[name]):.1%} over "
                           f"{len(errors[name])} scenarios; without `{OUTLIER}`: "
                           f"{statistics.median(kept[name]):.1%} / {max(kept[name]):.1%} ({len(kept[name])})")
    if errors["slack"]:
        summary.append(f"- reserved - allocated, replayed against measured: median |difference| "
                       f"{statistics.median(errors['slack']) / GIB:.3f} GiB, max {max(errors['slack']) / GIB:.3f} "
                       f"GiB ({len(errors['slack'])} scenarios)")
    text = MD_PATH.read_text(encoding="utf-8") if MD_PATH.is_file() else ""
    table = "\n".join(lines + [""] + summary + ([""] + ["Not replayed:"] + skipped if skipped else []))
    start, end = "<!-- table -->", "<!-- /table -->"
    if start in text and end in text:
        text = text[:text.index(start) + len(start)] + "\n" + table + "\n" + text[text.index(end):]
    else:
        text = f"# The caching-allocator replay against the H200's max_memory_reserved\n\n{start}\n{table}\n{end}\n"
    MD_PATH.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="scenarios whose id contains this")
    parser.add_argument("--from-csv", action="store_true", help="rewrite the .md from the CSV")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a scenario's JSON: trace it and print the JSON result
    parser.add_argument("--explain", metavar="ID", help="the segments a scenario's replay allocates after the reset")
    args = parser.parse_args(argv)
    if args.explain:
        measured, scenario = next((m, s) for m, s, _ in measured_rows() if m["scenario_id"] == args.explain)
        explain(scenario, measured)
        return 0
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return 0
    if not args.from_csv:
        run_all(args.only)
    write_md(read_csv())
    return 0


if __name__ == "__main__":
    sys.exit(main())
