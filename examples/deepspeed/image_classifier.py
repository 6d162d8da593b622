"""A DeepSpeed-style image classifier (the shape of DeepSpeed's CIFAR-10
example), written for DeepSpeed and run unmodified by zerofuse:

    zerofuse launch --num_gpus 2 image_classifier.py --deepspeed --deepspeed_config ds_config.json

The images are synthetic 3x32x32 tensors whose class decides a colour shift,
so the script needs no download and its accuracy shows that it learns.
"""
import argparse

import deepspeed
import torch
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.accelerator import get_accelerator


def add_argument():
    parser = argparse.ArgumentParser(description="image classifier")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--local_rank", type=int, default=-1, help="local rank passed from the launcher")
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args()


class SyntheticImages(torch.utils.data.Dataset):
    def __init__(self, n=256, classes=10, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, classes, (n,), generator=g)
        shift = torch.linspace(-1, 1, classes)[self.labels].view(n, 1, 1, 1)
        self.images = torch.randn(n, 3, 32, 32, generator=g) * 0.5 + shift

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def main():
    args = add_argument()
    deepspeed.init_distributed()
    trainset = SyntheticImages()
    net = Net()
    parameters = filter(lambda p: p.requires_grad, net.parameters())
    model_engine, optimizer, trainloader, _ = deepspeed.initialize(args=args, model=net, model_parameters=parameters,
                                                                   training_data=trainset)
    local_device = get_accelerator().device_name(model_engine.local_rank)
    target_dtype = None
    if model_engine.bfloat16_enabled():
        target_dtype = torch.bfloat16
    elif model_engine.fp16_enabled():
        target_dtype = torch.half
    criterion = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        running = 0.0
        for i, (inputs, labels) in enumerate(trainloader):
            inputs, labels = inputs.to(local_device), labels.to(local_device)
            if target_dtype is not None:
                inputs = inputs.to(target_dtype)
            loss = criterion(model_engine(inputs).float(), labels)
            model_engine.backward(loss)
            model_engine.step()
            running += loss.item()
        if model_engine.global_rank == 0:
            print(f"epoch {epoch}: mean loss {running / (i + 1):.4f}", flush=True)
    correct = total = 0
    model_engine.eval()
    with torch.no_grad():
        for inputs, labels in trainloader:
            inputs = inputs.to(local_device)
            if target_dtype is not None:
                inputs = inputs.to(target_dtype)
            predicted = model_engine(inputs).argmax(1).cpu()
            correct += (predicted == labels).sum().item()
            total += labels.numel()
    if model_engine.global_rank == 0:
        print(f"accuracy {correct / total:.3f} after {model_engine.global_steps} steps", flush=True)


if __name__ == "__main__":
    main()
