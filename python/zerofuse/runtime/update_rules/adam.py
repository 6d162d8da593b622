"""Adam/AdamW: the fused kernel, one call per param group, reading the step's
decision (skip flag, gradient multiplier, step count) on the device, so a step
never waits for it. Also writes the model-dtype copies (mixed precision)."""
import torch

from ... import _C
from ...ops._library import stream_of

HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay", "adam_w_mode", "bias_correction")


class AdamRule:
    hyperparameters = HYPERPARAMETERS
    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, optimizer):
        self.optimizer = optimizer
        shard_size, device = optimizer.layout.shard_size, optimizer.placement.device
        self.state = {name: torch.zeros(shard_size, dtype=torch.float32, device=device) for name in self.state_names}
        self.views = [{name: [self.state[name][r.shard_begin:r.shard_end] for r in runs] for name in self.state_names}
                      for runs in optimizer.runs_of_group]

    @torch.no_grad()
    def step(self, control):
        opt = self.optimizer
        stream = stream_of(control.stats)
        for group, views, state in zip(opt.param_groups, opt.group_views, self.views):
            if not views["params"]:
                continue
            beta1, beta2 = group["betas"]
            _C.adam_step_multi(
                views["params"], views["grads"], state["exp_avg"], state["exp_avg_sq"],
                views["copies"] if opt.mixed else None,
                lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]), adam_w_mode=bool(group["adam_w_mode"]),
                bias_correction=bool(group["bias_correction"]), step=1, step_tensor=control.applied_count,
                grad_multiplier=control.grad_multiplier, skip_if_nonzero=control.skip_flag, stream=stream)

    def state_tensors(self):
        return dict(self.state)

    @torch.no_grad()
    def load_state_tensors(self, tensors):
        for name in self.state_names:
            self.state[name].copy_(tensors[name])

    def reset(self):
        for t in self.state.values():
            t.zero_()
