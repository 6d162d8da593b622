"""DeepSpeed's engine getters (deepspeed.runtime.engine.DeepSpeedEngine), as
methods with DeepSpeed's names and meanings, read from the parsed config
(`engine._config`). Kept apart from the engine's training logic."""
import torch

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class EngineQueries:
    # --- batch and schedule ---------------------------------------------------------------------

    def train_batch_size(self) -> int:
        return self._config.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        return self._config.train_micro_batch_size_per_gpu

    def gradient_accumulation_steps(self) -> int:
        return self._config.gradient_accumulation_steps

    def steps_per_print(self) -> int:
        return self._config.steps_per_print

    def wall_clock_breakdown(self) -> bool:
        return self._config.wall_clock_breakdown

    def memory_breakdown(self) -> bool:
        return self._config.memory_breakdown

    def dataloader_drop_last(self) -> bool:
        return self._config.dataloader_drop_last

    def gradient_clipping(self) -> float:
        return self._config.gradient_clipping

    # --- precision ------------------------------------------------------------------------------

    def fp16_enabled(self) -> bool:
        return self._config.fp16.enabled

    def bfloat16_enabled(self) -> bool:
        return self._config.bf16_enabled

    def torch_autocast_enabled(self) -> bool:
        return self._config.torch_autocast.enabled

    def torch_autocast_dtype(self) -> torch.dtype:
        return getattr(torch, self._config.torch_autocast.dtype)

    def dynamic_loss_scale(self) -> bool:
        return self._config.fp16.enabled and self._config.fp16.dynamic

    def initial_dynamic_scale(self) -> float:
        return 2.0 ** self._config.fp16.initial_scale_power

    def dynamic_loss_scale_args(self):
        f = self._config.fp16
        return dict(init_scale=2.0 ** f.initial_scale_power, scale_window=f.loss_scale_window,
                    min_scale=f.min_loss_scale, delayed_shift=f.hysteresis,
                    consecutive_hysteresis=f.consecutive_hysteresis) if self.dynamic_loss_scale() else None

    def loss_scale(self) -> float:
        """The current loss scale (a host read of the device value)."""
        return self.optimizer.step_control.loss_scale

    @property
    def communication_data_type(self) -> torch.dtype:
        c = self._config.communication_data_type
        return _DTYPES[c] if c else self.model_dtype

    def postscale_gradients(self) -> bool:
        return not self._config.prescale_gradients

    def gradient_predivide_factor(self) -> float:
        return self._config.gradient_predivide_factor

    # --- optimizer and schedule -----------------------------------------------------------------

    def optimizer_name(self):
        return type(self.client_optimizer).__name__ if self.client_optimizer is not None else (
            self._config.optimizer.type if self._config.optimizer else None)

    def optimizer_params(self):
        return dict(self._config.optimizer.params) if self._config.optimizer else None

    def scheduler_name(self):
        return self._config.scheduler.type if self._config.scheduler else None

    def scheduler_params(self):
        return dict(self._config.scheduler.params) if self._config.scheduler else None

    def zero_allow_untested_optimizer(self) -> bool:
        return self._config.zero_allow_untested_optimizer

    # --- ZeRO -----------------------------------------------------------------------------------

    def zero_optimization(self) -> bool:
        return self._config.zero.stage > 0

    def zero_optimization_stage(self) -> int:
        return self._config.zero.stage

    def zero_optimization_partition_gradients(self) -> bool:
        return self._config.zero.stage >= 2

    def zero_optimization_partition_weights(self) -> bool:
        return self._config.zero.stage >= 3

    def zero_gather_16bit_weights_on_model_save(self) -> bool:
        return self._config.zero.gather_16bit_weights_on_model_save

    def zero_prefetch_bucket_size(self) -> int:
        return self._config.zero.prefetch_bucket_size

    def zero_param_persistence_threshold(self) -> int:
        return self._config.zero.param_persistence_threshold

    def zero_max_live_parameters(self) -> int:
        return self._config.zero.max_live_parameters

    def zero_max_reuse_distance(self) -> int:
        return self._config.zero.max_reuse_distance

    def zero_reduce_bucket_size(self) -> int:
        return self._config.zero.reduce_bucket_size

    def zero_allgather_bucket_size(self) -> int:
        return self._config.zero.allgather_bucket_size

    def zero_overlap_comm(self) -> bool:
        return self._config.zero.overlap_comm

    def zero_reduce_scatter(self) -> bool:
        return self._config.zero.reduce_scatter

    def zero_contiguous_gradients(self) -> bool:
        return True  # gradients always go straight into flat buffers

    def zero_offload_optimizer(self):
        return None  # no ZeRO-Offload: on the CPU the state is already there

    def zero_offload_param(self):
        return None

    def zero_cpu_offload(self) -> bool:
        return False

    # --- process grid ---------------------------------------------------------------------------

    def get_data_parallel_rank(self) -> int:
        return self.placement.rank

    def get_model_parallel_rank(self) -> int:
        return 0 if self.mpu is None else self.mpu.get_model_parallel_rank()

    def get_tensor_parallel_rank(self) -> int:
        return 0 if self.mpu is None else self.mpu.get_model_parallel_rank()

    def get_pipeline_parallel_rank(self) -> int:
        return 0
