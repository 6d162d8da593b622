"""The Engine: DeepSpeed's training-loop API (deepspeed.runtime.engine.
DeepSpeedEngine) on zerofuse's flat, partitioned buffers and fused kernels.

    engine, optimizer, dataloader, lr_scheduler = zerofuse.initialize(model=model, config="ds_config.json")
    for batch in dataloader:
        loss = engine(batch)
        engine.backward(loss)
        engine.step()

Like DeepSpeed's, the engine is a torch.nn.Module wrapping the model as
`engine.module` (so `engine.state_dict()` keys start with "module."; the
model's own are `engine.module_state_dict()`), and attributes it does not have
are looked up on the model.
"""
import contextlib
import json
import os
import sys
import time
from typing import NamedTuple, Optional

import torch

from .. import ops  # noqa: F401  (registers zerofuse's torch ops before models use them)
from . import distributed
from .config import ConfigError, parse_config
from .dataloader import DeepSpeedDataLoader
from .engine_queries import EngineQueries
from .monitor import Monitor
from .optimizer_setup import choose_optimizer
from .progress import TrainingProgress
from .schedulers import build_scheduler
from .step_control import StepControlSettings
from .comms_log import COMMS_LOG
from .stage3.init_partition import stop_partitioning
from .stage3.partitioned_params import PartitionedParameters
from .stage3.units import plan_units
from .timers import ThroughputTimer
from .zero_optimizer import ZeroOptimizer

_LOW_PRECISION = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


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


def _set_buffer(module, dotted_name, value):
    *path, leaf = dotted_name.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    owner._buffers[leaf] = value


def _loss_of(output):
    """The loss a model's output carries: the tensor itself, or a Hugging Face
    output's .loss / ["loss"]."""
    if isinstance(output, torch.Tensor):
        return output
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    if loss is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        loss = output[0]
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"engine.train_batch: the model's output ({type(output).__name__}) holds no loss tensor")
    return loss


class TensorParallel(NamedTuple):
    """This rank's tensor-parallel group (engine.tp; None without tensor parallelism)."""

    group: object
    rank: int
    size: int


def _tensor_parallel_grid(model, config):
    """The grid of a model split for tensor parallelism (by tp_model_init, or
    now: "tensor_parallel": {"autotp_size": N} in the config); None without."""
    from .config import load_raw, parse_tensor_parallel
    raw = load_raw(config)
    size = parse_tensor_parallel(raw["tensor_parallel"]) if "tensor_parallel" in raw else 1
    grid = getattr(model, "zerofuse_tp_grid", None)
    if grid is not None and size > 1 and grid.get_tensor_model_parallel_world_size() != size:
        raise ConfigError(f"config['tensor_parallel']['autotp_size'] is {size} but the model was split over "
                          f"{grid.get_tensor_model_parallel_world_size()} ranks by tp_model_init")
    if grid is None and size > 1:
        from ..tp.auto import tp_model_init
        grid = tp_model_init(model, size).zerofuse_tp_grid
    return grid


