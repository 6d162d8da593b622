"""A small GPT for engine tests: sizes that divide nothing evenly, tied
embeddings, zerofuse's LayerNorm and attention."""
import torch
import torch.nn.functional as F

import zerofuse
from zerofuse.ops import attention

VOCAB, WIDTH, HEADS, LAYERS, SEQ = 37, 24, 3, 2, 11


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1 = zerofuse.nn.LayerNorm(WIDTH)
        # No qkv bias: the key bias gets no gradient (softmax ignores a shift per
        # row), so its "gradient" is rounding noise that Adam would amplify.
        self.qkv = torch.nn.Linear(WIDTH, 3 * WIDTH, bias=False)
        self.proj = torch.nn.Linear(WIDTH, WIDTH)
        self.ln2 = zerofuse.nn.LayerNorm(WIDTH)
        self.fc = torch.nn.Linear(WIDTH, 4 * WIDTH + 1)  # odd width on purpose
        self.out = torch.nn.Linear(4 * WIDTH + 1, WIDTH)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, HEADS, WIDTH // HEADS).unbind(2)
        y = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, WIDTH))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.wte = torch.nn.Embedding(VOCAB, WIDTH)
        self.wpe = torch.nn.Embedding(SEQ, WIDTH)
        self.blocks = torch.nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f = zerofuse.nn.LayerNorm(WIDTH)
        self.head = torch.nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.wte.weight  # tied, as GPT-2
        self.register_buffer("positions", torch.arange(SEQ), persistent=False)

    def forward(self, tokens, targets):
        x = self.wte(tokens) + self.wpe(self.positions[: tokens.shape[1]])
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, VOCAB), targets.reshape(-1))


def batch(step, rows, seed=1):
    """Deterministic token rows for a step: (tokens, targets), each [rows, SEQ]."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    data = torch.randint(0, VOCAB, (rows, SEQ + 1), generator=g)
    return data[:, :-1], data[:, 1:]
