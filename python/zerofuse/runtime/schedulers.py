"""DeepSpeed's learning-rate schedules (WarmupLR, WarmupDecayLR, WarmupCosineLR),
with DeepSpeed's parameter names and step semantics: the schedule sets the
learning rate at construction (step -1: warmup_min_lr, or 0 for the cosine
schedule), and the engine calls step() after every applied optimizer step.
"""
import math

WARMUP_LOG = "log"
WARMUP_LINEAR = "linear"


class _Schedule:
    """Common machinery: one learning rate per parameter group, set on the
    optimizer's param_groups, and a state_dict of plain numbers."""

    def __init__(self, optimizer, last_batch_iteration=-1):
        self.optimizer = optimizer
        self.last_batch_iteration = last_batch_iteration
        self._last_lr = self._apply(self.get_lr())

    def _apply(self, lrs):
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        return list(lrs)

    def step(self, last_batch_iteration=None):
        if last_batch_iteration is None:
            last_batch_iteration = self.last_batch_iteration + 1
        self.last_batch_iteration = last_batch_iteration
        self._last_lr = self._apply(self.get_lr())

    def get_last_lr(self):
        return list(self._last_lr)

    def state_dict(self):
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state):
        self.last_batch_iteration = int(state["last_batch_iteration"])
        self._last_lr = self._apply(self.get_lr())

    def _per_group(self, value, name):
        groups = len(self.optimizer.param_groups)
        if isinstance(value, (list, tuple)):
            if len(value) != groups:
                raise ValueError(f"{type(self).__name__}: '{name}' has {len(value)} values for {groups} param groups")
            return [float(v) for v in value]
        return [float(value)] * groups

    def _warmup_fraction(self, warmup_num_steps, warmup_type):
        """0 -> 1 over the warmup, logarithmically (DeepSpeed's default) or linearly."""
        if warmup_type == WARMUP_LOG:
            return math.log(self.last_batch_iteration + 1) / math.log(warmup_num_steps)
        return self.last_batch_iteration / warmup_num_steps


class WarmupLR(_Schedule):
    """From warmup_min_lr to warmup_max_lr (default: the optimizer's lr) over
    warmup_num_steps, then constant."""

    def __init__(self, optimizer, warmup_min_lr=0.0, warmup_max_lr=None, warmup_num_steps=1000,
                 warmup_type=WARMUP_LOG, last_batch_iteration=-1):
        if warmup_type not in (WARMUP_LOG, WARMUP_LINEAR):
            raise ValueError(f"{type(self).__name__}: 'warmup_type' must be 'log' or 'linear', got {warmup_type!r}")
        if warmup_max_lr is None:
            warmup_max_lr = [group["lr"] for group in optimizer.param_groups]
        self.optimizer = optimizer
        self.min_lrs = self._per_group(warmup_min_lr, "warmup_min_lr")
        self.max_lrs = self._per_group(warmup_max_lr, "warmup_max_lr")
        self.warmup_num_steps = max(2, int(warmup_num_steps))
        self.warmup_type = warmup_type
        super().__init__(optimizer, last_batch_iteration)

    def _gamma(self):
        if self.last_batch_iteration < self.warmup_num_steps:
            return self._warmup_fraction(self.warmup_num_steps, self.warmup_type)
        return 1.0

    def get_lr(self):
        if self.last_batch_iteration < 0:
            return list(self.min_lrs)
        gamma = self._gamma()
        return [lo + (hi - lo) * gamma for lo, hi in zip(self.min_lrs, self.max_lrs)]


class WarmupDecayLR(WarmupLR):
    """WarmupLR, then linear decay to 0 at total_num_steps."""

    def __init__(self, optimizer, total_num_steps, warmup_min_lr=0.0, warmup_max_lr=0.001, warmup_num_steps=1000,
                 warmup_type=WARMUP_LOG, last_batch_iteration=-1):
        self.total_num_steps = int(total_num_steps)
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type,
                         last_batch_iteration)

    def _gamma(self):
        if self.last_batch_iteration < self.warmup_num_steps:
            return self._warmup_fraction(self.warmup_num_steps, self.warmup_type)
        remaining = self.total_num_steps - self.last_batch_iteration
        return max(0.0, remaining / max(1.0, self.total_num_steps - self.warmup_num_steps))


class WarmupCosineLR(_Schedule):
    """Ratio of the optimizer's lr: warmup_min_ratio -> 1 over warmup_num_steps,
    then cosine down to cos_min_ratio at total_num_steps (and held there)."""

    def __init__(self, optimizer, total_num_steps, warmup_min_ratio=0.0, warmup_num_steps=1000,
                 cos_min_ratio=0.0001, warmup_type=WARMUP_LOG, last_batch_iteration=-1):
        if warmup_type not in (WARMUP_LOG, WARMUP_LINEAR):
            raise ValueError(f"{type(self).__name__}: 'warmup_type' must be 'log' or 'linear', got {warmup_type!r}")
        self.optimizer = optimizer
        self.total_num_steps = int(total_num_steps)
        self.warmup_min_ratio = float(warmup_min_ratio)
        self.warmup_num_steps = max(2, int(warmup_num_steps))
        self.cos_min_ratio = float(cos_min_ratio)
        self.warmup_type = warmup_type
        self.org_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        super().__init__(optimizer, last_batch_iteration)

    def state_dict(self):
        return {"last_batch_iteration": self.last_batch_iteration, "org_lrs": list(self.org_lrs)}

    def load_state_dict(self, state):
        if "org_lrs" in state:
            self.org_lrs = [float(x) for x in state["org_lrs"]]
        super().load_state_dict(state)

    def ratio(self):
        if self.last_batch_iteration < 0:
            return 0.0
        if self.last_batch_iteration < self.warmup_num_steps:
            fraction = self._warmup_fraction(self.warmup_num_steps, self.warmup_type)
            return self.warmup_min_ratio + fraction * (1.0 - self.warmup_min_ratio)
        real_step = self.last_batch_iteration - self.warmup_num_steps + 1
        real_total = max(1, self.total_num_steps - self.warmup_num_steps)
        progress = min(1.0, real_step / real_total)
        cosine = (1 + math.cos(math.pi * progress)) / 2
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * cosine)

    def get_lr(self):
        r = self.ratio()
        return [lr * r for lr in self.org_lrs]


SCHEDULERS = {"WarmupLR": WarmupLR, "WarmupDecayLR": WarmupDecayLR, "WarmupCosineLR": WarmupCosineLR}


def build_scheduler(config, optimizer):
    """The schedule named by a parsed SchedulerConfig, on `optimizer`."""
    return SCHEDULERS[config.type](optimizer, **config.params)
