"""The published-measurement judge: vramcalc's estimate against peak-memory figures other people published.

    python benchmarks/published.py                  # writes benchmarks/published.md and benchmarks/published.csv
    python benchmarks/published.py --data DIR       # another copy of the development set (measurements.csv, configs/)
    python benchmarks/published.py --lib PATH       # judge the vramcalc found at PATH (e.g. an older worktree)

The development set is ``shared/reference/published/measurements.csv`` (217 rows; its README gives the provenance,
units and caveats of every source). For each row this script:

1. maps the row's settings to ``vramcalc.estimate`` options (``ROW_SETUP`` below: method, precision, optimizer,
   batch, sequence, checkpointing, LoRA rank/targets/dropout, adapter dtype, NF4 with or without double
   quantization, loss, GPUs and sharding), the row's ``stack`` and the stack knobs it used (compile, activation
   offloading, optimizer-in-backward, packing, kbit-prep, LoRA on lm_head);
2. passes a stack or knob only if ``vramcalc.estimate`` accepts it (a field of ``TrainingSetup`` or a named
   parameter of ``estimate``), so the script runs before and after the stack presets of issue 11 land. A knob
   whose value changes the row's memory and that vramcalc cannot take yet makes the row "not expressible",
   with the reason; a knob that only names the default (``kbit_prep=False``, ``stack``) is dropped silently;
3. compares like with like: ``torch_max_allocated`` rows with ``peak_tensor_bytes``, ``reserved`` rows with
   ``reserved_bytes`` (``peak_tensor_bytes + allocator_slack``, plus under FSDP the blocks its own streams keep
   cached: ``details.stream_pools_bytes``), ``nvidia_smi`` rows with ``total_bytes`` (plus those blocks);
   ``unspecified`` rows (the statistic is not stated) with ``reserved_bytes``, the middle of the three;
   each row's unit (``GB(1e9)`` or ``GiB``) converts the published number to bytes; ``GB?`` (unit not stated)
   rows stay out of the headline and are compared apart, under both readings and, within a sequence-length sweep,
   by its unit-free shape (``_shape_errors``); a number the source gives as a sum over GPUs (Qwen's ZeRO-3 rows)
   is compared per GPU; ``unsloth-ctx`` bounds are judged pass/fail: the estimate at the longest context that
   fitted must not exceed the GPU size (read generously as GiB);
4. never scores ``estimate_table`` rows (LLaMA-Factory's rule-of-thumb table);
5. checks the runs the sources report as out of memory (``OOM_RUNS``, each a measured row with the fields that
   differ): the estimate's total must exceed the GPU's memory.

Error = (estimate - measured) / measured. No coefficient here is fitted to any row; every mapping cites the
framework config or code the row was produced with (see the row's ``notes`` and docs/stacks-research.md).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import inspect
import json
import re
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_DATA = Path("/work/shared/reference/published")
if not DEFAULT_DATA.exists():
    DEFAULT_DATA = REPO.parent / "shared" / "reference" / "published"

GB = 10**9
GIB = 2**30
# transformers' "Efficient Training on a Single GPU" page measures its 2022 stack's CUDA context itself: "GPU memory
# occupied: 1343 MB" (MiB: nvml used // 1024**2) after torch.ones((1, 1)).to("cuda") on the idle V100, i.e. torch 1.10
# loading every kernel at context creation (lazy loading came with CUDA 11.7 and torch 1.13), less the 1 x 1
# tensor's 2 MiB segment
HF_PERF_DOC_CONTEXT_MIB = 1343 - 2
# that page's 2022 stack (transformers 4.16, torch 1.10), each knob's source at its use in ``row_setup``: the Trainer
# kept the gradients, the softmax saved its input, BertModel added its fp32 extended mask
HF_PERF_DOC_STACK = dict(grads_kept=True, softmax_saves_input=True, extended_mask=True)

# ---------------------------------------------------------------------------------------------------------------
# Models: the exact HF id each row ran -> a config folder of the development set or a catalogue name. (litgpt's own
# untied lm_head is the estimate's: --stack litgpt, terms/stack_layers.py built_model.)
MODEL_CONFIG = {
    "meta-llama/Llama-2-7b-hf": "llama-2-7b",
    "meta-llama/Llama-2-13b-hf": "llama-2-13b",
    "meta-llama/Meta-Llama-3-8B": "llama-3-8b",
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama-3-8b",
    "meta-llama/Meta-Llama-3.1-8B": "llama-3.1-8b",
    "meta-llama/Llama-3.1-8B": "llama-3.1-8b",
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b",
    "meta-llama/Llama-3.2-1B": "llama-3.2-1b",
    "meta-llama/Llama-3.2-3B": "llama-3.2-3b",
    "mistralai/Mistral-7B-v0.1": "mistral-7b-v0.1",
    "unsloth/Mistral-7B-v0.2": "mistral-7b-v0.2",
    "microsoft/Phi-3-mini-4k-instruct": "phi-3-mini-4k-instruct",
    "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": "tinyllama-1.1b",
    "google/gemma-2b": "gemma-2b",
    "google/gemma-7b": "gemma-7b",
    "google/gemma-2-2b": "gemma-2-2b",
    "google/gemma-2-9b": "gemma-2-9b",
}
MODEL_CATALOGUE = {  # models without a config folder whose catalogue entry has the same architecture
    "microsoft/phi-1_5": "phi-1.5",
    "microsoft/phi-2": "phi-2",
    "stabilityai/stablelm-base-alpha-3b": "stablelm-base-alpha-3b",
    "Qwen/Qwen-1_8B": "qwen-1.8b",
    "Qwen/Qwen-1.8B": "qwen-1.8b",
    "Qwen/Qwen-1.8B-Chat": "qwen-1.8b",
    "Qwen/Qwen-7B": "qwen-7b",
    "Qwen/Qwen-7B-Chat": "qwen-7b",
    "Qwen/Qwen-14B": "qwen-14b",
    "Qwen/Qwen-14B-Chat": "qwen-14b",
    "Qwen/Qwen-72B-Chat": "qwen-72b",
    "Qwen/Qwen-1.8B-Chat-Int4": "qwen-1.8b",  # the GPTQ checkpoints: the qlora branch names that blocker
    "Qwen/Qwen-7B-Chat-Int4": "qwen-7b",
    "Qwen/Qwen-14B-Chat-Int4": "qwen-14b",
    "Qwen/Qwen-72B-Chat-Int4": "qwen-72b",
    "meta-llama/Llama-3.1-70B": "llama-3.1-70b",
    "meta-llama/Llama-3.1-405B": "llama-3.1-405b",
    "meta-llama/Llama-2-70b-hf": "llama-2-70b",
    "meta-llama/Llama-3.3-70B-Instruct": "llama-3.3-70b",
    "bigscience/bloomz-7b1": "bloomz-7b1",
    "bert-large-uncased": "bert-large-uncased",
    "tiiuae/falcon-7b": "falcon-7b",
}
LOCAL_CONFIG = {"tiiuae/falcon-40b": "falcon-40b-litgpt-untied"}  # the litgpt runs that ran out of memory
# data/models.csv family column (others are llama-style)
CATALOGUE_FAMILY = {"phi-1.5": "phi", "phi-2": "phi", "bloomz-7b1": "bloom", "bert-large-uncased": "bert"}
UNSUPPORTED_FAMILY = {  # prefix of the HF id -> why vramcalc cannot take that model
    "stabilityai/stablelm-base-alpha-7b": "gpt_neox (StableLM-alpha 7B): no published config or parameter count found",
    "bigscience/T0": "t5 (encoder-decoder)",
    "bigscience/mt0": "mt5 (encoder-decoder)",
    "generic": "no model",
}
GPU_NAME = {  # the row's GPU text -> vramcalc catalogue (runtime overhead, allocator slack)
    "A100-SXM4-40GB": "a100-40gb",
    "A10G (24GB)": "a10g",
    "RTX 4090 (24GB)": "rtx-4090",
    "A100-SXM4-80GB": "a100-80gb",
    "A100 80GB": "a100-80gb",
    "A100": "a100-80gb",
    "A100 (80GB implied by 60 GiB row)": "a100-80gb",
    "Tesla V100-SXM2-16GB": "v100-16gb",
}

# Per-family module names for an explicit all-linear list (+ lm_head) when a row puts LoRA on lm_head.
ALL_LINEAR = {
    "llama": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    "mistral": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    "gemma": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    "gemma2": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    "phi3": "qkv_proj,o_proj,gate_up_proj,down_proj",
    "phi": "q_proj,k_proj,v_proj,dense,fc1,fc2",  # phi-1.5/phi-2: litgpt's attn + proj + fc + proj (GptNeoxMLP)
}

# Knobs of issue 11 (DESIGN.md "Contract additions under way"), as Python keywords. ``required``: the row's memory
# depends on it, so a vramcalc that cannot take it cannot express the row; otherwise it is passed when accepted.
KNOB_REQUIRED_WHEN_TRUE = ("compile", "activation_offload", "optimizer_in_backward", "modules_to_save")
KNOB_OPTIONAL = ("stack", "packing", "kbit_prep", "kernels", "quant_saves_input", "stable_embedding",
                 "norm_fp32_product")


# torchtune rows: the flags each row ran with, from the row's notes (README "Optimization flags" table at 1814feb17
# is cumulative: each row adds one technique; the Sep-2024 table: packed 2048 + compile + chunked CE for all rows).
_TT_FLAGS = ("packing", "compile", "chunked_loss")
TORCHTUNE_KNOBS = {
    "torchtune-002": ("packing",),
    "torchtune-003": ("packing", "compile"),
    "torchtune-004": _TT_FLAGS,
    "torchtune-005": _TT_FLAGS,
    "torchtune-006": _TT_FLAGS + ("optimizer_in_backward",),
    "torchtune-007": _TT_FLAGS + ("optimizer_in_backward", "activation_offload"),
    "torchtune-008": _TT_FLAGS + ("optimizer_in_backward", "activation_offload"),
    "torchtune-009": _TT_FLAGS + ("activation_offload",),
    "torchtune-010": _TT_FLAGS + ("activation_offload",),
    "torchtune-011": _TT_FLAGS + ("optimizer_in_backward",),
    "torchtune-012": _TT_FLAGS + ("optimizer_in_backward",),
    "torchtune-013": _TT_FLAGS,
    "torchtune-014": _TT_FLAGS,
    "torchtune-015": _TT_FLAGS,
    "torchtune-016": _TT_FLAGS,
    "torchtune-017": _TT_FLAGS,
    "torchtune-018": _TT_FLAGS,
    "torchtune-019": ("compile",),
    "torchtune-022": ("optimizer_in_backward",),
    "torchtune-026": ("optimizer_in_backward",),
    "torchtune-027": ("optimizer_in_backward",),
    "torchtune-031": ("optimizer_in_backward",),
}


# torchtune's recipes kept ``logits`` bound through backward until ``del logits`` (vramcalc --loss torchtune-2024):
# lora_finetune_distributed from #1046 (cb3ed29d7, 2024-06-04), the single-device and full recipes from #1235
# (8a98fbaa3, 2024-07-28); a row measured with code older than its recipe's date ran the old loop.
TORCHTUNE_DEL_LOGITS = {"lora_finetune_distributed": "2024-06-04", "other": "2024-07-28"}

# torchtune's RMSNorm became ``F.rms_norm(x.float(), weight=self.scale).to(x.dtype)`` (an fp32 product saved for the
# weight's gradient, vramcalc's torchtune default) in #2054 (1450d6126, 2024-11-25); before, ``(x_fp32 * rsqrt(...))
# .type_as(x) * self.scale`` multiplied in the model dtype (``modules/rms_norm.py:38-42`` @1814feb17): a row measured
# with older code ran that norm (--no-norm-fp32-product)
TORCHTUNE_FP32_NORM = "2024-11-25"


ISO_DATE = re.compile(r"20\d\d-\d\d-\d\d")


def _row_date(row: dict) -> str:
    """The ISO date a row's source or locator states (the code it was measured with), or ''."""
    found = ISO_DATE.search(row["source"]) or ISO_DATE.search(row["source_locator"])
    return found.group(0) if found else ""


