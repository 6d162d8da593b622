"""deepspeed.utils.zero_to_fp32 for zerofuse checkpoints: the consolidated
fp32 state_dict of a checkpoint written at any ZeRO stage and world size
(zerofuse.checkpoint.to_fp32_state_dict), without DeepSpeed's script."""
import os

import torch

from ...runtime.checkpoint import to_fp32_state_dict
from ...runtime.checkpoint_files import save_file


def get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=None, exclude_frozen_parameters=False,
                                             lazy_mode=False):
    """The model's state_dict with fp32 master values. checkpoint_dir holds
    `latest` and the tag directories (as save_checkpoint wrote them)."""
    state = to_fp32_state_dict(checkpoint_dir, tag)
    if exclude_frozen_parameters:
        from ...runtime.checkpoint import read_manifest
        _, manifest = read_manifest(checkpoint_dir, tag)
        trainable = {key for p in manifest["params"] for key in p["keys"]}
        state = type(state)((k, v) for k, v in state.items() if k in trainable)
    return state


def convert_zero_checkpoint_to_fp32_state_dict(checkpoint_dir, output_dir, max_shard_size="5GB",
                                               safe_serialization=False, tag=None, exclude_frozen_parameters=False):
    """Writes output_dir/pytorch_model.bin (or model.safetensors with
    safe_serialization), one file, under a temporary name and renamed."""
    state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag, exclude_frozen_parameters)
    os.makedirs(output_dir, exist_ok=True)
    if safe_serialization:
        from safetensors.torch import save_file as save_safetensors
        path = os.path.join(output_dir, "model.safetensors")
        save_safetensors({k: v.contiguous() for k, v in state.items()}, path + ".tmp")
        os.replace(path + ".tmp", path)
    else:
        save_file(state, os.path.join(output_dir, "pytorch_model.bin"))


def load_state_dict_from_zero_checkpoint(model: torch.nn.Module, checkpoint_dir, tag=None):
    """Loads the consolidated fp32 weights into `model` (moved to the CPU) and returns it."""
    model = model.cpu()
    model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag), strict=False)
    return model
