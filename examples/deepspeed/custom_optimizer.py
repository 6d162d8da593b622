"""A DeepSpeed script that brings its own optimizer and learning-rate
scheduler (passed to deepspeed.initialize; the config has neither), written
for DeepSpeed and run unmodified by zerofuse:

    zerofuse launch --num_gpus 2 custom_optimizer.py --deepspeed_config ds_config_custom.json
"""
import argparse

import deepspeed
import torch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--steps", type=int, default=8)
    args = deepspeed.add_config_arguments(parser).parse_args()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    engine, optimizer, _, scheduler = deepspeed.initialize(args=args, model=model, optimizer=optimizer,
                                                           lr_scheduler=scheduler)
    rank, world = engine.global_rank, engine.world_size
    micro = engine.train_micro_batch_size_per_gpu()
    g = torch.Generator().manual_seed(1)
    target = torch.nn.Linear(16, 16)
    for step in range(args.steps):
        x = torch.randn(micro * world, 16, generator=g)[rank * micro:(rank + 1) * micro]
        with torch.no_grad():
            y = target(x)
        loss = torch.nn.functional.mse_loss(engine(x.to(engine.device)), y.to(engine.device))
        engine.backward(loss)
        engine.step()
        if rank == 0:
            print(f"step {engine.global_steps} lr {scheduler.get_last_lr()[0]:.5f} loss {loss.item():.5f}", flush=True)


if __name__ == "__main__":
    main()
