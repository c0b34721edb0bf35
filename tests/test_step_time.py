"""Claims about vramcalc.step_time that could fail. Expected numbers are hand-computed from cited inputs."""

from __future__ import annotations

import csv

import pytest

from vramcalc import step_time as st
from vramcalc.catalogue import data_dir, get_gpu

# Llama-3.1-8B config (shared/reference/reference-data.md §2): h 4096, L 32, a 32, kv 8, d 128, I 14336, V 128256.
LLAMA8B = dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336)
V8B = 128256


def test_matmul_params_of_llama_3_1_8b_by_hand():
    # total 8,030,261,248 (reference-data.md: exact count) - embedding 128256*4096 = 525,336,576
    # - RMSNorm weights 32*2*4096 + 4096 = 266,240  ->  7,504,658,432 matmul parameters (lm_head included, untied)
    assert st.dense_matmul_params(**LLAMA8B, vocab_size=V8B) == 8_030_261_248 - 525_336_576 - 266_240


def test_six_n_t_by_hand():
    # 6 * 7,504,658,432 * 2048 = 7,504,658,432 * 12,288 = 92,217,242,812,416 (multiplied out by hand)
    n = 7_504_658_432
    assert st.matmul_flops(n, 2048, train_base=True) == 92_217_242_812_416


def test_checkpointing_adds_exactly_one_forward():
    n, n_a, t = 1e9, 4e6, 4096
    for train_base in (True, False):
        plain = st.matmul_flops(n, t, train_base=train_base, n_adapter_params=n_a)
        ckpt = st.matmul_flops(n, t, train_base=train_base, n_adapter_params=n_a, recompute_forwards=1.0)
        assert ckpt - plain == pytest.approx(2 * (n + n_a) * t)
    fwd = st.attention_forward_flops(32, 32, 128, 128, 4096, t)
    with_ckpt = st.attention_flops(32, 32, 128, 128, 4096, t, recompute_forwards=1.0)
    assert with_ckpt - st.attention_flops(32, 32, 128, 128, 4096, t) == pytest.approx(fwd)


def test_frozen_base_saves_exactly_the_weight_gradient_matmuls():
    n, t = 7e9, 2048
    full = st.matmul_flops(n, t, train_base=True)
    frozen = st.matmul_flops(n, t, train_base=False)
    assert full - frozen == pytest.approx(2 * n * t)  # dW = dy^T x is the only GEMM a frozen weight skips
    lora = st.matmul_flops(n, t, train_base=False, n_adapter_params=4e7)
    assert lora - frozen == pytest.approx(6 * 4e7 * t)
    assert lora < full


def test_lora_params_all_linear_rank16_llama8b_by_hand():
    # per layer r*(in+out): q 16*8192 + k,v 2*16*5120 + o 16*8192 + gate,up,down 3*16*18432 = 1,310,720; x 32 layers
    assert st.lora_params(**LLAMA8B, rank=16) == 41_943_040


def test_causal_halves_tiled_kernels_not_eager():
    full = st.attention_forward_flops(2, 4, 64, 64, 1024, 10, causal=False)
    assert st.attention_forward_flops(2, 4, 64, 64, 1024, 10, causal=True, kernel="flash") == full / 2
    assert st.attention_forward_flops(2, 4, 64, 64, 1024, 10, causal=True, kernel="eager") == full
    # PaLM App. B: 4*L*a*d*s per token when d_qk = d_v = d
    assert full == 4 * 2 * 4 * 64 * 1024 * 10


def test_memory_time_scales_with_one_over_bandwidth():
    assert st.memory_seconds(1e12, 2000) == pytest.approx(2 * st.memory_seconds(1e12, 4000))
    work = st.StepWork(tokens=1000, matmul_flops=0.0, attention_flops=0.0, memory_bytes=3.35e12, model_flops=0.0)
    slow = st.step_time(work, st.StepRates(100, 100, 1675, 989))
    fast = st.step_time(work, st.StepRates(100, 100, 3350, 989))
    assert slow.step_s == pytest.approx(2.0) and fast.step_s == pytest.approx(1.0)


def test_mfu_is_one_when_everything_runs_at_peak():
    work = st.StepWork(tokens=1, matmul_flops=989e12, attention_flops=0.0, memory_bytes=0.0, model_flops=989e12)
    t = st.step_time(work, st.StepRates(989, 1, 1, 989))
    assert t.step_s == pytest.approx(1.0) and t.mfu == pytest.approx(1.0) and t.tokens_per_s == pytest.approx(1.0)


def test_ring_collectives_and_overlap():
    assert st.collective_bytes(8e9, 8, "all_reduce") == pytest.approx(2 * 7 / 8 * 8e9)
    assert st.collective_bytes(8e9, 8, "all_gather") == pytest.approx(7 / 8 * 8e9)
    assert st.collective_bytes(8e9, 1, "all_reduce") == 0
    assert st.exposed_comm_seconds(1.0, 10.0, 1.0) == 0.0
    assert st.exposed_comm_seconds(1.0, 10.0, 0.0) == 1.0
    assert st.exposed_comm_seconds(5.0, 2.0, 1.0) == pytest.approx(3.0)  # compute hides at most its own length


def test_lora_ddp_sends_only_adapter_gradients():
    full = st.data_parallel_bytes(8e9, 8e9, 8, "ddp")
    lora = st.data_parallel_bytes(8e9, 4e7, 8, "ddp")
    assert lora / full == pytest.approx(4e7 / 8e9)
    # FSDP still gathers the frozen base twice: LoRA does not remove that traffic
    assert st.data_parallel_bytes(8e9, 4e7, 8, "fsdp") > 2 * 7 / 8 * 8e9 * 2


def test_dequantize_nf4_bytes_per_weight_and_pass():
    assert st.dequantize_bytes(1e9, passes=3) == pytest.approx(1e9 * 2.5 * 3)  # read 0.5 B, write 2 B (bf16)


def test_adamw_bytes_per_param():
    # fp32 everything: read p, g, m, v (16 B) and write p, m, v (12 B) = 28 B per parameter
    assert st.optimizer_step_bytes(1, param_bytes=4, grad_bytes=4, state_bytes=4) == 28


def test_achievable_rates_are_sourced_and_below_the_datasheet_peak():
    rates = st.load_achievable_rates()
    assert rates, "data/achievable_rates.csv is empty"
    for (gpu, kind, dtype), rate in rates.items():
        assert rate.source and rate.basis in ("measured", "derived"), (gpu, kind, dtype)
        spec = get_gpu(gpu)
        if kind == "memory":  # a bandwidth, against the datasheet's
            assert dtype == st.MEMORY_DTYPE and rate.tflops is None, (gpu, kind, dtype)
            assert spec.bandwidth_gb_s and 0 < rate.gb_s <= spec.bandwidth_gb_s, (gpu, rate.gb_s, spec.bandwidth_gb_s)
            continue
        peak = {"bf16": spec.bf16_dense_tflops, "fp16": spec.fp16_dense_tflops, "fp8": spec.fp8_dense_tflops}[dtype]
        assert rate.gb_s is None and peak and 0 < rate.tflops <= peak, (gpu, kind, dtype, rate.tflops, peak)


