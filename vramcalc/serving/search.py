"""The questions people ask of a serving setup: the largest concurrency at a context, the largest context at a
concurrency, and the GPUs (and $ per million generated tokens) a target needs.

Memory grows monotonically with concurrency and with context for every engine, so each answer is a bisection over
``infer``'s fits test (microseconds per estimate).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..catalogue import get_gpu, gpus
from ..errors import VramcalcError
from .bisection import largest
from .estimate import infer, max_concurrency

__all__ = ["max_concurrency", "max_context", "serve_plan", "ServeOption"]


def _fits(**options) -> bool:
    return infer(answers=False, **options).fits()


def max_context(model, *, gpu, concurrency: int = 1, **options) -> int:
    """Largest context (prompt + generated tokens per sequence) at which ``concurrency`` sequences fit (0 if none)."""
    options.pop("context", None)
    options.pop("prompt_len", None)
    found = largest(lambda n: _fits(model=model, gpu=gpu, context=n, concurrency=concurrency, **options), 2)
    return max(found, 0) if found >= 2 else 0


@dataclass(frozen=True)
class ServeOption:
    gpu: str
    tp: int
    replicas: int
    gpus: int
    max_concurrency_per_replica: int
    decode_tokens_per_s: float | None
    usd_per_hour: float | None
    usd_per_million_generated_tokens: float | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def serve_plan(model, *, context: int, concurrency: int, gpus_to_try=None, tps=(1, 2, 4, 8), **options) -> list[ServeOption]:
    """For each GPU: the tensor-parallel degree (of ``tps``) that serves ``concurrency`` sequences of ``context``
    tokens on the fewest GPUs (replicas x tp; ties go to the lower $ per million generated tokens), and the rent per
    million generated tokens with every replica decoding its share. A larger tp can need fewer GPUs in all: the
    weights split, so each GPU keeps more room for KV blocks. Sorted by $ per million tokens (unknown prices last)."""
    if options.get("engine") in (None, "hf"):
        options["engine"] = "vllm"
    devices = [get_gpu(g) for g in gpus_to_try] if gpus_to_try else [g for g in gpus() if g.bandwidth_gb_s]
    plans = []
    for device in devices:
        candidates = []
        for tp in tps:
            try:
                best = max_concurrency(model, gpu=device, context=context, tp=tp, **options)
            except VramcalcError:
                continue
            if best < 1:
                continue
            per_replica = min(best, concurrency)
            replicas = -(-concurrency // per_replica)
            probe = infer(model, context=context, concurrency=per_replica, gpu=device, tp=tp, **options)
            speed = probe.details.get("decode_tokens_per_s")
            hourly = round(device.cloud_usd_per_gpu_hour * tp * replicas, 4) if device.cloud_usd_per_gpu_hour else None
            price = hourly / (speed * replicas * 3600) * 1e6 if hourly and speed else None
            candidates.append(ServeOption(device.name, tp, replicas, tp * replicas, best, speed, hourly,
                                          round(price, 4) if price else None))
        if candidates:
            plans.append(min(candidates, key=lambda p: (p.gpus, p.usd_per_million_generated_tokens or 0)))
    return sorted(plans, key=lambda p: (p.usd_per_million_generated_tokens is None,
                                        p.usd_per_million_generated_tokens or 0, p.gpus))
