"""The engine's configuration: DeepSpeed's JSON keys and semantics, validated
strictly at every depth.

An unknown key, a value of the wrong type or range, or a DeepSpeed feature
zerofuse does not have is a ConfigError naming the key and what is allowed.
Keys DeepSpeed accepts that change nothing here are accepted, and listed
(`Config.inert_keys`) so the engine can say so once at start-up. Hugging Face
Trainer's "auto" placeholders are refused all at once, by name.
"""
import json
import os
from dataclasses import asdict, dataclass, field
from typing import List, Optional

from .optimizers import OptimizerConfig, parse_optimizer
from .sections import (ActivationCheckpointingConfig, AutocastConfig, Fp16Config, MonitorConfig, SchedulerConfig,
                       ZeroConfig, parse_activation_checkpointing, parse_autocast, parse_bf16, parse_fp16,
                       parse_monitor, parse_scheduler, parse_zero)
from .values import (ConfigError, as_bool, as_float, as_int, as_section, as_str, auto_values, check_keys,
                     disabled_only, fail, path)

__all__ = ["Config", "ConfigError", "OptimizerConfig", "load_raw", "parse_config"]


@dataclass
class Config:
    train_batch_size: int
    train_micro_batch_size_per_gpu: int
    gradient_accumulation_steps: int
    gradient_clipping: float = 0.0
    fp16: Fp16Config = field(default_factory=Fp16Config)
    bf16_enabled: bool = False
    torch_autocast: AutocastConfig = field(default_factory=AutocastConfig)
    optimizer: Optional[OptimizerConfig] = None
    scheduler: Optional[SchedulerConfig] = None
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    communication_data_type: Optional[str] = None  # "fp32" | "fp16" | "bf16"; None: the gradient dtype
    prescale_gradients: bool = False
    gradient_predivide_factor: float = 1.0
    steps_per_print: int = 10
    wall_clock_breakdown: bool = False
    memory_breakdown: bool = False
    dataloader_drop_last: bool = False
    zero_allow_untested_optimizer: bool = False
    tensorboard: MonitorConfig = field(default_factory=MonitorConfig)
    csv_monitor: MonitorConfig = field(default_factory=MonitorConfig)
    activation_checkpointing: ActivationCheckpointingConfig = field(default_factory=ActivationCheckpointingConfig)
    comms_logger: dict = field(default_factory=dict)  # COMMS_LOG.configure's arguments
    pipeline_timeout: float = 300.0  # seconds a pipeline stage waits for a neighbour's message
    autotp_size: int = 1  # tensor_parallel.autotp_size: ranks each layer is split across (1: off)
    inert_keys: List[str] = field(default_factory=list)  # accepted, no effect here

    def to_dict(self) -> dict:
        """The resolved configuration in DeepSpeed's shape (for printing and checkpoints)."""
        zero = asdict(self.zero)
        zero.pop("offload")
        d = {
            "train_batch_size": self.train_batch_size,
            "train_micro_batch_size_per_gpu": self.train_micro_batch_size_per_gpu,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "gradient_clipping": self.gradient_clipping,
            "fp16": asdict(self.fp16),
            "bf16": {"enabled": self.bf16_enabled},
            "zero_optimization": zero,
            "steps_per_print": self.steps_per_print,
            "wall_clock_breakdown": self.wall_clock_breakdown,
            "memory_breakdown": self.memory_breakdown,
            "tensorboard": asdict(self.tensorboard),
            "csv_monitor": asdict(self.csv_monitor),
        }
        if self.torch_autocast.enabled:
            d["torch_autocast"] = asdict(self.torch_autocast)
        for key in ("prescale_gradients", "dataloader_drop_last", "zero_allow_untested_optimizer"):
            if getattr(self, key):
                d[key] = True
        if self.gradient_predivide_factor != 1.0:
            d["gradient_predivide_factor"] = self.gradient_predivide_factor
        if self.communication_data_type is not None:
            d["communication_data_type"] = self.communication_data_type
        if self.optimizer is not None:
            d["optimizer"] = {"type": self.optimizer.type, "params": dict(self.optimizer.params)}
        if self.scheduler is not None:
            d["scheduler"] = {"type": self.scheduler.type, "params": dict(self.scheduler.params)}
        return d


