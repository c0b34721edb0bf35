"""Hosted inference APIs' published per-token prices (``data/hosted_inference.csv``), to set beside the rent per
million generated tokens of serving a model yourself (``throughput.usd_per_million_tokens``, ``search.serve_plan``).

A row applies to a model either by name (``catalogue_model``: the provider serves that model) or by size bracket
(Fireworks prices open models by total parameters, dense and MoE apart; bounds inclusive at the 0.1B resolution they
are published in). Only the generated-token price is compared: prompt tokens cost a self-hosted server prefill
compute, which the rent per generated token does not split out. Each row carries its source; undated pages say so.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache

from ..catalogue import data_dir
from ..model import ModelSpec


@dataclass(frozen=True)
class HostedInferencePrice:
    provider: str
    offering: str
    catalogue_model: str  # "" for a size bracket
    min_params_b: float | None
    max_params_b: float | None
    moe: bool | None  # bracket kind; None for a named model
    usd_per_million_input_tokens: float
    usd_per_million_output_tokens: float
    price_date: str  # "" when the source is undated
    source: str

    def applies_to(self, spec: ModelSpec) -> bool:
        if self.catalogue_model:
            return self.catalogue_model == spec.name
        if self.moe is not None and self.moe != spec.is_moe:
            return False
        size = round(spec.params / 1e9, 1)
        low = self.min_params_b if self.min_params_b is not None else 0.0
        high = self.max_params_b if self.max_params_b is not None else float("inf")
        return low <= size <= high

    def to_dict(self) -> dict:
        return {"provider": self.provider, "offering": self.offering,
                "usd_per_million_output_tokens": self.usd_per_million_output_tokens,
                "usd_per_million_input_tokens": self.usd_per_million_input_tokens,
                "price_date": self.price_date or None, "source": self.source}


@lru_cache(maxsize=1)
def hosted_inference_prices() -> tuple[HostedInferencePrice, ...]:
    """Every row of ``data/hosted_inference.csv``, in file order (read once)."""
    with open(data_dir() / "hosted_inference.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))

    def number(cell: str) -> float | None:
        return float(cell) if cell.strip() else None

    def flag(cell: str) -> bool | None:
        return {"yes": True, "no": False}.get(cell.strip())

    return tuple(HostedInferencePrice(r["provider"], r["offering"], r["catalogue_model"], number(r["min_params_b"]),
                                      number(r["max_params_b"]), flag(r["moe"]),
                                      float(r["usd_per_million_input_tokens"]),
                                      float(r["usd_per_million_output_tokens"]), r["price_date"], r["source"])
                 for r in rows)


def hosted_prices_for(spec: ModelSpec) -> list[HostedInferencePrice]:
    """The rows that price ``spec``, cheapest generated token first."""
    return sorted((p for p in hosted_inference_prices() if p.applies_to(spec)),
                  key=lambda p: p.usd_per_million_output_tokens)
