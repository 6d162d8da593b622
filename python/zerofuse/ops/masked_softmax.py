"""zerofuse.ops.masked_softmax: softmax(x * scale + mask) over the last
dimension in one pass (float32 math for any input dtype), the attention
probabilities for a mask the flash-style kernel does not take."""
from typing import Optional

import torch

from .. import _C
from ._library import check_same_device, define, honours_torch_function, stream_of

_FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)
_OP = "zerofuse.ops.masked_softmax"


def _check(x, mask, causal):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{_OP}: 'input' must be a torch.Tensor, got {type(x).__name__}")
    if not 1 <= x.dim() <= 4:
        raise ValueError(f"{_OP}: 'input' must have 1 to 4 dimensions ([..., rows, n]), got shape {list(x.shape)}")
    if x.dtype not in _FLOAT_TYPES and not (x.dtype == torch.float64 and x.device.type != "cuda"):
        raise TypeError(f"{_OP}: 'input' must be float32, float16 or bfloat16 (or float64 on the CPU), got {x.dtype}")
    if causal and x.dim() < 2:
        raise ValueError(f"{_OP}: causal masking needs 'input' of at least 2 dimensions, got shape {list(x.shape)}")
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{_OP}: 'mask' must be a torch.Tensor or None, got {type(mask).__name__}")
    allowed = (torch.bool, x.dtype, torch.float32)
    if mask.dtype not in allowed:
        raise TypeError(f"{_OP}: 'mask' must be bool (True = may attend) or an additive float mask in the input's "
                        f"dtype ({x.dtype}) or float32, got {mask.dtype}")
    check_same_device(_OP, [("input", x), ("mask", mask)])
    try:
        torch.broadcast_shapes(mask.shape, x.shape)
    except RuntimeError:
        ok = False
    else:
        ok = mask.dim() <= x.dim() and torch.broadcast_shapes(mask.shape, x.shape) == x.shape
    if not ok:
        raise ValueError(f"{_OP}: 'mask' of shape {list(mask.shape)} must broadcast to the input's shape "
                         f"{list(x.shape)}")


def _impl(x, mask, scale, causal):
    _check(x, mask, causal)
    x = x.contiguous()
    out = torch.empty_like(x)
    if mask is not None:
        mask = mask.expand(x.shape)  # stride 0 where broadcast: no copy
    _C.masked_softmax_forward(x, mask, scale, causal, out, stream_of(x))
    return out


def _fake(x, mask, scale, causal):
    _check(x, mask, causal)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _backward_impl(grad, out, scale):
    grad = grad.contiguous()
    grad_input = torch.empty_like(out)
    _C.masked_softmax_backward(grad, out, scale, grad_input, stream_of(out))
    return grad_input


masked_softmax_backward_op = define(
    "masked_softmax_backward(Tensor grad, Tensor out, float scale) -> Tensor",
    _backward_impl,
    lambda grad, out, scale: torch.empty_like(out),
)


def _setup(ctx, inputs, output):
    _, mask, scale, _ = inputs
    ctx.scale = scale
    ctx.mask_shape = None if mask is None else mask.shape
    ctx.mask_dtype = None if mask is None else mask.dtype
    ctx.save_for_backward(output)


def _backward(ctx, grad):
    (out,) = ctx.saved_tensors
    need_x, need_mask = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not need_mask:
        return masked_softmax_backward_op(grad, out, ctx.scale), None, None, None
    # A learned additive mask (a position bias) gets the gradient of the
    # softmax's input, summed over the dimensions it was broadcast along.
    dz = masked_softmax_backward_op(grad, out, 1.0)
    grad_mask = dz.to(ctx.mask_dtype).sum_to_size(ctx.mask_shape)
    return (dz * ctx.scale if need_x else None), grad_mask, None, None


masked_softmax_op = define(
    "masked_softmax(Tensor x, Tensor? mask, float scale, bool causal) -> Tensor", _impl, _fake, _backward, _setup
)


@honours_torch_function
def masked_softmax(
    x: torch.Tensor, mask: Optional[torch.Tensor] = None, *, scale: float = 1.0, causal: bool = False
) -> torch.Tensor:
    """torch.softmax(x * scale + mask, dim=-1) in one fused pass.

    mask: broadcastable to x; bool (True where an element may take part, as
    scaled_dot_product_attention's attn_mask) or added after scaling (x's
    dtype or float32, -inf excludes; it may require grad, as a learned
    position bias does).
    causal: element j of row i (i along dim -2) is excluded when j > i.
    A row with nothing left gives zeros, where torch gives NaN.
    """
    if mask is not None and isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.requires_grad:
        raise ValueError(f"{_OP}: a bool 'mask' cannot require grad")
    return masked_softmax_op(x, mask, float(scale), bool(causal))
