"""LAMB (You et al., 2019) with the arithmetic of DeepSpeed's FusedLamb, as a
torch.optim.Optimizer, and the pieces of it the engine's sharded LAMB shares
(runtime/update_rules/lamb.py), so the two cannot drift apart.

Per parameter tensor, g its gradient:
    m = beta1 m + (1 - beta1) g,   v = beta2 v + (1 - beta2) g^2
    update = m / (sqrt(v) + eps) + weight_decay * p        (sqrt(v + eps) with eps_inside_sqrt)
    ratio  = clamp(|p| / |update|, min_coeff, max_coeff), or 1 when either norm is 0
    p -= lr * sqrt(1 - beta2^t) / (1 - beta1^t) * ratio * update   (lr alone without bias_correction)
"""
import math

import torch


def moments_and_update(p, g, m, v, beta1, beta2, eps, eps_inside_sqrt, weight_decay):
    """Advances m and v in place; returns the update direction (a new tensor)."""
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    denom = (v + eps).sqrt_() if eps_inside_sqrt else v.sqrt().add_(eps)
    update = m / denom
    if weight_decay:
        update.add_(p, alpha=weight_decay)
    return update


def trust_ratio(p_norm, update_norm, min_coeff, max_coeff):
    """Element-wise over tensors of norms (min/max: numbers or tensors alike)."""
    ratio = torch.minimum(torch.maximum(p_norm / update_norm.clamp_min(1e-45), torch.as_tensor(min_coeff)),
                          torch.as_tensor(max_coeff))
    return torch.where((p_norm > 0) & (update_norm > 0), ratio, torch.ones_like(ratio))


def step_size(lr, beta1, beta2, step, bias_correction):
    if not bias_correction:
        return lr
    return lr * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)


class Lamb(torch.optim.Optimizer):
    """DeepSpeed's FusedLamb (deepspeed.ops.lamb.FusedLamb) without a CUDA
    build: the same arguments and results, on any device, float32 math."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, eps_inside_sqrt=False,
                 weight_decay=0.0, max_grad_norm=0.0, max_coeff=10.0, min_coeff=0.01, amsgrad=False):
        if amsgrad:
            raise RuntimeError("Lamb: the AMSGrad variant is not supported (as in DeepSpeed's FusedLamb)")
        if max_grad_norm:
            raise ValueError("Lamb: 'max_grad_norm' is not supported; clip with the engine's gradient_clipping")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"Lamb: 'betas' must be two numbers in [0, 1), got {betas!r}")
        if not (eps > 0 and lr >= 0 and weight_decay >= 0 and 0 <= min_coeff <= max_coeff):
            raise ValueError("Lamb: need eps > 0, lr >= 0, weight_decay >= 0 and 0 <= min_coeff <= max_coeff")
        super().__init__(params, dict(lr=lr, bias_correction=bias_correction, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay, max_coeff=max_coeff, min_coeff=min_coeff,
                                      eps_inside_sqrt=eps_inside_sqrt))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                p32 = p.float()
                update = moments_and_update(p32, p.grad.float(), state["exp_avg"], state["exp_avg_sq"], beta1, beta2,
                                            group["eps"], group["eps_inside_sqrt"], group["weight_decay"])
                ratio = trust_ratio(p32.norm(), update.norm(), group["min_coeff"], group["max_coeff"])
                p32.sub_(update * ratio, alpha=step_size(group["lr"], beta1, beta2, state["step"],
                                                         group["bias_correction"]))
                p.copy_(p32)
        return loss
