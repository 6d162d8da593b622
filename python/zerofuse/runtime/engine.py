"""zerofuse.initialize and the Engine: DeepSpeed's training loop API on
zerofuse's flat, partitioned buffers and fused kernels.

    engine, optimizer, dataloader, lr_scheduler = zerofuse.initialize(model=model, config="ds_config.json")
    for batch in dataloader:
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
"""
import json
import sys
import time
from typing import Optional

import torch

from .. import ops  # noqa: F401  (registers zerofuse's torch ops before models use them)
from . import distributed
from .config import Config, ConfigError, parse_config
from .monitor import Monitor
from .progress import TrainingProgress
from .schedulers import build_scheduler
from .step_control import StepControlSettings
from .zero_optimizer import HYPERPARAMETERS, ZeroOptimizer

_LOW_PRECISION = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def initialize(model=None, config=None, model_parameters=None, optimizer=None, lr_scheduler=None,
               training_data=None, process_group=None, collate_fn=None, args=None, config_params=None):
    """DeepSpeed's initialize: returns (engine, optimizer, dataloader, lr_scheduler).

    model: a torch.nn.Module. config: a dict or the path of a JSON file
    (DeepSpeed's keys). model_parameters: the parameters (or param groups) to
    train; default model.parameters(). optimizer: instead of the config's
    "optimizer", a torch.optim.Adam/AdamW or zerofuse FusedAdam over the model's
    parameters (its param groups and hyper-parameters are used), or a callable
    taking param groups. lr_scheduler: instead of the config's "scheduler", a
    callable taking the optimizer (or a scheduler built on the optimizer given).
    training_data: a torch Dataset, for which a DataLoader is made (sharded
    across ranks). process_group: the data-parallel group, when the script runs
    data parallel inside a larger layout.
    """
    if model is None or not isinstance(model, torch.nn.Module):
        raise TypeError(f"zerofuse.initialize: 'model' must be a torch.nn.Module, got {type(model).__name__}")
    if config is None:
        config = config_params
    if config is None and args is not None and getattr(args, "deepspeed_config", None):
        config = args.deepspeed_config
    if config is None:
        raise ConfigError("zerofuse.initialize: 'config' is required (a dict or the path of a JSON file)")
    engine = Engine(model, config, model_parameters, optimizer, lr_scheduler, training_data, process_group,
                    collate_fn)
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler


def _param_groups(model, model_parameters, optimizer, config: Config):
    """The param groups to train, each with every Adam hyper-parameter set."""
    if optimizer is not None and config.optimizer is not None:
        raise ConfigError("zerofuse.initialize: give the optimizer either in the config or as 'optimizer', not both")
    if isinstance(optimizer, torch.optim.Optimizer):
        from ..optim import FusedAdam
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, FusedAdam)):
            raise TypeError(f"zerofuse.initialize: 'optimizer' must be torch.optim.Adam/AdamW or zerofuse FusedAdam "
                            f"(zerofuse runs Adam on its partitioned buffers), got {type(optimizer).__name__}")
        for group in optimizer.param_groups:
            if group.get("amsgrad") or group.get("maximize"):
                raise ValueError("zerofuse.initialize: amsgrad and maximize are not supported")
            if "adam_w_mode" not in group:
                group["adam_w_mode"] = isinstance(optimizer, torch.optim.AdamW) or bool(
                    group.get("decoupled_weight_decay", False))
            group.setdefault("bias_correction", True)
        return optimizer.param_groups, optimizer  # shared: schedulers built on it keep working
    oc = config.optimizer
    defaults = dict(lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps, weight_decay=oc.weight_decay,
                    adam_w_mode=oc.adam_w_mode, bias_correction=oc.bias_correction) if oc else dict(
        lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, adam_w_mode=True, bias_correction=True)
    params = list(model.parameters() if model_parameters is None else model_parameters)
    if params and isinstance(params[0], dict):
        groups = [dict(defaults, **g) for g in params]
    else:
        groups = [dict(defaults, params=params)]
    for g in groups:
        g["params"] = [p for p in g["params"] if p.requires_grad]
        unknown = set(g) - set(HYPERPARAMETERS) - {"params", "name", "initial_lr"}
        if unknown:
            raise ConfigError(f"zerofuse.initialize: param group keys {sorted(unknown)} are not Adam hyper-parameters")
    if callable(optimizer):  # DeepSpeed allows a callable that builds the optimizer from param groups
        built = optimizer(groups)
        return _param_groups(model, None, built, config)
    return groups, None


