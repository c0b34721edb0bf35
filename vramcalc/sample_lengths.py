"""A dataset's sample lengths, and what they do to a run of unpacked batches padded to each batch's longest sample.

Such a run's steps each have their own length T = min(L, the batch's longest sample), L the truncation length
(``seq_len``). Two things follow:

- the allocated peak is the longest step's, at T_max = min(L, the longest sample): every sample is seen once an
  epoch, so the longest one's batch always runs, and a run never reaches L when no sample does;
- ``torch.cuda.max_memory_reserved`` climbs a staircase. The caching allocator serves a request from one free block
  at least as large and never merges blocks of different segments (``CUDACachingAllocator.cpp`` ``get_free_block``,
  ``try_merge_blocks``), so a step longer than every earlier one (a record) cannot put its loss's [T, V] blocks in
  the shorter steps' segments: it makes new ones, and the old ones stay cached. Allocator replays of 100-1000
  varying-length steps (docs/evidence/varying_length_reserved/README.md) follow

      R = R(T_1) + sum over the later records r of K(T_r)

  with R(T) the reserved memory of a run at one length T and K(T) the loss's [T, V] blocks live together at its
  backward (``estimator.reserved_growth_per_longer_step``), linear in T. Without activation checkpointing the same
  holds where the loss's blocks are large against the layers' saved tensors (Llama-3.2-1B: the longer step's
  activations go into the earlier steps' free loss blocks); where they are small (Llama-2-7B, V = 32,000), a
  record also needs at least its own R(T_r) (``realized_reserved_bytes``' max form), and per-layer requests that
  outgrow their 2 MiB-rounded segments strand more (README section "Without checkpointing": not modelled).

The expected value over the order of the batches: for step lengths drawn independently from a distribution p with
P(T < x) = F(x), step i (i >= 2) is a record at x with probability p(x) F(x)^(i-1), so over n steps

    E[sum over later records of T_r] = sum_x x p(x) sum_{i=1..n-1} F(x)^i = sum_x x p(x) F(x) (1 - F(x)^(n-1)) / (1 - F(x))

and E[R(T_1)] = R(E[T]) where R is linear in T. A step's length is the longest of its b samples, drawn from the
dataset's lengths: P(T < x) = P(one sample < x)^b, with the lengths at L or above all at L. n is one epoch's steps
on one data-parallel rank: the longest sample's batch runs in the first epoch, so no later step is a record.

One run's outcome spreads widely around this expectation when few steps reach the longest length (the replays'
P10-P90), and these blocks are whole free segments, which a failing ``cudaMalloc`` releases before it retries: they
raise reserved and nvidia-smi, not whether the job fits.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import VramcalcError


@dataclass(frozen=True)
class LengthProfile:
    """A dataset's token count per sample, as a histogram: ``samples[i]`` samples of ``tokens[i]`` tokens (ascending,
    untruncated: the truncation length is the setup's ``seq_len``)."""

    tokens: tuple[int, ...]
    samples: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.tokens or len(self.tokens) != len(self.samples):
            raise VramcalcError("--sample-lengths: no sample lengths given")
        if any(t < 1 for t in self.tokens) or any(n < 0 for n in self.samples) or not sum(self.samples):
            raise VramcalcError("--sample-lengths: token counts must be positive and some sample counts non-zero")
        if list(self.tokens) != sorted(set(self.tokens)):
            raise VramcalcError("--sample-lengths: the histogram's token counts must be distinct and ascending")

    @classmethod
    def of(cls, lengths) -> "LengthProfile":
        """A profile from a ``LengthProfile``, a file path (``read``) or an iterable of per-sample token counts."""
        if isinstance(lengths, LengthProfile):
            return lengths
        if isinstance(lengths, (str, Path)):
            return read(lengths)
        counts: dict[int, int] = {}
        for n in lengths:
            if isinstance(n, bool) or not isinstance(n, int) and not (isinstance(n, float) and n.is_integer()):
                raise VramcalcError(f"--sample-lengths: {n!r} is not a whole number of tokens")
            counts[int(n)] = counts.get(int(n), 0) + 1
        return cls(*_sorted_columns(counts))

    @property
    def count(self) -> int:
        return sum(self.samples)

    @property
    def longest(self) -> int:
        return max(t for t, n in zip(self.tokens, self.samples) if n)

    @property
    def mean(self) -> float:
        return sum(t * n for t, n in zip(self.tokens, self.samples)) / self.count

    def summary(self) -> dict:
        """What ``inputs`` shows of the profile."""
        return {"samples": self.count, "mean_tokens": round(self.mean, 1), "longest_tokens": self.longest}


