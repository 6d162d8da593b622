"""The engine's configuration: DeepSpeed's JSON keys and semantics where they
overlap, validated strictly at every depth.

An unknown key, a value of the wrong type or range, or a DeepSpeed feature
zerofuse does not have is a ConfigError naming the key and what is allowed.
Keys DeepSpeed accepts that change nothing for ZeRO-1/2 are accepted, and
listed (`Config.inert_keys`) so the engine can say so once at start-up.
"""
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional


class ConfigError(ValueError):
    """A configuration problem; the message starts with the key's path."""


# --- helpers -------------------------------------------------------------------------------


def _path(parts):
    return "config" + "".join(f"[{p!r}]" for p in parts)


def _fail(parts, message):
    raise ConfigError(f"{_path(parts)}: {message}")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _as_int(v, parts, minimum=None, allowed=None):
    """DeepSpeed configs write sizes as 5e8: an integral float is an int."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not _is_int(v):
        _fail(parts, f"must be an integer, got {v!r}")
    if allowed is not None and v not in allowed:
        _fail(parts, f"must be one of {', '.join(map(str, allowed))}, got {v}")
    if minimum is not None and v < minimum:
        _fail(parts, f"must be >= {minimum}, got {v}")
    return v


def _as_float(v, parts, minimum=None, positive=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        _fail(parts, f"must be a number, got {v!r}")
    v = float(v)
    if not math.isfinite(v):
        _fail(parts, f"must be finite, got {v}")
    if positive and v <= 0:
        _fail(parts, f"must be > 0, got {v}")
    if minimum is not None and v < minimum:
        _fail(parts, f"must be >= {minimum}, got {v}")
    return v


def _as_bool(v, parts):
    if not isinstance(v, bool):
        _fail(parts, f"must be true or false, got {v!r}")
    return v


def _as_str(v, parts, allowed=None):
    if not isinstance(v, str):
        _fail(parts, f"must be a string, got {v!r}")
    if allowed is not None and v not in allowed:
        _fail(parts, f"must be one of {', '.join(repr(a) for a in allowed)}, got {v!r}")
    return v


def _as_section(v, parts):
    if not isinstance(v, dict):
        _fail(parts, f"must be a JSON object, got {v!r}")
    return v


def _inert(key, patterns):
    return any(key == p or (p.endswith("*") and key.startswith(p[:-1])) for p in patterns)


def _check_keys(section, parts, known, inert=(), inert_found=None):
    """Every key must be known, or inert (accepted, recorded in inert_found)."""
    for key in section:
        if key in known:
            continue
        if _inert(key, inert):
            if inert_found is not None:
                inert_found.append(_path(parts + [key]))
            continue
        _fail(parts + [key], f"unknown key (allowed here: {', '.join(sorted(known))})")


def _is_switched_off(value):
    if value in (None, False, "none", {}):
        return True
    if isinstance(value, dict):
        if "enabled" in value:
            return value["enabled"] is False
        if "device" in value:
            return value["device"] in (None, "none")
        return all(v in (None, False, 0, "none", {}) for v in value.values())
    return False


def _disabled_only(value, parts, what):
    """A DeepSpeed feature zerofuse does not have is fine only when switched off."""
    if not _is_switched_off(value):
        _fail(parts, f"{what} is not supported by zerofuse; remove the key or switch the feature off")


# --- sections --------------------------------------------------------------------------------


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


@dataclass
class OptimizerConfig:
    type: str = "AdamW"
    lr: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    adam_w_mode: bool = True
    bias_correction: bool = True


@dataclass
class SchedulerConfig:
    type: str
    params: Dict[str, Any]


@dataclass
class ZeroConfig:
    stage: int = 0
    reduce_bucket_size: int = 500_000_000  # elements, as DeepSpeed
    allgather_bucket_size: int = 500_000_000
    overlap_comm: bool = False
    reduce_scatter: bool = True


@dataclass
class MonitorConfig:
    enabled: bool = False
    output_path: str = ""
    job_name: str = "DeepSpeedJobName"


@dataclass
class Config:
    train_batch_size: int
    train_micro_batch_size_per_gpu: int
    gradient_accumulation_steps: int
    gradient_clipping: float = 0.0
    fp16: Fp16Config = field(default_factory=Fp16Config)
    bf16_enabled: bool = False
    optimizer: Optional[OptimizerConfig] = None
    scheduler: Optional[SchedulerConfig] = None
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    communication_data_type: Optional[str] = None  # "fp32" | "fp16" | "bf16"; None: the gradient dtype
    steps_per_print: int = 10
    wall_clock_breakdown: bool = False
    memory_breakdown: bool = False
    tensorboard: MonitorConfig = field(default_factory=MonitorConfig)
    csv_monitor: MonitorConfig = field(default_factory=MonitorConfig)
    inert_keys: List[str] = field(default_factory=list)  # accepted, no effect for ZeRO-1/2

    def to_dict(self) -> dict:
        """The resolved configuration in DeepSpeed's shape (for printing and checkpoints)."""
        d = {
            "train_batch_size": self.train_batch_size,
            "train_micro_batch_size_per_gpu": self.train_micro_batch_size_per_gpu,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "gradient_clipping": self.gradient_clipping,
            "fp16": asdict(self.fp16),
            "bf16": {"enabled": self.bf16_enabled},
            "zero_optimization": asdict(self.zero),
            "steps_per_print": self.steps_per_print,
            "wall_clock_breakdown": self.wall_clock_breakdown,
            "memory_breakdown": self.memory_breakdown,
            "tensorboard": asdict(self.tensorboard),
            "csv_monitor": asdict(self.csv_monitor),
        }
        if self.communication_data_type is not None:
            d["communication_data_type"] = self.communication_data_type
        if self.optimizer is not None:
            o = asdict(self.optimizer)
            d["optimizer"] = {"type": o.pop("type"), "params": o}
        if self.scheduler is not None:
            d["scheduler"] = {"type": self.scheduler.type, "params": dict(self.scheduler.params)}
        return d


