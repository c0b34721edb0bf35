"""The caching-allocator replay checked rule by rule against ``c10/cuda/CUDACachingAllocator.cpp`` (default
configuration). Every expected value is worked out by hand from the C++ rule named in the test, not read off the
replay: ``round_size`` (512-B granule), ``get_pool`` (<= 1 MiB small), ``get_allocation_size`` (2 MiB / 20 MiB /
request rounded to 2 MiB), ``get_free_block`` (best fit), ``should_split`` (>= 512 B small, > 1 MiB large),
``free_block`` (coalescing), ``release_cached_blocks`` (whole free segments only), ``resetPeakStats``, and
``get_free_block``'s stream check (a cached block serves only its own stream)."""

import pytest

from vramcalc.tracing.caching_allocator import (
    ALLOC, EMPTY_CACHE, FREE, RESET_PEAK, CachingAllocator, OutOfMemory, replay, round_size, segment_bytes,
)

KIB, MIB = 1 << 10, 1 << 20


@pytest.mark.parametrize("request_bytes, block_bytes", [
    (0, 512), (1, 512), (512, 512), (513, 1024), (1000, 1024), (600 * KIB, 600 * KIB), (1 * MIB + 1, 1 * MIB + 512),
])
def test_every_request_is_rounded_up_to_the_512_byte_granule(request_bytes, block_bytes):
    assert round_size(request_bytes) == block_bytes


@pytest.mark.parametrize("request_bytes, segment", [
    (600 * KIB, 2 * MIB),  # <= kSmallSize: one kSmallBuffer
    (1 * MIB, 2 * MIB),  # exactly 1 MiB is still small (size <= kSmallSize)
    (1 * MIB + 1, 20 * MIB),  # just over 1 MiB: large pool, below kMinLargeAlloc: kLargeBuffer
    (int(1.5 * MIB), 20 * MIB),
    (10 * MIB - 512, 20 * MIB),
    (10 * MIB, 10 * MIB),  # from kMinLargeAlloc on: the request rounded to kRoundLarge
    (10 * MIB + 1, 12 * MIB),
    (33 * MIB, 34 * MIB),
])
def test_a_request_no_free_block_can_serve_reserves_a_segment_of_the_allocation_size(request_bytes, segment):
    allocator = CachingAllocator()
    allocator.malloc(request_bytes)
    assert allocator.reserved_bytes == segment_bytes(round_size(request_bytes)) == segment
    assert allocator.segments == 1


def test_small_requests_share_a_2_mib_segment_split_to_the_512_byte_granule():
    allocator = CachingAllocator()
    allocator.malloc(1 * MIB)  # remainder 1 MiB >= 512 B: split (small pool)
    allocator.malloc(1 * MIB)  # fits the remainder exactly
    assert (allocator.reserved_bytes, allocator.allocated_bytes, allocator.segments) == (2 * MIB, 2 * MIB, 1)
    allocator.malloc(1)  # the segment is full: a second one
    assert allocator.reserved_bytes == 4 * MIB
    assert allocator.allocated_bytes == 2 * MIB + 512


def test_requests_between_1_and_10_mib_share_a_20_mib_segment():
    allocator = CachingAllocator()
    for _ in range(4):
        allocator.malloc(5 * MIB)  # 20 - 5k MiB remain, > 1 MiB each time until the last fills it
    assert (allocator.reserved_bytes, allocator.segments) == (20 * MIB, 1)
    allocator.malloc(2 * MIB)
    assert allocator.reserved_bytes == 40 * MIB


def test_a_freed_large_block_is_reused_and_split():
    allocator = CachingAllocator()
    allocator.free(allocator.malloc(50 * MIB))
    allocator.malloc(30 * MIB)  # best fit is the free 50 MiB block; 20 MiB remain (> 1 MiB): split
    assert (allocator.reserved_bytes, allocator.allocated_bytes) == (50 * MIB, 30 * MIB)
    allocator.malloc(20 * MIB)  # the remainder, exactly
    assert (allocator.reserved_bytes, allocator.segments) == (50 * MIB, 1)


def test_a_large_block_is_not_split_when_at_most_1_mib_would_remain():
    allocator = CachingAllocator()
    allocator.free(allocator.malloc(50 * MIB))
    allocator.malloc(49 * MIB)  # remainder exactly 1 MiB: not > kSmallSize, the whole block is handed out
    assert allocator.allocated_bytes == 50 * MIB  # memory_allocated counts the whole block
    allocator.malloc(12 * MIB)  # nothing left over to serve it
    assert allocator.reserved_bytes == 62 * MIB


