"""``--fsdp1-frozen-units``: torch FSDP1 gives a frozen unit (a decoder layer whose adapters peft's wrap policy put in
units of their own) a reshard-only ``register_multi_grad_hook`` on its forward's inputs, removed only after the
whole backward (``distributed.fsdp1_retains_recompute_inputs``). Under reentrant checkpointing those inputs are the
recompute's detached leaves, whose AccumulateGrad the hook's closure holds: every layer through its backward keeps
its input and that input's gradient until the backward ends.

The estimate is checked against a hand count, and the mechanism itself against torch's own FSDP1 on a fake 2-rank
process group (CPU, real tensors): the FSDP2 trace cannot run FSDP1."""

import functools
import weakref

import pytest

from vramcalc import VramcalcError, estimate, get_model
from vramcalc.estimator import step_moments
from vramcalc.model import ModelSpec
from vramcalc.options import Phase
from vramcalc.training_setup import resolve_setup

from .conftest import needs_torch

DENSE = ModelSpec(name="tiny-llama", family="llama", hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=2,
                  head_dim=64, intermediate_size=688, vocab_size=512, max_position_embeddings=4096)
LORA_FSDP = dict(seq_len=512, batch_size=2, method="lora", precision="bf16", num_gpus=2, sharding="fsdp")


def _last_layer_moment(spec, **options):
    """The backward moment of the first decoder layer (the last in backward order): the layer moments' last."""
    moments = step_moments(spec, resolve_setup(spec, **options))
    return [m for m in moments if m.phase is Phase.BACKWARD][-1]


def test_the_last_layer_in_backward_holds_every_later_layers_input_and_gradient():
    # 6 layers, T = 2 x 512, h = 256, bf16 residual and gradient: at the first layer's backward the 5 layers
    # through theirs keep their inputs (5 x T·h·2 B) and gradients (5 x T·h·2 B), of which the last gradient is the
    # incoming one the layer holds anyway: 9 x 1024 x 256 x 2 = 4,718,592 bytes more.
    options = dict(LORA_FSDP, grad_ckpt="reentrant")
    plain = _last_layer_moment(DENSE, **options)
    kept = _last_layer_moment(DENSE, **options, fsdp1_frozen_units=True)
    assert kept.activations - plain.activations == 9 * 1024 * 256 * 2
    for term in ("weights", "gradients", "optimizer_states", "logits", "temporaries"):
        assert getattr(kept, term) == getattr(plain, term)


def test_llama_2_70b_on_two_gpus_peaks_at_its_last_layer_with_157_hidden_states_more():
    # fms-acceleration's 70B QLoRA row shapes: 80 layers, 2 x 4096 tokens, h 8192, bf16: 79 inputs and 78 gradients
    spec = get_model("llama-2-70b")
    options = dict(method="qlora", precision="bf16", batch_size=2, seq_len=4096, grad_ckpt="reentrant",
                   attn="flash", quant="nf4", quant_storage="bf16", lora_rank=16,
                   lora_targets="q_proj,k_proj,v_proj,o_proj", num_gpus=2, sharding="fsdp")
    plain = _last_layer_moment(spec, **options)
    kept = _last_layer_moment(spec, **options, fsdp1_frozen_units=True)
    assert kept.activations - plain.activations == 157 * 2 * 4096 * 8192 * 2
    before = estimate(spec, **options)
    after = estimate(spec, **options, fsdp1_frozen_units=True)
    assert before.phase is Phase.BACKWARD and after.phase is Phase.BACKWARD
    assert after.peak_tensor_bytes - before.peak_tensor_bytes > 9 * 2**30  # the grads outgrow the start's peak


@pytest.mark.parametrize("change", [dict(grad_ckpt="full"), dict(grad_ckpt="wrapper"), dict(method="full")])
def test_no_retention_without_reentrant_checkpointing_outside_a_frozen_unit(change):
    options = dict(LORA_FSDP, grad_ckpt="reentrant") | change
    plain = estimate(DENSE, **options)
    flagged = estimate(DENSE, **options, fsdp1_frozen_units=True)
    assert flagged.peak_tensor_bytes == plain.peak_tensor_bytes


def test_the_knob_needs_fsdp():
    with pytest.raises(VramcalcError, match="--fsdp1-frozen-units"):
        estimate(DENSE, seq_len=512, method="lora", grad_ckpt="reentrant", fsdp1_frozen_units=True)
    with pytest.raises(VramcalcError, match="--fsdp1-frozen-units"):
        estimate(DENSE, seq_len=512, method="lora", num_gpus=2, sharding="zero3", grad_ckpt="reentrant",
                 fsdp1_frozen_units=True)


@needs_torch
def test_torch_fsdp1_keeps_two_hidden_states_per_layer_under_reentrant_checkpointing_only():
    """torch's FullyShardedDataParallel on a fake 2-rank group, peft's wrap policy (each trainable leaf its own
    unit, each layer a unit), checkpointed from outside the unit as transformers does: live bytes when the first
    layer's input gradient arrives, reentrant minus non-reentrant, = 2 x (layers - 1) x [T, h]."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.checkpoint import checkpoint

    h, tokens, layers = 64, 128, 5

    class Live(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen, self.bytes = weakref.WeakSet(), 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                    storage = t.untyped_storage()
                    if storage not in self.seen:
                        self.seen.add(storage)
                        self.bytes += storage.nbytes()
                        weakref.finalize(storage, self._dead, storage.nbytes())
            return out

        def _dead(self, n):
            self.bytes -= n

    class Lora(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = nn.Linear(h, h, bias=False)
            self.a, self.b = nn.Linear(h, 4, bias=False), nn.Linear(4, h, bias=False)
            self.base.weight.requires_grad_(False)

        def forward(self, x):
            return self.base(x) + self.b(self.a(x))

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.norm = Lora(), nn.LayerNorm(h)
            self.norm.requires_grad_(False)

        def forward(self, x):
            return x + torch.tanh(self.q(self.norm(x)))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Layer() for _ in range(layers))

        def forward(self, x, reentrant):
            for layer in self.layers:
                x = checkpoint(layer.__call__, x, use_reentrant=reentrant)
            return x

    def live_at_first_input_grad(reentrant):
        torch.manual_seed(0)
        trainable = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: not list(m.children())
                                      and getattr(m, "weight", None) is not None and m.weight.requires_grad)
        per_layer = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={Layer})
        policy = functools.partial(_or_policy, policies=[trainable, per_layer])
        model = FullyShardedDataParallel(Model().to(torch.bfloat16), device_id=torch.device("cpu"),
                                         auto_wrap_policy=policy,
                                         sharding_strategy=ShardingStrategy.FULL_SHARD, use_orig_params=True)
        seen = {}
        with Live() as live:
            x = torch.randn(tokens, h, dtype=torch.bfloat16, requires_grad=True) * 1
            x.register_hook(lambda grad: seen.setdefault("bytes", live.bytes) and None)
            model(x, reentrant).float().sum().backward()
        return seen["bytes"]

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        extra = live_at_first_input_grad(True) - live_at_first_input_grad(False)
    finally:
        dist.destroy_process_group()
    assert extra == 2 * (layers - 1) * tokens * h * 2


@needs_torch
def test_the_trace_refuses_it():
    from vramcalc.tracing.distributed import check_traceable

    with pytest.raises(VramcalcError, match="--fsdp1-frozen-units is estimated, not traced"):
        check_traceable(resolve_setup(DENSE, **LORA_FSDP, grad_ckpt="reentrant", fsdp1_frozen_units=True))
