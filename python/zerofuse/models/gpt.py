"""A GPT-2-style decoder built from zerofuse's modules (fused=True): its
LayerNorm, attention, the residual add fused into the second LayerNorm, bias +
GELU in one kernel, and the head + loss without the [tokens, vocab] logits --
or from torch's own (fused=False, the baseline benchmarks compare against).
Weight-tied embeddings, GPT-2 init."""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..nn.layer_norm import LayerNorm as FusedLayerNorm
from ..ops.add_layer_norm import add_layer_norm
from ..ops.attention import attention_qkv_packed
from ..ops.bias_gelu import bias_gelu
from ..ops.cross_entropy import linear_cross_entropy


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    fused: bool = True  # zerofuse kernels; False: torch.nn.LayerNorm and SDPA

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig: '{name}' must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: 'n_embd' ({self.n_embd}) must be divisible by 'n_head' ({self.n_head})")

    def num_params(self, with_embeddings=True):
        d, L = self.n_embd, self.n_layer
        per_block = 12 * d * d + 13 * d
        n = L * per_block + 2 * d + self.vocab_size * d + self.block_size * d
        return n if with_embeddings else n - self.vocab_size * d - self.block_size * d

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward): 6N plus attention."""
        t = seq_len or self.block_size
        return 6 * self.num_params(False) + 6 * self.vocab_size * self.n_embd + 12 * self.n_layer * self.n_embd * t


class CausalSelfAttention(torch.nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.n_head, self.fused = c.n_head, c.fused
        self.qkv = torch.nn.Linear(c.n_embd, 3 * c.n_embd)
        self.proj = torch.nn.Linear(c.n_embd, c.n_embd)

    def forward(self, x):
        if self.fused:  # from the fused QKV output to [B, T, C], gradient back into one [B, T, 3C]
            return self.proj(attention_qkv_packed(self.qkv(x), self.n_head, causal=True))
        b, t, d = x.shape
        # [B, T, 3, H, Dh] -> three [B, H, T, Dh] views
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, d // self.n_head).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(torch.nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        norm = FusedLayerNorm if c.fused else torch.nn.LayerNorm
        self.ln_1 = norm(c.n_embd)
        self.attn = CausalSelfAttention(c)
        self.ln_2 = norm(c.n_embd)
        self.fc = torch.nn.Linear(c.n_embd, 4 * c.n_embd)
        self.fc_proj = torch.nn.Linear(4 * c.n_embd, c.n_embd)

    def forward(self, x):
        if not isinstance(self.ln_2, FusedLayerNorm):
            x = x + self.attn(self.ln_1(x))
            return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))
        # x + attention and its LayerNorm in one pass; the fc bias inside the GELU kernel.
        h, x = add_layer_norm(self.attn(self.ln_1(x)), x, self.ln_2.normalized_shape, self.ln_2.weight,
                              self.ln_2.bias, self.ln_2.eps)
        return x + self.fc_proj(bias_gelu(F.linear(h, self.fc.weight), self.fc.bias, approximate="tanh"))


class GPT(torch.nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = c = config
        self.wte = torch.nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = torch.nn.Embedding(c.block_size, c.n_embd)
        self.blocks = torch.nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = (FusedLayerNorm if c.fused else torch.nn.LayerNorm)(c.n_embd)
        self.lm_head = torch.nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(self._init)
        for block in self.blocks:  # residual projections, scaled as GPT-2
            for proj in (block.attn.proj, block.fc_proj):
                torch.nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init(module):
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, torch.nn.Embedding):
            torch.nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx, targets=None):
        t = idx.shape[1]
        if t > self.config.block_size:
            raise ValueError(f"GPT: sequence of {t} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        if targets is None:
            return self.lm_head(x)
        if self.config.fused:  # the loss without ever holding the [tokens, vocab] logits
            return linear_cross_entropy(x, self.lm_head.weight, targets)
        logits = self.lm_head(x)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))

    def param_groups(self, weight_decay):
        """Weight decay on matrices only (not biases, LayerNorm or... embeddings are matrices)."""
        decay = [p for p in self.parameters() if p.dim() >= 2]
        rest = [p for p in self.parameters() if p.dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]
            logits = self(context)[:, -1, :].float() / max(temperature, 1e-6)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
        return idx
