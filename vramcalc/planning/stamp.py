"""Which catalogue a plan or report was made from: the package version plus a hash of the data files, and the newest
price date in them."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

from ..catalogue import data_dir, gpus
from ..cost import hosted_prices
from ..version import __version__

CATALOGUE_FILES = ("gpus.csv", "models.csv", "hosted_finetuning.csv")


@dataclass(frozen=True)
class CatalogueStamp:
    """``version``: ``<package version>+<first 12 hex digits of the SHA-256 of CATALOGUE_FILES>``; ``date``: the newest
    price date among the GPUs and hosted services."""

    version: str
    date: str


@functools.cache
def catalogue_stamp() -> CatalogueStamp:
    digest = hashlib.sha256()
    for name in CATALOGUE_FILES:
        digest.update((data_dir() / name).read_bytes())
    dates = [g.cloud_price_date for g in gpus() if g.cloud_price_date]
    dates += [price.price_date for price in hosted_prices() if price.price_date]
    return CatalogueStamp(f"{__version__}+{digest.hexdigest()[:12]}", max(dates))
