"""A replay of PyTorch's CUDA caching allocator: what ``torch.cuda.max_memory_reserved`` reads for a sequence of
allocations and frees.

The trace knows every storage a training step allocates and frees, in order (``tracker.AllocationTracker``); what
it cannot see is how the caching allocator packs them into the segments it ``cudaMalloc``s, and so the reserved
memory. This module replays the sequence through the allocator's rules, as ``DeviceCachingAllocator`` in
``c10/cuda/CUDACachingAllocator.cpp`` applies them with the default configuration (no ``PYTORCH_CUDA_ALLOC_CONF``:
``max_split_size`` = SIZE_MAX, ``roundup_power2_divisions`` unset, ``expandable_segments`` off, no garbage
collection threshold). Source read: pytorch/pytorch ``c10/cuda/CUDACachingAllocator.cpp`` at commit
``001074d25084fdb87a799823e395a50f5ec044d3`` (the 2.9-2.11 layout, where the allocator still calls
``CUDAAllocatorConfig::max_split_size()``); the constants and defaults were checked again against torch 2.13's
``c10/core/AllocatorConfig.h`` (lines 16-25: the constants; 339-353: ``large_segment_size_`` 20 MiB,
``max_split_size_`` SIZE_MAX, ``use_expandable_segments_`` false). The H200 calibration run used torch 2.11.0 with
no allocator configuration (``calibration/run_h200.sh``). The rules, each in the C++ function named:

1. ``round_size``: every request is rounded up to a multiple of ``kMinBlockSize`` = 512 B, at least 512 B (the
   power-of-two rounding applies only when ``roundup_power2_divisions`` is configured).
2. ``get_pool``: a rounded size <= ``kSmallSize`` = 1 MiB is served from the small pool, larger from the large pool;
   a block never moves between pools.
3. ``get_free_block``: best fit: the free block of the request's pool with the smallest size >= the request (ties:
   the lowest address; ``BlockComparatorSize`` orders by stream, size, address). With the default ``max_split_size``
   there is no limit on how much larger the block may be (the "oversize" rules apply only when it is configured).
   Only a block of the request's stream will do: the search starts at ``(stream, size)`` and gives up when the block
   found belongs to another stream (``(*it)->stream != p.stream()``), so each stream keeps its own cached blocks. A
   block is freed into the pool of the stream it was allocated on, whichever stream frees it.
4. ``get_allocation_size`` (no fitting free block: a new segment from ``cudaMalloc``): <= 1 MiB: ``kSmallBuffer`` =
   2 MiB; < ``kMinLargeAlloc`` = 10 MiB: ``kLargeBuffer`` = 20 MiB; larger: rounded up to ``kRoundLarge`` = 2 MiB.
5. ``should_split``: the block found is split when what remains is >= 512 B (small pool) or > 1 MiB (large pool);
   otherwise the whole block is handed out and ``memory_allocated`` counts all of it (``alloc_found_block``
   increases ``allocated_bytes`` by ``block->size``).
6. ``free_block`` / ``try_merge_blocks``: a freed block merges with its free neighbours in the same segment
   (``prev``/``next``) and returns to its pool; segments are never returned on free.
7. ``emptyCache`` -> ``release_cached_blocks`` -> ``release_blocks``: every free block that is a whole segment
   (no ``prev``, no ``next``) is ``cudaFree``d; a segment with any live block stays.
8. ``resetPeakStats``: each peak becomes the current value. ``reserved_bytes`` rises in ``alloc_block`` and falls in
   ``release_block``; ``allocated_bytes`` rises in ``alloc_found_block`` and falls in ``free``.

Streams: each allocation names the stream current when it was made (``alloc_events`` reads the stream FSDP2 and
FSDP1 select around their collectives; 0 is the default stream). What is not modelled: the delay a cross-stream free
waits for (``recordStream`` events: the block returns once the other stream passes the event), CUDA graph pools, expandable segments, a configured
``max_split_size`` or power-of-two rounding, and the out-of-memory path (a failed ``cudaMalloc`` frees cached
segments and retries: ``release_cached_blocks`` before the retry); ``capacity_bytes`` models that path when given.
Addresses are invented (segments laid end to end in the order they are allocated), so among free blocks of the same
size the choice may differ from the device's; sizes, and so the best fit, are exact.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

# c10/cuda/CUDACachingAllocator.cpp (namespace Native; torch 2.13: c10/core/AllocatorConfig.h:16-25)
MIN_BLOCK_BYTES = 512  # kMinBlockSize: all sizes are rounded to at least 512 bytes
SMALL_SIZE_BYTES = 1 << 20  # kSmallSize: largest "small" allocation is 1 MiB
SMALL_BUFFER_BYTES = 2 << 20  # kSmallBuffer: "small" allocations are packed in 2 MiB segments
LARGE_BUFFER_BYTES = 20 << 20  # kLargeBuffer: allocations between 1 and 10 MiB may use 20 MiB segments
MIN_LARGE_ALLOC_BYTES = 10 << 20  # kMinLargeAlloc: from 10 MiB on, a segment is the request rounded to 2 MiB
ROUND_LARGE_BYTES = 2 << 20  # kRoundLarge: round up large segments to 2 MiB

# Events of a replayed sequence: ("alloc", key, nbytes[, stream]), ("free", key), ("empty_cache",), ("reset_peak",)
DEFAULT_STREAM = 0
ALLOC, FREE, EMPTY_CACHE, RESET_PEAK = "alloc", "free", "empty_cache", "reset_peak"


def round_size(nbytes: int) -> int:
    """``round_size``: the block size a request of ``nbytes`` occupies (multiple of 512 B, at least 512 B)."""
    if nbytes < MIN_BLOCK_BYTES:
        return MIN_BLOCK_BYTES
    return MIN_BLOCK_BYTES * -(-nbytes // MIN_BLOCK_BYTES)


def is_small(size: int) -> bool:
    """``get_pool``: a rounded size of at most 1 MiB belongs to the small pool."""
    return size <= SMALL_SIZE_BYTES


def segment_bytes(size: int) -> int:
    """``get_allocation_size``: the segment ``cudaMalloc``ed for a rounded ``size`` no free block can serve."""
    if size <= SMALL_SIZE_BYTES:
        return SMALL_BUFFER_BYTES
    if size < MIN_LARGE_ALLOC_BYTES:
        return LARGE_BUFFER_BYTES
    return ROUND_LARGE_BYTES * -(-size // ROUND_LARGE_BYTES)


def should_split(block_bytes: int, size: int, small: bool) -> bool:
    """``should_split`` (default ``max_split_size``, no expandable segments): split off the remainder when it is at
    least 512 B in the small pool, more than 1 MiB in the large pool."""
    remaining = block_bytes - size
    return remaining >= MIN_BLOCK_BYTES if small else remaining > SMALL_SIZE_BYTES


class Block:
    """A contiguous range of one segment: allocated or free, with its neighbours in the segment."""

    __slots__ = ("size", "addr", "small", "stream", "allocated", "prev", "next")

    def __init__(self, size: int, addr: int, small: bool, stream=DEFAULT_STREAM):
        self.size = size
        self.addr = addr
        self.small = small
        self.stream = stream
        self.allocated = False
        self.prev: Block | None = None
        self.next: Block | None = None

    @property
    def is_segment(self) -> bool:
        """The block spans its whole segment (``!block->prev && !block->next``)."""
        return self.prev is None and self.next is None


class OutOfMemory(Exception):
    """A request the ``capacity_bytes`` cannot hold even after the cached segments were released."""


@dataclass(frozen=True)
class ReplayResult:
    """What the allocator's statistics read after a replay."""

    reserved_peak_bytes: int  # max_memory_reserved since the last reset_peak
    allocated_peak_bytes: int  # max_memory_allocated since the last reset_peak (block sizes, rounded)
    reserved_bytes: int  # memory_reserved at the end
    allocated_bytes: int  # memory_allocated at the end
    segments: int  # segments held at the end
    segment_allocations: int  # cudaMalloc calls over the whole replay
    alloc_retries: int  # cudaMalloc failures that released the cache and retried (capacity_bytes only)
    reserved_at_reset_bytes: int | None  # memory_reserved when the peak was last reset (the harness' baseline)
    allocated_at_reset_bytes: int | None


