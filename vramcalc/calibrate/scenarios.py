"""Calibration scenarios: what to measure, in which order, and the files that list them.

A scenario is a model plus the setup options of ``vramcalc.estimate`` (anything left out takes the estimate's
default). Its ``id`` is derived from the resolved setup, so the same setup has the same id in every run: the CSV
records are keyed by it and ``--resume`` skips ids already recorded.

The default grid (``default_grid``) crosses ``RECIPES`` (model x method x precision x optimizer x checkpointing x
attention, chosen so that every value of every axis appears on several models) with up to three batch shapes per
recipe, small, medium and large, taken from ``SHAPE_LADDER``: the large one is the largest whose estimated total
stays under ``MEMORY_FILL_FRACTION`` of the device's free memory and whose step stays under
``STEP_FLOP_BUDGET``. ``order_for_budget`` then orders them so that any prefix spans the space.

Scenario files (``--scenarios FILE``): CSV with a header, or JSON, documented in ``calibration/README.md``.
"""

from __future__ import annotations

import csv
import functools
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..catalogue import get_model
from ..errors import VramcalcError
from ..hf_config import spec_from_config
from ..model import ModelSpec
from ..training_setup import ResolvedSetup, TrainingSetup, resolve_setup

HARNESS_MODELS_DIR = Path(__file__).with_name("models")
SETUP_OPTIONS = tuple(f.name for f in fields(TrainingSetup))
# One GPU per run: the harness measures single-device steps (NCCL keeps its documented default).
SINGLE_GPU_OPTIONS = {"num_gpus": 1, "sharding": "none"}
MEMORY_FILL_FRACTION = 0.80  # the largest scenario's estimated total, as a fraction of free device memory
STEP_FLOP_BUDGET = 4e14  # 6·N·T per step: about a second on an H100/H200 (bf16 ~400 TFLOP/s achieved)
CPU_MEMORY_CAP_BYTES = 256 * 2**20  # CPU mode runs toy models; no scenario may need more than this
SIZES = ("small", "medium", "large")


@dataclass(frozen=True)
class Scenario:
    """One measured training step: ``model`` (catalogue name, harness model or config path) and setup options."""

    model: str
    options: dict = field(default_factory=dict)  # TrainingSetup field -> value as given (str, int, bool)
    size: str = ""  # small | medium | large for the default grid; "" for custom scenarios
    id: str = ""

    def __post_init__(self) -> None:
        unknown = [key for key in self.options if key not in SETUP_OPTIONS]
        if unknown:
            raise VramcalcError(f"scenario option {unknown[0]!r} is not a setup option; options: {', '.join(SETUP_OPTIONS)}")
        for key, allowed in SINGLE_GPU_OPTIONS.items():
            value = self.options.get(key)
            if value not in (None, "") and str(value).lower() != str(allowed):
                raise VramcalcError(f"the harness measures one GPU: scenario option {key}={value!r} is not supported")
        spec, resolved = resolve(self)  # a bad model or option fails here, naming it
        if resolved.setup.task.value == "classify":
            raise VramcalcError("the harness measures the causal LM's training step: an encoder's --task classify "
                                "(BERT) is estimated and traced, not measured here")
        if not self.id:
            object.__setattr__(self, "id", scenario_id(spec, resolved))

    def to_dict(self) -> dict:
        return {"id": self.id, "model": self.model, "size": self.size, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, data: dict) -> "Scenario":
        return cls(model=data["model"], options=dict(data.get("options", {})), size=data.get("size", ""),
                   id=data.get("id", ""))


# -- models --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def harness_model(name: str) -> ModelSpec:
    """A catalogue model, a config path, or one of the harness' own configs (``calibrate/models/<name>.json``:
    HF ``config.json`` fields of real architectures, some scaled down)."""
    own = HARNESS_MODELS_DIR / f"{name}.json"
    if own.is_file():
        return spec_from_config(json.loads(own.read_text(encoding="utf-8")), name=name)
    return get_model(name)


# The options ``scenario_id`` always writes; every other option appears in the id when it is not the default.
ID_OPTIONS = ("method", "precision", "optimizer", "grad_ckpt", "attn", "batch_size", "seq_len")


def row_options(row: dict[str, str]) -> dict[str, str]:
    """The options of a measured row's setup, from its cells: the options the scenario id always names, and every
    other option whose cell differs from the default as the record file writes it (``records._cell``). Options the
    scenario left at their defaults stay out, so that method-specific cells of other methods (lora_rank on a full
    fine-tuning row) and defaults that depend on other options (kbit_prep's checkpointing) resolve as measured."""
    from ..training_setup import SETUP_FIELDS, setup_defaults
    from .records import _cell

    defaults = {name: _cell(value) for name, value in setup_defaults().items()}
    return {name: row[name] for name in SETUP_FIELDS
            if name in ID_OPTIONS or row.get(name, defaults[name]) != defaults[name]}


