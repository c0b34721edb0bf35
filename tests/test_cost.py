"""Claims about the time and cost model (vramcalc/cost.py). Golden numbers cite memory-math §9."""

from __future__ import annotations

import math
import re

import pytest

import vramcalc as vc
from vramcalc import cost
from vramcalc.catalogue import get_gpu, get_model, gpus
from vramcalc.errors import VramcalcError
from vramcalc.options import Method
from vramcalc.training_setup import resolve_setup


def flops(model: str, **options) -> cost.TrainingFlops:
    spec = get_model(model)
    return cost.training_flops(spec, resolve_setup(spec, **options))


# -- FLOPs --------------------------------------------------------------------------------------------------------
def test_llama3_8b_matmul_params_are_7_50b_as_memory_math_counts():
    # memory-math §9: "Llama-3-8B: N_mm = 7.50B ⇒ 45.0 GFLOP/token + attention 6.44 GFLOP/token at s=4096"
    assert cost.matmul_params(get_model("llama-3.1-8b")) == pytest.approx(7.50e9, rel=1e-3)


def test_llama3_8b_full_finetune_flops_are_6n_plus_attention_at_4096():
    f = flops("llama-3.1-8b", seq_len=4096)
    assert f.model_flop_per_token == pytest.approx(45.0e9 + 6.44e9, rel=2e-3)
    assert f.hardware_flop_per_token == f.model_flop_per_token


def test_llama3_8b_full_finetune_on_one_a100_at_40_percent_takes_about_115_gpu_hours():
    # memory-math §9: "Llama-3-8B full FT, 1B tokens, s=4096: A100 @40 % ≈ 115 GPU-h"
    a100 = get_gpu("a100-80gb")
    time = cost.training_time(flops("llama-3.1-8b", seq_len=4096), 1e9, 1, 1, cost.peak_flop_per_s(a100, "bf16"), 0.40)
    assert time.gpu_hours == pytest.approx(115, rel=0.01)


def test_recomputation_adds_one_forward_to_the_hardware_flops_only():
    plain, ckpt = flops("llama-3.1-8b", seq_len=4096), flops("llama-3.1-8b", seq_len=4096, grad_ckpt=True)
    assert ckpt.model_flop_per_token == plain.model_flop_per_token
    assert ckpt.hardware_flop_per_token == pytest.approx(plain.hardware_flop_per_token * 4 / 3)


def test_lora_flops_are_four_n_plus_six_adapters_plus_three_attention_forwards():
    # memory-math §9: frozen base weights skip the weight-gradient GEMMs: 4·N_mm + 6·N_lora, attention 3x forward.
    # By hand from Llama-3.1-8B's config.json (L=32, h=4096, a=32 heads of d=128, 8 KV heads, I=14336, V=128256):
    #   N_mm  = 32·(2·4096² + 2·4096·1024 + 3·4096·14336 + 2·4096) + 4096 + 128256·4096   (norms included;
    #           the lm_head is a matmul, the embedding a lookup)                           = 7,504,924,672
    #   N_lora (r=16, all-linear) = 32·16·(2·(4096+4096) + 2·(4096+1024) + 3·(4096+14336)) = 41,943,040
    #           (memory-math §4: "Llama-3-8B r=16 all-linear 41.94M"; peft print_trainable_parameters)
    #   A     = 2·L·a·s·(d_qk + d_v) at s=2048 = 2·32·32·2048·256                           = 1,073,741,824
    spec = get_model("llama-3.1-8b")
    resolved = resolve_setup(spec, method="lora", lora_rank=16, lora_targets="all-linear")
    n_mm, n_lora, attention = 7_504_924_672, 41_943_040, 1_073_741_824
    assert cost.training_flops(spec, resolved).model_flop_per_token == 4 * n_mm + 6 * n_lora + 3 * attention
    assert 4 * n_mm + 6 * n_lora + 3 * attention == 33_492_582_400