# litgpt config-hub FSDP full rows: litgpt@00af8b0d finetune/full.py:253-254 (no_backward_sync while accumulating),
# gradient_accumulation_iters(devices) = global_batch_size // (devices · micro_batch_size) from each row's YAML
LITGPT_CH_FSDP_ACCUM = {
    "litgpt-ch-003": 4,  # config_hub/finetune/gemma-2b/full.yaml: global 16, micro 1, devices 4
    "litgpt-ch-024": 1,  # config_hub/finetune/phi-2/full.yaml: global 8, micro 4, devices 2
    "litgpt-ch-029": 4,  # config_hub/finetune/stablelm-base-alpha-3b/full.yaml: global 8, micro 1, devices 2
}


@dataclasses.dataclass
class RowSetup:
    """What one published row ran, in vramcalc's words."""

    model: str | None = None  # config folder path or catalogue name
    options: dict = dataclasses.field(default_factory=dict)
    stack: str | None = None
    knobs: dict = dataclasses.field(default_factory=dict)
    blockers: list = dataclasses.field(default_factory=list)  # why the row cannot be expressed (any vramcalc)
    assumptions: list = dataclasses.field(default_factory=list)
    bound: bool = False  # unsloth-ctx: the measured number is an upper bound on the peak
    first_micro_batch: bool = False  # the peak is the run's first micro-batch: judge it without ``next-forward``
    unit_unstated: bool = False  # "GB?": judged under both readings (1e9 and 2^30) and by its sweep's shape, apart
    gpus_summed: int = 1  # the published number is the sum over this many GPUs (compared per GPU)


def _note(row: dict, key: str) -> str | None:
    for part in row["notes"].split(";"):
        part = part.strip()
        if part.startswith(key + "="):
            return part.split("=", 1)[1].strip()
    return None


def _int(text: str) -> int | None:
    text = (text or "").strip()
    return int(text) if text.isdigit() else None


def _bool(text: str) -> bool | None:
    text = (text or "").strip().lower()
    return {"true": True, "false": False}.get(text)


def _model_id(row: dict) -> str:
    return row["model"].split(" (")[0].strip()


def _family_of(config_dir: Path) -> str | None:
    try:
        return json.loads((config_dir / "config.json").read_text()).get("model_type")
    except OSError:
        return None


def _resolve_model(row: dict, setup: RowSetup, data: Path) -> str | None:
    model_id = _model_id(row)
    for prefix, family in UNSUPPORTED_FAMILY.items():
        if model_id.startswith(prefix):
            setup.blockers.append(f"{family} family unsupported")
            return None
    if model_id in MODEL_CONFIG:
        return str(data / "configs" / MODEL_CONFIG[model_id])
    if model_id in LOCAL_CONFIG:  # benchmarks/configs (its README gives each folder's source)
        return str(HERE / "configs" / LOCAL_CONFIG[model_id])
    if model_id in MODEL_CATALOGUE:
        return MODEL_CATALOGUE[model_id]
    setup.blockers.append(f"no config for {model_id}")
    return None


def _optimizer(text: str) -> str | None:
    t = text.lower()
    if "pagedadamw8bit" in t.replace(" ", "") or "paged_adamw_8bit" in t:
        return "paged-adamw-8bit"
    if "pagedadamw" in t.replace(" ", ""):
        return "paged-adamw"
    if "adam8bit" in t.replace(" ", "") or "8-bit adamw" in t:
        return "adamw-8bit"
    if "adafactor" in t:
        return "adafactor"
    if "fused=true" in t.replace(" ", ""):
        return "adamw"
    if "adamw" in t:
        # torch.optim.AdamW without fused=True: foreach on CUDA (torch/optim/adamw.py _default_to_fused_or_foreach
        # returns foreach=True for CUDA tensors; fused has never been torch's default for AdamW)
        return "adamw-foreach"
    return None


def _lora_targets(row: dict, family: str | None, setup: RowSetup) -> str | None:
    text = row["lora_targets"].strip()
    low = text.lower()
    if not text:
        return None
    lm_head = "lm_head" in low
    if low == "query_key_value (bloom default)":  # peft's default LoRA targets for bloom (utils/constants.py)
        return "qv"
    if "litgpt fused qkv" in low or low in ("q,v", "q_proj,v_proj", "q_proj,v_proj"):
        if "fused qkv" in low:
            setup.assumptions.append("litgpt LoRAQKVMerged q+v slices modelled as q_proj,v_proj LoRA (same params)")
        return "qv"
    if low.startswith("q,k,v,o,mlp") or low.startswith("q_proj,k_proj,v_proj,output_proj,mlp") \
            or low.startswith("q_proj,v_proj,k_proj,output_proj,mlp") or low == "q,k,v,o,gate,up,down":
        targets = ALL_LINEAR.get(family or "", "all-linear")
        return targets + (",lm_head" if lm_head else "")
    if low.startswith("q_proj,v_proj,output_proj,mlp"):  # torchtune 3B: q, v, output_proj, MLP (no k)
        return "q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    if low in ("q_proj,k_proj,v_proj", "q_proj,v_proj,k_proj"):
        return "q_proj,k_proj,v_proj"
    if low.startswith("c_attn,c_proj,w1,w2"):  # Qwen v1: peft's "c_proj" suffix-matches both projections
        return "c_attn,attn.c_proj,w1,w2,mlp.c_proj"
    setup.blockers.append(f"LoRA targets {text!r} not mapped")
    return None