class Engine(EngineQueries, torch.nn.Module):
    _PIPELINE = False  # the pipeline engine (zerofuse.pipe) parses the config's pipeline section
    _EXTRA_METRICS = ()  # metrics a subclass adds to the monitor's (see _step_metrics)

    def __init__(self, model, config, model_parameters=None, optimizer=None, lr_scheduler=None,
                 training_data=None, process_group=None, collate_fn=None, mpu=None):
        super().__init__()
        if mpu is None and process_group is None:
            mpu = _tensor_parallel_grid(model, config)  # AutoTP: the model is split here when the config asks
        if mpu is not None and process_group is None:
            process_group = mpu.get_data_parallel_group()
        self.placement = distributed.setup(process_group)
        self.mpu = mpu
        self.config = config  # as given (DeepSpeed keeps it so); the parsed form is self._config
        self._config = parse_config(config, self.placement.world_size,
                                    cpu_engine=self.placement.device.type == "cpu", pipeline=self._PIPELINE)
        c = self._config
        self.model_dtype = torch.float16 if c.fp16.enabled else torch.bfloat16 if c.bf16_enabled else torch.float32
        comm = _LOW_PRECISION[c.communication_data_type] if c.communication_data_type else self.model_dtype

        setup = choose_optimizer(model, model_parameters, optimizer, c)
        self.client_optimizer = setup.client
        trainable = {id(p) for g in setup.groups for p in g["params"] if p.requires_grad}
        named = [(n, p) for n, p in model.named_parameters() if id(p) in trainable]
        if len(named) != len(trainable):
            raise ValueError("zerofuse.initialize: every parameter to train must belong to 'model'")
        self._move_model(model, trainable, named)
        self.module = model
        unit_plan = None
        if c.zero.stage == 3:
            unit_plan = plan_units(model, trainable, c.zero.param_persistence_threshold,
                                   c.zero.model_persistence_threshold)

        bucket = min(c.zero.reduce_bucket_size, c.zero.allgather_bucket_size)
        world = self.placement.world_size
        divide_before = world if c.prescale_gradients else (
            c.gradient_predivide_factor if c.gradient_predivide_factor != 1.0 else None)
        control = StepControlSettings.from_config(c)
        if c.torch_autocast.enabled and c.torch_autocast.dtype == "float16" and not control.dynamic_loss_scale:
            # float16 autocast: gradients scaled as DeepSpeed does with a GradScaler.
            control = StepControlSettings(dynamic_loss_scale=True, max_grad_norm=c.gradient_clipping)
        self.optimizer = ZeroOptimizer(setup.groups, named, self.placement, stage=c.zero.stage,
                                       model_dtype=self.model_dtype, comm_dtype=comm, bucket_elements=bucket,
                                       overlap_comm=c.zero.overlap_comm, reduce_scatter=c.zero.reduce_scatter,
                                       step_control=control, update_rule=setup.rule, divide_before=divide_before,
                                       unit_of=unit_plan.unit_of if unit_plan else None)
        self.partitioned = None  # ZeRO-3's gathering of parameters (stage3/partitioned_params.py)
        if unit_plan is not None:
            self.partitioned = PartitionedParameters(self.optimizer, model, unit_plan.keys_of_module, c.zero)
            self.optimizer.partitioned = self.partitioned
            self.optimizer.reducer.after_grad = self.partitioned.gradient_arrived
        self._count_tensor_parallel_once(mpu)
        COMMS_LOG.configure(**c.comms_logger)
        if setup.client is not None:
            self.optimizer.param_groups = setup.client.param_groups  # schedulers built on the client's keep working

        # DeepSpeed's order: a scheduler passed to initialize() wins over the config's.
        self._notes = list(setup.notes)
        if lr_scheduler is not None:
            if c.scheduler is not None:
                self._notes.append("the lr_scheduler passed to initialize() is used; the config's 'scheduler' "
                                   "section is not (as in DeepSpeed)")
            is_scheduler = hasattr(lr_scheduler, "step") and hasattr(lr_scheduler, "state_dict")
            self.lr_scheduler = lr_scheduler if is_scheduler else lr_scheduler(self.optimizer)
        else:
            self.lr_scheduler = build_scheduler(c.scheduler, self.optimizer) if c.scheduler else None

        self.progress = TrainingProgress()
        self.tput_timer = ThroughputTimer(c.train_batch_size)
        self.training_dataloader = self.deepspeed_io(training_data, collate_fn=collate_fn) \
            if training_data is not None else None
        self._lr_kwargs = None  # what the last engine.step() passed on to the schedule
        self._last_loss = None
        self._boundary_override = None  # set_gradient_accumulation_boundary()
        self._inside_no_sync = False
        self._step_start = time.perf_counter()
        self.monitor = Monitor(c, self._reports, self._EXTRA_METRICS)
        if self._reports:
            self._print_config()

    def _count_tensor_parallel_once(self, mpu):
        """With a Megatron-style mpu whose tensor-parallel group has several
        ranks: the gradient statistics (norm, inf/NaN) are summed over that
        group too, and a replicated parameter (one without Megatron's
        `tensor_model_parallel` mark) counts only on the group's first rank."""
        self.tp = None
        if mpu is None:
            return
        size = getattr(mpu, "get_tensor_model_parallel_world_size", getattr(mpu, "get_model_parallel_world_size",
                                                                            None))
        if size is None or size() <= 1:
            return
        if self._config.zero.stage == 3:
            raise ConfigError("ZeRO stage 3 with tensor parallelism (an mpu with a tensor-parallel group of "
                              f"{size()} ranks) is not supported; use stage 0, 1 or 2")
        group = (getattr(mpu, "get_tensor_model_parallel_group", None) or mpu.get_model_parallel_group)()
        rank = (getattr(mpu, "get_tensor_model_parallel_rank", None) or mpu.get_model_parallel_rank)()
        self.tp = TensorParallel(group, rank, size())
        self.optimizer.extra_stat_groups.append(group)
        if rank != 0:
            self.optimizer.exclude_from_norm([p for _, p in self.optimizer.named_trainable_parameters()
                                              if not getattr(p, "tensor_model_parallel", False)])

    def _move_model(self, model, trainable, named):
        """Frozen parameters and buffers take the model dtype like the rest (as
        DeepSpeed); trainable ones are read by the optimizer in fp32 first."""
        device = self.placement.device
        with torch.no_grad():
            for p in model.parameters():
                if id(p) not in trainable:
                    stop_partitioning(p)  # frozen parameters are kept whole (zero.Init partitioned them)
                    p.data = p.data.to(device, self.model_dtype if p.is_floating_point() else p.dtype)
            for name, buf in list(model.named_buffers()):
                dtype = self.model_dtype if buf.is_floating_point() else buf.dtype
                _set_buffer(model, name, buf.to(device, dtype))
            for _, p in named:
                p.data = p.data.to(device)

    def __getattr__(self, name):
        """Attributes the engine does not have come from the model (as DeepSpeed's)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self._modules.get("module")
            if module is not None and name != "module":
                try:
                    return getattr(module, name)
                except AttributeError:
                    pass
            raise AttributeError(f"'{type(self).__name__}' object and its model have no attribute '{name}'") from None

    # --- where it runs ----------------------------------------------------------------------------

    @property
    def _reports(self) -> bool:
        """Whether this rank prints the reports and writes the monitor's files."""
        return self.placement.is_main

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", "0") or 0)

    @property
    def global_rank(self) -> int:
        return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    @property
    def world_size(self) -> int:
        return self.placement.world_size

    @property
    def dp_world_size(self) -> int:
        return self.placement.world_size

    # --- counters (DeepSpeed's meanings) ---------------------------------------------------------

    @property
    def global_steps(self) -> int:
        """Optimizer steps taken: every accumulation boundary, skipped or not (DeepSpeed's meaning)."""
        return self.progress.optimizer_steps

    @property
    def applied_steps(self) -> int:
        """Optimizer steps applied (a step skipped for inf/NaN gradients does not count)."""
        return self.optimizer.applied_steps

    @property
    def skipped_steps(self) -> int:
        return self.optimizer.skipped_steps

    @property
    def global_samples(self) -> int:
        return self.progress.optimizer_steps * self._config.train_batch_size

    @property
    def micro_steps(self) -> int:
        """engine.step() calls so far (after a resume: counted from the checkpoint's steps)."""
        return self.progress.micro_steps(self._config.gradient_accumulation_steps)

    def was_step_applied(self) -> bool:
        """Whether the last optimizer step was applied (not skipped for inf/NaN gradients)."""
        return not self.optimizer.step_control.last_step_skipped

    def was_step_skipped(self) -> bool:
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

    def get_mom(self):
        """Each group's momentum: betas for Adam-like optimizers, else 'momentum'."""
        return [g["betas"] if "betas" in g else g.get("momentum") for g in self.optimizer.param_groups]

    def get_type(self):
        return [type(self.client_optimizer or self.optimizer).__name__]

    def is_gradient_accumulation_boundary(self) -> bool:
        if self._boundary_override is not None:
            return self._boundary_override
        return self.progress.at_boundary(self._config.gradient_accumulation_steps)

    def set_gradient_accumulation_boundary(self, is_boundary: bool):
        """Override whether the next backward/step is an accumulation boundary
        (DeepSpeed's; pipelines and custom schedules use it). None restores counting."""
        self._boundary_override = None if is_boundary is None else bool(is_boundary)

    def memory_report(self):
        return self.optimizer.memory_report()

    # --- the module ---------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        if self.training_dataloader is None:
            self.tput_timer.start()
        return self._run_module(*args, **kwargs)

    def _run_module(self, *args, **kwargs):
        """The model on the inputs, cast to its dtype and device (and under autocast when configured)."""
        args = _cast_inputs(args, self.model_dtype, self.device)
        kwargs = _cast_inputs(kwargs, self.model_dtype, self.device)
        autocast = self._config.torch_autocast
        with torch.autocast(self.device.type, dtype=getattr(torch, autocast.dtype)) if autocast.enabled \
                else contextlib.nullcontext():
            return self.module(*args, **kwargs)

    def module_state_dict(self, destination=None, prefix="", keep_vars=False, exclude_frozen_parameters=False):
        """The model's state_dict. ZeRO-3: whole parameters, gathered one module
        at a time, on the CPU (every rank must call it)."""
        if self.partitioned is not None:
            state = self.partitioned.consolidated_state_dict(keep=True,
                                                             exclude_frozen_parameters=exclude_frozen_parameters)
            out = destination if destination is not None else type(state)()
            for k, v in state.items():
                out[prefix + k] = v
            return out
        state = self.module.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        if exclude_frozen_parameters:
            frozen = {prefix + n for n, p in self.module.named_parameters() if not p.requires_grad}
            state = type(state)((k, v) for k, v in state.items() if k not in frozen)
        return state

    @torch.no_grad()
    def load_module_state_dict(self, state_dict, strict=True, custom_load_fn=None, fetch_z3_params=False):
        """Load model weights; the optimizer's fp32 masters are refreshed from them."""
        if self.partitioned is not None:
            return self._load_partitioned_module_state_dict(state_dict, strict, custom_load_fn)
        if custom_load_fn is not None:
            custom_load_fn(src=state_dict, dst=self.module)
            result = None
        else:
            result = self.module.load_state_dict(state_dict, strict=strict)
        self.optimizer.refresh_master_from_params()
        return result

    def _load_partitioned_module_state_dict(self, state_dict, strict, custom_load_fn):
        store = self.partitioned
        if custom_load_fn is None:
            return store.load_state_dict(state_dict, strict=strict)
        units = list(range(len(store.units)))  # the function sees the whole model
        store.acquire(units)
        try:
            custom_load_fn(src=state_dict, dst=self.module)
            store.keep_changes(units, from_rank=None)  # every rank loaded the same values
        finally:
            store.let_go_all(units)
        return None

    # --- backward and step -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside accumulate gradients without reducing them
        across ranks (DeepSpeed's no_sync; not with ZeRO stage 2, whose
        gradients live partitioned)."""
        if self._config.zero.stage >= 2:
            raise RuntimeError(f"engine.no_sync() is incompatible with gradient partitioning (ZeRO stage "
                               f"{self._config.zero.stage}); as in DeepSpeed, use stage 0 or 1")
        if self._inside_no_sync:
            raise RuntimeError("engine.no_sync() cannot be nested")
        self._inside_no_sync = True
        try:
            yield
        finally:
            self._inside_no_sync = False

    def backward(self, loss, retain_graph: bool = False, scale_wrt_gas: bool = True):
        """Back-propagate loss * loss_scale (/ gradient_accumulation_steps when
        scale_wrt_gas); gradients go straight into zerofuse's buffers."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("engine.backward: 'loss' must be a tensor with one element")
        first = self.progress.micro_steps_in_window == 0
        reducer = self.optimizer.reducer
        boundary = self.is_gradient_accumulation_boundary() and not self._inside_no_sync
        reducer.begin_backward(boundary=boundary, first_in_window=first)
        if self.partitioned is not None:
            self.partitioned.begin_backward()
        self._last_loss = loss.detach()
        try:
            self.scaled_loss(loss, scale_wrt_gas).backward(retain_graph=retain_graph)
        finally:
            reducer.end_backward()
            if self.partitioned is not None:
                self.partitioned.end_backward()
        return loss

    def scaled_loss(self, loss, scale_wrt_gas: bool = True) -> torch.Tensor:
        """loss * loss scale (/ gradient_accumulation_steps): what backward starts from."""
        factor = self.optimizer.loss_scale_tensor.to(torch.float32)
        if scale_wrt_gas:
            factor = factor / self._config.gradient_accumulation_steps
        return loss.float().reshape(1) * factor

    def step(self, lr_kwargs=None):
        """Count the micro-step; at an accumulation boundary, step the optimizer
        (and the learning-rate schedule, when the step was applied)."""
        if self._inside_no_sync:
            raise RuntimeError("engine.step() cannot be called inside engine.no_sync() (as in DeepSpeed)")
        boundary = self.progress.count_micro_step(self._config.gradient_accumulation_steps,
                                                  self.is_gradient_accumulation_boundary())
        self.tput_timer.stop(global_step=boundary)
        if boundary:
            self._optimizer_step(lr_kwargs)

    def _optimizer_step(self, lr_kwargs=None):
        """The optimizer step closing an accumulation window, then the schedule and the reports."""
        self._lr_kwargs = lr_kwargs
        self._step_scheduler_for_applied_steps(lr_kwargs)
        self.optimizer.step()
        COMMS_LOG.end_step()
        if self.device.type != "cuda":  # on the CPU the outcome is known at once; CUDA reads it lazily
            self._step_scheduler_for_applied_steps(lr_kwargs)
        self._after_step()

    def train_batch(self, data_iter=None):
        """One optimizer step over gradient_accumulation_steps micro-batches
        drawn from data_iter (default: the training data loader); returns the
        mean loss (detached). A batch that is a tuple/list is the model's
        positional arguments, a dict its keyword arguments; the model returns
        the loss (or an output carrying .loss), as DeepSpeed's pipeline
        engine's train_batch."""
        if data_iter is None:
            if self.training_dataloader is None:
                raise ValueError("engine.train_batch: give data_iter, or training_data to initialize()")
            if not hasattr(self, "_train_iter"):
                from .dataloader import RepeatingLoader
                self._train_iter = RepeatingLoader(self.training_dataloader)
            data_iter = self._train_iter
        self.train()
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for _ in range(self._config.gradient_accumulation_steps):
            batch = next(data_iter)
            if isinstance(batch, dict):
                output = self(**batch)
            elif isinstance(batch, (tuple, list)):
                output = self(*batch)
            else:
                output = self(batch)
            loss = _loss_of(output)
            self.backward(loss)
            self.step()
            total += loss.detach().float()
        return total / self._config.gradient_accumulation_steps

    def zero_grad(self, set_to_none: bool = True):
        """Parameters never hold a .grad (gradients live in zerofuse's buffers
        and are cleared at each optimizer step), so there is nothing to clear."""
        self.optimizer.zero_grad(set_to_none)

    def allreduce_gradients(self, bucket_size=None):
        """Gradients are reduced by the engine at the accumulation boundary's
        backward (DeepSpeed's reduce-after-accumulation), so there is nothing
        left to reduce when this is called."""

    def empty_partition_cache(self):
        """ZeRO-3: release every gathered parameter not in use (those kept
        for reuse); persistent ones stay. Nothing is cached at stages 0-2."""
        if self.partitioned is not None:
            self.partitioned.release_all()

    def _step_scheduler_for_applied_steps(self, lr_kwargs=None):
        """DeepSpeed steps the schedule after every applied optimizer step. The
        outcome of a step is on the device; catch up with what the host now knows."""
        applied = self.optimizer.applied_steps
        while self.progress.scheduler_steps < applied:
            self.progress.scheduler_steps += 1
            if self.lr_scheduler is not None:
                self.lr_scheduler.step(**(lr_kwargs or {}))

    def _step_metrics(self) -> dict:
        """The monitor's values for the step just taken."""
        return {"train_loss": None if self._last_loss is None else float(self._last_loss.float()),
                "lr": self.get_lr()[0], "loss_scale": self.loss_scale(), "grad_norm": self.get_global_grad_norm()}

    def _report_extra(self) -> str:
        """What a subclass adds to the periodic report line."""
        return ""

    def _after_step(self):
        """Monitoring and the periodic report. Both read the step's outcome on
        the host, so they run only when asked for: every step with a monitor
        enabled, otherwise every steps_per_print steps (overflows are counted on
        the device meanwhile and reported there, one line for all of them)."""
        c = self._config
        steps_done = self.progress.optimizer_steps
        if self.monitor.enabled:
            self.monitor.write(self.global_samples, self._step_metrics())
        if steps_done % c.steps_per_print or not self._reports:
            return
        skipped = self.skipped_steps
        new_overflows, self.progress.skipped_reported = skipped - self.progress.skipped_reported, skipped
        now = time.perf_counter()
        line = (f"[zerofuse] step={self.global_steps}, skipped={skipped}, lr={self.get_lr()}, "
                f"loss_scale={self.loss_scale():g}")
        if c.wall_clock_breakdown:
            line += f", {(now - self._step_start) / c.steps_per_print * 1e3:.1f} ms/step"
        line += self._report_extra()
        self._step_start = now
        print(line, flush=True)
        if new_overflows:
            print(f"[zerofuse] {new_overflows} step(s) skipped for inf/NaN gradients since the last report",
                  flush=True)
            if c.fp16.enabled and self.loss_scale() <= c.fp16.min_loss_scale:
                print(f"[zerofuse] warning: the loss scale is at min_loss_scale ({c.fp16.min_loss_scale:g}) and "
                      "gradients still overflow; those steps are skipped and training continues",
                      file=sys.stderr, flush=True)

    # --- data ---------------------------------------------------------------------------------------------

    def deepspeed_io(self, dataset, batch_size=None, route=None, pin_memory=False, data_sampler=None,
                     collate_fn=None, num_local_io_workers=None):
        """A loader over `dataset` with DeepSpeed's sampling (runtime/dataloader.py)."""
        if not isinstance(dataset, torch.utils.data.Dataset):
            raise ValueError(f"zerofuse: training data must be a torch.utils.data.Dataset, got "
                             f"{type(dataset).__name__}")
        return DeepSpeedDataLoader(dataset, batch_size or self._config.train_micro_batch_size_per_gpu,
                                   rank=self.placement.rank, world_size=self.placement.world_size,
                                   collate_fn=collate_fn, data_sampler=data_sampler,
                                   drop_last=self._config.dataloader_drop_last,
                                   num_local_io_workers=num_local_io_workers, pin_memory=pin_memory,
                                   tput_timer=self.tput_timer)

    # --- checkpoints ------------------------------------------------------------------------------------------

    holds_part_of_model = False  # a pipeline stage holds only its own layers

    @property
    def _file_rank(self) -> int:
        """The rank whose per-rank checkpoint files (random states) are this rank's."""
        return torch.distributed.get_rank() if self.tp is not None else self.placement.rank

    def _checkpoint_barrier(self):
        """Wait for every rank that shares this checkpoint (with tensor parallelism: all)."""
        if self.tp is not None:
            torch.distributed.barrier()
        elif self.placement.group is not None:
            torch.distributed.barrier(group=self.placement.group)

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True,
                        exclude_frozen_parameters=False):
        """Write a checkpoint (runtime/checkpoint.py); returns True, as DeepSpeed."""
        client_state = {} if client_state is None else client_state
        if self.tp is not None:
            from ..tp.checkpoint import save_tensor_parallel_checkpoint
            save_tensor_parallel_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters)
            return True
        from .checkpoint import save_checkpoint
        save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters)
        return True

    def load_checkpoint(self, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                        load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
        """Returns (path, client_state); (None, None) with a warning when
        load_dir holds no checkpoint, as DeepSpeed."""
        from .checkpoint import load_checkpoint
        return load_checkpoint(self, load_dir, tag, load_module_strict, load_optimizer_states,
                               load_lr_scheduler_states, load_module_only, custom_load_fn)

    def save_16bit_model(self, save_dir, save_filename="pytorch_model.bin", exclude_frozen_parameters=False):
        """The model's state_dict in its training dtype, written by rank 0 to
        save_dir/save_filename (created; written to a temporary name and
        renamed). Returns True. ZeRO-3, as DeepSpeed: every rank must call it,
        and it saves only with stage3_gather_16bit_weights_on_model_save
        (returns False otherwise); parameters are gathered one module at a time."""
        from .checkpoint import save_model_weights
        if self.partitioned is not None and not self._config.zero.gather_16bit_weights_on_model_save:
            if self.placement.is_main:
                print(f"[zerofuse] did not save the model {os.path.join(save_dir, save_filename)} because "
                      "stage3_gather_16bit_weights_on_model_save is false (as DeepSpeed)", flush=True)
            return False
        save_model_weights(self, save_dir, save_filename, exclude_frozen_parameters)
        return True

    def whole_model_state(self, exclude_frozen_parameters=False):
        """The whole model's state_dict, on the CPU, on the rank that writes it
        (None on the others). Every rank must call it (ZeRO-3 gathers)."""
        if self.tp is not None:  # split parameters gathered whole over their tensor-parallel group
            from ..tp.checkpoint import whole_module_state
            state = whole_module_state(self, exclude_frozen_parameters)
            return state if torch.distributed.get_rank() == 0 else None
        from .checkpoint import _model_states
        return _model_states(self, exclude_frozen_parameters, clone=True)

    def _zero3_consolidated_16bit_state_dict(self, exclude_frozen_parameters=False):
        """DeepSpeed's (Hugging Face Accelerate calls it): the whole model's
        state_dict in the training dtype, on the CPU, on rank 0; None on the
        other ranks. Every rank must call it."""
        if self.partitioned is None:
            raise ValueError("this function requires ZeRO-3 mode")
        return self.partitioned.consolidated_state_dict(keep=self.placement.is_main,
                                                        exclude_frozen_parameters=exclude_frozen_parameters)

    def save_fp16_model(self, save_dir, save_filename="pytorch_model.bin"):
        return self.save_16bit_model(save_dir, save_filename)

    # --- life cycle ----------------------------------------------------------------------------------------------

    def destroy(self):
        """Release what the engine holds beyond the model: gradient hooks,
        buffers of in-flight reductions."""
        self.optimizer.reducer.wait()
        self.optimizer.reducer.remove_hooks()
        if self.partitioned is not None:
            self.partitioned.remove()

    def _describe_world(self) -> str:
        return f"world size {self.placement.world_size}"

    def _print_config(self):
        c = self._config
        print(f"[zerofuse] {self._describe_world()}, device {self.device}, ZeRO stage {c.zero.stage}, "
              f"dtype {str(self.model_dtype).replace('torch.', '')}, optimizer {self.optimizer_name() or 'AdamW'}",
              flush=True)
        print("[zerofuse] resolved config: " + json.dumps(c.to_dict(), sort_keys=True), flush=True)
        if c.inert_keys:
            print("[zerofuse] accepted with no effect here: " + ", ".join(c.inert_keys), flush=True)
        if getattr(self.module, "zerofuse_tp_grid", None) is not None:
            from ..tp.auto import describe
            print("[zerofuse] " + describe(self.module), flush=True)
        for note in self._notes:
            print(f"[zerofuse] note: {note}", flush=True)
        if c.memory_breakdown:
            print("[zerofuse] memory per rank (bytes): " + json.dumps(self.memory_report()), flush=True)
