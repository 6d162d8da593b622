"""LAMB with DeepSpeed FusedLamb's arithmetic (zerofuse.optim.lamb, whose
pieces this uses), on a partitioned shard.

The trust ratio needs the norms of whole parameters (|p| and |update|).
The norms are of whole parameters, whose pieces live on several ranks: each
rank sums the squares of its pieces per parameter, and one all-reduce of those
two short vectors gives every rank the full norms -- the parameters themselves
are never gathered.

The skip decision and the gradient multiplier are read on the host (one wait
for the device per step; the fused Adam rule has none).
"""
import torch
import torch.distributed as dist

from ...optim import lamb

HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay", "bias_correction", "max_coeff", "min_coeff",
                   "eps_inside_sqrt")


class LambRule:
    hyperparameters = HYPERPARAMETERS
    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, optimizer):
        self.optimizer = optimizer
        layout = optimizer.layout
        device = optimizer.placement.device
        self.state = {name: torch.zeros(layout.shard_size, dtype=torch.float32, device=device)
                      for name in self.state_names}
        self.num_params = len(layout.slots)
        # For every element of the shard, the parameter it belongs to (padding:
        # an extra index past the last, which nothing reads).
        owner = torch.full((layout.shard_size,), self.num_params, dtype=torch.int64)
        for piece in layout.plan.shard_slices(layout.rank):
            owner[piece.shard_offset:piece.shard_offset + piece.length] = piece.param_index
        owner = owner.to(device)
        self.runs = [[(r, owner[r.shard_begin:r.shard_end]) for r in runs] for runs in optimizer.runs_of_group]
        self.group_of_param = torch.tensor([slot.group for slot in layout.slots] + [0], dtype=torch.int64)

    @torch.no_grad()
    def step(self, control):
        skip, multiplier, step = control.decision_on_host()
        if skip:
            return
        opt = self.optimizer
        device = opt.placement.device
        sums = torch.zeros(2, self.num_params + 1, dtype=torch.float32, device=device)  # |p|^2, |update|^2
        updates = []
        for group, views, runs in zip(opt.param_groups, opt.group_views, self.runs):
            beta1, beta2 = (float(b) for b in group["betas"])
            eps, decay = float(group["eps"]), float(group["weight_decay"])
            for p, grad, (run, owner) in zip(views["params"], views["grads"], runs):
                m = self.state["exp_avg"][run.shard_begin:run.shard_end]
                v = self.state["exp_avg_sq"][run.shard_begin:run.shard_end]
                update = lamb.moments_and_update(p, grad.float() * multiplier, m, v, beta1, beta2, eps,
                                                 group["eps_inside_sqrt"], decay)
                sums[0].index_add_(0, owner, p * p)
                sums[1].index_add_(0, owner, update * update)
                updates.append(update)
        if opt.partition_world > 1:
            dist.all_reduce(sums, group=opt.placement.group)
        w, u = sums.sqrt()
        groups = opt.param_groups
        group_of_param = self.group_of_param.to(device)
        coeff = {key: torch.tensor([float(g[key]) for g in groups], device=device)[group_of_param]
                 for key in ("min_coeff", "max_coeff")}
        ratio = lamb.trust_ratio(w, u, coeff["min_coeff"], coeff["max_coeff"])
        k = 0
        for group, views, runs in zip(groups, opt.group_views, self.runs):
            beta1, beta2 = (float(b) for b in group["betas"])
            size = lamb.step_size(float(group["lr"]), beta1, beta2, step, group["bias_correction"])
            for p, (run, owner) in zip(views["params"], runs):
                p.sub_(updates[k] * ratio[owner], alpha=size)
                k += 1
        opt.write_copies()

    def state_tensors(self):
        return dict(self.state)

    @torch.no_grad()
    def load_state_tensors(self, tensors):
        for name in self.state_names:
            self.state[name].copy_(tensors[name])

    def reset(self):
        for t in self.state.values():
            t.zero_()