# torchtune rows measured while torchtune overrode NF4Tensor's aten.copy_ with ``to_nf4(src.to(dest.device))`` and
# pinned torchao==0.1 (pyproject.toml): read at each row's commit in pytorch/torchtune (0914d5cfb, 20747cd87, 0217d44c2)
# and in the 0.1.1 wheel; the override was deleted by #1294 (3d7ca3869, 2024-08-23), before the 30b8519e8 rows.
# vramcalc's ``--load requantize`` (terms/loading.py).
# litgpt-ch QLoRA rows whose residual stays open after Q1-Q3 and the next-forward moment (docs/stacks-research.md
# section 2): their peak is the backward, the estimate equals litgpt's own traced step (bitsandbytes <= 0.43's held
# inputs emulated), and the measurement is higher by those held inputs once more, for no mechanism found
LITGPT_CH_QLORA_OPEN = tuple(f"litgpt-ch-0{n}" for n in (13, 15, 17, 19, 31))
TORCHTUNE_REQUANTIZE_ROWS = ("torchtune-019", "torchtune-028", "torchtune-037")
# the token count of every alpaca-cleaned sample as torchtune 0.1 built it with the Llama-2 tokenizer, where it has
# been generated; until then the histogram digitized from the dataset authors' own figure (benchmarks/datasets)
ALPACA_LLAMA2_LENGTHS = Path(__file__).resolve().parent / "datasets" / "alpaca_cleaned_llama2_lengths.csv"
ALPACA_DIGITIZED_LENGTHS = Path(__file__).resolve().parent / "datasets" / "alpaca_cleaned_lengths_digitized.csv"
ALPACA_LENGTHS_WORDS = "alpaca-cleaned's token lengths under the Llama-2 tokenizer (benchmarks/datasets)"
ALPACA_DIGITIZED_WORDS = ("alpaca-cleaned's token lengths digitized from its authors' histogram of 2023-04-09 "
                          "(benchmarks/datasets)")
# torchtune-030's 17.18 GB is a95c6b931's value (#551, 2024-03-21; its statistic corrected to max_memory_reserved by
# #552 the same day), carried unchanged into the April tables: that run predates InstructDataset's truncation to
# max_seq_len (73647e26e, #620, 2024-03-30), so its batches were padded to their longest whole sample, and its
# longest batch and reserved staircase depend on how many steps it ran, which no revision states
# (docs/stacks-research.md section 16)
TORCHTUNE_UNTRUNCATED_ROWS = ("torchtune-030",)


