"""The config's sections other than the optimizer: precision, schedule, ZeRO,
monitors, autocast and activation checkpointing."""
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .values import (as_bool, as_float, as_int, as_section, as_str, check_keys, disabled_only, fail, is_int,
                     is_switched_off, path)


@dataclass
class Fp16Config:
    enabled: bool = False
    loss_scale: float = 0.0  # 0: dynamic
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    min_loss_scale: float = 1.0

    @property
    def dynamic(self) -> bool:
        return self.loss_scale == 0.0


def parse_fp16(raw, inert) -> Fp16Config:
    parts = ["fp16"]
    s = as_section(raw, parts)
    check_keys(s, parts, {"enabled", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
                          "consecutive_hysteresis", "min_loss_scale", "fp16_master_weights_and_grads"},
               inert={"auto_cast"}, inert_found=inert)
    c = Fp16Config()
    if "enabled" in s:
        c.enabled = as_bool(s["enabled"], parts + ["enabled"])
    if "loss_scale" in s:
        c.loss_scale = as_float(s["loss_scale"], parts + ["loss_scale"], minimum=0.0)
    if "initial_scale_power" in s:
        c.initial_scale_power = as_int(s["initial_scale_power"], parts + ["initial_scale_power"], minimum=0)
        if c.initial_scale_power > 127:
            fail(parts + ["initial_scale_power"], f"must be <= 127 (2**127 is float32's limit), got {c.initial_scale_power}")
    if "loss_scale_window" in s:
        c.loss_scale_window = as_int(s["loss_scale_window"], parts + ["loss_scale_window"], minimum=1)
    if "hysteresis" in s:
        c.hysteresis = as_int(s["hysteresis"], parts + ["hysteresis"], minimum=1)
    if "consecutive_hysteresis" in s:
        c.consecutive_hysteresis = as_bool(s["consecutive_hysteresis"], parts + ["consecutive_hysteresis"])
    if "min_loss_scale" in s:
        c.min_loss_scale = as_float(s["min_loss_scale"], parts + ["min_loss_scale"], positive=True)
    if s.get("fp16_master_weights_and_grads", False) is not False:
        fail(parts + ["fp16_master_weights_and_grads"], "is not supported: zerofuse keeps fp32 master weights")
    if c.dynamic and c.min_loss_scale > 2.0**c.initial_scale_power:
        fail(parts + ["min_loss_scale"],
             f"({c.min_loss_scale}) must not exceed the initial scale 2**{c.initial_scale_power}")
    return c


def parse_bf16(raw, key, inert) -> bool:
    parts = [key]
    s = as_section(raw, parts)
    # Configs copied from an fp16 section keep its loss-scaling keys; DeepSpeed
    # ignores them for bf16, which needs no loss scaling.
    check_keys(s, parts, {"enabled", "bf16_master_weights_and_grads", "bf16_optimizer_states"},
               inert={"immediate_grad_update", "check_grad_overflow", "loss_scale", "loss_scale_window",
                      "hysteresis", "consecutive_hysteresis", "min_loss_scale", "initial_scale_power", "auto_cast"},
               inert_found=inert)
    for flag in ("bf16_master_weights_and_grads", "bf16_optimizer_states"):
        if s.get(flag, False) is not False:
            fail(parts + [flag], "is not supported: zerofuse keeps fp32 master weights and optimizer state")
    return as_bool(s.get("enabled", False), parts + ["enabled"])


@dataclass
class AutocastConfig:
    """DeepSpeed's torch_autocast: the model stays float32 and forward runs
    under torch.autocast in `dtype`."""

    enabled: bool = False
    dtype: str = "bfloat16"
    lower_precision_safe_modules: Optional[List[str]] = None


_AUTOCAST_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "torch.bfloat16": "bfloat16",
                    "float16": "float16", "fp16": "float16", "half": "float16", "torch.float16": "float16"}


def parse_autocast(raw) -> AutocastConfig:
    parts = ["torch_autocast"]
    s = as_section(raw, parts)
    check_keys(s, parts, {"enabled", "dtype", "lower_precision_safe_modules"})
    c = AutocastConfig()
    if "enabled" in s:
        c.enabled = as_bool(s["enabled"], parts + ["enabled"])
    if "dtype" in s:
        c.dtype = _AUTOCAST_DTYPES.get(as_str(s["dtype"], parts + ["dtype"]))
        if c.dtype is None:
            fail(parts + ["dtype"], f"must be 'bfloat16' or 'float16', got {s['dtype']!r}")
    if "lower_precision_safe_modules" in s:
        names = s["lower_precision_safe_modules"]
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            fail(parts + ["lower_precision_safe_modules"], f"must be a list of class paths, got {names!r}")
        c.lower_precision_safe_modules = list(names)
    return c


