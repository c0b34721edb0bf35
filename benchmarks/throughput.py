"""Predicted vs published training throughput: benchmarks/throughput_published.csv -> benchmarks/throughput.md.

Run: ``PYTHONPATH=. python3 benchmarks/throughput.py``. Standard library only. Every rate comes from
data/achievable_rates.csv (GEMM and attention measurements with their sources) and the GPU catalogue; nothing here is
fitted to a row of the published table. Rows the step-time model has no mechanism for are listed with the reason.
"""

from __future__ import annotations

import csv
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vramcalc import step_time as st  # noqa: E402
from vramcalc.catalogue import get_gpu, get_model  # noqa: E402

PUBLISHED = ROOT / "benchmarks" / "throughput_published.csv"
REPORT = ROOT / "benchmarks" / "throughput.md"


@dataclass(frozen=True)
class Arch:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    vocab: int


# Llama 3.2 3B is not in data/models.csv: torchtune/models/llama3_2/_model_builders.py llama3_2_3b (torchtune @bd2a0fc):
# vocab 128256, 28 layers, 24 heads, 8 KV heads, embed 3072, intermediate 8192 (head_dim 3072/24 = 128).
# Qwen-7B (Qwen 1, QWenLMHeadModel): hidden 4096, 32 layers, 32 heads (no GQA), kv_channels 128, config
# intermediate_size 22016 split into w1 and w2 of 11008 each (a gated MLP of width 11008), vocab 151936: a copy of
# its config.json in the public code corpus (code ids 910551238 and 30827603422).
EXTRA_ARCH = {"llama-3.2-3b": Arch(3072, 28, 24, 8, 128, 8192, 128256),
              "qwen-7b": Arch(4096, 32, 32, 32, 128, 11008, 151936)}

# The torchtitan H100s are 96 GB HBM2e parts at 2.4 TB/s and 500 W (benchmarks/llama3_h100_202412_torchtitan.md).
BANDWIDTH_OVERRIDE_GB_S = {"H100 96GB HBM2e 2.4 TB/s at 500 W (source)": 2400.0}
POWER_CAP_W = {"H100 96GB HBM2e 2.4 TB/s at 500 W (source)": 500.0}

GPUS_PER_NODE = 8  # HGX/DGX nodes of the sources (Grand Teton, WhiteFiber, torchtune's 8x A100)


def linear_shapes(a: Arch, target: str) -> list[tuple[int, int, int]]:
    """(in, out, copies per layer) of the linears a LoRA target name matches (peft matches module-name suffixes:
    Qwen's "c_proj" is both attn.c_proj and mlp.c_proj; "c_attn" is the fused q,k,v projection)."""
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    table = {"q": [(a.hidden, q, 1)], "k": [(a.hidden, kv, 1)], "v": [(a.hidden, kv, 1)], "o": [(q, a.hidden, 1)],
             "gate": [(a.hidden, a.inter, 1)], "up": [(a.hidden, a.inter, 1)], "down": [(a.inter, a.hidden, 1)],
             "c_attn": [(a.hidden, q + 2 * kv, 1)], "c_proj": [(q, a.hidden, 1), (a.inter, a.hidden, 1)],
             "w1": [(a.hidden, a.inter, 1)], "w2": [(a.hidden, a.inter, 1)]}
    return table[target]


def arch_of(name: str) -> Arch:
    if name in EXTRA_ARCH:
        return EXTRA_ARCH[name]
    m = get_model(name)
    return Arch(m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.intermediate_size, m.vocab_size)


def predict(row: dict[str, str], rates: dict) -> tuple[float | None, str, st.StepTime | None]:
    """Predicted tokens/s in the row's unit, or None with the reason."""
    if row["offload"] == "fsdp-cpu-offload":
        return None, "optimizer step on the host CPU (FSDP CPU offload): no CPU AdamW rate in the model", None
    if int(row["pp"] or 1) > 1:
        return None, "pipeline schedules are not modelled", None
    a = arch_of(row["model"])
    shape = st.DecoderShape(a.hidden, a.layers, a.heads, a.kv_heads, a.head_dim, a.inter, a.vocab)
    gpu = get_gpu(row["gpu"])
    dp, tp, cp = int(row["dp"] or 1), int(row["tp"] or 1), int(row["cp"] or 1)
    rank = int(row["lora_rank"] or 0)
    n_a = st.lora_params(a.hidden, a.layers, a.heads, a.kv_heads, a.head_dim, a.inter, rank) if rank else 0
    train_base = row["method"] == "full"
    dtype = "bf16" if gpu.bf16_dense_tflops else "fp16"
    mm_rate = st.achievable_rate(gpu.name, "matmul", dtype, rates)
    attn_rate = st.achievable_rate(gpu.name, "attention", dtype, rates)
    fp8_rate = st.achievable_rate(gpu.name, "matmul", "fp8", rates)
    if mm_rate is None or attn_rate is None:
        return None, f"no achievable rate for {gpu.name}", None
    if row["precision"] == "fp8" and fp8_rate is None:
        return None, f"no fp8 rate for {gpu.name}", None
    titan = row["source_repo"] == "pytorch/torchtitan"
    if titan:  # FSDP mixed precision: fp32 params, grads and Adam states; bf16 all-gather, fp32 reduce-scatter
        opt_bytes = st.optimizer_step_bytes(1, param_bytes=4, grad_bytes=4, state_bytes=4)
    else:  # torchtune dtype=bf16: params, grads and AdamW states in bf16; bitsandbytes 8-bit states
        opt_bytes = st.optimizer_step_bytes(1, param_bytes=2, grad_bytes=2, state_bytes=1 if "8bit" in row["optimizer"] else 2)
    serial = 0.0
    if row["offload"] == "paged-optimizer":
        # bitsandbytes paged 8-bit states (1 byte each, 2 states) evicted to host: in and out over PCIe each step
        # (assumption: the whole state is paged, since the 16 GB bf16 weights fill the 24 GB card)
        trainable = shape.matmul_params + a.vocab * a.hidden
        serial = st.comm_seconds(2 * trainable, gpu.pcie_gb_s, efficiency=1.0)
    targets = [t for t in row["lora_targets"].split(" ")[0].split(",") if t] if rank else []
    lora_linears = tuple((k, n, a.layers * copies) for t in targets for k, n, copies in linear_shapes(a, t))
    setup = st.StepSetup(
        tokens=int(row["batch_per_gpu"]) * int(row["seq_len"]), seq_len=int(row["seq_len"]), train_base=train_base,
        micro_batches=int(row["grad_accum"] or 1), adapted_linears=sum(c for _, _, c in lora_linears),
        lora_linears=lora_linears, lora_rank=rank, lora_dropout=float(row["lora_dropout"] or 0) > 0,
        adapter_bytes=4.0 if row["adapter_dtype"] == "fp32" else 2.0, quant_kernel=row["quant_kernel"] or "bnb",
        activation_offload=row["offload"] == "activations", pcie_gb_s=gpu.pcie_gb_s or 0.0,
        adapter_params=n_a, grad_ckpt=row["grad_ckpt"], fused_elementwise=row["compile"] == "yes",
        loss=row["loss"] or "hf", quant_bits=4 if row["method"] == "qlora" else 0,
        fp8_linears=row["precision"] == "fp8", optimizer_bytes_per_param=opt_bytes, dp=dp,
        sharding=row["dp_sharding"] or "none", tp=tp, cp=cp, async_tp=row["async_tp"] == "yes",
        grad_bytes_on_wire=4 if titan else 2, serial_extra_s=serial)
    nvlink = (gpu.nvlink_bidir_gb_s or 0) / 2 or gpu.pcie_gb_s
    one_node = dp * tp * cp <= GPUS_PER_NODE
    work = st.step_work(shape, setup, matmul_tflops=mm_rate.tflops,
                        fp8_matmul_tflops=fp8_rate.tflops if fp8_rate else None,
                        dp_link_gb_s=nvlink if one_node else (gpu.infiniband_gb_s or gpu.pcie_gb_s), tp_link_gb_s=nvlink)
    bw_gb_s = BANDWIDTH_OVERRIDE_GB_S.get(row["gpu_note"], gpu.bandwidth_gb_s)
    clock = st.power_capped_clock_ratio(POWER_CAP_W[row["gpu_note"]], gpu.tdp_w) if row["gpu_note"] in POWER_CAP_W \
        else 1.0
    if clock < 1.0:  # the same work at a lower clock: fp8 GEMMs were entered at the bf16 rate's equivalent above
        work = st.step_work(shape, setup, matmul_tflops=mm_rate.tflops * clock,
                            fp8_matmul_tflops=fp8_rate.tflops * clock if fp8_rate else None,
                            dp_link_gb_s=nvlink if one_node else (gpu.infiniband_gb_s or gpu.pcie_gb_s),
                            tp_link_gb_s=nvlink)
    t = st.step_time(work, st.StepRates(mm_rate.tflops * clock, attn_rate.tflops * clock, bw_gb_s,
                                        gpu.bf16_dense_tflops or gpu.fp16_dense_tflops))
    value = t.tokens_per_s * int(row["num_gpus"]) if row["unit"].startswith("tokens/s total") else t.tokens_per_s
    return value, "", t


