"""How the stacks' FSDP holds memory per rank (``stack_layers.StackLayers.fsdp_keeps_dtype`` / ``fsdp_flat_params``,
``terms/distributed.py``, ``estimator._layer_backward_moments``). Golden numbers say where they come from: the
formula next to them, or the FSDP2 trace on a fake process group (``vramcalc.trace``)."""

import pytest

import vramcalc as vc
from vramcalc.terms import distributed
from vramcalc.training_setup import resolve_setup

GIB = 2**30


def _rank(model: str, **options):
    spec = vc.get_model(model)
    return spec, distributed.rank_states(spec, resolve_setup(spec, **options))


@pytest.mark.parametrize("stack", ["torchtune", "litgpt"])
def test_torchtune_and_litgpt_fsdp_keep_bf16_states(stack):
    """F1: no fp32 upcast (torchtune training/_distributed.py:550-568 fully_shard without mp_policy; Fabric
    FSDPPrecision bf16-true): AdamW's two states are bf16, 2·2·N/W bytes per rank, where accelerate's fp32 upcast
    keeps 2·4·N/W under Trainer's mixed precision (accelerate utils/fsdp_utils.py:801: ``mixed_precision != "no"``)."""
    options = dict(method="full", num_gpus=4, sharding="fsdp", optimizer="adamw")
    spec, own = _rank("llama-2-7b", stack=stack, precision="bf16-true", **options)
    _, hf = _rank("llama-2-7b", stack="hf", precision="bf16", **options)
    n = spec.params
    assert own.optimizer_states == pytest.approx(2 * 2 * n / 4, rel=0.01)
    assert hf.optimizer_states == pytest.approx(2 * 4 * n / 4, rel=0.01)


def test_litgpt_fsdp_lora_accumulates_whole_block_gradients():
    """FSDP1 use_orig_params flat parameters (torch fsdp/_flat_param.py:804-836, the OR of requires_grad): a LoRA
    Block's flat parameter trains, so no_sync accumulates the whole Block's unsharded bf16 gradient (lit-gpt@8641822
    FSDP rows: 2 GPUs held more than 1 GPU without checkpointing). Per rank: L · (layer params) · 2 bytes at least;
    the hf stack (FSDP2, one DTensor per parameter) accumulates only the adapters'."""
    options = dict(method="lora", precision="bf16-true", adapter_dtype="bf16", num_gpus=2, sharding="fsdp",
                   grad_accum=4, grad_ckpt=True, seq_len=1024)
    spec = vc.get_model("llama-2-7b")
    layer_params = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # attention, MLP, two norms
    litgpt = vc.estimate("llama-2-7b", stack="litgpt", **options).terms()["gradients"]
    hf = vc.estimate("llama-2-7b", stack="hf", **options).terms()["gradients"]
    assert litgpt >= spec.num_layers * layer_params * 2
    assert hf < litgpt / 20


def test_fsdp_accumulated_gradients_are_replaced_not_joined_by_the_reduced_shards():
    """The syncing micro-batch hands each unit's accumulated unsharded gradient to its reduce-scatter and frees it
    (torch _fully_shard/_fsdp_param_group.py:623-626). Golden: ``vramcalc.trace("tinyllama-1.1b", method="full",
    num_gpus=2, sharding="fsdp", grad_accum=4, grad_ckpt=True, seq_len=...)`` on a fake process group (session 22,
    helper c11): peak tensors 8.595 GiB at seq 128 and 9.254 GiB at seq 2048; before this rule the estimate was
    10.449 and 10.574 GiB (accumulated gradients plus every reduced shard)."""
    for seq_len, traced_gib in ((128, 8.595), (2048, 9.254)):
        b = vc.estimate("tinyllama-1.1b", method="full", num_gpus=2, sharding="fsdp", grad_accum=4, grad_ckpt=True,
                        seq_len=seq_len)
        assert b.peak_tensor_bytes / GIB == pytest.approx(traced_gib, rel=0.01)


def test_fsdp_cpu_offload_leaves_no_reduced_gradient_on_the_gpu():
    """CPUOffloadPolicy copies each reduced shard to the host as it is made (_fsdp_collectives.py:711): the GPU's
    gradients are at most the units in flight, not 80 layers' shards."""
    options = dict(method="full", num_gpus=8, sharding="fsdp", grad_ckpt=True, seq_len=2048)
    spec = vc.get_model("llama-3.1-70b")
    offloaded = vc.estimate("llama-3.1-70b", offload="params", **options).terms()["gradients"]
    layer_params = spec.params / spec.num_layers
    assert offloaded < 4 * layer_params * 2  # a few units' unsharded bf16 gradients