@dataclass
class SchedulerConfig:
    type: str
    params: Dict[str, Any]


_SCHEDULERS = {
    "WarmupLR": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "last_batch_iteration"},
    "WarmupDecayLR": {"total_num_steps", "warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type",
                      "last_batch_iteration"},
    "WarmupCosineLR": {"total_num_steps", "warmup_min_ratio", "warmup_num_steps", "cos_min_ratio", "warmup_type",
                       "last_batch_iteration"},
    "OneCycle": {"cycle_min_lr", "cycle_max_lr", "decay_lr_rate", "cycle_first_step_size", "cycle_second_step_size",
                 "cycle_first_stair_count", "cycle_second_stair_count", "decay_step_size", "cycle_momentum",
                 "cycle_min_mom", "cycle_max_mom", "decay_mom_rate", "last_batch_iteration"},
    "LRRangeTest": {"lr_range_test_min_lr", "lr_range_test_step_size", "lr_range_test_step_rate",
                    "lr_range_test_staircase", "last_batch_iteration"},
}
_REQUIRED = {"WarmupDecayLR": ("total_num_steps",), "WarmupCosineLR": ("total_num_steps",),
             "OneCycle": ("cycle_min_lr", "cycle_max_lr")}


def parse_scheduler(raw) -> SchedulerConfig:
    parts = ["scheduler"]
    s = as_section(raw, parts)
    check_keys(s, parts, {"type", "params"})
    if "type" not in s:
        fail(parts + ["type"], f"is required (allowed: {', '.join(repr(k) for k in _SCHEDULERS)})")
    kind = as_str(s["type"], parts + ["type"])
    if kind not in _SCHEDULERS:
        fail(parts + ["type"], f"must be one of {', '.join(repr(k) for k in _SCHEDULERS)}, got {kind!r}")
    p = dict(as_section(s.get("params", {}), parts + ["params"]))
    pp = parts + ["params"]
    check_keys(p, pp, _SCHEDULERS[kind])
    for key in _REQUIRED.get(kind, ()):
        if key not in p:
            fail(pp + [key], f"is required for {kind}")
    for key in ("warmup_num_steps", "total_num_steps", "lr_range_test_step_size", "cycle_first_step_size"):
        if key in p:
            p[key] = as_int(p[key], pp + [key], minimum=1)
    for key in ("cycle_second_step_size", "decay_step_size", "cycle_first_stair_count", "cycle_second_stair_count"):
        if key in p and p[key] is not None:
            p[key] = as_int(p[key], pp + [key], minimum=0)
    if "last_batch_iteration" in p:
        p["last_batch_iteration"] = as_int(p["last_batch_iteration"], pp + ["last_batch_iteration"], minimum=-1)
    for key in ("warmup_min_ratio", "cos_min_ratio", "decay_lr_rate", "decay_mom_rate", "lr_range_test_step_rate"):
        if key in p:
            p[key] = as_float(p[key], pp + [key], minimum=0.0)
    for key in ("warmup_min_lr", "warmup_max_lr", "cycle_min_lr", "cycle_max_lr", "cycle_min_mom", "cycle_max_mom",
                "lr_range_test_min_lr"):
        if key in p:  # a number, or one per param group
            values = p[key] if isinstance(p[key], list) else [p[key]]
            for i, v in enumerate(values):
                as_float(v, pp + [key] + ([i] if isinstance(p[key], list) else []), minimum=0.0)
    for key in ("cycle_momentum", "lr_range_test_staircase"):
        if key in p:
            as_bool(p[key], pp + [key])
    if "warmup_type" in p:
        as_str(p["warmup_type"], pp + ["warmup_type"], allowed=("log", "linear"))
    return SchedulerConfig(kind, p)


@dataclass
class ZeroConfig:
    stage: int = 0
    reduce_bucket_size: int = 500_000_000  # elements, as DeepSpeed
    allgather_bucket_size: int = 500_000_000
    overlap_comm: bool = False
    reduce_scatter: bool = True
    offload: List[str] = field(default_factory=list)  # offload sections given with device "cpu"
    # ZeRO-3 (DeepSpeed's names and defaults; counts of elements).
    prefetch_bucket_size: int = 50_000_000
    param_persistence_threshold: int = 100_000
    model_persistence_threshold: int = sys.maxsize
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000
    gather_16bit_weights_on_model_save: bool = False


