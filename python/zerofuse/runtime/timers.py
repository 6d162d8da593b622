"""engine.tput_timer: DeepSpeed's ThroughputTimer -- samples per second over
the optimizer steps after the first `start_step` (which include warm-up). The
engine starts it in forward and stops it in step(); it reads only the host
clock (no device synchronisation), so on a GPU it measures what the host
sees."""
import time


class ThroughputTimer:
    def __init__(self, batch_size: int, start_step: int = 2):
        self.batch_size = 1 if batch_size is None else batch_size
        self.start_step = start_step
        self.epoch_count = 0
        self.micro_step_count = 0
        self.global_step_count = 0
        self.total_elapsed_time = 0.0
        self.step_elapsed_time = 0.0
        self.started = False
        self.start_time = 0.0

    def update_epoch_count(self):
        self.epoch_count += 1
        self.micro_step_count = 0

    def start(self):
        self.started = True
        if self.global_step_count >= self.start_step:
            self.start_time = time.time()

    def stop(self, global_step: bool = False, report_speed: bool = False):
        if not self.started:
            return
        self.started = False
        self.micro_step_count += 1
        if global_step:
            self.global_step_count += 1
        if self.start_time > 0:
            duration = time.time() - self.start_time
            self.total_elapsed_time += duration
            self.step_elapsed_time += duration
            if global_step:
                self.step_elapsed_time = 0.0

    def avg_samples_per_sec(self) -> float:
        """Training samples per second since start_step; -inf before any step."""
        steps = self.global_step_count - self.start_step
        if self.global_step_count > 0 and steps > 0 and self.total_elapsed_time > 0:
            return self.batch_size / (self.total_elapsed_time / steps)
        return float("-inf")
