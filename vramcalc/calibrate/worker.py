"""``python -m vramcalc.calibrate.worker``: one scenario, measured in this fresh process, written as JSON.

The runner starts one worker per scenario, so an out-of-memory error, a crashed kernel or the caching allocator's
state never reaches the next scenario. The worker writes its result atomically (temporary file, then rename) to
``--result``; a worker that dies writes nothing, and the runner records that as an error. ``--query DEVICE``
describes the device instead (it initialises CUDA, which the runner's own process must never do).

Result: ``{"status": "ok"|"oom"|"error", "message", "stage", "readings": {...}, "versions": {...},
"worker_seconds"}``; the readings are those of ``probes.measure_cuda`` / ``probes.measure_cpu``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vramcalc.calibrate.worker")
    parser.add_argument("--result", required=True, help="where to write the result JSON")
    parser.add_argument("--query", metavar="DEVICE", help="describe DEVICE (cpu, cuda:N, auto) and exit")
    parser.add_argument("--scenario", help="the scenario as JSON (Scenario.to_dict)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--memory-limit-bytes", type=int, default=0)
    parser.add_argument("--parent-pid", type=int, default=0)
    args = parser.parse_args(argv)
    die_with_parent(args.parent_pid)
    started = time.perf_counter()
    if args.query:
        result = _query(args.query)
    else:
        result = _measure(args)
    result["worker_seconds"] = time.perf_counter() - started
    write_json_atomic(Path(args.result), result)
    return 0


def _query(device: str) -> dict:
    from .probes import query_device

    try:
        return {"status": "ok", "device": query_device(device).to_dict()}
    except Exception as error:
        return {"status": "error", "message": f"{type(error).__name__}: {error}"}


def _measure(args) -> dict:
    from .probes import ProbeFailure, library_versions, measure_cpu, measure_cuda
    from .scenarios import Scenario, resolve

    result: dict = {"status": "error", "message": "", "stage": "setup", "readings": {}}
    try:
        scenario = Scenario.from_dict(json.loads(args.scenario))
        spec, resolved = resolve(scenario)
        limit = args.memory_limit_bytes or None
        if args.device == "cpu":
            readings = measure_cpu(spec, resolved, steps=args.steps, memory_limit_bytes=limit)
        else:
            index = int(args.device.split(":")[1]) if ":" in args.device else 0
            readings = measure_cuda(spec, resolved, index, steps=args.steps, warmup=args.warmup,
                                    memory_limit_bytes=limit)
        result.update(status="ok", stage="done", readings=readings)
    except ProbeFailure as failure:
        result.update(status=failure.status, message=failure.message, stage=failure.stage,
                      readings=failure.readings, traceback=traceback.format_exc())
    except Exception as error:  # a setup the libraries refuse: recorded as an error, the run goes on
        result.update(message=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
    result["versions"] = library_versions()
    return result


def die_with_parent(parent_pid: int) -> None:
    """Linux: ask for SIGKILL when the runner dies (a killed run must not leave a worker on the GPU)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if parent_pid and os.getppid() != parent_pid:  # the runner died before prctl took effect
        os._exit(3)


def write_json_atomic(path: Path, data: dict) -> None:
    """The result, through ``vramcalc.files.write_atomic``: the runner reads a whole result or none."""
    from ..files import write_atomic

    write_atomic(path, json.dumps(data, default=str))


if __name__ == "__main__":
    sys.exit(main())
