"""deepspeed.runtime: the engine, config, data loader, schedules and
activation checkpointing, ZeRO-3's zero.Init and pipelines, under DeepSpeed's module paths."""
from . import activation_checkpointing, config, dataloader, engine, lr_schedules, pipe, utils, zero  # noqa: F401