def main() -> None:
    rates = st.load_achievable_rates()
    with open(PUBLISHED, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    lines, errors, skipped = [], [], []
    for row in rows:
        pred, reason, t = predict(row, rates)
        pub = float(row["published_tokens_per_s"])
        if pred is None:
            skipped.append((row, reason))
            continue
        err = pred / pub - 1
        errors.append((row, err))
        lines.append(f"| {row['id']} | {row['model']} | {row['method']} | {row['num_gpus']}x {row['gpu']} | {row['precision']} "
                     f"| {row['batch_per_gpu']}x{row['seq_len']} | {row['grad_ckpt']} | {row['compile']} "
                     f"| dp{row['dp']}/tp{row['tp']}/cp{row['cp']} | {pub:,.0f} | {pred:,.0f} | {err:+.0%} "
                     f"| {t.matmul_s / t.step_s:.0%}/{t.attention_s / t.step_s:.0%}/{t.memory_s / t.step_s:.0%}/{t.host_s / t.step_s:.0%}/{t.exposed_comm_s / t.step_s:.0%} | {t.mfu:.0%} |")
    abs_err = [abs(e) for _, e in errors]
    ratio = [max(1 + e, 1 / (1 + e)) for _, e in errors]
    within = sum(1 for r in ratio if r <= 1.5)
    worst_row, worst = max(errors, key=lambda x: abs(x[1]))
    catalogue_gpu = [(r, e) for r, e in errors if r["gpu_note"] not in BANDWIDTH_OVERRIDE_GB_S]
    cat_abs = [abs(e) for _, e in catalogue_gpu]
    cat_within = sum(1 for _, e in catalogue_gpu if max(1 + e, 1 / (1 + e)) <= 1.5)
    cat_worst_row, cat_worst = max(catalogue_gpu, key=lambda x: abs(x[1]))
    out = [
        "# Predicted vs published training throughput",
        "",
        "Generated by `benchmarks/throughput.py` from `benchmarks/throughput_published.csv` (every row: source repo, file,",
        "commit, table) with `vramcalc/step_time.py` and the rates in `data/achievable_rates.csv`. No coefficient is fitted",
        "to these rows. error = predicted / published - 1. Columns `mm/attn/mem/host/comm` give the share of the predicted",
        "step spent in matmuls, attention, memory-bound kernels, waiting for the host to issue kernels and exposed",
        "communication; MFU is against the bf16 dense peak.",
        "",
        f"**{len(errors)} rows predicted, {len(skipped)} not modelled. Median |error| {statistics.median(abs_err):.0%}; "
        f"mean error {statistics.mean(e for _, e in errors):+.0%}; worst {worst:+.0%} ({worst_row['id']}); "
        f"{within} of {len(errors)} rows within a factor of 1.5.**",
        "",
        f"**On catalogue GPUs only ({len(catalogue_gpu)} rows; the torchtitan Grand Teton H100s are 96 GB HBM2e parts "
        f"capped at 500 W, a GPU the catalogue does not hold, predicted with the catalogue H100's rates derated by "
        f"`step_time.power_capped_clock_ratio` = {st.power_capped_clock_ratio(500, 700):.3f} and 2.4 TB/s): median "
        f"|error| {statistics.median(cat_abs):.0%}, worst {cat_worst:+.0%} ({cat_worst_row['id']}), {cat_within} of "
        f"{len(catalogue_gpu)} within a factor of 1.5.**",
        "",
        "Mechanisms added in phase 2 (issue 16), each from its own source and fixed before this table was rerun:",
        "(1) host overhead: every kernel costs the host ~10 µs to issue (`HOST_SECONDS_PER_KERNEL`, inside the",
        "5-25 µs per eager op of the PyTorch dispatch path), kernels counted per layer from the modules (eager",
        "transformers Llama: 7 GEMMs, 1 SDPA, 31 elementwise; compiled: 4 fused), LoRA's 4 per adapted linear and",
        "dequantization per quantized linear, per micro-batch; each kind of work takes max(GPU time, kernels x 10 µs);",
        "(2) gradient accumulation: dequantization and kernels are paid per micro-batch (Qwen's rows are batch 1 x",
        "8 accumulation steps: column grad_accum); (3) the 500 W power cap: dynamic power ~ f^3 over a 30% static",
        "share gives 0.840 of the 700 W clock for matmuls and attention. Before phase 2: median 33%, worst +579%",
        "(qwen7b-qlora-256), 33 of 48 within 1.5x.",
        "",
        "Known gaps, stated rather than tuned away: (1) async TP is assumed to hide all TP communication (its design",
        "intent; `ASYNC_TENSOR_PARALLEL_OVERLAP = 1.0`), and the async-TP rows show that it hides far less",
        "(published speedups 1.04-1.16x, predicted 1.3-1.6x); (2) Qwen's 2023 HF Trainer runs (torch 2.0, reentrant",
        "checkpointing, flash-attn 2 with its unpad/pad copies) stay over-predicted by 23-50% for LoRA, and its GPTQ",
        "Q-LoRA (auto-gptq Int4 kernels, not bitsandbytes NF4) takes a flat 3.0 s/it at 256 and 512 tokens that",
        "neither the host term (~0.1 s per micro-step) nor NF4-style dequantization explains; (3) context parallelism",
        "at 128k-256k tokens is over-predicted by a third: its ring-attention exchange and causal load balance are",
        "not modelled.",
        "",
        "| id | model | method | GPUs | prec | batch x seq | AC | compile | parallel | published tok/s | predicted | error | mm/attn/mem/host/comm | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *lines,
        "",
        "Units follow the source: torchtune and Qwen rows are tokens/s over all GPUs, torchtitan rows tokens/s per GPU.",
        "",
        "## Not modelled",
        "",
        *[f"- {r['id']} ({r['published_tokens_per_s']} tok/s): {why}" for r, why in skipped],
        "",
        "## By group",
        "",
    ]
    groups: dict[str, list[float]] = {}
    for row, e in errors:
        key = f"{row['source_repo']} {row['gpu']} {row['precision']}"
        groups.setdefault(key, []).append(e)
    for key, es in sorted(groups.items()):
        out.append(f"- {key}: {len(es)} rows, median error {statistics.median(es):+.0%}")
    REPORT.write_text("\n".join(out) + "\n", encoding="utf-8")
    print("\n".join(line for line in out if line.startswith("**")))
    for key, es in sorted(groups.items()):
        print(f"  {key}: {len(es)} rows, median error {statistics.median(es):+.0%}")


if __name__ == "__main__":
    main()
