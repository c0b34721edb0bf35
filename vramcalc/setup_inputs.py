"""An answer's ``inputs``: the resolved setup, every default filled in, and where each option came from."""

from __future__ import annotations

import functools

from .catalogue import GpuSpec
from .errors import VramcalcError
from .model import ModelSpec
from .training_setup import SETUP_FIELDS, ResolvedSetup


@functools.lru_cache(maxsize=4096)
def _plain_inputs(spec: ModelSpec, resolved: ResolvedSetup) -> tuple:
    """(name, plain value) of the resolved setup, every default filled in (built on first access of ``inputs``)."""
    inputs = {"model": spec.name, **resolved.setup.to_dict(), "attn_used": resolved.attn_used.value,
              "lora_modules": ",".join(resolved.lora_modules)}
    return tuple(inputs.items())


def setup_inputs(spec: ModelSpec, resolved: ResolvedSetup, device: GpuSpec | None = None) -> dict:
    """The resolved setup, every default filled in, and which options took their default (a new dict each time).
    On a named GPU the interconnect is the link the time model used, with where it came from (``cost.link_plan``)."""
    out = dict(_plain_inputs(spec, resolved))
    out["defaults"] = list(resolved.defaulted)
    out["origins"] = {name: resolved.origin(name) for name in SETUP_FIELDS}
    if device is not None:
        from .cost import interconnect_input

        try:
            out["interconnect"], out["origins"]["interconnect"] = interconnect_input(resolved.setup, device)
        except VramcalcError:  # no link figure for this GPU: the option stays as given
            pass
    return out
