"""The `zerofuse` torch.library namespace.

Ops are defined with torch.library.Library define/impl rather than
torch.library.custom_op, and their autograd kernel is a plain
torch.autograd.Function rather than torch.library.register_autograd: both
generic wrappers cost more per call than a small kernel takes
(bench/op_overhead.py measures it). torch.library.opcheck checks that the
result is still a complete op: schema, fake kernel, autograd registration.
"""
import functools

import torch
from torch.overrides import handle_torch_function, has_torch_function

from .. import _torch_threads  # noqa: F401  (CPU kernels on torch's OpenMP team)

LIBRARY = torch.library.Library("zerofuse", "DEF")


def _requires_grad(args):
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def define(schema: str, impl, fake, backward=None, setup_context=None):
    """Define zerofuse::<name> from `schema`, run by `impl` on CPU and CUDA
    tensors (the compiled core dispatches by device), shaped by `fake` under
    torch.compile / meta tensors, and differentiated by `backward(ctx, *grads)`
    after `setup_context(ctx, inputs, output)` -- the contract of
    torch.library.register_autograd."""
    name = schema.split("(", 1)[0]
    LIBRARY.define(schema)
    LIBRARY.impl(name, impl, "CPU")
    LIBRARY.impl(name, impl, "CUDA")
    torch.library.register_fake(f"zerofuse::{name}", fake, lib=LIBRARY)
    op = getattr(torch.ops.zerofuse, name).default
    if backward is None:
        return op

    def forward(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            output = forward(*args)
            setup_context(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    Function.__name__ = Function.__qualname__ = f"{name}_autograd"

    def autograd_kernel(*args):
        # Without inputs that need gradients there is nothing to record.
        return Function.apply(*args) if _requires_grad(args) else forward(*args)

    LIBRARY.impl(name, autograd_kernel, "Autograd")
    return op


def check_same_device(op: str, tensors) -> None:
    """Every tensor of `tensors` ([(name, tensor or None)], the reference
    first) on the reference's device. Run before any kernel and in the fake
    kernels: a tensor on another device (meta, another GPU, CPU beside CUDA)
    would otherwise send the call to that device's kernel -- the fake one for
    meta, which returns uninitialised memory -- instead of raising as torch does."""
    ref_name, ref = tensors[0]
    for name, t in tensors[1:]:
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: '{name}' is on {t.device} but '{ref_name}' is on {ref.device}; "
                             "all tensor arguments must be on one device")


def stream_of(tensor: torch.Tensor):
    """The stream argument for the core: torch's current stream for CUDA
    tensors (read here, where it is cheap), None for CPU."""
    if tensor.is_cuda:
        return torch.cuda.current_stream(tensor.device).cuda_stream
    return None


def honours_torch_function(fn):
    """A public op that takes part in the __torch_function__ protocol as
    torch's own functions do: when an argument is a tensor subclass that
    overrides it, the subclass sees the call first, before any argument is
    checked. ZeRO-3's released parameters rely on it: one read outside its
    module's forward (a tied LM head passed to linear_cross_entropy) is
    gathered there instead of reaching the checks as an empty tensor."""
    @functools.wraps(fn)
    def op(*args, **kwargs):
        relevant = args + tuple(kwargs.values()) if kwargs else args
        if has_torch_function(relevant):
            return handle_torch_function(op, relevant, *args, **kwargs)
        return fn(*args, **kwargs)

    return op
