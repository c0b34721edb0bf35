"""The staircase of one replay: a fixed-length run at L, then 200 steps of uniform[L/16, L] lengths (seed 0), printing
every step where reserved changed (record steps starred) and every new segment over 64 MiB with the op that asked for
it. (explore1.py in the study.)

usage: python staircase.py SETUP L        e.g. python staircase.py q15_lora 2048
"""
import numpy as np, sys
from replay_varlen import *
S = load_setup(sys.argv[1]); L = int(sys.argv[2])
fixed = replay_lengths(S, [L]*6)
print("fixed L", L, "reserved peak GiB", fixed.reserved_peak/GiB, "per step", [round(x[1]/GiB,3) for x in fixed.per_step])
rng = np.random.default_rng(0)
Ts = batch_lengths(uniform()(L), L, 200, 1, rng)
r = replay_lengths(S, Ts)
print("uniform 200 steps: peak", r.reserved_peak/GiB, "ratio", r.reserved_peak/fixed.reserved_peak)
rec = 0; 
for i,(T,res,ap,rp) in enumerate(r.per_step):
    if i==0 or res != r.per_step[i-1][1]:
        print(f"step {i:4d} T={T:6d} record={'*' if T>rec else ' '} reserved {res/GiB:.3f} allocpeak {ap/GiB:.3f}")
    rec = max(rec,T)
from collections import Counter
c = Counter((s, op) for s,T,op,req,_ in r.new_segments)
big = [(s,T,op,req/2**20) for s,T,op,req,_ in r.new_segments if req>64*2**20]
for b in big[:60]: print(b)