class CachingAllocator:
    """One device's caching allocator (a free pool per stream), with ``memory_allocated``/``memory_reserved`` and their peaks.

    ``capacity_bytes``: the memory ``cudaMalloc`` may take in all (None: unlimited); over it, the cached segments are
    released and the ``cudaMalloc`` retried, as ``malloc`` does, and ``OutOfMemory`` is raised if it still fails.
    """

    def __init__(self, capacity_bytes: int | None = None):
        self.capacity_bytes = capacity_bytes
        self._free: dict[tuple, list[tuple[int, int]]] = {}  # (stream, small) -> sorted (size, addr)
        self._by_key: dict[tuple[int, int], Block] = {}  # (size, addr) of every free block
        self._next_addr = 0
        self.allocated_bytes = 0
        self.reserved_bytes = 0
        self.allocated_peak_bytes = 0
        self.reserved_peak_bytes = 0
        self.segments = 0
        self.segment_allocations = 0
        self.alloc_retries = 0
        self.reserved_at_reset_bytes: int | None = None
        self.allocated_at_reset_bytes: int | None = None

    # -- the free pools (BlockPool::blocks, ordered by BlockComparatorSize) ----------------------------------------
    def _insert(self, block: Block) -> None:
        key = (block.size, block.addr)
        bisect.insort(self._free.setdefault((block.stream, block.small), []), key)
        self._by_key[key] = block

    def _remove(self, block: Block) -> None:
        key = (block.size, block.addr)
        pool = self._free[(block.stream, block.small)]
        index = bisect.bisect_left(pool, key)
        del pool[index]
        del self._by_key[key]

    def _best_fit(self, size: int, small: bool, stream) -> Block | None:
        """``get_free_block``: the smallest free block of the stream's pool that holds ``size`` (lowest address
        first)."""
        pool = self._free.get((stream, small), ())
        index = bisect.bisect_left(pool, (size, -1))
        if index == len(pool):
            return None
        block = self._by_key[pool[index]]
        self._remove(block)
        return block

    # -- the public operations ---------------------------------------------------------------------------------
    def malloc(self, nbytes: int, stream=DEFAULT_STREAM) -> Block:
        """``DeviceCachingAllocator::malloc``: a block for a request of ``nbytes`` on ``stream``."""
        size = round_size(nbytes)
        small = is_small(size)
        block = self._best_fit(size, small, stream)
        if block is None:
            block = self._new_segment(segment_bytes(size), small, stream)
        if should_split(block.size, size, small):  # alloc_found_block: the front is handed out
            rest = Block(block.size - size, block.addr + size, small, stream)
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            self._insert(rest)
        block.allocated = True
        self.allocated_bytes += block.size
        self.allocated_peak_bytes = max(self.allocated_peak_bytes, self.allocated_bytes)
        return block

    def free(self, block: Block) -> None:
        """``free`` -> ``free_block``: back to the pool, merged with free neighbours (``try_merge_blocks``)."""
        if not block.allocated:
            raise ValueError("block freed twice")
        block.allocated = False
        self.allocated_bytes -= block.size
        for neighbour in (block.prev, block.next):
            if neighbour is None or neighbour.allocated:
                continue
            self._remove(neighbour)
            if neighbour is block.prev:  # [neighbour block]
                block.addr = neighbour.addr
                block.prev = neighbour.prev
                if block.prev is not None:
                    block.prev.next = block
            else:  # [block neighbour]
                block.next = neighbour.next
                if block.next is not None:
                    block.next.prev = block
            block.size += neighbour.size
        self._insert(block)

    def empty_cache(self) -> None:
        """``emptyCache`` -> ``release_cached_blocks``: ``cudaFree`` every free block that is a whole segment."""
        for pool in list(self._free.values()):
            for key in list(pool):
                block = self._by_key[key]
                if block.is_segment:
                    self._remove(block)
                    self.reserved_bytes -= block.size
                    self.segments -= 1

    def reset_peak(self) -> None:
        """``resetPeakStats``: every peak becomes the current value."""
        self.allocated_peak_bytes = self.allocated_bytes
        self.reserved_peak_bytes = self.reserved_bytes
        self.reserved_at_reset_bytes = self.reserved_bytes
        self.allocated_at_reset_bytes = self.allocated_bytes

    def _new_segment(self, nbytes: int, small: bool, stream=DEFAULT_STREAM) -> Block:
        """``alloc_block``: a new segment; over ``capacity_bytes``, release the cache and retry once."""
        if self.capacity_bytes is not None and self.reserved_bytes + nbytes > self.capacity_bytes:
            self.alloc_retries += 1
            self.empty_cache()
            if self.reserved_bytes + nbytes > self.capacity_bytes:
                raise OutOfMemory(f"a {nbytes}-byte segment does not fit: {self.reserved_bytes} bytes reserved of "
                                  f"{self.capacity_bytes}")
        block = Block(nbytes, self._next_addr, small, stream)
        self._next_addr += nbytes
        self.reserved_bytes += nbytes
        self.reserved_peak_bytes = max(self.reserved_peak_bytes, self.reserved_bytes)
        self.segments += 1
        self.segment_allocations += 1
        return block

    def result(self) -> ReplayResult:
        return ReplayResult(
            reserved_peak_bytes=self.reserved_peak_bytes,
            allocated_peak_bytes=self.allocated_peak_bytes,
            reserved_bytes=self.reserved_bytes,
            allocated_bytes=self.allocated_bytes,
            segments=self.segments,
            segment_allocations=self.segment_allocations,
            alloc_retries=self.alloc_retries,
            reserved_at_reset_bytes=self.reserved_at_reset_bytes,
            allocated_at_reset_bytes=self.allocated_at_reset_bytes,
        )


