"""The short version of `zerofuse train`, for people who write their own loop:
a byte-level GPT on the Python standard library, through zerofuse.initialize.

    python examples/train_gpt.py [--steps 300]                     # one process
    torchrun --nproc-per-node 2 examples/train_gpt.py --steps 300  # ZeRO-2 over two
"""
import argparse

import torch
import torch.distributed as dist

import zerofuse
from zerofuse.cli.data import load_corpus, sample_batch
from zerofuse.models import GPT, GPTConfig

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=300)
args = parser.parse_args()

train, val, _ = load_corpus()  # bytes of the standard library's .py files
model = GPT(GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=128))
config = {
    "train_batch_size": 16, "gradient_clipping": 1.0, "steps_per_print": 50,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.1}},
    "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": args.steps, "warmup_num_steps": 20}},
    "zero_optimization": {"stage": 2},
    "bf16": {"enabled": torch.cuda.is_available()},
}
engine, optimizer, _, scheduler = zerofuse.initialize(model=model, model_parameters=model.param_groups(0.1),
                                                      config=config)
rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
micro = engine.train_micro_batch_size_per_gpu()
for step in range(args.steps):
    x, y = sample_batch(train, engine.train_batch_size(), 128, seed=0, step=step)  # the global batch
    x, y = x[rank * micro:(rank + 1) * micro], y[rank * micro:(rank + 1) * micro]  # this rank's share
    loss = engine(x, y)
    engine.backward(loss)
    engine.step()
with torch.no_grad():
    x, y = sample_batch(val, 64, 128, seed=1, step=0)
    print(f"rank {rank}: step {engine.global_steps}, validation loss {engine(x, y).item():.3f}")
