"""Cross-entropy over logits split by vocabulary across the tensor-parallel
ranks, without gathering them: each rank reduces its [N, V/tp] slice to a
row max, a sum of exponentials and (for the rank holding it) the target's
logit; three all-reduces of [N] values combine them into the whole row's
log-sum-exp and loss. The gradient is each rank's slice of softmax - one-hot
(with label smoothing: softmax - (1 - e) one-hot - e / V), computed from the
saved log-sum-exp. Math in float32 for any logits dtype; equal to
F.cross_entropy on the gathered logits, ignore_index and label_smoothing
included.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .collectives import copy_to_tensor_parallel
from .layers import tp_rank, tp_world

_REDUCTIONS = ("mean", "sum", "none")


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, ignore_index, label_smoothing):
        z = logits.float()
        local = z.shape[-1]
        vocab = local * tp_world(group)
        start = tp_rank(group) * local
        row_max = z.max(dim=-1).values
        if group is not None:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        sum_exp = torch.exp(z - row_max[:, None]).sum(dim=-1)
        kept = target != ignore_index
        mine = kept & (target >= start) & (target < start + local)
        local_target = torch.where(mine, target - start, torch.zeros_like(target))
        target_logit = z.gather(1, local_target[:, None]).squeeze(1) * mine
        sums = torch.stack([sum_exp, target_logit, z.sum(dim=-1) if label_smoothing else torch.zeros_like(sum_exp)])
        if group is not None:
            dist.all_reduce(sums, group=group)  # one collective for the three row sums
        lse = row_max + torch.log(sums[0])
        loss = lse - (1.0 - label_smoothing) * sums[1] - label_smoothing * sums[2] / vocab
        loss = loss * kept
        ctx.save_for_backward(logits, lse, local_target, mine, kept)
        ctx.label_smoothing, ctx.vocab = label_smoothing, vocab
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        logits, lse, local_target, mine, kept = ctx.saved_tensors
        e = ctx.label_smoothing
        grad = torch.exp(logits.float() - lse[:, None])
        if e:
            grad -= e / ctx.vocab
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_target] -= (1.0 - e) * mine
        grad *= (grad_rows * kept)[:, None]
        return grad.to(logits.dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits, target, group, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """F.cross_entropy over the whole vocabulary, given this rank's slice
    `logits` [N, V/tp] (vocabulary rows [rank * V/tp, (rank + 1) * V/tp))."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError("vocab_parallel_cross_entropy: 'logits' must be a floating [N, V/tp] tensor")
    if not isinstance(target, torch.Tensor) or target.dtype != torch.int64 or target.shape != logits.shape[:1]:
        raise ValueError(f"vocab_parallel_cross_entropy: 'target' must be an int64 tensor of shape "
                         f"[{logits.shape[0]}]")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"vocab_parallel_cross_entropy: 'reduction' must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"vocab_parallel_cross_entropy: 'label_smoothing' must be in [0, 1], got {label_smoothing}")
    vocab = logits.shape[1] * tp_world(group)
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bool(bad.any()):
        raise ValueError(f"vocab_parallel_cross_entropy: a target is outside [0, {vocab}) and is not ignore_index")
    rows = _VocabParallelCrossEntropy.apply(logits, target, group, ignore_index, float(label_smoothing))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (target != ignore_index).sum()


def linear_vocab_parallel_cross_entropy(hidden, weight, target, group, bias=None, **kwargs):
    """The LM head (this rank's vocabulary rows of `weight`) and the loss: the
    hidden states enter as a column-parallel input (their gradient is summed
    over the ranks). Holds this rank's [N, V/tp] logits, not all V."""
    logits = F.linear(copy_to_tensor_parallel(hidden.reshape(-1, hidden.shape[-1]), group), weight, bias)
    return vocab_parallel_cross_entropy(logits, target.reshape(-1), group, **kwargs)
