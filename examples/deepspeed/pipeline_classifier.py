"""A pipeline-parallel image classifier in the shape of DeepSpeed's
pipeline_parallelism example (a CNN written as a list of layers, split
into stages by PipelineModule, trained with engine.train_batch()), written
for DeepSpeed and run unmodified by zerofuse:

    zerofuse launch --num_gpus 2 pipeline_classifier.py --pipeline-parallel-size 2 \
        --deepspeed_config ds_config_pipe.json

The images are synthetic (see image_classifier.py), so it needs no download.
"""
import argparse

import deepspeed
import torch
import torch.nn as nn
from deepspeed.pipe import PipelineModule
from image_classifier import SyntheticImages  # the example beside this one (synthetic, no download)


def get_args():
    parser = argparse.ArgumentParser(description="pipeline-parallel image classifier")
    parser.add_argument("--local_rank", type=int, default=-1, help="local rank passed from the launcher")
    parser.add_argument("-s", "--steps", type=int, default=20, help="training steps")
    parser.add_argument("-p", "--pipeline-parallel-size", type=int, default=2, help="pipeline stages")
    parser.add_argument("--seed", type=int, default=1138)
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args()


def layers():
    """The classifier as a sequence: each layer's output is the next one's input."""
    return [
        nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2, 2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2, 2),
        lambda x: torch.flatten(x, 1),
        nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, 10),
    ]


def main():
    args = get_args()
    deepspeed.init_distributed()
    torch.manual_seed(args.seed)
    net = PipelineModule(layers=layers(), loss_fn=nn.CrossEntropyLoss(), num_stages=args.pipeline_parallel_size,
                         partition_method="parameters", activation_checkpoint_interval=0)
    engine, _, _, _ = deepspeed.initialize(args=args, model=net,
                                           model_parameters=[p for p in net.parameters() if p.requires_grad],
                                           training_data=SyntheticImages(n=512))
    for step in range(args.steps):
        loss = engine.train_batch()
        if engine.global_rank == 0 and (step + 1) % 5 == 0:
            print(f"step {step + 1}: loss {loss.item():.6f}", flush=True)


if __name__ == "__main__":
    main()
