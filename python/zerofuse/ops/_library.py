"""The `zerofuse` torch.library namespace.

Ops are defined with torch.library.Library define/impl rather than
torch.library.custom_op: the latter wraps every call in extra Python layers
that cost more than a small kernel (measured in bench/op_overhead.py).
"""
import torch

LIBRARY = torch.library.Library("zerofuse", "DEF")


def define(schema: str, impl, fake, backward=None, setup_context=None):
    """Define zerofuse::<name> from `schema`, run by `impl` on CPU and CUDA
    tensors (the compiled core dispatches by device), shaped by `fake` under
    torch.compile / meta tensors, and differentiated by `backward`."""
    name = schema.split("(", 1)[0]
    LIBRARY.define(schema)
    LIBRARY.impl(name, impl, "CPU")
    LIBRARY.impl(name, impl, "CUDA")
    torch.library.register_fake(f"zerofuse::{name}", fake, lib=LIBRARY)
    if backward is not None:
        torch.library.register_autograd(f"zerofuse::{name}", backward, setup_context=setup_context, lib=LIBRARY)
    return getattr(torch.ops.zerofuse, name).default


def stream_of(tensor: torch.Tensor):
    """The stream argument for the core: torch's current stream for CUDA
    tensors (read here, where it is cheap), None for CPU."""
    if tensor.is_cuda:
        return torch.cuda.current_stream(tensor.device).cuda_stream
    return None
