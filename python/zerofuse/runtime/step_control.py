"""The optimizer step's decision, on the device, and the host's view of it.

Every step: the gradients' sum of squares and inf/NaN flag (one pass,
all-reduced across the ranks that hold pieces of them), then the decision
(zerofuse/step_control.h: skip on overflow, unscale, clip, next loss scale by
DeepSpeed's rules) written to device memory, where the update kernel reads it.
The host learns the outcome from a copy started right after the step and read
when asked (sync_host), so a step never waits for the device.
"""
import math
from dataclasses import asdict, dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from .. import _C
from ..ops._library import stream_of

STATE = dict(_C.STEP_STATE_FIELDS)    # name -> index in the float64 state
OUTPUT = dict(_C.STEP_OUTPUT_FIELDS)  # name -> index in the float32 output

# What a checkpoint keeps of the state (the names DeepSpeed's loss scaler uses
# for the first four), and the state entry each comes from.
_SAVED = {"cur_scale": "loss_scale", "cur_iter": "cur_iter", "last_overflow_iter": "last_overflow_iter",
          "cur_hysteresis": "cur_hysteresis", "applied_steps": "applied_steps", "skipped_steps": "skipped_steps"}


@dataclass(frozen=True)
class StepControlSettings:
    """Loss scaling (DeepSpeed's fp16 section) and clipping, as the kernel takes them."""

    dynamic_loss_scale: bool = False
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    min_loss_scale: float = 1.0
    max_grad_norm: float = 0.0  # 0: no clipping
    static_scale: float = 1.0   # the scale when it is not dynamic

    @classmethod
    def from_config(cls, config) -> "StepControlSettings":
        fp16 = config.fp16
        return cls(dynamic_loss_scale=fp16.enabled and fp16.dynamic, initial_scale_power=fp16.initial_scale_power,
                   loss_scale_window=fp16.loss_scale_window, hysteresis=fp16.hysteresis,
                   consecutive_hysteresis=fp16.consecutive_hysteresis, min_loss_scale=fp16.min_loss_scale,
                   max_grad_norm=config.gradient_clipping,
                   static_scale=fp16.loss_scale if (fp16.enabled and not fp16.dynamic) else 1.0)

    def kernel_arguments(self) -> dict:
        """The keyword arguments of _C.step_control (everything but the static scale)."""
        args = asdict(self)
        del args["static_scale"]
        return args