def row_setup(row: dict, data: Path) -> RowSetup:
    """The vramcalc options, stack and knobs of one published row (documented per source)."""
    rid, kind = row["id"], row["measure_kind"]
    setup = RowSetup()
    if kind == "estimate_table":
        setup.blockers.append("estimate_table: a rule-of-thumb table, never scored")
        return setup
    prefix = rid.rsplit("-", 1)[0]
    stack = {"litgpt-rt": "litgpt", "litgpt-ch": "litgpt", "torchtune": "torchtune", "qwen": "hf",
             "peft-readme": "hf", "hf-perf-doc": "hf", "llamafactory": "llama-factory", "unsloth-ctx": "hf"}[prefix]
    setup.stack = stack
    setup.model = _resolve_model(row, setup, data)
    family = _family_of(Path(setup.model)) if setup.model and "/" in setup.model else \
        CATALOGUE_FAMILY.get(setup.model or "", "llama")

    method = row["method"].strip()
    opts = {"method": method}
    batch, seq, gpus = _int(row["micro_batch"]), _int(row["seq_len"]), _int(row["n_gpus"]) or 1
    if batch is None:
        setup.blockers.append("micro-batch unknown")
    if seq is None:
        setup.blockers.append("seq_len unknown (unpacked data padded to each batch's longest sample)")
    opts.update(batch_size=batch, seq_len=seq)
    unit = _note(row, "unit") or ""
    setup.unit_unstated = unit == "GB?" and prefix != "unsloth-ctx"

    if prefix in ("litgpt-rt", "litgpt-ch"):
        # lit-gpt finetune/lora.py @8641822 and litgpt 0.4 finetune/*.py: Fabric precision bf16-true (bf16 params,
        # LoRA params bf16 too), torch.optim.AdamW, bnb PagedAdamW when quantize=bnb.* , lm_head in 128-token chunks
        # + chunked_cross_entropy, no activation checkpointing on 1 device, FSDP FULL_SHARD + per-Block
        # checkpointing on several devices. LoRA dropout 0.05.
        mixed = "bf16-mixed" in row["compute_dtype"]
        opts["precision"] = "mixed-bf16" if mixed else "bf16-true"  # Fabric: no autocast
        opts["optimizer"] = _optimizer(row["optimizer"])
        opts["loss"] = "litgpt"  # lm_head in 128-position chunks, Fabric's fp32 outputs kept through backward
        opts["attn"] = "sdpa"
        if gpus > 1:
            opts.update(num_gpus=gpus, sharding="fsdp", grad_ckpt=True)
        else:
            opts["grad_ckpt"] = bool(_bool(row["grad_ckpt"]))
        if method == "full" and "tiny-llama" in row["notes"]:
            opts["grad_accum"] = 8  # config_hub/finetune/tiny-llama/full.yaml @00af8b0d: global 32 / micro 4
        if prefix == "litgpt-rt":
            # lit-gpt@8641822 finetune/lora.py:175-176,212: get_batch(..., longest_seq_ix if iter_num == 1) puts the
            # longest sample (the row's seq_len) first; every later micro-batch is a random, shorter Alpaca sample.
            # The peak is that first micro-batch's, with nothing of a previous one alive (vramcalc's next-forward
            # phase is a later micro-batch of the same shape)
            setup.first_micro_batch = True
        if prefix == "litgpt-rt" and batch:
            # lit-gpt@8641822 finetune/lora.py:40,42: batch_size = 128, gradient_accumulation_iters = batch_size //
            # micro_batch_size (devices not divided out); every accumulating micro-batch runs under
            # fabric.no_backward_sync (:215)
            opts["grad_accum"] = 128 // batch
        if rid in LITGPT_CH_FSDP_ACCUM:
            opts["grad_accum"] = LITGPT_CH_FSDP_ACCUM[rid]
        if method == "qlora":
            # the bitsandbytes these rows ran: lit-gpt@8641822 with bnb 0.41.1 (resource-tables.md), litgpt@00af8b0d
            # pins bitsandbytes==0.42.0 (pyproject.toml:41); MatMul4Bit saved its input up to 0.43
            # (bitsandbytes/autograd/_functions.py:516-526 at 0.41.1, :523 at 0.42.0): the current litgpt preset pins
            # >= 0.45.2, so the row's version is given explicitly
            setup.knobs["quant_saves_input"] = True
            # litgpt swaps in bitsandbytes' StableEmbedding only since ae798aba (2024-10-04, "Add
            # bnb.nn.StableEmbedding for quantized training"): after both 8641822 (2023-10) and 00af8b0d (2024-09-27)
            setup.knobs["stable_embedding"] = False
    elif prefix == "torchtune":
        opts["precision"] = "bf16-true"  # dtype: bf16, the recipes never autocast
        opt = _optimizer(row["optimizer"])
        if rid == "torchtune-010":  # command overrides only the component; 3B_qlora_single_device.yaml:57 fused: True
            opt = "adamw"
        if rid in ("torchtune-002", "torchtune-003", "torchtune-004", "torchtune-005", "torchtune-006",
                   "torchtune-007"):
            # the ablation swaps the 3B single-device config's PagedAdamW8bit for torch AdamW without saying how;
            # torchtune's own configs of that commit spell torch AdamW as fused (recipes/configs/llama3_2/
            # 3B_full.yaml:54-57, 3B_lora_single_device.yaml:56-58 @1814feb17: fused: True)
            opt = "adamw"
            setup.assumptions.append("torch AdamW fused=True, as torchtune's configs of that commit spell it")
        if rid == "torchtune-008":
            # README.md:108 @1814feb17 names the table's optimizer: "... do not use `optimizer_in_bwd` or `AdamW8bit`
            # optimizer" (bitsandbytes.optim.AdamW8bit, not the config's paged variant: its states are device memory)
            opt = "adamw-8bit"
        opts["optimizer"] = opt
        opts["attn"] = "sdpa"
        gc = _bool(row["grad_ckpt"])
        if gc is None:
            setup.blockers.append("setup unknowable: activation checkpointing not stated (config departs from default)")
        opts["grad_ckpt"] = bool(gc)
        notes = row["notes"]
        low = notes.lower()
        for knob in TORCHTUNE_KNOBS.get(rid, ()):
            if knob == "chunked_loss":
                continue
            setup.knobs[knob] = True
        if method == "full":
            # the preset's optimizer_in_bwd is the 0.6.x single-device full config's; a row runs it only where its
            # table says so (README @1814feb17: the cumulative ablation adds it at its row 006; the 2024 distributed
            # full recipes had no optimizer_in_bwd)
            setup.knobs.setdefault("optimizer_in_backward", False)
        # torchtune CEWithChunkedOutputLoss (num_output_chunks=8) where the row's table says so; before ``del logits``
        # the recipe's loop kept the shifted fp32 logits through backward (TORCHTUNE_DEL_LOGITS)
        recipe = "lora_finetune_distributed" if gpus > 1 and method != "full" else "other"
        measured = _row_date(row)
        if measured and measured < TORCHTUNE_FP32_NORM:
            setup.knobs["norm_fp32_product"] = False
        if "chunked_loss" in TORCHTUNE_KNOBS.get(rid, ()):
            opts["loss"] = "torchtune"
        elif measured and measured < TORCHTUNE_DEL_LOGITS[recipe]:
            opts["loss"] = "torchtune-2024"
        else:
            opts["loss"] = "hf"
        if "fsdp_cpu_offload=true" in low.replace(" ", ""):
            # torchtune@30b8519e8 training/_distributed.py:17,614: fsdp_cpu_offload -> FSDP2 CPUOffloadPolicy
            # (sharded params, gradients and the optimizer step on the host): vramcalc's --offload params
            opts["offload"] = "params"
        if gpus > 1:
            opts.update(num_gpus=gpus, sharding="fsdp")
        if "grad accum " in notes:  # llama2/7B_lora_single_device: gradient_accumulation_steps 64
            opts["grad_accum"] = _int(notes.split("grad accum ")[1].split(")")[0].split(",")[0])
        if "unpacked" in low and "llama-2" in _model_id(row).lower():
            # alpaca(_cleaned)_dataset unpacked, max_seq_len the cap: the recipe's DataLoader pads each batch to its
            # longest sample (torchtune@ff594c231 utils/collate.py:19-60 padded_collate, pad_sequence), so the
            # steps' lengths vary (vramcalc's --sample-lengths, benchmarks/datasets/README.md)
            if rid in TORCHTUNE_UNTRUNCATED_ROWS:
                setup.blockers.append("seq_len unknown (unpacked data padded to each batch's longest sample, "
                                      "uncapped: measured at a95c6b931, before torchtune truncated samples, over a "
                                      "run of unstated length)")
            else:
                exact = ALPACA_LLAMA2_LENGTHS.exists()
                lengths = ALPACA_LLAMA2_LENGTHS if exact else ALPACA_DIGITIZED_LENGTHS
                opts["sample_lengths"] = str(lengths.relative_to(REPO))
                setup.assumptions.append(f"{ALPACA_LENGTHS_WORDS if exact else ALPACA_DIGITIZED_WORDS}, one epoch")
        if rid == "torchtune-024":
            # README @0217d44c2 states batch 4 x 4096, but recipes/configs/llama2/70B_lora.yaml there trains on
            # alpaca_dataset unpacked (torchtune/datasets/_alpaca.py:18 max_seq_len=512), and at 4 x 4096 the 80
            # checkpointed layer inputs (4·4096·8192·2 B each: 21.5 GB) plus the bf16 weight shard (138 GB / 8)
            # alone exceed the 26.4 GB reported: the sequence length that ran is not knowable
            setup.blockers.append("setup unknowable: seq_len (stated 4 x 4096 exceeds the reported peak with "
                                  "checkpoints + weight shard alone; config trains unpacked Alpaca capped at 512)")
        if rid == "torchtune-025":
            setup.blockers.append("setup unknowable: no 70B full config existed at that commit (rel=low)")
    elif prefix == "unsloth-ctx":
        # Unsloth docs context table, 'Hugging Face + FA2' column: bnb 4-bit QLoRA r=32 on all linear layers, batch 1.
        # Optimizer and checkpointing of the HF baseline are not stated: the frugal common choice (checkpointing on,
        # HF Trainer default fused AdamW) is assumed, so a bound failure is a real miss.
        setup.bound = True
        opts.update(precision="bf16", attn="flash", grad_ckpt=True, optimizer="adamw")
        setup.assumptions.append("HF+FA2 baseline assumed grad_ckpt=True, adamw (not stated)")
    elif prefix == "llamafactory":
        setup.blockers.append("setup unknowable: LoRA targets, optimizer, checkpointing and measuring tool not stated")
    elif prefix == "peft-readme" and "bloomz" in row["model"]:
        # peft's examples committed with the table (5de175184, examples/causal_language_modeling/
        # peft_lora_clm_accelerate_ds_zero3_offload.py, the row's notes): every sample padded to max_length 64,
        # batch 8, LoRA r=8, alpha 32, dropout 0.1 on peft's bloom default (query_key_value), torch AdamW, no mixed
        # precision (fp32), no checkpointing; BLOOM runs eager attention (no sdpa). The DeepSpeed column: ZeRO-3
        # with parameters and optimizer offloaded to the CPU (the script's accelerate config) on one GPU
        opts.update(precision="fp32", optimizer="adamw-foreach", grad_ckpt=False, attn="eager", lora_rank=8,
                    lora_dropout=0.1)
        if "DeepSpeed" in row["optimizer"]:
            opts.update(sharding="zero3", offload="params")
        setup.assumptions.append("TorchTracemalloc's peak (max_memory_allocated) read as the README's figure, "
                                 "total or delta not stated")
    elif prefix == "peft-readme":
        setup.blockers.append("setup unknowable: sequence length and statistic not stated (short tweets)")
    elif prefix == "qwen":
        # QwenLM/Qwen finetune.py (the README's profiling: one A100-80G, torch 2.0, flash-attention 2, batch 1,
        # gradient checkpointing in every finetune_*.sh): the remote code loads the weights in bf16 (modeling_qwen.py
        # autoset_precision: config.bf16 when the GPU supports it) and the Trainer runs --bf16 (autocast); LoRA r=64,
        # dropout 0.05 on c_attn, c_proj (peft's suffix match takes attn.c_proj and mlp.c_proj), w1, w2;
        # "LoRA (emb)" trains wte and lm_head whole (modules_to_save, base models). The single-GPU LoRA runs use the
        # Trainer's adamw_torch (torch 2.0: foreach); full fine-tuning and the 72B LoRA run DeepSpeed ZeRO-3
        # (finetune_ds.sh, ds_config_zero3.json), whose multi-GPU numbers are sums over the GPUs (README note).
        # Q-LoRA: the GPTQ Int4 chat checkpoint (quantize_config group size 128, no act-order) in fp16 under
        # DeepSpeed ZeRO-2 on one GPU (finetune_qlora_single_gpu.sh)
        opts.update(precision="fp16" if method == "qlora" else "bf16", attn="flash", grad_ckpt=True)
        engine = re.search(r"zero([123])", row["optimizer"].lower())
        opts["optimizer"] = "adamw" if engine else "adamw-foreach"
        if engine:
            opts.update(sharding=f"zero{engine.group(1)}", num_gpus=gpus)
            if engine.group(1) == "2":  # finetune/ds_config_zero2.json: reduce_bucket_size 2e8, overlap_comm true
                opts.update(zero_bucket_size=200_000_000, zero_overlap_comm=True)
            setup.gpus_summed = gpus
            setup.assumptions.append(f"DeepSpeed ZeRO-{engine.group(1)} (FusedAdam); a multi-GPU number is the sum, "
                                     "compared per GPU")
        if method in ("lora", "qlora"):
            opts["lora_dropout"] = 0.05
        if "modules_to_save" in row["lora_targets"]:
            setup.knobs["modules_to_save"] = "embed_tokens,lm_head"
    elif prefix == "hf-perf-doc":
        # transformers docs/source/en/perf_train_gpu_one.mdx @0016acf7 ("Efficient Training on a Single GPU", its
        # nvidia-smi dated 2022-01-11: transformers 4.15-4.16, torch 1.10, driver 460.91.03 / CUDA 11.2): Trainer on
        # AutoModelForSequenceClassification("bert-large-uncased") (2 labels), 512 sequences of exactly 512 tokens
        # and a label each (no attention mask), fp16=True is native AMP (mixed-fp16); BertSelfAttention of that
        # release computes attention itself (eager: torch 1.10 had no SDPA); gradient_checkpointing=True is
        # BertEncoder's torch.utils.checkpoint.checkpoint, reentrant (transformers 4.16.2 modeling_bert.py L562-583).
        # Measured with pynvml after trainer.train(): total_bytes, the CUDA context and allocator reserve included
        # Trainer 4.16 zeroes the gradients with model.zero_grad() (trainer.py L1306, L1435), whose set_to_none was
        # False before torch 2.0: the gradients stay allocated through every later step (--grads-kept)
        # torch 1.10's softmax saves its input as well as its output (--softmax-saves-input: its generated
        # Functions.h, SoftmaxBackward0), and 4.16's BertModel adds its fp32 extended mask to every layer's scores,
        # an all-ones one too (--extended-mask: modeling_bert.py L957, L969, L327; modeling_utils.py L306-307)
        opts.update(task="classify", attn="eager",
                    precision="mixed-fp16" if "fp16" in row["compute_dtype"] else "fp32",
                    grad_ckpt="reentrant" if _bool(row["grad_ckpt"]) else False, **HF_PERF_DOC_STACK,
                    cuda_context_mib=HF_PERF_DOC_CONTEXT_MIB)
        accumulation = re.search(r"gradient_accumulation_steps=(\d+)", row["notes"])
        opts["grad_accum"] = int(accumulation.group(1)) if accumulation else 1
        words = row["optimizer"].lower()
        if "adamw_hf" in words or words.startswith("hf adamw"):
            # transformers.optimization.AdamW (4.16 optimization.py L340-380): fp32 exp_avg and exp_avg_sq per
            # parameter, a Python step count, one parameter at a time; its only scratch, exp_avg_sq.sqrt() of one
            # tensor (<= the word embedding's 125 MB), comes after the backward's peak: vramcalc's adamw (the same
            # states; a 0-d fp32 step per tensor, 200 kB in all)
            opts["optimizer"] = "adamw"
            setup.assumptions.append("adamw_hf as vramcalc's adamw (fp32 states; per-tensor step scratch after "
                                     "the peak)")
        else:
            opts["optimizer"] = _optimizer(row["optimizer"])
        if opts["optimizer"] == "adamw-8bit":
            # the page builds bnb.optim.Adam8bit itself (Trainer(optimizers=(adam_bnb_optim, None))): no
            # register_module_override, so its embeddings' states are 8-bit too, where the hf stack's Trainer-built
            # adamw_bnb_8bit keeps nn.Embedding at 32 bits (2 x 4 B per weight instead of 2 x 1 B: +190 MB here)
            setup.assumptions.append("bnb Adam8bit built by the page, not the Trainer: its embeddings' 8-bit states "
                                     "are estimated 32-bit (the hf stack's Trainer override), about 190 MB above")
        setup.assumptions.append("2022 CUDA context: the page's own probe, 1343 MiB for a 1 x 1 tensor (torch 1.10 "
                                 "loads every kernel), given as --cuda-context-mib 1341 (the default profile has "
                                 "500 MiB)")

    if method in ("lora", "qlora"):
        rank = _int(row["lora_rank"])
        if rank is None:
            setup.blockers.append("LoRA rank unknown")
        opts["lora_rank"] = rank
        targets = _lora_targets(row, family, setup)
        if "lm_head" in (targets or ""):
            setup.knobs["lora_lm_head"] = True
        opts["lora_targets"] = targets
        if prefix in ("litgpt-rt", "litgpt-ch"):
            opts["lora_dropout"] = 0.05
            opts["adapter_dtype"] = "fp32" if opts.get("precision") == "mixed-bf16" else "bf16"
        elif prefix == "torchtune":
            opts["adapter_dtype"] = "bf16"  # torchtune builds the model (adapters included) in bf16
            # lora_dropout: llama2 builders @fde0dc403 (Apr 2024 rows 019-038) default 0.05
            # (torchtune/models/llama2/_model_builders.py:56); llama3_x configs @1814feb17 and later: 0.0
            opts["lora_dropout"] = 0.05 if int(rid.rsplit("-", 1)[1]) >= 19 else 0.0
        if method == "qlora":
            wd = row["weight_dtype"].lower()
            opts["quant"] = "int4-gptq" if "gptq" in wd else "nf4"
            if prefix == "torchtune":
                # torchao NF4Tensor: block 64, scalers quantized to int8 in blocks of 256 (double quantization)
                opts["double_quant"] = True
                if rid in TORCHTUNE_REQUANTIZE_ROWS:
                    # torchtune's own NF4 copy_ (torchtune/utils/_register_nf4_dispatch_ops.py:22-42 at the row's
                    # commit) re-quantizes each checkpoint tensor on the GPU with torchao 0.1 while loading
                    opts["load"] = "requantize"
            elif opts["quant"] == "nf4":
                opts["double_quant"] = "double-quant" in wd
    setup.options = {k: v for k, v in opts.items() if v is not None}
    return setup


