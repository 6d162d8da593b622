"""How a tensor-parallel parameter's slice is cut from the whole model's
parameter, and how the whole is put back together -- what lets checkpoints
name everything by the whole model and load at any tensor-parallel size.

    WholeSpec(shape, dim, splits, transposed)
      shape       the whole parameter's shape, as the unsplit model holds it
      transposed  the whole is stored transposed (GPT-2's Conv1D [in, out]);
                  the cut below applies to its transpose
      splits      sizes along `dim` of parts that are each split on their own
                  (a fused q|k|v projection: three parts, each split by heads);
                  None: one part
      dim         the dimension the part(s) are split along
    rank r of n holds cat_k(part_k.chunk(n, dim)[r], dim).
"""
from typing import List, NamedTuple, Optional, Tuple

import torch


class WholeSpec(NamedTuple):
    shape: Tuple[int, ...]
    dim: int
    splits: Optional[Tuple[int, ...]] = None
    transposed: bool = False

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dim": self.dim,
                "splits": None if self.splits is None else list(self.splits), "transposed": self.transposed}

    @classmethod
    def from_json(cls, d: dict) -> "WholeSpec":
        return cls(tuple(d["shape"]), int(d["dim"]), None if d.get("splits") is None else tuple(d["splits"]),
                   bool(d.get("transposed", False)))


def local_from_whole(whole: torch.Tensor, spec: WholeSpec, rank: int, world: int) -> torch.Tensor:
    w = whole.t() if spec.transposed else whole
    parts = w.split(list(spec.splits), spec.dim) if spec.splits else [w]
    return torch.cat([p.chunk(world, spec.dim)[rank] for p in parts], spec.dim).contiguous()


def whole_from_locals(locals_: List[torch.Tensor], spec: WholeSpec) -> torch.Tensor:
    world = len(locals_)
    if spec.splits:
        pieces = [t.split([s // world for s in spec.splits], spec.dim) for t in locals_]
        w = torch.cat([torch.cat([pieces[r][k] for r in range(world)], spec.dim) for k in range(len(spec.splits))],
                      spec.dim)
    else:
        w = torch.cat(locals_, spec.dim)
    return (w.t() if spec.transposed else w).contiguous()


def spec_of(param) -> Optional[WholeSpec]:
    return getattr(param, "tp_whole", None)
