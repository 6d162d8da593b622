"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms"),
the update of DeepSpeed's FusedLion, for the "Lion" config type:

    c = beta1 * m + (1 - beta1) * g
    p = p * (1 - lr * weight_decay) - lr * sign(c)
    m = beta2 * m + (1 - beta2) * g

Element-wise, so the engine runs it on its partitioned master shard. Where c
is exactly 0 (an unused parameter's first steps) the parameter does not move;
DeepSpeed's kernel moves it by +lr there.
"""
import torch


class Lion(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        if not lr >= 0.0:
            raise ValueError(f"Lion: 'lr' must be >= 0, got {lr}")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"Lion: 'betas' must be two numbers in [0, 1), got {betas!r}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Lion: 'weight_decay' must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

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
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                g = p.grad
                update = (m * beta1).add_(g, alpha=1.0 - beta1).sign_()
                p.mul_(1.0 - group["lr"] * group["weight_decay"]).add_(update, alpha=-group["lr"])
                m.mul_(beta2).add_(g, alpha=1.0 - beta2)
        return loss
