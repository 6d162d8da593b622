"""zerofuse.ops.bias_gelu: gelu(x + bias) in one pass, forward and backward."""
import torch

from .. import _C
from ._library import check_same_device, define, honours_torch_function, stream_of

_APPROXIMATIONS = ("none", "tanh")


def _check(x, bias, approximate, op="zerofuse.ops.bias_gelu"):
    if approximate not in _APPROXIMATIONS:
        raise ValueError(f"{op}: 'approximate' must be 'none' or 'tanh', got {approximate!r}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{op}: 'input' must be a tensor with at least one dimension")
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (x.shape[-1],):
        raise ValueError(f"{op}: 'bias' must have shape [{x.shape[-1]}] (the input's last dimension), got "
                         f"{list(getattr(bias, 'shape', []))}")
    check_same_device(op, [("input", x), ("bias", bias)])


def _impl(x, bias, approximate):
    _check(x, bias, approximate)
    x = x.contiguous()
    out = torch.empty_like(x)
    _C.bias_gelu_forward(x, bias.contiguous(), approximate, out, stream_of(x))
    return out


def _fake(x, bias, approximate):
    _check(x, bias, approximate)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _backward_impl(grad, x, bias, approximate, want_bias):
    x = x.contiguous()
    dx = torch.empty_like(x)
    db = torch.empty_like(bias) if want_bias else None
    _C.bias_gelu_backward(grad.contiguous(), x, bias.contiguous(), approximate, dx, db, stream_of(x))
    return dx, db if want_bias else bias.new_empty(0)


bias_gelu_backward_op = define(
    "bias_gelu_backward(Tensor grad, Tensor x, Tensor bias, str approximate, bool want_bias) -> (Tensor, Tensor)",
    _backward_impl,
    lambda grad, x, bias, approximate, want_bias: (torch.empty_like(x, memory_format=torch.contiguous_format),
                                                  torch.empty_like(bias) if want_bias else bias.new_empty(0)),
)


def _setup(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.approximate = approximate
    ctx.save_for_backward(x, bias)


def _backward(ctx, grad):
    x, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, db = bias_gelu_backward_op(grad, x, bias, ctx.approximate, bool(need[1]))
    return dx if need[0] else None, db if need[1] else None, None


bias_gelu_op = define("bias_gelu(Tensor x, Tensor bias, str approximate) -> Tensor", _impl, _fake, _backward, _setup)


@honours_torch_function
def bias_gelu(x, bias, approximate="tanh"):
    """torch.nn.functional.gelu(x + bias, approximate=...) with the add fused in:
    one read of x per pass; bias may be x's dtype or float32."""
    return bias_gelu_op(x, bias, approximate)
