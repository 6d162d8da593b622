"""Writes the DeepSpeed checkpoints tests/test_deepspeed_import.py converts,
with real DeepSpeed (CPU accelerator, gloo), and the losses DeepSpeed itself
gets when it continues training from them. Run with DeepSpeed installed:

    DS_ACCELERATOR=cpu torchrun --nproc-per-node 2 dev/deepspeed_fixtures/make_checkpoints.py OUT_DIR

(The committed fixtures came from DeepSpeed 0.19.8 and torch 2.13.0, 2 ranks.)
"""
import json
import os
import sys

import deepspeed
import torch

OUT = sys.argv[1]
CASES = {"zero0_fp32": (0, "fp32"), "zero0_bf16": (0, "bf16"), "zero1_fp32": (1, "fp32"), "zero2_bf16": (2, "bf16")}


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3))


def batch(step, rank):
    g = torch.Generator().manual_seed(step)
    return torch.randn(4, 5, generator=g)[2 * rank:2 * rank + 2], torch.randn(4, 3, generator=g)[2 * rank:2 * rank + 2]


def config(stage, dtype):
    return {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 1000, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 1e-2, "warmup_num_steps": 4,
                                                         "warmup_type": "linear"}},
            "zero_optimization": {"stage": stage}, "bf16": {"enabled": dtype == "bf16"}}


def train(engine, steps, start, rank):
    losses = []
    for step in range(start, start + steps):
        x, y = batch(step, rank)
        out = engine(x.to(engine.device, next(engine.module.parameters()).dtype))
        loss = torch.nn.functional.mse_loss(out.float(), y)
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        losses.append(total.item() / torch.distributed.get_world_size())
    return losses


deepspeed.init_distributed(dist_backend="gloo")
rank = torch.distributed.get_rank()
expected = {}
for name, (stage, dtype) in CASES.items():
    engine, *_ = deepspeed.initialize(model=model(), config=config(stage, dtype))
    train(engine, 3, 0, rank)
    engine.save_checkpoint(os.path.join(OUT, name), client_state={"epoch": 5, "note": "from DeepSpeed"})
    expected[name] = train(engine, 2, 3, rank)
if rank == 0:
    with open(os.path.join(OUT, "expected_losses.json"), "w") as f:
        json.dump({"deepspeed": deepspeed.__version__, "torch": torch.__version__, "losses_after_resume": expected},
                  f, indent=1)
