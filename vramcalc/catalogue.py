"""The model and GPU catalogues: ``data/models.csv`` and ``data/gpus.csv``, read lazily and once.

In the wheel the CSVs live in ``vramcalc/data/``; in a source checkout, in ``data/`` at the repository root.
Names are matched case-insensitively; a model can also be named by its Hugging Face repo id, or by a path to a
``config.json`` (or a folder holding one). A GPU can also be named as ``nvidia-smi`` and
``torch.cuda.get_device_name()`` print it ("NVIDIA H100 80GB HBM3") or by a common spelling ("H100 SXM5"): the
``aliases`` column of ``data/gpus.csv`` lists them, each with its source in ``data/gpus_sources.md``.
"""

from __future__ import annotations

import csv
import functools
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import VramcalcError, closest_names, short_repr, unknown_name_error
from .model import ModelSpec, default_layer_types
from .units import BYTES_PER_GIB


def data_dir() -> Path:
    """Where the catalogue CSVs are: inside the installed package, else the source checkout's ``data/``."""
    packaged = Path(__file__).with_name("data")
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "data"


def _read_csv(file_name: str) -> list[dict[str, str]]:
    with open(data_dir() / file_name, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _int(cell: str) -> int | None:
    cell = (cell or "").strip()
    return int(float(cell)) if cell else None


def _float(cell: str) -> float | None:
    cell = (cell or "").strip()
    return float(cell) if cell else None


def _bool(cell: str) -> bool:
    return (cell or "").strip().lower() in ("true", "1", "yes")


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator as the catalogue describes it. Unknown figures are ``None``, never 0."""

    name: str
    display_name: str
    vendor: str
    architecture: str
    compute_capability: str
    memory_bytes: int  # as the driver reports it (nvidia-smi total MiB x 2^20)
    bandwidth_gb_s: float | None
    bf16_dense_tflops: float | None
    fp16_dense_tflops: float | None
    fp8_dense_tflops: float | None
    fp32_tflops: float | None
    supports_bf16: bool
    tdp_w: float | None
    list_price_usd: float | None
    cloud_usd_per_gpu_hour: float | None
    cloud_price_date: str
    cloud_price_basis: str
    source: str
    notes: str = ""
    nvlink_bidir_gb_s: float | None = None  # NVLink (AMD: Infinity Fabric) per GPU, both directions, as vendors quote
    pcie_gb_s: float | None = None  # the GPU's PCIe x16 link, per direction
    infiniband_gb_s: float | None = None  # scale-out network per GPU and direction in its reference node (HGX/DGX)
    interconnect_source: str = ""
    aliases: tuple[str, ...] = ()  # device names (nvidia-smi, torch) and common spellings that mean this GPU
    memory_type: str = ""  # HBM2, HBM2e, HBM3, HBM3e, GDDR6, GDDR6X, GDDR7 (step_time.memory_family groups them)

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / BYTES_PER_GIB


@functools.cache
def _hybrid_layers() -> dict[str, dict]:
    """``data/hybrid_layers.csv``: the per-layer fields of the catalogue models whose layers differ, by name, each row
    with its source, under their config.json names, space-separated: ``layer_types`` (an LFM2 hybrid's "conv" and
    "full_attention"; gpt-oss's "sliding_attention" and "full_attention"; Llama-4's "chunked_attention" and
    "full_attention"), the short convolution's width ``conv_L_cache`` (LFM2) and ``no_rope_layers`` (Llama-4: 0 for a
    layer without RoPE, read as ``ModelSpec.nope_layers`` the way ``hf_config`` reads it)."""
    return {row["name"]: {"layer_types": tuple(row["layer_types"].split()),
                          "conv_kernel": _int(row["conv_L_cache"]) or 0,
                          "nope_layers": tuple(i for i, use_rope in enumerate((row.get("no_rope_layers") or "").split())
                                               if not int(use_rope))}
            for row in _read_csv("hybrid_layers.csv")}


def _encoder_fields(family: str) -> dict:
    """An encoder's token-type rows, dropouts and labels (no catalogue columns): its config class's defaults."""
    from .model import FAMILIES

    if not FAMILIES.get(family) or not FAMILIES[family].encoder:
        return {}
    from .hf_config import ENCODER_DEFAULTS

    return dict(ENCODER_DEFAULTS)


@functools.cache
def _model_rows() -> dict[str, ModelSpec]:
    models = {}
    for row in _read_csv("models.csv"):
        spec = ModelSpec(
            name=row["name"],
            family=row["family"],
            hidden_size=_int(row["hidden_size"]),
            num_layers=_int(row["num_layers"]),
            num_heads=_int(row["num_heads"]),
            num_kv_heads=_int(row["num_kv_heads"]),
            head_dim=_int(row["head_dim"]),
            intermediate_size=_int(row["intermediate_size"]),
            vocab_size=_int(row["vocab_size"]),
            tie_word_embeddings=_bool(row["tie_word_embeddings"]),
            max_position_embeddings=_int(row["max_position_embeddings"]),
            qkv_bias=_bool(row["qkv_bias"]),
            o_bias=_bool(row["o_bias"]),
            mlp_bias=_bool(row["mlp_bias"]),
            qk_norm=_bool(row["qk_norm"]),
            sliding_window=_int(row["sliding_window"]),
            num_experts=_int(row["num_experts"]) or 0,
            experts_per_token=_int(row["experts_per_token"]) or 0,
            moe_intermediate_size=_int(row["moe_intermediate_size"]) or 0,
            n_shared_experts=_int(row["n_shared_experts"]) or 0,
            first_k_dense_replace=_int(row["first_k_dense_replace"]) or 0,
            decoder_sparse_step=_int(row["decoder_sparse_step"]) or 1,
            q_lora_rank=_int(row["q_lora_rank"]) or 0,
            kv_lora_rank=_int(row["kv_lora_rank"]) or 0,
            qk_nope_head_dim=_int(row["qk_nope_head_dim"]) or 0,
            qk_rope_head_dim=_int(row["qk_rope_head_dim"]) or 0,
            v_head_dim=_int(row["v_head_dim"]) or 0,
            rotary_dim=_int(row.get("rotary_dim")) or 0,  # partial rotary (phi); empty: all of head_dim
            new_decoder_architecture=_bool(row.get("new_decoder_architecture")),  # falcon's layout
            # gemma3_text, cohere2: the config class's sliding/full pattern (the catalogue has no layer_types column);
            # a hybrid's attention and convolution layers, gpt-oss's and Llama-4's layer kinds: data/hybrid_layers.csv
            layer_types=_hybrid_layers().get(row["name"], {}).get("layer_types")
            or default_layer_types(row["family"], _int(row["num_layers"])),
            conv_kernel=_hybrid_layers().get(row["name"], {}).get("conv_kernel", 0),
            nope_layers=_hybrid_layers().get(row["name"], {}).get("nope_layers", ()),
            hf_repo=row["hf_repo"],
            license=row["license"],
            source=row["source"],
            params_published=_int(row["params_published"]),
            active_params_published=_int(row["active_params_published"]),
            params_exact=_int(row["params_exact"]),
            notes=row["notes"],
            **_encoder_fields(row["family"]),
        )
        models[spec.name] = spec
    return models


@functools.cache
def _gpu_rows() -> dict[str, GpuSpec]:
    gpus = {}
    for row in _read_csv("gpus.csv"):
        gpu = GpuSpec(
            name=row["name"],
            display_name=row["display_name"],
            vendor=row["vendor"],
            architecture=row["architecture"],
            compute_capability=row["compute_capability"],
            memory_bytes=_int(row["memory_bytes"]),
            bandwidth_gb_s=_float(row["bandwidth_gb_s"]),
            bf16_dense_tflops=_float(row["bf16_dense_tflops"]),
            fp16_dense_tflops=_float(row["fp16_dense_tflops"]),
            fp8_dense_tflops=_float(row["fp8_dense_tflops"]),
            fp32_tflops=_float(row["fp32_tflops"]),
            supports_bf16=_bool(row["supports_bf16"]),
            tdp_w=_float(row["tdp_w"]),
            list_price_usd=_float(row["list_price_usd"]),
            cloud_usd_per_gpu_hour=_float(row["cloud_usd_per_gpu_hour"]),
            cloud_price_date=row["cloud_price_date"],
            cloud_price_basis=row["cloud_price_basis"],
            source=row["source"],
            notes=row.get("notes", ""),
            nvlink_bidir_gb_s=_float(row.get("nvlink_bidir_gb_s")),
            pcie_gb_s=_float(row.get("pcie_gb_s")),
            infiniband_gb_s=_float(row.get("infiniband_gb_s")),
            interconnect_source=row.get("interconnect_source", ""),
            aliases=tuple(alias.strip() for alias in (row.get("aliases") or "").split(";") if alias.strip()),
            memory_type=row.get("memory_type", ""),
        )
        gpus[gpu.name] = gpu
    return gpus


def models() -> list[ModelSpec]:
    """Every catalogue model, in file order."""
    return list(_model_rows().values())


# suffixes of a parameter count as people write them ("8B", "500M", "1.5b"): decimal, as model names use them
_COUNT_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}


def parse_param_count(text) -> int:
    """A parameter count from ``8e9``, ``8B``, ``1.5b``, ``500M`` or ``8000000000`` (decimal suffixes K, M, B, T).
    Raises a one-line VramcalcError naming the value."""
    word = str(text).strip().lower().replace("_", "").replace(",", "")
    match = re.fullmatch(r"([0-9.]+(?:e[+-]?[0-9]+)?)([kmbt]?)", word)
    try:
        value = float(match.group(1)) * _COUNT_SUFFIX[match.group(2)] if match else None
    except ValueError:
        value = None
    if value is None or value <= 0 or value != value or value == float("inf"):
        raise VramcalcError(f"--max-params must be a parameter count such as 8e9, 8B or 500M, got {str(text)!r}")
    return int(value)


def find_models(family: str | None = None, max_params=None, search: str | None = None) -> list[ModelSpec]:
    """The catalogue models of ``family`` (a model_type, case-insensitive), with at most ``max_params`` parameters
    in total (``parse_param_count``), whose name, Hub id or family contains every word of ``search``
    (case-insensitive; "-", "_" and "." ignored within a word, so "qwen3 8b" finds qwen3-8b and "smollm2"
    SmolLM2-135M), in file order.

    An unknown family is an error that lists the closest ones, never an empty list."""
    chosen = models()
    if family is not None:
        families = {m.family for m in chosen}
        if family.strip().lower() not in families:
            raise unknown_name_error("family", family, families)
        chosen = [m for m in chosen if m.family == family.strip().lower()]
    if max_params is not None:
        limit = parse_param_count(max_params)
        chosen = [m for m in chosen if m.params <= limit]
    if search is not None:
        words = [_search_key(word) for word in str(search).split()]
        chosen = [m for m in chosen if all(w in _search_key(f"{m.name} {m.hf_repo} {m.family}") for w in words)]
    return chosen


def _search_key(text: str) -> str:
    return re.sub(r"[\s_.-]+", "", text.lower())


def gpus() -> list[GpuSpec]:
    """Every catalogue GPU, in file order."""
    return list(_gpu_rows().values())


def get_model(name_or_path: str | ModelSpec, revision: str | None = None) -> ModelSpec:
    """A catalogue model by name or HF repo id (case-insensitive), a ``config.json`` file or folder, or any Hub repo
    id ``ORG/NAME``, whose config.json comes from the local HF cache or the Hub (``hub.py``; ``revision``: a branch,
    tag or commit, which sends a repo id to the cache or the Hub even when the catalogue holds it)."""
    if isinstance(name_or_path, ModelSpec):
        return name_or_path
    key = str(name_or_path).strip()
    rows = _model_rows()
    by_name = rows.get(key.lower())
    if by_name:
        if revision:
            raise VramcalcError(f"--revision needs a Hub repo id, not the catalogue name {key!r} (its repo: "
                                f"{by_name.hf_repo})")
        return by_name
    for spec in rows.values():
        if spec.hf_repo.lower() == key.lower() and not revision:
            return spec
    path = Path(key).expanduser()
    try:
        exists = path.exists()
    except OSError:  # a name the file system refuses (ENAMETOOLONG) is not a path
        exists = False
    if exists or key.endswith(".json"):
        if revision:
            raise VramcalcError(f"--revision needs a Hub repo id, not the local path {key!r}")
        from .hf_config import load_config  # only when a path is given

        return load_config(path)
    from . import hub  # stdlib; huggingface_hub is imported only inside hub.config_path

    if hub.is_repo_id(key):
        return hub.load_hub_config(key, revision)
    if not closest_names(key, rows):  # the whole catalogue would be too long a line to list
        raise VramcalcError(f"unknown model {short_repr(key)}: give a catalogue name (vramcalc models lists them), "
                            "a Hugging Face repo id ORG/NAME, or a path to a config.json")
    raise unknown_name_error("model", key, rows)


def gpu_name_key(name: str) -> str:
    """A GPU name with case and separators dropped: "NVIDIA A100-SXM4-80GB" -> "nvidiaa100sxm480gb".

    Spaces, hyphens, underscores and other punctuation are dropped, so "a100_80gb", "A100-80GB" and "a100 80gb"
    meet, and so does nvidia-smi's truncated "NVIDIA RTX 6000 Ada Gene..."."""
    return re.sub(r"[^0-9a-z]+", "", str(name).lower())