def replay(events, capacity_bytes: int | None = None) -> ReplayResult:
    """Replay ``events`` through a fresh allocator and return its statistics.

    ``events``: ``("alloc", key, nbytes)`` or ``("alloc", key, nbytes, stream)`` (``key`` names the allocation, any
    hashable; ``stream`` the stream it was made on, any hashable, ``DEFAULT_STREAM`` when left out), ``("free", key)``,
    ``("empty_cache",)`` and ``("reset_peak",)``, in program order. A free of a key never allocated is an error.
    """
    allocator = CachingAllocator(capacity_bytes)
    live: dict = {}
    for event in events:
        kind = event[0]
        if kind == ALLOC:
            key, nbytes = event[1], event[2]
            if key in live:
                raise ValueError(f"allocation {key!r} made twice without a free")
            live[key] = allocator.malloc(nbytes, event[3] if len(event) > 3 else DEFAULT_STREAM)
        elif kind == FREE:
            key = event[1]
            block = live.pop(key, None)
            if block is None:
                raise ValueError(f"free of {key!r}, which is not allocated")
            allocator.free(block)
        elif kind == EMPTY_CACHE:
            allocator.empty_cache()
        elif kind == RESET_PEAK:
            allocator.reset_peak()
        else:
            raise ValueError(f"unknown allocator event {kind!r}: expected one of {ALLOC}, {FREE}, {EMPTY_CACHE}, "
                             f"{RESET_PEAK}")
    return allocator.result()


def stream_live_peaks(events) -> tuple[dict, int]:
    """Each stream's largest live bytes over ``events`` (requested sizes, no rounding) and the largest of all streams
    together: what the tensors alone would hold, before any pool or segment."""
    live: dict = {}
    now: dict = {}
    peaks: dict = {}
    total = joint = 0
    for event in events:
        if event[0] == ALLOC:
            stream = event[3] if len(event) > 3 else DEFAULT_STREAM
            live[event[1]] = (stream, event[2])
            now[stream] = now.get(stream, 0) + event[2]
            peaks[stream] = max(peaks.get(stream, 0), now[stream])
            total += event[2]
            joint = max(joint, total)
        elif event[0] == FREE:
            stream, nbytes = live.pop(event[1])
            now[stream] -= nbytes
            total -= nbytes
    return peaks, joint
