"""``sweep``: peak and total device memory of a grid of setups (100,000+) at once, with numpy.

Rows are grouped by their categorical part (model, method, precision, ...) and each group's batch sizes and sequence
lengths go through ``peak_tensor_bytes_grid`` together; each row equals ``estimate()`` for that setup.
pandas and numpy (the ``plan`` extra) are imported inside the functions that use them: importing this module stays
light, and without them ``sweep()`` raises one ``VramcalcError`` naming the extra.
"""

from __future__ import annotations

from dataclasses import fields

from ..catalogue import get_gpu, get_model
from ..errors import VramcalcError
from ..estimator import peak_tensor_bytes_grid
from ..model import ModelSpec
from ..options import Method
from ..profiles import runtime_profile
from ..terms import runtime
from ..terms.optimizer import optimizer_state_bytes
from ..terms.parameters import stored_tensors
from ..training_setup import (MAX_COMPUTABLE_BYTES, METHOD_SPECIFIC_OPTIONS, ResolvedSetup, TrainingSetup,
                              options_for, oversize_error, resolve_setup, size_bound_bytes)
from ..units import BYTES_PER_GIB
from .plan_rows import require_pandas


def applicable_options(options: dict) -> dict:
    """The options that apply to the setup's method: resolve_setup rejects LoRA options with --method full and the
    like (training_setup._reject_foreign_options); a grid crossing methods with LoRA ranks drops them where foreign."""
    method = Method.parse(options.get("method") or Method.FULL, "method")
    foreign = set(METHOD_SPECIFIC_OPTIONS) - set(options_for(method))
    return {key: value for key, value in options.items() if key not in foreign}


NUMERIC_AXES = ("batch_size", "seq_len")
SWEEP_KEYS = ("model", "gpu") + tuple(field.name for field in fields(TrainingSetup))


def _grid_frame(grid):
    """A DataFrame of setups: a dict of lists is crossed (every combination), a DataFrame or list of dicts is taken
    row by row."""
    import pandas

    if isinstance(grid, pandas.DataFrame):
        frame = grid.reset_index(drop=True).copy()
    elif isinstance(grid, dict):
        if not grid:
            raise VramcalcError("a sweep needs a 'model' column; got an empty grid")
        axes = {key: list(values) if isinstance(values, (list, tuple, range)) or hasattr(values, "__array__")
                else [values] for key, values in grid.items()}
        empty = [key for key, values in axes.items() if not values]
        if empty:
            raise VramcalcError(f"sweep axis {empty[0]!r} has no values")
        frame = pandas.MultiIndex.from_product(list(axes.values()), names=list(axes)).to_frame(index=False)
    elif isinstance(grid, (list, tuple)) and all(isinstance(row, dict) for row in grid):
        frame = pandas.DataFrame(list(grid))
    else:
        raise VramcalcError(f"a sweep takes a dict of lists, a list of dicts or a DataFrame, got {type(grid).__name__}")
    unknown = [column for column in frame.columns if column not in SWEEP_KEYS]
    if unknown:
        raise VramcalcError(f"unknown sweep column {unknown[0]!r}; columns are: {', '.join(SWEEP_KEYS)}")
    if "model" not in frame.columns:
        raise VramcalcError("a sweep needs a 'model' column")
    return frame


