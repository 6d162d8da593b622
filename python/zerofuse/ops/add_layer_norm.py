"""zerofuse.ops.add_layer_norm: the pre-LN transformer's residual stream --
sum = x + residual and LayerNorm(sum) -- in one pass forward and one backward."""
import torch

from .. import _C
from ._library import check_same_device, define, honours_torch_function, stream_of
from .layer_norm import _as_rows, _check, _stats_dtype


_OP = "zerofuse.ops.add_layer_norm"


def _check_inputs(x, residual, normalized_shape, weight, bias):
    _check(x, normalized_shape, weight, bias, _OP)
    if not isinstance(residual, torch.Tensor) or residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"{_OP}: 'residual' must match 'x' ({x.dtype} {list(x.shape)}), got "
                         f"{getattr(residual, 'dtype', type(residual).__name__)} {list(getattr(residual, 'shape', []))}")
    check_same_device(_OP, [("x", x), ("residual", residual)])


def _impl(x, residual, normalized_shape, weight, bias, eps):
    _check_inputs(x, residual, normalized_shape, weight, bias)
    xs = _as_rows(x.contiguous(), normalized_shape)
    rs = _as_rows(residual.contiguous(), normalized_shape)
    total = torch.empty_like(xs, memory_format=torch.contiguous_format)
    out = torch.empty_like(xs, memory_format=torch.contiguous_format)
    stats_shape = x.shape[: x.dim() - len(normalized_shape)]
    mean = torch.empty(stats_shape, dtype=_stats_dtype(x), device=x.device)
    rstd = torch.empty_like(mean)
    _C.add_layer_norm_forward(xs, rs, _as_rows(weight, normalized_shape), _as_rows(bias, normalized_shape), eps,
                              total, out, mean, rstd, stream_of(x))
    return out.view(x.shape), total.view(x.shape), mean, rstd


def _fake(x, residual, normalized_shape, weight, bias, eps):
    _check_inputs(x, residual, normalized_shape, weight, bias)
    stats = x.new_empty(x.shape[: x.dim() - len(normalized_shape)], dtype=_stats_dtype(x))
    like = torch.empty_like(x, memory_format=torch.contiguous_format)
    return like, torch.empty_like(like), stats, torch.empty_like(stats)


def _backward_impl(grad_out, grad_sum, total, normalized_shape, weight, bias, mean, rstd, output_mask):
    rows = lambda t: _as_rows(t.contiguous(), normalized_shape)  # noqa: E731
    want_w = output_mask[1] and weight is not None
    want_b = output_mask[2] and bias is not None
    dsum = torch.empty_like(total, memory_format=torch.contiguous_format)
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if want_w else None
    db = torch.empty_like(bias, memory_format=torch.contiguous_format) if want_b else None
    _C.add_layer_norm_backward(rows(grad_out), rows(grad_sum), rows(total), _as_rows(weight, normalized_shape), mean,
                               rstd, rows(dsum), _as_rows(dw, normalized_shape), _as_rows(db, normalized_shape),
                               stream_of(total))
    empty = total.new_empty(0)
    return dsum, dw if want_w else empty, db if want_b else empty


def _backward_fake(grad_out, grad_sum, total, normalized_shape, weight, bias, mean, rstd, output_mask):
    empty = total.new_empty(0)
    dw = torch.empty_like(weight) if (output_mask[1] and weight is not None) else empty
    db = torch.empty_like(bias) if (output_mask[2] and bias is not None) else empty
    return torch.empty_like(total, memory_format=torch.contiguous_format), dw, db


add_layer_norm_backward_op = define(
    "add_layer_norm_backward(Tensor grad_out, Tensor grad_sum, Tensor sum, SymInt[] normalized_shape, "
    "Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
    _backward_impl,
    _backward_fake,
)


def _setup(ctx, inputs, output):
    x, residual, normalized_shape, weight, bias, eps = inputs
    _, total, mean, rstd = output
    ctx.normalized_shape = normalized_shape
    ctx.save_for_backward(total, weight, bias, mean, rstd)


def _backward(ctx, grad_out, grad_sum, _gm, _gr):
    total, weight, bias, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    if grad_sum is None:
        grad_sum = torch.zeros_like(total)
    dsum, dw, db = add_layer_norm_backward_op(grad_out, grad_sum, total, ctx.normalized_shape, weight, bias, mean,
                                              rstd, [need[0] or need[1], need[3], need[4]])
    return (dsum if need[0] else None, dsum if need[1] else None, None,
            dw if (need[3] and weight is not None) else None, db if (need[4] and bias is not None) else None, None)


add_layer_norm_op = define(
    "add_layer_norm(Tensor x, Tensor residual, SymInt[] normalized_shape, Tensor? weight, Tensor? bias, float eps) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    _impl,
    _fake,
    _backward,
    _setup,
)


@honours_torch_function
def add_layer_norm(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5):
    """(LayerNorm(x + residual), x + residual): the sum is rounded to x's dtype
    and normalised as it is stored, as the unfused two steps would."""
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    out, total, _, _ = add_layer_norm_op(x, residual, list(normalized_shape), weight, bias, float(eps))
    return out, total
