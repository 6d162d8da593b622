"""The data-parallel peers of bench/train_gpt2.py, each training the same GPT
(torch's LayerNorm and SDPA, bf16 compute, fused AdamW, gradient clipping) at
world size 1 in this process: DDP + ZeroRedundancyOptimizer, FSDP2 and, when
it is installed, DeepSpeed ZeRO-1. Each returns (seconds after warm-up, losses)."""
import contextlib
import io
import os
import socket

import torch
import torch.distributed as dist

from zerofuse.models import GPT, GPTConfig

from .common import engine_step, timed_training


def ensure_process_group(device):
    """A world-size-1 process group (NCCL on CUDA, gloo on the CPU), unless one exists."""
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1,
                            **({"device_id": device} if device.type == "cuda" else {}))


def _baseline_model(config, device):
    torch.manual_seed(0)  # the same initial weights as the other runs
    return GPT(GPTConfig(**{**config.__dict__, "fused": False})).to(device)


def plain_step(forward, model, opt, autocast_device=None):
    """One training step of a torch-side peer: forward (under bf16 autocast
    when autocast_device is given), backward, clip to 1.0, the optimizer."""
    def step(x, y):
        with torch.autocast(autocast_device, dtype=torch.bfloat16) if autocast_device else contextlib.nullcontext():
            loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def run_ddp_zero(config, data, warmup):
    """DDP + ZeroRedundancyOptimizer(AdamW, fused=True), bf16 autocast."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    device = data[0][0].device
    ensure_process_group(device)
    model = _baseline_model(config, device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = ZeroRedundancyOptimizer(model.param_groups(0.1), optimizer_class=torch.optim.AdamW, lr=6e-4,
                                  betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    return timed_training(data, warmup, plain_step(ddp, model, opt, autocast_device=device.type))


def run_fsdp2(config, data, warmup):
    """FSDP2: fully_shard(reshard_after_forward=False) per block and at the root,
    bf16 parameters for compute with float32 gradient reduction, fused AdamW."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = data[0][0].device
    ensure_process_group(device)
    model = _baseline_model(config, device)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, reshard_after_forward=False, mp_policy=policy)
    fully_shard(model, reshard_after_forward=False, mp_policy=policy)
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=6e-4, betas=(0.9, 0.95), eps=1e-8,
                            fused=device.type == "cuda")
    return timed_training(data, warmup, plain_step(model, model, opt))  # the policy casts, not autocast


def deepspeed_available():
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def run_deepspeed(config, data, warmup):
    """DeepSpeed ZeRO-1 with bf16 and its fused Adam, the engine's own config."""
    import deepspeed

    device = data[0][0].device
    ensure_process_group(device)
    model = _baseline_model(config, device)
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.param_groups(0.1), config={
            "train_micro_batch_size_per_gpu": data[0][0].shape[0], "gradient_clipping": 1.0,
            "steps_per_print": 10**9, "bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
            "optimizer": {"type": "AdamW", "params": {"lr": 6e-4, "betas": [0.9, 0.95], "eps": 1e-8}}})

    return timed_training(data, warmup, engine_step(engine))
