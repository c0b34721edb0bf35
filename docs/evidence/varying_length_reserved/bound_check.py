"""Check the back-of-envelope bound R(L) + K(L)·min(ln(1/p), ln n) against every replay cell's largest run.

R(L): the estimate's reserved at L plus workspace (table_replays.csv est_L); K(L): its [L, V] bytes at the
backward-start moment (K_L); p: the share of the cell's steps at L (results_*.jsonl frac_at_L, mean over seeds; ln(1/p)
is taken as infinite when p = 0); n: the cell's number of steps. The bound is an expected number of later records
(about min(ln(1/p), H_n - 1)) times K(L), not a guarantee for one run. Writes table_bound.md. Takes a second.

usage: python bound_check.py   (after report.py)
"""
import csv
import json
import math

from _paths import HERE

GiB = 1 << 30

runs = {}
for f in sorted(HERE.glob("results_*.jsonl")):
    for line in open(f):
        r = json.loads(line)
        runs.setdefault((r["setup"], r["L"], r["dist"], r["n"]), []).append(r)

lines = ["| setup | L | distribution | steps | share of steps at L | min(ln(1/p), ln n) | bound GiB | largest run GiB | largest run / bound |",
         "|---|---|---|---|---|---|---|---|---|"]
over = 0
rows = list(csv.DictReader(open(HERE / "table_replays.csv")))
for row in rows:
    n = int(row["n"])
    rs = runs[(row["setup"], int(row["L"]), row["dist"], n)]
    p = sum(r["frac_at_L"] for r in rs) / len(rs)
    n_eff = min(math.log(1 / p) if p > 0 else math.inf, math.log(n))
    bound = float(row["est_L"]) + float(row["K_L"]) * n_eff
    largest = max(r["varlen"] for r in rs)
    over += largest > bound
    lines.append(f"| {row['setup']} | {row['L']} | {row['dist']} | {n} | {p:.3f} | {n_eff:.2f} | {bound / GiB:.2f} | "
                 f"{largest / GiB:.2f} | {largest / bound:.3f} |")
lines.append("")
lines.append(f"{over} of {len(rows)} cells have a run above the bound.")
(HERE / "table_bound.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
