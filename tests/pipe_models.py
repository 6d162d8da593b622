"""A GPT written as pipeline layers (tied embedding and head, odd sizes), and
its one-process reference built independently with the same seeds."""
import torch
import torch.nn.functional as F

from tiny_gpt import SEQ, VOCAB, WIDTH, Block, batch  # noqa: F401  (batch: the tests' data)
import zerofuse
from zerofuse.pipe import LayerSpec, PipelineModule, TiedLayerSpec

BASE_SEED = 1234
BLOCKS = 4


class Embeddings(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = torch.nn.Embedding(VOCAB, WIDTH)
        self.wpe = torch.nn.Embedding(SEQ, WIDTH)

    def forward(self, tokens):
        return self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))


class FinalNorm(zerofuse.nn.LayerNorm):
    def __init__(self):
        super().__init__(WIDTH)


def head(embeddings, x):
    return F.linear(x, embeddings.wte.weight)


def loss_fn(logits, targets):
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1))


def layer_specs(tied=True, blocks=BLOCKS):
    specs = [TiedLayerSpec("embed", Embeddings, tied_weight_attr="wte.weight") if tied else LayerSpec(Embeddings)]
    specs += [LayerSpec(Block) for _ in range(blocks)]
    specs.append(LayerSpec(FinalNorm))
    if tied:
        specs.append(TiedLayerSpec("embed", Embeddings, forward_fn=head, tied_weight_attr="wte.weight"))
    else:
        specs.append(LayerSpec(torch.nn.Linear, WIDTH, VOCAB, bias=False))
    return specs


def pipeline_model(num_stages=None, tied=True, blocks=BLOCKS, **kwargs):
    return PipelineModule(layer_specs(tied, blocks), num_stages=num_stages, loss_fn=loss_fn, seed_layers=True,
                          base_seed=BASE_SEED, **kwargs)


class Reference(torch.nn.Module):
    """The same model in one process, without zerofuse.pipe: each layer built
    after torch.manual_seed(BASE_SEED + its index), the tied module once (at
    layer 0). Parameter names follow the pipeline's."""

    def __init__(self, tied=True, blocks=BLOCKS):
        super().__init__()
        n = blocks + 3
        torch.manual_seed(BASE_SEED)
        embed = Embeddings()
        self.layers = torch.nn.ModuleDict()
        for idx in range(1, blocks + 1):
            torch.manual_seed(BASE_SEED + idx)
            self.layers[str(idx)] = Block()
        torch.manual_seed(BASE_SEED + blocks + 1)
        self.layers[str(blocks + 1)] = FinalNorm()
        self.tied = tied
        if tied:
            self.embed = embed
        else:
            self.layers["0"] = embed
            torch.manual_seed(BASE_SEED + n - 1)
            self.layers[str(n - 1)] = torch.nn.Linear(WIDTH, VOCAB, bias=False)
        self.blocks = blocks

    def pipeline_names(self):
        """This model's parameter name -> the pipeline's name for it."""
        out = {}
        for name, _ in self.named_parameters():
            if name.startswith("embed."):
                out[name] = "tied_modules.embed." + name[len("embed."):]
            else:
                out[name] = name[len("layers."):]
        return out

    def forward(self, tokens, targets):
        x = (self.embed if self.tied else self.layers["0"])(tokens)
        for idx in range(1, self.blocks + 2):
            x = self.layers[str(idx)](x)
        logits = head(self.embed, x) if self.tied else self.layers[str(self.blocks + 2)](x)
        return loss_fn(logits, targets)