# ---------------------------------------------------------------------------------------------------------------
# Runs their sources report as out of memory (the development set's README, "OOM observations"): each is a row of
# the set with the fields that differ, so it takes that row's documented setup; the estimate must not fit the GPU.


@dataclasses.dataclass(frozen=True)
class OomRun:
    """A run its source reports as out of memory."""

    label: str
    base: str  # the measured row whose setup (stack, precision, loss, sequence, GPU) the run shares
    fields: dict  # the measurements.csv fields that differ
    source: str
    options: dict = dataclasses.field(default_factory=dict)  # settings outside the CSV's columns


_RT = "litgpt tutorials/resource-tables.md @0cc02afa (runs at lit-gpt 8641822, A100-SXM4-40GB)"
_CH = "litgpt config_hub/finetune/README.md @00af8b0d (A10G) with the config's YAML"
OOM_RUNS = (
    OomRun("Llama-2-7B LoRA, micro-batch 4, 1 GPU", "litgpt-rt-011", {"micro_batch": "4"}, _RT),
    OomRun("Llama-2-13B LoRA, micro-batch 2, 1 GPU", "litgpt-rt-015", {"micro_batch": "2"}, _RT),
    OomRun("Llama-2-13B LoRA, micro-batch 4, 1 GPU", "litgpt-rt-015", {"micro_batch": "4"}, _RT),
    # rt-029 is Falcon-7B at the resource tables' sequence (1079 tokens) from a tutorial that names no GPU
    OomRun("Falcon-40B LoRA, micro-batch 1, 1 GPU", "litgpt-rt-029",
           {"model": "tiiuae/falcon-40b", "gpu": "A100-SXM4-40GB"}, _RT),
    OomRun("Falcon-40B QLoRA nf4, micro-batch 1, 1 GPU", "litgpt-rt-029",
           {"model": "tiiuae/falcon-40b", "gpu": "A100-SXM4-40GB", "method": "qlora", "weight_dtype": "nf4"}, _RT),
    OomRun("Llama-2-13B LoRA, micro-batch 1, 2 GPUs (FSDP)", "litgpt-rt-027", {"n_gpus": "2"}, _RT),
    OomRun("Falcon-40B LoRA, micro-batch 1, 4 GPUs (FSDP)", "litgpt-rt-027",
           {"model": "tiiuae/falcon-40b", "seq_len": "1079"}, _RT),
    # tutorials/finetune_lora.md @0cc02afa: "Default (bf16-mixed): OutOfMemoryError"; its bf16-true row is rt-011's
    # 21.30 GB, so the same runs on the A100-40GB
    OomRun("Llama-2-7B LoRA bf16-mixed, micro-batch 1, 1 GPU", "litgpt-rt-011",
           {"weight_dtype": "fp32", "compute_dtype": "bf16 autocast (bf16-mixed)"},
           "litgpt tutorials/finetune_lora.md @0cc02afa"),
    # config_hub/finetune/gemma-7b/lora.yaml and gemma2-9b/lora.yaml @00af8b0d: r 16, dropout 0.1, q/k/v/proj/mlp/head
    OomRun("gemma-7b LoRA, micro-batch 1", "litgpt-ch-004",
           {"model": "google/gemma-7b", "micro_batch": "1", "lora_rank": "16"}, _CH, {"lora_dropout": 0.1}),
    OomRun("gemma-2-9b LoRA, micro-batch 1", "litgpt-ch-007",
           {"model": "google/gemma-2-9b", "micro_batch": "1", "lora_rank": "16"}, _CH, {"lora_dropout": 0.1}),
    # config_hub/finetune/{llama-2-7b,llama-3-8b,llama-3.1-8b}/full.yaml @00af8b0d: devices 4, micro 4, global 64
    OomRun("Llama-2-7B full, micro-batch 4, 4 GPUs (FSDP)", "litgpt-ch-003",
           {"model": "meta-llama/Llama-2-7b-hf", "micro_batch": "4"}, _CH, {"grad_accum": 4}),
    OomRun("Llama-3-8B full, micro-batch 4, 4 GPUs (FSDP)", "litgpt-ch-003",
           {"model": "meta-llama/Meta-Llama-3-8B", "micro_batch": "4"}, _CH, {"grad_accum": 4}),
    OomRun("Llama-3.1-8B full, micro-batch 4, 4 GPUs (FSDP)", "litgpt-ch-003",
           {"model": "meta-llama/Meta-Llama-3.1-8B", "micro_batch": "4"}, _CH, {"grad_accum": 4}),
    # Qwen README "Profiling of Memory and Speed": "OOM occurs on 4 A100-SXM4-80G GPUs ... with LoRA fine-tuning
    # without Deepspeed ZeRO 3" (finetune_lora_ds.sh's default is ds_config_zero2.json)
    OomRun("Qwen-72B LoRA, ZeRO-2, 4 GPUs, seq 256", "qwen-064",
           {"optimizer": "DeepSpeed AdamW (ds_config_zero2.json)"}, "QwenLM/Qwen README.md"),
)


