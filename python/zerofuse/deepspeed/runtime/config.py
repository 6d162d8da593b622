"""deepspeed.runtime.config: DeepSpeedConfig reads a DeepSpeed config with
zerofuse's parser (every key validated; see zerofuse.runtime.config) and
offers DeepSpeed's attribute names for what it resolved."""
from ...runtime.config import ConfigError as DeepSpeedConfigError  # noqa: F401
from ...runtime.config import load_raw, parse_config


class DeepSpeedConfig:
    def __init__(self, config, mpu=None, mesh_device=None):
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_initialized() else 1
        if mpu is not None:
            world = mpu.get_data_parallel_world_size()
        self._param_dict = load_raw(config)
        self._config = c = parse_config(self._param_dict, world)
        self.world_size = world
        self.train_batch_size = c.train_batch_size
        self.train_micro_batch_size_per_gpu = c.train_micro_batch_size_per_gpu
        self.gradient_accumulation_steps = c.gradient_accumulation_steps
        self.steps_per_print = c.steps_per_print
        self.gradient_clipping = c.gradient_clipping
        self.fp16_enabled = c.fp16.enabled
        self.bfloat16_enabled = c.bf16_enabled
        self.zero_optimization_stage = c.zero.stage
        self.zero_enabled = c.zero.stage > 0
        self.optimizer_name = c.optimizer.type.lower() if c.optimizer else None
        self.optimizer_params = dict(c.optimizer.params) if c.optimizer else None
        self.scheduler_name = c.scheduler.type if c.scheduler else None
        self.scheduler_params = dict(c.scheduler.params) if c.scheduler else None
        self.prescale_gradients = c.prescale_gradients
        self.gradient_predivide_factor = c.gradient_predivide_factor
        self.wall_clock_breakdown = c.wall_clock_breakdown
        self.memory_breakdown = c.memory_breakdown
        self.dataloader_drop_last = c.dataloader_drop_last
        self.zero_allow_untested_optimizer = c.zero_allow_untested_optimizer

    def print(self, name):
        import json
        print(f"{name}: " + json.dumps(self._config.to_dict(), sort_keys=True, indent=2))
