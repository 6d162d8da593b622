"""Fine-tune a BERT-style classifier (Hugging Face transformers, built from a
config: no download) through zerofuse.initialize, with zerofuse's LayerNorm
and attention swapped in by zerofuse.optimize.

The task is generated (a toy sentiment task): which of two word classes is in
the majority among a sequence's real tokens -- padding must be ignored.

    python examples/finetune_classifier.py [--steps 150]
"""
import argparse

import torch
from transformers import BertConfig, BertForSequenceClassification

import zerofuse


def make_dataset(n, vocab=40, length=24, seed=0):
    """Token sequences of random length (padded with 0). Tokens 5-19 are
    "positive" words, 20-39 "negative" ones; the label says which kind is in the
    majority among the real (unpadded) tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, length), generator=g)
    lengths = torch.randint(length // 3, length + 1, (n,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    ids[:, 0] = 1  # [CLS]
    ids = ids.masked_fill(~mask, 0)
    positive = ((ids >= 5) & (ids < 20) & mask).sum(1)
    negative = ((ids >= 20) & mask).sum(1)
    return ids, mask.long(), (positive > negative).long()


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=40, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    zerofuse.optimize(model)  # zerofuse LayerNorm + attn_implementation="zerofuse"
    engine, *_ = zerofuse.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 32, "steps_per_print": 50, "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "weight_decay": 0.01}},
        "zero_optimization": {"stage": 1}})
    ids, mask, labels = make_dataset(32 * args.steps)
    losses = []
    for step in range(args.steps):
        rows = slice(step * 32, (step + 1) * 32)
        loss = engine(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    test_ids, test_mask, test_labels = make_dataset(512, seed=1)
    engine.eval()
    with torch.no_grad():
        predicted = engine(input_ids=test_ids, attention_mask=test_mask).logits.argmax(-1)
    accuracy = (predicted == test_labels.to(predicted.device)).float().mean().item()
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"loss {first:.3f} -> {last:.3f}; held-out accuracy {accuracy:.1%} "
          f"(always guessing the majority class: {max(test_labels.float().mean().item(), 1 - test_labels.float().mean().item()):.1%})")
    return first, last, accuracy


if __name__ == "__main__":
    main()