@pytest.mark.parametrize("method", ["lora", "qlora", "prompt"])
def test_frozen_base_methods_need_fewer_flops_than_full_finetuning(method):
    assert flops("qwen3-8b", method=method).model_flop_per_token < flops("qwen3-8b").model_flop_per_token


def test_moe_flops_count_active_parameters_only():
    spec = get_model("qwen3-30b-a3b")
    assert cost.matmul_params(spec) < spec.params / 5
    assert cost.matmul_params(spec) < spec.active_params


def test_mla_attention_counts_qk_and_v_head_widths_apart():
    spec = get_model("deepseek-r1")
    a, L = spec.num_heads, spec.num_layers
    assert cost.attention_forward_flop_per_token(spec, 1000) == 2 * L * a * 1000 * (192 + 128)


def test_prompt_tuning_pays_for_its_virtual_tokens():
    short = flops("llama-3.1-8b", method="prompt", virtual_tokens=8, seq_len=512)
    long = flops("llama-3.1-8b", method="prompt", virtual_tokens=256, seq_len=512)
    assert long.model_flop_per_token > short.model_flop_per_token * 1.4


# -- peak and utilisation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gpu, dtype", [("t4", "bf16"), ("v100-32gb", "bf16"), ("a100-80gb", "fp8")])
def test_gpu_without_a_dtype_has_no_peak_for_it(gpu, dtype):
    assert cost.peak_flop_per_s(get_gpu(gpu), dtype) is None


def test_h100_dense_bf16_peak_is_989_tflops_not_the_sparse_figure():
    assert cost.peak_flop_per_s(get_gpu("h100-sxm"), "bf16") == pytest.approx(989.4e12)


@pytest.mark.parametrize("gpu", [g.name for g in gpus()])
def test_every_catalogue_gpu_has_a_sourced_default_utilisation(gpu):
    device = get_gpu(gpu)
    assert cost.gpu_generation(device) in cost.MFU_BY_GENERATION
    utilisation = cost.default_utilisation(device, Method.FULL)
    assert 0 < utilisation.mfu < 1 and utilisation.source


def test_qlora_runs_at_a_fraction_of_lora_utilisation():
    h100 = get_gpu("h100-sxm")
    lora, qlora = cost.default_utilisation(h100, Method.LORA), cost.default_utilisation(h100, Method.QLORA)
    assert qlora.mfu == pytest.approx(lora.mfu * cost.QLORA_THROUGHPUT_FACTOR)


def test_given_mfu_overrides_the_default():
    assert cost.job_utilisation(get_gpu("h100-sxm"), Method.FULL, 0.42) == cost.Utilisation(0.42, "given")


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, "fast", float("nan")])
def test_impossible_mfu_is_a_one_line_error(bad):
    with pytest.raises(VramcalcError, match="MFU") as err:
        cost.job_utilisation(get_gpu("h100-sxm"), Method.FULL, bad)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("profile, method, expected", [
    ({"mfu": 0.37}, Method.QLORA, 0.37),
    ({"mfu": {"full": 0.41}}, Method.FULL, 0.41),
    ({"mfu": {"full": 0.41}}, Method.LORA, 0.30),  # method not in the profile: the Hopper default
])
def test_calibration_profile_mfu_replaces_the_default(monkeypatch, profile, method, expected):
    monkeypatch.setattr(cost, "profile_data", lambda name: profile)
    assert cost.job_utilisation(get_gpu("h100-sxm"), method).mfu == pytest.approx(expected)


