"""Any torch.optim.Optimizer (SGD, Adagrad, RMSprop, a user's Lion...) run on
this rank's fp32 master values.

The client's optimizer class is instantiated again, with its own defaults,
over tensors that view the master shard: one tensor per contiguous run of the
shard when the optimizer is element-wise (what ZeRO-1/2 require: a rank holds
only pieces of parameters), or one per whole parameter, shaped as the model's,
at ZeRO stage 0. Hyper-parameters the learning-rate schedule changes are
copied from the engine's param groups before every step. The skip decision
and gradient multiplier are read on the host (one wait for the device per
step).

is_elementwise() tells the two kinds apart by running the class on the same
values laid out as one [3, 5] tensor and as [4] + [11] pieces: an optimizer
that reads shapes (Adafactor) or per-tensor norms (LAMB, LARS) gives
different results, and one that needs a closure (LBFGS) fails.
"""
import copy

import torch


def is_elementwise(optimizer_class, defaults) -> bool:
    """Whether optimizer_class(params, **defaults) updates every element from
    that element's own values only."""
    g = torch.Generator().manual_seed(0)
    values = torch.randn(15, generator=g, dtype=torch.float64)
    grads = [torch.randn(15, generator=g, dtype=torch.float64) for _ in range(3)]
    whole = [values.clone().view(3, 5)]
    pieces = [values[:4].clone(), values[4:].clone()]
    try:
        a = optimizer_class(whole, **copy.deepcopy(defaults))
        b = optimizer_class(pieces, **copy.deepcopy(defaults))
        for grad in grads:
            whole[0].grad = grad.clone().view(3, 5)
            pieces[0].grad, pieces[1].grad = grad[:4].clone(), grad[4:].clone()
            a.step()
            b.step()
    except Exception:  # needs a closure, sparse gradients, other constructor arguments...
        return False
    joined = torch.cat([p.detach().reshape(-1) for p in pieces])
    return torch.allclose(whole[0].detach().reshape(-1), joined, rtol=1e-12, atol=1e-14)


class TorchOptimizerRule:
    def __init__(self, optimizer, optimizer_class, defaults, whole_parameters: bool):
        self.optimizer = optimizer
        self.optimizer_class = optimizer_class
        self.hyperparameters = tuple(k for k in defaults if k != "params")
        layout = optimizer.layout
        # The tensors the client's optimizer sees, per param group, and the
        # gradient views and shard ranges they correspond to.
        self.tensors, self.grads, self.ranges = [], [], []
        inner_groups = []
        for g, (group, runs, views) in enumerate(zip(optimizer.param_groups, optimizer.runs_of_group,
                                                     optimizer.group_views)):
            if whole_parameters:  # ZeRO-0: one rank's shard is the whole flat buffer, at the same offsets
                slots = [slot for slot in layout.slots if slot.group == g]
                ranges = [(slot.offset, slot.offset + slot.numel) for slot in slots]
                tensors = [optimizer.master_view(lo, hi).view(slot.shape) for (lo, hi), slot in zip(ranges, slots)]
                grads = [optimizer.flat_grads[lo:hi].view(slot.shape) for (lo, hi), slot in zip(ranges, slots)]
            else:
                ranges = [(r.shard_begin, r.shard_end) for r in runs]
                tensors, grads = views["params"], views["grads"]
            self.tensors.append(tensors)
            self.grads.append(grads)
            self.ranges.append(ranges)
            inner_groups.append(dict({k: v for k, v in group.items() if k != "params"}, params=tensors))
        self.inner = optimizer_class(inner_groups, **{k: v for k, v in defaults.items() if k != "params"})

    @torch.no_grad()
    def step(self, control):
        skip, multiplier, _ = control.decision_on_host()
        if skip:
            return
        opt = self.optimizer
        for outer, inner in zip(opt.param_groups, self.inner.param_groups):
            for key in self.hyperparameters:
                if key in outer:
                    inner[key] = outer[key]
        for tensors, grads in zip(self.tensors, self.grads):
            for t, grad in zip(tensors, grads):
                t.grad = grad.to(torch.float32) * multiplier
        self.inner.step()
        for tensors in self.tensors:
            for t in tensors:
                t.grad = None
        opt.write_copies()

    # --- per-element state, laid out like the shard ---------------------------------------------

    def state_tensors(self):
        """Every state entry that has one value per element, as a shard-sized
        fp32 tensor; entries of other shapes (a step count) are per group and
        go in scalar_state()."""
        out = {}
        size, device = self.optimizer.layout.shard_size, self.optimizer.placement.device
        for tensors, ranges in zip(self.tensors, self.ranges):
            for t, (lo, hi) in zip(tensors, ranges):
                for key, value in self.inner.state.get(t, {}).items():
                    if isinstance(value, torch.Tensor) and value.shape == t.shape:
                        buf = out.setdefault(key, torch.zeros(size, dtype=torch.float32, device=device))
                        buf[lo:hi] = value.reshape(-1)
        return out

    def scalar_state(self):
        """Per group: the state entries that are not per-element (e.g. 'step'), from the group's first tensor."""
        out = []
        for tensors in self.tensors:
            state = self.inner.state.get(tensors[0], {}) if tensors else {}
            out.append({k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in state.items()
                        if not (isinstance(v, torch.Tensor) and v.numel() > 1) and
                        not (isinstance(v, torch.Tensor) and tensors and v.shape == tensors[0].shape)})
        return out

    @torch.no_grad()
    def load_state_tensors(self, tensors, scalars=None):
        for g, (ts, ranges) in enumerate(zip(self.tensors, self.ranges)):
            extra = (scalars[g] if scalars and g < len(scalars) else None) or {}
            for t, (lo, hi) in zip(ts, ranges):
                state = {}
                for key, value in extra.items():
                    state[key] = torch.tensor(value, dtype=torch.float32) if isinstance(value, float) else value
                for key, buf in tensors.items():
                    state[key] = buf[lo:hi].to(t.dtype).reshape(t.shape).clone()
                if state:
                    self.inner.state[t] = state

    def reset(self):
        self.inner.state.clear()
