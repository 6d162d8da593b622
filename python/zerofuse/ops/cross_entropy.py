"""zerofuse.ops.cross_entropy and linear_cross_entropy: softmax cross-entropy
over 2-D logits in one pass per row (float32 math for any input dtype), and
the language-model head + loss without ever holding all [N, V] logits."""
import math

import torch

from .. import _C
from ._library import check_same_device, define, honours_torch_function, stream_of

_REDUCTIONS = ("none", "mean", "sum")


def _check(logits, target, reduction, label_smoothing, op):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"{op}: 'logits' must be a 2-D tensor [N, V], got "
                         f"{list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: 'logits' must be float32, float16 or bfloat16, got {logits.dtype}")
    if not isinstance(target, torch.Tensor) or target.dtype != torch.int64 or tuple(target.shape) != (logits.shape[0],):
        raise ValueError(f"{op}: 'target' must be an int64 tensor of shape [{logits.shape[0]}], got "
                         f"{getattr(target, 'dtype', type(target).__name__)} {list(getattr(target, 'shape', []))}")
    check_same_device(op, [("logits", logits), ("target", target)])
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: 'reduction' must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"{op}: 'label_smoothing' must be in [0, 1], got {label_smoothing}")


def _reduce(rows, target, ignore_index, reduction):
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    # torch's mean: over the rows that are not ignored (0 / 0 = nan when none is left)
    return rows.sum() / (target != ignore_index).sum()


def _assert_targets_in_range(target, classes, ignore_index, op):
    """On the CPU the core checks every target before any work and raises a
    ValueError. On a GPU that check would stall the host, so, as torch's own
    cross_entropy does, a device-side assertion is queued instead: an invalid
    target fails the next CUDA call (and leaves the loss row NaN), without a sync."""
    if target.is_cuda and target.numel():
        valid = ((target >= 0) & (target < classes)) | (target == ignore_index)
        torch._assert_async(valid.all(), f"{op}: a target is outside [0, {classes}) and is not ignore_index "
                                         f"({ignore_index})")


# --- cross_entropy ---------------------------------------------------------------------------------


def _ce_impl(logits, target, ignore_index, label_smoothing, inplace_backward):
    check_same_device("zerofuse.ops.cross_entropy", [("logits", logits), ("target", target)])
    _assert_targets_in_range(target, logits.shape[1], ignore_index, "zerofuse.ops.cross_entropy")
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(loss)
    _C.cross_entropy_forward(logits, target, ignore_index, label_smoothing, loss, lse, stream_of(logits))
    return loss, lse


def _ce_fake(logits, target, ignore_index, label_smoothing, inplace_backward):
    check_same_device("zerofuse.ops.cross_entropy", [("logits", logits), ("target", target)])
    rows = logits.new_empty(logits.shape[0], dtype=torch.float32)
    return rows, torch.empty_like(rows)


def _ce_backward_impl(logits, target, lse, grad, ignore_index, label_smoothing):
    dlogits = torch.empty_like(logits)
    _C.cross_entropy_backward(logits, target, lse, grad, ignore_index, label_smoothing, dlogits, stream_of(logits))
    return dlogits


def _ce_backward_inplace_impl(logits, target, lse, grad, ignore_index, label_smoothing):
    _C.cross_entropy_backward(logits, target, lse, grad, ignore_index, label_smoothing, logits, stream_of(logits))


cross_entropy_backward_op = define(
    "cross_entropy_backward(Tensor logits, Tensor target, Tensor lse, Tensor grad, int ignore_index, "
    "float label_smoothing) -> Tensor",
    _ce_backward_impl,
    lambda logits, *rest: torch.empty_like(logits),
)
cross_entropy_backward_inplace_op = define(
    "cross_entropy_backward_(Tensor(a!) logits, Tensor target, Tensor lse, Tensor grad, int ignore_index, "
    "float label_smoothing) -> ()",
    _ce_backward_inplace_impl,
    lambda *args: None,
)