def _cast_inputs(obj, dtype, device):
    """Floating tensors to the model's dtype and device, through lists, tuples and dicts."""
    if isinstance(obj, torch.Tensor):
        obj = obj.to(device, non_blocking=True)
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        cast = [_cast_inputs(x, dtype, device) for x in obj]
        return type(obj)(cast) if not hasattr(obj, "_fields") else type(obj)(*cast)
    if isinstance(obj, dict):
        return type(obj)((k, _cast_inputs(v, dtype, device)) for k, v in obj.items())
    return obj


class Engine:
    def __init__(self, model, config, model_parameters=None, optimizer=None, lr_scheduler=None,
                 training_data=None, process_group=None, collate_fn=None):
        self.placement = distributed.setup(process_group)
        self.config: Config = parse_config(config, self.placement.world_size)
        c = self.config
        self.device = self.placement.device
        self.model_dtype = torch.float16 if c.fp16.enabled else torch.bfloat16 if c.bf16_enabled else torch.float32
        comm = _LOW_PRECISION[c.communication_data_type] if c.communication_data_type else self.model_dtype

        groups, user_optimizer = _param_groups(model, model_parameters, optimizer, c)
        trainable = {id(p) for g in groups for p in g["params"] if p.requires_grad}
        named = [(n, p) for n, p in model.named_parameters() if id(p) in trainable]
        if len(named) != len(trainable):
            raise ValueError("zerofuse.initialize: every parameter to train must belong to 'model'")
        # Frozen parameters and buffers take the model dtype like the rest (as DeepSpeed).
        with torch.no_grad():
            for p in model.parameters():
                if id(p) not in trainable:
                    p.data = p.data.to(self.device, self.model_dtype if p.is_floating_point() else p.dtype)
            for name, buf in list(model.named_buffers()):
                dtype = self.model_dtype if buf.is_floating_point() else buf.dtype
                _set_buffer(model, name, buf.to(self.device, dtype))
            for _, p in named:  # trainable: the optimizer reads their fp32 values, then makes them views
                p.data = p.data.to(self.device)
        self.module = model

        bucket = min(c.zero.reduce_bucket_size, c.zero.allgather_bucket_size)
        self.optimizer = ZeroOptimizer(groups, named, self.placement, stage=c.zero.stage, model_dtype=self.model_dtype,
                                       comm_dtype=comm, bucket_elements=bucket, overlap_comm=c.zero.overlap_comm,
                                       reduce_scatter=c.zero.reduce_scatter,
                                       step_control=StepControlSettings.from_config(c))
        if user_optimizer is not None:
            self.optimizer.param_groups = user_optimizer.param_groups

        if lr_scheduler is not None and c.scheduler is not None:
            raise ConfigError("zerofuse.initialize: give the scheduler either in the config or as 'lr_scheduler', "
                              "not both")
        if c.scheduler is not None:
            self.lr_scheduler = build_scheduler(c.scheduler, self.optimizer)
        elif callable(lr_scheduler) and not hasattr(lr_scheduler, "step"):
            self.lr_scheduler = lr_scheduler(self.optimizer)
        else:
            self.lr_scheduler = lr_scheduler

        self.training_dataloader = self._dataloader(training_data, collate_fn) if training_data is not None else None
        self.progress = TrainingProgress()
        self._lr_kwargs = None  # what the last engine.step() passed on to the schedule
        self._last_loss = None
        self._step_start = time.perf_counter()
        self.monitor = Monitor(c, self.placement.is_main)
        if self.placement.is_main:
            self._print_config()

    # --- DeepSpeed's properties -----------------------------------------------------------------

    @property
    def micro_steps(self) -> int:
        """engine.step() calls so far (after a resume: counted from the checkpoint's steps)."""
        return self.progress.micro_steps(self.config.gradient_accumulation_steps)

    @property
    def global_steps(self) -> int:
        """Optimizer steps applied (a skipped step does not count)."""
        return self.optimizer.applied_steps

    @property
    def skipped_steps(self) -> int:
        return self.optimizer.skipped_steps

    @property
    def global_samples(self) -> int:
        return (self.global_steps + self.skipped_steps) * self.config.train_batch_size

    @property
    def loss_scale(self) -> float:
        return self.optimizer.step_control.loss_scale

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.config.gradient_accumulation_steps

    def train_batch_size(self) -> int:
        return self.config.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.config.train_micro_batch_size_per_gpu

    def was_step_skipped(self) -> bool:
        """Whether the last optimizer step was skipped (inf/NaN gradients)."""
        return self.optimizer.step_control.last_step_skipped

    def get_global_grad_norm(self) -> Optional[float]:
        """The last step's gradient norm before clipping (None if it overflowed)."""
        return self.optimizer.step_control.last_grad_norm

    def get_lr(self):
        """Each group's learning rate for the next step: as in DeepSpeed, the
        schedule has been stepped once per applied optimizer step. On a GPU
        the last step's outcome is read first (a wait for the device)."""
        self._step_scheduler_for_applied_steps(self._lr_kwargs)
        return [g["lr"] for g in self.optimizer.param_groups]

    def is_gradient_accumulation_boundary(self) -> bool:
        return self.progress.micro_steps_in_window + 1 == self.config.gradient_accumulation_steps

    def memory_report(self):
        return self.optimizer.memory_report()

    # --- the module -----------------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        args = _cast_inputs(args, self.model_dtype, self.device)
        kwargs = _cast_inputs(kwargs, self.model_dtype, self.device)
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def eval(self):
        self.module.eval()
        return self

    def parameters(self, recurse=True):
        return self.module.parameters(recurse)

    def named_parameters(self, *args, **kwargs):
        return self.module.named_parameters(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    # --- backward and step ---------------------------------------------------------------------------------

    def backward(self, loss, retain_graph: bool = False):
        """Back-propagate loss * loss_scale / gradient_accumulation_steps;
        gradients go straight into zerofuse's buffers."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("engine.backward: 'loss' must be a tensor with one element")
        c = self.config
        first = self.progress.micro_steps_in_window == 0
        reducer = self.optimizer.reducer
        reducer.begin_backward(boundary=self.is_gradient_accumulation_boundary(), first_in_window=first)
        self._last_loss = loss.detach()
        factor = self.optimizer.loss_scale_tensor.to(torch.float32) / c.gradient_accumulation_steps
        try:
            (loss.float().reshape(1) * factor).backward(retain_graph=retain_graph)
        finally:
            reducer.end_backward()
        return loss

    def step(self, lr_kwargs=None):
        """Count the micro-step; at an accumulation boundary, step the optimizer
        (and the learning-rate schedule, when the step was applied)."""
        if not self.progress.count_micro_step(self.config.gradient_accumulation_steps):
            return
        self._lr_kwargs = lr_kwargs
        self._step_scheduler_for_applied_steps(lr_kwargs)
        self.optimizer.step()
        if self.device.type != "cuda":  # on the CPU the outcome is known at once; CUDA reads it lazily
            self._step_scheduler_for_applied_steps(lr_kwargs)
        self._after_step()

    def _step_scheduler_for_applied_steps(self, lr_kwargs=None):
        """DeepSpeed steps the schedule after every applied optimizer step. The
        outcome of a step is on the device; catch up with what the host now knows."""
        applied = self.optimizer.applied_steps
        while self.progress.scheduler_steps < applied:
            self.progress.scheduler_steps += 1
            if self.lr_scheduler is not None:
                self.lr_scheduler.step(**(lr_kwargs or {}))

    def _after_step(self):
        """Monitoring and the periodic report. Both read the step's outcome on
        the host, so they run only when asked for: every step with a monitor
        enabled, otherwise every steps_per_print steps (overflows are counted on
        the device meanwhile and reported there, one line for all of them)."""
        c = self.config
        steps_done = self.progress.optimizer_steps
        if self.monitor.enabled:
            self.monitor.write(self.global_samples, {
                "train_loss": None if self._last_loss is None else float(self._last_loss.float()),
                "lr": self.get_lr()[0], "loss_scale": self.loss_scale, "grad_norm": self.get_global_grad_norm()})
        if steps_done % c.steps_per_print or not self.placement.is_main:
            return
        skipped = self.skipped_steps
        new_overflows, self.progress.skipped_reported = skipped - self.progress.skipped_reported, skipped
        now = time.perf_counter()
        line = (f"[zerofuse] step={self.global_steps}, skipped={skipped}, lr={self.get_lr()}, "
                f"loss_scale={self.loss_scale:g}")
        if c.wall_clock_breakdown:
            line += f", {(now - self._step_start) / c.steps_per_print * 1e3:.1f} ms/step"
        self._step_start = now
        print(line, flush=True)
        if new_overflows:
            print(f"[zerofuse] {new_overflows} step(s) skipped for inf/NaN gradients since the last report",
                  flush=True)
            if c.fp16.enabled and self.loss_scale <= c.fp16.min_loss_scale:
                print(f"[zerofuse] warning: the loss scale is at min_loss_scale ({c.fp16.min_loss_scale:g}) and "
                      "gradients still overflow; those steps are skipped and training continues",
                      file=sys.stderr, flush=True)

    # --- data ---------------------------------------------------------------------------------------------

    def _dataloader(self, dataset, collate_fn):
        sampler = None
        if self.placement.world_size > 1:
            sampler = torch.utils.data.distributed.DistributedSampler(
                dataset, num_replicas=self.placement.world_size, rank=self.placement.rank)
        return torch.utils.data.DataLoader(dataset, batch_size=self.config.train_micro_batch_size_per_gpu,
                                           sampler=sampler, shuffle=False, collate_fn=collate_fn, drop_last=True)

    # --- checkpoints ------------------------------------------------------------------------------------------

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True):
        from .checkpoint import save_checkpoint
        return save_checkpoint(self, save_dir, tag, client_state or {}, save_latest)

    def load_checkpoint(self, load_dir, tag=None, load_optimizer_states=True, load_lr_scheduler_states=True,
                        load_module_only=False):
        from .checkpoint import load_checkpoint
        return load_checkpoint(self, load_dir, tag, load_optimizer_states, load_lr_scheduler_states,
                               load_module_only)

    # --- start-up report ------------------------------------------------------------------------------------

    def _print_config(self):
        c = self.config
        print(f"[zerofuse] world size {self.placement.world_size}, device {self.device}, ZeRO stage {c.zero.stage}, "
              f"dtype {str(self.model_dtype).replace('torch.', '')}", flush=True)
        print("[zerofuse] resolved config: " + json.dumps(c.to_dict(), sort_keys=True), flush=True)
        if c.inert_keys:
            print("[zerofuse] accepted with no effect for ZeRO-1/2: " + ", ".join(c.inert_keys), flush=True)
        if c.memory_breakdown:
            print("[zerofuse] memory per rank (bytes): " + json.dumps(self.memory_report()), flush=True)


def _set_buffer(module, dotted_name, value):
    *path, leaf = dotted_name.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    owner._buffers[leaf] = value