def _sorted_columns(counts: dict[int, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    ordered = sorted(counts.items())
    return tuple(t for t, _ in ordered), tuple(n for _, n in ordered)


def read(path) -> LengthProfile:
    """A profile from a file: a CSV with the header ``tokens,samples`` (a histogram), a JSON list of per-sample token
    counts, or one token count per line (``parse``)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise VramcalcError(f"--sample-lengths: cannot read {path}: {error.strerror or error}") from None
    return parse(text, str(path))


def parse(text: str, name: str = "the lengths") -> LengthProfile:
    """A profile from a length file's text (``read``'s three formats; the web API's upload too); ``name`` is what an
    error calls the file."""
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            return LengthProfile.of(json.loads(text))
        first = stripped.splitlines()[0].replace(" ", "").lower() if stripped else ""
        if first.startswith("tokens,samples"):
            counts: dict[int, int] = {}
            for row in csv.DictReader(line.replace(" ", "") for line in stripped.splitlines()):
                counts[int(row["tokens"])] = counts.get(int(row["tokens"]), 0) + int(row["samples"])
            return LengthProfile(*_sorted_columns(counts))
        return LengthProfile.of(int(line) for line in stripped.split())
    except VramcalcError:  # a readable file with bad counts: the profile's own message says which
        raise
    except (ValueError, KeyError, TypeError, RecursionError):  # (json.JSONDecodeError is a ValueError)
        raise VramcalcError(f"--sample-lengths: {name} is neither a 'tokens,samples' CSV, a JSON list nor one token "
                            "count per line") from None


@dataclass(frozen=True)
class StepLengths:
    """The distribution of one step's length (``step_lengths``): ``probability[i]`` that a step has ``tokens[i]``."""

    tokens: tuple[int, ...]
    probability: tuple[float, ...]

    @property
    def longest(self) -> int:
        return max(t for t, p in zip(self.tokens, self.probability) if p > 0)

    @property
    def mean(self) -> float:
        return sum(t * p for t, p in zip(self.tokens, self.probability))

    def share_at_longest(self) -> float:
        return self.probability[self.tokens.index(self.longest)]


def step_lengths(profile: LengthProfile, seq_len: int, batch_size: int) -> StepLengths:
    """The step length min(``seq_len``, the longest of ``batch_size`` samples drawn from the profile):
    P(T <= x) = P(one sample <= x)^b below ``seq_len``, and every length from ``seq_len`` up counts as ``seq_len``."""
    total = profile.count
    below: dict[int, int] = {}
    for tokens, samples in zip(profile.tokens, profile.samples):
        key = min(tokens, seq_len)
        below[key] = below.get(key, 0) + samples
    tokens, probability, cumulative, previous = [], [], 0, 0.0
    for key in sorted(below):
        cumulative += below[key]
        at_most = (cumulative / total) ** batch_size
        tokens.append(key)
        probability.append(at_most - previous)
        previous = at_most
    return StepLengths(tuple(tokens), tuple(probability))


def expected_record_tokens(lengths: StepLengths, steps: int) -> float:
    """E[sum of T_r over the records after the first step] for ``steps`` independent steps (module docstring)."""
    out, shorter = 0.0, 0.0
    for tokens, p in zip(lengths.tokens, lengths.probability):
        if p > 0 and shorter > 0:
            later = (steps - 1) if shorter >= 1.0 else shorter * (1 - shorter ** (steps - 1)) / (1 - shorter)
            out += tokens * p * later
        shorter += p
    return out


def expected_later_records(lengths: StepLengths, steps: int) -> float:
    """E[number of records after the first step]: the sum above without the lengths."""
    out, shorter = 0.0, 0.0
    for p in lengths.probability:
        if p > 0 and shorter > 0:
            out += p * ((steps - 1) if shorter >= 1.0 else shorter * (1 - shorter ** (steps - 1)) / (1 - shorter))
        shorter += p
    return out


def steps_per_epoch(profile: LengthProfile, batch_size: int, data_parallel: int) -> int:
    """One epoch's steps on one data-parallel rank (a sampler shards the dataset across the ranks)."""
    return max(1, math.ceil(profile.count / (batch_size * max(1, data_parallel))))


def realized_reserved_bytes(first_reserved_bytes: int, ladder_bytes_per_token: float, lengths,
                            reserved_at=None) -> int:
    """``max_memory_reserved`` of one run whose step lengths are known, in order (the staircase).

    R_1 = R(T_1) (``first_reserved_bytes``), and at each later record r (a step longer than every earlier one)

        R_r = R_{r-1} + K(T_r)                       (``reserved_at`` not given)
        R_r = max(R_{r-1} + K(T_r), R(T_r))          (``reserved_at``: T -> R(T), the run's reserved at one length)

    with K(T) = ``ladder_bytes_per_token`` · T. The first form is the checkpointed replays' (each record strands one
    loss ladder, docs/evidence/varying_length_reserved/README.md "Mechanism"). The second adds what a record's own
    tensors need beyond the cache the earlier steps left: without activation checkpointing a longer step's saved
    activations grow with T, and R(T_r) can exceed R_{r-1} + K(T_r) when T_1 was short (the longer step's
    activations fit in the earlier steps' free segments, best fit with splitting, ``get_free_block`` /
    ``alloc_found_block`` in ``CUDACachingAllocator.cpp``, only as far as those hold them). Replays of
    Llama-2-7B LoRA b2 at L=512 without checkpointing: the first form -10.5% to -16.7%, the second -1.2% to -11.2%
    (section "Without checkpointing": what the second still misses are the per-layer requests that outgrow their
    2 MiB-rounded segments). On the 42 checkpointed replays the two forms differ in one run, by 0.7%."""
    longest, reserved = None, float(first_reserved_bytes)
    for tokens in lengths:
        if longest is not None and tokens > longest:
            reserved += ladder_bytes_per_token * tokens
            if reserved_at is not None:
                reserved = max(reserved, reserved_at(tokens))
        longest = tokens if longest is None else max(longest, tokens)
    return int(reserved)