def _ce_setup(ctx, inputs, output):
    logits, target, ignore_index, label_smoothing, inplace_backward = inputs
    ctx.ignore_index, ctx.label_smoothing, ctx.inplace = ignore_index, label_smoothing, inplace_backward
    ctx.save_for_backward(logits, target, output[1])


def _ce_backward(ctx, grad_loss, _grad_lse):
    logits, target, lse = ctx.saved_tensors
    grad = grad_loss.float().contiguous()
    if ctx.inplace:  # the gradient replaces the logits: no second [N, V] buffer
        cross_entropy_backward_inplace_op(logits, target, lse, grad, ctx.ignore_index, ctx.label_smoothing)
        dlogits = logits
    else:
        dlogits = cross_entropy_backward_op(logits, target, lse, grad, ctx.ignore_index, ctx.label_smoothing)
    return dlogits, None, None, None, None


cross_entropy_op = define(
    "cross_entropy(Tensor logits, Tensor target, int ignore_index, float label_smoothing, bool inplace_backward) "
    "-> (Tensor, Tensor)",
    _ce_impl,
    _ce_fake,
    _ce_backward,
    _ce_setup,
)


@honours_torch_function
def cross_entropy(logits, target, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  inplace_backward=False):
    """torch.nn.functional.cross_entropy for 2-D logits [N, V] and class targets
    [N], computed in float32 whatever the logits' dtype (the loss is float32).
    inplace_backward=True lets the backward write the gradient over the logits
    (they must not be needed by anything else)."""
    _check(logits, target, reduction, label_smoothing, "zerofuse.ops.cross_entropy")
    rows, _ = cross_entropy_op(logits.contiguous(), target.contiguous(), int(ignore_index), float(label_smoothing),
                               bool(inplace_backward))
    return _reduce(rows, target, ignore_index, reduction)


# --- linear_cross_entropy ------------------------------------------------------------------------------

_CODES = {"none": 0, "mean": 1, "sum": 2}


# Logits smaller than this (counted at 4 bytes each) are computed in one piece: chunking saves little
# memory there and costs a matmul and kernel calls per chunk (a 2048 x 256 vocab
# in eight chunks ran at 0.73x F.linear + F.cross_entropy on the CPU).
_ONE_PIECE_BYTES = 16 << 20


