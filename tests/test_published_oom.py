"""Runs a source reports as fitting or out of memory must land on the same side of the GPU's memory.

lit-gpt's resource tables (Lightning-AI/litgpt tutorials/resource-tables.md @0cc02afa, runs at lit-gpt 8641822 on
an A100-SXM4-40GB): LoRA r=8 on the query and value slices, bf16-true, no activation checkpointing on one GPU,
the longest Alpaca sample (1304 Llama-2 tokens) in the first micro-batch. Llama-2-7B ran at micro-batch 2
(29.07 GB) and ran out of memory at 4; Llama-2-13B ran at micro-batch 1 (38.12 GB) and ran out of memory at 2.
``benchmarks/published.py`` (``OOM_RUNS``) checks these and the other runs the development set lists.
"""

import pytest

from vramcalc import estimate

LITGPT_LORA = dict(method="lora", stack="litgpt", precision="bf16-true", lora_rank=8, lora_targets="qv",
                   lora_dropout=0.05, adapter_dtype="bf16", grad_ckpt=False, loss="litgpt", attn="sdpa",
                   optimizer="adamw-foreach", seq_len=1304)


@pytest.mark.parametrize("model, micro_batch, ran", [
    ("llama-2-7b", 2, True), ("llama-2-7b", 4, False),
    ("llama-2-13b", 1, True), ("llama-2-13b", 2, False),
])
def test_lit_gpt_runs_fit_or_run_out_of_memory_on_an_a100_40gb_as_published(model, micro_batch, ran):
    result = estimate(model, batch_size=micro_batch, grad_accum=128 // micro_batch, **LITGPT_LORA)
    assert result.fits("a100-40gb") is ran
