"""MemoryBreakdown: the one answer type of estimate, trace and calibrate.

Terms are integer bytes at the moment of the step that holds the peak. ``peak_tensor_bytes`` is every term but
``runtime_overhead`` and ``allocator_slack`` (what ``torch.cuda.max_memory_allocated`` sees); ``total_bytes`` is all
of them (what the device must hold).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .catalogue import GpuSpec, get_gpu
from .options import Phase, Term
from .units import gib

GIB_NOTE = "GiB = 2^30 bytes"
RESERVED_LABEL = "reserved (caching-allocator replay)"  # trace(..., reserved=True): tracing/reserved.py
BYTES_PER_MIB = 2**20
_TERMS = tuple(Term)


def _term_order(terms_bytes: dict) -> tuple:
    """The terms of a breakdown, in order: ``Term`` for training; a serving breakdown is keyed by its own str enum
    (``serving.terms.InferenceTerm``, with ``is_tensor``), whose members are then the terms."""
    for key in terms_bytes:
        return _TERMS if key.__class__ is Term else tuple(key.__class__)
    return _TERMS


@dataclass(frozen=True)
class MemoryBreakdown:
    model: str
    terms_bytes: dict  # Term -> int, every term present
    phase: Phase
    # the resolved setup, every default filled in (``inputs``); a zero-argument function that builds it is taken too,
    # and called on first access
    inputs_or_builder: object
    source: str = "estimate"  # estimate | trace | measured
    gpu: GpuSpec | None = None
    warnings: tuple[str, ...] = ()
    details: dict = field(default_factory=dict)  # extra figures (parameter counts, paged optimizer bytes, ...)

    def __post_init__(self) -> None:
        terms = self.terms_bytes
        order = _term_order(terms)
        object.__setattr__(self, "_term_order", order)
        for term in order:
            value = terms.get(term)
            if value.__class__ is not int and not isinstance(value, int) or value < 0:
                raise ValueError(f"term {term.value} must be a non-negative integer of bytes, got {value!r}")

    def __eq__(self, other: object) -> bool:
        """Equal answers: same figures, setup and provenance (``inputs`` compared as built, not as a builder)."""
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._compared() == other._compared()

    def _compared(self) -> tuple:
        return (self.model, self.terms_bytes, self.phase, self.inputs, self.source, self.gpu, self.warnings,
                self.details)

    @property
    def inputs(self) -> dict:
        """The resolved setup, every default filled in."""
        value = self.inputs_or_builder
        if callable(value):
            value = value()
            object.__setattr__(self, "inputs_or_builder", value)
        return value

    # -- figures -------------------------------------------------------------------------------------
    def terms(self) -> dict[str, int]:
        """Term name -> bytes, in the canonical order; they sum to ``total_bytes``."""
        return {term.value: self.terms_bytes[term] for term in self._term_order}

    @property
    def total_bytes(self) -> int:
        return sum(self.terms_bytes[term] for term in self._term_order)

    @property
    def peak_tensor_bytes(self) -> int:
        return sum(self.terms_bytes[term] for term in self._term_order if term.is_tensor)

    @property
    def total_gib(self) -> float:
        return gib(self.total_bytes)

    @property
    def reserved_bytes(self) -> int:
        """What ``torch.cuda.max_memory_reserved`` reads while the GPU has room: the tensor peak, the allocator slack
        and, under FSDP, the blocks its own streams keep cached beyond the peak (``details["stream_pools_bytes"]``,
        ``terms.runtime.stream_pool_bytes``: released before a ``cudaMalloc`` fails, so not in ``total_bytes``) and,
        given the dataset's sample lengths, the shorter steps' loss blocks (``details["length_ladders_bytes"]``,
        ``sample_lengths``: whole free segments, likewise released)."""
        return (self.peak_tensor_bytes + self.terms_bytes[Term.ALLOCATOR_SLACK] + self.details.get("stream_pools_bytes", 0)
                + self.details.get("length_ladders_bytes", 0))

    def headroom_bytes(self, gpu: str | GpuSpec | None = None) -> int:
        """Device memory left at the peak (negative: short by that much)."""
        device = self._gpu(gpu)
        return device.memory_bytes - self.total_bytes

    def fits(self, gpu: str | GpuSpec | None = None) -> bool:
        """Whether the step's peak fits the GPU's memory as the driver reports it."""
        return self.headroom_bytes(gpu) >= 0

    def _gpu(self, gpu: str | GpuSpec | None) -> GpuSpec:
        if gpu is None:
            if self.gpu is None:
                raise ValueError("no GPU given: pass one, e.g. fits('h100-sxm')")
            return self.gpu
        return get_gpu(gpu)

    # -- output --------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {
            "model": self.model,
            "source": self.source,
            "total_bytes": self.total_bytes,
            "peak_tensor_bytes": self.peak_tensor_bytes,
            "phase": self.phase.value,
            "terms": self.terms(),
            "inputs": dict(self.inputs),
        }
        if self.gpu is not None:
            out["gpu"] = {
                "name": self.gpu.name,
                "memory_bytes": self.gpu.memory_bytes,
                "fits": self.fits(),
                "headroom_bytes": self.headroom_bytes(),
            }
        if self.details:
            out["details"] = dict(self.details)
        if self.warnings:
            out["warnings"] = list(self.warnings)
        return out

    def rows(self) -> list[tuple[str, int]]:
        """(label, bytes) for each term, then the two totals."""
        rows = list(self.terms().items())
        rows.append(("peak_tensor_bytes", self.peak_tensor_bytes))
        rows.append(("total", self.total_bytes))
        return rows

    def to_dataframe(self):
        """A pandas DataFrame of the terms (pandas is imported only here)."""
        try:
            import pandas as pd
        except ModuleNotFoundError:
            raise ImportError("to_dataframe needs pandas: pip install 'vramcalc[plan]'") from None

        frame = pd.DataFrame(self.rows(), columns=["term", "bytes"])
        frame["gib"] = frame["bytes"].map(gib)
        return frame.set_index("term")

    def table(self) -> str:
        """A plain-text table in GiB with two decimals."""
        width = max(len(label) for label, _ in self.rows())
        if "reserved_peak_bytes" in self.details:  # its line aligns with the terms
            width = max(width, len(RESERVED_LABEL))
        lines = [f"{self.model}: {self.source}, peak at {self.phase.value}"]
        for label, value in self.rows():
            if label == "peak_tensor_bytes":
                lines.append("-" * (width + 12))
            lines.append(f"{label:<{width}}  {gib(value):>9.2f} GiB")
            if label == "activations" and "vision_activations_bytes" in self.details:  # a VLM (terms/vision.py)
                vision = self.details["vision_activations_bytes"]
                lines.append(f"{'  vision tower':<{width}}  {gib(vision):>9.2f} GiB")
        if "stream_pools_bytes" in self.details:  # FSDP's own streams (terms/runtime.py stream_pool_bytes)
            lines.append(f"FSDP's streams keep {gib(self.details['stream_pools_bytes']):.2f} GiB more cached while the "
                         f"GPU has room (max_memory_reserved {gib(self.reserved_bytes):.2f} GiB, the CUDA context "
                         "aside); freed before an out-of-memory")
        if "longest_step_tokens" in self.details:  # estimate(..., sample_lengths=...): sample_lengths.py
            d = self.details
            lines.append(f"longest step {d['longest_step_tokens']:,} tokens ({d['share_of_steps_at_longest']:.1%} of "
                         f"{d['steps_per_epoch']:,} steps an epoch); about {d['expected_later_records']:.1f} "
                         "steps longer than every earlier one")
            if "length_ladders_bytes" in d:
                lines.append(f"their loss blocks keep {gib(d['length_ladders_bytes']):.2f} GiB more cached on average "
                             f"(max_memory_reserved {gib(self.reserved_bytes):.2f} GiB, the CUDA context aside); "
                             "freed before an out-of-memory")
        if "reserved_peak_bytes" in self.details:  # trace(..., reserved=True): tracing/reserved.py
            lines += self._reserved_lines(width)
        if "image_tokens_per_sample" in self.details:
            lines.append(f"image tokens per sample: {self.details['image_tokens_per_sample']:,} (part of --seq-len)")
        if self.gpu is not None:
            verdict = "fits" if self.fits() else "does not fit"
            lines.append(
                f"{self.gpu.name} ({self.gpu.memory_gib:.2f} GiB): {verdict}, headroom {gib(self.headroom_bytes()):.2f} GiB"
            )
        for gpu in self.details.get("device_map_gpus", ()):  # --device-map auto: every GPU's tensor peak
            lines.append(f"GPU {gpu['gpu']}: {gpu['layers']} layers, tensors {gib(gpu['peak_tensor_bytes']):.2f} GiB "
                         f"at {gpu['phase']}")
        lines.append(f"({GIB_NOTE})")
        lines += [f"warning: {text}" for text in self.warnings]
        return "\n".join(lines)

    def _reserved_lines(self, width: int) -> list[str]:
        """The caching-allocator replay's ``max_memory_reserved``, and the slack model's figure for the same thing:
        ``peak_tensor + allocator_slack`` + the cuBLAS workspace the replay allocated."""
        d = self.details
        slack_model = self.reserved_bytes + d["reserved_workspace_bytes"]
        return [
            f"{RESERVED_LABEL:<{width}}  {gib(d['reserved_peak_bytes']):>9.2f} GiB",
            f"  replay: {d['reserved_replay_warmup_steps']} warm-up + {d['reserved_replay_measured_steps']} measured "
            f"steps after empty_cache (baseline {gib(d['reserved_baseline_bytes']):.2f} GiB), cuBLAS workspace "
            f"{d['reserved_workspace_bytes'] / BYTES_PER_MIB:.1f} MiB "
            f"(runtime profile: {d['reserved_workspace_source']})",
            f"  slack model beside it: peak_tensor + allocator_slack + workspace"
            f"{' + FSDP streams' if 'stream_pools_bytes' in d else ''} = {gib(slack_model):.2f} GiB",
        ]

    def __str__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        cells = "".join(
            f"<tr><td>{label}</td><td style='text-align:right'>{gib(value):,.2f}</td>"
            f"<td style='text-align:right'>{value:,}</td></tr>"
            for label, value in self.rows()
        )
        caption = f"{self.model}: {self.source}, peak at {self.phase.value} ({GIB_NOTE})"
        if self.gpu is not None:
            caption += f"; {self.gpu.name}: {'fits' if self.fits() else 'does not fit'}"
        return (
            f"<table><caption>{caption}</caption><tr><th>term</th><th>GiB</th><th>bytes</th></tr>{cells}</table>"
        )

    def plot(self, gpu: str | GpuSpec | None = None, ax=None):
        """A stacked bar of the terms against the GPU's memory line (matplotlib, imported only here)."""
        from .plotting import plot_breakdown

        return plot_breakdown(self, gpu=gpu, ax=ax)
