"""Models and a training loop shared by the ZeRO-3 tests: Hugging Face GPT-2,
Llama and BERT from small configs (dropout off, sizes that divide nothing),
and a single-process torch.optim.AdamW reference over the whole global batch."""
import contextlib
import io

import torch

import zerofuse

LR, WD, CLIP = 1e-2, 0.1, 1.0
VOCAB, SEQ = 61, 13


def hf_model(kind: str, seed: int = 0):
    import transformers as tf
    torch.manual_seed(seed)
    if kind == "gpt2":
        config = tf.GPT2Config(n_layer=2, n_embd=36, n_head=3, vocab_size=VOCAB, n_positions=32, bos_token_id=0,
                               eos_token_id=0, pad_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
        return tf.GPT2LMHeadModel(config)
    if kind == "llama":
        config = tf.LlamaConfig(hidden_size=36, intermediate_size=53, num_hidden_layers=2, num_attention_heads=6,
                                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32,
                                tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return tf.LlamaForCausalLM(config)
    if kind == "bert":
        config = tf.BertConfig(hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=53,
                               vocab_size=VOCAB, max_position_embeddings=32, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0)
        return tf.BertForMaskedLM(config)
    raise ValueError(kind)


def hf_batch(step: int, rows: int):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(1, VOCAB, (rows, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def hf_config(stage, dtype="fp32", micro=2, accum=2, **zero):
    return {
        "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum, "steps_per_print": 1000,
        "gradient_clipping": CLIP, "bf16": {"enabled": dtype == "bf16"},
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD, "betas": [0.9, 0.99]}},
        "zero_optimization": dict({"stage": stage, "reduce_bucket_size": 900}, **zero),
    }


def make_engine(model, config, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = zerofuse.initialize(model=model, config=config, **kwargs)
    return engine


def adamw_reference(model, make_batch, steps, rows, clip=None, **adamw):
    """torch.optim.AdamW on the plain model over each step's whole batch (a
    tuple passed positionally, or a Hugging Face dict). Returns (losses, final
    parameters by name)."""
    opt = torch.optim.AdamW(model.parameters(), **adamw)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        batch = make_batch(step, rows)
        loss = model(**batch).loss if isinstance(batch, dict) else model(*batch)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def reference(kind, steps, rows):
    """The one-process reference for hf_model(kind) trained on hf_batch."""
    return adamw_reference(hf_model(kind), hf_batch, steps, rows, clip=CLIP, lr=LR, weight_decay=WD, betas=(0.9, 0.99))
