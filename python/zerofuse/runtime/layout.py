"""Where every trainable parameter lives: the flat buffers and this rank's share.

Parameters are laid out last-to-first (the order backward produces their
gradients, so buckets fill one after another), grouped by optimizer param
group, in a FlatPlan. ZeRO-3 also names a unit for each parameter (the module
that gathers it): a unit's parameters are laid out together and start a new
bucket, so gathering a unit is gathering its buckets. From the plan this module derives, for this rank:
  - each parameter's flat range and the buckets it touches;
  - "runs": maximal pieces of the rank's shard that belong to one param group
    and one bucket chunk, so one Adam call per group covers them with
    contiguous views (padding inside a run is zero and stays zero).
"""
import bisect
from dataclasses import dataclass
from typing import List

import torch

from ..flat_plan import FlatPlan

ALIGNMENT_BYTES = 256  # every parameter and chunk starts 256-byte aligned (vector loads, NCCL)


@dataclass
class Slot:
    """A trainable parameter's place in the layout."""

    param: torch.nn.Parameter
    name: str
    group: int
    offset: int  # in the flat buffers
    numel: int
    shape: torch.Size
    first_bucket: int
    last_bucket: int


@dataclass
class Unit:
    """Parameters gathered and released together (ZeRO-3): slots
    [first_slot, end_slot), flat range [begin, end), buckets [first_bucket, end_bucket)."""

    key: object
    first_slot: int
    end_slot: int
    begin: int
    end: int
    first_bucket: int
    end_bucket: int

    @property
    def numel(self):
        return self.end - self.begin


@dataclass
class Run:
    """A piece of this rank's shard: [shard_begin, shard_end) of the shard
    buffers, [flat_begin, flat_end) of the flat buffers, all in one group."""

    group: int
    shard_begin: int
    shard_end: int
    flat_begin: int

    @property
    def flat_end(self):
        return self.flat_begin + (self.shard_end - self.shard_begin)


class FlatLayout:
    def __init__(self, named_params, group_of, partition_world: int, rank: int, element_size: int,
                 bucket_elements: int, unit_of=None):
        """named_params: [(name, param)] in model order; group_of: param id ->
        group index; partition_world: ranks the shards are split over (1 for
        ZeRO-0). ZeRO-3: unit_of: param id -> (unit key, persistent), persistent
        units placed at the end of their group. A parameter partitioned by
        zero.Init counts by its ds_numel and ds_shape (it holds no elements)."""
        # Group-major (persistent units last), and within that last-to-first.
        unit_of = unit_of or {}
        ordered = sorted(reversed(named_params),
                         key=lambda np_: (group_of[id(np_[1])], unit_of.get(id(np_[1]), (None, False))[1]))
        numels = [getattr(p, "ds_numel", None) or p.numel() for _, p in ordered]
        keys = [(group_of[id(p)], unit_of.get(id(p), (None, False))[0]) for _, p in ordered]
        unit_sizes = []
        for i, key in enumerate(keys):
            if i == 0 or key != keys[i - 1]:
                unit_sizes.append(0)
            unit_sizes[-1] += 1
        self.plan = FlatPlan(numels, world_size=partition_world, element_size=element_size,
                             alignment_bytes=ALIGNMENT_BYTES, bucket_bytes=bucket_elements * element_size,
                             unit_sizes=unit_sizes if unit_of else ())
        self.partition_world = partition_world
        self.rank = rank
        self.slots: List[Slot] = []
        for i, (name, p) in enumerate(ordered):
            offset, numel, _ = self.plan.params[i]
            first, last = self.plan.buckets_of_param(i)
            shape = getattr(p, "ds_shape", None) or p.shape
            self.slots.append(Slot(p, name, group_of[id(p)], offset, numel, shape, first, last))
        self.total = self.plan.total
        self.shard_size = self.plan.shard_size
        self.buckets = self.plan.buckets  # Bucket(begin, end, chunk, shard_offset)
        self.runs = self._runs()
        self.units: List[Unit] = self._units(keys, unit_sizes) if unit_of else []

    def _units(self, keys, unit_sizes) -> List[Unit]:
        begins = [b.begin for b in self.buckets]
        units, first = [], 0
        for size in unit_sizes:
            end_slot = first + size
            slots = self.slots[first:end_slot]
            begin = slots[0].offset
            end = slots[-1].offset + slots[-1].numel
            if end > begin:
                first_bucket = bisect.bisect_right(begins, begin) - 1
                end_bucket = bisect.bisect_left(begins, end)
                begin, end = self.buckets[first_bucket].begin, self.buckets[end_bucket - 1].end
            else:  # parameters without elements: nothing to gather
                first_bucket = end_bucket = bisect.bisect_left(begins, begin)
                end = begin
            units.append(Unit(keys[first], first, end_slot, begin, end, first_bucket, end_bucket))
            first = end_slot
        return units

    def chunk_range(self, bucket: int, rank: int = None):
        """Flat range of `rank`'s (default: this rank's) chunk of a bucket."""
        b = self.buckets[bucket]
        r = self.rank if rank is None else rank
        return b.begin + r * b.chunk, b.begin + (r + 1) * b.chunk

    def _runs(self) -> List[Run]:
        runs: List[Run] = []
        # Each bucket's chunk in the shard, to split runs at chunk boundaries.
        bucket_of_shard = [(b.shard_offset, b.shard_offset + b.chunk, i) for i, b in enumerate(self.buckets)]
        b_index = 0
        for piece in self.plan.shard_slices(self.rank):
            group = self.slots[piece.param_index].group
            shard_offset, end = piece.shard_offset, piece.shard_offset + piece.length
            while shard_offset < end:
                while bucket_of_shard[b_index][1] <= shard_offset:
                    b_index += 1
                chunk_lo, chunk_hi, b = bucket_of_shard[b_index]
                piece_end = min(end, chunk_hi)
                flat = self.chunk_range(b)[0] + (shard_offset - chunk_lo)
                last = runs[-1] if runs else None
                if last and last.group == group and flat - shard_offset == last.flat_begin - last.shard_begin:
                    # Same chunk (same shard-to-flat offset): extend over the padding
                    # between the two pieces (zero, and kept zero).
                    last.shard_end = piece_end
                else:
                    runs.append(Run(group, shard_offset, piece_end, flat))
                shard_offset = piece_end
        return runs

    def groups_of_runs(self, num_groups: int) -> List[List[Run]]:
        out = [[] for _ in range(num_groups)]
        for r in self.runs:
            out[r.group].append(r)
        return out
