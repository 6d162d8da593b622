"""Where every trainable parameter lives: the flat buffers and this rank's share.

Parameters are laid out last-to-first (the order backward produces their
gradients, so buckets fill one after another), grouped by optimizer param
group, in a FlatPlan. From the plan this module derives, for this rank:
  - each parameter's flat range and the buckets it touches;
  - "runs": maximal pieces of the rank's shard that belong to one param group
    and one bucket chunk, so one Adam call per group covers them with
    contiguous views (padding inside a run is zero and stays zero).
"""
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
                 bucket_elements: int):
        """named_params: [(name, param)] in model order; group_of: param -> group
        index; partition_world: ranks the shards are split over (1 for ZeRO-0)."""
        # Group-major, and within a group last-to-first.
        ordered = sorted(reversed(named_params), key=lambda np_: group_of[id(np_[1])])
        numels = [p.numel() for _, p in ordered]
        self.plan = FlatPlan(numels, world_size=partition_world, element_size=element_size,
                             alignment_bytes=ALIGNMENT_BYTES, bucket_bytes=bucket_elements * element_size)
        self.partition_world = partition_world
        self.rank = rank
        self.slots: List[Slot] = []
        for i, (name, p) in enumerate(ordered):
            offset, numel, _ = self.plan.params[i]
            first, last = self.plan.buckets_of_param(i)
            self.slots.append(Slot(p, name, group_of[id(p)], offset, numel, p.shape, first, last))
        self.total = self.plan.total
        self.shard_size = self.plan.shard_size
        self.buckets = self.plan.buckets  # Bucket(begin, end, chunk, shard_offset)
        self.runs = self._runs()

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
