"""FusedAdam: Adam/AdamW as a torch.optim.Optimizer whose update runs in one
compiled multi-tensor pass per parameter group."""
import math
from collections import defaultdict

import torch

from .. import _C
from ..ops._library import stream_of

_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_number(name, value, low, high=None, low_inclusive=True):
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"FusedAdam: '{name}' must be a number or a one-element tensor")
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"FusedAdam: '{name}' must be a number, got {type(value).__name__}")
    ok_low = value >= low if low_inclusive else value > low
    ok_high = high is None or value < high
    if not (math.isfinite(value) and ok_low and ok_high):
        bounds = f"{'[' if low_inclusive else '('}{low}, {high if high is not None else 'inf'})"
        raise ValueError(f"FusedAdam: '{name}' must be in {bounds}, got {value}")


def _learning_rate(lr, device):
    """(lr as a number, lr as a float64 tensor or None) for one kernel call.
    A tensor on the parameters' GPU stays there (the kernel reads it); any
    other lr is read on the host."""
    if isinstance(lr, torch.Tensor) and lr.device == device and device.type != "cpu":
        if lr.numel() != 1:
            raise ValueError(f"FusedAdam: 'lr' must be a number or a one-element tensor, got shape {list(lr.shape)}")
        return 0.0, lr if lr.dtype == torch.float64 else lr.to(torch.float64)
    return float(lr), None


class FusedAdam(torch.optim.Optimizer):
    """Adam (adam_w_mode=False: L2 weight decay added to the gradient, as
    torch.optim.Adam) or AdamW (adam_w_mode=True: decoupled weight decay, as
    torch.optim.AdamW), fused into one pass over parameters, gradients and
    state, over all tensors of a group at once.

    Parameters may be float32, float16 or bfloat16; the state has the
    parameters' dtype (as in torch) and all math is float32. State keys and
    state_dict() match torch's Adam/AdamW ("step", "exp_avg", "exp_avg_sq"),
    so checkpoints move between the two. Works with torch.optim.lr_scheduler.

    ``lr`` may be a one-element tensor, as torch's fused optimizers allow.
    One on the parameters' GPU is read by the kernel where it runs, so a step
    neither waits for the device nor bakes the value in: a schedule that
    writes the tensor in place (torch's lr_scheduler does) takes effect in a
    captured CUDA graph's next replay.
    """

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        adam_w_mode=True,
        bias_correction=True,
    ):
        _check_number("lr", lr, 0.0)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError(f"FusedAdam: 'betas' must be a pair of numbers, got {betas!r}")
        _check_number("betas[0]", betas[0], 0.0, 1.0)
        _check_number("betas[1]", betas[1], 0.0, 1.0)
        _check_number("eps", eps, 0.0, low_inclusive=False)
        _check_number("weight_decay", weight_decay, 0.0)
        for name, flag in (("adam_w_mode", adam_w_mode), ("bias_correction", bias_correction)):
            if not isinstance(flag, bool):
                raise TypeError(f"FusedAdam: '{name}' must be a bool, got {type(flag).__name__}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            adam_w_mode=adam_w_mode,
            bias_correction=bias_correction,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.dtype not in _PARAM_DTYPES:
                    raise TypeError(
                        f"FusedAdam: parameter {i} is {p.dtype}; FusedAdam takes float32, float16 and bfloat16"
                    )

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("adam_w_mode", True)
            group.setdefault("bias_correction", True)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # torch keeps "step" as a float tensor; the kernel wants an int.
        for state in self.state.values():
            if "step" in state and isinstance(state["step"], torch.Tensor):
                state["step"] = int(state["step"].item())

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    @staticmethod
    def _check_param(i, p):
        """Everything that could make the kernel refuse a tensor, checked before
        any state changes, so a bad parameter never leaves a half-done step."""
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError(f"FusedAdam: parameter {i} has a sparse gradient; FusedAdam takes dense ones")
        if p.dtype not in _PARAM_DTYPES:
            raise TypeError(f"FusedAdam: parameter {i} is {p.dtype}; FusedAdam takes float32, float16 and bfloat16")
        if grad.dtype != p.dtype:
            raise TypeError(f"FusedAdam: parameter {i} is {p.dtype} but its gradient is {grad.dtype}")
        if grad.shape != p.shape:
            raise ValueError(f"FusedAdam: parameter {i} has shape {list(p.shape)} but its gradient {list(grad.shape)}")
        if not p.is_contiguous():
            raise ValueError(f"FusedAdam: parameter {i} is not contiguous; FusedAdam updates dense parameters")

    def _step_group(self, group):
        with_grad = [(i, p) for i, p in enumerate(group["params"]) if p.grad is not None]
        for i, p in with_grad:
            self._check_param(i, p)

        # Tensors sharing a device, dtypes and step count go to the kernel together.
        batches = defaultdict(lambda: ([], [], [], []))
        for _, p in with_grad:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["step"] += 1
            key = (p.device, p.dtype, state["exp_avg"].dtype, state["step"])
            params, grads, exp_avgs, exp_avg_sqs = batches[key]
            params.append(p)
            grads.append(p.grad if p.grad.is_contiguous() else p.grad.contiguous())
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])

        beta1, beta2 = group["betas"]
        for (device, _dtype, _state_dtype, step), (params, grads, exp_avgs, exp_avg_sqs) in batches.items():
            lr, lr_tensor = _learning_rate(group["lr"], device)
            _C.adam_step_multi(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                None,
                lr=lr,
                lr_tensor=lr_tensor,
                beta1=float(beta1),
                beta2=float(beta2),
                eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]),
                adam_w_mode=group["adam_w_mode"],
                bias_correction=group["bias_correction"],
                step=step,
                stream=stream_of(params[0]),
            )