def test_best_fit_takes_the_smallest_free_block_that_holds_the_request():
    allocator = CachingAllocator()
    big, medium = allocator.malloc(30 * MIB), allocator.malloc(12 * MIB)
    allocator.free(big)
    allocator.free(medium)
    allocator.malloc(11 * MIB)  # 12 MiB fits (1 MiB left: not split), 30 MiB is larger
    assert allocator.allocated_bytes == 12 * MIB
    allocator.malloc(25 * MIB)  # the 30 MiB block is still free
    assert (allocator.reserved_bytes, allocator.segments) == (42 * MIB, 2)


def test_the_pools_are_separate():
    allocator = CachingAllocator()
    allocator.free(allocator.malloc(50 * MIB))
    allocator.malloc(4 * KIB)  # a small request never takes a large free block
    assert allocator.reserved_bytes == 52 * MIB
    allocator.free(allocator.malloc(600 * KIB))
    allocator.malloc(int(1.5 * MIB))  # a large request never takes small-pool memory; the free 50 MiB serves it
    assert allocator.reserved_bytes == 52 * MIB


def test_a_block_cached_on_one_stream_never_serves_a_request_of_another():
    allocator = CachingAllocator()
    allocator.free(allocator.malloc(50 * MIB, stream=1))  # cached on stream 1
    allocator.malloc(50 * MIB)  # the default stream: get_free_block stops at stream 1's block, a new segment
    assert (allocator.reserved_bytes, allocator.segments) == (100 * MIB, 2)
    allocator.malloc(30 * MIB, stream=1)  # stream 1 takes its own cached block (split: 20 MiB left)
    assert allocator.reserved_bytes == 100 * MIB


def test_a_block_returns_to_the_pool_of_the_stream_it_was_allocated_on():
    events = [(ALLOC, "grad", 40 * MIB, 2), (FREE, "grad"), (ALLOC, "next", 40 * MIB, 2), (FREE, "next"),
              (ALLOC, "activation", 40 * MIB)]
    # the freed block serves stream 2 again but not the default stream's request: 40 MiB + 40 MiB reserved
    assert replay(events).reserved_peak_bytes == 80 * MIB
    assert replay([e[:3] if e[0] == ALLOC else e for e in events]).reserved_peak_bytes == 40 * MIB  # one stream


def test_empty_cache_releases_the_free_segments_of_every_stream():
    allocator = CachingAllocator()
    allocator.free(allocator.malloc(50 * MIB, stream=1))
    allocator.free(allocator.malloc(50 * MIB))
    allocator.empty_cache()
    assert (allocator.reserved_bytes, allocator.segments) == (0, 0)


def test_two_adjacent_freed_blocks_coalesce_with_the_rest_of_their_segment():
    allocator = CachingAllocator()
    first, second = allocator.malloc(2 * MIB), allocator.malloc(2 * MIB)  # both in one 20 MiB segment
    allocator.free(first)
    allocator.free(second)  # merges with first (before it) and the 16 MiB remainder (after it)
    allocator.malloc(19 * MIB)  # fits only in the whole 20 MiB block again; 1 MiB left: not split
    assert (allocator.reserved_bytes, allocator.allocated_bytes, allocator.segments) == (20 * MIB, 20 * MIB, 1)


def test_empty_cache_releases_only_wholly_free_segments():
    allocator = CachingAllocator()
    kept = allocator.malloc(2 * MIB)  # 20 MiB segment with a live 2 MiB block
    allocator.malloc(1 * KIB)  # 2 MiB small segment, live
    allocator.free(allocator.malloc(50 * MIB))  # 50 MiB segment, wholly free
    allocator.free(allocator.malloc(3 * MIB))  # the 20 MiB segment's second block, freed: still split
    allocator.empty_cache()
    assert (allocator.reserved_bytes, allocator.segments) == (22 * MIB, 2)
    allocator.free(kept)  # now the 20 MiB segment is whole and free
    allocator.empty_cache()
    assert allocator.reserved_bytes == 2 * MIB


