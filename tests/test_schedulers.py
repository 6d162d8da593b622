"""DeepSpeed's learning-rate schedules against their closed forms."""
import math

import pytest
import torch

from zerofuse.runtime.schedulers import WarmupCosineLR, WarmupDecayLR, WarmupLR


def optimizer(lr=0.1, groups=1):
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(groups)], lr=lr)


def lrs(schedule, steps):
    out = [schedule.optimizer.param_groups[0]["lr"]]  # as set at construction
    for _ in range(steps):
        schedule.step()
        out.append(schedule.optimizer.param_groups[0]["lr"])
    return out


def test_warmup_lr_log_and_linear():
    s = WarmupLR(optimizer(), warmup_min_lr=0.01, warmup_max_lr=0.1, warmup_num_steps=10)
    got = lrs(s, 12)
    assert got[0] == 0.01  # before the first step: the minimum
    for i, lr in enumerate(got[1:]):  # after step() number i + 1, last_batch_iteration = i
        expected = 0.01 + 0.09 * (math.log(i + 1) / math.log(10) if i < 10 else 1.0)
        assert lr == pytest.approx(expected)
    s = WarmupLR(optimizer(), warmup_min_lr=0.0, warmup_max_lr=0.2, warmup_num_steps=4, warmup_type="linear")
    assert lrs(s, 6) == pytest.approx([0.0, 0.0, 0.05, 0.1, 0.15, 0.2, 0.2])


def test_warmup_max_lr_defaults_to_the_optimizer_lr():
    s = WarmupLR(optimizer(lr=0.3), warmup_num_steps=2, warmup_type="linear")
    assert lrs(s, 3)[-1] == pytest.approx(0.3)


def test_warmup_decay_lr():
    s = WarmupDecayLR(optimizer(), total_num_steps=20, warmup_max_lr=0.1, warmup_num_steps=5, warmup_type="linear")
    got = lrs(s, 22)
    for i, lr in enumerate(got[1:]):
        gamma = i / 5 if i < 5 else max(0.0, (20 - i) / 15)
        assert lr == pytest.approx(0.1 * gamma)
    assert got[-1] == 0.0


def test_warmup_cosine_lr():
    s = WarmupCosineLR(optimizer(lr=0.2), total_num_steps=30, warmup_min_ratio=0.1, warmup_num_steps=10,
                       cos_min_ratio=0.01, warmup_type="linear")
    got = lrs(s, 35)
    assert got[0] == 0.0
    for i, lr in enumerate(got[1:]):
        if i < 10:
            ratio = 0.1 + (i / 10) * 0.9
        else:
            progress = min(1.0, (i - 10 + 1) / 20)
            ratio = 0.01 + 0.99 * (1 + math.cos(math.pi * progress)) / 2
        assert lr == pytest.approx(0.2 * ratio)
    assert got[-1] == pytest.approx(0.2 * 0.01)


def test_state_dict_round_trip_and_per_group_values():
    s = WarmupLR(optimizer(groups=2), warmup_min_lr=[0.0, 0.01], warmup_max_lr=[0.1, 0.2], warmup_num_steps=8)
    for _ in range(3):
        s.step()
    t = WarmupLR(optimizer(groups=2), warmup_min_lr=[0.0, 0.01], warmup_max_lr=[0.1, 0.2], warmup_num_steps=8)
    t.load_state_dict(s.state_dict())
    assert t.get_last_lr() == s.get_last_lr()
    with pytest.raises(ValueError, match="'warmup_max_lr' has 3 values for 2 param groups"):
        WarmupLR(optimizer(groups=2), warmup_max_lr=[0.1, 0.2, 0.3])


def test_lr_range_test_continuous_and_staircase():
    from zerofuse.runtime.schedulers import LRRangeTest
    s = LRRangeTest(optimizer(), lr_range_test_min_lr=0.01, lr_range_test_step_size=4, lr_range_test_step_rate=2.0)
    got = lrs(s, 9)
    assert got[0] == pytest.approx(0.01)
    for i, lr in enumerate(got[1:]):  # iteration i: (i + 1) / 4 intervals
        assert lr == pytest.approx(0.01 * (1 + 2.0 * (i + 1) / 4))
    s = LRRangeTest(optimizer(), lr_range_test_min_lr=0.01, lr_range_test_step_size=4, lr_range_test_step_rate=2.0,
                    lr_range_test_staircase=True)
    assert lrs(s, 8)[1:] == pytest.approx([0.01 * (1 + 2.0 * ((i + 1) // 4)) for i in range(8)])


def test_one_cycle_lr_and_momentum():
    from zerofuse.runtime.schedulers import OneCycle
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    s = OneCycle(opt, cycle_min_lr=0.01, cycle_max_lr=0.11, cycle_first_step_size=5, cycle_second_step_size=10,
                 decay_lr_rate=0.5, decay_step_size=2, cycle_min_mom=0.8, cycle_max_mom=0.9)
    got, moms = [], []
    for _ in range(20):
        s.step()
        got.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0]["momentum"])
    for i, (lr, mom) in enumerate(zip(got, moms)):  # last_batch_iteration = i
        t = i + 1
        if i < 15:
            scale = t / 5 if t <= 5 else (15 - t) / 10  # up over 5 steps, down over 10
            assert lr == pytest.approx(0.01 + 0.1 * scale), i
            assert mom == pytest.approx(0.9 - 0.1 * scale), i
        else:
            assert lr == pytest.approx(0.01 / (1 + 0.5 * (i - 15 + 1) / 2)), i