def test_refit_recovers_the_utilisation_that_produced_the_step_times(monkeypatch):
    h100 = get_gpu("h100-sxm")
    spec = get_model("llama-3.1-8b")
    records = []
    for batch, true_mfu in ((2, 0.33), (4, 0.35), (8, 0.37)):
        resolved = resolve_setup(spec, method="lora", batch_size=batch, seq_len=1024, grad_accum=2)
        step_flops = cost.training_flops(spec, resolved).hardware_flop_per_token * batch * 1024 * 2
        seconds = step_flops / (cost.peak_flop_per_s(h100, "bf16") * true_mfu)
        records.append({"model": "llama-3.1-8b", "method": "lora", "batch_size": batch, "seq_len": 1024,
                        "grad_accum": 2, "step_seconds": seconds})
    monkeypatch.setattr(cost, "profile_data", lambda name: {"step_times": records})
    utilisation = cost.job_utilisation(h100, Method.LORA)
    assert utilisation.mfu == pytest.approx(0.35)
    assert "3 measured steps" in utilisation.source


def test_eager_attention_costs_hbm_time_and_flash_does_not():
    spec, h100 = get_model("llama-3.1-8b"), get_gpu("h100-sxm")
    eager = cost.eager_attention_seconds_per_token(spec, resolve_setup(spec, attn="eager"), h100)
    flash = cost.eager_attention_seconds_per_token(spec, resolve_setup(spec, attn="flash"), h100)
    assert eager > 0 and flash == 0


def test_eager_attention_time_runs_at_the_achievable_bandwidth_and_falls_back_to_the_datasheet(monkeypatch):
    from vramcalc import step_time as st

    spec, h100 = get_model("llama-3.1-8b"), get_gpu("h100-sxm")
    resolved = resolve_setup(spec, attn="eager")
    achievable = cost.eager_attention_seconds_per_token(spec, resolved, h100)
    monkeypatch.setattr(st, "rates_index", lambda path=None: {})  # a rates file without the GPU's memory row
    datasheet = cost.eager_attention_seconds_per_token(spec, resolved, h100)
    # the same bytes over 2,970 GB/s (Azure BabelStream triad, data/achievable_rates.csv) instead of 3,350
    assert achievable / datasheet == pytest.approx(3350 / 2970)


@pytest.mark.parametrize("name", ["a100-80gb", "h100-sxm", "h200", "b200", "rtx-4090"])
def test_the_step_runs_memory_bound_work_at_the_achievable_bandwidth_not_the_datasheets(name):
    from vramcalc import step_time as st

    spec, gpu = get_model("llama-3.1-8b"), get_gpu(name)
    work, rates = cost.step_work_for(spec, resolve_setup(spec, method="lora"), gpu)
    row = st.achievable_rate(name, "memory", "any")
    assert rates.bandwidth_gb_s == row.gb_s < gpu.bandwidth_gb_s
    step = st.step_time(work, rates)
    assert step.memory_s == pytest.approx(work.memory_bytes / (row.gb_s * 1e9))


# -- money --------------------------------------------------------------------------------------------------------
def test_rent_is_price_times_gpus_times_hours():
    assert cost.rent_cost_usd(3.99, 8, 10.0) == pytest.approx(319.2)


def test_buy_is_list_price_times_gpus_and_amortisation_takes_the_jobs_share():
    assert cost.buy_cost_usd(30000, 8) == 240000
    assert cost.amortised_buy_cost_usd(30000, 8, 8760, 3) == pytest.approx(80000)


def test_energy_is_tdp_times_gpus_times_hours():
    kwh = cost.energy_kwh(700, 8, 10)
    assert kwh == pytest.approx(56.0)
    assert cost.energy_cost_usd(kwh, 0.15) == pytest.approx(8.4)


def test_a_missing_price_gives_no_cost_never_zero():
    assert cost.rent_cost_usd(None, 8, 10) is None
    assert cost.buy_cost_usd(None, 8) is None
    assert cost.amortised_buy_cost_usd(None, 8, 10, 3) is None
    assert cost.energy_cost_usd(cost.energy_kwh(None, 8, 10), 0.15) is None


@pytest.mark.parametrize("call", [
    lambda bad: cost.energy_cost_usd(1.0, bad),
    lambda bad: cost.amortised_buy_cost_usd(30000, 1, 10, bad),
    lambda bad: cost.positive_number(bad, "token count"),
])
@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "abc", True, None])
def test_zero_negative_or_non_numeric_prices_and_horizons_are_one_line_errors(call, bad):
    with pytest.raises(VramcalcError) as err:
        call(bad)
    assert "must be a positive number" in str(err.value) and "\n" not in str(err.value)


