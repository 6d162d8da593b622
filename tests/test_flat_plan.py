import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zerofuse import FlatPlan


def check_invariants(numels, plan, world, element_size, alignment_bytes, bucket_bytes):
    align = alignment_bytes // element_size
    assert plan.alignment == align
    # Parameters: in order, aligned, not overlapping, padding fills the gaps.
    cursor = 0
    for i, (offset, numel, padding) in enumerate(plan.params):
        assert numel == numels[i]
        assert offset % align == 0 and offset >= cursor
        assert offset == cursor  # no gap beyond the padding already counted
        cursor = offset + numel + padding
    assert cursor == plan.total or not numels
    # Buckets: contiguous cover of [0, total), world equal aligned chunks each.
    begin = shard_offset = 0
    target_chunk = max(align, bucket_bytes // element_size // world // align * align)
    for b_begin, b_end, chunk, b_shard_offset in plan.buckets:
        assert b_begin == begin and b_end - b_begin == world * chunk
        assert chunk % align == 0 and 0 < chunk <= target_chunk
        assert b_shard_offset == shard_offset
        begin, shard_offset = b_end, shard_offset + chunk
    assert begin == plan.total and shard_offset == plan.shard_size
    assert plan.total == world * plan.shard_size
    # Every element of every parameter is owned by exactly one rank, in a shard
    # slot no other element uses.
    owned = [np.zeros(n, np.int32) for n in numels]
    for rank in range(world):
        used = np.zeros(plan.shard_size, np.int32)
        for param_index, param_begin, shard_off, length in plan.shard_slices(rank):
            assert length > 0
            owned[param_index][param_begin:param_begin + length] += 1
            used[shard_off:shard_off + length] += 1
            # Agrees with owner() at both ends of the slice.
            flat = plan.params[param_index][0] + param_begin
            assert plan.owner(flat) == (rank, shard_off)
            assert plan.owner(flat + length - 1) == (rank, shard_off + length - 1)
        assert used.max(initial=0) <= 1
    for counts in owned:
        assert (counts == 1).all()
    # buckets_of_param brackets where the parameter lies.
    for i, (offset, numel, _) in enumerate(plan.params):
        first, last = plan.buckets_of_param(i)
        if numel == 0:
            assert (first, last) == (-1, -1)
        else:
            assert plan.buckets[first][0] <= offset < plan.buckets[first][1]
            assert plan.buckets[last][0] <= offset + numel - 1 < plan.buckets[last][1]


@settings(max_examples=300, deadline=None)
@given(
    numels=st.lists(st.integers(0, 5000), max_size=30),
    world=st.integers(1, 8),
    element_size=st.sampled_from([1, 2, 4, 8]),
    align_units=st.sampled_from([1, 2, 4, 16, 32]),
    bucket_bytes=st.integers(1, 200_000),
)
def test_plan_invariants(numels, world, element_size, align_units, bucket_bytes):
    alignment_bytes = align_units * element_size
    plan = FlatPlan(numels, world_size=world, element_size=element_size, alignment_bytes=alignment_bytes,
                    bucket_bytes=bucket_bytes)
    check_invariants(numels, plan, world, element_size, alignment_bytes, bucket_bytes)


def test_a_worked_example():
    # Three bf16 params, 16-byte alignment (8 elements), 2 ranks, 64-byte buckets (16 per rank).
    plan = FlatPlan([10, 3, 20], world_size=2, element_size=2, alignment_bytes=16, bucket_bytes=64)
    assert plan.params == [(0, 10, 6), (16, 3, 5), (24, 20, 4)]
    # 48 elements used: one full bucket of 2 x 16, then 16 left -> 2 x 8.
    assert plan.buckets == [(0, 32, 16, 0), (32, 48, 8, 16)]
    assert plan.total == 48 and plan.shard_size == 24
    assert plan.shard_slices(0) == [(0, 0, 0, 10), (2, 8, 16, 8)]
    assert plan.shard_slices(1) == [(1, 0, 0, 3), (2, 0, 8, 8), (2, 16, 16, 4)]


def test_empty_and_zero_sized():
    plan = FlatPlan([], world_size=4, element_size=4, alignment_bytes=64, bucket_bytes=1024)
    assert plan.total == 0 and plan.shard_size == 0 and plan.buckets == []
    plan = FlatPlan([0, 0], world_size=2, element_size=4, alignment_bytes=64, bucket_bytes=1024)
    assert plan.total == 0 and plan.buckets_of_param(1) == (-1, -1)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(world_size=0), ValueError, "'world_size' must be >= 1"),
        (dict(element_size=3), ValueError, "'element_size' must be 1, 2, 4 or 8"),
        (dict(alignment_bytes=3), ValueError, "'alignment_bytes' must be a positive multiple of element_size"),
        (dict(bucket_bytes=0), ValueError, "'bucket_bytes' must be >= 1"),
        (dict(world_size=2.0), TypeError, "'world_size' must be an int"),
    ],
)
def test_bad_options(kwargs, error, match):
    options = dict(world_size=2, element_size=2, alignment_bytes=16, bucket_bytes=1024)
    options.update(kwargs)
    with pytest.raises(error, match=match):
        FlatPlan([5, 6], **options)