# --- the top level ------------------------------------------------------------------------------

_SECTIONS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "fp16", "bf16", "bfloat16", "torch_autocast", "optimizer", "scheduler", "zero_optimization", "steps_per_print",
    "wall_clock_breakdown", "memory_breakdown", "tensorboard", "csv_monitor", "communication_data_type",
    "prescale_gradients", "gradient_predivide_factor", "dataloader_drop_last", "zero_allow_untested_optimizer",
    "activation_checkpointing", "sparse_gradients", "data_types", "pipeline", "comms_logger", "tensor_parallel",
}
# Accepted and without effect: DeepSpeed ignores them too (cuda_visible_devices,
# a launcher setting scripts leave in configs), or they tune what zerofuse does
# its own way (it always prints the config, never runs DeepSpeed's CPU optimizer).
_INERT = {"zero_force_ds_cpu_optimizer", "dump_state", "checkpoint", "cuda_visible_devices", "disable_allgather",
          "log_level", "timers", "disable_python_gc", "managed_gradient_accumulation",
          "seq_parallel_communication_data_type", "gradient_allreduce_op", "use_data_before_expert_parallelism",
          "nebula", "datastates",
          # Read only by DeepSpeed's sparse-attention modules, which zerofuse refuses when a script uses them.
          "sparse_attention"}
# DeepSpeed features zerofuse does not have: accepted only when switched off.
_MUST_BE_OFF = {
    "flops_profiler": "the flops profiler",
    "wandb": "the wandb monitor (use tensorboard or csv_monitor)",
    "comet": "the comet monitor (use tensorboard or csv_monitor)", "amp": "apex AMP (use torch_autocast, fp16 or bf16)",
    "autotuning": "autotuning", "elasticity": "elastic training", "data_efficiency": "data efficiency",
    "curriculum_learning": "curriculum learning", "compression_training": "compression training",
    "aio": "async I/O offload", "quantize_training": "MoQ quantized training",
    "progressive_layer_drop": "progressive layer drop", "eigenvalue": "eigenvalue computation",
    "hybrid_engine": "the RLHF hybrid engine", "zenflow": "ZenFlow", "compile": "DeepCompile",
    "weight_quantization": "weight quantization",
    "expert_parallel": "expert parallelism (MoE)",
}

_COMM_TYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "bfp16": "bf16"}


def load_raw(config) -> dict:
    """A dict, or the path of a JSON file."""
    if isinstance(config, dict):
        return config
    if isinstance(config, (str, os.PathLike)):
        file = os.fspath(config)
        try:
            with open(file) as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {file!r} does not exist") from None
        except OSError as e:
            raise ConfigError(f"config file {file!r} cannot be read: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {file!r} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {file!r} must hold a JSON object, got {type(raw).__name__}")
        return raw
    raise ConfigError(f"config must be a dict or the path of a JSON file, got {type(config).__name__}")


