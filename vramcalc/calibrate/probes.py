"""What the harness reads, and the measurement protocol that reads it (run inside a worker process).

CUDA probe (``measure_cuda``), following the PyTorch memory-tracker protocol (shared/reference/memory-math.md §6):
  0. before CUDA is initialised: NVML device memory in use (the pre-CUDA baseline: other processes, driver);
  1. create the context (one tiny tensor): context = this process' NVML memory - ``memory_reserved``;
  2. build the model, run ``warmup`` steps (optimizer state, cuBLAS handles and workspaces, lazily loaded kernels);
  3. ``gc.collect()``, ``empty_cache()``, ``reset_peak_memory_stats()``; record the baseline (allocated, reserved);
  4. run one untimed step (it re-reserves through ``cudaMalloc`` every segment ``empty_cache()`` released) and then
     ``steps`` (>= 2) timed steps while a thread samples NVML every ``NVML_SAMPLE_S``; ``step_seconds`` is their
     median (``step_timing`` = ``STEADY_STEP_TIMING``; rows of runs before it timed the first steps after the reset);
  5. read ``max_memory_allocated``, ``max_memory_reserved``, the active-bytes peak, the allocator's retry and OOM
     counts, and NVML's peak: per process (``nvmlDeviceGetComputeRunningProcesses().usedGpuMemory``) where the
     driver reports it, else device ``used`` (v2 API) minus the pre-CUDA baseline.
  What each sees: allocated = tensors + cuBLAS workspaces; reserved = allocated + the caching allocator's slack;
  NVML = reserved + CUDA context and kernel images + memory outside torch's allocator (bitsandbytes paged state).
CPU probe (``measure_cpu``): the trace's dispatch-level AllocationTracker over the same model and Trainer step on
  real CPU tensors (its peak is what ``max_memory_allocated`` would see, rounded to CUDA's 512 B granule). An
  imposed limit (``memory_limit_bytes``) raises ``torch.OutOfMemoryError`` as CUDA would, so OOM handling is
  exercised without a GPU.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass

from ..catalogue import gpu_candidates
from .records import STEADY_STEP_TIMING

NVML_SAMPLE_S = 0.005  # NVML polling period during the measured steps
MIB = 2**20


# -- the device ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceInfo:
    """The device a run measures, as the parent process sees it before any scenario."""

    kind: str  # cuda | cpu
    index: int
    name: str  # torch.cuda.get_device_name, or the CPU model
    gpu: str | None  # catalogue name (vramcalc.catalogue), None when not in the catalogue or on CPU
    total_bytes: int
    free_bytes: int
    driver_version: str = ""
    cuda_version: str = ""
    compute_capability: str = ""

    @property
    def label(self) -> str:
        """File-name-safe name: the catalogue name, else a slug of the device name."""
        if self.gpu:
            return self.gpu
        if self.kind == "cpu":
            return "cpu"
        return "".join(c if c.isalnum() else "-" for c in self.name.lower()).strip("-") or "gpu"

    @property
    def spec(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    def to_dict(self) -> dict:
        return asdict(self)


def catalogue_gpu_name(device_name: str, total_bytes: int = 0) -> str | None:
    """The catalogue GPU for a ``torch.cuda.get_device_name`` / NVML name, or None.

    Resolved as ``--gpu`` resolves names (``catalogue.gpu_candidates``: the ``aliases`` column of ``data/gpus.csv``):
    "NVIDIA H200" -> h200, "NVIDIA H100 80GB HBM3" -> h100-sxm, "NVIDIA A100-SXM4-80GB" -> a100-80gb. A name that
    fits several rows (an A100 whose name gives no size) takes the one whose memory is nearest ``total_bytes``."""
    found = gpu_candidates(device_name)
    if len(found) > 1 and total_bytes > 0:
        found = [min(found, key=lambda gpu: abs(gpu.memory_bytes - total_bytes))]
    return found[0].name if len(found) == 1 else None


def query_device(spec: str) -> DeviceInfo:
    """Describe ``spec`` ("cpu", "cuda", "cuda:N" or "auto"). Initialises CUDA: call it in a throw-away process
    (the runner does, through ``worker --query``), never in the process that launches the measurements."""
    if spec in ("auto", "cuda") or spec.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            index = int(spec.split(":")[1]) if ":" in spec else 0
            if index >= torch.cuda.device_count():
                raise ValueError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s)")
            free, total = torch.cuda.mem_get_info(index)
            name = torch.cuda.get_device_name(index)
            major, minor = torch.cuda.get_device_capability(index)
            nvml = Nvml.open(index)
            return DeviceInfo("cuda", index, name, catalogue_gpu_name(name, total), int(total), int(free),
                              nvml.driver_version() if nvml else "", str(torch.version.cuda or ""),
                              f"{major}.{minor}")
        if spec != "auto":
            raise ValueError(f"device {spec!r}: torch sees no CUDA device (torch {torch.__version__})")
    return cpu_device()


def cpu_device() -> DeviceInfo:
    total, available = _host_memory_bytes()
    return DeviceInfo("cpu", 0, platform.processor() or platform.machine() or "cpu", None, total, available)


def _host_memory_bytes() -> tuple[int, int]:
    """MemTotal and MemAvailable from /proc/meminfo (Linux), else the page counts."""
    try:
        values = {}
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, rest = line.split(":", 1)
                values[key] = int(rest.split()[0]) * 1024
        return values["MemTotal"], values.get("MemAvailable", values["MemTotal"])
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages, pages


# -- NVML ----------------------------------------------------------------------------------------------
class Nvml:
    """One NVML device handle, opened without initialising CUDA. Every reading returns None when NVML cannot say."""

    def __init__(self, pynvml, handle):
        self._nvml = pynvml
        self.handle = handle

    @classmethod
    def open(cls, cuda_index: int) -> "Nvml | None":
        """The NVML device that CUDA calls ``cuda_index`` under ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (the worker sets
        it) and ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs). None without nvidia-ml-py or a driver."""
        try:
            import pynvml

            pynvml.nvmlInit()
            visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
            if visible:
                chosen = visible[cuda_index]
                if chosen.isdigit():
                    handle = pynvml.nvmlDeviceGetHandleByIndex(int(chosen))
                else:
                    handle = pynvml.nvmlDeviceGetHandleByUUID(chosen)
            else:
                handle = pynvml.nvmlDeviceGetHandleByIndex(cuda_index)
            return cls(pynvml, handle)
        except Exception:  # no library, no driver, no such device: NVML readings are optional
            return None

    def device_used_bytes(self) -> int | None:
        """Device memory in use: the v2 API (excludes driver-reserved memory), else v1."""
        nvml = self._nvml
        try:
            return int(nvml.nvmlDeviceGetMemoryInfo(self.handle, version=nvml.nvmlMemory_v2).used)
        except Exception:
            try:
                return int(nvml.nvmlDeviceGetMemoryInfo(self.handle).used)
            except Exception:
                return None

    def process_used_bytes(self, pid: int) -> int | None:
        """This process' device memory as the driver accounts it (None when the driver does not report it, e.g.
        inside a container whose PIDs NVML cannot see)."""
        try:
            for process in self._nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                if process.pid == pid and process.usedGpuMemory is not None:
                    return int(process.usedGpuMemory)
        except Exception:
            return None
        return None

    def driver_version(self) -> str:
        try:
            version = self._nvml.nvmlSystemGetDriverVersion()
            return version.decode() if isinstance(version, bytes) else str(version)
        except Exception:
            return ""

    def uuid(self) -> str:
        try:
            value = self._nvml.nvmlDeviceGetUUID(self.handle)
            return value.decode() if isinstance(value, bytes) else str(value)
        except Exception:
            return ""


class NvmlSampler:
    """A thread that polls NVML (this process, and the device) and keeps the maxima."""

    def __init__(self, nvml: Nvml, pid: int, period_s: float = NVML_SAMPLE_S):
        self.nvml = nvml
        self.pid = pid
        self.period_s = period_s
        self.process_peak_bytes: int | None = None
        self.device_peak_bytes: int | None = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)

    def sample(self) -> None:
        process = self.nvml.process_used_bytes(self.pid)
        device = self.nvml.device_used_bytes()
        if process is not None:
            self.process_peak_bytes = max(self.process_peak_bytes or 0, process)
        if device is not None:
            self.device_peak_bytes = max(self.device_peak_bytes or 0, device)
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period_s)

    def __enter__(self) -> "NvmlSampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# -- provenance ----------------------------------------------------------------------------------------
def library_versions() -> dict[str, str]:
    """Versions of what the step ran on (of the modules actually imported where possible)."""
    import importlib
    import sys

    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        module = sys.modules.get(name)
        if module is None:
            try:
                module = importlib.import_module(name)
            except Exception:
                versions[name] = ""
                continue
        versions[name] = str(getattr(module, "__version__", ""))
    return versions


# -- the protocols -------------------------------------------------------------------------------------
class ProbeFailure(Exception):
    """A scenario that did not complete: ``status`` is oom or error, with what was read before it failed."""

    def __init__(self, status: str, message: str, stage: str, readings: dict):
        super().__init__(message)
        self.status = status
        self.message = message
        self.stage = stage
        self.readings = readings


def is_out_of_memory(error: BaseException) -> bool:
    """torch's OutOfMemoryError, and the allocation failures that surface as other errors (cuBLAS, bitsandbytes'
    cudaMallocManaged, the host allocator)."""
    import torch

    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    return any(word in text for word in ("out of memory", "alloc_failed", "can't allocate memory", "cudaerrormemoryallocation"))


def measure_cuda(spec, resolved, device_index: int = 0, *, steps: int = 2, warmup: int = 1,
                 memory_limit_bytes: int | None = None) -> dict:
    """The CUDA protocol (module docstring). Returns the readings; raises ProbeFailure on OOM or error."""
    readings: dict = {"probe": "cuda"}
    pid = os.getpid()
    nvml = Nvml.open(device_index)
    readings["nvml_pre_cuda_used_bytes"] = nvml.device_used_bytes() if nvml else None

    import torch

    from .training import TrainingStep, build_on_device

    stage = "context"
    try:
        device = torch.device("cuda", device_index)
        torch.cuda.set_device(device)
        torch.zeros(1, device=device)
        torch.cuda.synchronize(device)
        readings.update(_device_provenance(torch, device, nvml))
        readings["cuda_context_bytes"] = _context_bytes(nvml, pid, readings["nvml_pre_cuda_used_bytes"],
                                                        torch.cuda.memory_reserved(device))
        if memory_limit_bytes:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, memory_limit_bytes / total), device)
        stage = "build"
        started = time.perf_counter()
        model = build_on_device(spec, resolved, device)
        step = TrainingStep(model, spec, resolved, device)
        torch.cuda.synchronize(device)
        readings["build_seconds"] = time.perf_counter() - started
        stage = "warmup"
        started = time.perf_counter()
        for _ in range(warmup):
            step.run()
        torch.cuda.synchronize(device)
        readings["warmup_seconds"] = time.perf_counter() - started
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        readings["allocated_baseline_bytes"] = torch.cuda.memory_allocated(device)
        readings["reserved_baseline_bytes"] = torch.cuda.memory_reserved(device)
        stage = "steps"
        step_seconds = []
        losses = []
        sampler = NvmlSampler(nvml, pid) if nvml else None
        with sampler if sampler else contextlib.nullcontext():
            step.run()  # untimed: after empty_cache() this step re-reserves every segment (cudaMalloc)
            torch.cuda.synchronize(device)
            for _ in range(steps):
                started = time.perf_counter()
                losses.append(step.run())
                torch.cuda.synchronize(device)
                step_seconds.append(time.perf_counter() - started)
        readings.update(_cuda_peaks(torch, device))
        readings.update(_nvml_peaks(sampler, readings["nvml_pre_cuda_used_bytes"]))
        readings["step_seconds"] = sorted(step_seconds)[len(step_seconds) // 2]
        readings["step_timing"] = STEADY_STEP_TIMING
        readings["loss"] = losses[-1]
        return readings
    except Exception as error:  # an OOM or a failure of the libraries: recorded, and the run goes on
        status = "oom" if is_out_of_memory(error) else "error"
        try:
            readings.update(_cuda_peaks(torch, torch.device("cuda", device_index)))
        except Exception:
            pass
        raise ProbeFailure(status, f"{type(error).__name__}: {error}", stage, readings) from error


def _device_provenance(torch, device, nvml: Nvml | None) -> dict:
    major, minor = torch.cuda.get_device_capability(device)
    properties = torch.cuda.get_device_properties(device)
    out = {
        "device_name": torch.cuda.get_device_name(device),
        "compute_capability": f"{major}.{minor}",
        "device_total_bytes": int(properties.total_memory),
        "cuda_version": str(torch.version.cuda or ""),
        "driver_version": nvml.driver_version() if nvml else "",
        "cudnn_version": str(torch.backends.cudnn.version() or ""),
        "lazy_loading": os.environ.get("CUDA_MODULE_LOADING", "LAZY (torch default)"),
    }
    torch_uuid = str(getattr(properties, "uuid", "") or "").lower()
    nvml_uuid = (nvml.uuid() if nvml else "").lower()
    # NVML says "GPU-<uuid>", torch "<uuid>": a mismatch means NVML reads another device than the one measured
    out["nvml_device_matches"] = nvml_uuid.endswith(torch_uuid) if torch_uuid and nvml_uuid else None
    return out


def _context_bytes(nvml: Nvml | None, pid: int, pre_cuda_used: int | None, reserved: int) -> int | None:
    """This process' device memory right after the first allocation, less what torch's allocator holds."""
    if nvml is None:
        return None
    used = nvml.process_used_bytes(pid)
    if used is None:
        device = nvml.device_used_bytes()
        if device is None or pre_cuda_used is None:
            return None
        used = device - pre_cuda_used
    return used - reserved


def _cuda_peaks(torch, device) -> dict:
    stats = torch.cuda.memory_stats(device)
    return {
        "allocated_peak_bytes": int(torch.cuda.max_memory_allocated(device)),
        "reserved_peak_bytes": int(torch.cuda.max_memory_reserved(device)),
        "active_peak_bytes": int(stats.get("active_bytes.all.peak", 0)),
        "alloc_retries": int(stats.get("num_alloc_retries", 0)),
        "allocator_ooms": int(stats.get("num_ooms", 0)),
    }


def _nvml_peaks(sampler: NvmlSampler | None, pre_cuda_used: int | None) -> dict:
    """The NVML peak the fit uses: per process where reported, else device used minus the pre-CUDA baseline."""
    if sampler is None:
        return {"nvml_peak_bytes": None, "nvml_source": "", "nvml_samples": 0}
    device_delta = None
    if sampler.device_peak_bytes is not None and pre_cuda_used is not None:
        device_delta = sampler.device_peak_bytes - pre_cuda_used
    if sampler.process_peak_bytes is not None:
        peak, source = sampler.process_peak_bytes, "process"
    else:
        peak, source = device_delta, "device-delta" if device_delta is not None else ""
    return {"nvml_peak_bytes": peak, "nvml_source": source, "nvml_process_peak_bytes": sampler.process_peak_bytes,
            "nvml_device_delta_peak_bytes": device_delta, "nvml_samples": sampler.samples}


def measure_cpu(spec, resolved, *, steps: int = 2, memory_limit_bytes: int | None = None) -> dict:
    """The CPU protocol: the harness' model and the trace's Trainer step on real CPU tensors under the trace's
    AllocationTracker (``tracing/runner.py::run_trace`` with ``fake=False``, plus an optional memory limit).
    Returns the tracker's peak by term; raises ProbeFailure on OOM (the imposed limit) or error."""
    import torch

    from ..tracing.cuda_emulation import cuda_kernel_emulation
    from ..tracing.qlora import quant_state_tensors
    from ..tracing.step import StepTracer
    from ..tracing.tracker import AllocationTracker
    from .training import build_on_device

    readings: dict = {"probe": "cpu-tracker", "device_name": platform.processor() or platform.machine()}
    tracker = AllocationTracker()
    stage = "build"
    tracer = None
    try:
        started = time.perf_counter()
        model = build_on_device(spec, resolved, torch.device("cpu"))
        tracker.register_weights(list(model.parameters()) + list(model.buffers()) + quant_state_tensors(model))
        tracer = StepTracer(model, spec, resolved, tracker)
        readings["build_seconds"] = time.perf_counter() - started
        stage = "steps"
        started = time.perf_counter()
        with torch.device("cpu"), tracker, memory_limit(tracker, memory_limit_bytes), cuda_kernel_emulation(sdpa=False):
            tracer.run(steps)
        readings["step_seconds"] = (time.perf_counter() - started) / steps
    except Exception as error:
        status = "oom" if is_out_of_memory(error) else "error"
        readings["allocated_peak_bytes"] = tracker.peak.total_bytes
        raise ProbeFailure(status, f"{type(error).__name__}: {error}", stage, readings) from error
    finally:
        if tracer is not None:
            tracer.remove_hooks()
    terms = tracker.peak_terms()
    readings["allocated_peak_bytes"] = tracker.peak.total_bytes
    readings["trace_terms"] = {term.value: int(value) for term, value in terms.items()}
    readings["trace_phase"] = tracker.peak.phase.value
    readings["paged_bytes"] = tracker.paged_bytes
    return readings


def memory_limit(tracker, limit_bytes: int | None):
    """A dispatch mode, entered inside the tracker, that raises ``torch.OutOfMemoryError`` as soon as the tracked
    live bytes exceed ``limit_bytes`` (a no-op context when there is no limit)."""
    if not limit_bytes:
        return contextlib.nullcontext()
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class _MemoryLimit(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if tracker.live_bytes > limit_bytes:
                raise torch.OutOfMemoryError(
                    f"CPU probe: {tracker.live_bytes} bytes live exceed the imposed limit of {limit_bytes} bytes"
                )
            return out

    return _MemoryLimit()
