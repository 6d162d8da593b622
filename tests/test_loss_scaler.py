import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zerofuse import DynamicLossScaler, StaticLossScaler


class Model:
    """The scaler's rules, restated from its documentation (DeepSpeed's
    current DynamicLossScaler.update_scale, minus the raise at the minimum)."""

    def __init__(self, power, window, hysteresis, consecutive, minimum):
        self.scale, self.window, self.hyst, self.cur_hyst = 2.0**power, window, hysteresis, hysteresis
        self.consecutive, self.minimum = consecutive, minimum
        self.clean_since_overflow = 0

    def update(self, overflow):
        if overflow:
            if self.cur_hyst == 1 or self.hyst == 1:
                self.scale = max(self.scale / 2, self.minimum)
            else:
                self.cur_hyst -= 1
            self.clean_since_overflow = 0
        else:
            self.clean_since_overflow += 1
            if self.consecutive:
                self.cur_hyst = self.hyst
            if self.clean_since_overflow > 1 and (self.clean_since_overflow - 1) % self.window == 0:
                if not self.consecutive:
                    self.cur_hyst = self.hyst
                self.scale *= 2


def run(scaler, overflows):
    return [(scaler.update(o), scaler.loss_scale) for o in overflows]


def test_defaults_are_deepspeeds():
    s = DynamicLossScaler()
    assert s.loss_scale == 2.0**16
    # hysteresis 2: the first overflow only spends the budget, the second halves.
    assert run(s, [True, True, True]) == [(True, 65536.0), (True, 32768.0), (True, 16384.0)]


def test_window_growth_counts_clean_steps_since_the_last_overflow():
    s = DynamicLossScaler(initial_scale_power=4, loss_scale_window=3, hysteresis=1)
    # Clean steps 1..3 keep 16; clean step 4 (= window + 1) doubles; then every 3.
    assert [scale for _, scale in run(s, [False] * 7)] == [16, 16, 16, 32, 32, 32, 64]
    assert run(s, [True]) == [(True, 32.0)]
    assert [scale for _, scale in run(s, [False] * 4)] == [32, 32, 32, 64]


def test_hysteresis_refills_only_on_growth_unless_consecutive():
    plain = DynamicLossScaler(initial_scale_power=8, loss_scale_window=100, hysteresis=2)
    assert [sc for _, sc in run(plain, [True, False, False, True])] == [256, 256, 256, 128]
    consecutive = DynamicLossScaler(initial_scale_power=8, loss_scale_window=100, hysteresis=2,
                                    consecutive_hysteresis=True)
    assert [sc for _, sc in run(consecutive, [True, False, True, True])] == [256, 256, 256, 128]


def test_overflow_at_the_minimum_skips_without_raising():
    s = DynamicLossScaler(initial_scale_power=2, hysteresis=1, min_loss_scale=1.0)
    assert run(s, [True, True]) == [(True, 2.0), (True, 1.0)]
    assert not s.at_minimum
    assert run(s, [True]) == [(True, 1.0)]
    assert s.at_minimum
    assert run(s, [False]) == [(False, 1.0)] and not s.at_minimum


def test_min_loss_scale_below_one():
    s = DynamicLossScaler(initial_scale_power=0, hysteresis=1, min_loss_scale=0.25)
    assert [sc for _, sc in run(s, [True] * 4)] == [0.5, 0.25, 0.25, 0.25]


@settings(max_examples=200, deadline=None)
@given(
    power=st.integers(0, 30),
    window=st.integers(1, 6),
    hysteresis=st.integers(1, 4),
    consecutive=st.booleans(),
    minimum=st.sampled_from([1.0, 0.5, 4.0]),
    overflows=st.lists(st.booleans(), max_size=60),
)
def test_matches_the_documented_rules_on_random_sequences(power, window, hysteresis, consecutive, minimum, overflows):
    minimum = min(minimum, 2.0**power)
    s = DynamicLossScaler(power, window, hysteresis, consecutive, minimum)
    m = Model(power, window, hysteresis, consecutive, minimum)
    for o in overflows:
        assert s.update(o) == o
        m.update(o)
        assert s.loss_scale == m.scale


def test_state_dict_resumes_exactly():
    seq = [False, True, False, False, True, True] + [False] * 9 + [True] + [False] * 5
    whole = DynamicLossScaler(initial_scale_power=10, loss_scale_window=4, hysteresis=2)
    expected = run(whole, seq)
    first = DynamicLossScaler(initial_scale_power=10, loss_scale_window=4, hysteresis=2)
    got = run(first, seq[:9])
    resumed = DynamicLossScaler(initial_scale_power=10, loss_scale_window=4, hysteresis=2)
    resumed.load_state_dict(first.state_dict())
    got += run(resumed, seq[9:])
    assert got == expected


def test_static_scaler_never_changes_but_skips_overflows():
    s = StaticLossScaler(128.0)
    assert run(s, [False, True, False]) == [(False, 128.0), (True, 128.0), (False, 128.0)]
    with pytest.raises(ValueError, match="from a static scaler"):
        DynamicLossScaler().load_state_dict(s.state_dict())


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(initial_scale_power=-1), ValueError, "'initial_scale_power' must be >= 0"),
        (dict(initial_scale_power=128), ValueError, "'initial_scale_power' must be in \\[0, 127\\]"),
        (dict(initial_scale_power=1.5), TypeError, "'initial_scale_power' must be an int"),
        (dict(loss_scale_window=0), ValueError, "'loss_scale_window' must be >= 1"),
        (dict(hysteresis=0), ValueError, "'hysteresis' must be >= 1"),
        (dict(consecutive_hysteresis=1), TypeError, "'consecutive_hysteresis' must be a bool"),
        (dict(min_loss_scale=0.0), ValueError, "'min_loss_scale' must be a finite number > 0"),
        (dict(initial_scale_power=2, min_loss_scale=8.0), ValueError, "must not exceed the initial scale"),
    ],
)
def test_bad_configuration(kwargs, error, match):
    with pytest.raises(error, match=match):
        DynamicLossScaler(**kwargs)


def test_bad_state():
    s = DynamicLossScaler(hysteresis=2)
    state = s.state_dict()
    with pytest.raises(ValueError, match="lacks 'cur_iter'"):
        s.load_state_dict({k: v for k, v in state.items() if k != "cur_iter"})
    with pytest.raises(ValueError, match="'cur_hysteresis' must be in \\[1, 2\\]"):
        s.load_state_dict(dict(state, cur_hysteresis=3))
    with pytest.raises(ValueError, match="'cur_scale' must be a finite number > 0"):
        s.load_state_dict(dict(state, cur_scale=float("inf")))
    assert s.loss_scale == 65536.0, "a refused state leaves the scaler as it was"
    with pytest.raises(ValueError, match="'loss_scale' must be a finite number > 0"):
        StaticLossScaler(0.0)
