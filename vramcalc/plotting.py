"""Plots of a breakdown and of a plan: stacked bars of the memory terms against the GPU's memory line.

matplotlib is imported inside each function (``pip install 'vramcalc[notebook]'``), so importing vramcalc never loads
it. Both functions draw on ``ax`` when given, else on a new figure, and return the Axes. GiB = 2^30 bytes.
"""

from __future__ import annotations

from .catalogue import GpuSpec, get_gpu
from .options import Term
from .units import BYTES_PER_GIB

TERM_COLOURS = {  # one colour per term, stable across plots (matplotlib "tab10")
    Term.WEIGHTS: "tab:blue",
    Term.GRADIENTS: "tab:orange",
    Term.OPTIMIZER_STATES: "tab:green",
    Term.ACTIVATIONS: "tab:red",
    Term.LOGITS: "tab:purple",
    Term.TEMPORARIES: "tab:brown",
    Term.RUNTIME_OVERHEAD: "tab:gray",
    Term.ALLOCATOR_SLACK: "tab:olive",
}


def _pyplot():
    try:
        import matplotlib.pyplot as pyplot
    except ImportError as err:
        raise ImportError(f"plotting needs matplotlib ({err.name} is missing): pip install 'vramcalc[notebook]'") from None
    return pyplot


def _axes(ax, width: float):
    if ax is not None:
        return ax
    _, ax = _pyplot().subplots(figsize=(width, 4.5))
    return ax


def plot_breakdown(breakdown, gpu: str | GpuSpec | None = None, ax=None):
    """One stacked bar of the breakdown's terms (GiB) and, with a GPU (given, or the breakdown's own), a dashed
    line at its memory."""
    ax = _axes(ax, 4.5)
    device = get_gpu(gpu) if gpu is not None else breakdown.gpu
    bottom = 0.0
    for term in Term:
        height = breakdown.terms_bytes[term] / BYTES_PER_GIB
        ax.bar([breakdown.model], [height], bottom=bottom, color=TERM_COLOURS[term], label=term.value)
        bottom += height
    if device is not None:
        ax.axhline(device.memory_gib, color="black", linestyle="--", label=f"{device.name} {device.memory_gib:.1f} GiB")
    ax.set_ylabel("GiB (2^30 bytes)")
    ax.set_title(f"{breakdown.model}: {breakdown.source}, peak at {breakdown.phase.value}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    return ax


def plot_plan(frame, ax=None):
    """One stacked bar per GPU type that fits (memory per GPU at the plan's count and micro-batch), each with a
    marker at that GPU's memory. ``frame`` is a ``plan()`` DataFrame."""
    rows = frame[(frame["offer"] == "gpu") & frame["fits"].fillna(False).astype(bool)]
    ax = _axes(ax, max(6.0, 0.6 * len(rows) + 3))
    labels = [f"{int(r['num_gpus'])}x {r['gpu']}\nbatch {int(r['micro_batch'])}" for _, r in rows.iterrows()]
    bottom = [0.0] * len(rows)
    for term in Term:
        heights = rows[f"{term.value}_gib"].fillna(0.0).tolist()
        ax.bar(labels, heights, bottom=bottom, color=TERM_COLOURS[term], label=term.value)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.scatter(labels, rows["gpu_memory_gib"].tolist(), marker="_", s=900, color="black", zorder=3,
               label="GPU memory")
    ax.set_ylabel("GiB per GPU (2^30 bytes)")
    if len(rows):
        ax.set_title(f"{rows['model'].iloc[0]} ({rows['method'].iloc[0]}): memory per GPU")
    else:
        ax.set_title("nothing in the catalogue fits")
    ax.tick_params(axis="x", labelrotation=60, labelsize="small")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    return ax
