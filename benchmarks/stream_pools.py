"""FSDP's side-stream pools: the estimate (``distributed.side_stream_pools``, ``runtime.stream_pool_bytes``) against
FSDP2 steps traced at full size on a fake process group, and what the pools add to the replayed reserved memory.

Each setup is traced (1 warm-up step, 2 steps) with the allocation recorder, which names the stream each allocation
is made on (``tracing/alloc_events.py``: FSDP2 selects ``torch.cpu`` streams around its collectives on CPU, as it
selects CUDA streams on a GPU). From the events: each stream's largest live bytes (stream 1: the all-gather copy-in
stream, 2: the reduce-scatter stream) and the largest of all streams together; their difference is the traced
"pools" (what a per-stream allocator must hold beyond the tensors' joint peak). The replay columns run the same
events through the caching allocator with their streams and as one stream (``tracing/caching_allocator.py``): the
reserved memory the streams add, segments and fragmentation included. No coefficient is fitted.

    python benchmarks/stream_pools.py            # the grid: stream_pools.csv and stream_pools.md
    python benchmarks/stream_pools.py --from-csv # rewrite stream_pools.md from the CSV
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

HERE = Path(__file__).resolve().parent
CSV_PATH = HERE / "stream_pools.csv"
MD_PATH = HERE / "stream_pools.md"
MIB = 2**20
COLUMNS = ("setup", "model", "options", "est_all_gather_bytes", "trace_all_gather_bytes", "est_reduce_scatter_bytes",
           "trace_reduce_scatter_bytes", "est_pools_bytes", "trace_pools_bytes", "trace_peak_bytes",
           "replay_reserved_streams_bytes", "replay_reserved_one_stream_bytes", "est_peak_tensor_bytes",
           "est_allocator_slack_bytes", "trace_seconds")

MODELS = ("tinyllama-1.1b", "qwen2.5-0.5b", "llama-3.2-1b", "smollm2-360m")
SHAPES = {  # name: options (every one FSDP2, accelerate's full-shard defaults unless named)
    "full 2 ranks 2x1024": dict(method="full", num_gpus=2, batch_size=2, seq_len=1024),
    "full 4 ranks 4x2048 ckpt": dict(method="full", num_gpus=4, batch_size=4, seq_len=2048, grad_ckpt=True),
    "full 8 ranks 1x512 accum 2": dict(method="full", num_gpus=8, batch_size=1, seq_len=512, grad_accum=2),
    "full 4 ranks shard-grad-op": dict(method="full", num_gpus=4, batch_size=2, seq_len=1024,
                                       fsdp_shard="shard-grad-op"),
    "full 4 ranks bf16-true foreach": dict(method="full", num_gpus=4, batch_size=2, seq_len=1024,
                                           precision="bf16-true", optimizer="adamw-foreach"),
    "lora 2 ranks 2x1024": dict(method="lora", num_gpus=2, batch_size=2, seq_len=1024),
}


def measure(model: str, options: dict) -> dict:
    import vramcalc as vc
    from vramcalc import estimator
    from vramcalc.catalogue import get_model
    from vramcalc.terms import distributed
    from vramcalc.tracing.alloc_events import AllocationEvents
    from vramcalc.tracing.caching_allocator import ALLOC, replay, stream_live_peaks
    from vramcalc.tracing.engine import run_trace
    from vramcalc.training_setup import resolve_setup

    spec = get_model(model)
    resolved = resolve_setup(spec, sharding="fsdp", **options)
    events = AllocationEvents()
    started = time.perf_counter()
    run_trace(spec, resolved, steps=2, warmup=1, events=events, progress=False)
    seconds = time.perf_counter() - started
    peaks, joint = stream_live_peaks(events.events)
    all_gather, reduce_scatter = distributed.side_stream_pools(spec, resolved)
    one_stream = [e[:3] if e[0] == ALLOC else e for e in events.events]
    estimate = vc.estimate(spec, sharding="fsdp", **options)
    return {
        "est_all_gather_bytes": all_gather, "trace_all_gather_bytes": peaks.get(1, 0),
        "est_reduce_scatter_bytes": reduce_scatter, "trace_reduce_scatter_bytes": peaks.get(2, 0),
        "est_pools_bytes": estimator._tensor_peak(spec, resolved).stream_pools_bytes,
        "trace_pools_bytes": sum(peaks.values()) - joint, "trace_peak_bytes": joint,
        "replay_reserved_streams_bytes": replay(events.events).reserved_peak_bytes,
        "replay_reserved_one_stream_bytes": replay(one_stream).reserved_peak_bytes,
        "est_peak_tensor_bytes": estimate.peak_tensor_bytes,
        "est_allocator_slack_bytes": estimate.terms_bytes[vc.Term.ALLOCATOR_SLACK],
        "trace_seconds": round(seconds, 1),
    }


def run_grid() -> list[dict]:
    from vramcalc.progress import progress

    rows = []
    grid = [(model, name, options) for model in MODELS for name, options in SHAPES.items()]
    with progress(len(grid), "stream pools", "setups") as bar:
        for model, name, options in grid:
            rows.append({"setup": name, "model": model, "options": repr(options), **measure(model, options)})
            bar.update(1, note=f"{model} {name}")
    with CSV_PATH.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def _error(est: float, traced: float) -> float | None:
    return None if not traced else est / traced - 1


def write_md(rows: list[dict]) -> None:
    def mib(value) -> str:
        return f"{int(value) / MIB:,.1f}"

    def pct(value) -> str:
        return "-" if value is None else f"{value:+.1%}"

    lines = ["# FSDP's side-stream pools: estimate vs trace", "",
             "Generated by `python benchmarks/stream_pools.py` (module docstring: what is traced and replayed). "
             "Estimate: `distributed.side_stream_pools` (all-gather and reduce-scatter streams) and "
             "`runtime.stream_pool_bytes` (what they add beyond the tensor peak), from the estimate's moments. "
             "Trace: FSDP2 (torch 2.13) on a fake process group, each stream's largest live bytes from the "
             "recorded allocations. Replay: the caching allocator over the same events with their streams and as "
             "one stream. MiB = 2^20 bytes.", ""]
    pools_errors = [abs(e) for e in (_error(int(r["est_pools_bytes"]), int(r["trace_pools_bytes"]))
                                     for r in rows) if e is not None]
    ag_errors = [abs(e) for e in (_error(int(r["est_all_gather_bytes"]), int(r["trace_all_gather_bytes"]))
                                  for r in rows) if e is not None]
    rs_errors = [abs(e) for e in (_error(int(r["est_reduce_scatter_bytes"]), int(r["trace_reduce_scatter_bytes"]))
                                  for r in rows) if e is not None]
    added = [(int(r["replay_reserved_streams_bytes"]) - int(r["replay_reserved_one_stream_bytes"]))
             / int(r["replay_reserved_one_stream_bytes"]) for r in rows]
    lines += ["| quantity | setups | median abs error | max abs error |", "|---|---|---|---|"]
    for name, errors in (("all-gather stream", ag_errors), ("reduce-scatter stream", rs_errors),
                         ("pools beyond the tensor peak", pools_errors)):
        if errors:
            lines.append(f"| {name} | {len(errors)} | {statistics.median(errors):.2%} | {max(errors):.2%} |")
    # the estimate's reserved (``MemoryBreakdown.reserved_bytes``: tensor peak + allocator slack + the pools)
    # against the replay with streams, and without the pools (as before they were modelled)
    without = [(int(r["est_peak_tensor_bytes"]) + int(r["est_allocator_slack_bytes"]))
               / int(r["replay_reserved_streams_bytes"]) - 1 for r in rows]
    with_pools = [(int(r["est_peak_tensor_bytes"]) + int(r["est_allocator_slack_bytes"]) + int(r["est_pools_bytes"]))
                  / int(r["replay_reserved_streams_bytes"]) - 1 for r in rows]
    lines += ["", f"The streams raise the replayed reserved memory by {statistics.median(added):.1%} (median; "
              f"{min(added):.1%} to {max(added):.1%}) over the same events replayed as one stream. The estimate's "
              f"reserved (`reserved_bytes`: peak_tensor + allocator_slack, + the pools) "
              f"against the replay with streams: "
              f"median {statistics.median(with_pools):+.1%} ({min(with_pools):+.1%} to {max(with_pools):+.1%}) with "
              f"the pools, {statistics.median(without):+.1%} ({min(without):+.1%} to {max(without):+.1%}) without "
              f"them.", "",
              "| model | setup | all-gather est / trace MiB | reduce-scatter est / trace MiB | pools est / trace MiB "
              "| pools error | tensor peak MiB | replay reserved, streams / one stream MiB |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['setup']} | {mib(r['est_all_gather_bytes'])} / {mib(r['trace_all_gather_bytes'])} "
            f"| {mib(r['est_reduce_scatter_bytes'])} / {mib(r['trace_reduce_scatter_bytes'])} "
            f"| {mib(r['est_pools_bytes'])} / {mib(r['trace_pools_bytes'])} "
            f"| {pct(_error(int(r['est_pools_bytes']), int(r['trace_pools_bytes'])))} "
            f"| {mib(r['trace_peak_bytes'])} "
            f"| {mib(r['replay_reserved_streams_bytes'])} / {mib(r['replay_reserved_one_stream_bytes'])} |")
    MD_PATH.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-csv", action="store_true", help="rewrite the report from stream_pools.csv")
    args = parser.parse_args(argv)
    if args.from_csv:
        with CSV_PATH.open() as handle:
            rows = list(csv.DictReader(handle))
    else:
        rows = run_grid()
    write_md(rows)
    print(f"{len(rows)} setups; wrote {MD_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