def test_every_catalogue_gpu_with_a_bandwidth_has_an_achievable_one():
    from vramcalc.catalogue import gpus

    rates = st.load_achievable_rates()
    missing = [g.name for g in gpus() if g.bandwidth_gb_s and (g.name, "memory", "any") not in rates]
    assert not missing, missing


# The measured memory rows against the figures their sources print (data/achievable_rates.csv names each): the mean
# where two sources measured the GPU. Azure/AI-benchmarking-guide @8fd0c6e BabelStream Triad (TB/s): A100-SXM4-80GB
# 1.70, H100 80GB HBM3 2.97, H200 4.15; its fork samuel-bohman/AI-benchmarking-guide @3de0c29: MI300X 4.09.
# te42kyfo/gpu-benches @1c36d50 gpu-stream, best triad over the occupancy sweep (GB/s): a100_80 1759, a100_40 1375,
# h100_pcie 1832, v100 814, l40 803 (for the L40S). xytpai/nvbench @59ca77f copy: A100-40GB 1379.710, RTX4090 921.850.
MEASURED_MEMORY_GB_S = {"a100-80gb": (1700, 1759), "a100-40gb": (1375, 1379.71), "h100-sxm": (2970,),
                        "h100-pcie": (1832,), "h200": (4150,), "mi300x": (4090,), "v100-32gb": (814,),
                        "l40s": (803,), "rtx-4090": (921.85,)}


@pytest.mark.parametrize("gpu, figures", sorted(MEASURED_MEMORY_GB_S.items()))
def test_a_measured_memory_row_is_the_mean_of_its_sources(gpu, figures):
    row = st.achievable_rate(gpu, "memory", st.MEMORY_DTYPE)
    assert row is not None and row.basis == "measured"
    assert row.gb_s == pytest.approx(sum(figures) / len(figures), abs=0.05)  # one decimal in the file


