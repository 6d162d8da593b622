"""zero.Init: build a model with its parameters partitioned from the start
(init_partition.py does the partitioning; this is the user-facing context)."""
import torch

from .. import distributed
from ..config import load_raw
from . import init_partition


def _dtype_of_config(config) -> torch.dtype:
    raw = load_raw(config)
    for key in ("fp16",):
        if isinstance(raw.get(key), dict) and raw[key].get("enabled") is True:
            return torch.float16
    for key in ("bf16", "bfloat16"):
        if isinstance(raw.get(key), dict) and raw[key].get("enabled") is True:
            return torch.bfloat16
    return None


class Init:
    """Inside `with zerofuse.zero.Init():` every module built keeps only this
    rank's 1/N of each parameter (DeepSpeed's deepspeed.zero.Init), so a
    model larger than one rank's memory can be built; the values are those
    the same code gives without the context. `dtype` (default: fp16/bf16 from
    `config_dict_or_path` when enabled there, else as created) converts
    floating parameters; `module` partitions a model built already;
    `enabled=False` makes the context do nothing. DeepSpeed's offload
    (remote_device "nvme", or "cpu" on a GPU) is refused; the other
    arguments DeepSpeed takes are accepted."""

    def __init__(self, module=None, data_parallel_group=None, mem_efficient_linear=True, remote_device=None,
                 pin_memory=False, config_dict_or_path=None, config=None, enabled=True, dtype=None, mpu=None,
                 zero_param_parallel_group=None, zero_quantized_weights=False,
                 zero_quantized_nontrainable_weights=False, sequence_data_parallel_group=None, param_swapper=None):
        self.enabled = bool(enabled)
        if not self.enabled:
            return
        if zero_quantized_weights or zero_quantized_nontrainable_weights:
            raise ValueError("zero.Init: quantized weights (ZeRO++) are not supported by zerofuse")
        config = config_dict_or_path if config_dict_or_path is not None else config
        if dtype is None and config is not None:
            dtype = _dtype_of_config(config)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"zero.Init: 'dtype' must be a floating torch.dtype, got {dtype!r}")
        if data_parallel_group is None and mpu is not None:
            data_parallel_group = mpu.get_data_parallel_group()
        placement = distributed.setup(data_parallel_group)
        if remote_device not in (None, "none", "cpu") or (remote_device == "cpu" and placement.device.type != "cpu"):
            raise ValueError(f"zero.Init: remote_device={remote_device!r} (offloading parameters) is not supported "
                             "by zerofuse; leave it unset")
        self.partition = init_partition.InitPartition(placement, dtype)
        self.patch = None
        if module is not None:
            if not isinstance(module, torch.nn.Module):
                raise TypeError(f"zero.Init: 'module' must be a torch.nn.Module, got {type(module).__name__}")
            self.partition.partition_module(module)

    def __enter__(self):
        if not self.enabled:
            return self
        if not init_partition.active():
            self.patch = init_partition.ModuleConstructionPatch().__enter__()
        init_partition.push(self.partition)
        return self

    def __exit__(self, *exc):
        if not self.enabled:
            return False
        init_partition.pop(self.partition)
        if self.patch is not None:
            self.patch.__exit__(*exc)
            self.patch = None
        return False
