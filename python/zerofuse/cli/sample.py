"""`zerofuse sample`: text from a `zerofuse train` run's latest checkpoint."""
import json
import os
import sys

import torch

from ..checkpoint import to_fp32_state_dict
from ..models import GPT, GPTConfig
from ..models.gpt_pipe import gpt_state_dict


class SampleError(ValueError):
    """A problem with the run directory or the options, reported as one line."""


def add_arguments(p):
    p.add_argument("--run", required=True, help="a run directory written by `zerofuse train`")
    p.add_argument("--prompt", default="", help="text to continue (default: nothing)")
    p.add_argument("--tokens", type=int, default=400, help="bytes to generate (default 400)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    config_path = os.path.join(args.run, "config.json")
    if not os.path.isfile(config_path):
        raise SampleError(f"{args.run} is not a zerofuse train run directory (no config.json)")
    with open(config_path) as f:
        model_config = GPTConfig(**json.load(f)["model"])
    if args.tokens < 1 or args.temperature <= 0 or args.top_k < 1:
        raise SampleError("--tokens and --top-k must be >= 1 and --temperature > 0")
    model = GPT(model_config)
    state = to_fp32_state_dict(os.path.join(args.run, "checkpoints"))
    if "wte.weight" not in state:  # trained with --pipeline-stages: the pipeline's layer names
        state = gpt_state_dict(state, model_config.n_layer)
    model.load_state_dict(state)
    model.eval()
    prompt = args.prompt.encode("utf-8") or b"\n"
    idx = torch.tensor([list(prompt)], dtype=torch.long)
    out = model.generate(idx, args.tokens, temperature=args.temperature, top_k=args.top_k,
                         generator=torch.Generator().manual_seed(args.seed))
    sys.stdout.write(bytes(out[0].tolist()).decode("utf-8", errors="replace"))
    sys.stdout.write("\n")
    return 0