class StepControl:
    """Device tensors of the step decision, their host mirror, and its state_dict."""

    def __init__(self, settings: StepControlSettings, device: torch.device):
        self.settings = settings
        self.stats = torch.zeros(2, dtype=torch.float32, device=device)
        self.state = torch.zeros(_C.STEP_STATE_SIZE, dtype=torch.float64, device=device)
        self.output = torch.zeros(_C.STEP_OUTPUT_SIZE, dtype=torch.float32, device=device)
        # Host copies (refreshed by sync_host); a copy even on the CPU, where the
        # step reads the state as it was before the decision.
        self._host_state = torch.zeros(_C.STEP_STATE_SIZE, dtype=torch.float64)
        self._host_output = torch.zeros(_C.STEP_OUTPUT_SIZE, dtype=torch.float32)
        self._pinned = None
        self._copy_event = None
        self.reset()

    # --- what the update kernel reads, on the device -----------------------------------------------

    def _entry(self, tensor, index):
        return tensor[index:index + 1]

    @property
    def loss_scale_tensor(self) -> torch.Tensor:
        return self._entry(self.state, STATE["loss_scale"])

    @property
    def applied_count(self) -> torch.Tensor:
        """Adam's step count: applied steps so far, advanced by the decision."""
        return self._entry(self.state, STATE["applied_steps"])

    @property
    def grad_multiplier(self) -> torch.Tensor:
        return self._entry(self.output, OUTPUT["grad_multiplier"])

    @property
    def skip_flag(self) -> torch.Tensor:
        return self._entry(self.output, OUTPUT["skip"])

    # --- the step ----------------------------------------------------------------------------------

    @torch.no_grad()
    def reset(self):
        """A fresh state: the initial loss scale, no steps."""
        self.sync_host()
        s = self.settings
        _C.step_control_init(self.state, static_scale=s.static_scale, stream=stream_of(self.state),
                             **s.kernel_arguments())
        self._host_state.copy_(self.state)
        self._host_output.zero_()

    @torch.no_grad()
    def decide(self, grads: List[torch.Tensor], group: Optional["dist.ProcessGroup"] = None, extra_groups=()):
        """Statistics of `grads` (summed over `group`, then over each of
        extra_groups: the other pipeline stages), then the decision."""
        stream = stream_of(self.stats)
        _C.grad_stats(grads, self.stats, stream)
        for g in (group, *extra_groups):
            if g is not None:
                dist.all_reduce(self.stats, op=dist.ReduceOp.SUM, group=g)
        _C.step_control(self.stats, self.state, self.output, stream=stream, **self.settings.kernel_arguments())

    def decision_on_host(self):
        """(skip, gradient multiplier, applied steps counting this one) of the
        decision just made -- read at once, a wait for the device. For update
        rules that decide on the host (the fused Adam kernel reads the device
        values instead)."""
        out, state = self.output.cpu(), self.state.cpu()
        return (bool(out[OUTPUT["skip"]] != 0), float(out[OUTPUT["grad_multiplier"]]),
                int(state[STATE["applied_steps"]]))

    # --- the host's view -----------------------------------------------------------------------------

    def publish(self):
        """Start copying the decision to the host (read at the next sync_host)."""
        if self.state.is_cuda:
            if self._pinned is None:
                self._pinned = (torch.empty_like(self._host_state).pin_memory(),
                                torch.empty_like(self._host_output).pin_memory())
            self._pinned[0].copy_(self.state, non_blocking=True)
            self._pinned[1].copy_(self.output, non_blocking=True)
            self._copy_event = torch.cuda.Event()
            self._copy_event.record()
        else:
            self._host_state.copy_(self.state)
            self._host_output.copy_(self.output)

    def sync_host(self):
        """Make the host values current (waits for the last published copy)."""
        if self._copy_event is not None:
            self._copy_event.synchronize()
            self._host_state.copy_(self._pinned[0])
            self._host_output.copy_(self._pinned[1])
            self._copy_event = None

    def _host(self, name: str) -> float:
        self.sync_host()
        return float(self._host_state[STATE[name]])

    @property
    def loss_scale(self) -> float:
        return self._host("loss_scale")

    @property
    def applied_steps(self) -> int:
        return int(self._host("applied_steps"))

    @property
    def skipped_steps(self) -> int:
        return int(self._host("skipped_steps"))

    @property
    def last_step_skipped(self) -> bool:
        self.sync_host()
        return bool(self._host_output[OUTPUT["skip"]] != 0)

    @property
    def last_grad_norm(self) -> Optional[float]:
        """The last step's gradient norm before clipping; None if it overflowed."""
        self.sync_host()
        norm = float(self._host_output[OUTPUT["grad_norm"]])
        return norm if math.isfinite(norm) else None

    # --- Stateful ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        self.sync_host()
        return {key: (float if key == "cur_scale" else int)(self._host_state[STATE[name]])
                for key, name in _SAVED.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict):
        missing = [k for k in _SAVED if k not in state]
        if missing:
            raise ValueError(f"StepControl.load_state_dict: the state lacks {missing}")
        scale = float(state["cur_scale"])
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"StepControl.load_state_dict: loss scale {state['cur_scale']} is not a positive number")
        values = torch.zeros(_C.STEP_STATE_SIZE, dtype=torch.float64)
        for key, name in _SAVED.items():
            values[STATE[name]] = float(state[key])
        self.sync_host()
        self.state.copy_(values)
        self._host_state.copy_(values)
