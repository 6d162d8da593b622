"""zerofuse.ops.layer_norm: LayerNorm over the trailing `normalized_shape`
dimensions, with the contract of torch.nn.functional.layer_norm."""
from typing import Optional, Sequence

import torch

from .. import _C
from ._library import check_same_device, define, honours_torch_function, stream_of


def _check(input, normalized_shape, weight, bias, op="zerofuse.ops.layer_norm"):
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}: 'input' must be a torch.Tensor, got {type(input).__name__}")
    n = len(normalized_shape)
    if n == 0:
        raise ValueError(f"{op}: 'normalized_shape' must name at least one dimension, got []")
    if input.dim() < n or list(input.shape[input.dim() - n:]) != list(normalized_shape):
        raise ValueError(
            f"{op}: 'normalized_shape' {list(normalized_shape)} must match the last dimensions of 'input' "
            f"{list(input.shape)}"
        )
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and list(p.shape) != list(normalized_shape):
            raise ValueError(f"{op}: '{name}' must have shape {list(normalized_shape)}, got {list(p.shape)}")
    check_same_device(op, [("input", input), ("weight", weight), ("bias", bias)])


def _stats_dtype(input):
    # float32 statistics, float64 for float64 input (CPU only) so gradcheck is exact.
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def _as_rows(t, normalized_shape):
    """The kernels normalise the last dimension; several normalised dimensions
    are one flattened last dimension (a view, made only in that case)."""
    if t is None or len(normalized_shape) == 1:
        return t
    return t.reshape(*t.shape[: t.dim() - len(normalized_shape)], -1)


def _forward_impl(input, normalized_shape, weight, bias, eps):
    _check(input, normalized_shape, weight, bias)
    x = _as_rows(input.contiguous(), normalized_shape)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    stats_shape = input.shape[: input.dim() - len(normalized_shape)]
    mean = torch.empty(stats_shape, dtype=_stats_dtype(input), device=input.device)
    rstd = torch.empty(stats_shape, dtype=_stats_dtype(input), device=input.device)
    _C.layer_norm_forward(x, _as_rows(weight, normalized_shape), _as_rows(bias, normalized_shape), eps, out,
                          mean, rstd, stream_of(input))
    return out.view(input.shape) if len(normalized_shape) > 1 else out, mean, rstd


def _forward_fake(input, normalized_shape, weight, bias, eps):
    _check(input, normalized_shape, weight, bias)
    stats = input.new_empty(input.shape[: input.dim() - len(normalized_shape)], dtype=_stats_dtype(input))
    return torch.empty_like(input, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


def _backward_impl(grad_out, input, normalized_shape, weight, bias, mean, rstd, output_mask):
    x = _as_rows(input.contiguous(), normalized_shape)
    dy = _as_rows(grad_out.contiguous(), normalized_shape)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    want_w = output_mask[1] and weight is not None
    want_b = output_mask[2] and bias is not None
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if want_w else None
    db = torch.empty_like(bias, memory_format=torch.contiguous_format) if want_b else None
    _C.layer_norm_backward(dy, x, _as_rows(weight, normalized_shape), mean, rstd, dx,
                           _as_rows(dw, normalized_shape), _as_rows(db, normalized_shape), stream_of(input))
    empty = input.new_empty(0)
    return (
        dx.view(input.shape) if len(normalized_shape) > 1 else dx,
        dw if want_w else empty,
        db if want_b else empty,
    )


def _backward_fake(grad_out, input, normalized_shape, weight, bias, mean, rstd, output_mask):
    empty = input.new_empty(0)
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if (output_mask[1] and weight is not None) else empty
    db = torch.empty_like(bias, memory_format=torch.contiguous_format) if (output_mask[2] and bias is not None) else empty
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


@honours_torch_function
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
