"""DeepSpeed's learning-rate schedules (WarmupLR, WarmupDecayLR, WarmupCosineLR,
OneCycle, LRRangeTest), with DeepSpeed's parameter names and step semantics:
the schedule sets the learning rate at construction (step -1: warmup_min_lr,
or 0 for the cosine schedule), and the engine calls step() after every
applied optimizer step.
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


class LRRangeTest(_Schedule):
    """The learning-rate range test: lr = min_lr * (1 + step_rate * interval),
    interval = (iteration + 1) / step_size (floored with staircase)."""

    def __init__(self, optimizer, lr_range_test_min_lr=1e-3, lr_range_test_step_size=2000,
                 lr_range_test_step_rate=1.0, lr_range_test_staircase=False, last_batch_iteration=-1):
        if isinstance(lr_range_test_step_size, bool) or not isinstance(lr_range_test_step_size, int) or \
                lr_range_test_step_size <= 0:
            raise ValueError(f"LRRangeTest: 'lr_range_test_step_size' must be a positive integer, got "
                             f"{lr_range_test_step_size!r}")
        self.optimizer = optimizer
        self.min_lrs = self._per_group(lr_range_test_min_lr, "lr_range_test_min_lr")
        self.step_size = lr_range_test_step_size
        self.step_rate = float(lr_range_test_step_rate)
        self.staircase = bool(lr_range_test_staircase)
        super().__init__(optimizer, last_batch_iteration)

    def get_lr(self):
        interval = (self.last_batch_iteration + 1) / self.step_size
        if self.staircase:
            interval = math.floor(interval)
        return [lr * (1 + self.step_rate * interval) for lr in self.min_lrs]


class OneCycle(_Schedule):
    """1Cycle (DeepSpeed's): the learning rate rises from cycle_min_lr to
    cycle_max_lr over cycle_first_step_size steps and falls back over
    cycle_second_step_size, then decays as min_lr / (1 + decay_lr_rate *
    t / decay_step_size); momentum (the first beta, or "momentum") moves the
    other way between cycle_max_mom and cycle_min_mom. Stair counts hold the
    values flat over that many stairs per half cycle."""

    def __init__(self, optimizer, cycle_min_lr, cycle_max_lr, decay_lr_rate=0.0, cycle_first_step_size=2000,
                 cycle_second_step_size=None, cycle_first_stair_count=0, cycle_second_stair_count=None,
                 decay_step_size=0, cycle_momentum=True, cycle_min_mom=0.8, cycle_max_mom=0.9, decay_mom_rate=0.0,
                 last_batch_iteration=-1):
        first = float(cycle_first_step_size)
        second = float(cycle_second_step_size) if cycle_second_step_size is not None else first
        if first <= 0 or second < 0:
            raise ValueError("OneCycle: 'cycle_first_step_size' must be > 0 and 'cycle_second_step_size' >= 0")
        self.optimizer = optimizer
        self.first_size, self.second_size, self.total_size = first, second, first + second
        self.step_ratio = first / self.total_size
        self.first_stairs = int(cycle_first_stair_count)
        self.second_stairs = self.first_stairs if cycle_second_stair_count is None else int(cycle_second_stair_count)
        self.decay_step_size = decay_step_size
        self.min_lrs = self._per_group(cycle_min_lr, "cycle_min_lr")
        self.max_lrs = self._per_group(cycle_max_lr, "cycle_max_lr")
        self.decay_lr_rate = float(decay_lr_rate)
        groups = optimizer.param_groups
        self.momentum_key = "betas" if "betas" in groups[0] else "momentum" if "momentum" in groups[0] else None
        self.cycle_momentum = bool(cycle_momentum) and self.momentum_key is not None
        self.min_moms = self._per_group(cycle_min_mom, "cycle_min_mom")
        self.max_moms = self._per_group(cycle_max_mom, "cycle_max_mom")
        self.decay_mom_rate = float(decay_mom_rate)
        super().__init__(optimizer, last_batch_iteration)

    def _scale(self):
        iteration = self.last_batch_iteration + 1
        cycle = math.floor(1 + iteration / self.total_size)
        x = 1.0 + iteration / self.total_size - cycle
        if x <= self.step_ratio:
            scale, stairs = x / self.step_ratio, self.first_stairs
        else:
            scale, stairs = (x - 1) / (self.step_ratio - 1), self.second_stairs
        if stairs > 0:
            within = iteration % self.total_size
            position = (within * stairs / self.first_size if within <= self.first_size
                        else (self.total_size - within) * stairs / self.second_size)
            scale = math.floor(position) / stairs
        return scale

    def _decay_factor(self, rate):
        if not self.decay_step_size or rate == 0:
            return 1.0
        return 1 + rate * (self.last_batch_iteration - self.total_size + 1) / self.decay_step_size

    def get_lr(self):
        if self.last_batch_iteration < self.total_size:
            s = self._scale()
            return [lo + (hi - lo) * s for lo, hi in zip(self.min_lrs, self.max_lrs)]
        return [lo / self._decay_factor(self.decay_lr_rate) for lo in self.min_lrs]

    def get_mom(self):
        if not self.cycle_momentum:
            return None
        if self.last_batch_iteration < self.total_size:
            s = self._scale()
            return [hi - (hi - lo) * s for lo, hi in zip(self.min_moms, self.max_moms)]
        return [hi * self._decay_factor(self.decay_mom_rate) for hi in self.max_moms]

    def _apply(self, lrs):
        lrs = super()._apply(lrs)
        moms = self.get_mom()
        if moms is not None:
            for group, mom in zip(self.optimizer.param_groups, moms):
                if self.momentum_key == "betas":
                    group["betas"] = (mom, group["betas"][1])
                else:
                    group["momentum"] = mom
        return lrs


SCHEDULERS = {"WarmupLR": WarmupLR, "WarmupDecayLR": WarmupDecayLR, "WarmupCosineLR": WarmupCosineLR,
              "OneCycle": OneCycle, "LRRangeTest": LRRangeTest}


def build_scheduler(config, optimizer):
    """The schedule named by a parsed SchedulerConfig, on `optimizer`."""
    return SCHEDULERS[config.type](optimizer, **config.params)