# --- parsing ---------------------------------------------------------------------------------

_TOP_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "fp16", "bf16", "bfloat16", "optimizer", "scheduler", "zero_optimization", "steps_per_print",
    "wall_clock_breakdown", "memory_breakdown", "tensorboard", "csv_monitor", "communication_data_type",
    "prescale_gradients", "gradient_predivide_factor",
    # DeepSpeed features that must be switched off:
    "activation_checkpointing", "flops_profiler", "comms_logger", "wandb", "comet", "amp", "autotuning",
    "elasticity", "data_efficiency", "compression_training", "sparse_attention", "pipeline", "aio",
}
# Accepted, and change nothing here: zerofuse runs only its own optimizers, and always prints the config.
_TOP_INERT = {"zero_allow_untested_optimizer", "dump_state", "zero_force_ds_cpu_optimizer", "checkpoint"}

_ZERO_KEYS = {"stage", "reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "contiguous_gradients",
              "reduce_scatter", "offload_optimizer", "offload_param", "cpu_offload", "zero_quantized_weights",
              "zero_quantized_gradients", "zero_hpz_partition_size", "legacy_stage1"}
_ZERO_INERT = {"allgather_partitions", "round_robin_gradients", "load_from_fp32_weights", "elastic_checkpoint",
               "ignore_unused_parameters", "sub_group_size", "use_multi_rank_bucket_allreduce",
               "stage3_*",  # ZeRO-3 knobs: inert at stage <= 2
               "memory_efficient_linear", "zeropp_loco_param", "mics_shard_size", "mics_hierarchical_params_gather",
               "pipeline_loading_checkpoint"}

_SCHEDULERS = {
    "WarmupLR": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "last_batch_iteration"},
    "WarmupDecayLR": {"total_num_steps", "warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type",
                      "last_batch_iteration"},
    "WarmupCosineLR": {"total_num_steps", "warmup_min_ratio", "warmup_num_steps", "cos_min_ratio", "warmup_type",
                       "last_batch_iteration"},
}

_COMM_TYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "bfp16": "bf16"}


def load_raw(config) -> dict:
    """A dict, or the path of a JSON file."""
    if isinstance(config, dict):
        return config
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        try:
            with open(path) as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist") from None
        except OSError as e:
            raise ConfigError(f"config file {path!r} cannot be read: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path!r} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path!r} must hold a JSON object, got {type(raw).__name__}")
        return raw
    raise ConfigError(f"config must be a dict or the path of a JSON file, got {type(config).__name__}")