# -- hosted services ----------------------------------------------------------------------------------------------
def test_every_hosted_price_is_dated_sourced_and_positive():
    prices = cost.hosted_prices()
    assert len(prices) >= 5
    for price in prices:
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", price.price_date), price
        assert price.source and price.usd_per_million_tokens > 0
        assert price.model_access in ("open-weight", "closed")


@pytest.mark.parametrize("model, method, providers", [
    ("llama-3.3-70b", "lora", {"fireworks", "together"}),
    ("llama-3.1-8b", "full", {"fireworks"}),
    ("deepseek-r1", "qlora", {"fireworks"}),
    ("llama-3.3-70b", "full", set()),
    ("llama-3.1-8b", "prompt", set()),
])
def test_hosted_prices_apply_by_size_bracket_and_kind_of_training(model, method, providers):
    spec = get_model(model)
    matched = {p.provider for p in cost.hosted_prices() if p.applies_to(spec.params / 1e9, Method(method))}
    assert matched == providers


def test_hyperscaler_fine_tuning_apis_are_priced():
    # issue 16 item 5: Google Vertex and AWS Bedrock beside OpenAI, Together and Fireworks, where published
    providers = {price.provider for price in cost.hosted_prices()}
    assert {"openai", "together", "fireworks", "vertex", "bedrock"} <= providers


def test_an_open_weight_price_that_does_not_say_lora_or_full_matches_no_job():
    # Bedrock publishes one price per model (Llama 2 13B, 70B) without saying what it trains: no method may claim it
    unsaid = [p for p in cost.hosted_prices() if p.model_access == "open-weight" and not p.method]
    assert unsaid
    for price in unsaid:
        size = price.min_params_b
        assert not any(price.applies_to(size, method) for method in Method)


def test_hosted_cost_bills_tokens_times_epochs():
    price = next(p for p in cost.hosted_prices() if p.provider == "fireworks" and p.max_params_b == 16)
    assert cost.hosted_cost_usd(price, 2e8, 3) == pytest.approx(price.usd_per_million_tokens * 600)


def test_default_electricity_price_is_positive_and_sourced():
    assert 0 < cost.DEFAULT_USD_PER_KWH < 1 and "EIA" in cost.DEFAULT_USD_PER_KWH_SOURCE
    assert math.isfinite(vc.get_gpu("h100-sxm").tdp_w)


# -- the step-time model in estimate() and the price tables (issue 16 phase 2) -------------------------------------
def step(model="llama-3.1-8b", gpu="h100-sxm", **options):
    spec = get_model(model)
    return cost.step_for(spec, resolve_setup(spec, **options), get_gpu(gpu))


def test_an_estimate_on_a_gpu_carries_the_step_and_one_without_does_not():
    on_gpu = vc.estimate("llama-3.1-8b", method="lora", batch_size=2, grad_accum=4, gpu="h100-sxm").details
    assert {"step_seconds", "tokens_per_second", "mfu", "step_breakdown_s"} <= set(on_gpu)
    assert sum(on_gpu["step_breakdown_s"].values()) == pytest.approx(on_gpu["step_seconds"])
    # one GPU trains batch x seq_len x grad_accum dataset tokens per step
    assert on_gpu["tokens_per_second"] == pytest.approx(2 * 2048 * 4 / on_gpu["step_seconds"])
    assert 0 < on_gpu["mfu"] < 1
    assert "step_seconds" not in vc.estimate("llama-3.1-8b", method="lora").details


def test_data_parallel_tokens_per_second_counts_every_gpu():
    details = vc.estimate("llama-3.1-8b", method="lora", num_gpus=8, sharding="ddp", gpu="h100-sxm").details
    assert details["tokens_per_second"] == pytest.approx(8 * details["tokens_per_second_per_gpu"])


