"""File handling for checkpoints: every file is written under a temporary name,
synced and renamed, so a crash never leaves a half-written file that looks
whole; every .pt file is read with weights_only=True (tensors in dicts, no
pickled objects)."""
import os
import random

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit the model."""


def save_file(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    fsync(tmp)
    os.replace(tmp, path)


def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_file(path, mmap=False):
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, bad magic, unexpected types...
        raise CheckpointError(f"checkpoint file {path} cannot be read ({type(e).__name__}: {e}); "
                              "the checkpoint is incomplete or corrupt") from None


def rng_state():
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    version, internal, gauss = random.getstate()
    state["python_version"] = torch.tensor(version)
    state["python_state"] = torch.tensor(internal, dtype=torch.int64)
    if gauss is not None:
        state["python_gauss"] = torch.tensor(gauss, dtype=torch.float64)
    try:
        import numpy as np
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy_state"] = torch.from_numpy(keys.astype("int64"))
        state["numpy_extra"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
        state["numpy_gauss"] = torch.tensor(cached, dtype=torch.float64)
    except ImportError:
        pass
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    gauss = float(state["python_gauss"]) if "python_gauss" in state else None
    random.setstate((int(state["python_version"]), tuple(int(x) for x in state["python_state"].tolist()), gauss))
    if "numpy_state" in state:
        import numpy as np
        pos, has_gauss = (int(x) for x in state["numpy_extra"].tolist())
        np.random.set_state(("MT19937", state["numpy_state"].numpy().astype("uint32"), pos, has_gauss,
                             float(state["numpy_gauss"])))
