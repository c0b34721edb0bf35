"""Trace one setup at several lengths and save its templates: the build prefix, the first step (optimizer states
created) and the steady step, each with sizes as exact polynomials of T.

usage: python make_setup.py NAME MODEL L key=value ...
"""

from __future__ import annotations

import pickle
import sys

from _paths import HERE
from template import build_template, relative
from varlen_trace import parse_options, trace_varlen


def main():
    name, model, L = sys.argv[1], sys.argv[2], int(sys.argv[3])
    opts = parse_options(sys.argv[4:])
    opts.setdefault("seq_len", L)
    q, h, odd = L // 4, L // 2, (3 * L) // 5 + 3
    main_run = trace_varlen(model, [L, q, h, (3 * L) // 4, odd, L], **opts)
    firsts = {L: main_run}
    for T in (q, h, odd):
        firsts[T] = trace_varlen(model, [T], **opts)
    steady = build_template(main_run, [1, 2, 3, 4, 5], fit_ids=[1, 2, 3])
    # first-step template: step 0 of each run, fitted on q, h, L and checked on odd
    merged = {"events": [], "bounds": [], "lengths": []}
    for T in (q, h, L, odd):
        d = firsts[T]
        off = len(merged["events"])
        merged["events"].extend(d["events"])
        s, e = d["bounds"][0]
        merged["bounds"].append((s + off, e + off))
        merged["lengths"].append(T)
    first = build_template(merged, [0, 1, 2, 3], fit_ids=[0, 1, 2], check_ids=[3])
    prefix = main_run["events"][: main_run["bounds"][0][0]]
    # op name of each steady allocation (relative index) from the main run's step 1
    s, e = main_run["bounds"][1]
    ops = []
    for ev in main_run["events"][s:e]:
        if ev[0] == "alloc":
            ops.append(main_run["ops"].get(ev[1], ""))
    s, e = main_run["bounds"][0]
    first_ops = [main_run["ops"].get(ev[1], "") for ev in main_run["events"][s:e] if ev[0] == "alloc"]
    with open(HERE / f"raw_{name}.pkl", "wb") as f:
        pickle.dump(firsts, f)
    out = {"name": name, "model": model, "L": L, "options": opts, "prefix": prefix, "first": first,
           "steady": steady, "ops": ops, "first_ops": first_ops, "meta": main_run["meta"]}
    with open(HERE / f"setup_{name}.pkl", "wb") as f:
        pickle.dump(out, f)
    print(f"setup_{name}.pkl: prefix {len(prefix)} events, steady {len(steady.pattern)}, first {len(first.pattern)}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