@pytest.mark.parametrize("options, gpu", [
    ({"method": "full", "offload": "optimizer", "sharding": "zero3", "num_gpus": 1}, "h100-sxm"),  # host CPU step
    ({"method": "lora", "precision": "fp32"}, "h100-sxm"),  # no fp32 GEMM rate in data/achievable_rates.csv
    ({"method": "lora"}, "v100-32gb"),  # no bf16 on Volta
])
def test_no_step_where_the_model_has_no_mechanism_or_rate(options, gpu):
    assert step(gpu=gpu, **options) is None


def test_checkpointing_modes_order_the_step_time():
    none, selective, full = (step(method="lora", grad_ckpt=mode).step_s for mode in ("none", "selective", "full"))
    assert none < selective < full


@pytest.mark.parametrize("slower, faster", [
    ({"method": "qlora"}, {"method": "lora"}),  # dequantization of the 4-bit base, every pass
    ({"method": "qlora", "quant": "int8"}, {"method": "qlora", "quant": "nf4"}),  # 1 byte read per weight, not 0.5
    ({"method": "lora"}, {"method": "lora", "compile": True}),  # fused elementwise kernels
    ({"method": "lora"}, {"method": "lora", "kernels": "liger"}),
    ({"method": "full", "activation_offload": True, "grad_ckpt": "none", "batch_size": 4},
     {"method": "full", "grad_ckpt": "none", "batch_size": 4}),  # copies can only add time
    ({"method": "lora", "attn": "eager"}, {"method": "lora", "attn": "sdpa"}),  # the [b, a, s, s] scores in HBM
])
def test_what_removes_work_never_slows_the_step(slower, faster):
    assert step(**slower).step_s >= step(**faster).step_s


def test_optimizer_in_backward_moves_the_same_bytes():
    # the same AdamW update per parameter, run from its post-accumulate-grad hook: same work, so the same step
    assert step(method="full", optimizer_in_backward=True).step_s == pytest.approx(step(method="full").step_s)


def test_a_given_mfu_overrides_the_step_model():
    spec = get_model("llama-3.1-8b")
    resolved = resolve_setup(spec, method="lora")
    per_token, used = cost.step_or_profile_utilisation(spec, resolved, get_gpu("h100-sxm"), mfu=0.25)
    assert per_token is None and used.mfu == 0.25
    per_token, used = cost.step_or_profile_utilisation(spec, resolved, get_gpu("h100-sxm"))
    assert per_token == pytest.approx(1 / step(method="lora").tokens_per_s) and "step-time" in used.source


