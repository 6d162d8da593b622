"""A small GPT (tied embeddings, fused QKV) and its Megatron-style tensor-
parallel form built from it: each rank holds the slices of the whole
model's weights, so both start from the same values."""
import torch
import torch.nn.functional as F

import zerofuse
from zerofuse.ops import attention
from zerofuse.tp import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                         linear_vocab_parallel_cross_entropy)
from zerofuse.tp.layers import tp_world

VOCAB, WIDTH, HEADS, SEQ, LAYERS = 48, 32, 4, 11, 2


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1 = zerofuse.nn.LayerNorm(WIDTH)
        self.q, self.k, self.v = (torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(3))
        self.proj = torch.nn.Linear(WIDTH, WIDTH)
        self.ln2 = zerofuse.nn.LayerNorm(WIDTH)
        self.fc = torch.nn.Linear(WIDTH, 4 * WIDTH)
        self.out = torch.nn.Linear(4 * WIDTH, WIDTH)

    def attend(self, q, k, v, heads):
        b, t, _ = q.shape
        q, k, v = (z.view(b, t, heads, -1).transpose(1, 2) for z in (q, k, v))
        return attention(q, k, v, causal=True).transpose(1, 2).reshape(b, t, -1)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.proj(self.attend(self.q(h), self.k(h), self.v(h), HEADS))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.wte = torch.nn.Embedding(VOCAB, WIDTH)
        self.wpe = torch.nn.Embedding(SEQ, WIDTH)
        self.blocks = torch.nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f = zerofuse.nn.LayerNorm(WIDTH)

    def forward(self, tokens, targets):
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied head
        return F.cross_entropy(logits.float().view(-1, VOCAB), targets.reshape(-1))


class ParallelBlock(torch.nn.Module):
    """Heads split: QKV column-parallel (one input all-reduce in backward), the
    output projection row-parallel (one all-reduce forward); the MLP likewise."""

    def __init__(self, block: Block, group):
        super().__init__()
        self.heads = HEADS // tp_world(group)
        self.ln1, self.ln2 = block.ln1, block.ln2  # replicated
        self.qkv = ColumnParallelLinear.from_linears([block.q, block.k, block.v], group)
        self.proj = RowParallelLinear.from_linear(block.proj, group)
        self.fc = ColumnParallelLinear.from_linear(block.fc, group)
        self.out = RowParallelLinear.from_linear(block.out, group)

    def forward(self, x):
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        x = x + self.proj(Block.attend(None, q, k, v, self.heads))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class ParallelGPT(torch.nn.Module):
    def __init__(self, full: GPT, group):
        super().__init__()
        self.group = group
        self.wte = VocabParallelEmbedding.from_embedding(full.wte, group)
        self.wpe = full.wpe
        self.blocks = torch.nn.ModuleList(ParallelBlock(b, group) for b in full.blocks)
        self.ln_f = full.ln_f

    def forward(self, tokens, targets):
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return linear_vocab_parallel_cross_entropy(self.ln_f(x), self.wte.weight, targets, self.group)


def full_slice(full_value, param, group):
    """The part of the whole model's parameter that this rank's `param` holds."""
    if not getattr(param, "tensor_model_parallel", False):
        return full_value
    world, rank = tp_world(group), torch.distributed.get_rank(group)
    return full_value.chunk(world, dim=param.partition_dim)[rank]


# --- the same GPT as pipeline layers with tensor-parallel stages ---------------------------------------------


class ParallelEmbeddings(torch.nn.Module):
    """Token (vocabulary-parallel) and position embeddings, built whole and sliced."""

    def __init__(self, group):
        super().__init__()
        self.wte = VocabParallelEmbedding.from_embedding(torch.nn.Embedding(VOCAB, WIDTH), group)
        self.wpe = torch.nn.Embedding(SEQ, WIDTH)

    def forward(self, tokens):
        return self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))


class PipeBlock(ParallelBlock):
    def __init__(self, group):
        super().__init__(Block(), group)


class FinalNorm(zerofuse.nn.LayerNorm):
    def __init__(self):
        super().__init__(WIDTH)


def hidden_and_head(embeddings, x):
    return x, embeddings.wte.weight


class HeadLoss:
    def __init__(self, group):
        self.group = group

    def __call__(self, outputs, targets):
        x, weight = outputs
        return linear_vocab_parallel_cross_entropy(x, weight, targets, self.group)


def pipeline_specs(group):
    from zerofuse.pipe import LayerSpec, TiedLayerSpec
    tied = dict(tied_weight_attr="wte.weight")
    return [TiedLayerSpec("embed", ParallelEmbeddings, group, **tied),
            *[LayerSpec(PipeBlock, group) for _ in range(LAYERS)], LayerSpec(FinalNorm),
            TiedLayerSpec("embed", ParallelEmbeddings, group, forward_fn=hidden_and_head, **tied)]


class PipelineReference(torch.nn.Module):
    """pipeline_specs' model whole, in one process, with PipelineModule's layer seeds (base 1234)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1234)
        self.wte, self.wpe = torch.nn.Embedding(VOCAB, WIDTH), torch.nn.Embedding(SEQ, WIDTH)
        self.blocks = torch.nn.ModuleList()
        for i in range(LAYERS):
            torch.manual_seed(1234 + 1 + i)
            self.blocks.append(Block())
        self.ln_f = FinalNorm()

    def forward(self, tokens, targets):
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return F.cross_entropy(F.linear(self.ln_f(x), self.wte.weight).float().view(-1, VOCAB), targets.reshape(-1))
