"""Step templates: a traced step's event sequence with keys made relative, and per-event sizes as exact polynomials
of T fitted across steps of different lengths; then synthesis of multi-step streams."""

from __future__ import annotations

import pickle
from fractions import Fraction

import _paths  # noqa: F401  (puts the repository root on sys.path)
from vramcalc.tracing.caching_allocator import ALLOC, FREE


def relative(events, start, end):
    """The step's events with allocation keys replaced by their order within the step; frees of keys allocated
    before the step are kept as ('xfree', key) (cross-step); returns (pattern, sizes, outside_keys_alive)."""
    local = {}
    pattern, sizes = [], []
    for ev in events[start:end]:
        if ev[0] == ALLOC:
            local[ev[1]] = len(sizes)
            stream = ev[3] if len(ev) > 3 else 0
            pattern.append(("a", len(sizes), stream))
            sizes.append(ev[2])
        elif ev[0] == FREE:
            if ev[1] in local:
                pattern.append(("f", local.pop(ev[1])))
            else:
                pattern.append(("xf", ev[1]))
        else:
            pattern.append((ev[0],))
    # canonical order within each run of consecutive frees (the end state of a run of frees does not depend on its
    # order; weakref finalisers of objects dying together run in an order that varies between processes)
    out, run = [], []
    for ev in pattern + [("end",)]:
        if ev[0] == "f":
            run.append(ev)
            continue
        out.extend(sorted(run))
        run = []
        out.append(ev)
    return out[:-1], sizes, sorted(local.values())  # allocations still alive at the step's end


def fit_poly(points):
    """Exact Lagrange polynomial through (T, size) points (Fractions), as coefficient list low->high."""
    n = len(points)
    coeffs = [Fraction(0)] * n
    for i, (xi, yi) in enumerate(points):
        # basis polynomial
        basis = [Fraction(1)]
        denom = Fraction(1)
        for j, (xj, _) in enumerate(points):
            if j == i:
                continue
            basis = [Fraction(0)] + basis  # multiply by x
            for k in range(len(basis) - 1):
                basis[k] -= xj * basis[k + 1]
            denom *= (xi - xj)
        for k in range(n):
            coeffs[k] += yi * basis[k] / denom
    return coeffs


def eval_poly(coeffs, T):
    v = sum(c * T ** k for k, c in enumerate(coeffs))
    return v


class StepTemplate:
    """A steady-state step: pattern + size polynomials (degree <= 2)."""

    def __init__(self, pattern, polys, alive):
        self.pattern = pattern
        self.polys = polys
        self.alive = alive

    def sizes(self, T):
        out = []
        for p in self.polys:
            v = eval_poly(p, T)
            if v.denominator != 1:
                raise ValueError(f"non-integer size at T={T}: {v}")
            out.append(int(v))
        return out


def build_template(data, step_ids, fit_ids=None, check_ids=None):
    events, bounds, lengths = data["events"], data["bounds"], data["lengths"]
    rel = [relative(events, *bounds[i]) for i in step_ids]
    pat0 = rel[0][0]
    for (p, s, a), i in zip(rel, step_ids):
        if p != pat0:
            # find first difference
            for k, (x, y) in enumerate(zip(p, pat0)):
                if x != y:
                    raise ValueError(f"step {i} pattern differs at {k}: {x} vs {y}")
            raise ValueError(f"step {i} pattern length {len(p)} vs {len(pat0)}")
    fit_ids = fit_ids or step_ids[:3]
    pts = {i: (lengths[i], rel[step_ids.index(i)][1]) for i in step_ids}
    nalloc = len(rel[0][1])
    polys = []
    for k in range(nalloc):
        polys.append(fit_poly([(Fraction(pts[i][0]), Fraction(pts[i][1][k])) for i in fit_ids]))
    tpl = StepTemplate(pat0, polys, rel[0][2])
    for i in (check_ids or [j for j in step_ids if j not in fit_ids]):
        T, sz = pts[i]
        got = tpl.sizes(T)
        bad = [(k, a, b) for k, (a, b) in enumerate(zip(got, sz)) if a != b]
        if bad:
            raise ValueError(f"check step {i} (T={T}): {len(bad)} sizes differ, first {bad[:3]}")
    return tpl


def instantiate(tpl, T, tag):
    """The step's events at length T with keys (tag, k)."""
    sizes = tpl.sizes(T)
    out = []
    for ev in tpl.pattern:
        if ev[0] == "a":
            out.append((ALLOC, (tag, ev[1]), sizes[ev[1]]) if ev[2] == 0 else (ALLOC, (tag, ev[1]), sizes[ev[1]], ev[2]))
        elif ev[0] == "f":
            out.append((FREE, (tag, ev[1])))
        elif ev[0] == "xf":
            raise ValueError("cross-step free in a template")
        else:
            out.append(ev)
    return out


def load(path):
    with open(path, "rb") as f:
        return pickle.load(f)
