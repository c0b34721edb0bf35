"""gradients: ``.grad`` of every trainable parameter."""

from __future__ import annotations

from ..model import ModelSpec
from ..units import round_up
from .stored_tensor import StoredTensor


def gradient_bytes(tensors: tuple[StoredTensor, ...]) -> int:
    """G = sum over trainable tensors of round512(numel * B(param dtype)).

    AccumulateGrad stores the gradient in the parameter's dtype (torch/csrc/autograd/functions/accumulate_grad.h);
    frozen parameters (LoRA/QLoRA base, prompt tuning) have none.
    """
    return sum(round_up(t.numel * t.bits // 8) * t.count for t in tensors if t.trainable)


def layer_gradient_bytes(model: ModelSpec, tensors: tuple[StoredTensor, ...], moe_layer: bool) -> int:
    """Gradient bytes of one decoder layer of the given kind (dense or MoE). A tensor of only some layers of a
    ``layer`` scope (a hybrid's attention and convolution tensors: ``ModelSpec.layer_is_conv``) counts its average
    over the layers, ``bytes · count // layers`` (for every other tensor count = layers: its bytes)."""
    layers = {"layer": model.num_layers, "dense": model.num_dense_layers, "moe": model.num_moe_layers}
    wanted = ("layer", "moe" if moe_layer else "dense")
    total = 0
    for t in tensors:
        if t.trainable and t.scope in wanted and layers[t.scope]:
            total += round_up(t.numel * t.bits // 8) * t.count // layers[t.scope]
    return total