def judge_oom(rows: list, data: Path, vc) -> list[dict]:
    """Each ``OOM_RUNS`` run: its estimate's total (the run's peak, CUDA context and allocator reserve included)
    against the GPU's memory (``fits``): "predicts OOM" passes, "fits" fails."""
    by_id = {row["id"]: row for row in rows}
    accepted = accepted_options(vc)
    error_cls = getattr(vc, "VramcalcError", ValueError)
    out = []
    for run in OOM_RUNS:
        row = {**by_id[run.base], **run.fields}
        setup = row_setup(row, data)
        options, _, blockers = estimate_options(setup, accepted)
        options.update(run.options)
        gpu = GPU_NAME[row["gpu"].strip()]
        record = dict(label=run.label, base=run.base, source=run.source, gpu=gpu,
                      gpus=_int(row["n_gpus"]) or 1, options=json.dumps(options, sort_keys=True),
                      estimate_bytes="", memory_bytes="", status="")
        if blockers or setup.model is None:
            out.append({**record, "status": "not expressible: " + ("; ".join(blockers) or "model unresolved")})
            continue
        try:
            breakdown = vc.estimate(setup.model, gpu=gpu, **in_repo(options))
        except error_cls as err:
            out.append({**record, "status": f"not expressible: {err}"})
            continue
        total = breakdown.total_bytes + run_peak(breakdown, setup)[1]
        memory = breakdown.total_bytes + breakdown.headroom_bytes(gpu)
        record.update(estimate_bytes=total, memory_bytes=memory,
                      status="predicts OOM" if total > memory else "FAIL: fits")
        out.append(record)
    return out


def _oom_section(records) -> list[str]:
    passed = sum(r["status"] == "predicts OOM" for r in records)
    failed = sum(r["status"] == "FAIL: fits" for r in records)
    lines = ["", "## Runs their sources report as out of memory", "",
             f"{passed} of {passed + failed} expressible runs predicted out of memory ({failed} predicted to fit); "
             "each run is a measured row with the fields that differ (`OOM_RUNS`), compared by its estimate's total "
             "(the run's peak with the CUDA context and the allocator's reserve) against the GPU's memory.", "",
             "| run | like row | GPU | estimate total GiB | GPU GiB | result | source |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        total = f"{int(r['estimate_bytes']) / GIB:.1f}" if r["estimate_bytes"] != "" else "-"
        memory = f"{int(r['memory_bytes']) / GIB:.1f}" if r["memory_bytes"] != "" else "-"
        lines.append(f"| {r['label']} | {r['base']} | {r['gpus']} x {r['gpu']} | {total} | {memory} | "
                     f"{r['status']} | {r['source']} |")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# vramcalc: what this version accepts


def load_vramcalc(lib: str | None):
    if lib:
        sys.path.insert(0, str(Path(lib).resolve()))
    else:
        sys.path.insert(0, str(REPO))
    return importlib.import_module("vramcalc")


def accepted_options(vc) -> set:
    names = set()
    setup_cls = getattr(vc, "TrainingSetup", None)
    if setup_cls is not None and dataclasses.is_dataclass(setup_cls):
        names |= {f.name for f in dataclasses.fields(setup_cls)}
    for name, param in inspect.signature(vc.estimate).parameters.items():
        if param.kind in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD):
            names.add(name)
    return names


def in_repo(options: dict) -> dict:
    """The options with a file they name (``sample_lengths``, repository-relative in the report) made absolute."""
    if "sample_lengths" in options:
        return {**options, "sample_lengths": str(REPO / options["sample_lengths"])}
    return options


def compared_bytes(breakdown, kind: str) -> tuple[int, str]:
    if kind == "torch_max_allocated":
        return breakdown.peak_tensor_bytes, "peak_tensor_bytes"
    pools = breakdown.details.get("stream_pools_bytes", 0)  # FSDP's streams (in reserved_bytes)
    streams = " + FSDP streams" if pools else ""
    if kind == "nvidia_smi":
        return breakdown.total_bytes + pools, "total_bytes" + streams
    if kind == "reserved":
        return breakdown.reserved_bytes, "peak_tensor+allocator_slack" + streams
    return breakdown.reserved_bytes, "peak_tensor+allocator_slack" + streams + " (statistic unstated)"


def measured_bytes(row: dict) -> tuple[int | None, str]:
    unit = _note(row, "unit") or "GB?"
    value = float(row["measured_gb"])
    if unit.startswith("GB(1e9)"):
        return int(value * GB), "GB"
    if unit.startswith("GiB"):
        return int(value * GIB), "GiB"
    return int(value * GB), "GB?"


def estimate_options(setup: RowSetup, accepted: set) -> tuple[dict, dict, list]:
    """The ``vramcalc.estimate`` options of a row (what it states explicitly, the stack's preset filling the rest),
    the stack knobs among them, and why this vramcalc cannot express the row (a knob it cannot take)."""
    blockers = list(setup.blockers)
    passed = {}
    for knob, value in setup.knobs.items():
        key = "lora_targets" if knob == "lora_lm_head" else knob
        if knob == "lora_lm_head":
            continue  # carried by lora_targets; a vramcalc that refuses lm_head raises below
        if key in accepted:
            passed[key] = value
        elif knob in KNOB_REQUIRED_WHEN_TRUE and value:
            blockers.append(f"needs --{knob.replace('_', '-')}")
    if setup.stack and "stack" in accepted:
        passed["stack"] = setup.stack
    return {**setup.options, **passed}, passed, blockers


def run_peak(breakdown, setup: RowSetup) -> tuple[str, int]:
    """The phase of the run's peak and its offset from the estimate's peak: a run whose peak is its first
    micro-batch (``RowSetup.first_micro_batch``) peaks at the largest phase but ``next-forward``."""
    phase_peaks = breakdown.details.get("phase_peak_bytes", {})
    if not (setup.first_micro_batch and "next-forward" in phase_peaks):
        return str(breakdown.phase), 0
    phase, first = max(((name, peak) for name, peak in phase_peaks.items() if name != "next-forward"),
                       key=lambda item: item[1])
    return phase, first - breakdown.peak_tensor_bytes


def judge(rows, data: Path, vc) -> list[dict]:
    accepted = accepted_options(vc)
    error_cls = getattr(vc, "VramcalcError", ValueError)
    out = []
    for row in rows:
        setup = row_setup(row, data)
        rel = (_note(row, "rel") or "").strip()
        record = dict(id=row["id"], source=row["id"].rsplit("-", 1)[0], rel=rel, stack=setup.stack or "",
                      method=row["method"].strip(), statistic=row["measure_kind"], model=_model_id(row),
                      gpus="1 GPU" if (_int(row["n_gpus"]) or 1) == 1 else "several GPUs",
                      measured=row["measured_gb"], unit=(_note(row, "unit") or ""), status="", reason="",
                      compared_with="", measured_bytes="", estimate_bytes="", error="", phase="",
                      options="", knobs_passed="", assumptions="; ".join(setup.assumptions), terms="",
                      error_if_gib="", shape_error="", growth_error="", shape_reference="")
        options, passed, blockers = estimate_options(setup, accepted)
        if blockers or setup.model is None:
            record.update(status="not expressible" if row["measure_kind"] != "estimate_table" else "not scored",
                          reason="; ".join(blockers) or "model unresolved")
            out.append(record)
            continue
        gpu = GPU_NAME.get(row["gpu"].strip())
        record["options"] = json.dumps(options, sort_keys=True)
        record["knobs_passed"] = ",".join(sorted(passed))
        try:
            breakdown = vc.estimate(setup.model, gpu=gpu, **in_repo(options))
        except error_cls as err:
            message = str(err)
            hint = ""
            if "lm_head" in message or "lm_head" in str(options.get("lora_targets", "")):
                hint = "needs LoRA on lm_head: "
            if "unsupported architecture" in message:
                hint = f"{_family_of(Path(setup.model)) or ''} family unsupported: "
            record.update(status="not expressible", reason=hint + message)
            out.append(record)
            continue
        estimate, what = compared_bytes(breakdown, row["measure_kind"])
        phase, shift = run_peak(breakdown, setup)
        estimate += shift
        if setup.first_micro_batch:
            what += " (first micro-batch)"
        measured, unit = measured_bytes(row)
        measured //= setup.gpus_summed
        record.update(compared_with=what + (f" (published sum / {setup.gpus_summed} GPUs)"
                                            if setup.gpus_summed > 1 else ""),
                      estimate_bytes=estimate, phase=phase, terms=json.dumps(breakdown.terms()))
        if setup.bound:
            # the GPU class held the run: the peak at this seq_len is at most the GPU's size (read as GiB)
            bound = float(row["measured_gb"]) * GIB
            estimate_total = breakdown.total_bytes
            record.update(compared_with="total_bytes <= VRAM class (GiB)", estimate_bytes=estimate_total,
                          measured_bytes=int(bound), error=f"{(estimate_total - bound) / bound:+.4f}",
                          status="bound pass" if estimate_total <= bound else "bound FAIL")
        elif setup.unit_unstated:
            as_gib = measured * GIB // GB
            record.update(measured_bytes=measured, error=f"{(estimate - measured) / measured:+.4f}",
                          error_if_gib=f"{(estimate - as_gib) / as_gib:+.4f}", status="unit unstated")
        else:
            record.update(measured_bytes=measured, error=f"{(estimate - measured) / measured:+.4f}", status="judged")
        out.append(record)
    _shape_errors([r for r in out if r["status"] == "unit unstated"])
    return out


