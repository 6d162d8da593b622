"""zerofuse.ops.grad_stats: sum of squares and non-finite flag of many tensors
in one pass (what loss scaling and gradient clipping need)."""
from typing import Optional, Sequence

import torch

from .. import _C
from ._library import stream_of


def grad_stats(tensors: Sequence[torch.Tensor], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Returns a float32 tensor [sum of squares, 1.0 if any element is inf/NaN
    else 0.0] on the tensors' device. Both entries add across ranks, so the
    result can be all-reduced with SUM as it is."""
    tensors = list(tensors)
    if out is None:
        device = tensors[0].device if tensors else torch.device("cpu")
        out = torch.empty(2, dtype=torch.float32, device=device)
    _C.grad_stats(tensors, out, stream_of(out))
    return out
