"""Per-call host overhead of exposing a kernel to torch: zerofuse's
torch.library.Library op with its own autograd.Function kernel, against the
same implementation wrapped by torch.library.custom_op + register_autograd,
on a tiny LayerNorm so the kernel's own time is negligible. Also the raw
binding, and its cost per tensor on the multi-tensor Adam path (148 x 4
tensors, GPT-2's count).

    python bench/op_overhead.py           # writes bench/results/cpu-op_overhead-<date>.json
"""
import argparse
from typing import List, Optional, Tuple

import torch

from zerofuse import _C
from zerofuse.ops import layer_norm as zf_layer_norm
from zerofuse.ops.layer_norm import _backward, _forward_fake, _forward_impl, _setup_context

from .common import case, compare_cpu, print_table, time_cpu, write_results


@torch.library.custom_op("zerofuse_bench::layer_norm", mutates_args=())
def _custom_layer_norm(
    input: torch.Tensor, normalized_shape: List[int], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    eps: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, mean, rstd = _forward_impl(input, normalized_shape, weight, bias, eps)
    return out, mean, rstd


_custom_layer_norm.register_fake(_forward_fake)
_custom_layer_norm.register_autograd(_backward, setup_context=_setup_context)


def custom_layer_norm(x, shape):
    return _custom_layer_norm(x, list(shape), None, None, 1e-5)[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None, help="results directory (default: bench/results in a checkout)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    x = torch.randn(2, 8)
    xg = x.clone().requires_grad_()
    peer_name = "same impl via torch.library.custom_op + register_autograd"
    results = {}
    ours, peer = compare_cpu(lambda: zf_layer_norm(xg, (8,)), lambda: custom_layer_norm(xg, (8,)), repeat=2000)
    results["call/layer_norm_2x8/requires_grad"] = case(ours, peer, peer_name, 0.0)
    with torch.no_grad():
        ours, peer = compare_cpu(lambda: zf_layer_norm(x, (8,)), lambda: custom_layer_norm(x, (8,)), repeat=2000)
        out, mean, rstd = torch.empty_like(x), torch.empty(2), torch.empty(2)
        raw = time_cpu(lambda: _C.layer_norm_forward(x, None, None, 1e-5, out, mean, rstd), repeat=2000)
        results["call/layer_norm_2x8/no_grad"] = case(ours, peer, peer_name, 0.0, raw_binding_ms=round(raw, 5))

        tensors = [torch.zeros(1) for _ in range(148)]
        kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, adam_w_mode=True,
                  bias_correction=True, step=1)
        multi = time_cpu(lambda: _C.adam_step_multi(tensors, tensors, tensors, tensors, **kw), repeat=200)
        single = time_cpu(lambda: _C.adam_step(tensors[0], tensors[0], tensors[0], tensors[0], **kw), repeat=2000)
    per_tensor_us = (multi - single) / (147 * 4) * 1e3
    print(f"multi-tensor Adam binding, 148 x 4 one-element tensors: {multi:.3f} ms ({per_tensor_us:.2f} us/tensor)")
    print_table(results)
    results["call/adam_step_multi_148x4_tensors/binding"] = {"zerofuse_ms": round(multi, 4),
                                                             "per_tensor_us": round(per_tensor_us, 3)}
    if not args.no_write:
        print("wrote", write_results("op_overhead", "cpu", results, args.out))


if __name__ == "__main__":
    main()
