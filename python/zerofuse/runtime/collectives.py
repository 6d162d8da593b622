"""The flat-tensor collectives, by the names this torch has: torch 2.13
renamed reduce_scatter_tensor / all_gather_into_tensor to *_single (same
arguments) and deprecated the old names; torch 2.4 has only the old ones."""
import torch.distributed as dist

reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
