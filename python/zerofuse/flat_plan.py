"""The flat-buffer plan: where each parameter lives in one flat buffer, and
which part of it every data-parallel rank owns (see cpp/include/zerofuse/flat_plan.h)."""
from . import _C


class FlatPlan:
    """Layout of parameters in a flat buffer partitioned across `world_size` ranks.

    Parameters are placed in order at offsets aligned to `alignment_bytes`. The
    buffer is cut into buckets of about `bucket_bytes`; each bucket is split into
    `world_size` equal chunks, chunk r belonging to rank r, so buckets are
    contiguous for reduce-scatter/all-gather and every rank's shard has the same
    size.

    Attributes (all in elements): ``total``, ``shard_size``, ``alignment``,
    ``params`` (list of (offset, numel, padding)), ``buckets`` (list of
    (begin, end, chunk, shard_offset)).
    """

    def __init__(self, numels, *, world_size=1, element_size=2, alignment_bytes=256, bucket_bytes=500_000_000):
        for name, value in (
            ("world_size", world_size),
            ("element_size", element_size),
            ("alignment_bytes", alignment_bytes),
            ("bucket_bytes", bucket_bytes),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"FlatPlan: '{name}' must be an int, got {type(value).__name__}")
        numels = [int(n) for n in numels]
        self._plan = _C.FlatPlan(
            numels,
            world_size=world_size,
            element_size=element_size,
            alignment_bytes=alignment_bytes,
            bucket_bytes=bucket_bytes,
        )
        # Cached: the plan never changes, and callers read these in loops.
        self.world_size = self._plan.world_size
        self.alignment = self._plan.alignment
        self.total = self._plan.total
        self.shard_size = self._plan.shard_size
        self.params = self._plan.params
        self.buckets = self._plan.buckets

    def owner(self, flat_index: int):
        """(rank, position in that rank's shard) of flat element `flat_index`."""
        return self._plan.owner(flat_index)

    def buckets_of_param(self, param_index: int):
        """(first, last) bucket a parameter's elements fall in; (-1, -1) if it is empty."""
        return self._plan.buckets_of_param(param_index)

    def shard_slices(self, rank: int):
        """The pieces of parameters rank `rank` owns, in shard order, as
        (param_index, first element in the param, offset in the shard, length)."""
        return self._plan.shard_slices(rank)

    def __repr__(self):
        return (
            f"FlatPlan(params={len(self.params)}, world_size={self.world_size}, total={self.total}, "
            f"shard_size={self.shard_size}, buckets={len(self.buckets)})"
        )