def _parse_fp16(raw, inert):
    parts = ["fp16"]
    s = _as_section(raw, parts)
    _check_keys(s, parts, {"enabled", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
                           "consecutive_hysteresis", "min_loss_scale", "fp16_master_weights_and_grads"},
                inert={"auto_cast"}, inert_found=inert)
    c = Fp16Config()
    if "enabled" in s:
        c.enabled = _as_bool(s["enabled"], parts + ["enabled"])
    if "loss_scale" in s:
        c.loss_scale = _as_float(s["loss_scale"], parts + ["loss_scale"], minimum=0.0)
    if "initial_scale_power" in s:
        c.initial_scale_power = _as_int(s["initial_scale_power"], parts + ["initial_scale_power"], minimum=0)
        if c.initial_scale_power > 127:
            _fail(parts + ["initial_scale_power"], f"must be <= 127 (2**127 is float32's limit), got {c.initial_scale_power}")
    if "loss_scale_window" in s:
        c.loss_scale_window = _as_int(s["loss_scale_window"], parts + ["loss_scale_window"], minimum=1)
    if "hysteresis" in s:
        c.hysteresis = _as_int(s["hysteresis"], parts + ["hysteresis"], minimum=1)
    if "consecutive_hysteresis" in s:
        c.consecutive_hysteresis = _as_bool(s["consecutive_hysteresis"], parts + ["consecutive_hysteresis"])
    if "min_loss_scale" in s:
        c.min_loss_scale = _as_float(s["min_loss_scale"], parts + ["min_loss_scale"], positive=True)
    if s.get("fp16_master_weights_and_grads", False) is not False:
        _fail(parts + ["fp16_master_weights_and_grads"], "is not supported: zerofuse keeps fp32 master weights")
    if c.dynamic and c.min_loss_scale > 2.0**c.initial_scale_power:
        _fail(parts + ["min_loss_scale"],
              f"({c.min_loss_scale}) must not exceed the initial scale 2**{c.initial_scale_power}")
    return c


def _parse_bf16(raw, key, inert):
    parts = [key]
    s = _as_section(raw, parts)
    _check_keys(s, parts, {"enabled"}, inert={"immediate_grad_update", "check_grad_overflow"}, inert_found=inert)
    return _as_bool(s.get("enabled", False), parts + ["enabled"])


def _parse_optimizer(raw, inert):
    parts = ["optimizer"]
    s = _as_section(raw, parts)
    _check_keys(s, parts, {"type", "params"})
    if "type" not in s:
        _fail(parts + ["type"], "is required (allowed: 'Adam', 'AdamW')")
    kind = _as_str(s["type"], parts + ["type"])
    if kind.lower() not in ("adam", "adamw"):
        _fail(parts + ["type"], f"zerofuse runs Adam and AdamW, got {kind!r}")
    p = _as_section(s.get("params", {}), parts + ["params"])
    pp = parts + ["params"]
    _check_keys(p, pp, {"lr", "betas", "eps", "weight_decay", "adam_w_mode", "bias_correction", "amsgrad"},
                inert={"torch_adam", "fused", "foreach", "capturable"}, inert_found=inert)
    c = OptimizerConfig(type="AdamW" if kind.lower() == "adamw" else "Adam")
    if "lr" in p:
        c.lr = _as_float(p["lr"], pp + ["lr"], minimum=0.0)
    if "betas" in p:
        b = p["betas"]
        if not (isinstance(b, (list, tuple)) and len(b) == 2):
            _fail(pp + ["betas"], f"must be a list of two numbers, got {b!r}")
        c.betas = [_as_float(b[i], pp + ["betas", i], minimum=0.0) for i in range(2)]
        for i in range(2):
            if c.betas[i] >= 1.0:
                _fail(pp + ["betas", i], f"must be < 1, got {c.betas[i]}")
    if "eps" in p:
        c.eps = _as_float(p["eps"], pp + ["eps"], positive=True)
    if "weight_decay" in p:
        c.weight_decay = _as_float(p["weight_decay"], pp + ["weight_decay"], minimum=0.0)
    if "bias_correction" in p:
        c.bias_correction = _as_bool(p["bias_correction"], pp + ["bias_correction"])
    # DeepSpeed's "Adam" is AdamW unless adam_w_mode is false; "AdamW" is always AdamW.
    if "adam_w_mode" in p:
        c.adam_w_mode = _as_bool(p["adam_w_mode"], pp + ["adam_w_mode"])
        if c.type == "AdamW" and not c.adam_w_mode:
            _fail(pp + ["adam_w_mode"], "must be true for type 'AdamW' (use type 'Adam' for L2 weight decay)")
    if p.get("amsgrad", False) is not False:
        _fail(pp + ["amsgrad"], "is not supported by zerofuse (only false)")
    return c


