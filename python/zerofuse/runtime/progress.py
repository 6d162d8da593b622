"""The training loop's counters that a checkpoint carries (besides the
optimizer's step counts, which live with its step control)."""
from dataclasses import dataclass

_SAVED = ("optimizer_steps", "scheduler_steps", "skipped_reported")


@dataclass
class TrainingProgress:
    optimizer_steps: int = 0        # accumulation windows completed (applied + skipped optimizer steps)
    scheduler_steps: int = 0        # applied steps the learning-rate schedule has been stepped for
    skipped_reported: int = 0       # overflowed steps the periodic report has already counted
    # Not saved: a checkpoint holds no accumulated gradients, so a resumed run
    # starts a fresh window (also when its gradient_accumulation_steps differs).
    micro_steps_in_window: int = 0

    def micro_steps(self, accumulation_steps: int) -> int:
        return self.optimizer_steps * accumulation_steps + self.micro_steps_in_window

    def at_boundary(self, accumulation_steps: int) -> bool:
        """Whether the next micro-step closes the accumulation window."""
        return (self.micro_steps_in_window + 1) % accumulation_steps == 0

    def count_micro_step(self, accumulation_steps: int, boundary: bool = None) -> bool:
        """One engine.step(); returns whether it closed the window (by the
        count, or as `boundary` says when the caller decides)."""
        if boundary is None:
            boundary = self.at_boundary(accumulation_steps)
        self.micro_steps_in_window += 1
        if boundary:
            self.micro_steps_in_window = 0
            self.optimizer_steps += 1
        return boundary

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in _SAVED}

    def load_state_dict(self, state: dict):
        for name in _SAVED:
            value = state.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainingProgress.load_state_dict: '{name}' must be an int >= 0, got {value!r}")
        for name in _SAVED:
            setattr(self, name, state[name])
        self.micro_steps_in_window = 0
