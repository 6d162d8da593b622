"""Loss scaling for fp16 training: the Python face of the C++ scaler
(cpp/include/zerofuse/loss_scaler.h), with DeepSpeed's semantics."""
from . import _C

_STATE_KEYS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def _check_int(op, name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: '{name}' must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{op}: '{name}' must be >= {minimum}, got {value}")


class _LossScalerBase:
    _scaler: "_C.LossScaler"

    @property
    def loss_scale(self) -> float:
        """The current scale: multiply the loss by it before backward."""
        return self._scaler.loss_scale

    @property
    def at_minimum(self) -> bool:
        """True after an overflow that found the scale already at its minimum."""
        return self._scaler.at_minimum

    def update(self, overflow: bool) -> bool:
        """Record one step's outcome. Returns True when the step must be skipped
        (that is, when `overflow` is True)."""
        if not isinstance(overflow, bool):
            overflow = bool(overflow)
        return self._scaler.update(overflow)

    def state_dict(self) -> dict:
        state = dict(self._scaler.get_state())
        state["dynamic"] = self._scaler.is_dynamic
        return state

    def load_state_dict(self, state: dict) -> None:
        op = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state, dict):
            raise TypeError(f"{op}: 'state' must be a dict, got {type(state).__name__}")
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"{op}: 'state' lacks {', '.join(repr(k) for k in missing)}")
        if state.get("dynamic", self._scaler.is_dynamic) != self._scaler.is_dynamic:
            kind = "dynamic" if state["dynamic"] else "static"
            raise ValueError(f"{op}: the state is from a {kind} scaler; this one is not")
        self._scaler.set_state(
            cur_scale=float(state["cur_scale"]),
            cur_iter=int(state["cur_iter"]),
            last_overflow_iter=int(state["last_overflow_iter"]),
            cur_hysteresis=int(state["cur_hysteresis"]),
        )

    def __repr__(self):
        return f"{type(self).__name__}(loss_scale={self.loss_scale})"


class DynamicLossScaler(_LossScalerBase):
    """DeepSpeed's dynamic loss scaler.

    The scale starts at 2**initial_scale_power. An overflowed step is skipped:
    it first uses up the hysteresis budget, then each overflow halves the scale
    (never below min_loss_scale; at the minimum the step is skipped and the run
    goes on, where DeepSpeed would raise). Counting clean steps since the last
    overflow, the scale doubles on clean step loss_scale_window + 1, then every
    loss_scale_window steps, refilling the hysteresis budget.
    """

    def __init__(
        self,
        initial_scale_power: int = 16,
        loss_scale_window: int = 1000,
        hysteresis: int = 2,
        consecutive_hysteresis: bool = False,
        min_loss_scale: float = 1.0,
    ):
        op = "DynamicLossScaler"
        _check_int(op, "initial_scale_power", initial_scale_power, 0)
        _check_int(op, "loss_scale_window", loss_scale_window, 1)
        _check_int(op, "hysteresis", hysteresis, 1)
        if not isinstance(consecutive_hysteresis, bool):
            raise TypeError(f"{op}: 'consecutive_hysteresis' must be a bool, got {type(consecutive_hysteresis).__name__}")
        if isinstance(min_loss_scale, bool) or not isinstance(min_loss_scale, (int, float)):
            raise TypeError(f"{op}: 'min_loss_scale' must be a number, got {type(min_loss_scale).__name__}")
        self._scaler = _C.LossScaler.dynamic(
            initial_scale_power, loss_scale_window, hysteresis, consecutive_hysteresis, float(min_loss_scale)
        )


class StaticLossScaler(_LossScalerBase):
    """A fixed loss scale; an overflowed step is still skipped."""

    def __init__(self, loss_scale: float = 1.0):
        if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)):
            raise TypeError(f"StaticLossScaler: 'loss_scale' must be a number, got {type(loss_scale).__name__}")
        self._scaler = _C.LossScaler.fixed(float(loss_scale))
