"""Replay multi-step streams of a saved setup through the caching-allocator model, steps at varying lengths."""

from __future__ import annotations

import pickle

import numpy as np

from _paths import HERE
from vramcalc.tracing.caching_allocator import ALLOC, EMPTY_CACHE, FREE, RESET_PEAK, CachingAllocator
from template import instantiate

GiB = 1 << 30


def load_setup(name):
    with open(HERE / f"setup_{name}.pkl", "rb") as f:
        return pickle.load(f)


class Run:
    """A replay whose steps are fed one at a time, recording per-step reserved and every new segment."""

    def __init__(self, setup, capacity=None):
        self.setup = setup
        self.alloc = CachingAllocator(capacity)
        self.live = {}
        self.step = -1
        self.T = None
        self.new_segments = []  # (step, T, op, request bytes, segment bytes)
        self.per_step = []  # (T, reserved after, allocated peak in step, reserved peak so far)
        self._ops = None
        self._feed(setup["prefix"], None)
        self.after_prefix = self.alloc.reserved_bytes

    def _feed(self, events, ops):
        a = self.alloc
        for ev in events:
            kind = ev[0]
            if kind == ALLOC:
                before = a.segment_allocations
                block = a.malloc(ev[2], ev[3] if len(ev) > 3 else 0)
                self.live[ev[1]] = block
                if a.segment_allocations != before and self.step >= 0:
                    k = ev[1][1]
                    self.new_segments.append((self.step, self.T, ops[k] if ops else "", ev[2],
                                              a.reserved_bytes))
            elif kind == FREE:
                a.free(self.live.pop(ev[1]))
            elif kind == EMPTY_CACHE:
                a.empty_cache()
            elif kind == RESET_PEAK:
                a.reset_peak()

    def _fast_step(self, tpl, T, ops):
        """The template's events at T fed straight to the allocator (local keys: the step frees all it allocates
        except what the first step keeps, which gets global keys)."""
        sizes = sizes_at(tpl, T)
        a = self.alloc
        blocks = {}
        step = self.step
        for ev in tpl.pattern:
            if ev[0] == "a":
                before = a.segment_allocations
                blocks[ev[1]] = a.malloc(sizes[ev[1]], ev[2])
                if a.segment_allocations != before:
                    self.new_segments.append((step, T, ops[ev[1]] if ops else "", sizes[ev[1]], a.reserved_bytes))
            elif ev[0] == "f":
                a.free(blocks.pop(ev[1]))
            else:
                raise ValueError(ev)
        for k, b in blocks.items():
            self.live[(step, k)] = b

    def run_step(self, T):
        self.step += 1
        self.T = T
        first = self.step == 0
        tpl = self.setup["first"] if first else self.setup["steady"]
        ops = self.setup["first_ops"] if first else self.setup["ops"]
        peak_before = self.alloc.allocated_peak_bytes
        self.alloc.allocated_peak_bytes = self.alloc.allocated_bytes
        self._fast_step(tpl, T, ops)
        step_alloc_peak = self.alloc.allocated_peak_bytes
        self.alloc.allocated_peak_bytes = max(peak_before, step_alloc_peak)
        self.per_step.append((T, self.alloc.reserved_bytes, step_alloc_peak, self.alloc.reserved_peak_bytes))

    @property
    def reserved_peak(self):
        return self.alloc.reserved_peak_bytes


_INT_POLY = {}


def sizes_at(tpl, T):
    key = id(tpl)
    if key not in _INT_POLY:
        import math
        den = 1
        for p in tpl.polys:
            for c in p:
                den = den * c.denominator // math.gcd(den, c.denominator)
        nums = [[int(c * den) for c in p] + [0] * (3 - len(p)) for p in tpl.polys]
        _INT_POLY[key] = (den, nums, tpl)
    den, nums, _ = _INT_POLY[key]
    T2 = T * T
    out = []
    for n0, n1, n2 in nums:
        v, r = divmod(n0 + n1 * T + n2 * T2, den)
        if r:
            raise ValueError("non-integer size")
        out.append(v)
    return out


def replay_lengths(setup, lengths):
    run = Run(setup)
    for T in lengths:
        run.run_step(int(T))
    return run


# -- length distributions --------------------------------------------------------------------------------------
def batch_lengths(sample_fn, L, steps, batch, rng, multiple=1):
    """Per-step padded length: the longest of ``batch`` samples, truncated at L, rounded up to ``multiple``."""
    s = np.minimum(sample_fn(rng, (steps, batch)), L).max(axis=1)
    s = np.maximum(s, 8)
    if multiple > 1:
        s = np.minimum(-(-s // multiple) * multiple, L)
    return s.astype(int)


def uniform(lo_frac=1 / 16):
    return lambda L: (lambda rng, shape: rng.integers(int(L * lo_frac), L + 1, size=shape))


def lognormal(median_frac, sigma):
    """Sample length lognormal with median median_frac·L (truncated at L by batch_lengths)."""
    return lambda L: (lambda rng, shape: np.ceil(rng.lognormal(np.log(median_frac * L), sigma, size=shape)))


def gamma_tokens(mean, sd, lo=1):
    """Absolute token lengths (independent of L): gamma with the given mean and sd, at least lo."""
    k = (mean / sd) ** 2
    theta = sd ** 2 / mean
    return lambda L: (lambda rng, shape: np.maximum(lo, np.ceil(rng.gamma(k, theta, size=shape))))


def lognormal_tokens(median, sigma, lo=1):
    return lambda L: (lambda rng, shape: np.maximum(lo, np.ceil(rng.lognormal(np.log(median), sigma, size=shape))))
