"""zerofuse.ops.layer_norm: LayerNorm over the trailing `normalized_shape`
dimensions, with the contract of torch.nn.functional.layer_norm."""
import math
from typing import Optional, Sequence

import torch

from .. import _C
from ._library import define, stream_of


def _check(input, normalized_shape, weight, bias, op="zerofuse.ops.layer_norm"):
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}: 'input' must be a torch.Tensor, got {type(input).__name__}")
    shape = tuple(normalized_shape)
    if len(shape) == 0:
        raise ValueError(f"{op}: 'normalized_shape' must name at least one dimension, got {list(shape)}")
    if input.dim() < len(shape) or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise ValueError(
            f"{op}: 'normalized_shape' {list(shape)} must match the last dimensions of 'input' "
            f"{list(input.shape)}"
        )
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != shape:
            raise ValueError(f"{op}: '{name}' must have shape {list(shape)}, got {list(p.shape)}")
    return shape


def _stats_dtype(input):
    # float32 statistics, float64 for float64 input (CPU only) so gradcheck is exact.
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def _rows_and_width(input, shape):
    width = math.prod(shape)
    return input.numel() // width if width else 0, width


def _forward_impl(input, normalized_shape, weight, bias, eps):
    shape = _check(input, normalized_shape, weight, bias)
    rows, width = _rows_and_width(input, shape)
    x = input.contiguous().view(rows, width)
    out = torch.empty_like(x)
    mean = torch.empty(rows, dtype=_stats_dtype(input), device=input.device)
    rstd = torch.empty(rows, dtype=_stats_dtype(input), device=input.device)
    _C.layer_norm_forward(
        x,
        None if weight is None else weight.reshape(width),
        None if bias is None else bias.reshape(width),
        eps,
        out,
        mean,
        rstd,
        stream_of(input),
    )
    return out.view(input.shape), mean, rstd


def _forward_fake(input, normalized_shape, weight, bias, eps):
    shape = _check(input, normalized_shape, weight, bias)
    rows, _ = _rows_and_width(input, shape)
    stats = input.new_empty(rows, dtype=_stats_dtype(input))
    return torch.empty_like(input, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


def _backward_impl(grad_out, input, normalized_shape, weight, bias, mean, rstd, output_mask):
    shape = tuple(normalized_shape)
    rows, width = _rows_and_width(input, shape)
    x = input.contiguous().view(rows, width)
    dy = grad_out.contiguous().view(rows, width)
    dx = torch.empty_like(x)
    want_w = output_mask[1] and weight is not None
    want_b = output_mask[2] and bias is not None
    dw = torch.empty(width, dtype=weight.dtype, device=input.device) if want_w else None
    db = torch.empty(width, dtype=bias.dtype, device=input.device) if want_b else None
    _C.layer_norm_backward(
        dy, x, None if weight is None else weight.reshape(width), mean, rstd, dx, dw, db, stream_of(input)
    )
    empty = input.new_empty(0)
    return (
        dx.view(input.shape),
        dw.view(shape) if want_w else empty,
        db.view(shape) if want_b else empty,
    )


def _backward_fake(grad_out, input, normalized_shape, weight, bias, mean, rstd, output_mask):
    empty = input.new_empty(0)
    dw = weight.new_empty(weight.shape) if (output_mask[1] and weight is not None) else empty
    db = bias.new_empty(bias.shape) if (output_mask[2] and bias is not None) else empty
    return torch.empty_like(input, memory_format=torch.contiguous_format), dw, db


layer_norm_backward_op = define(
    "layer_norm_backward(Tensor grad_out, Tensor input, SymInt[] normalized_shape, Tensor? weight, "
    "Tensor? bias, Tensor mean, Tensor rstd, bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
    _backward_impl,
    _backward_fake,
)


def _setup_context(ctx, inputs, output):
    input, normalized_shape, weight, bias, _eps = inputs
    _, mean, rstd = output
    ctx.normalized_shape = normalized_shape
    ctx.save_for_backward(input, weight, bias, mean, rstd)


def _backward(ctx, grad_out, _grad_mean, _grad_rstd):
    input, weight, bias, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw, db = layer_norm_backward_op(
        grad_out, input, ctx.normalized_shape, weight, bias, mean, rstd, [need[0], need[2], need[3]]
    )
    return (
        dx if need[0] else None,
        None,
        dw if (need[2] and weight is not None) else None,
        db if (need[3] and bias is not None) else None,
        None,
    )


layer_norm_op = define(
    "layer_norm(Tensor input, SymInt[] normalized_shape, Tensor? weight, Tensor? bias, float eps) "
    "-> (Tensor, Tensor, Tensor)",
    _forward_impl,
    _forward_fake,
    _backward,
    _setup_context,
)


def layer_norm(
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """LayerNorm over the last len(normalized_shape) dimensions, as
    torch.nn.functional.layer_norm: statistics in float32, output in the
    input's dtype; weight/bias may be the input's dtype or float32."""
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    return layer_norm_op(input, list(normalized_shape), weight, bias, float(eps))[0]
