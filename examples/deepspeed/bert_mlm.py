"""A DeepSpeed-style BERT masked-LM pre-training script (the shape of
DeepSpeed's bing_bert example), written for DeepSpeed and run unmodified by
zerofuse. It checkpoints with client_state (epoch, step, a tensor and a numpy
array of its own) and resumes from the latest checkpoint:

    zerofuse launch --num_gpus 2 bert_mlm.py --deepspeed_config ds_config_bert.json --output_dir out --steps 6
    zerofuse launch --num_gpus 2 bert_mlm.py --deepspeed_config ds_config_bert.json --output_dir out --steps 9 --resume

A tiny BERT from a config (no download) learns random token sequences that repeat.
"""
import argparse
import os

import deepspeed
import numpy as np
import torch
from deepspeed.utils import logger
from transformers import BertConfig, BertForMaskedLM


def parse():
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--seed", type=int, default=42)
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args()


def masked_batch(step, rows, vocab=64, length=16, seed=0):
    g = torch.Generator().manual_seed(seed * 10_000 + step)
    base = torch.randint(4, vocab, (rows, length // 2), generator=g)
    ids = torch.cat([base, base], dim=1)  # the second half repeats the first
    labels = ids.clone()
    mask = torch.rand(ids.shape, generator=g) < 0.25
    ids[mask] = 3  # [MASK]
    labels[~mask] = -100
    return ids, labels


def main():
    args = parse()
    deepspeed.init_distributed()
    torch.manual_seed(args.seed)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = BertForMaskedLM(config)
    engine, _, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())
    rank, world = deepspeed.comm.get_rank(), deepspeed.comm.get_world_size()
    start, seen = 0, torch.zeros(1)
    if args.resume:
        path, client = engine.load_checkpoint(args.output_dir)
        assert path is not None, "nothing to resume from"
        start, seen = client["step"], client["tokens_seen"]
        assert isinstance(client["history"], np.ndarray)
        logger.info(f"resumed from {path} at step {start}")
    history = []
    micro = engine.train_micro_batch_size_per_gpu()
    for step in range(start, args.steps):
        for m in range(engine.gradient_accumulation_steps()):
            ids, labels = masked_batch(step * 100 + m, micro * world)
            rows = slice(rank * micro, (rank + 1) * micro)
            out = engine(input_ids=ids[rows].to(engine.device), labels=labels[rows].to(engine.device))
            engine.backward(out.loss)
            engine.step()
            seen += ids[rows].numel()
        history.append(out.loss.item())
        if rank == 0:
            print(f"step {step + 1} loss {out.loss.item():.4f}", flush=True)
    engine.save_checkpoint(args.output_dir, client_state={"step": args.steps, "tokens_seen": seen,
                                                          "history": np.array(history), "epoch": 0})
    if rank == 0:
        print(f"saved at step {args.steps}: {os.path.join(args.output_dir, f'global_step{engine.global_steps}')}",
              flush=True)


if __name__ == "__main__":
    main()