def test_a_derived_memory_row_is_its_datasheet_times_its_familys_median_measured_ratio():
    # the rule, recomputed from the file and the catalogue's datasheet bandwidth and memory type
    with open(data_dir() / "achievable_rates.csv", newline="", encoding="utf-8") as f:
        memory = [r for r in csv.DictReader(f) if r["kind"] == "memory"]
    family = {name: ("hbm" if get_gpu(name).memory_type.startswith("HBM") else "gddr") for name in
              (r["gpu"] for r in memory)}
    # each measurement once: the V100 16 GB and 32 GB rows quote the same run of the same 900 GB/s interface
    measurements = {(family[r["gpu"]], float(r["gb_s"]), get_gpu(r["gpu"]).bandwidth_gb_s, r["source"].split(" (")[0])
                    for r in memory if r["basis"] == "measured"}
    ratios = {"hbm": [], "gddr": []}
    for fam, gb_s, datasheet, _ in measurements:
        ratios[fam].append(gb_s / datasheet)
    assert len(ratios["hbm"]) >= 5 and len(ratios["gddr"]) >= 2
    derived = [r for r in memory if r["basis"] == "derived"]
    assert {r["gpu"] for r in derived} >= {"b200", "rtx-3090", "a10g", "l4", "t4"}
    for r in derived:
        fam = sorted(ratios[family[r["gpu"]]])
        n = len(fam)
        median = fam[n // 2] if n % 2 else (fam[n // 2 - 1] + fam[n // 2]) / 2
        assert float(r["gb_s"]) == pytest.approx(get_gpu(r["gpu"]).bandwidth_gb_s * median, abs=0.05), r["gpu"]
        assert st.measured_memory_efficiency(family[r["gpu"]]) == pytest.approx(median)


def test_memory_families_group_hbm_and_gddr_and_reject_anything_else():
    assert {st.memory_family(m) for m in ("HBM2", "HBM2e", "HBM3", "HBM3e")} == {"hbm"}
    assert {st.memory_family(m) for m in ("GDDR6", "GDDR6 (ECC)", "GDDR6X", "GDDR7")} == {"gddr"}
    with pytest.raises(ValueError, match="memory type"):
        st.memory_family("LPDDR5X")


def test_the_achievable_bandwidth_is_the_files_row_or_else_the_datasheet():
    assert st.achievable_bandwidth_gb_s("a100-80gb", 2039.0) == pytest.approx(1729.5)
    assert st.achievable_bandwidth_gb_s("not-a-catalogue-gpu", 1234.0) == 1234.0
    assert st.achievable_bandwidth_gb_s("a100-80gb", 2039.0, rates={}) == 2039.0  # a file without the row


PRICE_FILES = ("cloud_prices.csv", "gpu_list_prices.csv")


@pytest.mark.parametrize("name", PRICE_FILES)
def test_every_price_has_a_date_a_source_and_a_catalogue_gpu(name):
    path = data_dir() / name
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows
    for row in rows:
        if row.get("gpu"):
            get_gpu(row["gpu"])  # raises for a name the catalogue does not know
        assert row["price_date"][:4].isdigit(), row
        assert row["source"].strip(), row
        price = row.get("usd_per_gpu_hour") or row.get("value")
        assert float(price) > 0, row


LLAMA8B_SHAPE = st.DecoderShape(**LLAMA8B, vocab_size=V8B)


def test_a_gpu_outside_the_catalogue_gets_its_memory_familys_ratio_as_the_files_derived_rows_do():
    # data/achievable_rates.csv: b200 (HBM3e, datasheet 8000 GB/s) and rtx-3090 (GDDR6X, 936 GB/s) are derived rows,
    # 7086.3 and 863 GB/s: a GPU the file does not know, of the same memory and datasheet, gets the same figure
    assert st.achievable_bandwidth_gb_s("my-hbm-gpu", 8000.0, memory_type="HBM3e") == pytest.approx(7086.3, abs=0.1)
    assert st.achievable_bandwidth_gb_s("my-gddr-gpu", 936.0, memory_type="GDDR6X") == pytest.approx(863, abs=0.5)
    assert st.achievable_bandwidth_gb_s("my-lpddr-gpu", 273.0, memory_type="LPDDR5X") == 273.0  # no family: as given


def test_step_work_tensor_parallel_splits_compute_and_adds_blocking_traffic():
    one = st.step_work(LLAMA8B_SHAPE, st.StepSetup(tokens=8192, seq_len=8192), matmul_tflops=800)
    two = st.step_work(LLAMA8B_SHAPE, st.StepSetup(tokens=8192, seq_len=8192, tp=2), matmul_tflops=800,
                       tp_link_gb_s=450)
    assert two.matmul_flops == pytest.approx(one.matmul_flops / 2)
    assert one.serial_s == 0 and two.serial_s > 0
    asynchronous = st.step_work(LLAMA8B_SHAPE, st.StepSetup(tokens=8192, seq_len=8192, tp=2, async_tp=True),
                                matmul_tflops=800, tp_link_gb_s=450)
    # async TP hides the forward's collectives, not the backward's: one pass of the two (no recompute) stays exposed
    assert asynchronous.serial_s == pytest.approx(two.serial_s / 2)


def test_step_work_rejects_bad_setups():
    with pytest.raises(ValueError, match="grad_ckpt"):
        st.step_work(LLAMA8B_SHAPE, st.StepSetup(tokens=1, seq_len=1, grad_ckpt="sometimes"), matmul_tflops=1)
    with pytest.raises(ValueError, match="fp8"):
        st.step_work(LLAMA8B_SHAPE, st.StepSetup(tokens=1, seq_len=1, fp8_linears=True), matmul_tflops=1)
    with pytest.raises(ValueError, match="loss"):
        st.loss_bytes(1, 1, "magic")


def test_published_throughput_rows_carry_their_settings_and_source():
    path = data_dir().parent / "benchmarks" / "throughput_published.csv"
    if not path.exists():
        pytest.skip("benchmarks/ is not shipped with the wheel")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 20
    for row in rows:
        for column in ("source_repo", "source_file", "source_commit", "model", "method", "gpu", "num_gpus",
                       "precision", "batch_per_gpu", "seq_len", "grad_ckpt", "compile", "published_tokens_per_s", "unit"):
            assert row[column], (row["id"], column)
        assert len(row["source_commit"]) == 40
        get_gpu(row["gpu"])


# -- host overhead, micro-batches and the setup knobs (issue 16 phase 2) ---------------------------------------------
def test_a_step_of_tiny_kernels_takes_the_hosts_time():
    # 1,000 kernels at 10 µs each = 10 ms of host time; their GPU work (1 MB at 1 TB/s = 1 µs) cannot hide it
    work = st.StepWork(tokens=100, matmul_flops=0.0, attention_flops=0.0, memory_bytes=1e6, model_flops=0.0,
                       kernels=st.KernelCounts(other=1000))
    t = st.step_time(work, st.StepRates(100, 100, 1000, 989, host_s_per_kernel=10e-6))
    assert t.step_s == pytest.approx(0.010)
    assert t.host_s == pytest.approx(0.010 - 1e-6)
    assert sum(t.breakdown_s().values()) == pytest.approx(t.step_s)


def test_host_overhead_is_hidden_behind_long_kernels():
    # 1,000 kernels = 10 ms of host time behind 1 TB of traffic at 1 TB/s = 1 s: the GPU is the bottleneck
    work = st.StepWork(tokens=100, matmul_flops=0.0, attention_flops=0.0, memory_bytes=1e12, model_flops=0.0,
                       kernels=st.KernelCounts(other=1000))
    t = st.step_time(work, st.StepRates(100, 100, 1000, 989))
    assert t.step_s == pytest.approx(1.0) and t.host_s == 0.0


def test_kernel_count_of_one_eager_layer_by_hand():
    # transformers LlamaDecoderLayer, eager, forward: 7 GEMMs (q, k, v, o, gate, up, down); 1 SDPA; elementwise:
    # 2 LlamaRMSNorm x 8 (to, pow, mean, add, rsqrt, mul, to, mul weight) + RoPE 2 x 5 (mul, neg, cat, mul, add)
    # + 1 contiguous + 2 residual adds + act and mul = 31. Full training: backward 2 GEMMs per GEMM, 1 SDPA backward,
    # 2 kernels per elementwise kernel; + 20 for embedding, norm, lm_head and loss.
    k = st.kernel_counts(1, micro_batches=1, fused=False, train_base=True, adapted_linears=0, quant_bits=0,
                         recompute=(0.0, 0.0, 0.0))
    assert (k.gemm, k.attention, k.other) == (7 * 3, 2, 31 * 3 + 20)


def test_more_micro_batches_for_the_same_tokens_never_speed_up_a_step():
    rates = st.StepRates(271, 156, 2039, 312)
    times = []
    for micro_batches in (1, 2, 8, 32):
        setup = st.StepSetup(tokens=8 * 512, seq_len=512, train_base=False, adapter_params=4_000_000,
                             quant_bits=4, micro_batches=micro_batches, adapted_linears=64)
        times.append(st.step_time(st.step_work(LLAMA8B_SHAPE, setup, matmul_tflops=271), rates).step_s)
    assert times == sorted(times) and times[-1] > times[0]


def test_dequantization_is_paid_once_per_micro_batch():
    one = st.step_work(LLAMA8B_SHAPE, st.StepSetup(tokens=4096, seq_len=512, train_base=False, quant_bits=4),
                       matmul_tflops=271)
    four = st.step_work(LLAMA8B_SHAPE, st.StepSetup(tokens=4096, seq_len=512, train_base=False, quant_bits=4,
                                                     micro_batches=4), matmul_tflops=271)
    n_linear = LLAMA8B_SHAPE.matmul_params - V8B * 4096
    # 3 more micro-batches x (forward + backward) x (0.5 B read + 2 B written) per linear weight
    assert four.memory_bytes - one.memory_bytes == pytest.approx(3 * 2 * 2.5 * n_linear)


def test_int8_dequantization_reads_one_byte_per_weight():
    assert st.dequantize_bytes(1e9, passes=2, bits=8) == pytest.approx(1e9 * 3.0 * 2)  # read 1 B, write 2 B


@pytest.mark.parametrize("train_base", [True, False])
def test_selective_checkpointing_recomputes_no_matmul_but_costs_time(train_base):
    def work(mode):
        return st.step_work(LLAMA8B_SHAPE, st.StepSetup(tokens=4096, seq_len=4096, train_base=train_base,
                                                         grad_ckpt=mode), matmul_tflops=800)
    none, selective, full = work("none"), work("selective"), work("full")
    assert selective.matmul_flops == none.matmul_flops < full.matmul_flops
    assert selective.attention_flops == none.attention_flops < full.attention_flops
    assert none.memory_bytes < selective.memory_bytes == pytest.approx(full.memory_bytes)
    rates = st.StepRates(800, 300, 3350, 989)
    assert st.step_time(none, rates).step_s < st.step_time(selective, rates).step_s < st.step_time(full, rates).step_s


def test_fused_kernels_move_fewer_bytes_and_launch_fewer_kernels():
    eager = st.step_work(LLAMA8B_SHAPE, st.StepSetup(tokens=2048, seq_len=2048), matmul_tflops=800)
    fused = st.step_work(LLAMA8B_SHAPE, st.StepSetup(tokens=2048, seq_len=2048, fused_elementwise=True),
                         matmul_tflops=800)
    assert fused.memory_bytes < eager.memory_bytes and fused.kernels.other < eager.kernels.other
    assert fused.matmul_flops == eager.matmul_flops


def test_activation_offload_shows_only_past_the_compute():
    rates = st.StepRates(800, 300, 3350, 989)
    plain = st.step_time(st.step_work(LLAMA8B_SHAPE, st.StepSetup(tokens=8192, seq_len=8192, grad_ckpt="full"),
                                      matmul_tflops=800), rates)
    pcie = st.step_time(st.step_work(LLAMA8B_SHAPE, st.StepSetup(tokens=8192, seq_len=8192, grad_ckpt="full",
                                                                  activation_offload=True, pcie_gb_s=64),
                                     matmul_tflops=800), rates)
    slow_link = st.step_time(st.step_work(LLAMA8B_SHAPE, st.StepSetup(tokens=8192, seq_len=8192, grad_ckpt="none",
                                                                       activation_offload=True, pcie_gb_s=0.1),
                                          matmul_tflops=800), rates)
    # full checkpointing offloads the layer inputs: 32 x 8192 x 4096 x 2 B = 2.1 GB, both ways over 64 GB/s = 67 ms,
    # inside a step of several hundred ms: hidden
    assert pcie.step_s == pytest.approx(plain.step_s)
    assert slow_link.step_s > plain.step_s


def test_padding_is_computed_but_not_counted():
    rates = st.StepRates(800, 300, 3350, 989)
    packed = st.step_time(st.step_work(LLAMA8B_SHAPE, st.StepSetup(tokens=8192, seq_len=2048), matmul_tflops=800),
                          rates)
    padded = st.step_time(st.step_work(LLAMA8B_SHAPE, st.StepSetup(tokens=8192, seq_len=2048, padding_fraction=0.25),
                                       matmul_tflops=800), rates)
    assert padded.step_s == pytest.approx(packed.step_s)
    assert padded.tokens_per_s == pytest.approx(0.75 * packed.tokens_per_s)


def test_a_power_cap_slows_the_clock_by_the_cube_root_of_the_dynamic_power_left():
    # 700 W board, 30% static (210 W): a 500 W cap leaves 290 of 490 W dynamic; P ~ f^3 -> (290/490)^(1/3) = 0.8396
    assert st.power_capped_clock_ratio(500, 700) == pytest.approx(0.8396, abs=1e-4)
    assert st.power_capped_clock_ratio(700, 700) == 1.0 and st.power_capped_clock_ratio(800, 700) == 1.0
    with pytest.raises(ValueError, match="static"):
        st.power_capped_clock_ratio(100, 700)


def test_the_published_rows_record_their_gradient_accumulation():
    path = data_dir().parent / "benchmarks" / "throughput_published.csv"
    if not path.exists():
        pytest.skip("benchmarks/ is not shipped with the wheel")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:  # Qwen: "batch 1 x gradient accumulation 8" in each row's notes; the others state no accumulation
        assert int(row["grad_accum"]) == (8 if "gradient accumulation 8" in row["notes"] else 1), row["id"]
        assert int(row["batch_per_gpu"]) % int(row["grad_accum"]) == 0


# -- issue 16 phase 3: GEMMs on the roofline, LoRA's elementwise kernels, GPTQ's torch dequantization -----------------
def test_a_thin_gemm_runs_at_the_memorys_pace_and_a_square_one_at_the_matmul_rate():
    # [8192, 4096] x [4096, 16]: 2·8192·4096·16 = 1.07 GFLOP;
    # bytes (8192·4096 + 4096·16)·2 + 8192·16·2 = 67.5 MB
    thin = st.linear_gemm(8192, 4096, 16, 1)
    assert thin.flops == pytest.approx(2 * 8192 * 4096 * 16)
    assert thin.nbytes == pytest.approx((8192 * 4096 + 4096 * 16) * 2 + 8192 * 16 * 2)
    assert st.gemm_seconds(thin, 800, 3350) == pytest.approx(thin.nbytes / 3350e9)
    square = st.linear_gemm(8192, 8192, 8192, 3)
    assert st.gemm_seconds(square, 800, 3350) == pytest.approx(3 * 2 * 8192 ** 3 / 800e12)


def test_large_dense_gemms_keep_the_aggregate_matmul_time():
    # Llama 8B at 8192 tokens: every GEMM is compute-bound, so the roofline sum equals FLOPs / R_mm (lm_head is not
    # recomputed, so compare without checkpointing)
    work = st.step_work(LLAMA8B_SHAPE, st.StepSetup(tokens=8192, seq_len=8192), matmul_tflops=800)
    rates = st.StepRates(800, 300, 3350, 989)
    assert st.step_time(work, rates).matmul_s == pytest.approx(work.matmul_flops / 800e12, rel=1e-9)


def test_lora_elementwise_bytes_by_hand():
    # bf16 adapters, no dropout, eager: forward scale (r+w out) + add (2 reads + 1 write out) = 5·2·out;
    # backward scale 2·2·out + sum of input gradients 3·2·in
    got = st.lora_elementwise_bytes(1, 4096, 1024)
    assert got == 10 * 1024 + 4 * 1024 + 6 * 4096
    # fp32 adapters add the cast of x (read 2, write 4) and its backward (read 4, write 2); dropout (read 4, write 4,
    # mask 1) in forward and backward
    fp32 = st.lora_elementwise_bytes(1, 4096, 1024, adapter_bytes=4, dropout=True)
    assert fp32 - got == 2 * 6 * 4096 + 2 * 9 * 4096


def test_lora_adds_memory_traffic_and_time_to_a_step():
    base = dict(tokens=4096, seq_len=2048, train_base=False, grad_ckpt="full", adapter_params=20_971_520)
    plain = st.step_work(LLAMA8B_SHAPE, st.StepSetup(**base), matmul_tflops=800)
    shapes = ((4096, 4096, 32), (4096, 1024, 32), (4096, 1024, 32), (4096, 4096, 32), (4096, 14336, 32),
              (4096, 14336, 32), (14336, 4096, 32))
    lora = st.step_work(LLAMA8B_SHAPE, st.StepSetup(**base, lora_linears=shapes, lora_rank=16), matmul_tflops=800)
    assert lora.memory_bytes > plain.memory_bytes
    rates = st.StepRates(800, 300, 3350, 989)
    assert st.step_time(lora, rates).step_s > st.step_time(plain, rates).step_s


def test_gptq_torch_dequantizes_16_5_bytes_per_weight_and_not_in_backward():
    assert st.dequant_bytes_per_weight("gptq-torch", 4) == 16.5  # 4.5 + 5 + 2 + 2 + 3 (qlinear_cuda_old, fp16)
    assert st.dequant_bytes_per_weight("gptq-torch-bf16", 4) == 20.5  # + bf16 autocast's cast of the weight
    assert st.dequant_bytes_per_weight("bnb", 4) == 2.5
    kw = dict(tokens=4096, seq_len=512, train_base=False, quant_bits=4, grad_ckpt="full")
    bnb = st.step_work(LLAMA8B_SHAPE, st.StepSetup(**kw), matmul_tflops=800)
    gptq = st.step_work(LLAMA8B_SHAPE, st.StepSetup(**kw, quant_kernel="gptq-torch"), matmul_tflops=800)
    none = st.step_work(LLAMA8B_SHAPE, st.StepSetup(**{**kw, "quant_bits": 0}), matmul_tflops=800)
    n_linear = LLAMA8B_SHAPE.matmul_params - V8B * LLAMA8B["hidden_size"]
    assert bnb.memory_bytes - none.memory_bytes == pytest.approx(n_linear * 2.5 * 3)  # forward, backward, recompute
    assert gptq.memory_bytes - none.memory_bytes == pytest.approx(n_linear * 16.5 * 2)  # forward, recompute
    with pytest.raises(ValueError, match="dequantization kernel"):
        st.dequant_bytes_per_weight("magic", 4)


def test_async_tp_hides_forward_and_recompute_collectives_only():
    kw = dict(tokens=8192, seq_len=8192, tp=8, grad_ckpt="full")
    vanilla = st.step_work(LLAMA8B_SHAPE, st.StepSetup(**kw), matmul_tflops=800, tp_link_gb_s=450)
    asynchronous = st.step_work(LLAMA8B_SHAPE, st.StepSetup(**kw, async_tp=True), matmul_tflops=800, tp_link_gb_s=450)
    # full checkpointing: forward, recompute and backward each move the same bytes; only the backward's third shows
    assert asynchronous.serial_s == pytest.approx(vanilla.serial_s / 3)


def test_a_forward_only_attention_rate_slows_the_backward_by_flash_attention_2s_measured_ratio():
    fwd = st.AchievableRate("x", "attention", "bf16", 300.0, "measured", "s", "forward")
    both = st.AchievableRate("x", "attention", "bf16", 300.0, "derived", "s", "forward+backward")
    assert st.attention_backward_tflops(fwd) == pytest.approx(300.0 * 124.57 / 169.28)
    assert st.attention_backward_tflops(both) == 300.0
    work = st.step_work(LLAMA8B_SHAPE, st.StepSetup(tokens=8192, seq_len=8192), matmul_tflops=800)
    assert work.attention_backward_flops == pytest.approx(work.attention_flops * 2.5 / 3.5)  # dQ, dK, dV + recompute S
    fast = st.step_time(work, st.StepRates(800, 300, 3350, 989))
    slow = st.step_time(work, st.StepRates(800, 300, 3350, 989, attention_backward_tflops=150))
    extra_s = work.attention_backward_flops * (1 / 150 - 1 / 300) / 1e12
    assert slow.attention_s - fast.attention_s == pytest.approx(extra_s)


def test_every_attention_rate_says_which_passes_it_measured():
    for rate in st.load_achievable_rates().values():
        if rate.kind == "attention":
            assert rate.passes in ("forward", "forward+backward"), rate


def test_a_ring_across_nodes_runs_one_channel_per_nic():
    # HGX H100: NVLink 450 GB/s per direction, one 400 Gb/s NIC (50 GB/s) per GPU
    assert st.multi_node_ring_gb_s(450, 50, 8) == 400  # all 8 GPUs of each node in the ring: 8 NICs
    assert st.multi_node_ring_gb_s(450, 50, 1) == 50  # one member per node (beside TP=8): one NIC
    assert st.multi_node_ring_gb_s(300, 50, 8) == 300  # NVLink slower than the NICs together


def test_the_optimizer_streams_every_expert_not_the_active_ones():
    # a MoE-like shape: 1e9 active matmul parameters, 30e9 stored; bf16 AdamW moves 14 B per trainable parameter
    active = st.DecoderShape(**LLAMA8B, vocab_size=V8B, active_matmul_params=10**9)
    stored = st.DecoderShape(**LLAMA8B, vocab_size=V8B, active_matmul_params=10**9, total_params=30 * 10**9)
    setup = st.StepSetup(tokens=2048, seq_len=2048)
    extra = (st.step_work(stored, setup, matmul_tflops=800).memory_bytes
             - st.step_work(active, setup, matmul_tflops=800).memory_bytes)
    assert extra == pytest.approx((30e9 - (10**9 + V8B * 4096)) * 14)


# -- the interconnect (issue 14 item 4) -----------------------------------------------------------------------------
def test_a_ring_runs_at_its_slowest_link():
    # inside one node: the node link; across nodes: min(node link, NIC x NICs the node's ring members use)
    assert st.ring_bus_gb_s(450, 8, 8, 50, 8) == 450  # 8 H100s in one node: NVLink, the network unused
    assert st.ring_bus_gb_s(450, 16, 8, 50, 8) == 400  # two HGX nodes: eight 400 Gb/s NICs per node
    assert st.ring_bus_gb_s(450, 16, 8, 12.5, 8) == 100  # the same nodes on 100 GbE: 8 x 12.5 GB/s
    assert st.ring_bus_gb_s(32, 16, 8, 50, 1) == 32  # two 8x RTX 4090 boxes, one NDR NIC each: PCIe is slower
    assert st.ring_bus_gb_s(32, 16, 8, 12.5, 1) == 12.5  # ... on one 100 GbE port each: the network is slower
    assert st.ring_bus_gb_s(450, 32, 1, 50, 8) == 50  # one member per node (beside TP=8): one NIC, no NVLink hop


def test_the_backward_runs_two_thirds_of_full_fine_tunings_matmuls_and_three_quarters_with_checkpointing():
    # forward 2NT, input and weight gradients 4NT (Kaplan et al. 2020); full checkpointing reruns the forward (2NT)
    plain = st.step_work(LLAMA8B_SHAPE, st.StepSetup(tokens=2048, seq_len=2048), matmul_tflops=800)
    ckpt = st.step_work(LLAMA8B_SHAPE, st.StepSetup(tokens=2048, seq_len=2048, grad_ckpt="full"), matmul_tflops=800)
    assert plain.backward_share == pytest.approx(4 / 6)
    assert ckpt.backward_share == pytest.approx(6 / 8)


def _slow_link_step(sharding: str) -> tuple[st.StepWork, st.StepTime]:
    # full fine-tuning of Llama 3.1 8B on 8 ranks over a 1 GB/s link: the collectives far exceed the compute
    setup = st.StepSetup(tokens=2048, seq_len=2048, dp=8, sharding=sharding)
    work = st.step_work(LLAMA8B_SHAPE, setup, matmul_tflops=800, dp_link_gb_s=1.0)
    return work, st.step_time(work, st.StepRates(800, 400, 3350, 989))


def test_deepspeed_zero2_hides_no_communication_where_ddp_hides_it_under_the_backward():
    # ZeRO-1/2's overlap_comm defaults to False (deepspeed zero/config.py): the gradient reduce-scatter and the
    # all-gather of the updated partitions, 2·(n-1)/n·P·2 bytes, are all exposed; DDP's bucketed all-reduce of the
    # same bytes runs under the backward's compute
    params = LLAMA8B_SHAPE.matmul_params + V8B * 4096
    wire_s = 2 * 7 / 8 * params * 2 / (1e9 * st.NCCL_BUS_EFFICIENCY)
    zero2_work, zero2 = _slow_link_step("zero2")
    ddp_work, ddp = _slow_link_step("ddp")
    assert zero2.exposed_comm_s == pytest.approx(wire_s)
    compute_s = ddp.step_s - ddp.exposed_comm_s
    assert ddp.exposed_comm_s == pytest.approx(wire_s - compute_s * ddp_work.backward_share)


def test_fsdp_hides_its_forward_gathers_under_the_forward_and_the_rest_under_the_backward():
    # FSDP2 prefetches the next layer's all-gather in forward and in backward; reduce-scatters run in backward:
    # forward (n-1)/n·P·2 bytes against the forward's compute, backward (n-1)/n·(P·2 + G·2) against the backward's
    params = LLAMA8B_SHAPE.matmul_params + V8B * 4096
    gather_s = 7 / 8 * params * 2 / (1e9 * st.NCCL_BUS_EFFICIENCY)
    work, t = _slow_link_step("fsdp")
    assert work.comm_forward_s == pytest.approx(gather_s) and work.comm_s == pytest.approx(3 * gather_s)
    compute_s = t.step_s - t.exposed_comm_s
    assert t.exposed_comm_s == pytest.approx(3 * gather_s - compute_s)  # both phases' compute fully used


# -- transformers' --tp in the step (vramcalc.cost.step_for on terms.tensor_parallel.rank_view) -----------------------
# llama-3.1-8b full fine-tuning, defaults: b 1, s 2048 (T = 2048 tokens), bf16 (c = 2 bytes), no checkpointing.
# transformers' plan all-reduces [T, h] L·(2 + 5) + 2 = 32·7 + 2 = 226 times per micro-batch (T·h·c = 2048·4096·2
# = 16,777,216 B each) and all-gathers the [T, V] logits (2048·128256·2 = 525,336,576 B). A ring all-reduce sends
# 2·(n-1)/n of its payload, an all-gather (n-1)/n (NCCL PERFORMANCE.md): per rank and step
#   (n-1)/n · (2·226·16,777,216 + 525,336,576) = (n-1)/n · 8,108,638,208 B
#   tp 2: 4,054,319,104 B; tp 8: 7,095,058,432 B.
# Links (data/gpus.csv): H100 SXM NVLink 900 GB/s bidirectional = 450 per direction, PCIe Gen5 x16 64 GB/s; RTX 4090
# PCIe Gen4 x16 32 GB/s; NCCL reaches 80% of it (step_time.NCCL_BUS_EFFICIENCY). Seconds = bytes / (GB/s·0.8·1e9):
#   h100-sxm nvlink tp 2: 4,054,319,104 / 360e9 = 0.011262 s; tp 8: 7,095,058,432 / 360e9 = 0.019709 s
#   h100-sxm pcie   tp 2: 4,054,319,104 / 51.2e9 = 0.079186 s
#   rtx-4090 (pcie) tp 2: 4,054,319,104 / 25.6e9 = 0.158372 s
TP_COMM_S_BY_HAND = {("h100-sxm", None, 2): 0.011262, ("h100-sxm", None, 8): 0.019709,
                     ("h100-sxm", "pcie", 2): 0.079186, ("rtx-4090", None, 2): 0.158372}


def _tp_details(gpu, tp_degree, interconnect=None, **options):
    import vramcalc as vc

    if tp_degree > 1:
        options["tp"] = tp_degree
    if interconnect:
        options["interconnect"] = interconnect
    return vc.estimate("llama-3.1-8b", gpu=gpu, **options).details


@pytest.mark.parametrize("gpu,interconnect,tp", sorted(TP_COMM_S_BY_HAND, key=str))
def test_tp_communication_time_is_the_traffic_over_the_node_link_by_hand(gpu, interconnect, tp):
    details = _tp_details(gpu, tp, interconnect)
    assert details["tp_communication_seconds_per_step"] == pytest.approx(TP_COMM_S_BY_HAND[gpu, interconnect, tp],
                                                                         rel=1e-4)
    # on the critical path: the step holds all of it, inside its exposed communication
    assert details["step_breakdown_s"]["exposed_communication"] >= details["tp_communication_seconds_per_step"]


def test_tp_communication_share_grows_with_tp_and_with_a_slower_link():
    share = {}
    for interconnect in (None, "pcie"):
        for tp in (2, 4, 8):
            d = _tp_details("h100-sxm", tp, interconnect)
            share[interconnect, tp] = d["tp_communication_seconds_per_step"] / d["step_seconds"]
        # bytes grow as (n-1)/n (1/2, 3/4, 7/8 of 8.1 GB) while each rank's compute shrinks towards 1/tp
        assert share[interconnect, 2] < share[interconnect, 4] < share[interconnect, 8]
    for tp in (2, 4, 8):  # same bytes, a 450/64 = 7x slower link: the share is several times NVLink's
        assert share["pcie", tp] > 2.5 * share[None, tp]


def test_tp_1_is_the_single_gpu_step_and_tp_splits_one_ranks_compute():
    alone = _tp_details("h100-sxm", 1)
    assert _tp_details("h100-sxm", 1, tp=1)["step_seconds"] == alone["step_seconds"]
    assert "tp_communication_seconds_per_step" not in alone
    two = _tp_details("h100-sxm", 2)
    compute = two["step_seconds"] - two["tp_communication_seconds_per_step"]
    # the layers' matmuls and attention halve, the norms, residual stream, logits and loss stay whole on each rank
    assert alone["step_seconds"] / 2 < compute < alone["step_seconds"]


def test_tp_rank_matmuls_are_exactly_half_the_model_at_tp_2():
    # 7,504,658,432 matmul parameters (test_matmul_params_of_llama_3_1_8b_by_hand) of which lm_head 525,336,576: a rank
    # holds half of q/k/v/o, gate/up/down (6,979,321,856 / 2 = 3,489,660,928) and computes lm_head's 128256/2 = 64128
    # columns ("colwise_gather_output": 262,668,288); cost.matmul_params also counts the RMSNorm weights
    # (32·2·4096 + 4096 = 266,240), whole on every rank: 3,752,595,456.
    from vramcalc import cost
    from vramcalc.catalogue import get_model
    from vramcalc.terms.tensor_parallel import rank_spec

    spec = get_model("llama-3.1-8b")
    assert cost.tensor_parallel_shape(rank_spec(spec, 2), 2).matmul_params == 3_752_595_456
    assert cost.tensor_parallel_shape(spec, 1) == cost.decoder_shape(spec)


def test_tp_throughput_is_the_groups_times_dp_and_mfu_the_ranks_share():
    details = _tp_details("h100-sxm", 2, num_gpus=4, sharding="fsdp")
    # dp = 4 / 2 = 2 ranks, each with b·s = 2048 tokens per step
    assert details["tokens_per_second"] == pytest.approx(2 * 2048 / details["step_seconds"])
    assert details["tokens_per_second_per_gpu"] == pytest.approx(details["tokens_per_second"] / 4)
    # PaLM model FLOPs per token of one rank: 6·3,752,595,456 (the rank's matmul parameters, previous test)
    # + 3·2·32·16·2048·(128 + 128) (16 of the 32 heads) = 22,515,572,736 + 1,610,612,736 = 24,126,185,472, on its
    # group's 2048 tokens; H100 SXM bf16 dense peak 989.4 TFLOP/s (data/gpus.csv)
    rank_flops = 24_126_185_472 * 2048
    assert details["mfu"] == pytest.approx(rank_flops / (details["step_seconds"] * 989.4e12), rel=1e-6)


# -- view ops on the host (issue 16 item 2, S24) ------------------------------------------------------------------------
# Launched ops per decoder layer of one eager micro-step, traced with TorchDispatchMode on transformers' Llama
# (benchmarks/throughput_trace_ops.py, torch 2.13 / transformers 5.25 / peft 0.21): 111 (full fine-tuning), 226 (LoRA
# all-linear), 367 - 28 CPU-only dropout ops = 339 (LoRA all-linear, dropout, fp32 adapters, reentrant checkpointing).
@pytest.mark.parametrize("train_base, adapted, dropout, cast, recompute, traced", [
    (True, 0, False, False, (0.0, 0.0, 0.0), 111),
    (False, 7, False, True, (0.0, 0.0, 0.0), 226),
    (False, 7, True, True, (1.0, 1.0, 1.0), 339),
])
def test_the_counted_kernels_of_an_eager_layer_match_a_traced_step(train_base, adapted, dropout, cast, recompute,
                                                                   traced):
    k = st.kernel_counts(1, micro_batches=1, fused=False, train_base=train_base, adapted_linears=adapted, quant_bits=0,
                         recompute=recompute, lora_dropout=dropout, lora_cast=cast)
    per_layer = k.gemm + k.attention + k.other - st.HEAD_KERNELS
    assert per_layer == pytest.approx(traced, rel=0.05)


def test_eager_steps_pay_host_time_for_their_view_ops_and_compiled_steps_do_not():
    eager = st.kernel_counts(32, micro_batches=8, fused=False, train_base=False, adapted_linears=32 * 5,
                             quant_bits=0, recompute=(1.0, 1.0, 1.0), lora_dropout=True, lora_cast=True)
    compiled = st.kernel_counts(32, micro_batches=8, fused=True, train_base=False, adapted_linears=32 * 5,
                                quant_bits=0, recompute=(1.0, 1.0, 1.0))
    assert compiled.views == 0.0
    assert st.host_seconds_per_kernel(compiled) == st.HOST_SECONDS_PER_KERNEL
    launched = eager.gemm + eager.attention + eager.other
    # about one view per launched op (652 per 676 traced), each at autograd + dispatch midpoints (2 + 1.5 µs)
    assert eager.views == pytest.approx(launched * 652 / 676)
    assert st.host_seconds_per_kernel(eager) == pytest.approx(10e-6 + 652 / 676 * 3.5e-6)


def test_a_host_bound_step_takes_the_same_time_per_layer_at_any_width():
    # The published Qwen LoRA rows at 256 tokens take 4.7-5.2 ms per layer and micro-batch at 1.8B, 7B and 14B (1.0,
    # 1.2 and 1.6 s/it over 24, 32 and 40 layers x 8 micro-batches): the signature of a host-bound step. The model's
    # host time per layer is likewise independent of the hidden size.
    def per_layer_s(hidden, layers):
        shape = st.DecoderShape(hidden, layers, hidden // 128, hidden // 128, 128, 3 * hidden, 1000)
        setup = st.StepSetup(tokens=8 * 128, seq_len=128, train_base=False, micro_batches=8, grad_ckpt="full",
                             adapted_linears=5 * layers, lora_dropout=True, adapter_bytes=4.0)
        t = st.step_time(st.step_work(shape, setup, matmul_tflops=271.2), st.StepRates(271.2, 156, 2039, 312))
        assert t.host_s / t.step_s > 0.8
        return t.step_s / (8 * layers)
    assert per_layer_s(1024, 24) == pytest.approx(per_layer_s(2048, 40), rel=0.05)


def test_a_qlora_step_costs_at_least_its_dequantization_bytes_more_than_lora():
    # bitsandbytes MatMul4Bit dequantizes W in forward (or reads it in its fused gemm_4bit) and again in backward for
    # dX (bitsandbytes 0.50.2 autograd/_functions.py:384), and each recomputed forward runs it again
    shape = st.DecoderShape(4096, 32, 32, 8, 128, 14336, 128256)
    lora = st.StepSetup(tokens=8 * 4096, seq_len=4096, train_base=False, grad_ckpt="full", micro_batches=2,
                        adapted_linears=7 * 32)
    qlora = st.StepSetup(tokens=8 * 4096, seq_len=4096, train_base=False, grad_ckpt="full", micro_batches=2,
                         adapted_linears=7 * 32, quant_bits=4)
    rates = st.StepRates(271.2, 156, 2039, 312)
    t_lora = st.step_time(st.step_work(shape, lora, matmul_tflops=271.2), rates).step_s
    t_qlora = st.step_time(st.step_work(shape, qlora, matmul_tflops=271.2), rates).step_s
    n_linear = 32 * (4096 * 4096 * 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    dequant_s = n_linear * (0.5 + 2.0) * 3 * 2 / 2039e9  # forward, backward, recompute; two micro-batches
    assert t_qlora - t_lora >= dequant_s * 0.999


# -- attention work per layer: sliding windows and a hybrid's convolution layers -------------------------------------
@pytest.mark.parametrize("seq_len,window", [(64, 16), (100, 7), (50, 49), (30, 30), (30, 64)])
def test_flash_sliding_layer_work_counts_the_pairs_each_query_attends(seq_len, window):
    # brute force: query i (1-based, causal) attends min(i, window) keys; a full causal layer attends i
    attended = sum(min(i, window) for i in range(1, seq_len + 1))
    causal = sum(range(1, seq_len + 1))
    assert st.attention_layer_work(window, seq_len, "flash") == pytest.approx(attended / causal)


def test_sdpa_with_a_sliding_mask_computes_every_tile_and_eager_its_full_count():
    # a 4-D mask tensor sends SDPA to the memory-efficient kernel: every tile of s x s, twice the causal kernel's
    # half; below the window transformers skips the mask (is_causal): a full layer's work
    assert st.attention_layer_work(4096, 8192, "sdpa") == 2.0
    assert st.attention_layer_work(4096, 2048, "sdpa") == 1.0
    assert st.attention_layer_work(4096, 8192, "eager") == 1.0
    assert st.attention_layer_work(None, 8192, "flash") == 1.0


def test_step_time_counts_attention_only_on_attention_layers_and_windows():
    from vramcalc.catalogue import get_model
    from vramcalc.cost import decoder_shape

    lfm2 = get_model("lfm2-1.2b")  # data/hybrid_layers.csv: 6 full_attention layers among 16
    assert decoder_shape(lfm2).num_attention_layers == 6 == lfm2.layer_types.count("full_attention")
    gemma2 = decoder_shape(get_model("gemma-2-9b"))  # 42 layers, 21 of them slide over 4096 tokens
    assert gemma2.attention_layers(8192, "flash") == pytest.approx(
        21 + 21 * st.attention_layer_work(4096, 8192, "flash"))
    assert gemma2.attention_layers(8192, "sdpa") == 21 + 21 * 2
    assert gemma2.attention_layers(2048, "flash") == 42
    # the flash step of a long sequence is faster than the sdpa step, whose sliding layers compute every tile
    work = {kernel: st.step_work(gemma2, st.StepSetup(tokens=8192, seq_len=8192, attention_kernel=kernel),
                                 matmul_tflops=600.0) for kernel in ("flash", "sdpa")}
    assert work["flash"].attention_flops < work["sdpa"].attention_flops


@pytest.mark.parametrize("fused", [False, True])
def test_q_and_k_norms_cost_what_the_layers_own_two_rmsnorms_cost(fused):
    # Qwen3's q_norm and k_norm are the same RMSNorm module as the layer's input and post-attention norms
    # (transformers models/qwen3/modeling_qwen3.py), so their kernels are the two hidden norms' kernels: 8 + 8 of
    # LlamaRMSNorm's eager forward, one fused kernel each compiled; and each normed element costs what a hidden
    # element costs in those norms: 18 element-equivalents eager (elementwise_bytes' 18h per norm), 2 fused.
    kwargs = dict(micro_batches=2, fused=fused, train_base=True, adapted_linears=0, quant_bits=0,
                  recompute=(1.0, 1.0, 1.0))
    plain = st.kernel_counts(28, **kwargs)
    normed = st.kernel_counts(28, **kwargs, qk_norm=True)
    two_norms = 16 if not fused else 2
    passes = 1 + st.BACKWARD_KERNELS_PER_FORWARD + 1.0
    assert normed.other - plain.other == pytest.approx(two_norms * passes * 28 * 2)
    assert (normed.gemm, normed.attention) == (plain.gemm, plain.attention)
    q_w, kv_w = 16 * 128, 8 * 128
    args = (1000, 1024, q_w, kv_w, 3072, 28)
    extra = st.elementwise_bytes(*args, fused=fused, qk_norm=True) - st.elementwise_bytes(*args, fused=fused)
    per_element = 18 if not fused else 2
    assert extra == pytest.approx(per_element * (q_w + kv_w) * 2 * 28 * 1000 * 3.0)


def test_a_qwen3_step_counts_its_q_and_k_norms_and_a_llama_step_does_not():
    from vramcalc.cost import decoder_shape
    from vramcalc.catalogue import get_model

    assert decoder_shape(get_model("qwen3-0.6b")).qk_norm is True
    assert decoder_shape(get_model("llama-3.1-8b")).qk_norm is False


@pytest.mark.parametrize("model, seq_len, gpu", [("gemma-3-4b", 131072, "h100-sxm"), ("phi-3-mini", 32768, "a100-80gb"),
                                                 ("mistral-7b-v0.1", 32768, "h100-sxm")])
def test_a_sliding_window_model_counts_the_keys_it_attends_so_mfu_stays_below_one(model, seq_len, gpu):
    # MFU = model FLOPs / (step time x peak): a windowed layer's tokens attend at most its window, as the flash
    # kernel's time assumes; counting the whole sequence gave 1.19 (gemma-3-4b, 128k) and 1.74 (phi-3-mini, 32k)
    from vramcalc import estimate

    mfu = estimate(model, gpu=gpu, method="lora", seq_len=seq_len, attn="flash", grad_ckpt=True).details["mfu"]
    assert 0 < mfu < 1


# DeepSpeed ZeRO-1/2 gradient hooks (deepspeed/runtime/zero/stage_1_and_2.py @v0.12.4, :912-914 and :1302-1305): with
# contiguous_gradients each trainable tensor's gradient is copied into the bucket buffer and then into the partition
# buffer (2 copy_ kernels), through narrow/view/view_as (7 view ops); ZeRO-2 in every micro-batch (:1375-1377), ZeRO-1
# in the last one only.
@pytest.mark.parametrize("sharding, hooked_micro_batches", [("zero2", 8), ("zero1", 1), ("none", 0), ("ddp", 0),
                                                             ("fsdp", 0)])
def test_zero_gradient_hooks_add_two_copies_and_seven_views_per_trainable_tensor(sharding, hooked_micro_batches):
    # Qwen-1.8B LoRA on c_attn, attn.c_proj, w1, w2, mlp.c_proj: 24 layers x 5 adapted linears x (A, B) = 240 tensors
    kwargs = dict(micro_batches=8, fused=False, train_base=False, adapted_linears=24 * 5, quant_bits=4,
                  recompute=(1.0, 1.0, 1.0), quant_kernel="gptq-torch", lora_dropout=True)
    plain = st.kernel_counts(24, **kwargs)
    hooked = st.kernel_counts(24, **kwargs, sharding=sharding, trainable_tensors=240)
    assert hooked.other - plain.other == 2 * 240 * hooked_micro_batches
    assert hooked.views - plain.views == pytest.approx(7 * 240 * hooked_micro_batches)
    assert hooked.gemm == plain.gemm and hooked.attention == plain.attention


def test_zero_hooks_run_in_compiled_steps_too():
    # the hooks are eager autograd hooks outside any compiled region: their views stay when the layers are compiled
    compiled = st.kernel_counts(2, micro_batches=1, fused=True, train_base=False, adapted_linears=2, quant_bits=0,
                                recompute=(0.0, 0.0, 0.0), sharding="zero2", trainable_tensors=4)
    assert compiled.views == 7 * 4


@pytest.mark.parametrize("train_base, adapted, adapter_params, expected", [
    (True, 0, 0, 32 * 9 + 3),   # Llama: q, k, v, o, gate, up, down, 2 RMSNorm weights per layer; embed, norm, lm_head
    (False, 32 * 7, 0, 2 * 32 * 7),  # LoRA: lora_A and lora_B per adapted linear
    (False, 0, 20 * 4096, 1),   # prompt tuning: one embedding
    (False, 0, 0, 0),
])
def test_trainable_tensors_by_method(train_base, adapted, adapter_params, expected):
    assert st.trainable_tensor_count(32, train_base=train_base, adapted_linears=adapted,
                                     adapter_params=adapter_params) == expected


def test_step_work_passes_zero2_hooks_through_for_a_lora_step():
    shape = st.DecoderShape(2048, 24, 16, 16, 128, 5504, 151936)
    base = dict(tokens=8 * 256, seq_len=256, train_base=False, micro_batches=8, grad_ckpt="full",
                adapted_linears=24 * 5, adapter_params=1)
    none = st.step_work(shape, st.StepSetup(**base), matmul_tflops=271.2).kernels
    zero2 = st.step_work(shape, st.StepSetup(**base, sharding="zero2"), matmul_tflops=271.2).kernels
    assert zero2.other - none.other == 2 * 240 * 8
