"""The flat-buffer plan: where each parameter lives in one flat buffer, and
which part of it every data-parallel rank owns (see cpp/include/zerofuse/flat_plan.h)."""
from typing import NamedTuple

from . import _C


class ParamSlot(NamedTuple):
    offset: int   # first element in the flat buffer
    numel: int
    padding: int  # elements between this parameter's end and the next offset


class Bucket(NamedTuple):
    begin: int         # flat [begin, end); end - begin == world_size * chunk
    end: int
    chunk: int         # elements of each rank
    shard_offset: int  # where every rank's chunk lives in its shard


class ShardSlice(NamedTuple):
    """One rank's piece of one parameter."""

    param_index: int
    param_begin: int   # first element within the parameter
    shard_offset: int  # where the piece lives in the rank's shard
    length: int


class FlatPlan:
    """Layout of parameters in a flat buffer partitioned across `world_size` ranks.

    Parameters are placed in order at offsets aligned to `alignment_bytes`. The
    buffer is cut into buckets of about `bucket_bytes`; each bucket is split into
    `world_size` equal chunks, chunk r belonging to rank r, so buckets are
    contiguous for reduce-scatter/all-gather and every rank's shard has the same
    size.

    `unit_sizes` (counts of consecutive parameters, summing to their number)
    marks runs no bucket spans: each unit starts a new bucket, so gathering a
    unit's buckets gathers exactly its parameters (ZeRO-3 gathers one module
    at a time). Empty: one unit of all parameters.

    Attributes (all in elements): ``total``, ``shard_size``, ``alignment``,
    ``params`` (list of ParamSlot), ``buckets`` (list of Bucket).
    """

    def __init__(self, numels, *, world_size=1, element_size=2, alignment_bytes=256, bucket_bytes=500_000_000, unit_sizes=()):
        for name, value in (
            ("world_size", world_size),
            ("element_size", element_size),
            ("alignment_bytes", alignment_bytes),
            ("bucket_bytes", bucket_bytes),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"FlatPlan: '{name}' must be an int, got {type(value).__name__}")
        numels = [int(n) for n in numels]
        unit_sizes = [int(n) for n in unit_sizes]
        self._plan = _C.FlatPlan(
            numels,
            world_size=world_size,
            element_size=element_size,
            alignment_bytes=alignment_bytes,
            bucket_bytes=bucket_bytes,
            unit_sizes=unit_sizes,
        )
        # Cached: the plan never changes, and callers read these in loops.
        self.world_size = self._plan.world_size
        self.alignment = self._plan.alignment
        self.total = self._plan.total
        self.shard_size = self._plan.shard_size
        self.params = [ParamSlot(*p) for p in self._plan.params]
        self.buckets = [Bucket(*b) for b in self._plan.buckets]

    def owner(self, flat_index: int):
        """(rank, position in that rank's shard) of flat element `flat_index`."""
        return self._plan.owner(flat_index)

    def buckets_of_param(self, param_index: int):
        """(first, last) bucket a parameter's elements fall in; (-1, -1) if it is empty."""
        return self._plan.buckets_of_param(param_index)

    def shard_slices(self, rank: int):
        """The pieces of parameters rank `rank` owns, in shard order (ShardSlice)."""
        return [ShardSlice(*s) for s in self._plan.shard_slices(rank)]

    def __repr__(self):
        return (
            f"FlatPlan(params={len(self.params)}, world_size={self.world_size}, total={self.total}, "
            f"shard_size={self.shard_size}, buckets={len(self.buckets)})"
        )
