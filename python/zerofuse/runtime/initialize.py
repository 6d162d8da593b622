"""zerofuse.initialize: build the Engine and return DeepSpeed's four-tuple
(engine, optimizer, training_dataloader, lr_scheduler)."""
import torch

from .config import ConfigError
from .engine import Engine


def config_from(config=None, config_params=None, args=None):
    """The config from DeepSpeed's three places: config=, config_params=, or
    args.deepspeed_config (args.deepscale_config, its old name)."""
    if config is None:
        config = config_params
    from_args = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if from_args is not None:
        if config is not None:
            raise ConfigError("initialize: the config was given both in args.deepspeed_config and as an argument; "
                              "give it once")
        config = from_args
    if config is None:
        raise ConfigError("initialize: 'config' is required (a dict or the path of a JSON file, or "
                          "args.deepspeed_config / --deepspeed_config)")
    return config


def initialize(model=None, config=None, model_parameters=None, optimizer=None, lr_scheduler=None,
               training_data=None, process_group=None, collate_fn=None, args=None, config_params=None, mpu=None):
    """DeepSpeed's initialize: returns (engine, optimizer, dataloader, lr_scheduler).

    model: a torch.nn.Module. config: a dict or the path of a JSON file
    (DeepSpeed's keys). model_parameters: the parameters (or param groups) to
    train; default model.parameters(). optimizer: instead of the config's
    "optimizer", a torch.optim.Optimizer over the model's parameters (its
    param groups and hyper-parameters are used) or a callable making one from
    model_parameters. lr_scheduler: instead of the config's "scheduler", a
    scheduler built on that optimizer, or a callable taking the engine's
    optimizer. training_data: a torch Dataset, for which a data loader is
    made (DeepSpeed's sampling, sharded across ranks). process_group: the
    data-parallel group when the script runs data parallel inside a larger
    layout (or mpu, a Megatron-style object with get_data_parallel_group()).
    """
    if model is None or not isinstance(model, torch.nn.Module):
        raise TypeError(f"zerofuse.initialize: 'model' must be a torch.nn.Module, got {type(model).__name__}")
    from ..pipe.module import PipelineModule  # the pipeline package builds on the engine
    kind = Engine
    if isinstance(model, PipelineModule):
        from ..pipe.engine import PipelineEngine
        kind = PipelineEngine
    engine = kind(model, config_from(config, config_params, args), model_parameters, optimizer, lr_scheduler,
                    training_data, process_group, collate_fn, mpu=mpu)
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler
