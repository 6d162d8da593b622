import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zerofuse import DynamicLossScaler, _C

CFG = dict(dynamic_loss_scale=True, initial_scale_power=5, loss_scale_window=3, hysteresis=2,
           consecutive_hysteresis=False, min_loss_scale=1.0)


def fresh_state(max_grad_norm=0.0, static_scale=1.0, **cfg):
    state = torch.full((_C.STEP_STATE_SIZE,), float("nan"), dtype=torch.float64)
    _C.step_control_init(state, max_grad_norm=max_grad_norm, static_scale=static_scale, **cfg)
    return state


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(0.0, 1e6)), max_size=40), st.sampled_from([0.0, 0.5, 100.0]))
def test_matches_host_scaler_and_clipping_formula(steps, max_grad_norm):
    state = fresh_state(max_grad_norm=max_grad_norm, **CFG)
    host = DynamicLossScaler(5, 3, 2, False, 1.0)
    out = torch.full((_C.STEP_OUTPUT_SIZE,), float("nan"))
    applied = skipped = 0
    for overflow, sum_sq in steps:
        scale = host.loss_scale
        stats = torch.tensor([sum_sq, 1.0 if overflow else 0.0])
        _C.step_control(stats, state, out, max_grad_norm=max_grad_norm, **CFG)
        host.update(overflow)
        applied += not overflow
        skipped += overflow
        assert out[1].item() == float(overflow)
        if not overflow:
            norm = math.sqrt(float(torch.tensor(sum_sq, dtype=torch.float32))) / scale
            coef = min(1.0, max_grad_norm / (norm + 1e-6)) if max_grad_norm > 0 else 1.0
            assert out[2].item() == pytest.approx(norm, rel=1e-6)
            assert out[0].item() == pytest.approx(coef / scale, rel=1e-6)
        assert state[0].item() == host.loss_scale
        assert state[4].item() == applied and state[5].item() == skipped


def test_inf_sum_of_squares_counts_as_overflow():
    state = fresh_state(static_scale=8.0, **dict(CFG, dynamic_loss_scale=False))
    out = torch.empty(_C.STEP_OUTPUT_SIZE)
    _C.step_control(torch.tensor([float("inf"), 0.0]), state, out, max_grad_norm=1.0, **dict(CFG, dynamic_loss_scale=False))
    assert out[1].item() == 1.0 and state[0].item() == 8.0 and state[5].item() == 1.0


def test_minimum_is_reported_in_state():
    cfg = dict(CFG, initial_scale_power=0, hysteresis=1)
    state = fresh_state(**cfg)
    out = torch.empty(_C.STEP_OUTPUT_SIZE)
    _C.step_control(torch.tensor([0.0, 1.0]), state, out, max_grad_norm=0.0, **cfg)
    assert state[0].item() == 1.0 and state[6].item() == 1.0


def test_bad_arguments():
    state = fresh_state(**CFG)
    with pytest.raises(ValueError, match="'state' must have shape"):
        _C.step_control(torch.zeros(2), torch.zeros(3, dtype=torch.float64), torch.zeros(3), max_grad_norm=0.0, **CFG)
    with pytest.raises(TypeError, match="'stats' must be float32"):
        _C.step_control(torch.zeros(2, dtype=torch.float64), state, torch.zeros(3), max_grad_norm=0.0, **CFG)
    with pytest.raises(ValueError, match="'max_grad_norm' must be a finite number >= 0"):
        _C.step_control(torch.zeros(2), state, torch.zeros(3), max_grad_norm=-1.0, **CFG)
    with pytest.raises(ValueError, match="'hysteresis' must be >= 1"):
        _C.step_control(torch.zeros(2), state, torch.zeros(3), max_grad_norm=0.0, **dict(CFG, hysteresis=0))