@functools.cache
def _gpu_keys() -> dict[str, tuple[str, ...]]:
    """Normalised name -> the catalogue GPUs it names (name, display name and every alias of each row)."""
    keys: dict[str, tuple[str, ...]] = {}
    for gpu in _gpu_rows().values():
        for word in (gpu.name, gpu.display_name, *gpu.aliases):
            key = gpu_name_key(word)
            if key and gpu.name not in keys.get(key, ()):
                keys[key] = keys.get(key, ()) + (gpu.name,)
    return keys


def gpu_candidates(name: str) -> list[GpuSpec]:
    """The catalogue GPUs that ``name`` may mean, in file order.

    An exact match of the normalised name (``gpu_name_key``) on a name, display name or alias wins; otherwise every
    row of which some name contains the typed one ("4090" -> rtx-4090; "A100" -> a100-80gb and a100-40gb)."""
    rows = _gpu_rows()
    return [rows[gpu_name] for gpu_name in _candidate_names(gpu_name_key(name))]


@functools.lru_cache(maxsize=256)
def _candidate_names(key: str) -> tuple[str, ...]:
    if not key:
        return ()
    keys = _gpu_keys()
    names = keys.get(key)
    if names is None:
        names = {row for alias, rows in keys.items() if key in alias for row in rows}
    return tuple(gpu_name for gpu_name in _gpu_rows() if gpu_name in names)