def _resolve_batch(raw, world_size):
    """DeepSpeed's rule: train_batch_size = micro batch * accumulation * world size;
    any two give the third."""
    tbs = as_int(raw["train_batch_size"], ["train_batch_size"], minimum=1) if "train_batch_size" in raw else None
    mbs = (as_int(raw["train_micro_batch_size_per_gpu"], ["train_micro_batch_size_per_gpu"], minimum=1)
           if "train_micro_batch_size_per_gpu" in raw else None)
    gas = (as_int(raw["gradient_accumulation_steps"], ["gradient_accumulation_steps"], minimum=1)
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


def parse_config(config, world_size: int = 1, cpu_engine: bool = True, pipeline: bool = False) -> Config:
    """Validate a DeepSpeed-style config (dict or JSON path) for `world_size`
    ranks (data-parallel ranks: the batch is split over them); cpu_engine:
    whether the engine trains on the CPU (offload to the CPU is then where the
    state already is); pipeline: whether the model is a PipelineModule."""
    raw = load_raw(config)
    autos = auto_values(raw)
    if autos:
        raise ConfigError(f"config: {', '.join(autos)} {'is' if len(autos) == 1 else 'are'} \"auto\", a placeholder "
                          "that Hugging Face's Trainer fills in from its own arguments before DeepSpeed sees the "
                          "file; give numbers here (or train through the Trainer)")
    inert: List[str] = []
    check_keys(raw, [], _SECTIONS | set(_MUST_BE_OFF), inert=_INERT, inert_found=inert)
    tbs, mbs, gas = _resolve_batch(raw, world_size)
    c = Config(train_batch_size=tbs, train_micro_batch_size_per_gpu=mbs, gradient_accumulation_steps=gas)
    if "gradient_clipping" in raw:
        c.gradient_clipping = as_float(raw["gradient_clipping"], ["gradient_clipping"], minimum=0.0)
    if "fp16" in raw:
        c.fp16 = parse_fp16(raw["fp16"], inert)
    for key in ("bf16", "bfloat16"):
        if key in raw:
            c.bf16_enabled = parse_bf16(raw[key], key, inert)
    if c.fp16.enabled and c.bf16_enabled:
        raise ConfigError("config: fp16 and bf16 cannot both be enabled")
    if "torch_autocast" in raw:
        c.torch_autocast = parse_autocast(raw["torch_autocast"])
        if c.torch_autocast.enabled and (c.fp16.enabled or c.bf16_enabled):
            fail(["torch_autocast", "enabled"], "cannot be combined with fp16 or bf16 (autocast keeps the model in "
                                                "float32 and runs forward in lower precision)")
    if "optimizer" in raw:
        c.optimizer = parse_optimizer(raw["optimizer"], inert)
    if "scheduler" in raw:
        c.scheduler = parse_scheduler(raw["scheduler"])
    if "zero_optimization" in raw:
        c.zero = parse_zero(raw["zero_optimization"], inert, cpu_engine)
    if "communication_data_type" in raw and raw["communication_data_type"] is not None:
        kind = as_str(raw["communication_data_type"], ["communication_data_type"], allowed=tuple(_COMM_TYPES))
        c.communication_data_type = _COMM_TYPES[kind]
    if "steps_per_print" in raw and raw["steps_per_print"] is not None:
        c.steps_per_print = as_int(raw["steps_per_print"], ["steps_per_print"], minimum=1)
    for key in ("wall_clock_breakdown", "memory_breakdown", "prescale_gradients", "dataloader_drop_last",
                "zero_allow_untested_optimizer"):
        if key in raw:
            setattr(c, key, as_bool(raw[key], [key]))
    if "gradient_predivide_factor" in raw:
        c.gradient_predivide_factor = as_float(raw["gradient_predivide_factor"], ["gradient_predivide_factor"],
                                               positive=True)
    if c.prescale_gradients and c.gradient_predivide_factor != 1.0:
        # DeepSpeed's rule: prescaling divides by the world size; the factor applies only without it.
        inert.append(path(["gradient_predivide_factor"]) + " (prescale_gradients is true)")
        c.gradient_predivide_factor = 1.0
    if "comms_logger" in raw:
        c.comms_logger = _parse_comms_logger(raw["comms_logger"])
    for key in ("tensorboard", "csv_monitor"):
        if key in raw:
            setattr(c, key, parse_monitor(raw[key], key))
    if "activation_checkpointing" in raw:
        c.activation_checkpointing = parse_activation_checkpointing(raw["activation_checkpointing"], inert, cpu_engine)
    if raw.get("sparse_gradients", False) is not False:
        fail(["sparse_gradients"], "sparse gradients (torch.nn.Embedding(sparse=True)) are not supported by zerofuse")
    if "data_types" in raw:
        _check_data_types(raw["data_types"], c, inert)
    if "tensor_parallel" in raw:
        c.autotp_size = parse_tensor_parallel(raw["tensor_parallel"], inert)
        if c.autotp_size > 1 and c.zero.stage == 3:
            fail(["tensor_parallel", "autotp_size"], "cannot be combined with ZeRO stage 3; use stage 0, 1 or 2")
    if "pipeline" in raw:
        if pipeline:
            c.pipeline_timeout = _parse_pipeline(raw["pipeline"], inert)
        else:  # DeepSpeed reads this section only for a PipelineModule.
            inert.append(path(["pipeline"]) + " (the model is not a PipelineModule)")
    for key, what in _MUST_BE_OFF.items():
        if key in raw:
            disabled_only(raw[key], [key], what)
    c.inert_keys = inert
    return c


def parse_tensor_parallel(raw, inert=None) -> int:
    """DeepSpeed's tensor_parallel section: autotp_size (AutoTP over that many
    ranks); tp_overlap_comm is accepted without effect."""
    parts = ["tensor_parallel"]
    s = as_section(raw, parts)
    check_keys(s, parts, {"autotp_size"}, inert={"tp_overlap_comm", "keep_module_on_host"},
               inert_found=inert if inert is not None else [])
    return as_int(s.get("autotp_size", 1), parts + ["autotp_size"], minimum=1)


def _parse_pipeline(raw, inert) -> float:
    """DeepSpeed's pipeline section. Its keys either configure the
    PipelineModule (which takes them as arguments) or partition activations
    for tensor parallelism, so they are accepted without effect; zerofuse's
    own "timeout" is how long (seconds) a stage waits for a neighbour."""
    parts = ["pipeline"]
    s = as_section(raw, parts)
    check_keys(s, parts, {"timeout"}, inert={"stages", "partition", "seed_layers", "activation_checkpoint_interval",
                                             "pipe_partitioned", "grad_partitioned", "use_reentrant"},
               inert_found=inert)
    return as_float(s["timeout"], parts + ["timeout"], positive=True) if "timeout" in s else 300.0


def _parse_comms_logger(raw) -> dict:
    """DeepSpeed's comms_logger section (runtime/comms_log.py); debug adds
    the caller's name to DeepSpeed's log lines, which zerofuse's lack."""
    parts = ["comms_logger"]
    s = as_section(raw, parts)
    check_keys(s, parts, {"enabled", "verbose", "prof_all", "debug", "prof_ops"})
    out = {}
    for key in ("enabled", "verbose", "prof_all", "debug"):
        if key in s:
            out[key] = as_bool(s[key], parts + [key])
    out.pop("debug", None)
    if "prof_ops" in s:
        ops = s["prof_ops"]
        if not isinstance(ops, list) or not all(isinstance(o, str) for o in ops):
            fail(parts + ["prof_ops"], f"must be a list of collective names, got {ops!r}")
        out["prof_ops"] = list(ops)
    return out


def _check_data_types(raw, c: Config, inert):
    parts = ["data_types"]
    if not isinstance(raw, dict):
        fail(parts, f"must be a JSON object, got {raw!r}")
    check_keys(raw, parts, {"grad_accum_dtype"}, inert={"param_dtype", "buffer_dtype", "keep_in_fp32_modules"},
               inert_found=inert)
    wanted = raw.get("grad_accum_dtype")
    model = "fp16" if c.fp16.enabled else "bf16" if c.bf16_enabled else "fp32"
    if wanted not in (None, model):
        fail(parts + ["grad_accum_dtype"], f"zerofuse accumulates gradients in the model's dtype ({model!r}), "
                                           f"got {wanted!r}")
