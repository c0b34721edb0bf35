"""Replay an alloc/free sequence through a model of PyTorch's CUDACachingAllocator (c10/cuda/CUDACachingAllocator.cpp,
torch 2.2-2.3 defaults: no max_split_size, no expandable segments): best fit per pool, split rules, coalescing.

Usage: python alloc.py events.json [cap_GB]. Result (Llama-2-7B, 32 layers): reserved 9.133 GB after init, peak
allocated 7.361 GB (7.286 GB with events.py --no-rope, the first version's sequence; the same reserved); the tutorial
printed 9.13 GB reserved after model init (torchtune-037's notes). With --lora: 14.009 GB reserved after init
(13.923 GB --no-rope); the LoRA tutorial printed 13.98 GB. ``vramcalc.tracing.caching_allocator.replay`` gives
the same figures, byte for byte, for these sequences and for vramcalc's analytic one
(``vramcalc/terms/load_reserved.py``)."""
import json, sys, bisect
MB = 1 << 20
K_SMALL, K_SMALL_BUF, K_LARGE_BUF, K_MIN_LARGE, K_ROUND_LARGE, K_MIN_BLOCK = MB, 2 * MB, 20 * MB, 10 * MB, 2 * MB, 512

def round_size(n):
    return K_MIN_BLOCK if n < K_MIN_BLOCK else K_MIN_BLOCK * (-(-n // K_MIN_BLOCK))

def alloc_size(n):
    if n <= K_SMALL: return K_SMALL_BUF
    if n < K_MIN_LARGE: return K_LARGE_BUF
    return K_ROUND_LARGE * (-(-n // K_ROUND_LARGE))

class Block:
    __slots__ = ("size", "addr", "seg", "prev", "next", "free", "small")
    def __init__(s, size, addr, seg, small):
        s.size, s.addr, s.seg, s.prev, s.next, s.free, s.small = size, addr, seg, None, None, True, small

class Allocator:
    def __init__(s, cap=None):
        s.pools = {True: [], False: []}  # sorted lists of (size, addr, block)
        s.reserved = s.allocated = s.peak_reserved = s.peak_allocated = 0
        s.next_addr = 0; s.nseg = 0; s.cap = cap
    def _insert(s, b):
        bisect.insort(s.pools[b.small], (b.size, b.addr, id(b), b))
    def _remove(s, b):
        p = s.pools[b.small]; i = bisect.bisect_left(p, (b.size, b.addr, id(b), b)); assert p[i][3] is b; p.pop(i)
    def malloc(s, n):
        size = round_size(n); small = size <= K_SMALL
        p = s.pools[small]; i = bisect.bisect_left(p, (size, -1, -1))
        if i < len(p):
            b = p.pop(i)[3]
        else:
            seg = alloc_size(size)
            if s.cap and s.reserved + seg > s.cap:
                s._release_free_segments()
            b = Block(seg, s.next_addr, s.nseg, small); s.next_addr += seg; s.nseg += 1
            s.reserved += seg; s.peak_reserved = max(s.peak_reserved, s.reserved)
        remaining = b.size - size
        if (small and remaining >= K_MIN_BLOCK) or (not small and remaining > K_SMALL):
            rest = Block(remaining, b.addr + size, b.seg, small)
            rest.prev, rest.next = b, b.next
            if b.next: b.next.prev = rest
            b.next = rest; b.size = size; s._insert(rest)
        b.free = False
        s.allocated += b.size; s.peak_allocated = max(s.peak_allocated, s.allocated)
        return b
    def free(s, b):
        b.free = True; s.allocated -= b.size
        for nb in (b.prev, b.next):
            if nb is not None and nb.free:
                s._remove(nb)
                if nb is b.prev:
                    nb.size += b.size; nb.next = b.next
                    if b.next: b.next.prev = nb
                    b = nb
                else:
                    b.size += nb.size; b.next = nb.next
                    if nb.next: nb.next.prev = b
        s._insert(b)
    def _release_free_segments(s):
        for small in (True, False):
            keep = []
            for t in s.pools[small]:
                b = t[3]
                if b.prev is None and b.next is None:
                    s.reserved -= b.size
                else:
                    keep.append(t)
            s.pools[small] = keep

events = json.load(open(sys.argv[1]))
A = Allocator(cap=int(float(sys.argv[2]) * 1e9) if len(sys.argv) > 2 else None)
live = {}
for kind, key, nbytes in events:
    if kind == "a":
        live[key] = A.malloc(nbytes)
    elif kind == "f":
        b = live.pop(key, None)
        if b is not None: A.free(b)
    else:
        print(f"{key}: allocated {A.allocated/1e9:.3f} GB, reserved {A.reserved/1e9:.3f} GB, peak allocated "
              f"{A.peak_allocated/1e9:.3f}, peak reserved {A.peak_reserved/1e9:.3f}, segments {A.nseg}")