def get_gpu(name: str | GpuSpec) -> GpuSpec:
    """A catalogue GPU by name, display name, device name or alias (``gpu_candidates``).

    Unknown names raise a one-line ``VramcalcError`` with the closest catalogue names; a name that fits several rows
    ("A100") raises one that lists them."""
    if isinstance(name, GpuSpec):
        return name
    exact = _gpu_rows().get(name)
    if exact is not None:
        return exact
    found = gpu_candidates(name)
    if len(found) == 1:
        return found[0]
    if found:
        listed = ", ".join(f"{gpu.name} ({gpu.display_name})" for gpu in found)
        raise VramcalcError(f"ambiguous GPU {str(name)!r}: it may be {listed}; name one of them")
    raise _unknown_gpu_error(str(name))


def _unknown_gpu_error(word: str) -> VramcalcError:
    """``unknown GPU 'h1000'; closest: h100-sxm, h100-pcie``, suggestions drawn from names and aliases alike."""
    keys = _gpu_keys()
    close_keys = closest_names(gpu_name_key(word), keys)
    close = list(dict.fromkeys(row for key in close_keys for row in keys[key]))[:3]
    if not close:
        return unknown_name_error("GPU", word, _gpu_rows())
    return VramcalcError(f"unknown GPU {word!r}; closest: {', '.join(close)}")
