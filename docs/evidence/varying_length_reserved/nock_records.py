"""Each record step of the no-checkpointing replays (results_nock.jsonl): which of the step's large requests
(>= 10 MiB, kMinLargeAlloc: a segment of their own, rounded up to 2 MiB) outgrow the segments the previous record
made for them, and what the step added. Writes table_nock_records.md. README section "Without checkpointing".

Classes are read from the setup's steady-step template: the allocations alive at the loss's first
``_log_softmax`` (the saved activations and the 16-bit logits), grouped by their bytes per token w (a size is w·T
exactly: flash/sdpa, ``template.py``); a per-layer class has more than one request. It crosses at a record
T_p -> T_r when w·T_r >= 10 MiB and ceil_2MiB(w·T_r) > ceil_2MiB(w·T_p) (``get_allocation_size``: kRoundLarge =
2 MiB): its requests no longer fit the segments made for them at T_p. R(T) is the fixed-length replay (3 steps at T),
R_{r-1} the run's reserved before the record step.

usage: python nock_records.py [SETUP]     (default l27_lora_b2_nock)
"""
import collections
import functools
import json
import sys

from _paths import HERE
from replay_varlen import GiB, load_setup, replay_lengths, sizes_at

from vramcalc.tracing.caching_allocator import MIN_LARGE_ALLOC_BYTES, segment_bytes

MiB = 1 << 20




def saved_requests(S, vocab_bytes_per_token):
    """Bytes per token of the steady step's allocations alive at the loss (its first ``_log_softmax``), in
    allocation order, the loss's own fp32 [T, V] blocks (``vocab_bytes_per_token`` = 4·b·V) left out."""
    tpl, ops = S["steady"], S["ops"]
    a, b = sizes_at(tpl, 1000), sizes_at(tpl, 1001)
    alive, loss = {}, None
    for pos, ev in enumerate(tpl.pattern):
        if ev[0] == "a":
            alive[ev[1]] = [pos, None]
            if loss is None and ops[ev[1]] == "_log_softmax.default":
                loss = pos
        elif ev[0] == "f":
            alive[ev[1]][1] = pos
    return [b[k] - a[k] for k, (start, end) in sorted(alive.items(), key=lambda kv: kv[1][0])
            if start < loss and (end is None or end > loss) and b[k] - a[k] != vocab_bytes_per_token]


def saved_classes(S):
    """{bytes per token: count} of ``saved_requests``."""
    return collections.Counter(saved_requests(S, vocab_bytes(S)))


def vocab_bytes(S):
    """4·b·V: the bytes per token of one fp32 [b, T, V] block of the loss."""
    from vramcalc.catalogue import get_model

    return 4 * S["options"]["batch_size"] * get_model(S["model"]).vocab_size


def main(name):
    S = load_setup(name)
    classes = saved_classes(S)
    fixed = functools.lru_cache(None)(lambda T: replay_lengths(S, [T] * 3).reserved_peak)
    lines = [f"Setup `{name}`; saved classes >= 1 MiB at L (bytes per token at batch {S['options'].get('batch_size')}: "
             f"count): " + ", ".join(f"{w}: {n}" for w, n in sorted(classes.items()) if w * S["L"] >= MiB), "",
             "| run | T_p -> T_r | per-layer classes crossing (w: count) | crossing bytes at T_r (MiB) | R(T_r) - R_{r-1} (MiB) | "
             "new: loss [T, V] (MiB) | new: other >= 10 MiB (MiB) | new: < 10 MiB (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    summary = collections.Counter()
    for line in open(HERE / "results_nock.jsonl"):
        r = json.loads(line)
        if r["setup"] != name:
            continue
        new = {x[0]: x for x in r["new_segment_bytes"]}
        per_step = r["per_step_reserved"]
        for (_, T_p, _), (s, T_r, _) in zip(r["records"], r["records"][1:]):
            crossing = {w: n for w, n in classes.items()  # the per-layer classes (more than one request)
                        if n > 1 and w * T_r >= MIN_LARGE_ALLOC_BYTES
                        and segment_bytes(w * T_r) > segment_bytes(w * T_p)}
            crossing_bytes = sum(n * segment_bytes(w * T_r) for w, n in crossing.items())
            grow = fixed(T_r) - per_step[s - 1]
            x = new.get(s, [s, T_r, 0, 0, 0])
            lines.append(f"| {r['dist']} s{r['seed']} | {T_p} -> {T_r} | "
                         f"{', '.join(f'{w}: {n}' for w, n in sorted(crossing.items())) or '-'} | "
                         f"{crossing_bytes / MiB:.0f} | {grow / MiB:+.0f} | {x[2] / MiB:.0f} | {x[3] / MiB:.0f} | "
                         f"{x[4] / MiB:.0f} |")
            key = ("crossing" if crossing else "none", "R(T_r) > R_{r-1}" if grow > 0 else "R(T_r) <= R_{r-1}")
            summary[key + ("other > 0",) if x[3] else key + ("other = 0",)] += 1
            summary[key + ("other bytes",)] += x[3]
            summary[key + ("crossing bytes",)] += crossing_bytes
    lines += ["", "| per-layer classes crossing | fixed-length growth | records | with other >= 10 MiB new segments | "
              "other >= 10 MiB new (GiB) | crossing bytes (GiB) |", "|---|---|---|---|---|---|"]
    for c in ("crossing", "none"):
        for g in ("R(T_r) > R_{r-1}", "R(T_r) <= R_{r-1}"):
            n = summary[(c, g, "other > 0")] + summary[(c, g, "other = 0")]
            if n:
                lines.append(f"| {c} | {g} | {n} | {summary[(c, g, 'other > 0')]} | "
                             f"{summary[(c, g, 'other bytes')] / GiB:.2f} | {summary[(c, g, 'crossing bytes')] / GiB:.2f} |")
    text = "\n".join(lines) + "\n"
    (HERE / f"table_nock_records_{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "l27_lora_b2_nock")
