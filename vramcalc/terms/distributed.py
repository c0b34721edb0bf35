"""Per-GPU model states under data parallelism: DDP, ZeRO-1/2/3 and FSDP.

Rajbhandari et al. 2020 (ZeRO): with N data-parallel ranks, ZeRO-1 shards optimizer states, ZeRO-2 also gradients,
ZeRO-3 (and FSDP FULL_SHARD) also parameters. DDP keeps a flat bucket copy of every gradient
(``gradient_as_bucket_view=False`` in accelerate's defaults; ``torch/nn/parallel/distributed.py``).
"""

from __future__ import annotations

from ..options import Sharding
from ..training_setup import ResolvedSetup


def per_gpu_gradients(resolved: ResolvedSetup, gradient_bytes: int) -> int:
    """Gradient bytes one GPU holds: sharded by ZeRO-2/3 and FSDP, doubled by DDP's bucket copy."""
    setup = resolved.setup
    if setup.sharding in (Sharding.ZERO2, Sharding.ZERO3, Sharding.FSDP):
        return -(-gradient_bytes // setup.num_gpus)
    if setup.sharding is Sharding.DDP:
        return 2 * gradient_bytes
    return gradient_bytes


def shard_model_states(resolved: ResolvedSetup, W: int, G: int, O: int) -> tuple[int, int, int]:
    """(weights, gradients, optimizer states) per GPU."""
    setup = resolved.setup
    n = setup.num_gpus
    G = per_gpu_gradients(resolved, G)
    if setup.sharding in (Sharding.ZERO1, Sharding.ZERO2):
        return W, G, -(-O // n)
    if setup.sharding in (Sharding.ZERO3, Sharding.FSDP):
        return -(-W // n), G, -(-O // n)
    return W, G, O
