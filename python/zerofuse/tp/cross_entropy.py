"""Cross-entropy over logits split by vocabulary across the tensor-parallel
ranks, without gathering them. zerofuse's loss kernel runs on each rank's
[N, V/tp] slice (one pass: the slice's log-sum-exp and its share of the
target terms, zerofuse/cross_entropy.h); two all-reduces of [N] values (the
row max of the slices' log-sum-exps, then one sum of both rescaled values)
give the whole row's log-sum-exp and loss. The backward is the same kernel's,
with the whole row's log-sum-exp: each rank's slice of softmax - (1 - e)
one-hot - e / V. Float32 math for any logits dtype; equal to F.cross_entropy
on the gathered logits, ignore_index and label_smoothing included.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import _C
from ..ops._library import stream_of
from ..ops.cross_entropy import _assert_targets_in_range, _check, _reduce
from ..runtime.comms_log import COMMS_LOG
from .collectives import copy_to_tensor_parallel
from .layers import tp_rank, tp_world


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, ignore_index, label_smoothing):
        logits = logits.contiguous()
        local = logits.shape[-1]
        vocab, start = local * tp_world(group), tp_rank(group) * local
        slice_args = dict(vocab_start=start, vocab_total=vocab)
        # zerofuse's loss kernel on this slice: its log-sum-exp, and its share of the target terms.
        share = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(share)
        _C.cross_entropy_forward(logits, target, ignore_index, label_smoothing, share, lse, stream_of(logits),
                                 **slice_args)
        if group is not None:  # the row's log-sum-exp from the slices': max, then one sum of both row values
            row_max = lse.clone()
            COMMS_LOG.record("all_reduce", row_max.numel() * 4)
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
            sums = torch.stack([torch.exp(lse - row_max), share])
            COMMS_LOG.record("all_reduce", sums.numel() * 4)
            dist.all_reduce(sums, group=group)
            lse, share = row_max + torch.log(sums[0]), sums[1]
        loss = (lse + share) * (target != ignore_index)
        ctx.save_for_backward(logits, target, lse)
        ctx.args = (ignore_index, label_smoothing, slice_args)
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        logits, target, lse = ctx.saved_tensors
        ignore_index, label_smoothing, slice_args = ctx.args
        grad = torch.empty_like(logits)
        _C.cross_entropy_backward(logits, target, lse, grad_rows.float().contiguous(), ignore_index, label_smoothing,
                                  grad, stream_of(logits), **slice_args)
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(logits, target, group, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """F.cross_entropy over the whole vocabulary, given this rank's slice
    `logits` [N, V/tp] (vocabulary rows [rank * V/tp, (rank + 1) * V/tp))."""
    op = "vocab_parallel_cross_entropy"
    _check(logits, target, reduction, label_smoothing, op)  # zerofuse.ops.cross_entropy's checks
    # On the CPU the kernel checks every target against the whole vocabulary; on CUDA an assertion is queued.
    _assert_targets_in_range(target, logits.shape[1] * tp_world(group), ignore_index, op)
    rows = _VocabParallelCrossEntropy.apply(logits, target, group, ignore_index, float(label_smoothing))
    return _reduce(rows, target, ignore_index, reduction)


def linear_vocab_parallel_cross_entropy(hidden, weight, target, group, bias=None, **kwargs):
    """The LM head (this rank's vocabulary rows of `weight`) and the loss: the
    hidden states enter as a column-parallel input (their gradient is summed
    over the ranks). Holds this rank's [N, V/tp] logits, not all V."""
    logits = F.linear(copy_to_tensor_parallel(hidden.reshape(-1, hidden.shape[-1]), group), weight, bias)
    return vocab_parallel_cross_entropy(logits, target.reshape(-1), group, **kwargs)