def test_bad_queries():
    plan = FlatPlan([5], world_size=2, element_size=2, alignment_bytes=16, bucket_bytes=1024)
    with pytest.raises(ValueError, match="negative size"):
        FlatPlan([5, -1], world_size=2, element_size=2, alignment_bytes=16, bucket_bytes=1024)
    with pytest.raises(ValueError, match="'rank' must be in \\[0, 2\\)"):
        plan.shard_slices(2)
    with pytest.raises(ValueError, match="'flat_index' must be in"):
        plan.owner(plan.total)


@settings(max_examples=200, deadline=None)
@given(
    units=st.lists(st.lists(st.integers(0, 3000), max_size=6), max_size=8),
    world=st.integers(1, 5),
    bucket_bytes=st.integers(1, 40_000),
)
def test_units_start_buckets_and_no_bucket_spans_two(units, world, bucket_bytes):
    numels = [n for unit in units for n in unit]
    plan = FlatPlan(numels, world_size=world, element_size=4, alignment_bytes=64, bucket_bytes=bucket_bytes,
                    unit_sizes=[len(u) for u in units])
    check_invariants(numels, plan, world, 4, 64, bucket_bytes)
    unit_of_param = [u for u, unit in enumerate(units) for _ in unit]
    starts = {b.begin for b in plan.buckets}
    for u, unit in enumerate(units):
        first = sum(len(x) for x in units[:u])
        if sum(unit) > 0:
            assert plan.params[first].offset in starts  # a non-empty unit starts a bucket
    for b in plan.buckets:
        inside = {unit_of_param[i] for i, (offset, numel, _) in enumerate(plan.params)
                  if numel and offset < b.end and offset + numel > b.begin}
        assert len(inside) <= 1


def test_units_a_worked_example():
    # As test_a_worked_example, but the second parameter starts a unit: the
    # first unit's bucket ends after parameter 0 (2 x 8), and parameters 1 and 2
    # move up to 16 and 24 inside the second unit's buckets.
    plan = FlatPlan([10, 3, 20], world_size=2, element_size=2, alignment_bytes=16, bucket_bytes=64,
                    unit_sizes=[1, 2])
    assert plan.params == [(0, 10, 6), (16, 3, 5), (24, 20, 4)]
    assert plan.buckets == [(0, 16, 8, 0), (16, 48, 16, 8)]
    plan = FlatPlan([3, 10, 20], world_size=2, element_size=2, alignment_bytes=16, bucket_bytes=64,
                    unit_sizes=[1, 2])
    assert plan.params == [(0, 3, 13), (16, 10, 6), (32, 20, 12)]
    assert plan.buckets == [(0, 16, 8, 0), (16, 48, 16, 8), (48, 64, 8, 24)]
    with pytest.raises(ValueError, match="'unit_sizes' must add up to the number of parameters"):
        FlatPlan([3, 10], world_size=2, element_size=2, alignment_bytes=16, bucket_bytes=64, unit_sizes=[1])
    with pytest.raises(ValueError, match="'unit_sizes' must be >= 0"):
        FlatPlan([3, 10], world_size=2, element_size=2, alignment_bytes=16, bucket_bytes=64, unit_sizes=[3, -1])