# ZeRO-3 keys: DeepSpeed accepts each under its stage3_ name and a short alias.
_STAGE3_INT_KEYS = ("prefetch_bucket_size", "param_persistence_threshold", "model_persistence_threshold",
                    "max_live_parameters", "max_reuse_distance")
_STAGE3_BOOL_KEYS = ("gather_16bit_weights_on_model_save",)


_ZERO_KEYS = {"stage", "reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "contiguous_gradients",
              "reduce_scatter", "offload_optimizer", "offload_param", "cpu_offload", "zero_quantized_weights",
              "zero_quantized_gradients", "zero_quantized_nontrainable_weights", "zero_hpz_partition_size",
              "legacy_stage1",
              *(f"stage3_{k}" for k in _STAGE3_INT_KEYS + _STAGE3_BOOL_KEYS), *_STAGE3_INT_KEYS, *_STAGE3_BOOL_KEYS,
              "stage3_gather_fp16_weights_on_model_save"}
_ZERO_INERT = {"allgather_partitions", "round_robin_gradients", "load_from_fp32_weights", "elastic_checkpoint",
               "ignore_unused_parameters", "sub_group_size", "use_multi_rank_bucket_allreduce",
               # Tuning DeepSpeed's own ZeRO-3 implementation: module_granularity_threshold
               # groups small modules into one fetch (zerofuse's units are per module
               # and small parameters persist); the others choose its collectives.
               "stage3_module_granularity_threshold", "stage3_use_all_reduce_for_fetch_params",
               "stage3_allgather_sequential",
               "memory_efficient_linear", "zeropp_loco_param", "mics_shard_size", "mics_hierarchical_params_gather",
               "pipeline_loading_checkpoint", "log_trace_cache_warnings", "module_granularity_threshold",
               "override_module_apply", "use_all_reduce_for_fetch_params", "allgather_sequential",
               "save_muon_momentum_buffer_in_memory", "compute_grad_norm", "cpu_offload_params",
               "cpu_offload_use_pin_memory"}


def _offload(value, parts, cpu_engine, inert):
    """offload_* with device cpu: on a CPU engine the state is already there."""
    if is_switched_off(value):
        return False
    if isinstance(value, dict) and value.get("device") == "cpu":
        if cpu_engine:
            inert.append(path(parts) + " (the engine runs on the CPU: its state is already there)")
            return True
        fail(parts, "ZeRO-Offload (optimizer or parameter state in CPU memory while training on a GPU) is not "
                    "supported by zerofuse; remove the key, or set its device to 'none'")
    if isinstance(value, dict) and value.get("device") == "nvme":
        fail(parts, "ZeRO-Infinity (NVMe offload) is not supported by zerofuse; remove the key or set its device to "
                    "'none'")
    disabled_only(value, parts, "offload")
    return False


