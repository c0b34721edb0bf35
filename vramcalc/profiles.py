"""Fitted runtime profiles: the coefficients ``python -m vramcalc.calibrate`` measured for a GPU model.

A profile is ``calibration/profiles/<gpu name>.json`` (shipped in the wheel as ``vramcalc/profiles/``) holding at
least the fields of ``terms.runtime.RuntimeProfile``. Without one, the documented defaults apply and
``MemoryBreakdown.details["runtime_profile"]`` says "default".
"""

from __future__ import annotations

import functools
import json
from dataclasses import fields, replace
from pathlib import Path

from .catalogue import GpuSpec
from .terms.runtime import RuntimeProfile


def profiles_dir() -> Path:
    packaged = Path(__file__).with_name("profiles")
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "calibration" / "profiles"


@functools.lru_cache(maxsize=64)
def profile_data(name: str) -> dict | None:
    """The raw JSON of a GPU's fitted profile (coefficients, residuals, provenance), or None."""
    path = profiles_dir() / f"{name}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=64)
def _load(name: str) -> RuntimeProfile | None:
    data = profile_data(name)
    if data is None:
        return None
    known = {f.name for f in fields(RuntimeProfile)}
    values = {key: value for key, value in data.get("coefficients", data).items() if key in known}
    values["source"] = f"calibrated: {name}.json"
    return RuntimeProfile(**values)


def runtime_profile(gpu: GpuSpec | None, cuda_context_mib: int | None = None) -> RuntimeProfile:
    """The GPU's fitted profile, or the defaults (also when no GPU is named); with ``cuda_context_mib`` (the
    setup's ``--cuda-context-mib``, the context the user measured) in place of its CUDA context."""
    profile = (_load(gpu.name) if gpu is not None else None) or RuntimeProfile()
    if cuda_context_mib is None:
        return profile
    return replace(profile, cuda_context_bytes=cuda_context_mib * 2**20,
                   source=f"{profile.source}, CUDA context {cuda_context_mib} MiB given")