def sweep(grid):
    """Peak and total device memory of every setup in ``grid`` (a dict of lists to cross, or a DataFrame / list of
    dicts, one setup per row), as a DataFrame: the inputs, then ``peak_tensor_bytes``, ``phase``,
    ``runtime_overhead_bytes``, ``allocator_slack_bytes``, ``total_bytes``, ``total_gib`` and, with a ``gpu`` column,
    ``gpu_memory_bytes`` and ``fits``. Each figure equals ``estimate()``'s for that setup. A setup that cannot be
    estimated gets its one-line reason in ``error`` and no figures; options foreign to a row's method are ignored."""
    pandas = require_pandas("vramcalc.sweep()")
    import numpy

    frame = _grid_frame(grid)
    size = len(frame)
    axes = {}
    for axis, default in (("batch_size", 1), ("seq_len", TrainingSetup.seq_len)):
        values = pandas.to_numeric(frame[axis].map(_float_safe), errors="coerce") if axis in frame.columns \
            else pandas.Series(numpy.full(size, default))
        axes[axis] = values.to_numpy(dtype=float, na_value=numpy.nan)
    peak = numpy.zeros(size, dtype=numpy.int64)
    overhead = numpy.zeros(size, dtype=numpy.int64)
    slack = numpy.zeros(size, dtype=numpy.int64)
    memory = numpy.zeros(size, dtype=numpy.int64)
    phase = numpy.full(size, None, dtype=object)
    error = numpy.full(size, None, dtype=object)
    valid = numpy.ones(size, dtype=bool)
    for axis, what in (("batch_size", "batch size"), ("seq_len", "sequence length")):
        bad = ~(numpy.isfinite(axes[axis]) & (axes[axis] > 0) & (numpy.mod(axes[axis], 1) == 0))
        error[bad & valid] = f"{what} must be a positive integer"
        valid &= ~bad
    keys = [c for c in frame.columns if c not in NUMERIC_AXES + ("gpu",)]
    groups = frame.groupby(keys, dropna=False, sort=False).indices
    gpu_column = frame["gpu"].to_numpy(dtype=object) if "gpu" in frame.columns else None
    for key, positions in groups.items():
        key = key if isinstance(key, tuple) else (key,)
        rows = positions[valid[positions]]
        if len(rows) == 0:
            continue
        try:
            spec, resolved, paged = _sweep_group(dict(zip(keys, key)), axes, rows)
            # rows whose byte counts could pass int64 (training_setup.size_bound_bytes) get an error, not a wrap
            bound = size_bound_bytes(spec, resolved.setup, axes["batch_size"][rows], axes["seq_len"][rows])
            over = bound >= MAX_COMPUTABLE_BYTES
            error[rows[over]] = [oversize_error(value) for value in bound[over]]
            valid[rows[over]] = False
            rows = rows[~over]
            if len(rows) == 0:
                continue
            b = axes["batch_size"][rows].astype(numpy.int64)
            s = axes["seq_len"][rows].astype(numpy.int64)
            peaks, phases, stranded = peak_tensor_bytes_grid(spec, resolved, b, s)
            names = gpu_column[rows] if gpu_column is not None else numpy.full(len(rows), None, dtype=object)
            for mask, device in _gpu_parts(names):
                where = rows[mask]
                profile = runtime_profile(device, resolved.setup.cuda_context_mib)
                peak[where] = peaks[mask]
                phase[where] = phases[mask]
                overhead[where] = runtime.runtime_overhead_bytes(profile, device, resolved.setup.num_gpus, paged)
                slack[where] = stranded[mask] + numpy.floor(profile.allocator_slack_fraction
                                                            * peaks[mask]).astype(numpy.int64)
                memory[where] = device.memory_bytes if device is not None else 0
        except VramcalcError as err:
            error[rows] = str(err)
            valid[rows] = False
    out = frame.copy()
    total = peak + overhead + slack
    for column, values in (("peak_tensor_bytes", peak), ("runtime_overhead_bytes", overhead),
                           ("allocator_slack_bytes", slack), ("total_bytes", total)):
        out[column] = pandas.array(numpy.where(valid, values, 0), dtype="Int64")
        out.loc[~valid, column] = pandas.NA
    out["phase"] = numpy.where(valid, phase, None)
    out["total_gib"] = numpy.where(valid, total / BYTES_PER_GIB, numpy.nan)
    if gpu_column is not None:
        out["gpu_memory_bytes"] = pandas.array(numpy.where(valid, memory, 0), dtype="Int64")
        out.loc[~valid, "gpu_memory_bytes"] = pandas.NA
        out["fits"] = pandas.array(numpy.where(valid, total <= memory, False), dtype="boolean")
        out.loc[~valid, "fits"] = pandas.NA
    out["error"] = error
    return out


def _float_safe(value):
    """An int too large for a float (``10**400``) becomes inf, which the positive-integer check then refuses."""
    return float("inf") if isinstance(value, int) and value.bit_length() > 1000 else value


def _gpu_parts(names):
    """(mask, GpuSpec or None) for each distinct GPU name among a group's rows (missing names: no GPU)."""
    import numpy

    missing = numpy.array([name is None or name != name for name in names], dtype=bool)
    if missing.any():
        yield missing, None
    for name in dict.fromkeys(names[~missing]):
        yield (names == name) & ~missing, get_gpu(name)


def _sweep_group(categorical: dict, axes: dict, rows) -> tuple[ModelSpec, ResolvedSetup, int]:
    """The model, resolved setup (at the group's first batch shape) and paged optimizer bytes of one group."""
    model = categorical.pop("model")
    if model is None or model != model:
        raise VramcalcError("model is missing")
    options = {key: value for key, value in categorical.items() if value is not None and value == value}
    options = applicable_options(options)
    spec = get_model(model)
    first = rows[(axes["batch_size"][rows] * axes["seq_len"][rows]).argmin()]  # the smallest shape: always computable
    resolved = resolve_setup(spec, batch_size=int(axes["batch_size"][first]), seq_len=int(axes["seq_len"][first]),
                             **options)
    paged = optimizer_state_bytes(stored_tensors(spec, resolved), resolved.setup.optimizer).paged_bytes
    return spec, resolved, paged