def parse_zero(raw, inert, cpu_engine: bool) -> ZeroConfig:
    parts = ["zero_optimization"]
    s = as_section(raw, parts)
    check_keys(s, parts, _ZERO_KEYS, inert=_ZERO_INERT, inert_found=inert)
    c = ZeroConfig()
    if "stage" in s:
        stage = s["stage"]
        c.stage = as_int(stage, parts + ["stage"], allowed=(0, 1, 2, 3))
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        if key in s:
            setattr(c, key, as_int(s[key], parts + [key], minimum=1))
    for key in ("overlap_comm", "reduce_scatter"):
        if key in s:
            setattr(c, key, as_bool(s[key], parts + [key]))
    for key in _STAGE3_INT_KEYS + _STAGE3_BOOL_KEYS:
        given = [k for k in (f"stage3_{key}", key) if k in s]
        if len(given) == 2 and s[given[0]] != s[given[1]]:
            fail(parts + [given[1]], f"is also given as {given[0]} with another value ({s[given[0]]!r})")
        if given:
            value = s[given[0]]
            parsed = as_bool(value, parts + [given[0]]) if key in _STAGE3_BOOL_KEYS else \
                as_int(value, parts + [given[0]], minimum=0)
            setattr(c, key, parsed)
    if "stage3_gather_fp16_weights_on_model_save" in s:  # DeepSpeed's older name
        if as_bool(s["stage3_gather_fp16_weights_on_model_save"], parts + ["stage3_gather_fp16_weights_on_model_save"]):
            c.gather_16bit_weights_on_model_save = True
    if c.stage < 3:
        for key in _STAGE3_INT_KEYS + _STAGE3_BOOL_KEYS:
            for k in (f"stage3_{key}", key):
                if k in s:
                    inert.append(path(parts + [k]))  # a ZeRO-3 setting at stage <= 2
    if "contiguous_gradients" in s:
        # Gradients always go straight into zerofuse's flat buffers (what
        # DeepSpeed's option turns on), so either value changes nothing.
        as_bool(s["contiguous_gradients"], parts + ["contiguous_gradients"])
        inert.append(path(parts + ["contiguous_gradients"]))
    for key in ("offload_optimizer", "offload_param"):
        if key in s and _offload(s[key], parts + [key], cpu_engine, inert):
            c.offload.append(key)
    if "cpu_offload" in s:
        if s["cpu_offload"] is True and cpu_engine:
            inert.append(path(parts + ["cpu_offload"]) + " (the engine runs on the CPU)")
        elif s["cpu_offload"] not in (False, None):
            fail(parts + ["cpu_offload"], "ZeRO-Offload is not supported by zerofuse on a GPU; set it to false")
    for key, what in (("zero_quantized_weights", "ZeRO++ quantized weights"),
                      ("zero_quantized_gradients", "ZeRO++ quantized gradients"),
                      ("zero_quantized_nontrainable_weights", "ZeRO++ quantized frozen weights"),
                      ("legacy_stage1", "legacy stage 1")):
        if key in s:
            disabled_only(s[key], parts + [key], what)
    if "zero_hpz_partition_size" in s and as_int(s["zero_hpz_partition_size"], parts + ["zero_hpz_partition_size"]) != 1:
        fail(parts + ["zero_hpz_partition_size"], "ZeRO++ hierarchical partitioning is not supported (only 1)")
    return c


@dataclass
class MonitorConfig:
    enabled: bool = False
    output_path: str = ""
    job_name: str = "DeepSpeedJobName"


def parse_monitor(raw, key) -> MonitorConfig:
    parts = [key]
    s = as_section(raw, parts)
    check_keys(s, parts, {"enabled", "output_path", "job_name"})
    c = MonitorConfig()
    if "enabled" in s:
        c.enabled = as_bool(s["enabled"], parts + ["enabled"])
    if "output_path" in s:
        c.output_path = as_str(s["output_path"], parts + ["output_path"])
    if "job_name" in s:
        c.job_name = as_str(s["job_name"], parts + ["job_name"])
    return c


@dataclass
class ActivationCheckpointingConfig:
    """DeepSpeed's activation_checkpointing section, for deepspeed.checkpointing.
    Partitioning activations across model-parallel ranks and contiguous
    buffers have nothing to act on here (no model parallelism in the
    checkpoint path); they are accepted and listed."""

    number_checkpoints: Optional[int] = None
    cpu_checkpointing: bool = False
    synchronize_checkpoint_boundary: bool = False
    profile: bool = False


def parse_activation_checkpointing(raw, inert, cpu_engine: bool) -> ActivationCheckpointingConfig:
    parts = ["activation_checkpointing"]
    s = as_section(raw, parts)
    check_keys(s, parts, {"partition_activations", "contiguous_memory_optimization", "cpu_checkpointing",
                          "number_checkpoints", "synchronize_checkpoint_boundary", "profile"})
    c = ActivationCheckpointingConfig()
    for key in ("partition_activations", "contiguous_memory_optimization"):
        if key in s and as_bool(s[key], parts + [key]):
            inert.append(path(parts + [key]))
    if "number_checkpoints" in s and s["number_checkpoints"] is not None:
        c.number_checkpoints = as_int(s["number_checkpoints"], parts + ["number_checkpoints"], minimum=1)
    if "cpu_checkpointing" in s:
        c.cpu_checkpointing = as_bool(s["cpu_checkpointing"], parts + ["cpu_checkpointing"])
        if c.cpu_checkpointing and cpu_engine:
            inert.append(path(parts + ["cpu_checkpointing"]) + " (the engine runs on the CPU)")
    for key in ("synchronize_checkpoint_boundary", "profile"):
        if key in s:
            setattr(c, key, as_bool(s[key], parts + [key]))
    return c