def _shape_errors(records) -> None:
    """Errors of a sequence-length sweep, within one model, method and setup (every option but ``seq_len``), each
    row against the sweep's shortest one: ``shape_error`` = (e / e0) / (m / m0) - 1, in which the unit of the
    published numbers cancels (but an error of the level e0 enters it), and ``growth_error`` = (e - e0) / (m - m0) - 1
    with m read as 1e9 bytes (2^30 would lower it by 6.9%), where the measured growth is at least 5% of m0 (the
    level cancels, the unit does not). Empty for the reference row and a sweep of one."""
    sweeps = {}
    for r in records:
        options = json.loads(r["options"])
        seq = options.pop("seq_len", None)
        sweeps.setdefault((r["model"], r["method"], json.dumps(options, sort_keys=True)), []).append((seq, r))
    for rows in sweeps.values():
        rows.sort(key=lambda item: item[0] or 0)
        seq0, first = rows[0]
        first["shape_reference"] = f"seq {seq0}"
        for seq, r in rows[1:]:
            ratio_e = int(r["estimate_bytes"]) / int(first["estimate_bytes"])
            ratio_m = int(r["measured_bytes"]) / int(first["measured_bytes"])
            r.update(shape_error=f"{ratio_e / ratio_m - 1:+.4f}", shape_reference=f"seq {seq0}")
            grown = int(r["measured_bytes"]) - int(first["measured_bytes"])
            if grown >= 0.05 * int(first["measured_bytes"]):
                r["growth_error"] = f"{(int(r['estimate_bytes']) - int(first['estimate_bytes'])) / grown - 1:+.4f}"


# ---------------------------------------------------------------------------------------------------------------
# Report


def p90(values):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = 0.9 * (len(ordered) - 1)
    low = int(index)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (index - low)


def _stats(records):
    errors = [abs(float(r["error"])) for r in records]
    signed = [float(r["error"]) for r in records]
    if not errors:
        return None
    return dict(n=len(errors), median=statistics.median(errors), p90=p90(errors), max=max(errors),
                bias=statistics.median(signed))


def _table(records, key) -> list[str]:
    groups = {}
    for r in records:
        groups.setdefault(r[key], []).append(r)
    lines = [f"| {key} | n | median abs err | P90 | max | median signed |", "|---|---|---|---|---|---|"]
    for name in sorted(groups):
        s = _stats(groups[name])
        lines.append(f"| {name} | {s['n']} | {s['median']:.1%} | {s['p90']:.1%} | {s['max']:.1%} | {s['bias']:+.1%} |")
    s = _stats(records)
    if s:
        lines.append(f"| **all** | {s['n']} | {s['median']:.1%} | {s['p90']:.1%} | {s['max']:.1%} | {s['bias']:+.1%} |")
    return lines


# the page builds bnb.optim.Adam8bit itself, so bert-large-uncased's word and position tables ((30522 + 512) x 1024
# weights, nn.Embedding) keep 8-bit states, 2 x 1 B per weight, where the hf stack's Trainer-built optimizer keeps
# 2 x 4 B (their absmax blocks left out)
HF_PERF_DOC_EMBEDDING_STATE_BYTES = 6 * (30522 + 512) * 1024


def _hf_perf_doc_note(record: dict) -> str:
    """The hf-perf-doc rows' mechanisms: the 2022 stack's as the options give them, and the 8-bit optimizer's
    embedding states, which the hf stack's Trainer-built optimizer keeps at 32 bits."""
    note = ("the 2022 stack: the page's own 1343 MiB CUDA context probe (--cuda-context-mib; torch 1.10 loads "
            "every kernel), torch 1.10's softmax saving its input (--softmax-saves-input) and 4.16's fp32 extended "
            "mask (--extended-mask)")
    if json.loads(record["options"]).get("optimizer") == "adamw-8bit":
        eight_bit = (int(record["estimate_bytes"]) - HF_PERF_DOC_EMBEDDING_STATE_BYTES - int(record["measured_bytes"])
                     ) / int(record["measured_bytes"])
        note += (f"; {eight_bit:+.1%} with the embeddings' 8-bit states (estimated 32-bit, as the Trainer keeps "
                 "them)")
    return note


# the page's steps, each against the run it adds a technique to (its prose: "Let's add it to the mix of the previous
# methods"): (row, the row before it, what changed)
HF_PERF_DOC_STEPS = (("hf-perf-doc-002", "hf-perf-doc-001", "gradient accumulation (batch 1 x 4)"),
                     ("hf-perf-doc-003", "hf-perf-doc-002", "gradient checkpointing"),
                     ("hf-perf-doc-004", "hf-perf-doc-001", "fp16 mixed precision"),
                     ("hf-perf-doc-005", "hf-perf-doc-003", "fp16 with accumulation and checkpointing"),
                     ("hf-perf-doc-006", "hf-perf-doc-001", "Adafactor"),
                     ("hf-perf-doc-007", "hf-perf-doc-005", "Adafactor with the three"),
                     ("hf-perf-doc-008", "hf-perf-doc-001", "bnb Adam8bit"),
                     ("hf-perf-doc-009", "hf-perf-doc-005", "bnb Adam8bit with the three"))


def _hf_perf_doc_deltas(records) -> list[str]:
    """The hf-perf-doc rows as the development set's README rates them ("reliability is highest for relative
    effects"): each technique's change of the measured memory against the estimate's, in which the CUDA context and
    any other constant of the 2022 stack cancel."""
    by_id = {r["id"]: r for r in records if r["id"].startswith("hf-perf-doc")}
    if not by_id:
        return []
    lines = ["", "## hf-perf-doc: each technique's saving (the CUDA context cancels)", "",
             "The page adds one technique at a time; its README rates these rows highest for relative effects. "
             "Saving = the row before's memory less this row's (GiB), measured (nvidia-smi) and estimated "
             "(total_bytes).", "",
             "| row | against | technique | measured saving GiB | estimated saving GiB | error of the saving |",
             "|---|---|---|---|---|---|"]
    for rid, base, what in HF_PERF_DOC_STEPS:
        if rid not in by_id or base not in by_id:
            continue
        row, before = by_id[rid], by_id[base]
        measured = (int(before["measured_bytes"]) - int(row["measured_bytes"])) / GIB
        estimated = (int(before["estimate_bytes"]) - int(row["estimate_bytes"])) / GIB
        error = f"{(estimated - measured) / measured:+.1%}" if measured else "-"
        lines.append(f"| {rid} | {base} | {what} | {measured:.2f} | {estimated:.2f} | {error} |")
    return lines


def mechanism_note(record: dict) -> str:
    """The mechanism still open for a row's error (docs/stacks-research.md), or ''. Mechanisms vramcalc now models
    (Q1-Q3 through the litgpt knobs, the stacks' losses, compile, offload, optimizer-in-backward; bf16-true, L2
    the StableEmbedding gradient, Q5 torchao's eager dequantization: terms/stack_layers.py) are not listed."""
    rid = record["id"]
    if rid.startswith("hf-perf-doc"):
        return _hf_perf_doc_note(record)
    if rid == "torchtune-023":
        return ("FSDP's side-stream pools modelled (the gradient shards cached on the reduce-scatter stream beside "
                "the backward-start peak); the rest open (section 4)")
    if rid == "torchtune-032":
        return ("open: torchtune 2024 FSDP1 full fine-tuning at 2 x 512, about 4 GB per rank above the step's "
                "tensors and FSDP's side-stream pools (section 4)")
    if rid == "torchtune-029":
        return "open: torchtune 2024 FSDP1 LoRA, reserved (section 4)"
    if rid in ("torchtune-016", "torchtune-017"):
        return ("statistic unstated, judged as reserved: FSDP2's all-gather stream keeps two units' buffers cached "
                "beside the default stream's peak; the allocated peak is within 2.1% (section 4)")
    if rid in LITGPT_CH_QLORA_OPEN:
        return ("open: litgpt 0.4.x QLoRA, the backward peak below the measurement by the 4-bit held inputs once "
                "more; no mechanism found (section 2)")
    if rid == "torchtune-019":
        return ("open: the step at 4 x 2048 with compile, the recipe's held logits counted (--loss torchtune-2024), "
                "is above the load peak (--load requantize); statistic unstated")
    if rid == "torchtune-037":
        return ("load-phase row: --load requantize's reserved memory, torchtune 0.1.1's build and load_state_dict "
                "replayed through the caching allocator (terms/load_reserved.py): 9.13 GB, the tutorial's 9.13 GB "
                "after init; the step's further 0.16 GB not modelled (section 2)")
    if rid == "torchtune-028":
        return ("open: the same setup and code as torchtune-037 (9.29 GB in the README's previous revision and in "
                "the tutorial); 8.57 GB is below the tutorial's 9.13 GB reserved right after init, which the "
                "estimate replays (--load requantize, terms/load_reserved.py; section 2)")
    return ""