def row_scenario(row: dict[str, str]) -> Scenario:
    """The scenario a measured row ran, rebuilt from its cells (``row_options``) with the LoRA targets the run
    adapted (``as_measured``); ValueError when the rebuilt scenario's id is not the one the row recorded."""
    scenario = Scenario(model=row["model"], options=row_options(row))
    if scenario.id != row["scenario_id"]:
        raise ValueError(f"rebuilt {scenario.id!r} from the cells of {row['scenario_id']!r}")
    return as_measured(scenario, row)


def resolve(scenario: Scenario) -> tuple[ModelSpec, ResolvedSetup]:
    """The scenario's model and resolved setup (VramcalcError for bad values)."""
    spec = harness_model(scenario.model)
    options = {key: value for key, value in scenario.options.items() if value not in (None, "")}
    return spec, resolve_setup(spec, **options)


def as_measured(scenario: Scenario, row: dict) -> Scenario:
    """The scenario with the LoRA targets its measured run really adapted (the row's ``lora_modules``), same id.

    A row is judged on what ran: when vramcalc's resolution of a target spelling changes after a run (5b8b22d: LoRA
    ``all-linear`` on the MoE families peft 0.21 converts now reaches the fused experts and the router, as peft
    resolves the string), re-resolving the recorded ``lora_targets`` would estimate another model than the one
    measured."""
    modules = row.get("lora_modules") or ""
    if not modules:
        return scenario
    return Scenario(model=scenario.model, options={**scenario.options, "lora_targets": modules}, size=scenario.size,
                    id=scenario.id)


def scenario_id(spec: ModelSpec, resolved: ResolvedSetup) -> str:
    """``model/method/precision/optimizer/ckpt|nockpt/attn/b{b}s{s}`` plus ``/key=value`` for every other option
    that differs from TrainingSetup's default."""
    setup = resolved.setup
    parts = [spec.name, setup.method.value, setup.precision.value, setup.optimizer.value,
             "ckpt" if setup.grad_ckpt else "nockpt", setup.attn.value, f"b{setup.batch_size}s{setup.seq_len}"]
    defaults = TrainingSetup().to_dict()
    values = setup.to_dict()
    for key in SETUP_OPTIONS:
        if key not in ID_OPTIONS and values[key] != defaults[key]:
            parts.append(f"{key}={values[key]}")
    return "/".join(parts)


