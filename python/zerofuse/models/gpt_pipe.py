"""zerofuse's GPT as a pipeline (zerofuse.pipe): the embeddings (tied with the
head), the blocks, the final LayerNorm and the head as a layer sequence, with
the fused head + loss on the last stage.

The layers are taken from a built GPT, so a pipelined run starts from exactly
the weights of the unpipelined one (every process builds the whole model
first: fine for `zerofuse train`'s sizes; a model too large for one process
would be written with LayerSpecs instead). The head layer hands the last
hidden states and the tied embedding matrix to the loss, which runs
linear_cross_entropy without ever holding the [tokens, vocab] logits.
"""
import re
from collections import OrderedDict

import torch
import torch.nn.functional as F

from ..ops.cross_entropy import linear_cross_entropy
from ..pipe import PipelineModule, TiedLayerSpec
from .gpt import GPT

TIED_KEY = "embed"


class GPTEmbeddings(torch.nn.Module):
    """Token + position embeddings around a GPT's own wte and wpe modules."""

    def __init__(self, wte: torch.nn.Embedding, wpe: torch.nn.Embedding):
        super().__init__()
        self.wte, self.wpe = wte, wpe

    def forward(self, idx):
        return self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))


def _hidden_and_head_weight(embeddings, x):
    return x, embeddings.wte.weight


class GPTLoss:
    """The pipeline's loss_fn: ((hidden states, head weight), targets) -> mean cross-entropy."""

    def __init__(self, fused: bool):
        self.fused = fused

    def __call__(self, outputs, targets):
        x, weight = outputs
        if self.fused:
            return linear_cross_entropy(x, weight, targets)
        logits = F.linear(x, weight)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def gpt_pipeline(gpt: GPT, num_stages: int, **kwargs) -> PipelineModule:
    """`gpt` as a PipelineModule of num_stages stages (kwargs: PipelineModule's)."""
    embed = dict(tied_weight_attr="wte.weight")
    layers = [TiedLayerSpec(TIED_KEY, GPTEmbeddings, gpt.wte, gpt.wpe, **embed), *gpt.blocks, gpt.ln_f,
              TiedLayerSpec(TIED_KEY, GPTEmbeddings, gpt.wte, gpt.wpe, forward_fn=_hidden_and_head_weight, **embed)]
    kwargs.setdefault("partition_method", "type:Block")
    return PipelineModule(layers, num_stages=num_stages, loss_fn=GPTLoss(gpt.config.fused), **kwargs)


def gpt_state_dict(pipeline_state: "OrderedDict[str, torch.Tensor]", n_layer: int) -> "OrderedDict[str, torch.Tensor]":
    """A gpt_pipeline state_dict (e.g. from to_fp32_state_dict) under GPT's own names."""
    out = OrderedDict()
    for key, value in pipeline_state.items():
        tied = re.fullmatch(rf"tied_modules\.{TIED_KEY}\.(wte|wpe)\.(.+)", key)
        layer = re.fullmatch(r"(\d+)\.(.+)", key)
        if tied:
            out[f"{tied.group(1)}.{tied.group(2)}"] = value
        elif layer and 1 <= int(layer.group(1)) <= n_layer:
            out[f"blocks.{int(layer.group(1)) - 1}.{layer.group(2)}"] = value
        elif layer and int(layer.group(1)) == n_layer + 1:
            out[f"ln_f.{layer.group(2)}"] = value
        else:
            raise KeyError(f"gpt_state_dict: {key!r} is not a key of a gpt_pipeline of {n_layer} blocks")
    out["lm_head.weight"] = out["wte.weight"]
    return out