def _default_chunk(n, num_classes):
    if n * num_classes * 4 <= _ONE_PIECE_BYTES:
        return max(1, n)
    # About an eighth of the rows' logits at a time, but none under the one-piece size.
    return max(1, math.ceil(n / 8), _ONE_PIECE_BYTES // (4 * num_classes))


def _chunks(n, chunk_size, num_classes):
    step = chunk_size if chunk_size > 0 else _default_chunk(n, num_classes)
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def _check_lce_devices(hidden, weight, target, bias):
    check_same_device("zerofuse.ops.linear_cross_entropy",
                      [("hidden", hidden), ("weight", weight), ("target", target), ("bias", bias)])


def _lce_forward_impl(hidden, weight, target, bias, ignore_index, reduction, chunk_size, compute_grad):
    """The loss (rows for 'none', else reduced), and (for mean/sum, when
    gradients are wanted) the gradients of that reduced loss, computed chunk by
    chunk while each chunk's logits exist."""
    _check_lce_devices(hidden, weight, target, bias)
    n, v = hidden.shape[0], weight.shape[0]
    device = hidden.device
    _assert_targets_in_range(target, v, ignore_index, "zerofuse.ops.linear_cross_entropy")
    loss = torch.empty(n, dtype=torch.float32, device=device)
    grads = compute_grad and reduction != 0
    dhidden = torch.empty_like(hidden) if grads else hidden.new_empty(0)
    chunks = _chunks(n, chunk_size, v)
    # One float32 chunk writes dweight whole; otherwise the chunks add into zeros.
    one_piece = len(chunks) == 1 and hidden.dtype == torch.float32
    new_dweight = torch.empty if one_piece else torch.zeros
    dweight = new_dweight(weight.shape, dtype=torch.float32, device=device) if grads else weight.new_empty(0)
    dbias = torch.zeros(v, dtype=torch.float32, device=device) if (grads and bias is not None) else weight.new_empty(0)
    # Rows not ignored, counted once for the mean and its gradient (a device scalar, no sync).
    counted = (target != ignore_index).sum().float().reshape(1) if reduction == 1 else None
    if grads:  # d(reduced loss)/d(loss row): 1, or 1 / (rows not ignored)
        scale = counted.reciprocal() if reduction == 1 else torch.ones(1, dtype=torch.float32, device=device)
    stream = stream_of(hidden)
    for s, e in chunks:
        h = hidden[s:e]
        logits = torch.nn.functional.linear(h, weight, bias)  # [chunk, V]: the only logits that exist
        lse = torch.empty(e - s, dtype=torch.float32, device=device)
        _C.cross_entropy_forward(logits, target[s:e], ignore_index, 0.0, loss[s:e], lse, stream)
        if grads:
            _C.cross_entropy_backward(logits, target[s:e], lse, scale, ignore_index, 0.0, logits, stream)
            torch.mm(logits, weight, out=dhidden[s:e])
            if one_piece:
                torch.mm(logits.t(), h, out=dweight)
            else:
                dweight.add_(torch.mm(logits.t(), h).float())
            if bias is not None:
                dbias.add_(logits.float().sum(0))
    if reduction == 1:
        loss = loss.sum() / counted[0]
    elif reduction == 2:
        loss = loss.sum()
    return loss, dhidden, dweight.to(weight.dtype) if grads else dweight, dbias.to(weight.dtype) if (
        grads and bias is not None) else dbias


def _lce_forward_fake(hidden, weight, target, bias, ignore_index, reduction, chunk_size, compute_grad):
    _check_lce_devices(hidden, weight, target, bias)
    grads = compute_grad and reduction != 0
    loss = hidden.new_empty(hidden.shape[0] if reduction == 0 else (), dtype=torch.float32)
    return (loss, torch.empty_like(hidden) if grads else hidden.new_empty(0),
            torch.empty_like(weight) if grads else weight.new_empty(0),
            weight.new_empty(weight.shape[0]) if (grads and bias is not None) else weight.new_empty(0))


def _lce_backward_impl(hidden, weight, target, bias, grad_rows, ignore_index, chunk_size):
    """reduction='none': per-row gradients, so the logits are recomputed chunk by chunk."""
    dhidden = torch.empty_like(hidden)
    dweight = torch.zeros(weight.shape, dtype=torch.float32, device=hidden.device)
    dbias = torch.zeros(weight.shape[0], dtype=torch.float32, device=hidden.device)
    stream = stream_of(hidden)
    for s, e in _chunks(hidden.shape[0], chunk_size, weight.shape[0]):
        h = hidden[s:e]
        logits = torch.nn.functional.linear(h, weight, bias)
        lse = torch.empty(e - s, dtype=torch.float32, device=hidden.device)
        scratch = torch.empty(e - s, dtype=torch.float32, device=hidden.device)
        _C.cross_entropy_forward(logits, target[s:e], ignore_index, 0.0, scratch, lse, stream)
        _C.cross_entropy_backward(logits, target[s:e], lse, grad_rows[s:e].contiguous(), ignore_index, 0.0, logits,
                                  stream)
        torch.mm(logits, weight, out=dhidden[s:e])
        dweight.add_(torch.mm(logits.t(), h).float())
        dbias.add_(logits.float().sum(0))
    return dhidden, dweight.to(weight.dtype), dbias.to(weight.dtype) if bias is not None else weight.new_empty(0)


linear_cross_entropy_backward_op = define(
    "linear_cross_entropy_backward(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, Tensor grad_rows, "
    "int ignore_index, int chunk_size) -> (Tensor, Tensor, Tensor)",
    _lce_backward_impl,
    lambda hidden, weight, target, bias, *rest: (
        torch.empty_like(hidden), torch.empty_like(weight),
        weight.new_empty(weight.shape[0]) if bias is not None else weight.new_empty(0)),
)


def _lce_setup(ctx, inputs, output):
    hidden, weight, target, bias, ignore_index, reduction, chunk_size, _ = inputs
    ctx.reduction, ctx.ignore_index, ctx.chunk_size, ctx.has_bias = reduction, ignore_index, chunk_size, bias is not None
    if reduction == 0:
        ctx.save_for_backward(hidden, weight, target, bias)
    else:
        ctx.save_for_backward(output[1], output[2], output[3])


def _lce_backward(ctx, grad_loss, *_):
    need = ctx.needs_input_grad
    if ctx.reduction == 0:
        hidden, weight, target, bias = ctx.saved_tensors
        dh, dw, db = linear_cross_entropy_backward_op(hidden, weight, target, bias, grad_loss.float(),
                                                      ctx.ignore_index, ctx.chunk_size)
    else:  # the forward computed the gradients of the reduced loss: scale them
        dh, dw, db = ctx.saved_tensors
        g = grad_loss.reshape(())
        dh, dw, db = dh * g.to(dh.dtype), dw * g.to(dw.dtype), db * g.to(db.dtype) if ctx.has_bias else None
    return (dh if need[0] else None, dw if need[1] else None, None,
            db if (ctx.has_bias and need[3]) else None, None, None, None, None)


linear_cross_entropy_op = define(
    "linear_cross_entropy(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, int ignore_index, "
    "int reduction, int chunk_size, bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor)",
    _lce_forward_impl,
    _lce_forward_fake,
    _lce_backward,
    _lce_setup,
)


@honours_torch_function
def linear_cross_entropy(hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean",
                         chunk_size=None):
    """cross_entropy(hidden @ weight.T + bias, target) for hidden [..., D],
    weight [V, D] and target [...], without the full [N, V] logits: rows go
    through the matmul, the loss and (for mean/sum) the gradients in chunks of
    `chunk_size` rows (default: all at once when the [N, V] logits would take
    under 16 MiB, else about an eighth of them). The loss is float32."""
    op = "zerofuse.ops.linear_cross_entropy"
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{op}: 'weight' must be [num_classes, hidden_size], got {list(getattr(weight, 'shape', []))}")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: 'hidden' must end in hidden_size {weight.shape[1]}, got "
                         f"{list(getattr(hidden, 'shape', []))}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{op}: 'hidden' ({hidden.dtype}) and 'weight' ({weight.dtype}) must share a dtype")
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or bias.dtype != weight.dtype):
        raise ValueError(f"{op}: 'bias' must be [{weight.shape[0]}] of {weight.dtype}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{op}: 'chunk_size' must be a positive int or None, got {chunk_size!r}")
    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    if not isinstance(target, torch.Tensor) or target.numel() != h2.shape[0]:
        raise ValueError(f"{op}: 'target' must have one class per row of 'hidden' ({h2.shape[0]}), got "
                         f"{list(getattr(target, 'shape', []))}")
    if target.dtype != torch.int64:
        raise TypeError(f"{op}: 'target' must be int64, got {target.dtype}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: 'reduction' must be one of {_REDUCTIONS}, got {reduction!r}")
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: 'hidden' must be float32, float16 or bfloat16, got {hidden.dtype}")
    _check_lce_devices(hidden, weight, target, bias)
    t = target.reshape(-1).contiguous()
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or
                                        (bias is not None and bias.requires_grad))
    rows = linear_cross_entropy_op(h2, weight, t, bias, int(ignore_index), _CODES[reduction], int(chunk_size or 0),
                                   grad)[0]
    return rows.view(target.shape) if reduction == "none" else rows
