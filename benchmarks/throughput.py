"""Predicted vs published training throughput: benchmarks/throughput_published.csv -> benchmarks/throughput.md.

Run: ``PYTHONPATH=. python3 benchmarks/throughput.py``. Standard library only. Every rate comes from
data/achievable_rates.csv (GEMM, attention and memory-bandwidth measurements with their sources) and the GPU
catalogue; nothing here is fitted to a row of the published table. Rows the step-time model has no mechanism for are
listed with the reason.
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
from vramcalc.cost import NETWORK_GB_S_PER_NIC, link_facts  # noqa: E402
from vramcalc.options import Interconnect  # noqa: E402

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
# Qwen (v1) 1.8B, 14B, 72B (held-out rows): hidden / layers / heads 2048/24/16, 5120/40/40, 8192/80/64 (Bai et al. 2023,
# "Qwen Technical Report", model sizes table), kv_channels 128, no GQA; config intermediate_size 11008, 27392, 49152
# split into w1 and w2 (gated MLP widths 5504, 13696, 24576); vocab 151936 (1.8B) and 152064 (14B, 72B).
EXTRA_ARCH = {"llama-3.2-3b": Arch(3072, 28, 24, 8, 128, 8192, 128256),
              "qwen-7b": Arch(4096, 32, 32, 32, 128, 11008, 151936),
              "qwen-1.8b": Arch(2048, 24, 16, 16, 128, 5504, 151936),
              "qwen-14b": Arch(5120, 40, 40, 40, 128, 13696, 152064),
              "qwen-72b": Arch(8192, 80, 64, 64, 128, 24576, 152064)}

# The torchtitan H100s are 96 GB HBM2e parts at 2.4 TB/s and 500 W (benchmarks/llama3_h100_202412_torchtitan.md): a
# datasheet bandwidth outside the catalogue, so its achievable bandwidth follows the rule of the derived memory rows of
# data/achievable_rates.csv, datasheet x the median measured/datasheet ratio of the HBM GPUs
# (``step_time.measured_memory_efficiency``).
BANDWIDTH_OVERRIDE_GB_S = {"H100 96GB HBM2e 2.4 TB/s at 500 W (source)": 2400.0}
POWER_CAP_W = {"H100 96GB HBM2e 2.4 TB/s at 500 W (source)": 500.0}



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


def predict(row: dict[str, str], rates: dict, *, datasheet_bandwidth: bool = False
            ) -> tuple[float | None, str, st.StepTime | None]:
    """Predicted tokens/s in the row's unit, or None with the reason. ``datasheet_bandwidth``: memory-bound work at
    the datasheet bandwidth (the model before the achievable memory rows, for the before/after table)."""
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
    param_wire = 2.0
    if row["fsdp_allgather_dtype"] == "fp8":  # torchao float8 all-gathers the decoder linears' weights in 1 byte;
        n_linear = shape.matmul_params - a.vocab * a.hidden  # the embedding and lm_head stay bf16
        all_params = shape.matmul_params + a.vocab * a.hidden
        param_wire = (n_linear * 1.0 + (all_params - n_linear) * 2.0) / all_params
    setup = st.StepSetup(
        param_bytes_on_wire=param_wire,
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
    # the FSDP ring over dp ranks at its slowest link (step_time.ring_bus_gb_s): inside a node (HGX/DGX nodes of 8 in
    # the sources: Grand Teton, WhiteFiber, torchtune's 8x A100; data/gpu_links.csv) on NVLink; across nodes one
    # channel per NIC, the dp ranks beside tp x cp in each node sharing the node's NICs
    facts = link_facts(gpu)
    one_node = dp * tp * cp <= facts.node_gpus
    per_node = dp if one_node else max(facts.node_gpus // (tp * cp), 1)
    nic = gpu.infiniband_gb_s or NETWORK_GB_S_PER_NIC[Interconnect.INFINIBAND]
    dp_link = st.ring_bus_gb_s(nvlink, dp, per_node, nic, facts.nics_per_node)
    work = st.step_work(shape, setup, matmul_tflops=mm_rate.tflops,
                        fp8_matmul_tflops=fp8_rate.tflops if fp8_rate else None,
                        dp_link_gb_s=dp_link, tp_link_gb_s=nvlink)
    if datasheet_bandwidth:
        bw_gb_s = BANDWIDTH_OVERRIDE_GB_S.get(row["gpu_note"], gpu.bandwidth_gb_s)
    elif row["gpu_note"] in BANDWIDTH_OVERRIDE_GB_S:
        bw_gb_s = BANDWIDTH_OVERRIDE_GB_S[row["gpu_note"]] * st.measured_memory_efficiency("hbm", rates)
    else:  # the achievable bandwidth of data/achievable_rates.csv, not the datasheet's (step_time module docstring)
        bw_gb_s = st.achievable_bandwidth_gb_s(gpu.name, gpu.bandwidth_gb_s, rates)
    clock = st.power_capped_clock_ratio(POWER_CAP_W[row["gpu_note"]], gpu.tdp_w) if row["gpu_note"] in POWER_CAP_W \
        else 1.0
    if clock < 1.0:  # the same work at a lower clock: fp8 GEMMs were entered at the bf16 rate's equivalent above
        work = st.step_work(shape, setup, matmul_tflops=mm_rate.tflops * clock,
                            fp8_matmul_tflops=fp8_rate.tflops * clock if fp8_rate else None,
                            dp_link_gb_s=dp_link, tp_link_gb_s=nvlink)
    t = st.step_time(work, st.StepRates(mm_rate.tflops * clock, attn_rate.tflops * clock, bw_gb_s,
                                        gpu.bf16_dense_tflops or gpu.fp16_dense_tflops,
                                        attention_backward_tflops=st.attention_backward_tflops(attn_rate) * clock))
    value = t.tokens_per_s * int(row["num_gpus"]) if row["unit"].startswith("tokens/s total") else t.tokens_per_s
    return value, "", t


def main() -> None:
    rates = st.load_achievable_rates()
    with open(PUBLISHED, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    lines, errors, skipped = [], [], []
    steps: dict[str, st.StepTime] = {}
    errors_datasheet: list = []  # the same rows with memory-bound work at the datasheet bandwidth
    for row in rows:
        pred, reason, t = predict(row, rates)
        pub = float(row["published_tokens_per_s"])
        if pred is None:
            skipped.append((row, reason))
            continue
        err = pred / pub - 1
        errors.append((row, err))
        steps[row["id"]] = t
        errors_datasheet.append((row, predict(row, rates, datasheet_bandwidth=True)[0] / pub - 1))
        lines.append(f"| {row['id']} | {row['model']} | {row['method']} | {row['num_gpus']}x {row['gpu']} | {row['precision']} "
                     f"| {row['batch_per_gpu']}x{row['seq_len']} | {row['grad_ckpt']} | {row['compile']} "
                     f"| dp{row['dp']}/tp{row['tp']}/cp{row['cp']} | {pub:,.0f} | {pred:,.0f} | {err:+.0%} "
                     f"| {errors_datasheet[-1][1]:+.0%} "
                     f"| {t.matmul_s / t.step_s:.0%}/{t.attention_s / t.step_s:.0%}/{t.memory_s / t.step_s:.0%}/{t.host_s / t.step_s:.0%}/{t.exposed_comm_s / t.step_s:.0%} | {t.mfu:.0%} |")
    original = [(r, e) for r, e in errors if r["set"] == "original"]
    held_out = [(r, e) for r, e in errors if r["set"] != "original"]
    header = ["| set | rows | median abs error | mean error | worst | within 1.5x |", "|---|---|---|---|---|---|"]
    summary = [summary_row("the 48 rows of phases 1-2 (model changed while reading them)", original),
               summary_row("held out: 30 Qwen rows added after the phase-3 changes", held_out),
               summary_row("all rows", errors)]
    families: dict[str, list] = {}
    for row, e in errors:
        families.setdefault(f"{gpu_family(row)} ({row['set'].split(' ')[0]})", []).append((row, e))
    by_family = [summary_row(key, rows_) for key, rows_ in sorted(families.items())]
    err = {row["id"]: e for row, e in errors}
    outside = [(row, e) for row, e in errors if max(1 + e, 1 / (1 + e)) > 1.5]
    a100 = get_gpu("a100-80gb")
    a100_gb_s = st.achievable_bandwidth_gb_s(a100.name, a100.bandwidth_gb_s, rates)
    hbm_ratio = st.measured_memory_efficiency("hbm", rates)
    teton = [e for row, e in errors if gpu_family(row) == "H100 Grand Teton 500 W" and row["async_tp"] != "yes"
             and int(row["seq_len"]) <= 8192]
    h200_rows = [e for row, e in errors if row["gpu"] == "h200"]
    async_8b = [err[i] for i in ("ti-8b-asynctp-bf16", "ti-8b-asynctp-fp8tw")]
    small_lora = [f"qwen1.8b-lora-{n}" for n in (256, 512, 1024, 2048)]
    host_share = [steps[i].host_s / steps[i].step_s for i in small_lora[:3]]
    original_set = [(r, e) for r, e in errors if r["set"] == "original"]
    moved = {row["id"]: e - d for (row, e), (_, d) in zip(errors, errors_datasheet)}
    target_sets = (("all rows", errors), ("the original 48", original_set), ("the held-out 30", held_out))

    def moved_range(ids: list[str]) -> str:
        low, high = (round(f(moved[i] for i in ids) * 100) for f in (min, max))
        return f"{low:+d}..{high:+d}" if low != high else f"{low:+d}"

    gptq_gpu_bound = [f"qwen{m}-qlora-{n}" for m in ("14b", "72b") for n in (256, 512, 1024)]
    long_a100 = [r["id"] for r, _ in errors if r["gpu"] == "a100-80gb" and r["id"].startswith("qwen")
                 and int(r["seq_len"]) >= 2048]
    h100_h200 = [r["id"] for r, _ in errors if r["gpu"] in ("h100-sxm", "h200") and int(r["seq_len"]) <= 8192]
    host_bound = [r["id"] for r, _ in errors if steps[r["id"]].host_s >= 0.5 * steps[r["id"]].step_s]
    cp_rows = [r["id"] for r, _ in errors if int(r["cp"] or 1) > 1]
    rtx = [r["id"] for r, _ in errors if r["gpu"] == "rtx-4090"]

    def target_line(label: str, rows_: list) -> str:
        med = statistics.median(abs(e) for _, e in rows_)
        within = sum(1 for _, e in rows_ if max(1 + e, 1 / (1 + e)) <= 1.5)
        return f"{label} {med:.1%} ({within} of {len(rows_)} within 1.5x)"

    def signed(values: list[float]) -> str:
        return f"{min(values):+.0%}..{max(values):+.0%}"

    groups: dict[str, list[float]] = {}
    for row, e in errors:
        groups.setdefault(f"{row['source_repo']} {row['model']} {row['method']} {row['gpu']} {row['precision']}",
                          []).append(e)
    out = [
        "# Predicted vs published training throughput",
        "",
        "Generated by `benchmarks/throughput.py` from `benchmarks/throughput_published.csv` (every row: source repo, file,",
        "commit, table, settings) with `vramcalc/step_time.py` and the rates in `data/achievable_rates.csv` (GEMM,",
        "attention and memory bandwidth, each with its source).",
        "No coefficient is fitted to these rows, and every row, the H200 ones included, takes the default host time per",
        "launched kernel (`step_time.HOST_SECONDS_PER_KERNEL`), not a calibration profile's: the value fitted in",
        "`calibration/profiles/h200.json` is the project's measuring host's, not the publishers'. error = predicted /",
        "published - 1. Columns",
        "`mm/attn/mem/host/comm` give the share of the predicted step in matmuls (each GEMM on the roofline),",
        "attention, memory-bound kernels, waiting for the host to issue kernels and exposed communication;",
        "MFU is against the bf16 dense peak. The project's own H200 step times against the same model:",
        "`benchmarks/throughput_measured.md` (`benchmarks/throughput_measured.py`).",
        "",
        *header, *summary,
        "",
        "By GPU family (the Grand Teton H100 is a 96 GB HBM2e part at 2.4 TB/s capped at 500 W, predicted with the",
        "catalogue H100's rates derated by `step_time.power_capped_clock_ratio` = "
        f"{st.power_capped_clock_ratio(500, 700):.3f} and, outside the catalogue, 2.4 TB/s x {hbm_ratio:.3f} = "
        f"{2400 * hbm_ratio:,.0f} GB/s,",
        "the rule of the derived memory rows of `data/achievable_rates.csv`; the memory clock is not capped):",
        "",
        *header, *by_family,
        "",
        "Phase 3 (issue 16) mechanisms, each from its own source, none fitted to a row:",
        "(1) every GEMM on the roofline: max(2mkn / R_mm, (mk + kn + mn) bytes / B), so thin GEMMs (tensor",
        "parallelism's kv projections, LoRA's rank-r A and B) run at the memory's pace (Williams et al. 2009);",
        "(2) LoRA's elementwise kernels per adapted linear (peft Linear.forward: cast of x to the fp32 adapters,",
        "dropout, scaling, the add; their backwards) and their kernel launches; rows record lora_dropout and",
        "adapter_dtype from finetune.py / the torchtune configs; (3) the Qwen Q-LoRA rows are auto-gptq's pure-torch",
        "dequantization (qlinear_cuda_old for >= 128 rows: 16.5 B per weight and pass in fp16, not re-run in backward), not",
        "bitsandbytes NF4 (column quant_kernel); (4) async TP hides the forward's TP collectives, not the backward's",
        "(PyTorch async-TP post: up to 29% forward speedup, ~8% end to end); (5) attention rates measured on the",
        "forward only (tritonbench default) run the backward at FlashAttention-2's measured backward/forward",
        "ratio 0.736 (apache/tvm tl_doc/flash_perf.md); (6) an FSDP ring across nodes runs one NCCL channel per",
        "NIC: min(NVLink, NIC x ranks per node), not one NIC's 50 GB/s; (7) data fix: the Trainy H200 rows all-gather",
        "fp8 weights (--float8.enable_fsdp_float8_all_gather); (8) S24: eager steps issue about one view/metadata op",
        "(view, t, transpose, _unsafe_view, slice, detach) per launched kernel, each through the dispatcher and autograd:",
        "counted with TorchDispatchMode over one micro-step of transformers' Llama + peft (benchmarks/throughput_trace_ops.py:",
        "111/116, 226/224 and 339/312 launched/view ops per layer for full FT, LoRA, LoRA + dropout + fp32 adapters +",
        "reentrant checkpointing) and charged 3.5 us each, the autograd + dispatch midpoints of the per-op breakdown behind",
        "the 10 us per kernel (`step_time.host_seconds_per_kernel`); compiled steps issue none. The same trace checks the",
        "hand-counted kernels per layer (116, 235, 344 against 111, 226, 339 traced: within 5%).",
        "Issue 16 follow-up (tp16): (9) the Qwen Q-LoRA rows run DeepSpeed ZeRO-2 on one GPU (finetune_qlora_single_gpu.sh,",
        "ds_config_zero2.json, now dp_sharding zero2): its per-tensor gradient hooks copy every LoRA gradient into the",
        "bucket and then the partition buffer in each micro-batch's backward (stage_1_and_2.py @v0.12.4 :912-914, :1302-1305;",
        "2 kernels + 7 views per tensor, `step_time.ZERO_HOOK_KERNELS_PER_TENSOR`), host time the LoRA rows (plain Trainer)",
        "do not pay; and their loss is modeling_qwen.py's CrossEntropyLoss on the shifted fp16 logits without autocast",
        "(loss model-dtype). Q-LoRA at 256 tokens: 1.8B +43% -> +31%, 7B +94% -> +81%; 14B and 72B (GPU-bound) unchanged.",
        "Issue 14 (interconnect): the FSDP ring runs at its slowest link from data/gpu_links.csv",
        "(`step_time.ring_bus_gb_s`) and FSDP hides its forward all-gathers under the forward's compute, its backward",
        "all-gathers and reduce-scatters under the backward's (`DATA_PARALLEL_OVERLAP_BY_SHARDING`); every row here is",
        "FSDP with collectives well under each phase's compute, so no figure changed.",
        "Issue 16 follow-up (hbm35): (10) memory-bound work (norms, activations, the loss, the optimizer step,",
        "dequantization, casts) and the bytes side of every GEMM's roofline run at an achievable device-memory",
        "bandwidth, not the datasheet's: the `memory` rows of `data/achievable_rates.csv`, each with its source",
        "(BabelStream's triad from Azure/AI-benchmarking-guide on A100 80GB, H100 SXM, H200 and MI300X; gpu-benches'",
        "gpu-stream triad on A100 40/80GB, H100 PCIe, V100 and L40; a vectorised copy on A100 40GB and RTX 4090; the mean",
        "where two sources measured a GPU), the way matmuls take measured GEMM rates. A GPU without a measurement takes",
        "its datasheet x the median measured/datasheet ratio of its memory family (HBM "
        f"{hbm_ratio:.1%}, GDDR {st.measured_memory_efficiency('gddr', rates):.1%}), marked derived.",
        f"On these rows: A100 {a100.bandwidth_gb_s:,.0f} -> {a100_gb_s:,.0f} GB/s, H100 SXM 3,350 -> "
        f"{st.achievable_bandwidth_gb_s('h100-sxm', 3350.0, rates):,.0f}, H200 4,800 -> "
        f"{st.achievable_bandwidth_gb_s('h200', 4800.0, rates):,.0f}, RTX 4090 1,008 -> "
        f"{st.achievable_bandwidth_gb_s('rtx-4090', 1008.0, rates):,.0f}, the Grand Teton H100 2,400 -> "
        f"{2400 * hbm_ratio:,.0f}. Nothing here is fitted to a throughput row. Before (the same model with the "
        "datasheet B, as at commit 52db38c; column `error, datasheet B` below) and after:",
        "",
        "| set | rows | median abs error | mean error | worst | within 1.5x |",
        "|---|---|---|---|---|---|",
        summary_row("before: the 48 original rows", [x for x in errors_datasheet if x[0]["set"] == "original"]),
        summary_row("before: the 30 held-out Qwen rows", [x for x in errors_datasheet if x[0]["set"] != "original"]),
        summary_row("before: all rows", errors_datasheet),
        summary_row("after: the 48 original rows", original_set),
        summary_row("after: the 30 held-out Qwen rows", held_out),
        summary_row("after: all rows", errors),
        "",
        "Error points moved, after - before: the GPU-bound Qwen Q-LoRA rows (14B and 72B at 256-1024 tokens, the",
        f"dequantization bytes) {moved_range(gptq_gpu_bound)}; the Qwen rows on the A100 at 2k-8k tokens "
        f"{moved_range(long_a100)}; the torchtitan H100/H200 rows up to 8k tokens {moved_range(h100_h200)};",
        f"the host-bound rows (host >= 50% of the step: the kernels' issue time covers the longer memory time) "
        f"{moved_range(host_bound)}; the context-parallel rows (attention-bound) {moved_range(cp_rows)}; the RTX 4090",
        f"rows, already too slow, {moved_range(rtx)}.",
        "",
        "Before phase 3 (commit 1341e48), same 48 rows: median 22.5%, worst +243% (qwen7b-qlora-256), 42 of 48 within",
        "1.5x; A100 29.0% (19 of 23), Grand Teton H100 21.5% (18 of 20), H200 4.0% (2 of 2), RTX 4090 7.0% (3 of 3).",
        "The phase-2 model on the 30 held-out rows: median 63%, worst +377%, 12 of 30 within 1.5x.",
        "Before S24's view ops (commit ef3956c): original 48 rows median 15.2%, mean +18%, worst +128% (qwen7b-qlora-256),",
        "46 of 48 within 1.5x; held-out 30 rows median 35.4%, mean +42%, worst +114% (qwen14b-qlora-256), 20 of 30. The",
        "LoRA rows at 256 tokens went from +16% / +69% / +6% (7B / 1.8B / 14B) to -5% / +31% / -11%; only eager rows moved.",
        "",
        f"Rows outside 1.5x and known gaps, stated rather than tuned away: (1) auto-gptq's torch dequantization: the "
        f"{len(outside)}",
        "rows outside 1.5x are "
        + ("all Qwen Q-LoRA " if all(r["method"] == "qlora" and r["model"].startswith("qwen") for r, _ in outside)
           else "")
        + "(" + ", ".join(f"{r['id']} {e:+.0%}" for r, e in outside) + "),",
        "the GPU-bound sizes. From the published s/it alone: the Q-LoRA fixed time per layer and micro-batch grows with the",
        "layer's quantized weights, 43-47 ps per weight (14B 5.3 s/320, 72B 27.4 s/640 at 256 tokens, less the GEMMs),",
        "and the Q-LoRA - LoRA gap is 31-42 ps per weight (1.8B, 7B, 14B), against "
        f"{16.5 * 2 / (a100_gb_s * 1e9) * 1e12:.0f} ps for 16.5 B per weight and pass",
        f"at the A100's achievable {a100_gb_s / 1000:.2f} TB/s over two passes (forward and recompute; reentrant "
        "checkpointing reruns the dequantization, the",
        "backward's dX reuses the fp16 weight torch.matmul saved). The bytes were recounted from qlinear_cuda_old.py",
        "(@v0.5.1 :235-273, the same chain at v0.4.2: 0.5 + 4 shift, 4 + 1 cast, 1 + 1 mask, 1 + 1 minus zeros, 1 + 2",
        "times scales = 16.5) and no third pass exists, so the missing ~2x is the kernels' speed: the shift, subtraction",
        "and scale multiply take broadcast inputs (TensorIterator's non-vectorized offset-calculator path, one 1-byte",
        "element per thread and iteration) and the multiply also casts int8 to fp16 per element. No A100 measurement of",
        "these kernels was found (the one profile of this path, unslothai/unsloth#39, is truncated in the stored copy), so",
        "no efficiency is assumed; `benchmarks/throughput_gptq_probe.py` times each op at the Qwen shapes on any CUDA GPU",
        "and is the check that would let `step_time.DEQUANT_KERNELS` carry a measured rate. Found in the sources but",
        "left out because it points the other way (faster): Qwen-1 has 5 linears per layer, not 7 (fused c_attn;",
        "modeling_qwen.py QWenAttention/QWenMLP), and with flash-attn > 2.1.1 (Qwen README) its rotary is 3 kernels per",
        "q/k (fp32 cast, triton rotary, cast back), not rotate_half's 5; both cut kernel launches a few percent;",
        f"(2) Qwen-1.8B LoRA at 256-2048 tokens ({signed([err[i] for i in small_lora])}): host-bound in the model "
        f"at 256-1024 ({min(host_share):.0%}-{max(host_share):.0%}), while 7B and 14B at 256",
        f"tokens are {err['qwen7b-lora-256']:+.0%} and {err['qwen14b-lora-256']:+.0%}; the published steps take "
        "4.7-5.2 ms per layer and micro-batch at all three sizes",
        "(the host-bound signature); Qwen's remote code (fp32 rotary, its own RMSNorm; written for transformers 4.3x) was",
        "not traced, and the model sums per-kind max(GPU, host) where 7B and 14B hide part of the host under their GEMMs;",
        f"(3) the Grand Teton H100 rows up to 8k tokens without async TP stay {signed(teton)} (the 500 W clock ratio "
        "assumes a 30% static power share; the H200",
        f"rows of the same stack at 700 W are {signed(h200_rows)}); async TP over TP=8 for 8B stays "
        f"{signed(async_8b)}; (4) context",
        "parallelism at 128k-256k: ring attention's per-step merge and load balance are not modelled.",
        "",
        "Against issue 16's target (median |error| <= 15%, every row within 1.5x): "
        + target_line("the 48 original rows reach", original_set) + ",",
        target_line("the 30 held-out Qwen rows", held_out) + " and " + target_line("all rows", errors) + ": the "
        "median target is met for "
        + (" and ".join(name for name, rows_ in target_sets if statistics.median(abs(e) for _, e in rows_) <= 0.15)
           or "no set")
        + "".join(f" (not {name})" for name, rows_ in target_sets if statistics.median(abs(e) for _, e in rows_) > 0.15)
        + "; the every-row target "
        + ("too." if not outside else f"is not met ({len(outside)} rows outside 1.5x).")
        + " The error is still mostly one-signed (mean "
        f"{statistics.mean(e for _, e in original_set):+.0%} and {statistics.mean(e for _, e in held_out):+.0%}: the "
        "model is too fast) and comes from the",
        "gaps above, each needing a rate that no stored source publishes; none is fitted to these rows. Still open with a",
        "candidate source (c16 audit,",
        "2026-12-03): arXiv:2604.11391 (Ujeniya et al., power-capped H100 HBM2e 94 GiB, SM clock from 200 to 700 W)",
        "could replace the 30% static-power assumption for the 500 W rows, but measures DGEMM, not bf16 GEMMs, and its",
        "figures were not readable in the stored copies.",
        "",
        "| id | model | method | GPUs | prec | batch x seq | AC | compile | parallel | published tok/s | predicted | error | error, datasheet B | mm/attn/mem/host/comm | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
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
        *[f"- {key}: {len(es)} rows, median error {statistics.median(es):+.0%}" for key, es in sorted(groups.items())],
    ]
    REPORT.write_text("\n".join(out) + "\n", encoding="utf-8")
    print("\n".join([*header, *summary, "", *header, *by_family]))


def gpu_family(row: dict[str, str]) -> str:
    """A100, H100 (Grand Teton 500 W), H200, RTX 4090: the groups of the error table."""
    if row["gpu_note"] in BANDWIDTH_OVERRIDE_GB_S:
        return "H100 Grand Teton 500 W"
    return {"a100-80gb": "A100 80GB", "h200": "H200", "rtx-4090": "RTX 4090", "h100-sxm": "H100 SXM"}.get(
        row["gpu"], row["gpu"])


def summary_row(label: str, errors: list) -> str:
    """One line of the error table: rows, median |error|, mean error, worst row, rows within a factor of 1.5."""
    if not errors:
        return f"| {label} | 0 | - | - | - | - |"
    abs_err = [abs(e) for _, e in errors]
    worst_row, worst = max(errors, key=lambda x: abs(x[1]))
    within = sum(1 for _, e in errors if max(1 + e, 1 / (1 + e)) <= 1.5)
    mean = statistics.mean(e for _, e in errors)
    return (f"| {label} | {len(errors)} | {statistics.median(abs_err):.1%} | {mean:+.0%} "
            f"| {worst:+.0%} ({worst_row['id']}) | {within} of {len(errors)} |")


if __name__ == "__main__":
    main()