def test_reset_peak_starts_the_peaks_from_the_current_values():
    events = [(ALLOC, "b", 3 * MIB), (ALLOC, "a", 50 * MIB), (FREE, "a"), (EMPTY_CACHE,), (RESET_PEAK,),
              (ALLOC, "c", 18 * MIB), (FREE, "c")]
    result = replay(events)
    assert result.reserved_at_reset_bytes == 20 * MIB  # b's 20 MiB segment; the 50 MiB one went with empty_cache
    assert result.reserved_peak_bytes == 38 * MIB  # b's segment has 17 MiB free: c needs a new 18 MiB segment
    assert result.allocated_peak_bytes == 21 * MIB
    assert (result.reserved_bytes, result.allocated_bytes) == (38 * MIB, 3 * MIB)


def test_without_reset_the_peak_covers_the_whole_replay():
    result = replay([(ALLOC, "a", 50 * MIB), (FREE, "a"), (EMPTY_CACHE,), (ALLOC, "b", 600 * KIB)])
    assert (result.reserved_peak_bytes, result.reserved_bytes, result.segment_allocations) == (50 * MIB, 2 * MIB, 2)


def test_over_capacity_the_cache_is_released_and_the_segment_retried():
    allocator = CachingAllocator(capacity_bytes=60 * MIB)
    allocator.free(allocator.malloc(50 * MIB))
    allocator.malloc(52 * MIB)  # the free 50 MiB block is too small; 102 MiB > 60: release, then 52 MiB fits
    assert (allocator.reserved_bytes, allocator.alloc_retries) == (52 * MIB, 1)
    with pytest.raises(OutOfMemory):
        allocator.malloc(10 * MIB)


@pytest.mark.parametrize("events, word", [
    ([(FREE, "x")], "not allocated"),
    ([(ALLOC, "x", 1), (ALLOC, "x", 1)], "twice"),
    ([("grow", "x")], "unknown allocator event"),
])
def test_a_malformed_event_sequence_is_an_error_naming_it(events, word):
    with pytest.raises(ValueError, match=word):
        replay(events)


# -- the trace's allocation sequence (tracing/alloc_events.py, tracing/reserved.py) --------------------------------
from .conftest import needs_torch  # noqa: E402


@pytest.fixture(scope="module")
def tiny_replay():
    from vramcalc.training_setup import resolve_setup
    from vramcalc.tracing.reserved import replay_reserved

    from .tiny_models import TINY

    spec = TINY["llama"]
    return replay_reserved(spec, resolve_setup(spec, seq_len=256), warmup=1, steps=2, workspace_bytes=32 * MIB)


@needs_torch
@pytest.mark.trace
def test_the_replayed_allocations_are_the_trackers_plus_the_workspace_and_the_context_tensor(tiny_replay):
    # the tracker's peak covers warm-up and measured steps; the replay's peak the measured steps, which repeat them
    tracker_peak = sum(tiny_replay.trace.terms.values())
    assert tiny_replay.allocated_peak_bytes == tracker_peak + 32 * MIB + 512  # torch.zeros(1): one 512-B block
    assert tiny_replay.reserved_peak_bytes >= tiny_replay.allocated_peak_bytes


@needs_torch
@pytest.mark.trace
def test_the_peak_is_reset_after_the_warm_up_step_and_empty_cache(tiny_replay):
    result = tiny_replay.replay
    assert result.reserved_at_reset_bytes is not None
    assert result.allocated_at_reset_bytes <= result.reserved_at_reset_bytes <= result.reserved_peak_bytes
    assert result.segment_allocations > result.segments  # the warm-up's cached segments went with empty_cache


@needs_torch
@pytest.mark.trace
def test_the_recorder_allocates_the_workspace_once_after_the_first_matmul_and_a_resize_is_a_new_block():
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vramcalc.tracing.alloc_events import AllocationEvents

    events = AllocationEvents(workspace_bytes=32 * MIB)
    with FakeTensorMode(), events:
        a = torch.empty(64, 64)
        b = a @ a
        c = b @ b
        storage = c.untyped_storage()
        storage.resize_(4 * 64 * 64 * 2)
        events.resized(storage)
        del a, b, c, storage
    kinds = [(e[0], e[2]) if e[0] == ALLOC else (e[0],) for e in events.events]
    assert kinds[:3] == [(ALLOC, 16384), (ALLOC, 16384), (ALLOC, 32 * MIB)]  # a, a @ a, then the workspace
    assert kinds[3] == (ALLOC, 16384)  # b @ b: no second workspace
    assert kinds[4:6] == [(FREE,), (ALLOC, 32768)]  # the resize: the old block freed, a new one allocated
    assert kinds.count((FREE,)) == 4  # a, b, c's first and second blocks; the workspace is never freed
    replay(events.events)  # a consistent sequence