def _csv(name):
    import csv

    from vramcalc.catalogue import data_dir

    with open(data_dir() / name, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("gpu", ["h100-sxm", "a100-80gb", "b200", "h200"])
def test_cheapest_rate_of_each_kind_is_the_minimum_of_its_rows(gpu):
    rows = [r for r in _csv("cloud_prices.csv") if r["gpu"] == gpu]
    best = cost.cheapest_rates(gpu)
    assert "on-demand" in best
    for kind, rate in best.items():
        assert rate.provider and rate.region and rate.price_date and rate.source
        same_kind = [float(r["usd_per_gpu_hour"]) for r in rows
                     if cost.CloudRate(r["provider"], r["instance"], gpu, r["pricing_model"], 0, "", "", "").kind == kind]
        assert rate.usd_per_gpu_hour == min(same_kind)


def test_every_cloud_rate_and_list_price_names_its_date_and_source():
    for row in _csv("cloud_prices.csv"):
        assert row["price_date"][:4].isdigit() and row["source"].strip() and row["region"].strip(), row
        assert float(row["usd_per_gpu_hour"]) > 0, row
    for row in _csv("gpu_list_prices.csv"):
        assert row["price_date"][:4].isdigit() and row["source"].strip() and float(row["value"]) > 0, row


def test_hyperscalers_and_gpu_clouds_are_covered_by_kind():
    # issue 16: on-demand for AWS, GCP, Azure and at least four GPU clouds; spot and reserved where a dated source was
    # found (AWS and GCP both; Azure spot from the skypilot catalogue, Azure reservations listed as not found in
    # data/prices_sources.md)
    kinds: dict[str, set[str]] = {}
    for rate in cost.cloud_rates():
        kinds.setdefault(rate.provider, set()).add(rate.kind)
    assert all("on-demand" in kinds[provider] for provider in ("AWS", "GCP", "Azure"))
    assert {"spot", "reserved"} <= kinds["AWS"] and {"spot", "reserved"} <= kinds["GCP"]
    assert "spot" in kinds["Azure"]
    assert len([p for p in kinds if p not in ("AWS", "GCP", "Azure")]) >= 4


@pytest.mark.parametrize("gpu, instance", [("h100-sxm", "p5.48xlarge"), ("a100-40gb", "p4d.24xlarge"),
                                           ("a100-80gb", "p4de.24xlarge")])
def test_aws_8_gpu_instances_have_a_1_year_reserved_and_a_spot_rate(gpu, instance):
    models = {rate.pricing_model for rate in cost.cloud_rates() if rate.gpu == gpu and rate.instance == instance}
    assert any(model.startswith("1-year reserved") for model in models) and any(m.startswith("spot") for m in models)


def test_spot_and_reserved_undercut_on_demand_for_the_same_instance_and_region():
    # a transcription check: a commitment or an interruptible VM never costs more than the same VM on demand
    groups: dict[tuple, dict[str, list[float]]] = {}
    for rate in cost.cloud_rates():
        key = (rate.provider, rate.instance.split(" (")[0], rate.region, rate.gpu)
        groups.setdefault(key, {}).setdefault(rate.kind, []).append(rate.usd_per_gpu_hour)
    compared = 0
    for key, by_kind in groups.items():
        if "on-demand" not in by_kind:
            continue
        for kind in ("spot", "reserved"):
            for price in by_kind.get(kind, []):
                assert price < min(by_kind["on-demand"]), key
                compared += 1
    assert compared >= 20


def test_a_per_gpu_rate_is_its_instance_price_over_the_gpus_in_it():
    for row in _csv("cloud_prices.csv"):
        if row["usd_per_instance_hour"].strip():
            per_gpu = float(row["usd_per_instance_hour"]) / int(row["gpus_per_instance"])
            assert float(row["usd_per_gpu_hour"]) == pytest.approx(per_gpu, abs=6e-4), row


def test_eight_h100s_bought_cost_the_thinkmate_server_quotation():
    # data/gpu_list_prices.csv: the derived server share is the Thinkmate 8x H100 quotation ($317,000) minus eight
    # indicative $30,000 GPUs, so eight GPUs plus their servers cost the quotation itself, with no network port
    assert cost.buy_total_usd(get_gpu("h100-sxm"), 8) == pytest.approx(317_000)
    # 16 GPUs span two servers: + one 400 Gb/s switch port each ($36,000 / 64 = $562.50)
    assert cost.buy_total_usd(get_gpu("h100-sxm"), 16) == pytest.approx(2 * 317_000 + 16 * 562.5)


def test_an_oam_gpu_is_bought_with_the_hgx_server_share():
    # data/gpu_list_prices.csv: MI300X at the indicative $15,000 (huggingface.co/hardware/mi300) in an 8-GPU platform
    # takes the same derived server share per GPU as an HGX H100 ($317,000 / 8 - $30,000 = $9,625)
    assert cost.buy_total_usd(get_gpu("mi300x"), 8) == pytest.approx(8 * (15_000 + 9_625))


def test_workstation_cards_get_no_server_price_and_unpriced_gpus_no_buy_total():
    assert cost.server_cost_per_gpu(get_gpu("rtx-4090")) is None
    assert cost.buy_total_usd(get_gpu("rtx-4090"), 2) == pytest.approx(2 * 1599)  # launch MSRP, GPUs only
    assert cost.buy_total_usd(get_gpu("l4"), 8) is None  # no published or indicative price: None, never 0
    # the V100 SXM2 32GB's 2018 price (Epoch AI's hardware data, $11,458) plus the HGX-class server share, per GPU
    assert cost.buy_total_usd(get_gpu("v100-32gb"), 8) == pytest.approx(8 * (11_458 + 9_625))
    assert cost.pue().value == pytest.approx(1.58)  # Uptime Institute 2023 industry average


def test_displayed_communication_time_is_the_step_models_rule():
    # one rule for the ring's pace and NCCL's bus efficiency: the estimate's communication_seconds_per_step equals
    # step_time.comm_seconds on ring_link's bandwidth (16 H100s: two nodes, the node's NICs set the pace)
    from vramcalc import step_time

    spec, gpu = vc.get_model("llama-3.1-8b"), get_gpu("h100-sxm")
    resolved = resolve_setup(spec, num_gpus=16, sharding="fsdp")
    shown = cost.communication_per_step(spec, resolved, gpu)
    _, link_gb_s = cost.ring_link(gpu, 16)
    assert shown.seconds == pytest.approx(step_time.comm_seconds(shown.total_bytes, link_gb_s))
    assert shown.seconds == pytest.approx(shown.total_bytes / (link_gb_s * 1e9 * step_time.NCCL_BUS_EFFICIENCY))


# -- the interconnect in time and cost (issue 14 item 4) -------------------------------------------------------------
# PCIe x16 per direction by generation and NVLink per GPU (both directions) by generation: S52 in
# data/gpus_sources.md (alpha-one-index networking-interconnects table), independent of data/gpu_links.csv.
PCIE_X16_GB_S = {3: 16, 4: 32, 5: 64}
NVLINK_BIDIR_GB_S = {"2": 300, "3": 600, "4": 900, "5": 1800, "infinity-fabric": 896}


def test_every_catalogue_gpu_has_link_facts_that_agree_with_its_bandwidths():
    for gpu in gpus():
        facts = cost.link_facts(gpu)
        assert facts is not None, gpu.name
        assert facts.nvlink_source and facts.pcie_source and facts.node_source, gpu.name
        assert PCIE_X16_GB_S[facts.pcie_generation] == gpu.pcie_gb_s, gpu.name
        if facts.nvlink_generation:
            assert NVLINK_BIDIR_GB_S[facts.nvlink_generation] == gpu.nvlink_bidir_gb_s, gpu.name
        else:
            assert not gpu.nvlink_bidir_gb_s, gpu.name
        assert 1 <= facts.node_gpus <= 8, gpu.name
        # one NIC per GPU exactly where the catalogue gives the reference node's per-GPU network (HGX/DGX)
        assert facts.nics_per_node == (facts.node_gpus if gpu.infiniband_gb_s else 1), gpu.name


def _on_eight(gpu: str, method: str, sharding: str) -> dict:
    return vc.estimate("llama-3.1-8b", method=method, sharding=sharding, num_gpus=8, grad_ckpt="full",
                       gpu=gpu).details


def test_an_8x_rtx_4090_pcie_box_exposes_far_more_communication_than_an_8x_h100_nvlink_node():
    # full fine-tuning under FSDP moves (n-1)/n·(2P + G)·2 B ≈ 42 GB per rank and step: over PCIe Gen4
    # (32 GB/s x 0.8) that is 1.6 s against ~1.1 s of compute, so ≥ 30% of the step waits; over NVLink 4
    # (450 GB/s) 0.12 s, hidden but for the 10% that no overlap reaches
    pcie, nvlink = _on_eight("rtx-4090", "full", "fsdp"), _on_eight("h100-sxm", "full", "fsdp")
    assert pcie["interconnect"]["ring_link"] == "pcie" and nvlink["interconnect"]["ring_link"] == "nvlink"
    assert pcie["exposed_communication_fraction"] > 0.2
    assert nvlink["exposed_communication_fraction"] < 0.1
    assert pcie["exposed_communication_fraction"] > 4 * nvlink["exposed_communication_fraction"]


def test_loras_tiny_gradients_leave_both_boxes_with_nearly_no_exposed_communication():
    # DDP all-reduces only the adapters' gradients (r=8 on q, v: ~3.4M parameters, 14 MB in fp32)
    pcie, nvlink = _on_eight("rtx-4090", "lora", "ddp"), _on_eight("h100-sxm", "lora", "ddp")
    assert pcie["exposed_communication_fraction"] < 0.01 and nvlink["exposed_communication_fraction"] < 0.01


def test_the_network_between_nodes_changes_time_but_not_memory():
    kw = dict(method="full", sharding="fsdp", num_gpus=16, grad_ckpt="full", gpu="h100-sxm")
    ib = vc.estimate("llama-3.1-8b", **kw)
    eth = vc.estimate("llama-3.1-8b", interconnect="ethernet", **kw)
    assert ib.terms_bytes == eth.terms_bytes
    # two HGX nodes, eight NICs each: NDR 8 x 50 = 400 GB/s (under NVLink's 450) against 100 GbE 8 x 12.5 = 100 GB/s
    assert ib.details["interconnect"]["ring_gb_s"] == 400 and eth.details["interconnect"]["ring_gb_s"] == 100
    assert eth.details["step_seconds"] > ib.details["step_seconds"]


def test_inputs_show_the_interconnect_and_where_it_came_from():
    box = vc.estimate("llama-3.1-8b", method="lora", sharding="ddp", num_gpus=8, gpu="rtx-4090").inputs
    assert box["interconnect"] == "pcie" and box["origins"]["interconnect"].startswith("default")
    assert "PCIe Gen4" in box["origins"]["interconnect"]
    given = vc.estimate("llama-3.1-8b", method="lora", sharding="ddp", num_gpus=8, gpu="h100-sxm",
                        interconnect="pcie").inputs
    assert given["interconnect"] == "pcie" and given["origins"]["interconnect"] == "user"


def test_nvlink_on_a_gpu_without_it_is_one_error_line(capsys):
    from .cli_helpers import run_cli

    code, out, err = run_cli(capsys, "estimate", "llama-3.1-8b", "--num-gpus", "8", "--sharding", "ddp",
                             "--gpu", "rtx-4090", "--interconnect", "nvlink")
    assert code == 2 and out == ""
    assert err.startswith("error: --interconnect nvlink: rtx-4090 has no NVLink") and err.count("\n") == 1
    with pytest.raises(VramcalcError, match="unknown interconnect"):
        vc.estimate("llama-3.1-8b", interconnect="token-ring")


def test_plan_rows_state_the_interconnect():
    from vramcalc.planning import plan_rows

    rows = plan_rows("llama-3.1-8b", method="lora", num_gpus=8, sharding="ddp", grad_ckpt="full",
                     gpus="h100-sxm,rtx-4090", hosted=False).rows
    assert {row["gpu"]: row["interconnect"] for row in rows} == {"h100-sxm": "nvlink", "rtx-4090": "pcie"}
    assert {row["gpu"]: row["interconnect_gb_per_s"] for row in rows} == {"h100-sxm": 450, "rtx-4090": 32}
    exposed = {row["gpu"]: row["exposed_comm_seconds"] / row["step_seconds"] for row in rows}
    assert exposed["rtx-4090"] < 0.01 and exposed["h100-sxm"] < 0.01  # LoRA's adapter gradients only
    every = plan_rows("llama-3.1-8b", method="lora", num_gpus=8, sharding="ddp", interconnect="nvlink",
                      hosted=False)
    assert "rtx-4090" not in {row["gpu"] for row in every.rows}
    assert any("without NVLink" in note for note in every.warnings)