def _parse_scheduler(raw):
    parts = ["scheduler"]
    s = _as_section(raw, parts)
    _check_keys(s, parts, {"type", "params"})
    if "type" not in s:
        _fail(parts + ["type"], f"is required (allowed: {', '.join(repr(k) for k in _SCHEDULERS)})")
    kind = _as_str(s["type"], parts + ["type"])
    if kind not in _SCHEDULERS:
        _fail(parts + ["type"], f"must be one of {', '.join(repr(k) for k in _SCHEDULERS)}, got {kind!r}")
    p = dict(_as_section(s.get("params", {}), parts + ["params"]))
    pp = parts + ["params"]
    _check_keys(p, pp, _SCHEDULERS[kind])
    for key in ("warmup_num_steps", "total_num_steps"):
        if key in p:
            p[key] = _as_int(p[key], pp + [key], minimum=1)
    if kind != "WarmupLR" and "total_num_steps" not in p:
        _fail(pp + ["total_num_steps"], f"is required for {kind}")
    if "last_batch_iteration" in p:
        p["last_batch_iteration"] = _as_int(p["last_batch_iteration"], pp + ["last_batch_iteration"], minimum=-1)
    for key in ("warmup_min_lr", "warmup_max_lr", "warmup_min_ratio", "cos_min_ratio"):
        if key in p:
            p[key] = _as_float(p[key], pp + [key], minimum=0.0)
    if "warmup_type" in p:
        _as_str(p["warmup_type"], pp + ["warmup_type"], allowed=("log", "linear"))
    return SchedulerConfig(kind, p)


def _parse_zero(raw, inert):
    parts = ["zero_optimization"]
    s = _as_section(raw, parts)
    _check_keys(s, parts, _ZERO_KEYS, inert=_ZERO_INERT, inert_found=inert)
    c = ZeroConfig()
    if "stage" in s:
        stage = s["stage"]
        if _is_int(stage) and stage == 3:
            _fail(parts + ["stage"], "ZeRO stage 3 is not supported by zerofuse (allowed: 0, 1, 2)")
        c.stage = _as_int(stage, parts + ["stage"], allowed=(0, 1, 2))
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        if key in s:
            if s[key] == "auto":
                _fail(parts + [key], "'auto' is a Hugging Face Trainer placeholder; give a number of elements")
            setattr(c, key, _as_int(s[key], parts + [key], minimum=1))
    for key in ("overlap_comm", "reduce_scatter"):
        if key in s:
            setattr(c, key, _as_bool(s[key], parts + [key]))
    if "contiguous_gradients" in s:
        # Gradients always go straight into zerofuse's flat buffers (what
        # DeepSpeed's option turns on), so either value changes nothing.
        _as_bool(s["contiguous_gradients"], parts + ["contiguous_gradients"])
        inert.append(_path(parts + ["contiguous_gradients"]))
    for key, what in (("offload_optimizer", "optimizer offload"), ("offload_param", "parameter offload"),
                      ("cpu_offload", "CPU offload"), ("zero_quantized_weights", "ZeRO++ quantized weights"),
                      ("zero_quantized_gradients", "ZeRO++ quantized gradients"), ("legacy_stage1", "legacy stage 1")):
        if key in s:
            _disabled_only(s[key], parts + [key], what)
    if "zero_hpz_partition_size" in s and _as_int(s["zero_hpz_partition_size"], parts + ["zero_hpz_partition_size"]) != 1:
        _fail(parts + ["zero_hpz_partition_size"], "ZeRO++ hierarchical partitioning is not supported (only 1)")
    return c


def _parse_monitor(raw, key):
    parts = [key]
    s = _as_section(raw, parts)
    _check_keys(s, parts, {"enabled", "output_path", "job_name"})
    c = MonitorConfig()
    if "enabled" in s:
        c.enabled = _as_bool(s["enabled"], parts + ["enabled"])
    if "output_path" in s:
        c.output_path = _as_str(s["output_path"], parts + ["output_path"])
    if "job_name" in s:
        c.job_name = _as_str(s["job_name"], parts + ["job_name"])
    return c