# -- files ---------------------------------------------------------------------------------------------
def load_scenarios(path: str | Path) -> list[Scenario]:
    """Scenarios from a CSV (header: ``model`` and any setup options, optional ``id``; empty cell = default) or
    a JSON file (a list of objects, or ``{"scenarios": [...]}``; each ``{"model": ..., "options": {...}}`` or
    flat ``{"model": ..., "batch_size": ...}``). Raises VramcalcError naming the bad entry."""
    path = Path(path)
    if not path.is_file():
        raise VramcalcError(f"no scenario file at {str(path)!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise VramcalcError(f"cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise VramcalcError(f"{path} is not UTF-8 text (byte {err.start})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as err:
            raise VramcalcError(f"{path} is not valid JSON: {str(err) or 'nested too deeply'}") from None
        entries = data.get("scenarios", []) if isinstance(data, dict) else data
        if not isinstance(entries, list):
            raise VramcalcError(f"{path}: expected a list of scenarios, got {type(entries).__name__}")
        where = [f"{path} entry {i + 1}" for i in range(len(entries))]
    else:
        try:
            entries = list(csv.DictReader(line for line in text.splitlines() if not line.lstrip().startswith("#")))
        except csv.Error as err:
            raise VramcalcError(f"{path} is not a valid CSV: {err}") from None
        where = [f"{path} row {i + 2}" for i in range(len(entries))]
    scenarios = []
    for entry, place in zip(entries, where):
        scenarios.append(_scenario_from_entry(entry, place))
    if not scenarios:
        raise VramcalcError(f"{path} lists no scenarios")
    _reject_duplicates(scenarios)
    return scenarios


def _scenario_from_entry(entry, place: str) -> Scenario:
    if not isinstance(entry, dict) or not str(entry.get("model") or "").strip():
        raise VramcalcError(f"{place}: a scenario needs a 'model'")
    if not isinstance(entry.get("options") or {}, dict):
        raise VramcalcError(f"{place}: 'options' must be an object of setup options")
    options = dict(entry.get("options") or {})
    for key, value in entry.items():
        if key in ("model", "id", "size", "options") or key.startswith("_"):
            continue
        options[key] = value
    options = {key: _cell(value) for key, value in options.items() if _cell(value) is not None}
    try:
        return Scenario(model=str(entry["model"]).strip(), options=options, size=str(entry.get("size") or ""),
                        id=str(entry.get("id") or "").strip())
    except (ValueError, TypeError, OverflowError) as err:  # VramcalcError is a ValueError
        raise VramcalcError(f"{place}: {err}") from None


def _cell(value):
    """CSV cells arrive as text: empty means default; JSON values pass through."""
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return value


def _reject_duplicates(scenarios: list[Scenario]) -> None:
    seen = set()
    for scenario in scenarios:
        if scenario.id in seen:
            raise VramcalcError(f"scenario {scenario.id!r} appears twice")
        seen.add(scenario.id)


def save_scenarios(path: str | Path, scenarios: list[Scenario]) -> None:
    """The run's grid, in order, as JSON (``--resume`` reads it back, so a resumed run measures the same grid);
    written atomically, so a failure (full disk, read-only folder) leaves the old file or none, in one error line."""
    from ..files import write_atomic

    write_atomic(path, json.dumps({"scenarios": [s.to_dict() for s in scenarios]}, indent=1) + "\n")


# -- the default grid ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """One point of the setup space, with the model it runs on for each device kind."""

    cuda_model: str
    cpu_model: str
    method: str
    precision: str
    optimizer: str
    grad_ckpt: bool
    attn: str
    lora_targets: str = ""


# Every method, precision, optimizer, checkpointing and attention value appears on at least three models; three
# architectures (llama: SmolLM2, TinyLlama, Llama-3.1; qwen3; qwen3_moe) with random weights, from config.
RECIPES: tuple[Recipe, ...] = (
    Recipe("smollm2-135m", "tiny-llama", "full", "bf16", "adamw", False, "sdpa"),
    Recipe("smollm2-135m", "tiny-llama", "full", "mixed-bf16", "adamw", True, "eager"),
    Recipe("smollm2-360m", "tiny-llama", "lora", "bf16", "adamw", False, "sdpa"),
    Recipe("smollm2-360m", "tiny-llama", "qlora", "bf16", "paged-adamw", True, "sdpa"),
    Recipe("tinyllama-1.1b", "tiny-llama", "full", "bf16", "adamw-8bit", True, "sdpa"),
    Recipe("tinyllama-1.1b", "tiny-llama", "lora", "mixed-bf16", "adamw", False, "eager", "all-linear"),
    Recipe("tinyllama-1.1b", "tiny-llama", "qlora", "mixed-bf16", "paged-adamw-8bit", False, "sdpa"),
    Recipe("qwen3-0.6b", "tiny-qwen3", "full", "mixed-bf16", "adamw-8bit", False, "sdpa"),
    Recipe("qwen3-0.6b", "tiny-qwen3", "lora", "bf16", "paged-adamw", True, "eager"),
    Recipe("qwen3-0.6b", "tiny-qwen3", "qlora", "bf16", "adamw", False, "eager", "all-linear"),
    Recipe("qwen3-moe-mini", "tiny-qwen3-moe", "full", "bf16", "adamw", True, "sdpa"),
    # bf16, not mixed: fp32 expert weights make transformers' grouped_mm experts fail (torch's grouped_mm takes bf16)
    Recipe("qwen3-moe-mini", "tiny-qwen3-moe", "lora", "bf16", "adamw-8bit", False, "sdpa", "all-linear"),
    Recipe("qwen3-moe-mini", "tiny-qwen3-moe", "qlora", "bf16", "paged-adamw-8bit", True, "eager"),
    Recipe("llama-3.1-8b", "tiny-qwen3", "full", "bf16", "adamw", False, "sdpa"),
    Recipe("llama-3.1-8b", "tiny-qwen3", "lora", "bf16", "adamw", False, "sdpa"),
    Recipe("llama-3.1-8b", "tiny-qwen3", "qlora", "bf16", "paged-adamw", True, "sdpa"),
)

# (batch size, sequence length), growing in tokens; batch and sequence alternate so both axes vary.
SHAPE_LADDER = {
    "cuda": ((1, 256), (2, 512), (1, 2048), (4, 1024), (2, 4096), (8, 2048), (4, 8192), (16, 4096), (8, 8192),
             (16, 8192)),
    "cpu": ((1, 32), (2, 64), (4, 128)),
}


def recipe_options(recipe: Recipe, batch_size: int, seq_len: int) -> dict:
    options = {"method": recipe.method, "precision": recipe.precision, "optimizer": recipe.optimizer,
               "grad_ckpt": recipe.grad_ckpt, "attn": recipe.attn, "batch_size": batch_size, "seq_len": seq_len}
    if recipe.lora_targets:
        options["lora_targets"] = recipe.lora_targets
    return options


def default_grid(device_kind: str, free_bytes: int, gpu: str | None = None) -> list[Scenario]:
    """Every recipe at up to three shapes that fit ``MEMORY_FILL_FRACTION`` of ``free_bytes`` (by the estimate,
    with ``gpu``'s runtime profile; on the CPU also under ``CPU_MEMORY_CAP_BYTES``) and ``STEP_FLOP_BUDGET``, in
    budget order."""
    from ..estimator import estimate

    if device_kind not in SHAPE_LADDER:
        raise VramcalcError(f"unknown device kind {device_kind!r}; choose cuda or cpu")
    cap_bytes = int(MEMORY_FILL_FRACTION * free_bytes)
    if device_kind == "cpu":
        cap_bytes = min(cap_bytes, CPU_MEMORY_CAP_BYTES)
    scenarios = []
    for recipe in RECIPES:
        model = recipe.cuda_model if device_kind == "cuda" else recipe.cpu_model
        spec = harness_model(model)
        fitting = []
        for batch_size, seq_len in SHAPE_LADDER[device_kind]:
            options = recipe_options(recipe, batch_size, seq_len)
            if step_flops(spec, batch_size * seq_len) > STEP_FLOP_BUDGET:
                continue
            if _needed_bytes(estimate(spec, gpu=gpu, **options), device_kind) > cap_bytes:
                continue
            fitting.append(options)
        for size, options in zip(SIZES, pick_sizes(fitting)):
            scenarios.append(Scenario(model=model, options=options, size=size))
    unique = list({s.id: s for s in scenarios}.values())
    return order_for_budget(unique)


def _needed_bytes(breakdown, device_kind: str) -> int:
    """What the device must hold: the estimated total on a GPU; the tensors alone on the CPU (no CUDA runtime)."""
    return breakdown.total_bytes if device_kind == "cuda" else breakdown.peak_tensor_bytes


def pick_sizes(fitting: list) -> list:
    """Small (the first), large (the last) and medium (the middle) of the shapes that fit, without repeats."""
    if len(fitting) <= 3:
        return list(fitting)
    return [fitting[0], fitting[len(fitting) // 2], fitting[-1]]


def step_flops(spec: ModelSpec, tokens: int) -> float:
    """6·N·T: forward and backward matmul FLOPs of one step over the active parameters (Kaplan et al. 2020)."""
    return 6.0 * spec.active_params * tokens


def scenario_axes(scenario: Scenario) -> dict[str, str]:
    """The values that ``order_for_budget`` spreads: model, method, precision, optimizer, ckpt, attention, size."""
    spec, resolved = resolve(scenario)
    setup = resolved.setup
    return {"model": spec.name, "family": spec.family, "method": setup.method.value,
            "precision": setup.precision.value, "optimizer": setup.optimizer.value,
            "grad_ckpt": str(setup.grad_ckpt), "attn": setup.attn.value, "size": scenario.size or "custom"}


def order_for_budget(scenarios: list[Scenario]) -> list[Scenario]:
    """Greedy spread: each next scenario is the one whose axis values, and pairs of values, have been seen least
    so far (score = sum of 1/(1 + times seen)); ties go to the smaller, then to the id. Any prefix of the order
    covers every value of every axis as early as possible, so a short budget still spans the space."""
    axes = {s.id: scenario_axes(s) for s in scenarios}
    seen: dict[tuple, int] = {}
    remaining = list(scenarios)
    ordered = []

    def keys(scenario):
        values = sorted(axes[scenario.id].items())
        singles = [(name, value) for name, value in values]
        pairs = [(a, b) for i, a in enumerate(singles) for b in singles[i + 1:]]
        return singles, pairs

    def score(scenario):
        singles, pairs = keys(scenario)
        return (sum(1.0 / (1 + seen.get(k, 0)) for k in singles)
                + 0.25 * sum(1.0 / (1 + seen.get(k, 0)) for k in pairs))

    size_rank = {"small": 0, "medium": 1, "large": 2}
    while remaining:
        best = min(remaining, key=lambda s: (-round(score(s), 9), size_rank.get(s.size, 1), s.id))
        remaining.remove(best)
        ordered.append(best)
        singles, pairs = keys(best)
        for k in singles + pairs:
            seen[k] = seen.get(k, 0) + 1
    return ordered


def expected_seconds(scenario: Scenario, device_kind: str, overhead_s: float, steps: int) -> float:
    """Wall time of one scenario: process start, imports and build (``overhead_s``, learnt from the run) plus
    ``steps`` steps of 6·N·T FLOPs (8·N·T under checkpointing) at a nominal rate per device kind."""
    spec, resolved = resolve(scenario)
    setup = resolved.setup
    flops = step_flops(spec, setup.tokens) * (4 / 3 if setup.grad_ckpt else 1.0) * setup.grad_accum
    return overhead_s + steps * flops / NOMINAL_FLOP_PER_S[device_kind]


NOMINAL_FLOP_PER_S = {"cuda": 2e14, "cpu": 2e10}  # achieved, not peak: a planning figure for budget ordering
