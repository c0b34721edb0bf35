"""The record step's large requests matched against the cache the earlier steps left (README "Without
checkpointing", "Mechanism"): a check that best fit with splitting over whole free segments accounts for the new
segments of a record step without checkpointing.

For one run (setup, lengths) and each of its record steps: the free segments >= 10 MiB before the step (the replay's
own cache), and the step's requests >= 10 MiB alive at its loss, at T_r, in allocation order, then the loss's three
fp32 [T, V] blocks (``nock_records.saved_requests``). Matching: each into the smallest free block that holds it
(``get_free_block``), the rest of the block
staying free when over 1 MiB (``should_split``); a request no block holds makes a segment of its size rounded up to
2 MiB (``get_allocation_size``). Printed: the matching's new bytes against the replay's new bytes >= 10 MiB at that
step. What the matching leaves out: frees during the forward, the backward's own requests, requests under 10 MiB.

usage: python nock_matching.py SETUP T1,T2,...   (one run)
       python nock_matching.py SETUP             (every run of SETUP in results_nock.jsonl: table_nock_matching_SETUP.md)
"""
import bisect
import sys

from nock_records import MiB, saved_requests, vocab_bytes
from replay_varlen import Run, load_setup

from vramcalc.tracing.caching_allocator import MIN_LARGE_ALLOC_BYTES, segment_bytes, should_split


def free_segments(allocator, floor=MIN_LARGE_ALLOC_BYTES):
    return sorted(size for pool in allocator._free.values() for size, _ in pool if size >= floor)


def matched_new_bytes(blocks, requests):
    """New segment bytes when ``requests`` (in order) take the smallest free block that holds each."""
    blocks, new = list(blocks), 0
    for size in requests:
        i = bisect.bisect_left(blocks, size)
        if i == len(blocks):
            new += segment_bytes(size)
            continue
        block = blocks.pop(i)
        if should_split(block, size, small=False):
            bisect.insort(blocks, block - size)
    return new


def main(name, lengths, quiet=False):
    """Per record step (step, T_p, T_r, the matching's new bytes, the replay's new bytes >= 10 MiB)."""
    S = load_setup(name)
    out = []
    per_token = saved_requests(S, vocab_bytes(S)) + [vocab_bytes(S)] * 3  # then the loss's three [T, V] blocks
    run = Run(S)
    longest = 0
    for i, T in enumerate(lengths):
        if i and T > longest:
            requests = [w * T for w in per_token if w * T >= MIN_LARGE_ALLOC_BYTES]
            predicted = matched_new_bytes(free_segments(run.alloc), requests)
            before = len(run.new_segments)
            run.run_step(T)
            replayed = sum(segment_bytes(q) for s, _, _, q, _ in run.new_segments[before:]
                           if q >= MIN_LARGE_ALLOC_BYTES)
            out.append((i, longest, T, predicted, replayed))
            if not quiet:
                print(f"step {i} {longest} -> {T}: matching {predicted / MiB:.0f} MiB new, replay {replayed / MiB:.0f} "
                      "MiB new")
        else:
            run.run_step(T)
        longest = max(longest, T)
    return out


def all_runs(name):
    """The matching over every run of ``name`` in results_nock.jsonl (its record lengths, in order: the shorter steps
    between records add at most a few 2 and 20 MiB segments), as a table in table_nock_matching.md."""
    import json

    from _paths import HERE

    lines = ["| run | record steps | matching new (GiB) | replay new >= 10 MiB (GiB) | steps within 5% or 32 MiB |",
             "|---|---|---|---|---|"]
    total = [0, 0, 0, 0]
    for line in open(HERE / "results_nock.jsonl"):
        r = json.loads(line)
        if r["setup"] != name or len(r["records"]) < 2:
            continue
        rows = main(name, [T for _, T, _ in r["records"]], quiet=True)
        close = sum(abs(p - q) <= max(0.05 * q, 32 * MiB) for _, _, _, p, q in rows)
        m, q = sum(x[3] for x in rows), sum(x[4] for x in rows)
        lines.append(f"| {r['dist']} s{r['seed']} | {len(rows)} | {m / 2**30:.2f} | {q / 2**30:.2f} | {close} |")
        total = [total[0] + len(rows), total[1] + m, total[2] + q, total[3] + close]
    lines.append(f"| all | {total[0]} | {total[1] / 2**30:.2f} | {total[2] / 2**30:.2f} | {total[3]} |")
    (HERE / f"table_nock_matching_{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 2:
        main(sys.argv[1], [int(x) for x in sys.argv[2].split(",")])
    else:
        all_runs(sys.argv[1])