def _resolve_batch(raw, world_size):
    """DeepSpeed's rule: train_batch_size = micro batch * accumulation * world size;
    any two give the third."""
    tbs = _as_int(raw["train_batch_size"], ["train_batch_size"], minimum=1) if "train_batch_size" in raw else None
    mbs = (_as_int(raw["train_micro_batch_size_per_gpu"], ["train_micro_batch_size_per_gpu"], minimum=1)
           if "train_micro_batch_size_per_gpu" in raw else None)
    gas = (_as_int(raw["gradient_accumulation_steps"], ["gradient_accumulation_steps"], minimum=1)
           if "gradient_accumulation_steps" in raw else None)
    if tbs is not None and mbs is not None and gas is not None:
        if tbs != mbs * gas * world_size:
            raise ConfigError(
                f"config: train_batch_size ({tbs}) must equal train_micro_batch_size_per_gpu ({mbs}) x "
                f"gradient_accumulation_steps ({gas}) x world size ({world_size}) = {mbs * gas * world_size}")
    elif tbs is not None and mbs is not None:
        if tbs % (mbs * world_size):
            raise ConfigError(
                f"config: train_batch_size ({tbs}) is not divisible by train_micro_batch_size_per_gpu ({mbs}) x "
                f"world size ({world_size}) = {mbs * world_size}, so gradient_accumulation_steps is not whole")
        gas = tbs // (mbs * world_size)
    elif tbs is not None and gas is not None:
        if tbs % (gas * world_size):
            raise ConfigError(
                f"config: train_batch_size ({tbs}) is not divisible by gradient_accumulation_steps ({gas}) x "
                f"world size ({world_size}) = {gas * world_size}, so the micro batch is not whole")
        mbs = tbs // (gas * world_size)
    elif mbs is not None:
        gas = gas or 1
        tbs = mbs * gas * world_size
    elif tbs is not None:
        gas = 1
        if tbs % world_size:
            raise ConfigError(f"config: train_batch_size ({tbs}) is not divisible by the world size ({world_size})")
        mbs = tbs // world_size
    else:
        raise ConfigError("config: give train_batch_size or train_micro_batch_size_per_gpu (or both)")
    return tbs, mbs, gas


def parse_config(config, world_size: int = 1) -> Config:
    """Validate a DeepSpeed-style config (dict or JSON path) for `world_size` ranks."""
    raw = load_raw(config)
    inert: List[str] = []
    _check_keys(raw, [], _TOP_KEYS, inert=_TOP_INERT, inert_found=inert)
    tbs, mbs, gas = _resolve_batch(raw, world_size)
    c = Config(train_batch_size=tbs, train_micro_batch_size_per_gpu=mbs, gradient_accumulation_steps=gas)
    if "gradient_clipping" in raw:
        c.gradient_clipping = _as_float(raw["gradient_clipping"], ["gradient_clipping"], minimum=0.0)
    if "fp16" in raw:
        c.fp16 = _parse_fp16(raw["fp16"], inert)
    for key in ("bf16", "bfloat16"):
        if key in raw:
            c.bf16_enabled = _parse_bf16(raw[key], key, inert)
    if c.fp16.enabled and c.bf16_enabled:
        raise ConfigError("config: fp16 and bf16 cannot both be enabled")
    if "optimizer" in raw:
        c.optimizer = _parse_optimizer(raw["optimizer"], inert)
    if "scheduler" in raw:
        c.scheduler = _parse_scheduler(raw["scheduler"])
    if "zero_optimization" in raw:
        c.zero = _parse_zero(raw["zero_optimization"], inert)
    if "communication_data_type" in raw and raw["communication_data_type"] is not None:
        kind = _as_str(raw["communication_data_type"], ["communication_data_type"], allowed=tuple(_COMM_TYPES))
        c.communication_data_type = _COMM_TYPES[kind]
    if "steps_per_print" in raw:
        c.steps_per_print = _as_int(raw["steps_per_print"], ["steps_per_print"], minimum=1)
    for key in ("wall_clock_breakdown", "memory_breakdown"):
        if key in raw:
            setattr(c, key, _as_bool(raw[key], [key]))
    if raw.get("prescale_gradients", False) is not False:
        _fail(["prescale_gradients"], "is not supported: zerofuse averages bf16/fp32 gradients in the reduction and "
                                       "divides fp16 ones by sqrt(world size) before and after it")
    if "gradient_predivide_factor" in raw and _as_float(raw["gradient_predivide_factor"],
                                                        ["gradient_predivide_factor"]) != 1.0:
        _fail(["gradient_predivide_factor"], "only 1.0 is supported (see prescale_gradients)")
    for key in ("tensorboard", "csv_monitor"):
        if key in raw:
            setattr(c, key, _parse_monitor(raw[key], key))
    for key, what in (("activation_checkpointing", "DeepSpeed activation checkpointing"),
                      ("flops_profiler", "the flops profiler"), ("comms_logger", "the comms logger"),
                      ("wandb", "the wandb monitor (use tensorboard or csv_monitor)"),
                      ("comet", "the comet monitor (use tensorboard or csv_monitor)"), ("amp", "apex AMP"),
                      ("autotuning", "autotuning"), ("elasticity", "elastic training"),
                      ("data_efficiency", "data efficiency"), ("compression_training", "compression training"),
                      ("sparse_attention", "sparse attention"), ("aio", "async I/O offload")):
        if key in raw:
            _disabled_only(raw[key], [key], what)
    if "pipeline" in raw:
        _fail(["pipeline"], "pipeline parallelism is not supported by zerofuse")
    c.inert_keys = inert
    return c