def _unit_unstated_section(records) -> list[str]:
    """Rows whose unit is not stated ("GB?"): the level under each reading and the unit-free shape of each sweep."""
    if not records:
        return []

    def stats(values):
        values = [abs(v) for v in values]
        return f"{statistics.median(values):.1%} | {p90(values):.1%} | {max(values):.1%}" if values else "- | - | -"

    lines = ["", "## Unit unstated (GB? rows): both readings, and the shape of each sweep", "",
             "These rows state their memory in \"GB\" without saying 1e9 or 2^30 bytes (the Qwen README's profiling "
             "table prints \"NN.NG\"), and no statistic: they stay out of the headline. Each is compared "
             "(`reserved_bytes`, the unstated-statistic rule) under both readings, and, where it belongs to a "
             "sequence-length sweep, by its shape: (estimate / estimate at the sweep's shortest length) / (measured / "
             "measured at that length) - 1, in which the unit cancels. No coefficient is fitted to them.", "",
             "| method | n | reading 1e9: median / P90 / max abs err | reading 2^30: median / P90 / max | "
             "shape (n) | shape: median / P90 / max abs err | growth (n) | growth (1e9): median / P90 / max |",
             "|---|---|---|---|---|---|---|---|"]
    for method in sorted({r["method"] for r in records}) + ["all"]:
        group = [r for r in records if method in ("all", r["method"])]
        shaped = [float(r["shape_error"]) for r in group if r["shape_error"]]
        grown = [float(r["growth_error"]) for r in group if r["growth_error"]]
        lines.append(f"| {method} | {len(group)} | {stats([float(r['error']) for r in group])} | "
                     f"{stats([float(r['error_if_gib']) for r in group])} | {len(shaped)} | {stats(shaped)} | "
                     f"{len(grown)} | {stats(grown)} |")
    lines += ["", "| id | method | model | GPUs | seq | measured | compared with | estimate GB | error (1e9) | "
              "error (2^30) | shape error | growth error (1e9) | phase |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: r["id"]):
        opts = json.loads(r["options"])
        shape = f"{float(r['shape_error']):+.1%}" if r["shape_error"] else f"({r['shape_reference'] or '-'})"
        growth = f"{float(r['growth_error']):+.1%}" if r["growth_error"] else "-"
        lines.append(f"| {r['id']} | {r['method']} | {r['model']} | {opts.get('num_gpus', 1)} | "
                     f"{opts.get('seq_len')} | {r['measured']} | {r['compared_with']} | "
                     f"{int(r['estimate_bytes']) / GB:.2f} | "
                     f"{float(r['error']):+.1%} | {float(r['error_if_gib']):+.1%} | {shape} | {growth} | "
                     f"{r['phase']} |")
    return lines


def write_report(records, oom, md_path: Path, csv_path: Path, vc_version: str, accepted: set) -> None:
    fields = list(records[0].keys())
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)
    judged = [r for r in records if r["status"] == "judged"]
    trusted = [r for r in judged if r["rel"] in ("high", "medium-high", "medium")]
    bounds = [r for r in records if r["status"].startswith("bound")]
    blocked = [r for r in records if r["status"] == "not expressible"]
    unstated = [r for r in records if r["status"] == "unit unstated"]
    unscored = [r for r in records if r["status"] == "not scored"]
    knobs = sorted(accepted & set(KNOB_REQUIRED_WHEN_TRUE + KNOB_OPTIONAL))
    lines = [
        "# vramcalc against published peak-memory measurements",
        "",
        "Generated by `python benchmarks/published.py` from `shared/reference/published/measurements.csv` "
        "(217 rows; provenance, units and caveats in its README). Error = (estimate - measured) / measured. "
        "`torch_max_allocated` rows are compared with `peak_tensor_bytes`, `reserved` and `unspecified` rows with "
        "`peak_tensor_bytes + allocator_slack` (under FSDP plus the blocks its own streams keep cached, "
        "`details.stream_pools_bytes`), `nvidia_smi` rows with `total_bytes` (plus those); the unit of each row "
        "(GB = 1e9, GiB = 2^30) converts the published number. No coefficient is fitted to these rows.",
        "",
        f"vramcalc {vc_version}; stack knobs this version accepts: "
        f"{', '.join(knobs) or 'none (stack presets not yet built)'}.",
        "",
        f"Rows: {len(records)}; judged {len(judged)} (rel high/medium: {len(trusted)}); upper bounds {len(bounds)} "
        f"({sum(r['status'] == 'bound pass' for r in bounds)} pass); unit unstated {len(unstated)} (below, apart); "
        f"not expressible {len(blocked)}; "
        f"not scored (estimate_table) {len(unscored)}.",
        "",
        "## Headline: rows rated high / medium-high / medium",
        "",
        *_table(trusted, "method"),
        "",
        "Single GPU only (multi-GPU rows: litgpt FSDP1 flat parameters and bf16 FSDP states are modelled; the "
        "open torchtune 2024 FSDP1 rows are in docs/stacks-research.md section 4):",
        "",
        *_table([r for r in trusted if r["gpus"] == "1 GPU"], "method"),
        "",
        *_table(trusted, "source"),
        "",
        "## All judged rows",
        "",
        *_table(judged, "method"),
        "",
        *_table(judged, "source"),
        "",
        *_table(judged, "stack"),
        "",
        *_table(judged, "statistic"),
        "",
        *_table(judged, "gpus"),
        "",
        "## Each judged row",
        "",
        "| id | rel | method | model | measured | unit | compared with | estimate GB | error | phase "
        "| mechanism (docs/stacks-research.md) | options |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(judged, key=lambda r: r["id"]):
        lines.append(f"| {r['id']} | {r['rel']} | {r['method']} | {r['model']} | {r['measured']} | {r['unit']} | "
                     f"{r['compared_with']} | {int(r['estimate_bytes']) / GB:.2f} | {float(r['error']):+.1%} | "
                     f"{r['phase']} | {mechanism_note(r)} | `{r['options']}` |")
    lines += ["", "## Upper bounds (unsloth-ctx: longest context that fitted a GPU of this size)", "",
              "| id | seq_len | VRAM class | estimate total GiB | estimate / bound | result |",
              "|---|---|---|---|---|---|"]
    for r in bounds:
        opts = json.loads(r["options"])
        lines.append(f"| {r['id']} | {opts.get('seq_len')} | {r['measured']} | {int(r['estimate_bytes']) / GIB:.2f} | "
                     f"{1 + float(r['error']):.2f} | {r['status']} |")
    lines += _hf_perf_doc_deltas(judged)
    lines += _unit_unstated_section(unstated)
    lines += _oom_section(oom)
    reasons = {}
    for r in blocked:  # grouped by the first reason; every reason of a row is in published.csv
        reasons.setdefault(r["reason"].split("; ")[0], []).append(r["id"])
    lines += ["", "## Not expressible yet (grouped by first reason; all reasons per row in published.csv)", "",
              "| reason | rows | ids |", "|---|---|---|"]
    for reason, ids in sorted(reasons.items(), key=lambda item: -len(item[1])):
        shown = ", ".join(ids) if len(ids) <= 8 else ", ".join(ids[:4]) + f", ... {ids[-1]}"
        lines.append(f"| {reason} | {len(ids)} | {shown} |")
    lines += ["", f"Not scored: {', '.join(r['id'] for r in unscored)} (LLaMA-Factory's estimate table).", ""]
    md_path.write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder with measurements.csv and configs/")
    parser.add_argument("--lib", default=None, help="folder holding the vramcalc package to judge (default: this repo)")
    parser.add_argument("--out", default=str(HERE / "published.md"))
    args = parser.parse_args(argv)
    data = Path(args.data)
    vc = load_vramcalc(args.lib)
    rows = list(csv.DictReader((data / "measurements.csv").open()))
    records = judge(rows, data, vc)
    oom = judge_oom(rows, data, vc)
    md_path = Path(args.out)
    write_report(records, oom, md_path, md_path.with_suffix(".csv"), getattr(vc, "__version__", "?"),
                 accepted_options(vc))
    judged = [r for r in records if r["status"] == "judged"]
    blocked = sum(r["status"] == "not expressible" for r in records)
    print(f"{len(judged)} judged, {blocked} not expressible; wrote {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
