"""Megatron-style tensor-parallel layers. Each rank holds a slice of the
weight; the collectives (collectives.py) make forward and backward equal to
the unsplit layer's.

    ColumnParallelLinear   output features split: y_r = x W_r^T + b_r; with
                           gather_output the slices are gathered into y
    RowParallelLinear      input features split: y = sum_r x_r W_r^T + b (the
                           sum is an all-reduce; the bias is added once, after it)
    VocabParallelEmbedding rows of the table split: each rank looks up the ids
                           in its range, zeros elsewhere, and the sum is an all-reduce

A Megatron MLP is ColumnParallelLinear -> activation -> RowParallelLinear:
one all-reduce forward and one backward. Sliced parameters carry
`tensor_model_parallel = True` and `partition_dim` (Megatron's attributes);
the rest are replicated (identical on every rank of the group), which the
engine uses to count each parameter once in the gradient norm. Every layer
can be built from the whole torch layer (`from_linear`, `from_embedding`), so
the split model starts exactly where the unsplit one does.
"""
import torch
import torch.nn.functional as F

from .collectives import (copy_to_tensor_parallel, gather_from_tensor_parallel, reduce_from_tensor_parallel,
                          scatter_to_tensor_parallel, tp_rank, tp_world)
from .whole import WholeSpec, local_from_whole


def _split(total: int, group, layer: str, what: str) -> int:
    world = tp_world(group)
    if total % world:
        raise ValueError(f"{layer}: {what} ({total}) is not divisible by the tensor-parallel size ({world})"
                         + ("; pad the vocabulary to a multiple of it" if "num_embeddings" in what else ""))
    return total // world


def _slice_of(whole: torch.Tensor, dim: int, group, splits=None) -> torch.nn.Parameter:
    """This rank's slice of a whole parameter, cut as whole.py says (the one
    cut checkpoints also use), with Megatron's marks and the cut recorded."""
    spec = WholeSpec(tuple(whole.shape), dim, None if splits is None else tuple(splits))
    param = torch.nn.Parameter(local_from_whole(whole.detach(), spec, tp_rank(group), tp_world(group)))
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.tp_whole = spec
    return param


class ColumnParallelLinear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, gather_output=False, group=None, device=None,
                 dtype=None, _whole=None):
        """_whole: (weight, bias or None, splits) of the whole layer to take this
        rank's slice of (default: a new nn.Linear's, initialised as torch does)."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.group = gather_output, group
        if _whole is None:
            full = torch.nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
            _whole = (full.weight, full.bias, None)
        weight, whole_bias, splits = _whole
        for part in splits or (out_features,):
            _split(part, group, "ColumnParallelLinear", "out_features")
        self.weight = _slice_of(weight, 0, group, splits)
        self.bias = _slice_of(whole_bias, 0, group, splits) if whole_bias is not None else None

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, group, gather_output=False):
        return cls(linear.in_features, linear.out_features, linear.bias is not None, gather_output, group,
                   _whole=(linear.weight, linear.bias, None))

    @classmethod
    def from_linears(cls, linears, group):
        """One layer computing several linears of the same input, each split
        by output features, its slices side by side: [q_r, k_r, v_r] for a
        fused QKV projection whose heads are split (one communication instead
        of three)."""
        first = linears[0]
        if any(l.in_features != first.in_features or (l.bias is None) != (first.bias is None) for l in linears):
            raise ValueError("ColumnParallelLinear.from_linears: the linears must share in_features, and all have a "
                             "bias or none")
        splits = [l.out_features for l in linears]
        bias = torch.cat([l.bias.detach() for l in linears]) if first.bias is not None else None
        return cls(first.in_features, sum(splits), bias is not None, False, group,
                   _whole=(torch.cat([l.weight.detach() for l in linears]), bias, splits))

    def forward(self, x):
        y = F.linear(copy_to_tensor_parallel(x, self.group), self.weight, self.bias)
        return gather_from_tensor_parallel(y, self.group) if self.gather_output else y

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features} (1/{tp_world(self.group)} here)"


class RowParallelLinear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, input_is_parallel=True, group=None, device=None,
                 dtype=None, _full=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.group = input_is_parallel, group
        _split(in_features, group, "RowParallelLinear", "in_features")
        full = _full if _full is not None else torch.nn.Linear(in_features, out_features, bias=bias, device=device,
                                                                 dtype=dtype)
        self.weight = _slice_of(full.weight, 1, group)
        self.bias = torch.nn.Parameter(full.bias.detach().clone()) if bias else None  # replicated

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, group, input_is_parallel=True):
        return cls(linear.in_features, linear.out_features, linear.bias is not None, input_is_parallel, group,
                   _full=linear)

    def forward(self, x):
        if not self.input_is_parallel:
            x = scatter_to_tensor_parallel(x, self.group)
        y = reduce_from_tensor_parallel(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return f"in_features={self.in_features} (1/{tp_world(self.group)} here), out_features={self.out_features}"


class VocabParallelEmbedding(torch.nn.Module):
    def __init__(self, num_embeddings, embedding_dim, group=None, padding_idx=None, device=None, dtype=None,
                 _full=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.group = num_embeddings, embedding_dim, group
        self.padding_idx = padding_idx  # its row gets no gradient, as in torch.nn.Embedding
        local = _split(num_embeddings, group, "VocabParallelEmbedding", "num_embeddings")
        self.vocab_start = tp_rank(group) * local
        self.vocab_end = self.vocab_start + local
        full = _full if _full is not None else torch.nn.Embedding(num_embeddings, embedding_dim, device=device,
                                                                    dtype=dtype)
        self.weight = _slice_of(full.weight, 0, group)

    @classmethod
    def from_embedding(cls, embedding: torch.nn.Embedding, group):
        if embedding.max_norm is not None or embedding.sparse:
            raise ValueError("VocabParallelEmbedding.from_embedding: max_norm and sparse embeddings are not supported")
        return cls(embedding.num_embeddings, embedding.embedding_dim, group, embedding.padding_idx, _full=embedding)

    def forward(self, ids):
        pad = self.padding_idx
        local_pad = pad - self.vocab_start if pad is not None and self.vocab_start <= pad < self.vocab_end else None
        if tp_world(self.group) == 1:
            return F.embedding(ids, self.weight, padding_idx=local_pad)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = torch.where(outside, torch.zeros_like(ids), ids - self.vocab_start)
        # Ids of other ranks look up row 0 and are zeroed: they add nothing to any gradient.
        out = F.embedding(local, self.weight, padding_idx=local_pad).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel(out, self.group)

    def extra_repr(self):
        return (f"{self.num_embeddings}, {self.embedding_dim} (rows [{self.vocab_start}, {self.vocab_end}) here)")
